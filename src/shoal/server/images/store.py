"""The image store: content-addressed layers and the manifests that stack them.

    <store>/base/<key>/rootfs          the debootstrapped default image (images/base.py)
    <store>/layers/<key>/rootfs        a built step's layer; <key> hashes parent + step
    <store>/oci/<digest>/rootfs        a registry layer, by its blob digest
    <store>/flat/<key>/rootfs          several layers merged, when a chain is too deep to mount
    <store>/manifests/<image id>.json  an image: layer ids bottom to top, plus its config
    <store>/blobs/sha256/<hex>         downloaded or uploaded archives
    <store>/.work/                     scratch of builds in progress

A layer appears under its final name by one rename, only when complete: a build that fails or is
killed leaves nothing a later build would reuse (`.work` is emptied when the store opens).
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
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from shoal.server import linux as _linux

MAX_MOUNT_LAYERS = 24  # lowerdir= must fit in one page of mount options; deeper chains flatten


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

    def clean_scratch(self) -> None:
        """Drop what builds of dead processes left (scratch dirs are named by their pid)."""
        for d in (self.root / ".work").iterdir():
            pid = d.name.split("-", 1)[0]
            if not pid.isdigit() or not _alive(int(pid)):
                _rmtree(d)

    # --- layers
    def layer_path(self, layer_id: str) -> Path:
        return self.root / layer_id / "rootfs"

    def has_layer(self, layer_id: str) -> bool:
        return self.layer_path(layer_id).is_dir()

    def scratch(self) -> Path:
        d = self.root / ".work" / f"{os.getpid()}-{secrets.token_hex(8)}"
        d.mkdir()
        return d

    def commit_layer(self, layer_id: str, rootfs: Path, meta: dict) -> None:
        """Make `rootfs` (a directory on the store's file system) the layer `layer_id`."""
        final = self.root / layer_id
        tmp = self.root / ".work" / f"{os.getpid()}-commit-{secrets.token_hex(6)}"
        tmp.mkdir()
        os.rename(rootfs, tmp / "rootfs")
        (tmp / "layer.json").write_text(json.dumps({**meta, "id": layer_id,
                                                    "created_at": time.time()}))
        try:
            os.rename(tmp, final)
        except OSError:  # another builder committed the same layer first: theirs stands
            _rmtree(tmp)

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
        tmp = path.with_suffix(f".tmp{secrets.token_hex(4)}")
        tmp.write_text(json.dumps(asdict(m), indent=1))
        os.rename(tmp, path)

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
            work = self.scratch()
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
                _rmtree(work)
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
        doomed = self.root / ".work" / f"{os.getpid()}-rm-{secrets.token_hex(6)}"
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
    shutil.rmtree(path, ignore_errors=True)
