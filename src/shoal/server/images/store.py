"""The image store: content-addressed layers and the manifests that stack them.

    <store>/base/<key>/rootfs          the debootstrapped default image (images/base.py)
    <store>/layers/<key>/rootfs        a built step's layer; <key> hashes parent + step
    <store>/oci/<digest>/rootfs        a registry layer, by its blob digest
    <store>/flat/<key>/rootfs          several layers merged, when a chain is too deep to mount
    <store>/manifests/<image id>.json  an image: layer ids bottom to top, plus its config
    <store>/blobs/sha256/<hex>         downloaded or uploaded archives
    <store>/.work/                     scratch: builds, snapshots, commits, removals in flight
    <store>/.locks/                    flocks: one per layer being made, one per process using .work

Crash safety (issue 9). Readers see only whole things:
- A layer is made in `.work/<owner>-...` and appears under its final name by one rename, only
  when complete: a build that fails or is killed leaves nothing a later build would reuse.
- Blobs and manifests are written to an unnamed O_TMPFILE in their final directory and linked
  under their name when whole (`staged_file`): a killed writer leaves no name at all.
- A snapshot's layer and its manifest are two renames; `commit_image` records the layer in its
  scratch directory first, so the sweep removes a layer whose manifest never came.
`<owner>` is `<pid>-<token>`; the process holds the flock `.locks/work-<owner>` while it lives, so
`clean_scratch` (at server start) removes only what dead processes left — never the work of
another live server sharing the store — unmounting first what a killed build left mounted there.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import secrets
import shutil
import subprocess
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from shoal.server import linux as _linux

MAX_MOUNT_LAYERS = 24  # lowerdir= must fit in one page of mount options; deeper chains flatten
PENDING = "pending-layer"  # in a snapshot's scratch: the layer it is committing (commit_image)

# This process's owner name and flocked lock file per store root (ImageStore.owner).
_owners: dict[str, tuple[int, str, object]] = {}
_owners_mu = threading.Lock()  # guards _owners (scratch is made from many threads)


@dataclass
class ImageConfig:
    env: dict[str, str] = field(default_factory=dict)
    workdir: str | None = None
    entrypoint: list[str] | None = None
    user: str | None = None


@dataclass
class Manifest:
    id: str
    layers: list[str]  # bottom to top
    config: ImageConfig
    created_at: float
    description: str = ""

    @staticmethod
    def image_id(layers: list[str], config: ImageConfig) -> str:
        digest = hashlib.sha256(json.dumps([layers, asdict(config)], sort_keys=True).encode())
        return f"im-{digest.hexdigest()[:22]}"


def digest(data: object) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


class ImageStore:
    def __init__(self, root: Path):
        self.root = root
        for sub in ("layers", "oci", "flat", "manifests", "blobs/sha256", ".work", ".locks"):
            (root / sub).mkdir(parents=True, exist_ok=True)

    # --- scratch and the sweep
    def owner(self) -> str:
        """This process's name in this store's `.work` (`<pid>-<token>`). Its flock
        `.locks/work-<owner>` is taken before the first scratch directory of that name exists
        and held for the life of the process, by the module, whichever ImageStore object made
        the scratch (the descriptor is close-on-exec: commands it runs do not keep it)."""
        key = str(self.root.resolve())
        with _owners_mu:
            held = _owners.get(key)
            if held is None or held[0] != os.getpid():  # (a forked child: its own)
                name = f"{os.getpid()}-{secrets.token_hex(4)}"
                f = open(self.root / ".locks" / f"work-{name}", "a")
                fcntl.flock(f, fcntl.LOCK_EX)
                _owners[key] = held = (os.getpid(), name, f)
            return held[1]

    def _my_owner(self) -> str | None:
        held = _owners.get(str(self.root.resolve()))
        return held[1] if held and held[0] == os.getpid() else None

    def scratch(self, purpose: str = "build") -> Path:
        """A new directory under `.work` owned by this process (removed by `discard`, or by the
        sweep after this process is gone)."""
        d = self.root / ".work" / f"{self.owner()}-{purpose}-{secrets.token_hex(6)}"
        d.mkdir()
        return d

    def discard(self, scratch: Path) -> None:
        """Remove a scratch directory, unmounting first anything mounted below it."""
        for point in _linux.mounts_under(str(scratch)):
            with contextlib.suppress(OSError):
                _linux.umount(point, _linux.MNT_DETACH)
        _rmtree(scratch)

    def clean_scratch(self) -> list[str]:
        """Remove what processes that are gone left in `.work` (builds, snapshots, commits and
        removals in flight when they died; a build's overlay still mounted there), and a
        snapshot's layer whose manifest never came. What a live process owns is left alone: its
        owner flock is held — or, for names without one (servers before the flock), its pid
        lives. Returns the names removed."""
        work = self.root / ".work"
        owners: dict[str, list[Path]] = {}
        for d in work.iterdir():
            owners.setdefault("-".join(d.name.split("-", 2)[:2]), []).append(d)
        for lock in (self.root / ".locks").glob("work-*"):
            owners.setdefault(lock.name[len("work-"):], [])
        mine = self._my_owner()
        removed = []
        for owner, dirs in owners.items():
            if owner == mine:
                continue
            with self._if_gone(owner) as gone:
                if not gone:
                    continue
                for d in dirs:
                    self._undo_pending(d)
                    self.discard(d)
                    removed.append(d.name)
        return removed

    @contextlib.contextmanager
    def _if_gone(self, owner: str):
        """Yields whether `owner` is gone, holding its flock meanwhile (so two sweeping servers
        do not both clean it); the lock file goes with what it guarded."""
        lock = self.root / ".locks" / f"work-{owner}"
        try:
            fd = os.open(lock, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:  # no owner lock: a name of an older server, judged by its pid
            pid = owner.split("-", 1)[0]
            yield not pid.isdigit() or not _alive(int(pid))
            return
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                yield False
                return
            yield True
            lock.unlink(missing_ok=True)
        finally:
            os.close(fd)

    def _undo_pending(self, scratch: Path) -> None:
        """A snapshot killed between its layer and its manifest (`commit_image`): drop the
        layer, which no image names."""
        try:
            layer_id = (scratch / PENDING).read_text()
        except (FileNotFoundError, NotADirectoryError):
            return
        if layer_id and self.has_layer(layer_id) \
                and not any(layer_id in m.layers for m in self.manifests()):
            self.remove_layer(layer_id)

    @contextlib.contextmanager
    def staged_file(self, final: Path):
        """Yields a binary file; when the block ends without an exception its contents appear at
        `final` at once (a name that exists already stays: names here are content-addressed).
        Until then the data is an unnamed O_TMPFILE in `final`'s directory: nothing is visible
        while it is written, and a killed writer leaves nothing behind."""
        dfd = os.open(final.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            try:
                fd = os.open(".", os.O_TMPFILE | os.O_WRONLY | os.O_CLOEXEC, 0o644, dir_fd=dfd)
            except OSError:  # a file system without O_TMPFILE: a named file in our scratch
                fd = None
            if fd is None:
                tmp = self.scratch("file")
                try:
                    with open(tmp / "data", "wb") as f:
                        yield f
                    with contextlib.suppress(FileExistsError):
                        os.link(tmp / "data", final)
                finally:
                    _rmtree(tmp)
                return
            with os.fdopen(fd, "wb") as f:
                yield f
                f.flush()
                with contextlib.suppress(FileExistsError):  # (linkat, following the magic link)
                    os.link(f"/proc/self/fd/{fd}", final.name, dst_dir_fd=dfd,
                            follow_symlinks=True)
        finally:
            os.close(dfd)

    # --- layers
    def layer_path(self, layer_id: str) -> Path:
        return self.root / layer_id / "rootfs"

    def has_layer(self, layer_id: str) -> bool:
        return self.layer_path(layer_id).is_dir()

    def commit_layer(self, layer_id: str, rootfs: Path, meta: dict) -> None:
        """Make `rootfs` (a directory on the store's file system) the layer `layer_id`."""
        final = self.root / layer_id
        tmp = self.scratch("commit")
        os.rename(rootfs, tmp / "rootfs")
        (tmp / "layer.json").write_text(json.dumps({**meta, "id": layer_id,
                                                    "created_at": time.time()}))
        try:
            os.rename(tmp, final)
        except OSError:  # another builder committed the same layer first: theirs stands
            _rmtree(tmp)

    def commit_image(self, scratch: Path, layer_id: str, meta: dict, manifest_of) -> "Manifest":
        """Make `scratch/rootfs` the new layer `layer_id` and save the manifest
        `manifest_of(layer_id)` (a snapshot). Two renames, so the layer is first recorded in
        `scratch` (which the caller discards only after this returns): a process killed between
        them leaves a layer the sweep removes, and a failed manifest write removes it here."""
        (scratch / PENDING).write_text(layer_id)
        self.commit_layer(layer_id, scratch / "rootfs", meta)
        try:
            m = manifest_of(layer_id)
            self.save_manifest(m)
        except BaseException:
            self.remove_layer(layer_id)
            raise
        return m

    def acquire(self, name: str):
        """Take the store-wide lock `name` (blocking; call from a thread in async code); returns
        the handle to pass to `release`."""
        f = open(self.root / ".locks" / name, "a")
        fcntl.flock(f, fcntl.LOCK_EX)
        return f

    @staticmethod
    def release(handle) -> None:
        handle.close()

    @contextlib.contextmanager
    def locked(self, name: str, blocking: bool = True):
        """An exclusive lock shared by every process using this store (flock)."""
        path = self.root / ".locks" / name
        with open(path, "a") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
            except BlockingIOError:
                yield False
                return
            yield True

    # --- manifests
    def save_manifest(self, m: Manifest) -> None:
        path = self.root / "manifests" / f"{m.id}.json"
        if path.exists():
            return
        with self.staged_file(path) as f:
            f.write(json.dumps(asdict(m), indent=1).encode())

    def manifest(self, image_id: str) -> Manifest | None:
        try:
            d = json.loads((self.root / "manifests" / f"{image_id}.json").read_text())
        except (FileNotFoundError, ValueError):
            return None
        d["config"] = ImageConfig(**d["config"])
        return Manifest(**d)

    def manifests(self) -> list[Manifest]:
        out = []
        for p in sorted((self.root / "manifests").glob("im-*.json")):
            m = self.manifest(p.stem)
            if m:
                out.append(m)
        return out

    def remove_manifest(self, image_id: str) -> bool:
        try:
            (self.root / "manifests" / f"{image_id}.json").unlink()
            return True
        except FileNotFoundError:
            return False

    # --- mounting
    def mount_layers(self, layers: list[str]) -> list[Path]:
        """Lower dirs for overlayfs, top first. A chain deeper than MAX_MOUNT_LAYERS has its
        bottom layers merged into one `flat/` layer (made once, then reused); the chain's own
        layers, and so the build cache, stay as they are."""
        if len(layers) > MAX_MOUNT_LAYERS:
            keep = MAX_MOUNT_LAYERS - 1
            bottom, top = layers[:len(layers) - keep], layers[len(layers) - keep:]
            layers = [self.flatten(bottom), *top]
        return [self.layer_path(i) for i in reversed(layers)]

    def flatten(self, layers: list[str]) -> str:
        flat_id = f"flat/{digest(layers)[:32]}"
        if self.has_layer(flat_id):
            return flat_id
        with self.locked(flat_id.replace("/", "-")):
            if self.has_layer(flat_id):
                return flat_id
            work = self.scratch("flatten")
            merged = work / "merged"
            merged.mkdir()
            lower = ":".join(str(self.layer_path(i)) for i in reversed(layers))
            if len(layers) == 1:
                lower += ":" + str(self.layer_path(layers[0]))  # overlay wants two lowers
            try:
                _linux.mount("overlay", str(merged), "overlay", 1,  # MS_RDONLY
                             f"lowerdir={lower}")
                try:
                    subprocess.run(["cp", "-a", f"{merged}/.", str(work / "rootfs")], check=True)
                finally:
                    _linux.umount(str(merged), _linux.MNT_DETACH)
                self.commit_layer(flat_id, work / "rootfs", {"flattened": layers})
            finally:
                self.discard(work)
        return flat_id

    # --- size and pruning
    def size_of(self, layer_id: str) -> int:
        total = 0
        for dirpath, _, files in os.walk(self.layer_path(layer_id)):
            for f in files:
                with contextlib.suppress(OSError):
                    total += os.lstat(os.path.join(dirpath, f)).st_size
        return total

    def all_layers(self) -> list[str]:
        out = []
        for kind in ("layers", "oci", "flat"):
            out += [f"{kind}/{d.name}" for d in (self.root / kind).iterdir() if d.is_dir()]
        return out

    def remove_layer(self, layer_id: str) -> None:
        src = self.root / layer_id
        doomed = self.root / ".work" / f"{self.owner()}-rm-{secrets.token_hex(6)}"
        with contextlib.suppress(FileNotFoundError):
            os.rename(src, doomed)
            _rmtree(doomed)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def _rmtree(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
