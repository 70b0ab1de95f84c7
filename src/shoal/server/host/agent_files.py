"""The sandbox file API through the in-sandbox agent, for runtimes where the host cannot see the
sandbox's root (gVisor: `/proc/<pid>/root` is the gVisor sandbox process's root, not the
container's).

Same contract, same results as `runc_files.SandboxFiles`: paths are validated the same way
(`sandbox_rel`), errors are said the same way (`said_as`), entries have the same fields
(`file_info`'s), FileIO handles have the same ids and limits. What differs is where the work
happens: the agent resolves paths inside the sandbox (its own root is the boundary, not
openat2's RESOLVE_IN_ROOT), so a symlink to "/etc/passwd" reads the sandbox's file by
construction.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import grp
import posixpath
import pwd
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from shoal.exception import InvalidError, SandboxFilesystemFileTooLargeError
from shoal.server.host import agent_client
from shoal.server.host.runc_files import MAX_HANDLES, said_as, sandbox_rel

CHUNK = agent_client.MAX_DATA
_F = agent_client.OPEN_FLAGS
_MODES = {
    "r": _F["READ"], "r+": _F["READ"] | _F["WRITE"],
    "w": _F["WRITE"] | _F["CREATE"] | _F["TRUNCATE"],
    "w+": _F["READ"] | _F["WRITE"] | _F["CREATE"] | _F["TRUNCATE"],
    "a": _F["WRITE"] | _F["CREATE"] | _F["APPEND"],
    "a+": _F["READ"] | _F["WRITE"] | _F["CREATE"] | _F["APPEND"],
    "x": _F["WRITE"] | _F["CREATE"] | _F["EXCLUSIVE"],
    "x+": _F["READ"] | _F["WRITE"] | _F["CREATE"] | _F["EXCLUSIVE"],
}
_KINDS = {"Create", "Modify", "Remove", "Access"}


def _name_of(table, key: int) -> str:
    if key == 0:
        try:
            return table(0)[0]
        except KeyError:
            pass
    return str(key)


def entry_info(path: str, st: dict) -> dict:
    """An agent stat dict as `runc_files.file_info` gives it."""
    kind = st["type"] if st["type"] in ("FILE", "DIRECTORY", "SYMLINK") else "FILE"
    return {"name": posixpath.basename(path) or "/", "path": path, "type": kind,
            "size": st["size"], "mode": st["mode"],
            "owner": _name_of(pwd.getpwuid, st["uid"]), "group": _name_of(grp.getgrgid, st["gid"]),
            "modified_time": st["mtime"], "symlink_target": st["link"]}


@dataclass
class _Handle:
    sandbox_id: str
    agent_handle: int
    path: str


@contextlib.contextmanager
def said_as_agent(path: str):
    """`said_as`, plus the agent's own way of refusing a device, FIFO or socket (EINVAL "not a
    regular file"), said as the runc file API says it (PermissionError)."""
    with said_as(path):
        try:
            yield
        except OSError as e:
            if e.errno == errno.EINVAL and "not a regular file" in str(e.strerror):
                raise PermissionError(errno.EACCES, "not a regular file (a device, FIFO or "
                                      "socket); the file API opens only regular files") from None
            raise


class AgentFiles:
    """File operations of running sandboxes, each one or a few agent requests. `call` is the
    host's `_call(sandbox_id, method, *args)` (it maps a lost agent to SandboxGone/HostError)."""

    def __init__(self, call):
        self._call = call
        self.handles: dict[str, _Handle] = {}  # event loop only

    def forget(self, sandbox_id: str) -> None:
        for hid in [h for h, v in self.handles.items() if v.sandbox_id == sandbox_id]:
            del self.handles[hid]

    async def stat(self, sandbox_id: str, path: str) -> dict:
        rel = sandbox_rel(path)
        with said_as_agent(path):
            st = await self._call(sandbox_id, "stat", "/" + rel)
        return entry_info("/" + rel, st)

    async def listdir(self, sandbox_id: str, path: str) -> list[dict]:
        rel = sandbox_rel(path)
        with said_as_agent(path):
            entries = await self._call(sandbox_id, "listdir", "/" + rel)
        return [entry_info(posixpath.join("/" + rel, e["name"]), e) for e in entries]

    async def read_file(self, sandbox_id: str, path: str,
                        limit: int | None) -> tuple[int, AsyncIterator[bytes]]:
        rel = sandbox_rel(path)
        with said_as_agent(path):
            # Both at once (one wait for the agent, not two: under gVisor each is ~1-4 ms); the
            # STAT decides the answer for a directory, before the read's own error is looked at.
            st, read = await asyncio.gather(
                self._call(sandbox_id, "stat", "/" + rel),
                self._call(sandbox_id, "read_file", "/" + rel, 0, CHUNK), return_exceptions=True)
            if isinstance(st, BaseException):
                raise st
            if st["type"] == "DIRECTORY":
                raise IsADirectoryError(errno.EISDIR, rel)
            if limit is not None and st["size"] > limit:
                raise SandboxFilesystemFileTooLargeError(
                    f"{path} is larger than {limit >> 20} MiB; use copy_to_local to stream it")
            if isinstance(read, BaseException):
                raise read
            data, eof, size = read
        if limit is not None and size > limit:
            raise SandboxFilesystemFileTooLargeError(
                f"{path} is larger than {limit >> 20} MiB; use copy_to_local to stream it")

        async def chunks() -> AsyncIterator[bytes]:
            nonlocal data, eof
            offset = 0
            while True:
                if data:
                    yield data
                    offset += len(data)
                if eof or not data:
                    return
                with said_as_agent(path):
                    data, eof, _ = await self._call(sandbox_id, "read_file", "/" + rel, offset,
                                                    CHUNK)
        return size, chunks()

    async def write_file(self, sandbox_id: str, path: str, chunks: AsyncIterator[bytes],
                         parents: bool) -> int:
        rel = sandbox_rel(path)
        if not rel:
            raise IsADirectoryError(errno.EISDIR, "/ is a directory")
        with said_as_agent(path):
            handle = await self._call(sandbox_id, "write_begin", "/" + rel, parents)
        written = 0
        try:
            async for chunk in chunks:
                with said_as_agent(path):
                    await self._call(sandbox_id, "write_chunk", handle, chunk)
                written += len(chunk)
            with said_as_agent(path):
                await self._call(sandbox_id, "write_commit", handle)
        except BaseException:
            try:
                await self._call(sandbox_id, "write_abort", handle)
            except Exception:
                pass  # committed already, or the sandbox is gone
            raise
        return written

    async def mkdir(self, sandbox_id: str, path: str, parents: bool, exist_ok: bool) -> None:
        rel = sandbox_rel(path)
        if not rel:
            if exist_ok:
                return
            raise FileExistsError(errno.EEXIST, "already exists: /")
        with said_as_agent(path):
            await self._call(sandbox_id, "mkdir", "/" + rel, parents, exist_ok)

    async def remove(self, sandbox_id: str, path: str, recursive: bool) -> None:
        rel = sandbox_rel(path)
        if not rel:
            raise InvalidError("refusing to remove the sandbox's root directory")
        with said_as_agent(path):
            await self._call(sandbox_id, "remove", "/" + rel, recursive)

    async def rename(self, sandbox_id: str, src: str, dst: str, overwrite: bool) -> None:
        srel, drel = sandbox_rel(src, "source"), sandbox_rel(dst, "destination")
        if not srel or not drel:
            raise InvalidError("cannot move the sandbox's root directory")
        if drel == srel or drel.startswith(srel + "/"):
            raise InvalidError(f"cannot move {src} into itself")
        # Which path an error is about: the source when it is missing, else the destination.
        try:
            await self._call(sandbox_id, "rename", "/" + srel, "/" + drel, overwrite)
        except FileNotFoundError:
            with said_as_agent(src):
                await self._call(sandbox_id, "stat", "/" + srel)
            with said_as_agent(dst):
                raise
        except OSError:
            with said_as_agent(dst):
                raise

    # --- FileIO handles
    def _handle(self, sandbox_id: str, hid: str) -> _Handle:
        h = self.handles.get(hid)
        if h is None or h.sandbox_id != sandbox_id:
            raise ValueError("I/O operation on closed file")
        return h

    async def handle_open(self, sandbox_id: str, path: str, mode: str) -> str:
        if mode not in _MODES:
            raise InvalidError(f"invalid mode {mode!r}")
        rel = sandbox_rel(path)
        if sum(h.sandbox_id == sandbox_id for h in self.handles.values()) >= MAX_HANDLES:
            raise InvalidError(f"too many open files in this sandbox ({MAX_HANDLES}); close some")
        with said_as_agent(path):
            if not rel:
                raise IsADirectoryError(errno.EISDIR, rel)
            ah = await self._call(sandbox_id, "h_open", "/" + rel, _MODES[mode])
        hid = f"fh-{secrets.token_hex(8)}"
        self.handles[hid] = _Handle(sandbox_id, ah, "/" + rel)
        return hid

    async def handle_read(self, sandbox_id: str, hid: str, n: int, line: bool) -> bytes:
        h = self._handle(sandbox_id, hid)
        parts, got = [], 0
        with said_as_agent(h.path):
            while n < 0 or got < n:
                want = CHUNK if n < 0 else min(CHUNK, n - got)
                data, eof = await self._call(sandbox_id, "h_read", h.agent_handle, want, line)
                parts.append(data)
                got += len(data)
                if eof or not data or (line and data.endswith(b"\n")):
                    break
        return b"".join(parts)

    async def handle_write(self, sandbox_id: str, hid: str, data: bytes) -> int:
        h = self._handle(sandbox_id, hid)
        with said_as_agent(h.path):
            await self._call(sandbox_id, "h_write", h.agent_handle, data)
        return len(data)

    async def handle_seek(self, sandbox_id: str, hid: str, offset: int, whence: int) -> int:
        h = self._handle(sandbox_id, hid)
        with said_as_agent(h.path):
            return await self._call(sandbox_id, "h_seek", h.agent_handle, offset, whence)

    async def handle_flush(self, sandbox_id: str, hid: str) -> int:
        h = self._handle(sandbox_id, hid)
        with said_as_agent(h.path):
            await self._call(sandbox_id, "h_flush", h.agent_handle)
            return await self._call(sandbox_id, "h_seek", h.agent_handle, 0, 1)

    async def handle_close(self, sandbox_id: str, hid: str) -> None:
        h = self.handles.pop(hid, None)
        if h is None or h.sandbox_id != sandbox_id:
            return
        with said_as_agent(h.path):
            await self._call(sandbox_id, "h_close", h.agent_handle)

    # --- watching
    async def watch(self, agent: agent_client.AgentClient, path: str, recursive: bool,
                    timeout: float | None, finished: asyncio.Event) -> AsyncIterator[dict]:
        """Starts the watch (errors raise here), then streams events as runc_files.Watch does."""
        rel = sandbox_rel(path)
        w = agent.watch("/" + rel, recursive)
        with said_as_agent(path):
            await w.__aenter__()

        async def events() -> AsyncIterator[bytes]:
            deadline = None if timeout is None else time.monotonic() + timeout
            it = w.__aiter__()
            try:
                while not finished.is_set():
                    wait = None if deadline is None else deadline - time.monotonic()
                    if wait is not None and wait <= 0:
                        return
                    nxt = asyncio.ensure_future(it.__anext__())
                    end = asyncio.ensure_future(finished.wait())
                    try:
                        await asyncio.wait({nxt, end}, timeout=wait,
                                           return_when=asyncio.FIRST_COMPLETED)
                    finally:
                        # (Also when this generator is closed or cancelled while it waits: a
                        # task left pending would be destroyed pending, with a log line.)
                        end.cancel()
                        if not nxt.done():
                            nxt.cancel()
                    if not nxt.done() or nxt.cancelled():
                        continue  # (cancelled above: the wait timed out)
                    try:
                        event_path, kind = nxt.result()
                    except agent_client.AgentConnectionError:
                        return  # the sandbox ended
                    yield {"paths": [event_path], "type": kind if kind in _KINDS else "Unknown"}
            finally:
                await w.aclose()
        return events()

