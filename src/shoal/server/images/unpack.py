"""Unpacking an image layer (an OCI tar, or a client's upload) into an overlayfs layer directory.

The tar is untrusted. Every member is written relative to the layer directory with
openat2(RESOLVE_IN_ROOT): a name with `..` or a leading `/` is refused, a symlink is created as a
link and never followed out of the layer, a hard link must point inside the layer. Device nodes
are not created (an image has no business shipping them; the sandbox gets its own /dev), and
setuid/setgid bits are dropped. OCI whiteouts become what overlayfs expects of a lower layer:
`.wh.NAME` a 0/0 character device, `.wh..wh..opq` the `trusted.overlay.opaque` xattr.
"""

from __future__ import annotations

import contextlib
import os
import posixpath
import stat
import tarfile
from typing import BinaryIO

from shoal.server import linux as _linux

WHITEOUT = ".wh."
OPAQUE = ".wh..wh..opq"
RESOLVE = _linux.RESOLVE_IN_ROOT | _linux.RESOLVE_NO_MAGICLINKS | _linux.RESOLVE_NO_XDEV


class UnsafeLayerError(Exception):
    """The layer tries to write outside its directory, or is not a tar we can read."""


def _clean(name: str) -> str:
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if name.startswith("/") and parts:
        raise UnsafeLayerError(f"layer member {name!r} has an absolute path")
    if ".." in parts:
        raise UnsafeLayerError(f"layer member {name!r} leads outside the layer ('..')")
    return "/".join(parts)


def _dirfd(root: int, rel: str) -> int:
    """Descriptor of directory `rel` inside the layer, creating missing components."""
    if not rel:
        return os.dup(root)
    try:
        return _linux.openat2(root, rel, os.O_RDONLY | os.O_DIRECTORY, 0, RESOLVE)
    except FileNotFoundError:
        pass
    parts = rel.split("/")
    for i in range(len(parts)):
        prefix = "/".join(parts[:i + 1])
        try:
            fd = _linux.openat2(root, prefix, os.O_RDONLY | os.O_DIRECTORY, 0, RESOLVE)
            os.close(fd)
        except FileNotFoundError:
            parent = _linux.openat2(root, "/".join(parts[:i]) or ".",
                                    os.O_RDONLY | os.O_DIRECTORY, 0, RESOLVE)
            try:
                os.mkdir(parts[i], 0o755, dir_fd=parent)
            except FileExistsError:
                # There is an entry, but it does not lead to a directory: a dangling symlink
                # (Docker, unpacking in a chroot, fails here too) or a file.
                raise UnsafeLayerError(f"layer path {prefix!r} is not a directory (a file or a "
                                       "symlink to nowhere), yet the layer writes below it") \
                    from None
            finally:
                os.close(parent)
    return _linux.openat2(root, rel, os.O_RDONLY | os.O_DIRECTORY, 0, RESOLVE)


def _remove(dirfd: int, name: str) -> None:
    try:
        st = os.stat(name, dir_fd=dirfd, follow_symlinks=False)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        import shutil

        shutil.rmtree(name, dir_fd=dirfd)
    else:
        os.unlink(name, dir_fd=dirfd)


def _mode(member: tarfile.TarInfo) -> int:
    return member.mode & 0o1777  # no setuid, no setgid


def _member(tar: tarfile.TarFile, m: tarfile.TarInfo, root: int, prefix: str,
            counts: dict[str, int], dir_times: list[tuple[str, float]]) -> None:
    rel = _clean(posixpath.join(prefix, m.name))
    parent, _, name = rel.rpartition("/")
    if not name:
        return  # the layer's root itself
    pfd = _dirfd(root, parent)
    try:
        if name == OPAQUE:
            os.setxattr(f"/proc/self/fd/{pfd}", "trusted.overlay.opaque", b"y")
            counts["whiteouts"] += 1
            return
        if name.startswith(WHITEOUT):
            target = name[len(WHITEOUT):]
            _remove(pfd, target)
            os.mknod(target, stat.S_IFCHR | 0o000, os.makedev(0, 0), dir_fd=pfd)
            counts["whiteouts"] += 1
            return
        if m.isdir():
            try:
                os.mkdir(name, _mode(m), dir_fd=pfd)
            except FileExistsError:
                st = os.stat(name, dir_fd=pfd, follow_symlinks=False)
                if not stat.S_ISDIR(st.st_mode):
                    _remove(pfd, name)
                    os.mkdir(name, _mode(m), dir_fd=pfd)
            os.chmod(name, _mode(m), dir_fd=pfd, follow_symlinks=False)
            os.chown(name, m.uid, m.gid, dir_fd=pfd, follow_symlinks=False)
            dir_times.append((rel, m.mtime))
            counts["dirs"] += 1
            return
        _remove(pfd, name)
        if m.isreg():
            fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC |
                         os.O_NOFOLLOW, 0o600, dir_fd=pfd)
            try:
                src = tar.extractfile(m)
                while chunk := src.read(1 << 20):
                    os.write(fd, chunk)
                os.fchown(fd, m.uid, m.gid)
                os.fchmod(fd, _mode(m))
                os.utime(fd, (m.mtime, m.mtime))
            finally:
                os.close(fd)
            counts["files"] += 1
        elif m.issym():
            os.symlink(m.linkname, name, dir_fd=pfd)
            os.chown(name, m.uid, m.gid, dir_fd=pfd, follow_symlinks=False)
            counts["links"] += 1
        elif m.islnk():
            target = _clean(m.linkname)
            tparent, _, tname = target.rpartition("/")
            tfd = _linux.openat2(root, tparent or ".", os.O_RDONLY | os.O_DIRECTORY,
                                 0, RESOLVE)
            try:
                os.link(tname, name, src_dir_fd=tfd, dst_dir_fd=pfd,
                        follow_symlinks=False)
            finally:
                os.close(tfd)
            counts["links"] += 1
        elif m.isfifo():
            os.mkfifo(name, _mode(m), dir_fd=pfd)
        else:
            counts["skipped_devices"] += 1
    finally:
        os.close(pfd)


def unpack(fileobj: BinaryIO, dest: str, prefix: str = "") -> dict[str, int]:
    """Unpack a (possibly gzipped) tar stream into `dest` (an existing, empty directory), under
    `prefix` inside it. Returns counts of what was done, for logs."""
    counts = {"files": 0, "dirs": 0, "links": 0, "whiteouts": 0, "skipped_devices": 0}
    root = os.open(dest, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    dir_times: list[tuple[str, float]] = []
    try:
        try:
            tar = tarfile.open(fileobj=fileobj, mode="r|*")
        except tarfile.TarError as e:
            raise UnsafeLayerError(f"not a tar archive: {e}") from None
        with tar:
            for m in tar:
                try:
                    _member(tar, m, root, prefix, counts, dir_times)
                except OSError as e:
                    raise UnsafeLayerError(f"layer member {m.name!r}: "
                                           f"{e.strerror or e}") from None
        for rel, mtime in reversed(dir_times):
            with contextlib.suppress(OSError):
                fd = _linux.openat2(root, rel, os.O_RDONLY | os.O_DIRECTORY, 0, RESOLVE)
                try:
                    os.utime(fd, (mtime, mtime))
                finally:
                    os.close(fd)
    except (tarfile.TarError, EOFError) as e:
        raise UnsafeLayerError(f"corrupt layer archive: {e}") from None
    finally:
        os.close(root)
    return counts
