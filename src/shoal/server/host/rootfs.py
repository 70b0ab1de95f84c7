"""The root filesystem of a sandbox: an overlay of read-only image layers and a private upper dir.

Mounted on the host before the runtime starts the container, unmounted after it is deleted. Nothing
ever writes into `upper` while the overlay is mounted (RUNTIME-NOTES.md, trap 2): writes from the
host side go through the merged mount point.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from shoal.server import linux as _linux


class Rootfs:
    def __init__(self, sandbox_dir: Path):
        self.dir = sandbox_dir
        self.upper = sandbox_dir / "upper"
        self.work = sandbox_dir / "work"
        self.merged = sandbox_dir / "rootfs"

    def mount(self, lowerdirs: list[Path]) -> Path:
        """Mount the overlay; `lowerdirs` are ordered top layer first, as overlayfs wants them."""
        for d in (self.upper, self.work, self.merged):
            d.mkdir(parents=True, exist_ok=True)
        lower = ":".join(str(p) for p in lowerdirs)
        _linux.mount("overlay", str(self.merged), "overlay", 0,
                     f"lowerdir={lower},upperdir={self.upper},workdir={self.work}")
        return self.merged

    def is_mounted(self) -> bool:
        return str(self.merged) in _linux.mounts_under(str(self.merged))

    def unmount(self) -> None:
        for point in _linux.mounts_under(str(self.merged)):
            try:
                _linux.umount(point, _linux.MNT_DETACH)
            except OSError:
                pass

    def destroy(self) -> None:
        """Unmount and remove the sandbox's filesystem (the sandbox directory itself, which holds
        its logs, is the caller's)."""
        self.unmount()
        for d in (self.merged, self.upper, self.work):
            shutil.rmtree(d, ignore_errors=True)

