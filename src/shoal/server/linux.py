"""Linux system calls that Python 3.11's `os` lacks, through ctypes. No policy here, only calls."""

from __future__ import annotations

import ctypes
import errno
import os

_libc = ctypes.CDLL(None, use_errno=True)

SYS_openat2 = 437  # x86_64 and aarch64 share this number
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_XDEV = 0x01
RESOLVE_IN_ROOT = 0x10
MNT_DETACH = 2
PR_SET_CHILD_SUBREAPER = 36


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


def _check(ret: int, what: str, path: str | None = None) -> int:
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}", path)
    return ret


def openat2(dirfd: int, path: str, flags: int, mode: int = 0, resolve: int = 0) -> int:
    """openat2(2): with RESOLVE_IN_ROOT, `..` and absolute symlinks stop at `dirfd`."""
    how = _OpenHow(flags | os.O_CLOEXEC, mode, resolve)
    # The kernel answers EAGAIN when a rename raced the lookup. A sandbox renaming in a loop could
    # make that endless, so the retries are bounded; the caller gets EAGAIN ("try again").
    for _ in range(OPENAT2_RETRIES):
        ret = _libc.syscall(SYS_openat2, dirfd, path.encode(), ctypes.byref(how),
                            ctypes.sizeof(how))
        if ret >= 0 or ctypes.get_errno() != errno.EAGAIN:
            break
    return _check(ret, "openat2", path)


OPENAT2_RETRIES = 64


def write_all(fd: int, data: bytes) -> int:
    """os.write until all of `data` is written (a regular file may take it in pieces)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
    return len(data)


def mount(source: str, target: str, fstype: str, flags: int = 0, data: str = "") -> None:
    _check(_libc.mount(source.encode(), target.encode(), fstype.encode(), flags,
                       data.encode() if data else None), "mount", target)


def umount(target: str, flags: int = 0) -> None:
    _check(_libc.umount2(target.encode(), flags), "umount", target)


def set_child_subreaper() -> None:
    _check(_libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0), "prctl")


def mounts_under(prefix: str) -> list[str]:
    """Mount points at or below `prefix`, deepest first (the order to unmount them in)."""
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            point = line.split()[4].encode().decode("unicode_escape")
            if point == prefix or point.startswith(prefix.rstrip("/") + "/"):
                found.append(point)
    return sorted(found, key=len, reverse=True)


RENAME_NOREPLACE = 1


def renameat2(src_dirfd: int, src: str, dst_dirfd: int, dst: str, flags: int = 0) -> None:
    """renameat2(2); with RENAME_NOREPLACE the rename fails with EEXIST instead of replacing."""
    _check(_libc.renameat2(src_dirfd, src.encode(), dst_dirfd, dst.encode(), flags),
           "rename", dst)


IN_ACCESS, IN_MODIFY, IN_ATTRIB, IN_CLOSE_WRITE = 0x1, 0x2, 0x4, 0x8
IN_MOVED_FROM, IN_MOVED_TO, IN_CREATE, IN_DELETE = 0x40, 0x80, 0x100, 0x200
IN_DELETE_SELF, IN_MOVE_SELF, IN_IGNORED, IN_ISDIR, IN_Q_OVERFLOW = 0x400, 0x800, 0x8000, \
    0x40000000, 0x4000
IN_NONBLOCK, IN_CLOEXEC = os.O_NONBLOCK, os.O_CLOEXEC


def inotify_init() -> int:
    return _check(_libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC), "inotify_init1")


def inotify_add_watch(fd: int, path: str, mask: int) -> int:
    return _check(_libc.inotify_add_watch(fd, path.encode(), mask), "inotify_add_watch", path)


def parse_inotify(buf: bytes):
    """Yield (wd, mask, name) for each event in a read() of an inotify descriptor."""
    import struct

    offset = 0
    while offset + 16 <= len(buf):
        wd, mask, _cookie, length = struct.unpack_from("iIII", buf, offset)
        name = buf[offset + 16:offset + 16 + length].split(b"\0", 1)[0].decode(errors="replace")
        yield wd, mask, name
        offset += 16 + length


class _Statfs(ctypes.Structure):
    _fields_ = [("f_type", ctypes.c_long), ("rest", ctypes.c_byte * 112)]


def fs_type(fd: int) -> int:
    """fstatfs(2)'s f_type: which kind of file system `fd` is on."""
    buf = _Statfs()
    _check(_libc.fstatfs(fd, ctypes.byref(buf)), "fstatfs")
    return buf.f_type & 0xFFFFFFFF


# Kernel interfaces the server, as host root, must not read or write on a sandbox's behalf.
KERNEL_FS = {
    0x9FA0: "proc", 0x62656572: "sysfs", 0x27E0EB: "cgroup", 0x63677270: "cgroup2",
    0x1CD1: "devpts", 0x19800202: "mqueue", 0x73636673: "securityfs", 0x64626720: "debugfs",
    0x74726163: "tracefs", 0xCAFE4A11: "bpf", 0x62656570: "configfs", 0x6165676C: "pstore",
    0xDE5E81E4: "efivarfs", 0x42494E4D: "binfmt_misc",
}
