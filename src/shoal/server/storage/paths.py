"""Resolving a client's path inside a storage root, so that nothing a sandbox puts there — symlinks to
`/etc/shadow`, `../../..`, a directory swapped for a link mid-request — can lead outside it.

Two rules. Input is validated (`InvalidError` for NUL, `..`, over-long names) before it touches the
disk. Then every lookup goes through openat2(RESOLVE_IN_ROOT) relative to a descriptor of the root:
the kernel resolves `..` and absolute symlinks as if the root were `/`, so a link the sandbox made to
`/etc/shadow` means `<volume>/etc/shadow`, exactly what the sandbox itself sees.
"""

from __future__ import annotations

import os

from shoal.server import linux as _linux
from shoal.exception import InvalidError

RESOLVE = _linux.RESOLVE_IN_ROOT | _linux.RESOLVE_NO_MAGICLINKS | _linux.RESOLVE_NO_XDEV
MAX_PATH = 4096


def normalize(path: str, *, what: str = "path") -> str:
    """Turn a client path into a clean relative path ("" is the root). `/a/b`, `a/b` and `a//b/` are
    the same path; `..` anywhere is refused rather than interpreted."""
    if not isinstance(path, str):
        raise InvalidError(f"{what} must be a str, not {type(path).__name__}")
    if "\x00" in path:
        raise InvalidError(f"{what} {path!r} contains a NUL byte")
    if len(path.encode()) > MAX_PATH:
        raise InvalidError(f"{what} is longer than {MAX_PATH} bytes")
    parts = [p for p in path.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise InvalidError(f"{what} {path!r} contains '..'; give a path inside the volume")
    for p in parts:
        if len(p.encode()) > 255:
            raise InvalidError(f"{what} {path!r} has a component longer than 255 bytes")
    return "/".join(parts)


def open_in_root(root_fd: int, rel: str, flags: int, mode: int = 0o644) -> int:
    """Open `rel` (already normalized) under the root, resolving every link inside the root."""
    if not (flags & os.O_CREAT or flags & os.O_TMPFILE == os.O_TMPFILE):
        mode = 0  # openat2 refuses a mode it would not use
    return _linux.openat2(root_fd, rel or ".", flags, mode, RESOLVE)


def split(rel: str) -> tuple[str, str]:
    parent, _, name = rel.rpartition("/")
    return parent, name


def open_checked(root_fd: int, rel: str, flags: int, allow_dir: bool = False,
                 resolve: int = RESOLVE) -> int:
    """Open `rel` under the root for reading or writing, but only if it is a regular file (or, with
    `allow_dir`, a directory). The type is checked on an O_PATH descriptor before anything is
    opened for real: a device node or FIFO that a sandbox made (it may `mknod`, and the server is
    not in its device cgroup) is never opened by the server. The reopen goes through the O_PATH
    descriptor, so the inode checked is the inode opened."""
    import stat

    pfd = _linux.openat2(root_fd, rel or ".", os.O_PATH, 0, resolve)
    try:
        mode = os.fstat(pfd).st_mode
        kernel_fs = _linux.KERNEL_FS.get(_linux.fs_type(pfd))
        if kernel_fs and not (allow_dir and stat.S_ISDIR(mode)):
            raise PermissionError(f"{rel!r} is on {kernel_fs}, a kernel interface; it is not "
                                  "opened through the file API (use exec inside the sandbox)")
        if stat.S_ISDIR(mode):
            if not allow_dir:
                raise IsADirectoryError(f"{rel or '/'!r} is a directory")
            return os.open(f"/proc/self/fd/{pfd}", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        if not stat.S_ISREG(mode):
            raise PermissionError(f"{rel!r} is not a regular file (a device, FIFO or socket); "
                                  "only regular files are read or written")
        return os.open(f"/proc/self/fd/{pfd}", flags | os.O_CLOEXEC)
    finally:
        os.close(pfd)


def remove_entry(dirfd: int, name: str, recursive: bool) -> None:
    """Remove `name` in `dirfd`: a file or link (never what a link points to), an empty directory,
    or with `recursive` a whole tree (rmtree with dir_fd walks by descriptors and does not follow
    links). A non-empty directory without `recursive` is OSError(ENOTEMPTY)."""
    import shutil

    try:
        os.unlink(name, dir_fd=dirfd)
        return
    except IsADirectoryError:
        pass
    if recursive:
        shutil.rmtree(name, dir_fd=dirfd)
    else:
        os.rmdir(name, dir_fd=dirfd)
