"""Where a sandbox's volumes, network file systems and buckets may be mounted, checked against the
image itself before runc sees the paths.

runc 1.1.5 (Debian 12) creates a missing mount target by following whatever the image has on the
way, and lacks the CVE-2024-45310 fix (a sandbox sharing an outer volume can race runc, through a
nested mount target, into creating directories on the host). So every target is resolved inside the
mounted image rootfs with openat2(RESOLVE_IN_ROOT | RESOLVE_NO_SYMLINKS): a target that is, or passes
through, a symlink is refused, as is one that lands on a reserved path or is not a directory, and no
target may lie inside another mount's target.
"""

from __future__ import annotations

import errno
import os
import posixpath
from pathlib import Path

from shoal.server import linux as _linux

RESERVED = ("/proc", "/sys", "/dev", "/.shoal")
RESOLVE_STRICT = _linux.RESOLVE_IN_ROOT | _linux.RESOLVE_NO_MAGICLINKS | 0x04  # NO_SYMLINKS


def check_nesting(paths: list[str]) -> None:
    """ValueError when one mount target is inside another (or two are the same)."""
    norm = sorted(posixpath.normpath(p) for p in paths)
    for i, outer in enumerate(norm):
        for inner in norm[i + 1:]:
            if inner == outer:
                raise ValueError(f"two mounts share the path {outer!r}")
            if inner.startswith(outer.rstrip("/") + "/"):
                raise ValueError(f"mount path {inner!r} is inside the mount at {outer!r}: nested "
                                 "mount targets are refused; mount them side by side")


def check_targets(rootfs: Path, destinations: list[str]) -> None:
    """ValueError unless every destination is a plain path in the image at `rootfs` (see the
    module's docstring). Missing trailing components are fine: runc creates them as directories,
    and nothing it creates can be a symlink."""
    check_nesting(destinations)
    root = os.open(rootfs, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for dest in destinations:
            dest = posixpath.normpath(dest)
            if dest == "/" or any(dest == r or dest.startswith(r + "/") for r in RESERVED):
                raise ValueError(f"mount path {dest!r} is reserved; choose another")
            parts = [p for p in dest.split("/") if p]
            for i in range(1, len(parts) + 1):
                prefix = "/" + "/".join(parts[:i])
                try:
                    fd = _linux.openat2(root, prefix.lstrip("/"), os.O_PATH, 0, RESOLVE_STRICT)
                except FileNotFoundError:
                    break
                except OSError as e:
                    if e.errno in (errno.ELOOP, errno.EXDEV):
                        raise ValueError(f"mount path {dest!r} passes through {prefix!r}, a "
                                         "symlink in the image; mount at the path it points to"
                                         ) from None
                    if e.errno == errno.ENOTDIR:
                        raise ValueError(f"mount path {dest!r}: {prefix!r} in the image is not a "
                                         "directory") from None
                    raise
                try:
                    if i == len(parts) and not os.path.isdir(f"/proc/self/fd/{fd}"):
                        raise ValueError(f"mount path {dest!r} is a file in the image, not a "
                                         "directory")
                finally:
                    os.close(fd)
    finally:
        os.close(root)
