"""Nothing half-done is visible after a crash: the server is SIGKILLed at random points of
uploads into a sandbox's files, of image builds and of filesystem snapshots; the target is always
absent or whole (the old or the new contents), and no temporary name is ever listed."""

from __future__ import annotations

import hashlib
import os
import random
import signal
import subprocess
import threading
import time

import pytest
from conftest import server_log_since, server_log_size

pytestmark = pytest.mark.slow

KILLS = 30
SIZE = 64 << 20


def _killed_during(work, delay: float, land_first: bool, kill):
    """Run `work()` in a thread, and `kill()` (which kills and restarts the server) after
    `delay` seconds — or once `work` has finished, with `land_first`. A failure of `work` is
    allowed (half a result is what the callers look for). Returns (whether `work` was still running
    at the kill, what `kill` returned, what `work` returned or None)."""
    result: dict = {}

    def run():
        try:
            result["value"] = work()
        except Exception as e:  # noqa: BLE001 - a failed operation is fine; half a result not
            result["error"] = e

    t = threading.Thread(target=run)
    t.start()
    time.sleep(delay)
    if land_first:
        t.join(timeout=120)  # this one lands first: it must survive the kill whole
    raced = t.is_alive()
    killed = kill()
    t.join(timeout=120)
    assert not t.is_alive()
    return raced, killed, result.get("value")


def test_sandbox_file_uploads_killed_at_random_points(server, app, tmp_path):
    import shoal

    sb = shoal.Sandbox.create(app=app, timeout=900)
    try:
        sb.filesystem.make_directory("/up")
        digests = set()
        raced = landed = 0
        rng = random.Random(9)
        for i in range(KILLS):
            local = tmp_path / f"src-{i}"
            block = hashlib.sha256(str(i).encode()).digest() * (1 << 15)  # 1 MiB
            local.write_bytes(block * (SIZE >> 20))
            digests.add(hashlib.sha256(local.read_bytes()).hexdigest())
            hit, _, _ = _killed_during(
                lambda: sb.filesystem.copy_from_local(local, "/up/big.bin"),
                rng.uniform(0.0, 0.5), i % 5 == 4, lambda: server.restart(signal.SIGKILL))
            raced += hit
            names = [f.path.rsplit("/", 1)[-1] for f in sb.filesystem.list_files("/up")]
            assert set(names) <= {"big.bin"}, f"kill {i}: visible leftovers {names}"
            if names:
                got = sb.exec("sha256sum", "/up/big.bin").stdout.read().split()[0]
                assert got in digests, f"kill {i}: a partial file is visible"
                landed += 1
        # Preconditions: kills did hit uploads in flight, and files did land.
        assert raced >= KILLS // 4, f"only {raced} of {KILLS} kills hit an upload in flight"
        assert landed, "no upload ever landed"
    finally:
        sb.terminate()


# --- image layers and snapshots: staged under the image store's `.work`, landed by rename, swept
# at start (images/store.py). The store is shared with other sessions' servers, so every check
# here looks only at this test's own layers (found by a unique token in their files) and at
# scratch directories of the server this test killed.

STEP_SIZE = 3 << 20
SNAP_SIZE = 2 << 20


@pytest.mark.parametrize("kind", ["volume", "nfs"])
def test_volume_and_nfs_uploads_killed_at_random_points(server, tmp_path, kind):
    """30 kills per kind (test_durability.py has the 256 MiB uploads from another process)."""
    import shoal
    from shoal import config

    cls = shoal.Volume if kind == "volume" else shoal.NetworkFileSystem
    name = f"crash-{kind}-{os.getpid()}-{int(time.time())}"
    obj = cls.from_name(name, create_if_missing=True)
    size = 32 << 20
    digests = set()
    raced = landed = 0
    rng = random.Random(11)
    try:
        for i in range(KILLS):
            local = tmp_path / f"src-{i}"
            block = hashlib.sha256(f"{kind}{i}".encode()).digest() * (1 << 15)  # 1 MiB
            local.write_bytes(block * (size >> 20))
            digests.add(hashlib.sha256(local.read_bytes()).hexdigest())

            def upload():
                if kind == "volume":
                    with obj.batch_upload(force=True) as b:
                        b.put_file(local, "/big.bin")
                else:
                    with open(local, "rb") as f:
                        obj.write_file("/big.bin", f)

            if i == 0:  # how long an upload takes now: kills land within that
                t = time.monotonic()
                upload()
                took = time.monotonic() - t
            hit, _, _ = _killed_during(upload, rng.uniform(0.0, took), i % 5 == 4,
                                       lambda: server.restart(signal.SIGKILL))
            raced += hit
            names = [e.path.lstrip("/") for e in obj.listdir("/")]
            assert set(names) <= {"big.bin"}, f"kill {i}: visible leftovers {names}"
            if names:
                got = hashlib.sha256(b"".join(obj.read_file("/big.bin"))).hexdigest()
                assert got in digests, f"kill {i}: a partial file is visible"
                landed += 1
            local.unlink()
        assert raced >= KILLS // 6, f"only {raced} of {KILLS} kills hit an upload in flight"
        assert landed, "no upload ever landed"
        staging = config.paths().volumes / obj.hydrate().object_id / "staging"
        assert not staging.exists() or list(staging.iterdir()) == [], "staging kept files"
    finally:
        cls.objects.delete(name)


@pytest.fixture
def no_pool(server, monkeypatch):
    """The restarted servers keep no warm pool: each restart would otherwise end the last
    server's pooled sandboxes and start new ones (CPU that only slows the kills down). The
    session's server gets its pool back at the end."""
    monkeypatch.setenv("SHOAL_POOL", "0")
    yield server
    monkeypatch.undo()
    server.restart(signal.SIGTERM)


def _store():
    from shoal import config
    from shoal.server.images.store import ImageStore

    return ImageStore(config.paths().images)


def _kill_and_restart(server, store) -> tuple[int, list[str]]:
    """SIGKILL the server, note what of it is in the store's scratch at that moment (before any
    server can sweep it: others share the store), start it again. Returns (its pid, names)."""
    killed = server.proc.pid
    server.kill(signal.SIGKILL)
    left = sorted(p.name for p in (store.root / ".work").iterdir()
                  if p.name.startswith(f"{killed}-"))
    server.start()
    return killed, left


def _check_store_clean(store, killed_pid: int, what: str, layers: set[str],
                       shas: tuple[str, ...] = ()) -> None:
    """Nothing half-made of the killed server is visible: none of its scratch, no temporary
    blob of these uploads, no temporary manifest naming these layers. (Only this test's own:
    other sessions' servers work in the same store meanwhile.)"""
    work = sorted(p.name for p in (store.root / ".work").iterdir())
    assert not [n for n in work if n.startswith(f"{killed_pid}-")], \
        f"{what}: the killed server's scratch is still there: {work}"
    with open("/proc/self/mountinfo") as f:
        mounts = [line.split()[4] for line in f if f"/.work/{killed_pid}-" in line]
    assert not mounts, f"{what}: the killed server's build mounts are still there: {mounts}"
    runc = subprocess.run(["runc", "--root", str(_home() / "runc"), "list", "-q"],
                          capture_output=True, text=True).stdout.split()
    assert not [c for c in runc if c.startswith("bd-")], f"{what}: build containers left: {runc}"
    blobs = [p.name for p in (store.root / "blobs" / "sha256").iterdir()]
    assert not [n for n in blobs if any(sha in n and n != sha for sha in shas)], \
        f"{what}: a temporary blob is visible: {blobs}"
    for p in (store.root / "manifests").iterdir():
        if not (p.name.startswith("im-") and p.name.endswith(".json")):
            text = p.read_text(errors="replace")
            assert not [x for x in layers if x in text], \
                f"{what}: a temporary manifest is visible: {p.name}"


def _whole(layer_dir) -> None:
    """A layer under its final name has its tree and its record (one rename moved both)."""
    assert (layer_dir / "rootfs").is_dir() and (layer_dir / "layer.json").is_file(), \
        f"a partial layer is visible: {layer_dir}"


def _sha(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def test_image_builds_killed_at_random_points(no_pool, app, tmp_path):
    """A build step (a command, or files added from the client, of a few MiB) is in flight when
    the server is SIGKILLed: after the restart the layer of that step is absent or whole, no
    scratch is left, and building again succeeds with the right contents."""
    import shoal

    server = no_pool
    store = _store()
    rng = random.Random(91)
    raced = landed = inflight = 0
    mine: list[tuple[str, str]] = []  # (image id, layer id) to remove at the end
    blobs: list[str] = []
    try:
        def step(i: int):
            """Build i's image (a unique step: odd ones a command, even ones a local file) and
            the sha256 its file must have."""
            token = f"crash{i}-{os.urandom(8).hex()}"
            target = f"/crash/{token}"
            if i % 2:
                line = (token + "\n").encode()
                want = hashlib.sha256((line * (STEP_SIZE // len(line) + 1))[:STEP_SIZE]).hexdigest()
                return target, want, shoal.Image.debian_slim().run_commands(
                    f"mkdir -p /crash && yes {token} | head -c {STEP_SIZE} > {target}")
            local = tmp_path / token
            local.write_bytes(os.urandom(STEP_SIZE))
            blobs.append(_sha(local))
            return target, _sha(local), shoal.Image.debian_slim().add_local_file(local, target)

        # How long a build of each kind takes now (this machine's load varies): kills land in
        # the time that takes, so most of them hit a build in flight.
        took = []
        for kind in (0, 1):
            _, _, img = step(kind)
            t = time.monotonic()
            img.build()
            took.append(time.monotonic() - t)
            mine.append((img.object_id, store.manifest(img.object_id).layers[-1]))
        for i in range(KILLS):
            target, want, img = step(i)
            hit, (killed, left), _ = _killed_during(
                lambda: img.build().object_id, rng.uniform(0.0, took[i % 2]), i % 5 == 4,
                lambda: _kill_and_restart(server, store))
            raced += hit
            inflight += any(n.split("-")[2] in ("step", "add", "commit") for n in left)
            found = list(store.root.glob(f"layers/*/rootfs{target}"))
            assert len(found) <= 1, f"kill {i}: two layers for one step: {found}"
            _check_store_clean(store, killed, f"kill {i}",
                               {f"layers/{f.parents[2].name}" for f in found},
                               (want,) if i % 2 == 0 else ())
            if found:
                _whole(found[0].parents[2])
                assert _sha(found[0]) == want, f"kill {i}: a partial layer is visible"
                landed += 1
            # Building again after the restart succeeds, from the whole layer if it landed.
            again = img.build()
            layer = store.manifest(again.object_id).layers[-1]
            mine.append((again.object_id, layer))
            if found:
                assert found[0] == store.layer_path(layer) / target.lstrip("/")
            assert _sha(store.layer_path(layer) / target.lstrip("/")) == want
            if i % 10 == 9:  # and a sandbox of it sees the file byte for byte
                sb = shoal.Sandbox.create(app=app, image=again, timeout=60)
                try:
                    assert sb.exec("sha256sum", target).stdout.read().split()[0] == want
                finally:
                    sb.terminate()
        print(f"builds: {raced} of {KILLS} kills raced a build, {inflight} hit its files being "
              f"made, {landed} layers landed before a kill; build took {took[0]:.2f} s (files), "
              f"{took[1]:.2f} s (command)")
        # Preconditions: kills did hit builds in flight (the killed server had a step's scratch
        # in the store), and layers did land before a kill.
        assert raced >= KILLS // 10, f"only {raced} of {KILLS} kills hit a build in flight"
        assert inflight >= KILLS // 10, f"only {inflight} kills hit a step's files being made"
        assert landed, "no layer ever landed before a kill"
    finally:
        for image_id, layer in mine:
            store.remove_manifest(image_id)
            store.remove_layer(layer)
        for sha in blobs:
            (store.root / "blobs" / "sha256" / sha).unlink(missing_ok=True)
        for local in tmp_path.glob("crash*"):
            local.unlink()


def test_snapshots_killed_at_random_points(no_pool, app):
    """`snapshot_filesystem()` is in flight when the server is SIGKILLed: after the restart there
    is no image, or a whole one whose sandbox sees the snapshotted files byte for byte; the
    sandbox runs on (resumed if the kill froze it mid-copy); no scratch and no layer without
    its image is left."""
    import shoal

    server = no_pool
    store = _store()
    rng = random.Random(92)
    token = os.urandom(8).hex()
    raced = inflight = resumed = 0
    images: list[tuple[int, str]] = []  # (generation, image id)
    sb = shoal.Sandbox.create(app=app, timeout=900)
    try:
        # The payload: one file of a few MiB and a few hundred small ones (the copy's length).
        p = sb.exec("sh", "-c", f"mkdir -p /snap/many && head -c {SNAP_SIZE} /dev/urandom "
                                f"> /snap/data.bin && echo {token} > /snap/token && "
                                "for n in $(seq 400); do echo $n > /snap/many/$n; done")
        assert p.wait() == 0
        data = sb.exec("sha256sum", "/snap/data.bin").stdout.read().split()[0]
        # How long a snapshot takes now (this machine's load varies): kills land in the first
        # time that takes, so most of them hit a snapshot in flight.
        t = time.monotonic()
        sb.snapshot_filesystem()
        took = time.monotonic() - t
        for i in range(KILLS):
            assert sb.exec("sh", "-c", f"echo {i} > /snap/gen").wait() == 0
            log_at = server_log_size()
            hit, (killed, left), snap_id = _killed_during(
                lambda: sb.snapshot_filesystem().object_id, rng.uniform(0.0, took),
                i % 5 == 4, lambda: _kill_and_restart(server, store))
            raced += hit
            inflight += any(n.split("-")[2] in ("snap", "commit") for n in left)
            resumed += f"resuming sandbox {sb.object_id}" in server_log_since(log_at)
            # The sandbox came through the kill running, not frozen.
            state = subprocess.run(["runc", "--root", str(_home() / "runc"), "state",
                                    sb.object_id], capture_output=True, text=True)
            assert '"status": "running"' in state.stdout, f"kill {i}: {state.stdout}"
            assert sb.exec("cat", "/snap/gen").stdout.read().strip() == str(i)
            # Every layer of this sandbox's snapshots is whole and belongs to an image.
            named = {layer for m in store.manifests() for layer in m.layers}
            ours = set()
            for token_file in store.root.glob("layers/snap-*/rootfs/snap/token"):
                layer = token_file.parents[2]
                if token_file.read_text().strip() != token:
                    continue
                ours.add(f"layers/{layer.name}")
                _whole(layer)
                assert f"layers/{layer.name}" in named, f"kill {i}: {layer.name} has no image"
                assert _sha(layer / "rootfs/snap/data.bin") == data, f"kill {i}: partial layer"
            _check_store_clean(store, killed, f"kill {i}", ours)
            if snap_id is not None:
                images.append((i, snap_id))
        # Each image a client got is whole: a sandbox of it sees the files byte for byte.
        assert images, "no snapshot ever landed"
        for gen, image_id in images[::5] + images[-1:]:
            sb2 = shoal.Sandbox.create(app=app, image=shoal.Image.from_id(image_id), timeout=60)
            try:
                out = sb2.exec("sh", "-c", "sha256sum /snap/data.bin; cat /snap/token /snap/gen;"
                                           " ls /snap/many | wc -l").stdout.read().split()
                assert out[0] == data and out[2:] == [token, str(gen), "400"], (gen, out)
            finally:
                sb2.terminate()
        for gen, image_id in images:
            m = store.manifest(image_id)
            assert m and all(store.has_layer(x) for x in m.layers)
            assert (store.layer_path(m.layers[-1]) / "snap/gen").read_text().strip() == str(gen)
        print(f"snapshots: {raced} of {KILLS} kills raced a snapshot, {inflight} hit it being "
              f"made, {resumed} froze the sandbox mid-copy, {len(images)} images landed; a "
              f"snapshot took {took:.2f} s")
        # Preconditions: kills did hit snapshots in flight (the killed server had a snapshot's
        # scratch in the store), some of them while the sandbox was frozen for the copy.
        assert raced >= KILLS // 10, f"only {raced} of {KILLS} kills hit a snapshot in flight"
        assert inflight >= KILLS // 10, f"only {inflight} kills hit a snapshot being made"
        assert resumed, "no kill ever froze the sandbox mid-copy"
    finally:
        sb.terminate()
        for m in store.manifests():
            top = store.root / m.layers[-1] / "rootfs" / "snap" / "token"
            if top.is_file() and top.read_text().strip() == token:
                store.remove_manifest(m.id)
        for token_file in store.root.glob("layers/snap-*/rootfs/snap/token"):
            if token_file.read_text().strip() == token:
                store.remove_layer(f"layers/{token_file.parents[2].name}")


def _home():
    from shoal import config

    return config.paths().home
