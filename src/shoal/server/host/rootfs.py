"""The root filesystem of a sandbox: an overlay of read-only image layers and a private upper dir.

Mounted on the host before the runtime starts the container, unmounted after it is deleted. Nothing
ever writes into `upper` while the overlay is mounted (RUNTIME-NOTES.md, trap 2): writes from the
host side go through the merged mount point.

With a disk limit (`mount(..., disk=...)`), upper and work live on the sandbox's own ext4 image
(`host/disk.py`): its root and /tmp share that limit, and writing past it is ENOSPC inside.

With a user namespace (`mount(..., userns=True)`, host/idmap.py), the lower layers are idmapped bind
mounts under `idmap/` (read-only), the upper dir belongs to the sandbox's root (host uid `base`),
and `userns` records the range, so a restarted server knows it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from shoal.server import linux as _linux
from shoal.server.host import disk as _disk
from shoal.server.host import idmap as _idmap

IDMAP = "idmap"  # sandboxes/<id>/idmap/: idmapped layer (l<n>) and volume (m<n>) mounts
USERNS = "userns"  # sandboxes/<id>/userns: "<base> <size>", the sandbox's host uid range


class Rootfs:
    def __init__(self, sandbox_dir: Path):
        self.dir = sandbox_dir
        self.image = sandbox_dir / _disk.IMAGE
        self.disk = sandbox_dir / _disk.MOUNT
        base = self.disk if self.image.exists() else sandbox_dir
        self.upper = base / "upper"
        self.work = base / "work"
        self.merged = sandbox_dir / "rootfs"
        self.idmap = sandbox_dir / IDMAP
        self.userns: _idmap.Userns | None = None  # while mounting with a user namespace

    def mount(self, lowerdirs: list[Path], disk: tuple[_disk.DiskPool, int] | None = None,
              seed: Path | None = None, userns: bool = False) -> Path:
        """Mount the overlay; `lowerdirs` are ordered top layer first, as overlayfs wants them.
        `disk`: (pool, MiB) to put upper and work on an image of that size. `seed`: an upper
        dir saved earlier (a memory snapshot's), copied in before the overlay is mounted.
        `userns` (needs `disk`: the range comes from its loop device): make the sandbox's user
        namespace (`self.userns`, for the caller to close once runc has joined it) and idmap the
        layers into it. Blocking."""
        dev = None
        if disk is not None:
            pool, mib = disk
            pool.take(mib, self.image)
            dev = _disk.mount_image(self.image, self.disk)
            self.upper, self.work = self.disk / "upper", self.disk / "work"
        for d in (self.upper, self.work, self.merged):
            d.mkdir(parents=True, exist_ok=True)
        if seed is not None:
            copy_tree(seed, self.upper)
        if userns:
            if dev is None:
                raise OSError("a user namespace needs the sandbox's own disk (its uid range)")
            base = _idmap.range_of(dev)
            (self.dir / USERNS).write_text(f"{base} {_idmap.RANGE_SIZE}")
            self.userns = _idmap.Userns(base)
            mapped = []
            for i, layer in enumerate(lowerdirs):
                _idmap.idmapped_bind(str(layer), self.idmap / f"l{i}", self.userns.fd,
                                     read_only=True)
                mapped.append(self.idmap / f"l{i}")
            lowerdirs = mapped
            os.chown(self.upper, base, base)  # the root directory, as root inside sees it
        lower = ":".join(str(p) for p in lowerdirs)
        _linux.mount("overlay", str(self.merged), "overlay", 0,
                     f"lowerdir={lower},upperdir={self.upper},workdir={self.work}")
        return self.merged

    def uid_base(self) -> int | None:
        """The first host uid of the sandbox's range; None without a user namespace."""
        try:
            return int((self.dir / USERNS).read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def is_mounted(self) -> bool:
        return str(self.merged) in _linux.mounts_under(str(self.merged))

    def unmount(self) -> None:
        # The overlay (and what runc mounted below it) first, then the idmapped layers and volumes
        # and the disk image under it; the image's loop device is released with its last unmount
        # (autoclear).
        for top in (self.merged, self.idmap, self.disk):
            for point in _linux.mounts_under(str(top)):
                try:
                    _linux.umount(point, _linux.MNT_DETACH)
                except OSError:
                    pass

    def destroy(self) -> None:
        """Unmount and remove the sandbox's filesystem (the sandbox directory itself, which holds
        its logs, is the caller's)."""
        self.unmount()
        for d in (self.merged, self.upper, self.work, self.disk, self.idmap):
            if _linux.mounts_under(str(d)):
                continue  # still mounted: never remove files through a mount (volumes, layers)
            shutil.rmtree(d, ignore_errors=True)
        self.image.unlink(missing_ok=True)
        (self.dir / USERNS).unlink(missing_ok=True)


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
