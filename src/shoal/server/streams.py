"""Moving a process's output from its pipe to an HTTP client.

A process must not stall because nobody reads it yet (`p.wait()` without reading stdout is normal
Modal code), and the server must not hold unbounded output either. So each stream is drained into a
buffer that holds up to `limit` bytes; past that the pump stops reading and the process blocks on
its pipe until the client reads — the back-pressure of a pipe, with a large window.
"""

from __future__ import annotations

import asyncio
import os
from collections import deque
from collections.abc import AsyncIterator
from pathlib import Path

DEFAULT_LIMIT = 16 << 20
READ_SIZE = 64 << 10


class OutputBuffer:
    def __init__(self, limit: int = DEFAULT_LIMIT):
        self.limit = limit
        # Touched only on the event loop: no lock. `changed` wakes both the pump and the reader.
        self.chunks: deque[bytes] = deque()
        self.size = 0
        self.closed = False
        self.changed = asyncio.Condition()

    async def put(self, data: bytes) -> None:
        async with self.changed:
            await self.changed.wait_for(lambda: self.size < self.limit)
            self.chunks.append(data)
            self.size += len(data)
            self.changed.notify_all()

    async def close(self) -> None:
        async with self.changed:
            self.closed = True
            self.changed.notify_all()

    async def get(self) -> bytes:
        """Next chunk; b"" once the stream has ended and everything was read."""
        async with self.changed:
            await self.changed.wait_for(lambda: self.chunks or self.closed)
            if not self.chunks:
                return b""
            data = self.chunks.popleft()
            self.size -= len(data)
            self.changed.notify_all()
            return data

    async def pump(self, reader: asyncio.StreamReader) -> None:
        try:
            while data := await reader.read(READ_SIZE):
                await self.put(data)
        finally:
            await self.close()

    async def iterate(self) -> AsyncIterator[bytes]:
        while data := await self.get():
            yield data


async def tail_file(path: Path, offset: int, finished: asyncio.Event,
                    poll: float = 0.02) -> AsyncIterator[bytes]:
    """Yield a log file's bytes from `offset` as they are written, until `finished` is set and the
    file is read to its end."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return
    try:
        os.lseek(fd, offset, os.SEEK_SET)
        while True:
            data = os.read(fd, READ_SIZE)
            if data:
                yield data
                continue
            if finished.is_set():
                # The writer is gone; one last read catches what it wrote before it went.
                while data := os.read(fd, READ_SIZE):
                    yield data
                return
            try:
                await asyncio.wait_for(asyncio.shield(finished.wait()), poll)
            except asyncio.TimeoutError:
                pass
    finally:
        os.close(fd)
