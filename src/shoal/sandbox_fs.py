"""`Sandbox.filesystem`: whole-file access to a running sandbox (Modal's newer file API).

    sb.filesystem.write_text("print('hi')\\n", "/app/main.py")     # parents are created
    sb.filesystem.read_text("/app/main.py")
    sb.filesystem.copy_from_local("model.bin", "/models/model.bin")  # streamed, any size

Errors are `shoal.exception.SandboxFilesystemError` subclasses.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import enum
import json
import os
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import httpx

from shoal import exception as exc
from shoal._client import Replayable, _error_from, get_client
from shoal._sync import in_callers_thread, synchronize_api
from shoal.file_io import FileWatchEvent, FileWatchEventType

CHUNK = 4 << 20

CUT_SETTLE = 5.0  # seconds a read cut short waits for its sandbox to be marked finished
LIST_PAGE = 10_000  # entries per listing call (server/host/runc_files.LIST_PAGE)


class FileType(enum.Enum):
    FILE = "FILE"
    DIRECTORY = "DIRECTORY"
    SYMLINK = "SYMLINK"


@dataclass(frozen=True)
class FileInfo:
    name: str
    path: str
    type: FileType
    size: int
    mode: int
    owner: str
    group: str
    modified_time: datetime.datetime
    symlink_target: str | None = None

    @property
    def permissions(self) -> str:
        """The permission bits as `ls -l` shows them, e.g. "rwxr-xr-x"."""
        import stat

        return stat.filemode(self.mode)[1:]

    def is_file(self) -> bool:
        """True if this entry is a regular file.

            [f.name for f in sb.filesystem.list_files("/tmp") if f.is_file()]
        """
        return self.type == FileType.FILE

    def is_dir(self) -> bool:
        """True if this entry is a directory.

            if sb.filesystem.stat("/data").is_dir(): ...
        """
        return self.type == FileType.DIRECTORY

    def is_symlink(self) -> bool:
        """True if this entry is a symbolic link (described, not followed).

            if info.is_symlink(): print(info.symlink_target)
        """
        return self.type == FileType.SYMLINK


_TRANSLATE = {
    FileNotFoundError: exc.SandboxFilesystemNotFoundError,
    IsADirectoryError: exc.SandboxFilesystemIsADirectoryError,
    NotADirectoryError: exc.SandboxFilesystemNotADirectoryError,
    PermissionError: exc.SandboxFilesystemPermissionError,
    FileExistsError: exc.SandboxFilesystemPathAlreadyExistsError,
}


@contextlib.asynccontextmanager
async def fs_errors():
    """Built-in file errors from the server, as SandboxFilesystemError subclasses."""
    try:
        yield
    except tuple(_TRANSLATE) as e:
        cls = next(c for b, c in _TRANSLATE.items() if isinstance(e, b))
        err = cls(e.strerror or str(e))
        err._shoal_typed = True
        raise err from None


def _info(d: dict) -> FileInfo:
    return FileInfo(d["name"], d["path"], FileType(d["type"]), d["size"], d["mode"], d["owner"],
                    d["group"], datetime.datetime.fromtimestamp(d["modified_time"],
                                                                datetime.timezone.utc),
                    d["symlink_target"])


async def _local_chunks(path: Path):
    with open(path, "rb") as f:
        while chunk := await asyncio.to_thread(f.read, CHUNK):
            yield chunk


async def watch_events(sandbox_id: str, path: str, filter, recursive: bool | None,
                       timeout: float | None) -> AsyncIterator[FileWatchEvent]:
    wanted = set(filter) if filter else None
    client = await get_client()
    params = {"path": path, "recursive": bool(recursive)}
    if timeout is not None:
        params["timeout"] = timeout
    async with client.stream("GET", f"/sandboxes/{sandbox_id}/fs/watch", params=params) as resp:
        async for line in resp.aiter_lines():
            if not line:
                continue
            d = json.loads(line)
            event = FileWatchEvent(d["paths"], FileWatchEventType(d["type"]))
            if wanted is None or event.type in wanted:
                yield event


class _SandboxFilesystem:
    def __init__(self, sandbox_id: str):
        self._sandbox_id = sandbox_id
        self._base = f"/sandboxes/{sandbox_id}/fs"

    async def _call(self, method: str, op: str, **kwargs):
        client = await get_client()
        async with fs_errors():
            return await client.call(method, f"{self._base}/{op}", **kwargs)

    @contextlib.asynccontextmanager
    async def _reading(self, params: dict) -> AsyncIterator[httpx.Response]:
        """The streamed answer of a file read. One that stops short while the server still
        answers was cut by the sandbox's side (the server closes it when the sandbox ends
        mid-read): that is raised as SandboxTerminatedError, or SandboxFilesystemError if the
        sandbox still runs, not as a lost server."""
        client = await get_client()
        began = False
        try:
            async with fs_errors():
                async with client.stream("GET", f"{self._base}/file", params=params) as r:
                    began = True
                    yield r
        except exc.ConnectionError as lost:
            if not began:
                raise
            raise await self._why_cut(params["path"], lost) from None

    async def _why_cut(self, remote_path: str, lost: BaseException) -> BaseException:
        client = await get_client()
        try:
            # A sandbox being terminated loses its agent first and is marked finished a moment
            # later: give it that moment (one that still runs costs the wait, once).
            await client.send_unkeyed("GET", f"/sandboxes/{self._sandbox_id}/wait",
                                      params={"timeout": CUT_SETTLE})
            resp = await client.send_unkeyed("GET", f"{self._base}/stat", params={"path": "/"})
        except (httpx.HTTPError, exc.ConnectionError, OSError):
            return lost  # the server is gone indeed
        if resp.status_code >= 400:
            err = _error_from(resp.status_code, resp.content)
            if isinstance(err, exc.SandboxTerminatedError):
                return err
        return exc.SandboxFilesystemError(f"reading {remote_path} stopped before its end: the "
                                          "sandbox's side of the read failed")

    @in_callers_thread()
    async def read_bytes(self, remote_path: str) -> bytes:
        """The whole file (up to 512 MiB; SandboxFilesystemFileTooLargeError beyond: use
        copy_to_local).

        Raises FileNotFoundError, IsADirectoryError, SandboxFilesystemFileTooLargeError,
        SandboxTerminatedError.

            data = sb.filesystem.read_bytes("/tmp/out.bin")
        """
        async with self._reading({"path": remote_path, "whole": True}) as r:
            return await r.aread()

    @in_callers_thread()
    async def read_text(self, remote_path: str, encoding: str = "utf-8") -> str:
        """A file's content as text (UTF-8).

        Raises FileNotFoundError, IsADirectoryError, UnicodeDecodeError, SandboxTerminatedError.

            text = sb.filesystem.read_text("/etc/hostname")
        """
        return (await self.read_bytes(remote_path)).decode(encoding)

    @in_callers_thread()
    async def write_bytes(self, data: bytes, remote_path: str) -> None:
        """Create or replace the file with `data`, atomically; missing parents are created.

        Raises IsADirectoryError, NotADirectoryError (a parent is a file), TypeError,
        SandboxTerminatedError.

            sb.filesystem.write_bytes(b"\\x00\\x01", "/tmp/data.bin")
        """
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError(f"write_bytes needs bytes, not {type(data).__name__}")
        await self._call("PUT", "file", params={"path": remote_path}, content=bytes(data))

    @in_callers_thread()
    async def write_text(self, data: str, remote_path: str, encoding: str = "utf-8") -> None:
        """Write text (UTF-8) to a file, replacing it.

        Raises IsADirectoryError, NotADirectoryError (a parent is a file), TypeError,
        SandboxTerminatedError.

            sb.filesystem.write_text("hello", "/tmp/hello.txt")
        """
        if not isinstance(data, str):
            raise TypeError(f"write_text needs str, not {type(data).__name__}")
        await self.write_bytes(data.encode(encoding), remote_path)

    async def copy_from_local(self, local_path: str | os.PathLike, remote_path: str) -> None:
        """Upload a local file of any size (streamed).

        Raises FileNotFoundError if `local_path` is missing, IsADirectoryError,
        SandboxTerminatedError.

            sb.filesystem.copy_from_local("model.bin", "/tmp/model.bin")
        """
        local = Path(local_path)
        if not local.is_file():
            raise FileNotFoundError(f"no such local file: {local_path}")
        # Sent again from the start if the server restarts meanwhile (the file lands whole).
        await self._call("PUT", "file", params={"path": remote_path},
                         content=Replayable(lambda: _local_chunks(local)))

    async def copy_to_local(self, remote_path: str, local_path: str | os.PathLike) -> None:
        """Download a file of any size (streamed); the local file appears only when complete.

        Raises FileNotFoundError if `remote_path` is missing, SandboxTerminatedError.

            sb.filesystem.copy_to_local("/tmp/out.tar", "out.tar")
        """
        local = Path(local_path)
        fd, tmp = tempfile.mkstemp(dir=local.parent or ".", prefix=f".{local.name}.")
        try:
            with os.fdopen(fd, "wb") as out:
                async with self._reading({"path": remote_path}) as r:
                    expected = int(r.headers.get("content-length", -1))
                    got = 0
                    async for chunk in r.aiter_raw():
                        # Written on the SDK's own loop thread: a thread hop per ~1 MiB chunk
                        # cost more than the write (measured, bench/file_bench.py).
                        out.write(chunk)
                        got += len(chunk)
                if expected >= 0 and got != expected:
                    raise exc.SandboxFilesystemError(
                        f"{remote_path}: received {got} of {expected} bytes")
            os.replace(tmp, local)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise

    @in_callers_thread()
    async def list_files(self, remote_path: str) -> list[FileInfo]:
        """The entries of a directory, as FileInfo (name, type, size, mode, mtime).

        Raises FileNotFoundError, NotADirectoryError, SandboxTerminatedError.

            for info in sb.filesystem.list_files("/tmp"): print(info.name, info.size)
        """
        found, offset = [], 0
        while True:  # the server answers in pages of at most LIST_PAGE entries
            page = await self._call("GET", "list", params={"path": remote_path,
                                                           "offset": offset, "limit": LIST_PAGE})
            found += [_info(d) for d in page]
            offset += len(page)
            if len(page) < LIST_PAGE:
                return found

    @in_callers_thread()
    async def stat(self, remote_path: str) -> FileInfo:
        """Information about `remote_path` itself (a symlink is described, not followed).

        Raises FileNotFoundError, SandboxTerminatedError.

            print(sb.filesystem.stat("/tmp").type)
        """
        return _info(await self._call("GET", "stat", params={"path": remote_path}))

    @in_callers_thread()
    async def make_directory(self, remote_path: str, create_parents: bool = True) -> None:
        """Make a directory (with missing parents when `create_parents`).

        Raises FileExistsError, FileNotFoundError (a missing parent), SandboxTerminatedError.

            sb.filesystem.make_directory("/work/out")
        """
        await self._call("POST", "mkdir", json={"path": remote_path, "parents": create_parents,
                                                "exist_ok": create_parents})

    @in_callers_thread()
    async def remove(self, remote_path: str, recursive: bool = False) -> None:
        """Remove a file, link or directory (a non-empty one only with `recursive`).

        Raises FileNotFoundError, SandboxFilesystemDirectoryNotEmptyError without `recursive`.

            sb.filesystem.remove("/tmp/build", recursive=True)
        """
        await self._call("DELETE", "file", params={"path": remote_path, "recursive": recursive})

    @in_callers_thread()
    async def rename(self, src: str, dst: str, overwrite: bool = True) -> None:
        """Move `src` to `dst` atomically (not in Modal; agents need it).

        Raises FileNotFoundError if the source is missing, SandboxTerminatedError.

            sb.filesystem.rename("/tmp/a", "/tmp/b")
        """
        await self._call("POST", "rename", json={"src": src, "dst": dst, "overwrite": overwrite})

    async def watch(self, remote_path: str, filter: list[FileWatchEventType] | None = None,
                    recursive: bool | None = None,
                    timeout: float | None = None) -> AsyncIterator[FileWatchEvent]:
        """Events under `remote_path` until `timeout` seconds pass or the sandbox ends.

        Raises FileNotFoundError if the path does not exist.

            for ev in sb.filesystem.watch("/tmp", timeout=5): print(ev)
        """
        async with fs_errors():
            async for event in watch_events(self._sandbox_id, remote_path, filter, recursive,
                                            timeout):
                yield event


SandboxFilesystem = synchronize_api(_SandboxFilesystem)
