"""Volume data on the local disk: one directory per volume, bind-mounted into the sandboxes that use
it, and read and written by the server on the clients' behalf.

`VolumeStorage` is the seam (an object-store backend can stand beside this later). Layout:

    <root>/<volume id>/data/      the files, as sandboxes see them
    <root>/<volume id>/staging/   uploads in progress; never mounted, emptied at server start

Every path a client gives goes through `storage.paths`: validated, then resolved with
openat2(RESOLVE_IN_ROOT) from a descriptor of `data`, never with a plain open() of a joined host
path. Every write lands by rename: data goes to an unnamed O_TMPFILE in `staging`, is fsynced,
linked there, and renamed into place — a reader sees the old file or the whole new one, and a
crash leaves at most a file in `staging`.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
import shutil
import stat as stat_mod
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol

from shoal.server import linux as _linux
from shoal.exception import InvalidError
from shoal.server.storage.paths import normalize, open_checked, open_in_root, remove_entry, split

CHUNK = 4 << 20
GLOB_CHARS = re.compile(r"[*?\[]")

# FileEntryType values, as Modal numbers them.
FILE, DIRECTORY, SYMLINK, FIFO, SOCKET = 1, 2, 3, 4, 5


@dataclass
class Entry:
    path: str
    type: int
    mtime: int
    size: int


def _entry_type(mode: int) -> int:
    if stat_mod.S_ISDIR(mode):
        return DIRECTORY
    if stat_mod.S_ISLNK(mode):
        return SYMLINK
    if stat_mod.S_ISFIFO(mode):
        return FIFO
    if stat_mod.S_ISSOCK(mode):
        return SOCKET
    return FILE


@contextlib.contextmanager
def _clear_errors(path: str):
    """Errors of a lookup under the volume root, said in terms of the caller's path."""
    try:
        yield
    except FileNotFoundError:
        raise FileNotFoundError(f"no such file or directory: {path!r}") from None
    except NotADirectoryError:
        raise NotADirectoryError(f"a parent of {path!r} is not a directory") from None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise InvalidError(f"{path!r}: too many levels of symbolic links") from None
        if e.errno == errno.EXDEV:
            raise InvalidError(f"{path!r} leads to another file system") from None
        raise


def glob_regex(pattern: str) -> re.Pattern:
    """`*` and `?` stay within one path component, `**` spans any number of them."""
    out, i = [], 0
    while i < len(pattern):
        c = pattern[i]
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif c == "*":
            out.append("[^/]*")
            i += 1
        elif c == "?":
            out.append("[^/]")
            i += 1
        elif c == "[":
            end = pattern.find("]", i + 1)
            if end < 0:
                raise InvalidError(f"unclosed '[' in glob {pattern!r}")
            body = pattern[i + 1:end].replace("\\", "\\\\")
            out.append(f"[^{body[1:]}]" if body.startswith("!") else f"[{body}]")
            i = end + 1
        else:
            out.append(re.escape(c))
            i += 1
    return re.compile("".join(out) + r"\Z")


class VolumeStorage(Protocol):
    def create(self, volume_id: str) -> None: ...
    def destroy(self, volume_id: str) -> None: ...
    def host_path(self, volume_id: str) -> Path: ...
    def open_read(self, volume_id: str, path: str) -> int: ...
    def listdir(self, volume_id: str, path: str, recursive: bool) -> list[Entry]: ...
    def new_upload(self, volume_id: str, mode: int | None = None) -> "Upload": ...
    def land(self, volume_id: str, staged: str, path: str, force: bool) -> None: ...
    def discard(self, volume_id: str, staged: str) -> None: ...
    def land_or_discard(self, volume_id: str, staged: str, path: str) -> None: ...
    def exists(self, volume_id: str, path: str) -> bool: ...
    def remove(self, volume_id: str, path: str, recursive: bool) -> None: ...
    def copy(self, volume_id: str, src_paths: list[str], dst: str, recursive: bool) -> None: ...
    def write_file(self, volume_id: str, path: str, src: BinaryIO) -> int: ...


class Upload:
    """A file being uploaded: an unnamed O_TMPFILE in the volume's staging directory until
    `finish` gives it a (staging) name; `LocalVolumeStorage.land` then renames it into place."""

    def __init__(self, staging_fd: int, mode: int | None):
        self.staging_fd = staging_fd
        self.written = 0
        self.fd = os.open(".", os.O_TMPFILE | os.O_WRONLY | os.O_CLOEXEC, 0o644,
                          dir_fd=staging_fd)
        if mode is not None:
            os.fchmod(self.fd, mode & 0o7777 & ~(stat_mod.S_ISUID | stat_mod.S_ISGID))

    def write(self, data: bytes) -> None:
        self.written += _linux.write_all(self.fd, data)

    def copy_from(self, src_fd: int) -> None:
        size = os.fstat(src_fd).st_size
        offset = 0
        while offset < size:
            n = os.copy_file_range(src_fd, self.fd, min(size - offset, 1 << 30), offset)
            if n == 0:
                break
            offset += n
        self.written += offset

    def finish(self) -> str:
        """fsync and name the file in staging; returns that name."""
        os.fsync(self.fd)
        name = f"up-{secrets.token_hex(12)}"
        os.link(f"/proc/self/fd/{self.fd}", name, dst_dir_fd=self.staging_fd, follow_symlinks=True)
        return name

    def close(self) -> None:
        for fd in (self.fd, self.staging_fd):
            with contextlib.suppress(OSError):
                os.close(fd)

    def __enter__(self) -> "Upload":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class LocalVolumeStorage:
    def __init__(self, root: Path):
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)

    def host_path(self, volume_id: str) -> Path:
        return self.root / volume_id / "data"

    def _staging(self, volume_id: str) -> Path:
        return self.root / volume_id / "staging"

    def create(self, volume_id: str) -> None:
        self.host_path(volume_id).mkdir(parents=True, exist_ok=True)
        self._staging(volume_id).mkdir(exist_ok=True)

    def destroy(self, volume_id: str) -> None:
        # Rename first, so a half-finished removal never looks like the volume.
        src = self.root / volume_id
        if not src.exists():
            return
        doomed = self.root / f".deleted-{volume_id}-{secrets.token_hex(4)}"
        try:
            os.rename(src, doomed)
        except FileNotFoundError:
            return  # another thread's collect (upkeep's reap, a finalize) got there first
        shutil.rmtree(doomed, ignore_errors=True)

    def remove_leftovers(self) -> None:
        """At server start: finish interrupted deletions, drop interrupted uploads."""
        for doomed in self.root.glob(".deleted-*"):
            shutil.rmtree(doomed, ignore_errors=True)
        for staging in self.root.glob("*/staging"):
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir()

    # --- descriptors
    def _root_fd(self, volume_id: str) -> int:
        return os.open(self.host_path(volume_id), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)

    def _staging_fd(self, volume_id: str) -> int:
        staging = self._staging(volume_id)
        staging.mkdir(exist_ok=True)
        return os.open(staging, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)

    def _open(self, volume_id: str, path: str) -> int:
        """Read-only descriptor of a regular file or directory under the volume."""
        rel = normalize(path)
        root = self._root_fd(volume_id)
        try:
            with _clear_errors(path):
                return open_checked(root, rel, os.O_RDONLY, allow_dir=True)
        finally:
            os.close(root)

    def _parent(self, volume_id: str, path: str, create: bool) -> tuple[int, str]:
        """(descriptor of the parent directory, last component) of `path`, resolved inside the
        volume; the last component itself is not followed."""
        rel = normalize(path)
        if not rel:
            raise InvalidError("the volume root itself cannot be the target; give a path in it")
        parent, name = split(rel)
        root = self._root_fd(volume_id)
        try:
            with _clear_errors(path):
                if create:
                    return self._makedirs(root, parent), name
                return open_in_root(root, parent, os.O_RDONLY | os.O_DIRECTORY), name
        finally:
            os.close(root)

    @staticmethod
    def _makedirs(root: int, rel: str) -> int:
        """Open directory `rel` under `root`, creating missing components; returns its fd. Each
        prefix is resolved from the volume root, so links mean what they mean inside a sandbox."""
        try:
            return open_in_root(root, rel, os.O_RDONLY | os.O_DIRECTORY)
        except FileNotFoundError:
            pass
        parts = [p for p in rel.split("/") if p]
        fd = os.dup(root)
        for i, part in enumerate(parts):
            try:
                os.mkdir(part, 0o755, dir_fd=fd)
            except FileExistsError:
                pass
            os.close(fd)
            fd = open_in_root(root, "/".join(parts[:i + 1]), os.O_RDONLY | os.O_DIRECTORY)
        return fd

    # --- reading
    def open_read(self, volume_id: str, path: str) -> int:
        """A descriptor of the regular file at `path`. FileNotFoundError if absent,
        IsADirectoryError for a directory."""
        fd = self._open(volume_id, path)
        st = os.fstat(fd)
        if not stat_mod.S_ISREG(st.st_mode):
            os.close(fd)
            if stat_mod.S_ISDIR(st.st_mode):
                raise IsADirectoryError(f"{path!r} is a directory, not a file")
            raise FileNotFoundError(f"{path!r} is not a regular file")
        return fd

    def exists(self, volume_id: str, path: str) -> bool:
        try:
            dirfd, name = self._parent(volume_id, path, create=False)
        except (FileNotFoundError, NotADirectoryError):
            return False
        try:
            os.stat(name, dir_fd=dirfd, follow_symlinks=False)
            return True
        except FileNotFoundError:
            return False
        finally:
            os.close(dirfd)

    def listdir(self, volume_id: str, path: str, recursive: bool = False) -> list[Entry]:
        """Entries under `path`; a file lists as itself. With glob characters in `path` (`*`,
        `?`, `[...]`, `**`), the entries whose path matches it."""
        if GLOB_CHARS.search(path):
            return self._glob(volume_id, path)
        rel = normalize(path)
        fd = self._open(volume_id, rel)
        try:
            st = os.fstat(fd)
            if not stat_mod.S_ISDIR(st.st_mode):
                return [Entry(rel, _entry_type(st.st_mode), int(st.st_mtime), st.st_size)]
            return list(self._walk(fd, rel, recursive))
        finally:
            os.close(fd)

    @staticmethod
    def _walk(fd: int, rel: str, recursive: bool) -> Iterator[Entry]:
        # fwalk with follow_symlinks=False never leaves the tree: it opens each directory relative
        # to its parent's descriptor and checks it is the directory it listed.
        for dirpath, dirnames, filenames, dirfd in os.fwalk(".", dir_fd=fd, follow_symlinks=False):
            for name in sorted(dirnames + filenames):
                try:
                    s = os.stat(name, dir_fd=dirfd, follow_symlinks=False)
                except FileNotFoundError:
                    continue  # removed while we listed
                sub = os.path.normpath(os.path.join(dirpath, name))
                yield Entry(f"{rel}/{sub}" if rel else sub, _entry_type(s.st_mode),
                            int(s.st_mtime), s.st_size)
            if not recursive:
                return

    def _glob(self, volume_id: str, pattern: str) -> list[Entry]:
        parts = [p for p in pattern.split("/") if p not in ("", ".")]
        if ".." in parts or "\x00" in pattern:
            raise InvalidError(f"glob {pattern!r} must not contain '..' or NUL")
        static = []
        for p in parts:
            if GLOB_CHARS.search(p):
                break
            static.append(p)
        base = "/".join(static)
        rx = glob_regex("/".join(parts))
        deep = "**" in pattern or len(parts) - len(static) > 1
        try:
            fd = self._open(volume_id, base)
        except (FileNotFoundError, NotADirectoryError):
            return []
        try:
            if not stat_mod.S_ISDIR(os.fstat(fd).st_mode):
                return []
            return [e for e in self._walk(fd, base, deep) if rx.match(e.path)]
        finally:
            os.close(fd)

    # --- writing
    def new_upload(self, volume_id: str, mode: int | None = None) -> Upload:
        return Upload(self._staging_fd(volume_id), mode)

    def land(self, volume_id: str, staged: str, path: str, force: bool = True) -> None:
        """Rename a finished upload to `path` (creating parents). Without `force`, an existing
        file at `path` is FileExistsError and nothing changes."""
        dirfd, name = self._parent(volume_id, path, create=True)
        staging = self._staging_fd(volume_id)
        try:
            with _clear_errors(path):
                try:
                    _linux.renameat2(staging, staged, dirfd, name,
                                     0 if force else _linux.RENAME_NOREPLACE)
                except FileExistsError:
                    raise FileExistsError(f"{path!r} exists; pass force=True to replace it") \
                        from None
                except IsADirectoryError:
                    raise IsADirectoryError(f"{path!r} is a directory") from None
                except OSError as e:
                    if e.errno in (errno.ENOTEMPTY, errno.EEXIST):
                        raise IsADirectoryError(f"{path!r} is a directory") from None
                    raise
            os.fsync(dirfd)
        finally:
            os.close(dirfd)
            os.close(staging)

    def discard(self, volume_id: str, staged: str) -> None:
        staging = self._staging_fd(volume_id)
        try:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(staged, dir_fd=staging)
        finally:
            os.close(staging)

    def write_file(self, volume_id: str, path: str, src: BinaryIO) -> int:
        """Write `src` to `path` atomically; returns the bytes written."""
        normalize(path)
        with self.new_upload(volume_id) as up:
            while chunk := src.read(CHUNK):
                up.write(chunk)
            staged = up.finish()
        self.land_or_discard(volume_id, staged, path)
        return up.written

    def land_or_discard(self, volume_id: str, staged: str, path: str) -> None:
        """`land` with force; if that fails, the staged file is removed, not left behind."""
        try:
            self.land(volume_id, staged, path, force=True)
        except BaseException:
            self.discard(volume_id, staged)
            raise

    def remove(self, volume_id: str, path: str, recursive: bool = False) -> None:
        """Remove a file, link or empty directory; a non-empty directory only with `recursive`.
        A symlink is removed itself, never what it points to."""
        dirfd, name = self._parent(volume_id, path, create=False)
        try:
            with _clear_errors(path):
                try:
                    remove_entry(dirfd, name, recursive)
                except OSError as e:
                    if e.errno == errno.ENOTEMPTY:
                        raise InvalidError(f"{path!r} is a non-empty directory; pass "
                                           "recursive=True to remove it") from None
                    raise
        finally:
            os.close(dirfd)

    def copy(self, volume_id: str, src_paths: list[str], dst: str, recursive: bool = False) -> None:
        """Copy within the volume with `cp` semantics: into `dst` if it is a directory (required
        for several sources), else to `dst`. Directories need `recursive`."""
        if not src_paths:
            raise InvalidError("copy_files needs at least one source path")
        dst_rel = normalize(dst, what="destination")
        dst_is_dir = self._is_dir(volume_id, dst_rel)
        if len(src_paths) > 1 and not dst_is_dir:
            raise NotADirectoryError(f"copying several files needs an existing directory as the "
                                     f"destination; {dst!r} is not one")
        for src in src_paths:
            src_rel = normalize(src, what="source")
            if not src_rel:
                raise InvalidError("cannot copy the volume root")
            target = f"{dst_rel}/{split(src_rel)[1]}" if dst_is_dir else dst_rel
            if target == src_rel or target.startswith(src_rel + "/"):
                raise InvalidError(f"cannot copy {src!r} into itself")
            fd = self._open(volume_id, src_rel)
            try:
                st = os.fstat(fd)
                if stat_mod.S_ISDIR(st.st_mode):
                    if not recursive:
                        raise IsADirectoryError(f"{src!r} is a directory; pass recursive=True")
                    self._copy_tree(volume_id, fd, target)
                else:
                    self._copy_file(volume_id, fd, target, st.st_mode)
            finally:
                os.close(fd)

    def _is_dir(self, volume_id: str, rel: str) -> bool:
        try:
            fd = self._open(volume_id, rel)
        except (FileNotFoundError, NotADirectoryError):
            return False
        try:
            return stat_mod.S_ISDIR(os.fstat(fd).st_mode)
        finally:
            os.close(fd)

    def _copy_file(self, volume_id: str, src_fd: int, target: str, mode: int) -> None:
        with self.new_upload(volume_id, stat_mod.S_IMODE(mode)) as up:
            up.copy_from(src_fd)
            staged = up.finish()
        self.land_or_discard(volume_id, staged, target)

    def _copy_tree(self, volume_id: str, src_fd: int, target: str) -> None:
        root = self._root_fd(volume_id)
        try:
            os.close(self._makedirs(root, target))
        finally:
            os.close(root)
        for dirpath, dirnames, filenames, dirfd in os.fwalk(".", dir_fd=src_fd,
                                                             follow_symlinks=False):
            base = os.path.normpath(f"{target}/{dirpath}")
            for name in dirnames + filenames:
                st = os.stat(name, dir_fd=dirfd, follow_symlinks=False)
                dest = f"{base}/{name}"
                if stat_mod.S_ISDIR(st.st_mode):
                    root = self._root_fd(volume_id)
                    try:
                        os.close(self._makedirs(root, dest))
                    finally:
                        os.close(root)
                elif stat_mod.S_ISLNK(st.st_mode):
                    link = os.readlink(name, dir_fd=dirfd)
                    pfd, last = self._parent(volume_id, dest, create=True)
                    try:
                        with contextlib.suppress(FileExistsError):
                            os.symlink(link, last, dir_fd=pfd)
                    finally:
                        os.close(pfd)
                elif stat_mod.S_ISREG(st.st_mode):
                    fd = open_checked(dirfd, name, os.O_RDONLY)
                    try:
                        self._copy_file(volume_id, fd, dest, st.st_mode)
                    finally:
                        os.close(fd)


def iter_fd(fd: int, chunk: int = CHUNK) -> Iterator[bytes]:
    """Read a descriptor to its end in chunks, closing it when done or abandoned."""
    try:
        while data := os.read(fd, chunk):
            yield data
    finally:
        os.close(fd)
