"""The root filesystem of a sandbox: an overlay of read-only image layers and a private upper dir.

Mounted on the host before the runtime starts the container, unmounted after it is deleted. Nothing
ever writes into `upper` while the overlay is mounted (RUNTIME-NOTES.md, trap 2): writes from the
host side go through the merged mount point.

With a disk limit (`mount(..., disk=...)`), upper and work live on the sandbox's own ext4 image
(`host/disk.py`): its root and /tmp share that limit, and writing past it is ENOSPC inside.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from shoal.server import linux as _linux
from shoal.server.host import disk as _disk


class Rootfs:
    def __init__(self, sandbox_dir: Path):
        self.dir = sandbox_dir
        self.image = sandbox_dir / _disk.IMAGE
        self.disk = sandbox_dir / _disk.MOUNT
        base = self.disk if self.image.exists() else sandbox_dir
        self.upper = base / "upper"
        self.work = base / "work"
        self.merged = sandbox_dir / "rootfs"

    def mount(self, lowerdirs: list[Path], disk: tuple[_disk.DiskPool, int] | None = None,
              seed: Path | None = None) -> Path:
        """Mount the overlay; `lowerdirs` are ordered top layer first, as overlayfs wants them.
        `disk`: (pool, MiB) to put upper and work on an image of that size. `seed`: an upper
        dir saved earlier (a memory snapshot's), copied in before the overlay is mounted."""
        if disk is not None:
            pool, mib = disk
            pool.take(mib, self.image)
            _disk.mount_image(self.image, self.disk)
            self.upper, self.work = self.disk / "upper", self.disk / "work"
        for d in (self.upper, self.work, self.merged):
            d.mkdir(parents=True, exist_ok=True)
        if seed is not None:
            copy_tree(seed, self.upper)
        lower = ":".join(str(p) for p in lowerdirs)
        _linux.mount("overlay", str(self.merged), "overlay", 0,
                     f"lowerdir={lower},upperdir={self.upper},workdir={self.work}")
        return self.merged

    def is_mounted(self) -> bool:
        return str(self.merged) in _linux.mounts_under(str(self.merged))

    def unmount(self) -> None:
        # The overlay (and what runc mounted below it) first, then the disk image under it; the
        # image's loop device is released with its last unmount (autoclear).
        for top in (self.merged, self.disk):
            for point in _linux.mounts_under(str(top)):
                try:
                    _linux.umount(point, _linux.MNT_DETACH)
                except OSError:
                    pass

    def destroy(self) -> None:
        """Unmount and remove the sandbox's filesystem (the sandbox directory itself, which holds
        its logs, is the caller's)."""
        self.unmount()
        for d in (self.merged, self.upper, self.work, self.disk):
            shutil.rmtree(d, ignore_errors=True)
        self.image.unlink(missing_ok=True)


COPY_TIMEOUT = 600.0


def copy_tree(src: Path, dest: Path) -> None:
    """`cp -a src/. dest` (owners, modes, xattrs, overlay whiteouts and opaque dirs kept), bounded
    by COPY_TIMEOUT. OSError when it fails. Blocking: call it from a worker thread."""
    try:
        r = subprocess.run(["cp", "-a", "--reflink=auto", f"{src}/.", str(dest)],
                           stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE, timeout=COPY_TIMEOUT)
    except subprocess.TimeoutExpired:
        raise OSError(f"copying {src} took over {COPY_TIMEOUT:.0f} s") from None
    if r.returncode != 0:
        raise OSError(f"copying {src} failed: {r.stderr.decode(errors='replace').strip()}")
