"""Readers and writers for a process's stdio (Modal's `modal.io_streams`).

A `StreamReader` reads one output stream of a sandbox or exec'd process from the server while the
process runs: `read()` returns everything up to the end; iterating yields lines as they arrive.
A `StreamWriter` buffers `write()`s and sends them on `drain()`, as in Modal.
"""

from __future__ import annotations

import codecs
from collections.abc import AsyncIterator

from shoal._client import get_client
from shoal._sync import known_without_io, synchronize_api
from shoal.exception import InvalidError


class _StreamReader:
    def __init__(self, path: str | None = None, text: bool = True, resumable: bool = False,
                 channel=None, fd: int | None = None):
        self._path = path
        self._channel = channel  # an exec's output, fed by its ContainerProcess
        self._fd = fd if fd is not None else (2 if path and path.endswith("stderr") else 1)
        self._text = text
        self._resumable = resumable  # sandbox entrypoint logs can be re-read from an offset
        self._offset = 0
        self._chunks: AsyncIterator[bytes] | None = None
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._pending = "" if text else b""
        self._eof = False
        self._lines = None

    async def _raw(self) -> AsyncIterator[bytes]:
        if self._channel is not None:
            while data := await self._channel.get():
                yield data
            return
        client = await get_client()
        params = {"offset": self._offset} if self._resumable else {}
        async with client.stream("GET", self._path, params=params) as resp:
            async for chunk in resp.aiter_raw():
                self._offset += len(chunk)
                yield chunk

    async def _next_chunk(self):
        """Next decoded piece of output, or None at the end."""
        if self._eof:
            return None
        if self._chunks is None:
            self._chunks = self._raw()
        try:
            data = await self._chunks.__anext__()
        except StopAsyncIteration:
            self._eof = True
            if self._text:
                tail = self._decoder.decode(b"", final=True)
                return tail or None
            return None
        return self._decoder.decode(data) if self._text else data

    def _read_known(self) -> str | bytes | None:
        """What `read()` returns, when the stream has ended and its chunks are all here (else
        None): taken in the caller's thread, without a trip to the SDK loop."""
        ch = self._channel
        if ch is None or not ch.closed or ch.error is not None:
            return None
        data = b"".join(ch.chunks.popleft() for _ in range(len(ch.chunks)))
        ch.size = 0
        rest, self._pending = self._pending, "" if self._text else b""
        if self._eof:
            return rest
        self._eof = True
        return rest + self._decoder.decode(data, final=True) if self._text else rest + data

    def _read_ready(self):
        return self._channel.wake if self._channel is not None else None

    @known_without_io(_read_known, _read_ready)
    async def read(self) -> str | bytes:
        """Everything the stream still holds, waiting until the process closes it.

        Raises ConnectionError if the server is lost for good, SandboxTerminatedError where the
        stream's sandbox is gone.

            out = sb.exec("ls").stdout.read()
        """
        parts = [self._pending]
        self._pending = "" if self._text else b""
        while (piece := await self._next_chunk()) is not None:
            parts.append(piece)
        return ("" if self._text else b"").join(parts)

    async def __aiter__(self):
        """Lines as they arrive (with their line endings; the last may lack one)."""
        nl = "\n" if self._text else b"\n"
        while True:
            idx = self._pending.find(nl)
            if idx >= 0:
                line, self._pending = self._pending[: idx + 1], self._pending[idx + 1:]
                yield line
                continue
            piece = await self._next_chunk()
            if piece is None:
                if self._pending:
                    line, self._pending = self._pending, self._pending[:0]
                    yield line
                return
            self._pending += piece

    async def __anext__(self):
        """The next line (Modal's `next(p.stdout)`); StopAsyncIteration at the end."""
        if self._lines is None:
            self._lines = self.__aiter__()
        return await self._lines.__anext__()

    @property
    def file_descriptor(self) -> int:
        return self._fd


class _StreamWriter:
    def __init__(self, path: str, offsets: bool = False):
        self._path = path
        self._offsets = offsets  # send each write's stream position, so a retry cannot repeat it
        self._sent = 0
        self._buffer = bytearray()
        self._eof = False
        self._closed = False

    def write(self, data: bytes | bytearray | memoryview | str) -> None:
        """Buffer `data`; `drain()` sends it.

        Raises TypeError for data that is not str or bytes, ValueError after write_eof().

            p.stdin.write(b"input\\n"); p.stdin.drain()
        """
        if self._eof:
            raise ValueError("stdin is closed (write_eof was called)")
        if isinstance(data, str):
            data = data.encode()
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError(f"stdin takes bytes or str, not {type(data).__name__}")
        self._buffer.extend(data)

    def write_eof(self) -> None:
        """Close stdin once the buffered data is sent (on the next `drain()`).

        Raises nothing itself; `drain()` sends it.

            p.stdin.write_eof(); p.stdin.drain()
        """
        self._eof = True

    async def drain(self) -> None:
        """Send what `write()` buffered (and the end of input, after `write_eof()`).

        Raises SandboxTerminatedError if the sandbox has finished.

            p.stdin.write("data"); p.stdin.drain()
        """
        if self._closed:
            if self._buffer:
                raise InvalidError("stdin was already closed")
            return
        data, self._buffer = bytes(self._buffer), bytearray()
        if not data and not self._eof:
            return
        client = await get_client()
        step = 8 << 20
        for start in range(0, max(len(data), 1), step):
            last = start + step >= len(data)
            piece = data[start:start + step]
            params = {"eof": "true" if (self._eof and last) else "false"}
            if self._offsets:
                params["offset"] = self._sent
            await client.call("POST", self._path, content=piece, params=params)
            self._sent += len(piece)
        if self._eof:
            self._closed = True


StreamReader = synchronize_api(_StreamReader)
StreamWriter = synchronize_api(_StreamWriter)
