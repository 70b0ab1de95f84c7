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


# --- user namespaces and idmapped mounts (host/idmap.py)
SYS_open_tree, SYS_move_mount, SYS_mount_setattr = 428, 429, 442
SYS_setfsuid, SYS_setfsgid, SYS_capget, SYS_capset = 122, 123, 125, 126
OPEN_TREE_CLONE = 1
AT_EMPTY_PATH, AT_RECURSIVE = 0x1000, 0x8000
MOVE_MOUNT_F_EMPTY_PATH = 0x4
MOUNT_ATTR_RDONLY, MOUNT_ATTR_NOSUID, MOUNT_ATTR_NODEV = 0x1, 0x2, 0x4
MOUNT_ATTR_IDMAP = 0x00100000
_AT_FDCWD = -100


class _MountAttr(ctypes.Structure):
    _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64),
                ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64)]


def open_tree(path: str, flags: int) -> int:
    """open_tree(2) of `path`; with OPEN_TREE_CLONE, a detached copy of the mount there."""
    return _check(_libc.syscall(SYS_open_tree, _AT_FDCWD, path.encode(), flags | os.O_CLOEXEC),
                  "open_tree", path)


def mount_setattr(fd: int, attr_set: int, userns_fd: int = 0, flags: int = 0) -> None:
    """mount_setattr(2) on the mount `fd` (from open_tree) itself."""
    attr = _MountAttr(attr_set, 0, 0, userns_fd)
    _check(_libc.syscall(SYS_mount_setattr, fd, b"", AT_EMPTY_PATH | flags, ctypes.byref(attr),
                         ctypes.sizeof(attr)), "mount_setattr")


def move_mount(fd: int, target: str) -> None:
    """Attach the detached mount `fd` at `target`."""
    _check(_libc.syscall(SYS_move_mount, fd, b"", _AT_FDCWD, target.encode(),
                         MOVE_MOUNT_F_EMPTY_PATH), "move_mount", target)


def unshare(flags: int) -> None:
    _check(_libc.unshare(flags), "unshare")


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32)]


_CAP_V3 = 0x20080522


def thread_caps() -> bytes:
    """The calling thread's capability sets (capget), to give back to `restore_caps`."""
    data = (_CapData * 2)()
    _check(_libc.syscall(SYS_capget, ctypes.byref(_CapHeader(_CAP_V3, 0)), data), "capget")
    return bytes(data)


def restore_caps(saved: bytes, effective_from_permitted: bool = False) -> None:
    """capset of the calling thread: `saved` (from thread_caps), or with the effective set raised
    to the permitted one."""
    data = (_CapData * 2).from_buffer_copy(saved)
    if effective_from_permitted:
        for d in data:
            d.effective = d.permitted
    _check(_libc.syscall(SYS_capset, ctypes.byref(_CapHeader(_CAP_V3, 0)), data), "capset")


def setfsids(uid: int, gid: int) -> tuple[int, int]:
    """setfsgid + setfsuid of the calling thread; the previous (uid, gid)."""
    old_gid = _libc.syscall(SYS_setfsgid, gid)
    old_uid = _libc.syscall(SYS_setfsuid, uid)
    return old_uid, old_gid


CLONE_NEWNET, CLONE_NEWNS = 0x40000000, 0x00020000
MS_BIND, MS_REC, MS_PRIVATE = 0x1000, 0x4000, 0x40000


def setns(fd: int, nstype: int) -> None:
    """setns(2) of the calling thread (a network namespace may be entered by one thread)."""
    _check(_libc.setns(fd, nstype), "setns")
