"""Registry pulls (`Image.from_registry`, `Image.from_dockerfile`) against a real Docker
distribution registry on 127.0.0.1 (Debian's `docker-registry`), with small images pushed by the
test itself (tests/registry_util.py): no network beyond the loopback.

Every layer pushed here carries a per-run nonce, so each run downloads and unpacks afresh (the
image store is shared between sessions); the module removes what it added from the store at the
end.
"""

from __future__ import annotations

import json
import os
import secrets
import time
from pathlib import Path

import pytest

import shoal
from shoal.exception import ExecutionError, InvalidError

from registry_util import (BUSYBOX, REGISTRY_BIN, Pusher, Registry, Tar, forget_layers, gz,
                           oci_layer_dir, store_blob, store_root)

pytestmark = pytest.mark.skipif(not os.path.exists(REGISTRY_BIN) or not os.path.exists(BUSYBOX),
                                reason="needs Debian's docker-registry and busybox-static")

NONCE = secrets.token_hex(8)
BUSY_ENV = ["PATH=/bin:/usr/bin", "FROM_IMAGE=yes"]
PASSWD = "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000::/home/app:/bin/sh\n"
GROUP = "root:x:0:\napp:x:1000:\n"
APPLETS = ["sh", "cat", "ls", "echo", "id", "stat", "sleep", "pwd", "env", "test"]


# --- images ----------------------------------------------------------------------------------

def base_layer(tag: str = "base") -> bytes:
    """Layer 1: busybox and friends, plus what layer 2 and the unpacker act on."""
    t = Tar().dir("bin").dir("etc").dir("data").dir("opq").dir("usr").dir("usr/bin")
    t.dir("dev-in-image").dir("home").dir("home/app").dir("root", 0o700)
    with open(BUSYBOX, "rb") as f:
        t.file("bin/busybox", f.read(), 0o755)
    for applet in APPLETS:
        t.symlink(f"bin/{applet}", "busybox")
    t.file("etc/passwd", PASSWD).file("etc/group", GROUP)
    t.file("data/keep.txt", "keep\n").file("data/gone.txt", "gone\n")
    t.file("opq/a.txt", "a\n")
    t.file("usr/bin/suid", "#!/bin/sh\necho suid\n", 0o4755)
    t.file("usr/bin/sgid", "#!/bin/sh\necho sgid\n", 0o2755)
    t.chardev("dev-in-image/null", 1, 3)
    t.file(f".nonce-{tag}", NONCE)
    return t.bytes()


def top_layer() -> bytes:
    """Layer 2: a whiteout, an opaque directory, a new file."""
    t = Tar().dir("data").file("data/.wh.gone.txt", "")
    t.dir("opq").file("opq/.wh..wh..opq", "").file("opq/b.txt", "b\n")
    t.file("hello.txt", "hello from the registry\n")
    t.file(".nonce-top", NONCE)
    return t.bytes()


def run(sb, *args: str) -> tuple[int, str]:
    p = sb.exec(*args)
    out = p.stdout.read()
    return p.wait(), out


# --- fixtures --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pushed_digests():
    """Every layer blob digest this module pushed, removed from the image store at the end."""
    digests: set[str] = set()
    yield digests
    forget_layers(digests)


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    reg = Registry(tmp_path_factory.mktemp("registry")).start()
    yield reg
    reg.stop()


@pytest.fixture(scope="module")
def auth_registry(tmp_path_factory):
    reg = Registry(tmp_path_factory.mktemp("registry-auth"), users={"alice": "s3cret"}).start()
    yield reg
    reg.stop()


@pytest.fixture(scope="module")
def pusher(registry, pushed_digests):
    p = Pusher(registry)
    yield p
    p.close()


@pytest.fixture(scope="module")
def busy(pusher, pushed_digests):
    """test/busy:1: the busybox layer and the whiteout/opaque layer, as an OCI image."""
    img = pusher.image("test/busy", "1", [base_layer(), top_layer()], env=BUSY_ENV,
                       workdir="/data")
    pushed_digests.update(img.layer_digests)
    return img


def create(app, image, *args, **kw):
    return shoal.Sandbox.create(*args, image=image, app=app, timeout=120, **kw)


# --- 1. pull and run -------------------------------------------------------------------------

def test_pull_and_run(app, registry, busy):
    assert not oci_layer_dir(busy.layer_digests[0]).exists()  # fresh: this run's nonce
    sb = create(app, shoal.Image.from_registry(busy.ref))
    try:
        assert sb.poll() is None, "a sandbox with no command stays up"
        assert run(sb, "cat", "/hello.txt") == (0, "hello from the registry\n")
        assert run(sb, "ls", "/data") == (0, "keep.txt\n"), "the whiteout was not applied"
        assert run(sb, "ls", "/opq") == (0, "b.txt\n"), "the opaque directory was not applied"
        assert run(sb, "stat", "-c", "%a", "/usr/bin/suid") == (0, "755\n"), "setuid kept"
        assert run(sb, "stat", "-c", "%a", "/usr/bin/sgid") == (0, "755\n"), "setgid kept"
        code, _ = run(sb, "test", "-e", "/dev-in-image/null")
        assert code == 1, "a device node from the image was created"
        assert run(sb, "sh", "-c", "echo $FROM_IMAGE") == (0, "yes\n")
        assert run(sb, "pwd") == (0, "/data\n")
        assert sb.exec("no-such-binary").wait() == 127
    finally:
        sb.terminate()
    # On the host too: no device node and no setuid bit in the stored layer.
    layer = oci_layer_dir(busy.layer_digests[0]) / "rootfs"
    assert (layer / "bin" / "busybox").is_file()
    assert not (layer / "dev-in-image" / "null").exists()
    assert (layer / "usr" / "bin" / "suid").stat().st_mode & 0o7777 == 0o755


def test_image_without_a_shell(app, pusher, pushed_digests):
    only = Tar().dir("etc").file("etc/only.txt", f"just a file {NONCE}\n").bytes()
    img = pusher.image("test/noshell", "1", [only])
    pushed_digests.update(img.layer_digests)
    sb = create(app, shoal.Image.from_registry(img.ref))
    try:
        assert sb.poll() is None, "the sandbox must idle with shoal's own tools"
        assert sb.filesystem.read_text("/etc/only.txt") == f"just a file {NONCE}\n"
        p = sb.exec("/bin/sh", "-c", "true")
        assert p.wait() == 127
        assert sb.exec("cat", "/etc/only.txt").wait() == 127
        # Commands run through shoal's static agent, which needs nothing from the image.
        p = sb.exec("/.shoal/busybox", "cat", "/etc/only.txt")
        assert (p.stdout.read(), p.wait()) == (f"just a file {NONCE}\n", 0)
    finally:
        sb.terminate()


# --- 2. caching and sharing ------------------------------------------------------------------

def test_second_pull_is_cached_and_layers_are_shared(app, registry, pusher, busy,
                                                     pushed_digests, capsys):
    l1, l2 = busy.layer_digests
    shoal.Image.from_registry(busy.ref).build()  # pulled at least once (test 1 may not have run)
    gets = registry.blob_gets(l1), registry.blob_gets(l2)
    assert gets[0] >= 1 and gets[1] >= 1, registry.log()[-2000:]
    mtime = (oci_layer_dir(l1) / "layer.json").stat().st_mtime_ns

    # The same image again, through a new recipe object: no layer download, no unpacking.
    t = time.monotonic()
    capsys.readouterr()
    with shoal.enable_output():
        img = shoal.Image.from_registry(busy.ref).build()
    log = capsys.readouterr().err
    assert time.monotonic() - t < 10
    assert (registry.blob_gets(l1), registry.blob_gets(l2)) == gets, "a cached layer was fetched"
    assert f"{l1[7:19]}: cached" in log and f"{l2[7:19]}: cached" in log, log
    assert img.object_id

    # Another image sharing layer 1, as a Docker v2 manifest: layer 1 stored once, not fetched.
    other_top = Tar().file("other.txt", f"other {NONCE}\n").bytes()
    other = pusher.image("test/other", "1", [base_layer(), other_top], media="docker",
                         env=BUSY_ENV)
    pushed_digests.update(other.layer_digests)
    assert other.layer_digests[0] == l1
    with shoal.enable_output():
        other_img = shoal.Image.from_registry(other.ref).build()
    log = capsys.readouterr().err
    assert f"{l1[7:19]}: cached" in log, log
    assert registry.blob_gets(l1) == gets[0], "the shared layer was downloaded again"
    assert registry.blob_gets(other.layer_digests[1]) == 1
    assert (oci_layer_dir(l1) / "layer.json").stat().st_mtime_ns == mtime
    layers = [json.loads((store_root() / "manifests" / f"{i.object_id}.json").read_text())
              ["layers"] for i in (img, other_img)]
    assert layers[0][0] == layers[1][0] == f"oci/{l1[7:39]}"
    assert layers[0][1] != layers[1][1]


# --- 3. manifest lists and OCI indexes -------------------------------------------------------

@pytest.mark.parametrize("media", ["oci", "docker"])
def test_index_resolves_to_linux_amd64(app, pusher, pushed_digests, media):
    variants = {}
    for arch in ("arm64", "amd64", "s390x"):
        layer = Tar().file("arch.txt", f"{arch} {media} {NONCE}\n").bytes()
        variants[arch] = pusher.image(f"test/multi-{media}", None, [layer], media=media,
                                      arch=arch)
        pushed_digests.update(variants[arch].layer_digests)
    # amd64 neither first nor last, and an arm64 entry with the wrong os before it.
    ref = pusher.index(f"test/multi-{media}", "1",
                       [(variants["arm64"], "linux", "arm64"),
                        (variants["s390x"], "windows", "amd64"),
                        (variants["amd64"], "linux", "amd64"),
                        (variants["s390x"], "linux", "s390x")], media=media)
    sb = create(app, shoal.Image.from_registry(ref))
    try:
        assert sb.filesystem.read_text("/arch.txt") == f"amd64 {media} {NONCE}\n"
    finally:
        sb.terminate()
    assert not oci_layer_dir(variants["arm64"].layer_digests[0]).exists(), \
        "the arm64 variant was pulled too"


def test_index_without_amd64_is_a_clear_error(pusher, pushed_digests):
    layer = Tar().file("arch.txt", f"arm64 only {NONCE}\n").bytes()
    arm = pusher.image("test/armonly", None, [layer], arch="arm64")
    pushed_digests.update(arm.layer_digests)
    ref = pusher.index("test/armonly", "1", [(arm, "linux", "arm64")])
    with pytest.raises(ExecutionError, match="no linux/amd64 variant"):
        shoal.Image.from_registry(ref).build()
    assert not oci_layer_dir(arm.layer_digests[0]).exists()


# --- 4. basic auth ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def private(auth_registry, pushed_digests):
    p = Pusher(auth_registry, auth=("alice", "s3cret"))
    try:
        layer = Tar().file("private.txt", f"private {NONCE}\n").bytes()
        img = p.image("team/private", "1", [layer])
    finally:
        p.close()
    pushed_digests.update(img.layer_digests)
    return img


def _creds(user: str, password: str):
    return shoal.Secret.from_dict({"REGISTRY_USERNAME": user, "REGISTRY_PASSWORD": password})


def test_basic_auth_needs_credentials(private):
    with pytest.raises(ExecutionError, match="needs credentials") as e:
        shoal.Image.from_registry(private.ref).build()
    assert "REGISTRY_USERNAME" in str(e.value)


def test_basic_auth_wrong_password(private):
    with pytest.raises(ExecutionError, match="refused the credentials"):
        shoal.Image.from_registry(private.ref, secret=_creds("alice", "wrong")).build()
    assert not oci_layer_dir(private.layer_digests[0]).exists()


def test_basic_auth_with_secret(app, private):
    sb = create(app, shoal.Image.from_registry(private.ref, secret=_creds("alice", "s3cret")))
    try:
        assert sb.filesystem.read_text("/private.txt") == f"private {NONCE}\n"
    finally:
        sb.terminate()


# --- 5. missing and unreachable --------------------------------------------------------------

def test_missing_tag_and_repository(registry, busy):
    for ref in (f"{registry.host}/test/busy:no-such-tag", f"{registry.host}/test/nothing:1"):
        with pytest.raises(ExecutionError, match="no such image or tag"):
            shoal.Image.from_registry(ref).build()


def test_unreachable_registry():
    t = time.monotonic()
    with pytest.raises(ExecutionError, match="cannot reach") as e:
        shoal.Image.from_registry("127.0.0.1:1/x:y").build()
    assert time.monotonic() - t < 20
    assert "Traceback" not in str(e.value)


def test_invalid_reference():
    with pytest.raises((InvalidError, ExecutionError), match="invalid image reference"):
        shoal.Image.from_registry("127.0.0.1:5000/UPPER CASE:tag").build()


# --- 6. corrupt blobs ------------------------------------------------------------------------

@pytest.mark.parametrize("same_size", [True, False], ids=["same-size", "other-size"])
def test_corrupt_blob_is_refused_and_not_kept(registry, pusher, pushed_digests, same_size):
    layer = Tar().file("payload.txt", f"payload {same_size} {NONCE}\n" * 50).bytes()
    img = pusher.image("test/corrupt", f"{same_size}".lower(), [layer])
    digest = img.layer_digests[0]
    pushed_digests.add(digest)
    data = registry.blob_data(digest)
    good = data.read_bytes()
    bad = bytes(b ^ 0xFF for b in good) if same_size else good[: len(good) // 2]
    data.write_bytes(bad)
    with pytest.raises(ExecutionError, match="digest mismatch"):
        shoal.Image.from_registry(img.ref).build()
    assert registry.blob_gets(digest) >= 1, "the layer was never fetched"
    assert not oci_layer_dir(digest).exists()
    assert not store_blob(digest).exists()
    blobs = store_root() / "blobs" / "sha256"
    assert not [p for p in blobs.iterdir() if digest[7:] in p.name], "a partial download stayed"
    # Repaired, the same image pulls.
    data.write_bytes(good)
    shoal.Image.from_registry(img.ref).build()
    assert oci_layer_dir(digest).is_dir()


def test_pull_by_digest_checks_the_manifest(registry, pusher, pushed_digests):
    layer = Tar().file("by-digest.txt", f"by digest {NONCE}\n").bytes()
    img = pusher.image("test/bydigest", None, [layer])
    pushed_digests.update(img.layer_digests)
    assert "@sha256:" in img.ref
    shoal.Image.from_registry(img.ref).build()
    assert oci_layer_dir(img.layer_digests[0]).is_dir()
    # The registry now serves other bytes (the same manifest, reformatted) under that digest.
    data = registry.blob_data(img.manifest_digest)
    data.write_bytes(json.dumps(json.loads(data.read_bytes()), indent=2).encode())
    with pytest.raises(ExecutionError, match="manifest digest mismatch"):
        shoal.Image.from_registry(img.ref).build()


# --- 7. hostile layers -----------------------------------------------------------------------

HOSTILE = {
    "dotdot": (lambda t, n: t.file(f"../evil-{n}.txt", "evil"), "outside the layer"),
    "nested-dotdot": (lambda t, n: t.dir("a").file(f"a/../../evil-{n}.txt", "evil"),
                      "outside the layer"),
    "absolute": (lambda t, n: t.file(f"/abs/evil-{n}.txt", "evil"), "absolute path"),
    "hardlink-dotdot": (lambda t, n: t.hardlink(f"passwd-{n}", "../../etc/passwd"),
                        "outside the layer"),
    "hardlink-absolute": (lambda t, n: t.hardlink(f"passwd-{n}", "/etc/passwd"),
                          "absolute path"),
}


@pytest.mark.parametrize("kind", list(HOSTILE))
def test_hostile_layer_fails_and_leaves_no_layer(pusher, pushed_digests, kind):
    make, message = HOSTILE[kind]
    name = f"{kind}-{NONCE}"
    t = Tar().file("ok-first.txt", name)
    layer = make(t, name).bytes()
    img = pusher.image("test/hostile", kind, [layer])
    pushed_digests.update(img.layer_digests)
    with pytest.raises(InvalidError, match=message):
        shoal.Image.from_registry(img.ref).build()
    assert not oci_layer_dir(img.layer_digests[0]).exists()
    store = store_root()
    for escaped in (store / f"evil-{name}.txt", store.parent / f"evil-{name}.txt",
                    Path(f"/evil-{name}.txt"), Path(f"/abs/evil-{name}.txt"),
                    store / "oci" / f"evil-{name}.txt", store / ".work" / f"evil-{name}.txt"):
        assert not escaped.exists(), f"{escaped} was written"
    assert not list((store / ".work").glob(f"*/evil-{name}.txt"))


def test_hardlink_through_symlink_stays_in_the_layer(pusher, pushed_digests):
    """`l -> /etc` then a hard link to `l/passwd`: the link target resolves inside the layer, so
    the layer gets its own passwd, never the host's."""
    fake = f"root:x:0:0:fake {NONCE}:/root:/bin/sh\n"
    layer = (Tar().dir("etc").file("etc/passwd", fake).symlink("l", "/etc")
             .hardlink("h", "l/passwd").bytes())
    img = pusher.image("test/hardlink", "1", [layer])
    pushed_digests.update(img.layer_digests)
    shoal.Image.from_registry(img.ref).build()
    h = oci_layer_dir(img.layer_digests[0]) / "rootfs" / "h"
    assert h.read_text() == fake
    assert h.stat().st_ino != os.stat("/etc/passwd").st_ino
    assert h.stat().st_ino == (h.parent / "etc" / "passwd").stat().st_ino


@pytest.mark.parametrize("kind, make, message", [
    ("garbage", lambda: os.urandom(4096), "not a tar archive"),
    ("truncated", lambda: gz(Tar().file("big.bin", os.urandom(200_000)).bytes())[:50_000],
     "corrupt layer archive"),
])
def test_unreadable_layer_is_a_clear_error(pusher, pushed_digests, kind, make, message):
    img = pusher.raw_image("test/unreadable", kind, [make()])
    pushed_digests.update(img.layer_digests)
    with pytest.raises(InvalidError, match=message):
        shoal.Image.from_registry(img.ref).build()
    assert not oci_layer_dir(img.layer_digests[0]).exists()


@pytest.mark.parametrize("kind", ["hardlink-to-missing", "file-under-a-file"])
def test_malformed_layer_is_a_clear_error(pusher, pushed_digests, kind):
    t = Tar().file("f", "a file\n")
    layer = (t.hardlink("h", f"missing-{NONCE}") if kind == "hardlink-to-missing"
             else t.file("f/x", "under a file\n")).bytes()
    img = pusher.image("test/malformed", kind, [layer])
    pushed_digests.update(img.layer_digests)
    with pytest.raises(InvalidError, match="layer"):
        shoal.Image.from_registry(img.ref).build()
    assert not oci_layer_dir(img.layer_digests[0]).exists()


def _symlink_trick(pusher, pushed_digests, target: str, tag: str):
    host_file = Path(f"/tmp/pwned-{tag}-{NONCE}.txt")
    layer = (Tar().symlink("link", target).file(f"link/{host_file.name}", "pwned\n")
             .file("after.txt", "after\n").bytes())
    img = pusher.image("test/symlink", tag, [layer])
    pushed_digests.update(img.layer_digests)
    return img, host_file


@pytest.mark.parametrize("target", ["/tmp", "../../../../../../tmp"], ids=["abs", "rel"])
def test_symlink_then_file_does_not_escape(pusher, pushed_digests, target):
    tag = "abs" if target.startswith("/") else "rel"
    img, host_file = _symlink_trick(pusher, pushed_digests, target, tag)
    try:
        try:
            shoal.Image.from_registry(img.ref).build()
        except Exception:  # noqa: BLE001 - refusing the layer is fine too (the type is tested
            pass           # below); what matters here is the host
        assert not host_file.exists(), f"the layer wrote {host_file} on the host"
    finally:
        host_file.unlink(missing_ok=True)


def test_writing_through_a_symlink_in_a_layer_is_refused_clearly(pushed_digests, pusher):
    """`link -> /tmp` then `link/x`: Docker, unpacking in a chroot, fails on this too; shoal refuses
    the layer with a clear error, and nothing lands on the host or in the store."""
    img, host_file = _symlink_trick(pusher, pushed_digests, "/tmp", "inside")
    try:
        with pytest.raises(InvalidError, match="not a directory"):
            shoal.Image.from_registry(img.ref).build()
        assert not host_file.exists()
        assert not oci_layer_dir(img.layer_digests[0]).exists()
    finally:
        host_file.unlink(missing_ok=True)


# --- 8. registry image plus steps ------------------------------------------------------------

def test_registry_image_with_steps(app, busy):
    image = (shoal.Image.from_registry(busy.ref)
             .run_commands(f"echo built {NONCE} > /built.txt", "ls /data > /data-at-build.txt",
                           "echo $FROM_IMAGE $(pwd) > /env-at-build.txt")
             .env({"A": "1"}))
    sb = create(app, image)
    try:
        assert run(sb, "cat", "/built.txt") == (0, f"built {NONCE}\n")
        assert run(sb, "cat", "/data-at-build.txt") == (0, "keep.txt\n")
        assert run(sb, "cat", "/env-at-build.txt") == (0, "yes /data\n"), \
            "the build step did not get the image's env and workdir"
        assert run(sb, "sh", "-c", "echo $A $FROM_IMAGE") == (0, "1 yes\n")
        assert run(sb, "pwd") == (0, "/data\n")
    finally:
        sb.terminate()


# --- 9. Dockerfiles --------------------------------------------------------------------------

def _dockerfile(tmp_path: Path, text: str) -> Path:
    # Constant content: the uploaded blob is shared by every run (the store keeps blobs).
    (tmp_path / "hello.txt").write_text("hello from the build context\n")
    path = tmp_path / "Dockerfile"
    path.write_text(text)
    return path


def test_dockerfile_from_registry(app, busy, tmp_path):
    path = _dockerfile(tmp_path, f"""\
# a comment
FROM {busy.ref}
ARG GREETING=hi
ENV APP_HOME=/app
WORKDIR $APP_HOME
COPY hello.txt ./
RUN echo "$GREETING" > /greeting.txt && \\
    pwd > /build-cwd.txt
USER app
ENTRYPOINT ["/bin/sh", "-c"]
LABEL x=y
EXPOSE 80
CMD ["ignored"]
""")
    image = shoal.Image.from_dockerfile(path)
    sb = create(app, image)
    try:
        assert run(sb, "cat", "/app/hello.txt") == (0, "hello from the build context\n")
        assert run(sb, "cat", "/greeting.txt") == (0, "hi\n")
        assert run(sb, "cat", "/build-cwd.txt") == (0, "/app\n")
        assert run(sb, "id", "-u") == (0, "1000\n"), "USER was not applied"
        assert run(sb, "pwd") == (0, "/app\n")
        assert run(sb, "sh", "-c", "echo $APP_HOME $FROM_IMAGE") == (0, "/app yes\n")
    finally:
        sb.terminate()
    sb = create(app, image, "echo from-entrypoint; id -u")
    try:
        sb.wait(raise_on_termination=False)
        assert sb.stdout.read() == "from-entrypoint\n1000\n"
        assert sb.returncode == 0
    finally:
        sb.terminate()


@pytest.mark.parametrize("line, word", [
    ("HEALTHCHECK CMD true", "HEALTHCHECK"),
    ("VOLUME /x", "VOLUME"),
    ("STOPSIGNAL SIGTERM", "STOPSIGNAL"),
    ("FROM a b c", "FROM takes an image"),
    ("COPY ../outside /x", "outside the build context"),
    ("COPY --from=3 hello.txt /x", "no earlier stage 3"),
    ("COPY --chmod=755 hello.txt /x", "--chmod is not supported"),
    ("COPY --chown=a:b:c hello.txt /x", "not USER"),
])
def test_dockerfile_unsupported(busy, tmp_path, line, word):
    (tmp_path.parent / "outside").write_text("outside\n")
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    path = _dockerfile(ctx, f"FROM {busy.ref}\nRUN true\n{line}\n")
    with pytest.raises(InvalidError, match=word) as e:
        shoal.Image.from_dockerfile(path)
    if word.isupper():
        assert "not supported" in str(e.value)
    assert "Dockerfile:3" in str(e.value)
