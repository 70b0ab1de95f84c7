"""Files of a running sandbox, opened with `Sandbox.open` (Modal's `modal.file_io`).

    with sb.open("/tmp/notes.txt", "w") as f:
        f.write("hello\\n")
    print(sb.open("/tmp/notes.txt").read())

Each operation is one call to the server, which holds the open file; paths resolve inside the
sandbox (see `shoal.server.host.runc_files`). Sandbox-side errors are the built-in ones: FileNotFoundError,
IsADirectoryError, NotADirectoryError, PermissionError, FileExistsError.
"""

from __future__ import annotations

import enum
import io
from dataclasses import dataclass

from shoal._client import get_client
from shoal._sync import in_callers_thread, synchronize_api
from shoal.exception import SandboxFilesystemFileTooLargeError

READ_CHUNK = 16 << 20  # the most one server call returns (server/host/runc_files.HANDLE_READ_MAX)
READ_FILE_SIZE_LIMIT = 100 << 20  # Modal's: one read() returns at most this


class FileWatchEventType(enum.Enum):
    Unknown = "Unknown"
    Access = "Access"
    Create = "Create"
    Modify = "Modify"
    Remove = "Remove"


@dataclass
class FileWatchEvent:
    paths: list[str]
    type: FileWatchEventType


def parse_mode(mode: str) -> tuple[str, bool, bool, bool]:
    """(server mode like 'r+' , binary, readable, writable); ValueError for a bad mode."""
    if (not isinstance(mode, str) or len(set(mode)) != len(mode)
            or any(c not in "rwaxb+" for c in mode) or sum(c in "rwax" for c in mode) != 1):
        raise ValueError(f"invalid mode {mode!r}: use exactly one of r, w, a, x, optionally "
                         "with b and +")
    base = next(c for c in mode if c in "rwax")
    plus = "+" in mode
    return base + ("+" if plus else ""), "b" in mode, base == "r" or plus, base != "r" or plus


class _FileIO:
    """An open file in a sandbox: read, readline, readlines, write, flush, seek, tell, close."""

    def __init__(self, sandbox_id: str, handle: str, path: str, mode: str):
        self._base = f"/sandboxes/{sandbox_id}/fs/handles/{handle}"
        self._path = path
        self._mode = mode
        _, self._binary, self._readable, self._writable = parse_mode(mode)
        self._closed = False

    @classmethod
    @in_callers_thread()
    async def create(cls, path: str, mode: str, sandbox_id: str) -> "_FileIO":
        """Open `path` in sandbox `sandbox_id` (what `Sandbox.open` calls).

        Raises ValueError for a bad mode, FileNotFoundError, IsADirectoryError, PermissionError or
        FileExistsError as the built-in `open` does.

            f = shoal.FileIO.create("/tmp/x", "w", sb.object_id)
        """
        server_mode, *_ = parse_mode(mode)
        client = await get_client()
        r = await client.call("POST", f"/sandboxes/{sandbox_id}/fs/handles",
                              json={"path": path, "mode": server_mode})
        return cls(sandbox_id, r["handle"], path, mode)

    def _check(self, reading: bool) -> None:
        if self._closed:
            raise ValueError("I/O operation on closed file")
        if reading and not self._readable:
            raise io.UnsupportedOperation("File not open for reading")
        if not reading and not self._writable:
            raise io.UnsupportedOperation("File not open for writing")

    def _out(self, data: bytes):
        return data if self._binary else data.decode()

    async def _call(self, op: str, **kwargs):
        client = await get_client()
        return await client.call("POST", f"{self._base}/{op}", **kwargs)

    async def _read_raw(self, n: int, line: bool) -> bytes:
        client = await get_client()
        resp = await client.send_unkeyed("POST", f"{self._base}/read",
                                         params={"n": n, "line": line})
        if resp.status_code >= 400:
            from shoal._client import _error_from

            raise _error_from(resp.status_code, resp.content)
        return resp.content

    async def _read_bytes(self, n: int) -> bytes:
        """Up to `n` bytes (n < 0: to the end), fetched in pieces the server bounds; more than
        READ_FILE_SIZE_LIMIT raises SandboxFilesystemFileTooLargeError."""
        parts, got = [], 0
        while n < 0 or got < n:
            want = READ_CHUNK if n < 0 else min(n - got, READ_CHUNK)
            data = await self._read_raw(want, False)
            if not data:
                break
            got += len(data)
            if got > READ_FILE_SIZE_LIMIT:
                raise SandboxFilesystemFileTooLargeError(
                    f"{self._path}: read() returns at most {READ_FILE_SIZE_LIMIT >> 20} MiB; read "
                    "in pieces with read(n), or use sb.filesystem.copy_to_local")
            parts.append(data)
            if len(data) < want:
                break  # a regular file reads short only at its end
        return b"".join(parts)

    @in_callers_thread()
    async def read(self, n: int | None = None):
        """Up to `n` bytes (characters, in text mode), or everything to the end. At most 100 MiB
        per call (Modal's limit): more raises SandboxFilesystemFileTooLargeError.

            text = sb.open("/etc/hostname").read()
        """
        self._check(reading=True)
        if n is None or n < 0:
            return self._out(await self._read_bytes(-1))
        if self._binary:
            return await self._read_bytes(n)
        # n characters: fetch bytes until that many have decoded (a character is 1-4 bytes).
        import codecs

        decoder = codecs.getincrementaldecoder("utf-8")()
        text = ""
        while len(text) < n:
            data = await self._read_raw(n - len(text), False)
            if not data:
                return text + decoder.decode(b"", final=True)
            text += decoder.decode(data)
        return text

    @in_callers_thread()
    async def readline(self):
        """The next line, with its newline; empty at the end. A line over 16 MiB raises
        SandboxFilesystemFileTooLargeError (read it with read(n)).

            first = sb.open("/etc/passwd").readline()
        """
        self._check(reading=True)
        return self._out(await self._read_raw(-1, True))

    @in_callers_thread()
    async def readlines(self) -> list:
        """All remaining lines.

        Raises ValueError on a closed file, io.UnsupportedOperation if not open for reading.

            lines = sb.open("/etc/passwd").readlines()
        """
        lines = []
        while line := await self.readline():
            lines.append(line)
        return lines

    @in_callers_thread()
    async def write(self, data) -> int:
        """Write `data` (bytes in binary mode, str in text mode); returns its length.

        Raises TypeError for the wrong kind of data, ValueError on a closed file,
        io.UnsupportedOperation if not open for writing.

            sb.open("/tmp/patch.diff", "w").write(patch)
        """
        self._check(reading=False)
        if self._binary and not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError(f"a bytes-like object is required, not '{type(data).__name__}'")
        if not self._binary and not isinstance(data, str):
            raise TypeError(f"write() argument must be str, not {type(data).__name__}")
        payload = bytes(data) if self._binary else data.encode()
        await self._call("write", content=payload)
        return len(data)

    @in_callers_thread()
    async def flush(self) -> None:
        """Flush the file in the sandbox (each write already reaches it, as in Modal).

        Raises ValueError on a closed file.

            f.write("data"); f.flush()
        """
        if self._closed:
            raise ValueError("I/O operation on closed file")
        await self._call("flush")

    @in_callers_thread()
    async def seek(self, offset: int, whence: int = 0) -> int:
        """Move to `offset` relative to the start (0), the current position (1) or the end (2).

        Raises ValueError for a bad `whence` or a closed file.

            f.seek(0)  # back to the start
        """
        if self._closed:
            raise ValueError("I/O operation on closed file")
        if whence not in (0, 1, 2):
            raise ValueError(f"invalid whence ({whence}, should be 0, 1 or 2)")
        return (await self._call("seek", json={"offset": offset, "whence": whence}))["position"]

    @in_callers_thread()
    async def tell(self) -> int:
        """The current position in the file.

        Raises ValueError on a closed file.

            pos = f.tell()
        """
        return await self.seek(0, 1)

    @in_callers_thread()
    async def close(self) -> None:
        """Close the file (writes have already reached it); closing twice does nothing.

        Raises NotFoundError if the sandbox is gone.

            f = sb.open("/tmp/x", "w"); f.write("hi"); f.close()
        """
        if self._closed:
            return
        self._closed = True
        client = await get_client()
        await client.call("DELETE", self._base)

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def mode(self) -> str:
        return self._mode

    @property
    def name(self) -> str:
        return self._path

    @in_callers_thread()
    async def __aenter__(self) -> "_FileIO":
        return self

    @in_callers_thread()
    async def __aexit__(self, *exc) -> None:
        await self.close()

    def __repr__(self) -> str:
        return f"FileIO({self._path!r}, mode={self._mode!r}{', closed' if self._closed else ''})"


FileIO = synchronize_api(_FileIO)
