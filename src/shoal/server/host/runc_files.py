"""The sandbox file API: files of a running sandbox, read and written by the server directly.

A path is the path as the sandbox sees it. The server opens the sandbox's root through the runtime
(for runc, `/proc/<init>/root`: the sandbox's root in its own mount namespace, volumes included)
and resolves every path from it with openat2(RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS): `..` and
absolute symlinks stop at the sandbox's root, and `/proc/<pid>/root`-style links are refused, so no
link the sandbox makes leads to a host file. Only regular files and directories are ever opened
(`storage.paths.open_checked`): a device node the sandbox made stays closed. Files are created as
uid 0 with mode 0644 — what root in the sandbox gets — and a replaced file keeps its owner and mode.

In a sandbox with a user namespace (host/idmap.py), root inside is host uid `base`: each operation
runs with the worker thread's file-system ids set to `base` (setfsuid/setfsgid, per thread, with
its capabilities kept), so what it creates is root's inside — `base` in the overlay's upper dir,
uid 0 on disk through an idmapped volume mount (where host uid 0 would get EOVERFLOW) — and owners
are reported as the sandbox sees them.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import io
import json
import os
import posixpath
import secrets
import stat as stat_mod
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from shoal.server import linux as _linux
from shoal.exception import (InvalidError, SandboxFilesystemDirectoryNotEmptyError,
                             SandboxFilesystemFileTooLargeError)
from shoal.server.host.base import SandboxGone
from shoal.server.host.idmap import RANGE_SIZE
from shoal.server.storage.paths import RESOLVE, open_checked, remove_entry

READ_LIMIT = 512 << 20  # read_bytes / read_text; copy_to_local streams without a limit
MAX_HANDLES = 256  # open FileIO handles per sandbox
# --- what one call may make the server hold (issue 10, "the server must not be the weak point")
HANDLE_READ_MAX = 16 << 20  # bytes one FileIO read/readline call returns
LIST_PAGE = 10_000  # entries one directory listing call returns (the SDK pages)
MAX_WATCHES_PER_CALL = 8192  # inotify watches (directories) one recursive watch may add
MAX_WATCHES_PER_SANDBOX = 16384  # ... all of a sandbox's open watches together
MAX_WATCH_STREAMS = 8  # open watch streams (inotify instances, charged to host root) per sandbox
CHUNK = 1 << 20
RESOLVE_SANDBOX = RESOLVE & ~_linux.RESOLVE_NO_XDEV  # volumes are mounts inside the sandbox

# open(2) flags and Python modes for each FileIO mode (the "b" is the client's business).
_MODES = {
    "r": (os.O_RDONLY, "rb"), "r+": (os.O_RDWR, "rb+"),
    "w": (os.O_WRONLY | os.O_CREAT | os.O_TRUNC, "wb"),
    "w+": (os.O_RDWR | os.O_CREAT | os.O_TRUNC, "wb+"),
    "a": (os.O_WRONLY | os.O_CREAT | os.O_APPEND, "ab"),
    "a+": (os.O_RDWR | os.O_CREAT | os.O_APPEND, "ab+"),
    "x": (os.O_WRONLY | os.O_CREAT | os.O_EXCL, "wb"),
    "x+": (os.O_RDWR | os.O_CREAT | os.O_EXCL, "wb+"),
}
FILE_TYPES = {stat_mod.S_IFREG: "FILE", stat_mod.S_IFDIR: "DIRECTORY", stat_mod.S_IFLNK: "SYMLINK"}


def sandbox_rel(path: str, what: str = "path") -> str:
    """Validate an absolute sandbox path and return it relative to the sandbox root."""
    if not isinstance(path, str) or not path.startswith("/"):
        raise InvalidError(f"{what} must be an absolute path inside the sandbox, got {path!r}")
    if "\x00" in path:
        raise InvalidError(f"{what} {path!r} contains a NUL byte")
    parts = [p for p in path.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise InvalidError(f"{what} {path!r} contains '..'; give a plain absolute path")
    if len(path.encode()) > 4096:
        raise InvalidError(f"{what} is longer than 4096 bytes")
    if any(len(p) > 63 and len(p.encode()) > 255 for p in parts):
        raise InvalidError(f"{what} {path!r} has a name longer than 255 bytes (the longest a "
                           "file name may be)")
    return "/".join(parts)


@contextlib.contextmanager
def said_as(path: str):
    """OS errors of an operation, said in terms of the sandbox path."""
    try:
        yield
    except FileNotFoundError:
        raise FileNotFoundError(errno.ENOENT, f"No such file or directory: {path!r}") from None
    except NotADirectoryError:
        raise NotADirectoryError(errno.ENOTDIR, f"Not a directory: {path!r}") from None
    except IsADirectoryError:
        raise IsADirectoryError(errno.EISDIR, f"Is a directory: {path!r}") from None
    except FileExistsError:
        raise FileExistsError(errno.EEXIST, f"File exists: {path!r}") from None
    except PermissionError as e:
        raise PermissionError(errno.EACCES, f"{e.strerror or 'permission denied'}: {path}"
                              if e.strerror else f"{path}: {e.args[0]}") from None
    except OSError as e:
        if e.errno == errno.ENOTEMPTY:
            raise SandboxFilesystemDirectoryNotEmptyError(
                f"directory not empty: {path} (pass recursive=True)") from None
        if e.errno == errno.ELOOP:
            raise PermissionError(errno.EACCES, f"{path!r} leads through a link shoal does not "
                                  "follow (a /proc magic link, or a symlink loop)") from None
        if e.errno == errno.EXDEV:
            raise OSError(errno.EXDEV, f"Invalid cross-device link: {path!r} (a move across "
                          "mounts; copy and remove instead)") from None
        if e.errno == errno.EINVAL:
            raise InvalidError(f"{path}: invalid operation (e.g. moving a directory into "
                               "itself)") from None
        if e.errno == errno.EROFS:
            raise PermissionError(errno.EROFS, f"Read-only file system: {path!r}") from None
        raise


@functools.lru_cache(maxsize=64)
def _name_of(kind: str, key: int) -> str:
    import grp
    import pwd

    with contextlib.suppress(KeyError):
        return (pwd.getpwuid if kind == "user" else grp.getgrgid)(key)[0]
    return str(key)


def _inside(host_id: int, base: int | None) -> int:
    """An owner as the sandbox sees it: unmapped host ids are the overflow id, as in `ls`."""
    if base is None:
        return host_id
    return host_id - base if base <= host_id < base + RANGE_SIZE else 65534


def file_info(path: str, st: os.stat_result, link: str | None, base: int | None = None) -> dict:
    uid, gid = _inside(st.st_uid, base), _inside(st.st_gid, base)
    return {
        "name": posixpath.basename(path) or "/", "path": path,
        "type": FILE_TYPES.get(stat_mod.S_IFMT(st.st_mode), "FILE"), "size": st.st_size,
        "mode": stat_mod.S_IMODE(st.st_mode),
        "owner": _name_of("user", 0) if uid == 0 else str(uid),  # cached lookups
        "group": _name_of("group", 0) if gid == 0 else str(gid),
        "modified_time": st.st_mtime, "symlink_target": link,
    }


@dataclass
class Handle:
    file: io.BufferedIOBase
    path: str


class SandboxRoot:
    """What the file service holds for one running sandbox: a descriptor of its root, opened
    while the sandbox was known to run, and its open FileIO handles.

    File operations run in worker threads while the event loop ends sandboxes. A thread uses the
    descriptor only between `use()`'s enter and exit, and `close()` waits for every user to leave
    before closing it, so a descriptor number can never be reused under an operation (which would
    send it to another sandbox).
    """

    def __init__(self, fd: int, base: int | None = None):
        self.fd = fd
        self.base = base  # root's host uid in a sandbox with a user namespace
        self.handles: dict[str, Handle] = {}
        self.mu = threading.Condition()
        self.users = 0  # guarded by mu
        self.closing = False  # guarded by mu
        self.watches = 0  # inotify watches of this sandbox's open watch streams; guarded by mu
        self.watch_streams = 0  # guarded by mu

    @contextlib.contextmanager
    def use(self):
        with self.mu:
            if self.closing:
                raise SandboxGone("the sandbox has ended")
            self.users += 1
        try:
            yield self.fd
        finally:
            with self.mu:
                self.users -= 1
                self.mu.notify_all()

    def close(self) -> None:
        """Blocking: waits for operations in flight."""
        with self.mu:
            self.closing = True
            self.mu.wait_for(lambda: self.users == 0)
        for h in self.handles.values():
            with contextlib.suppress(OSError):
                h.file.close()
        self.handles.clear()
        with contextlib.suppress(OSError):
            os.close(self.fd)


class SandboxFiles:
    """Blocking file operations on running sandboxes' roots; callers run them in threads through
    `call`, which holds the sandbox's root for the operation's duration."""

    def __init__(self):
        self.roots: dict[str, SandboxRoot] = {}  # changed on the event loop only

    def add(self, sandbox_id: str, root_fd: int, base: int | None = None) -> None:
        self.roots[sandbox_id] = SandboxRoot(root_fd, base)

    def take(self, sandbox_id: str) -> SandboxRoot | None:
        """Forget a sandbox; the caller closes the returned root (blocking) off the loop."""
        return self.roots.pop(sandbox_id, None)

    def call(self, sandbox_id: str, fn, *args):
        root = self.roots.get(sandbox_id)
        if root is None:
            raise SandboxGone("the sandbox has ended")
        with root.use(), acting_as(root.base):
            return fn(sandbox_id, *args)

    @staticmethod
    def commit_write(sandbox_id: str, out: "AtomicFile") -> None:
        """`out.commit()`, through `call` (as the sandbox's root)."""
        out.commit()

    def root(self, sandbox_id: str) -> SandboxRoot:
        root = self.roots.get(sandbox_id)
        if root is None:
            raise SandboxGone("the sandbox has ended")
        return root

    # --- low-level resolution
    @staticmethod
    def _parent(root: int, rel: str) -> tuple[int, str]:
        parent, _, name = rel.rpartition("/")
        return _linux.openat2(root, parent or ".", os.O_PATH | os.O_DIRECTORY, 0,
                              RESOLVE_SANDBOX), name

    @staticmethod
    def _makedirs(root: int, rel: str) -> None:
        parts = [p for p in rel.split("/") if p]
        for i in range(len(parts)):
            prefix = "/".join(parts[:i + 1])
            try:
                fd = _linux.openat2(root, prefix, os.O_PATH | os.O_DIRECTORY, 0, RESOLVE_SANDBOX)
                os.close(fd)
                continue
            except FileNotFoundError:
                pass
            pfd = _linux.openat2(root, "/".join(parts[:i]) or ".", os.O_PATH | os.O_DIRECTORY,
                                 0, RESOLVE_SANDBOX)
            try:
                with contextlib.suppress(FileExistsError):
                    os.mkdir(parts[i], 0o755, dir_fd=pfd)
            finally:
                os.close(pfd)

    def _open(self, root: int, rel: str, flags: int) -> int:
        """Open a regular file; with O_CREAT, create it (never opening an existing non-regular
        file)."""
        if not flags & os.O_CREAT:
            return open_checked(root, rel, flags, resolve=RESOLVE_SANDBOX)
        for _ in range(3):
            try:
                fd = open_checked(root, rel, flags & ~(os.O_CREAT | os.O_EXCL),
                                  resolve=RESOLVE_SANDBOX)
            except FileNotFoundError:
                pass
            else:
                if flags & os.O_EXCL:
                    os.close(fd)
                    raise FileExistsError(rel)
                return fd
            pfd, _ = self._parent(root, rel)
            try:
                _refuse_kernel_fs(pfd, rel)
            finally:
                os.close(pfd)
            try:
                return _linux.openat2(root, rel, flags | os.O_CREAT | os.O_EXCL, 0o644,
                                      RESOLVE_SANDBOX)
            except FileExistsError:
                if flags & os.O_EXCL:
                    raise
        raise FileExistsError(rel)

    # --- whole-file operations (blocking; the routes run them in threads)
    def stat(self, sandbox_id: str, path: str) -> dict:
        rel = sandbox_rel(path)
        with said_as(path):
            root = self.root(sandbox_id).fd
            base = self.root(sandbox_id).base
            if not rel:
                return file_info("/", os.stat(root), None, base)
            pfd, name = self._parent(root, rel)
            try:
                st = os.stat(name, dir_fd=pfd, follow_symlinks=False)
                link = os.readlink(name, dir_fd=pfd) if stat_mod.S_ISLNK(st.st_mode) else None
            finally:
                os.close(pfd)
        return file_info("/" + rel, st, link, base)

    def list(self, sandbox_id: str, path: str, offset: int = 0,
             limit: int = LIST_PAGE) -> list[dict]:
        """Entries `offset`.. of the directory in name order, at most `limit` (≤ LIST_PAGE): only
        that page is stat'ed and held, whatever the directory's size."""
        limit = max(0, min(limit, LIST_PAGE))
        rel = sandbox_rel(path)
        with said_as(path):
            fd = open_checked(self.root(sandbox_id).fd, rel, os.O_RDONLY, allow_dir=True,
                              resolve=RESOLVE_SANDBOX)
            try:
                if not stat_mod.S_ISDIR(os.fstat(fd).st_mode):
                    raise NotADirectoryError(rel)
                out = []
                for name in sorted(os.listdir(fd))[offset:offset + limit]:
                    with contextlib.suppress(FileNotFoundError):
                        st = os.stat(name, dir_fd=fd, follow_symlinks=False)
                        link = os.readlink(name, dir_fd=fd) if stat_mod.S_ISLNK(st.st_mode) \
                            else None
                        out.append(file_info(posixpath.join("/" + rel, name), st, link,
                                             self.root(sandbox_id).base))
                return out
            finally:
                os.close(fd)

    def open_read(self, sandbox_id: str, path: str, limit: int | None) -> int:
        rel = sandbox_rel(path)
        with said_as(path):
            fd = self._open(self.root(sandbox_id).fd, rel, os.O_RDONLY)
        if limit is not None and os.fstat(fd).st_size > limit:
            os.close(fd)
            raise SandboxFilesystemFileTooLargeError(
                f"{path} is larger than {limit >> 20} MiB; use copy_to_local to stream it")
        return fd

    def begin_write(self, sandbox_id: str, path: str, make_parents: bool) -> "AtomicFile":
        rel = sandbox_rel(path)
        if not rel:
            raise IsADirectoryError(errno.EISDIR, "/ is a directory")
        root = self.root(sandbox_id).fd
        with said_as(path):
            if make_parents:
                self._makedirs(root, rel.rpartition("/")[0])
            pfd, name = self._parent(root, rel)
            try:
                _refuse_kernel_fs(pfd, rel)
            except BaseException:
                os.close(pfd)
                raise
        return AtomicFile(pfd, name, path)

    def mkdir(self, sandbox_id: str, path: str, parents: bool, exist_ok: bool) -> None:
        rel = sandbox_rel(path)
        if not rel:
            if exist_ok:
                return
            raise FileExistsError(errno.EEXIST, "already exists: /")
        root = self.root(sandbox_id).fd
        with said_as(path):
            if parents:
                self._makedirs(root, rel.rpartition("/")[0])
            pfd, name = self._parent(root, rel)
            try:
                os.mkdir(name, 0o755, dir_fd=pfd)
            except FileExistsError:
                st = os.stat(name, dir_fd=pfd, follow_symlinks=False)
                if not (exist_ok and stat_mod.S_ISDIR(st.st_mode)):
                    raise
            finally:
                os.close(pfd)

    def remove(self, sandbox_id: str, path: str, recursive: bool) -> None:
        rel = sandbox_rel(path)
        if not rel:
            raise InvalidError("refusing to remove the sandbox's root directory")
        with said_as(path):
            pfd, name = self._parent(self.root(sandbox_id).fd, rel)
            try:
                remove_entry(pfd, name, recursive)
            finally:
                os.close(pfd)

    def rename(self, sandbox_id: str, src: str, dst: str, overwrite: bool) -> None:
        srel, drel = sandbox_rel(src, "source"), sandbox_rel(dst, "destination")
        if not srel or not drel:
            raise InvalidError("cannot move the sandbox's root directory")
        if drel == srel or drel.startswith(srel + "/"):
            raise InvalidError(f"cannot move {src} into itself")
        root = self.root(sandbox_id).fd
        with said_as(src):
            spfd, sname = self._parent(root, srel)
        try:
            with said_as(dst):
                dpfd, dname = self._parent(root, drel)
            try:
                with said_as(dst):
                    _linux.renameat2(spfd, sname, dpfd, dname,
                                     0 if overwrite else _linux.RENAME_NOREPLACE)
            finally:
                os.close(dpfd)
        finally:
            os.close(spfd)

    # --- FileIO handles
    def handle_open(self, sandbox_id: str, path: str, mode: str) -> str:
        if mode not in _MODES:
            raise InvalidError(f"invalid mode {mode!r}")
        rel = sandbox_rel(path)
        sroot = self.root(sandbox_id)
        if len(sroot.handles) >= MAX_HANDLES:
            raise InvalidError(f"too many open files in this sandbox ({MAX_HANDLES}); close some")
        flags, pymode = _MODES[mode]
        with said_as(path):
            fd = self._open(sroot.fd, rel, flags)
        hid = f"fh-{secrets.token_hex(8)}"
        sroot.handles[hid] = Handle(open(fd, pymode, buffering=CHUNK if "+" not in mode else -1),
                                    "/" + rel)
        return hid

    def handle(self, sandbox_id: str, hid: str) -> Handle:
        h = self.root(sandbox_id).handles.get(hid)
        if h is None:
            raise ValueError("I/O operation on closed file")
        return h

    def handle_read(self, sandbox_id: str, hid: str, n: int, line: bool) -> bytes:
        """At most HANDLE_READ_MAX bytes: `n` larger is cut to it (a short read, as a pipe
        gives); a whole-file read (n < 0) or a line that would return more raises
        SandboxFilesystemFileTooLargeError and leaves the position where it was."""
        h = self.handle(sandbox_id, hid)
        cap = HANDLE_READ_MAX
        if not line and 0 <= n:
            return h.file.read(min(n, cap))
        data = h.file.readline(cap + 1) if line else h.file.read(cap + 1)
        if len(data) > cap:
            h.file.seek(-len(data), os.SEEK_CUR)
            what = "a line" if line else "the rest of the file"
            raise SandboxFilesystemFileTooLargeError(
                f"{h.path}: {what} is larger than {cap >> 20} MiB, the most one read returns; "
                f"read it in pieces with read({cap})")
        return data

    def handle_close(self, sandbox_id: str, hid: str) -> None:
        h = self.root(sandbox_id).handles.pop(hid, None)
        if h is not None:
            with said_as(h.path):
                h.file.close()

    # --- watching
    def open_watch(self, sandbox_id: str, path: str, recursive: bool) -> "Watch":
        """Set up inotify watches on `path` (and, with `recursive`, every directory below it).
        Errors (a missing path) are raised here, before any event is streamed."""
        rel = sandbox_rel(path)
        sroot = self.root(sandbox_id)
        root = sroot.fd
        with said_as(path):
            target = _linux.openat2(root, rel or ".", os.O_PATH, 0, RESOLVE_SANDBOX)
        with sroot.mu:
            if sroot.watch_streams >= MAX_WATCH_STREAMS:
                os.close(target)
                raise InvalidError(f"this sandbox already has {MAX_WATCH_STREAMS} watches open; "
                                   "end one first")
            sroot.watch_streams += 1
        try:
            ino = _linux.inotify_init()
        except BaseException:
            os.close(target)
            with sroot.mu:
                sroot.watch_streams -= 1
            raise
        watch = Watch(ino, sroot, path)
        try:
            watch.add(target, "/" + rel)
            if recursive and stat_mod.S_ISDIR(os.fstat(target).st_mode):
                dfd = os.open(f"/proc/self/fd/{target}", os.O_RDONLY | os.O_DIRECTORY)
                try:
                    for dirpath, dirnames, _, dirfd in os.fwalk(".", dir_fd=dfd,
                                                                 follow_symlinks=False):
                        for d in dirnames:
                            sub = os.open(d, os.O_PATH | os.O_NOFOLLOW, dir_fd=dirfd)
                            try:
                                watch.add(sub, posixpath.normpath(f"/{rel}/{dirpath}/{d}"))
                            finally:
                                os.close(sub)
                finally:
                    os.close(dfd)
        except BaseException:
            watch.close()
            raise
        finally:
            os.close(target)
        return watch


class Watch:
    MASK = (_linux.IN_ACCESS | _linux.IN_MODIFY | _linux.IN_CLOSE_WRITE | _linux.IN_CREATE |
            _linux.IN_DELETE | _linux.IN_MOVED_FROM | _linux.IN_MOVED_TO | _linux.IN_DELETE_SELF |
            _linux.IN_ATTRIB)

    def __init__(self, ino: int, owner: SandboxRoot | None = None, shown: str = ""):
        self.ino = ino
        self.owner = owner  # charged for the watches (counts in SandboxRoot)
        self.shown = shown
        self.paths: dict[int, str] = {}  # watch descriptor -> sandbox path
        self.closed = False

    def add(self, fd: int, shown: str) -> None:
        if self.owner is not None:
            with self.owner.mu:
                if len(self.paths) >= MAX_WATCHES_PER_CALL:
                    raise InvalidError(
                        f"watching {self.shown} recursively needs more than "
                        f"{MAX_WATCHES_PER_CALL} directory watches; watch a smaller tree or "
                        "pass recursive=False")
                if self.owner.watches >= MAX_WATCHES_PER_SANDBOX:
                    raise InvalidError(
                        f"this sandbox's watches already use {MAX_WATCHES_PER_SANDBOX} directory "
                        "watches; end one, or watch a smaller tree")
                self.owner.watches += 1
        # inotify resolves /proc/self/fd/N to the inode the O_PATH descriptor holds.
        try:
            wd = _linux.inotify_add_watch(self.ino, f"/proc/self/fd/{fd}", self.MASK)
        except BaseException:
            if self.owner is not None:
                with self.owner.mu:
                    self.owner.watches -= 1
            raise
        if wd in self.paths and self.owner is not None:  # the same inode twice
            with self.owner.mu:
                self.owner.watches -= 1
        self.paths[wd] = shown

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        with contextlib.suppress(OSError):
            os.close(self.ino)
        if self.owner is not None:
            with self.owner.mu:
                self.owner.watches -= len(self.paths)
                self.owner.watch_streams -= 1

    async def stream(self, timeout: float | None, finished: asyncio.Event) -> AsyncIterator[bytes]:
        """Newline-delimited JSON events until `timeout`, the sandbox's end, or the client goes."""
        loop = asyncio.get_running_loop()
        ready = asyncio.Event()
        loop.add_reader(self.ino, ready.set)
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            while not finished.is_set():
                wait = None if deadline is None else deadline - time.monotonic()
                if wait is not None and wait <= 0:
                    return
                waiters = {asyncio.ensure_future(finished.wait()),
                           asyncio.ensure_future(ready.wait())}
                try:
                    await asyncio.wait(waiters, timeout=wait,
                                       return_when=asyncio.FIRST_COMPLETED)
                finally:  # (also when the client goes while this waits)
                    for w in waiters:
                        w.cancel()
                ready.clear()
                try:
                    buf = os.read(self.ino, 65536)
                except BlockingIOError:
                    continue
                for wd, mask, name in _linux.parse_inotify(buf):
                    event = _event_type(mask)
                    if event is None or wd not in self.paths:
                        continue
                    full = posixpath.join(self.paths[wd], name) if name else self.paths[wd]
                    yield (json.dumps({"paths": [full], "type": event}) + "\n").encode()
        finally:
            loop.remove_reader(self.ino)
            self.close()


@contextlib.contextmanager
def acting_as(base: int | None):
    """Run the block with this thread's file-system uid and gid set to `base` (nothing when None),
    its capabilities kept (setfsuid to non-zero drops the file ones from the effective set), and
    everything restored afterwards: worker threads are shared."""
    if base is None:
        yield
        return
    saved = _linux.thread_caps()
    old = _linux.setfsids(base, base)
    try:
        _linux.restore_caps(saved, effective_from_permitted=True)
        yield
    finally:
        _linux.setfsids(*old)
        _linux.restore_caps(saved)


def _refuse_kernel_fs(dirfd: int, rel: str) -> None:
    kind = _linux.KERNEL_FS.get(_linux.fs_type(dirfd))
    if kind:
        raise PermissionError(f"{rel!r} is on {kind}, a kernel interface; it is not written "
                              "through the file API")


def _event_type(mask: int) -> str | None:
    if mask & (_linux.IN_IGNORED | _linux.IN_Q_OVERFLOW):
        return None
    if mask & (_linux.IN_CREATE | _linux.IN_MOVED_TO):
        return "Create"
    if mask & (_linux.IN_DELETE | _linux.IN_MOVED_FROM | _linux.IN_DELETE_SELF):
        return "Remove"
    if mask & (_linux.IN_MODIFY | _linux.IN_CLOSE_WRITE | _linux.IN_ATTRIB):
        return "Modify"
    if mask & _linux.IN_ACCESS:
        return "Access"
    return "Unknown"


class AtomicFile:
    """A file written aside and landed on `name` in its directory when complete; an existing
    file's owner and mode carry over, as they would for a process rewriting it.

    The data goes to an unnamed O_TMPFILE in the target's directory, so nothing is visible while
    it is written and a crash (of the server or of the upload) leaves nothing behind: the kernel
    frees an unlinked file. `commit` links it straight to `name` when that is free; over an
    existing file it links to a hidden name and renames that over the target at once (a crash
    in those microseconds is the only way a `.shoal-*.tmp` can be left). File systems without
    O_TMPFILE (overlayfs before Linux 6.6) fall back to a named temporary file."""

    def __init__(self, dirfd: int, name: str, shown: str):
        self.dirfd = dirfd
        self.name = name
        self.shown = shown
        self.written = 0
        self.tmp: str | None = None
        with said_as(shown):
            try:
                self.fd = os.open(".", os.O_TMPFILE | os.O_WRONLY | os.O_CLOEXEC, 0o644,
                                  dir_fd=dirfd)
                self.unnamed = True
            except OSError as e:
                if e.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
                    raise
                self.unnamed = False
                self.tmp = f".shoal-{secrets.token_hex(6)}.tmp"
                self.fd = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC,
                                  0o644, dir_fd=dirfd)

    def write(self, data: bytes) -> None:
        self.written += _linux.write_all(self.fd, data)

    def commit(self) -> None:
        with said_as(self.shown):
            try:
                old = os.stat(self.name, dir_fd=self.dirfd, follow_symlinks=False)
            except FileNotFoundError:
                old = None
            if old is not None:
                if stat_mod.S_ISDIR(old.st_mode):
                    raise IsADirectoryError(self.shown)
                if stat_mod.S_ISREG(old.st_mode):
                    os.fchown(self.fd, old.st_uid, old.st_gid)
                    os.fchmod(self.fd, stat_mod.S_IMODE(old.st_mode))
            os.fsync(self.fd)
            if self.unnamed:
                if old is None:
                    try:
                        os.link(f"/proc/self/fd/{self.fd}", self.name, dst_dir_fd=self.dirfd,
                                follow_symlinks=True)
                        return
                    except FileExistsError:
                        pass  # made meanwhile: replace it as below
                self.tmp = f".shoal-{secrets.token_hex(6)}.tmp"
                os.link(f"/proc/self/fd/{self.fd}", self.tmp, dst_dir_fd=self.dirfd,
                        follow_symlinks=True)
            os.rename(self.tmp, self.name, src_dir_fd=self.dirfd, dst_dir_fd=self.dirfd)
            self.tmp = None

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.fd)
        if self.tmp:
            with contextlib.suppress(OSError):
                os.unlink(self.tmp, dir_fd=self.dirfd)
        with contextlib.suppress(OSError):
            os.close(self.dirfd)
