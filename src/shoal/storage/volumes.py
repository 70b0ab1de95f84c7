"""Volume data on the local disk: one directory per volume, bind-mounted into the sandboxes that use
it, and read and written by the server on the clients' behalf.

`VolumeStorage` is the seam (S3-backed storage can stand beside this later). Every path a client
gives goes through `storage.paths`: validated, then resolved with openat2(RESOLVE_IN_ROOT) from a
descriptor of the volume root, never with a plain open() of a joined host path.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import shutil
import stat as stat_mod
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol

from shoal.exception import InvalidError
from shoal.storage.paths import normalize, open_in_root, split

CHUNK = 1 << 20

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


class VolumeStorage(Protocol):
    def create(self, volume_id: str) -> None: ...
    def destroy(self, volume_id: str) -> None: ...
    def host_path(self, volume_id: str) -> Path: ...
    def _open(self, volume_id: str, path: str) -> int:
        rel = normalize(path)
        root = self._root_fd(volume_id)
        try:
            with _clear_errors(path):
                return open_in_root(root, rel, os.O_RDONLY)
        finally:
            os.close(root)

    def open_read(self, volume_id: str, path: str) -> int: ...
    def listdir(self, volume_id: str, path: str, recursive: bool) -> list[Entry]: ...
    def write_file(self, volume_id: str, path: str, src: BinaryIO) -> int: ...
    def open_writer(self, volume_id: str, path: str) -> "AtomicWriter": ...


class LocalVolumeStorage:
    def __init__(self, root: Path):
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)

    def host_path(self, volume_id: str) -> Path:
        return self.root / volume_id / "data"

    def create(self, volume_id: str) -> None:
        self.host_path(volume_id).mkdir(parents=True, exist_ok=True)

    def destroy(self, volume_id: str) -> None:
        # Rename first, so a half-finished removal never looks like the volume.
        src = self.root / volume_id
        if not src.exists():
            return
        doomed = self.root / f".deleted-{volume_id}-{secrets.token_hex(4)}"
        os.rename(src, doomed)
        shutil.rmtree(doomed, ignore_errors=True)

    def remove_leftovers(self) -> None:
        for doomed in self.root.glob(".deleted-*"):
            shutil.rmtree(doomed, ignore_errors=True)

    def _root_fd(self, volume_id: str) -> int:
        return os.open(self.host_path(volume_id), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)

    def _open(self, volume_id: str, path: str) -> int:
        rel = normalize(path)
        root = self._root_fd(volume_id)
        try:
            with _clear_errors(path):
                return open_in_root(root, rel, os.O_RDONLY)
        finally:
            os.close(root)

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

    def listdir(self, volume_id: str, path: str, recursive: bool = False) -> list[Entry]:
        rel = normalize(path)
        fd = self._open(volume_id, rel)
        try:
            st = os.fstat(fd)
            if not stat_mod.S_ISDIR(st.st_mode):  # Modal lists a file as itself
                return [Entry(rel, _entry_type(st.st_mode), int(st.st_mtime), st.st_size)]
            entries: list[Entry] = []
            # fwalk with follow_symlinks=False never leaves the tree: it opens each directory
            # relative to its parent's descriptor and checks it is the directory it listed.
            for dirpath, dirnames, filenames, dirfd in os.fwalk(".", dir_fd=fd,
                                                                 follow_symlinks=False):
                for name in sorted(dirnames + filenames):
                    try:
                        s = os.stat(name, dir_fd=dirfd, follow_symlinks=False)
                    except FileNotFoundError:
                        continue  # removed while we listed
                    sub = os.path.normpath(os.path.join(dirpath, name))
                    full = f"{rel}/{sub}" if rel else sub
                    entries.append(Entry(full, _entry_type(s.st_mode), int(s.st_mtime), s.st_size))
                if not recursive:
                    break
            return entries
        finally:
            os.close(fd)

    def write_file(self, volume_id: str, path: str, src: BinaryIO) -> int:
        """Write `src` to `path` atomically (see `AtomicWriter`); returns the bytes written."""
        with self.open_writer(volume_id, path) as w:
            while chunk := src.read(CHUNK):
                w.write(chunk)
            w.commit()
        return w.written

    def open_writer(self, volume_id: str, path: str) -> "AtomicWriter":
        rel = normalize(path)
        if not rel:
            raise IsADirectoryError("cannot write to the volume root; give a file path")
        parent, name = split(rel)
        root = self._root_fd(volume_id)
        try:
            with _clear_errors(path):
                dirfd = self._makedirs(root, parent)
        finally:
            os.close(root)
        return AtomicWriter(dirfd, name)

    @staticmethod
    def _makedirs(root: int, rel: str) -> int:
        """Open directory `rel` under `root`, creating missing components; returns its fd."""
        try:
            return open_in_root(root, rel, os.O_RDONLY | os.O_DIRECTORY)
        except FileNotFoundError:
            pass
        fd = os.dup(root)
        for part in filter(None, rel.split("/")):
            try:
                os.mkdir(part, 0o755, dir_fd=fd)
            except FileExistsError:
                pass
            try:
                nxt = open_in_root(fd, part, os.O_RDONLY | os.O_DIRECTORY)
            finally:
                os.close(fd)
            fd = nxt
        return fd


class AtomicWriter:
    """A file that appears under its name only when complete: readers see the old file or the whole
    new one, never a prefix, and a crash or an abort leaves nothing behind (O_TMPFILE has no name
    until `commit` links it in)."""

    def __init__(self, dirfd: int, name: str):
        self.dirfd = dirfd
        self.name = name
        self.written = 0
        try:
            self.fd = os.open(".", os.O_TMPFILE | os.O_WRONLY | os.O_CLOEXEC, 0o644, dir_fd=dirfd)
        except OSError:
            os.close(dirfd)
            raise

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            n = os.write(self.fd, view)
            view = view[n:]
            self.written += n

    def commit(self) -> None:
        os.fsync(self.fd)
        tmp = f".shoal-tmp-{secrets.token_hex(8)}"
        os.link(f"/proc/self/fd/{self.fd}", tmp, dst_dir_fd=self.dirfd, follow_symlinks=True)
        try:
            os.rename(tmp, self.name, src_dir_fd=self.dirfd, dst_dir_fd=self.dirfd)
        except OSError:
            os.unlink(tmp, dir_fd=self.dirfd)
            raise
        os.fsync(self.dirfd)

    def close(self) -> None:
        for fd in (self.fd, self.dirfd):
            try:
                os.close(fd)
            except OSError:
                pass

    def __enter__(self) -> "AtomicWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def iter_fd(fd: int, chunk: int = CHUNK) -> Iterator[bytes]:
    """Read a descriptor to its end in chunks, closing it when done or abandoned."""
    try:
        while data := os.read(fd, chunk):
            yield data
    finally:
        os.close(fd)
