"""A process started with `Sandbox.exec` (Modal's `modal.container_process.ContainerProcess`).

`exec` is one HTTP request: its response carries the process's id, then its stdout and stderr as
they are written, then its exit code (frames of u8 kind, u32 length, payload). A task on the SDK's
loop reads that response into one bounded buffer per stream, which `stdout`/`stderr` read from. If
the connection breaks (the server restarted), the task asks again from the byte offsets it has,
so no output is lost or repeated. A buffer over its limit pauses the task, which pauses the
process: the back-pressure of a pipe.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import struct
import threading
from collections import deque

import httpx

from shoal import exception as exc
from shoal._client import get_client
from shoal._sync import get_loop, known_without_io, on_loop, synchronize_api
from shoal._transport import BLOCKING, to_loop
from shoal.io_streams import _StreamReader, _StreamWriter

BUFFER_LIMIT = 16 << 20  # bytes of unread output held per stream before the process is paused
RECONNECT_FOR = 60.0  # seconds to keep trying after the connection to the server broke
FRAME_START, FRAME_STDOUT, FRAME_STDERR, FRAME_EXIT, FRAME_ERROR, FRAME_END = range(6)


class _Channel:
    """Output of one stream, fed by the exec's reader task, read by a StreamReader."""

    def __init__(self) -> None:
        self.chunks: deque[bytes] = deque()
        self.size = 0
        self.offset = 0  # bytes received so far (the position to resume from)
        self.closed = False
        self.error: BaseException | None = None
        self.changed = asyncio.Condition()
        # Set once nothing more will come (after `error`, then `closed`), or when the buffer is
        # full and needs a reader on the loop: a blocking `read()` waits for it in its own
        # thread and, if the stream ended, takes the chunks there (io_streams.py).
        self.wake = threading.Event()

    async def put(self, data: bytes) -> None:
        async with self.changed:
            if self.size >= BUFFER_LIMIT:
                self.wake.set()
            await self.changed.wait_for(lambda: self.size < BUFFER_LIMIT)
            self.chunks.append(data)
            self.size += len(data)
            self.offset += len(data)
            self.changed.notify_all()

    def full(self) -> bool:
        return self.size >= BUFFER_LIMIT

    async def close(self, error: BaseException | None = None) -> None:
        async with self.changed:
            self.error = self.error or error
            self.closed = True
            self.wake.set()
            self.changed.notify_all()

    async def get(self) -> bytes:
        """Next chunk; b"" at the end of the stream."""
        async with self.changed:
            await self.changed.wait_for(lambda: self.chunks or self.closed)
            if not self.chunks:
                if self.error is not None:
                    raise self.error
                return b""
            data = self.chunks.popleft()
            self.size -= len(data)
            self.changed.notify_all()
            return data


async def _frames(resp: httpx.Response):
    """(kind, payload) frames of an exec stream."""
    buf = bytearray()
    async for chunk in resp.aiter_raw():
        buf += chunk
        while len(buf) >= 5:
            kind, size = struct.unpack(">BI", buf[:5])
            if len(buf) < 5 + size:
                break
            payload = bytes(buf[5:5 + size])
            del buf[:5 + size]
            yield kind, payload
    if buf:
        raise httpx.ReadError("the exec stream ended inside a frame")


def _modal_rc(exit_info: dict) -> int:
    """Modal's client reports an exec killed at its timeout as -1 (the server says 124)."""
    return -1 if exit_info.get("timed_out") else exit_info["returncode"]


class _ContainerProcess:
    """Handle to a running command: `stdout`, `stderr`, `stdin`, `wait()`, `poll()`,
    `returncode`. Exit codes as Modal's client gives them: the process's own, 128 + N when
    killed by signal N (137 for SIGKILL), and -1 when the exec's `timeout` ran out (Modal's
    client returns -1 there rather than raising ExecTimeoutError)."""

    def __init__(self, exec_id: str, text: bool = True, resp: httpx.Response | None = None,
                 captured: tuple[str, ...] = ("stdout", "stderr")):
        self._exec_id = exec_id
        self._returncode: int | None = None
        self._exited = asyncio.Event()
        self._channels = {s: _Channel() for s in ("stdout", "stderr")}
        for s in ("stdout", "stderr"):
            if s not in captured:
                self._channels[s].closed = True
                self._channels[s].wake.set()
        self._stdout = _StreamReader(channel=self._channels["stdout"], text=text, fd=1)
        self._stderr = _StreamReader(channel=self._channels["stderr"], text=text, fd=2)
        self._stdin = _StreamWriter(f"/execs/{exec_id}/stdin", offsets=True)
        self._reader = asyncio.get_running_loop().create_task(
            self._read_output(resp), name=f"shoal-exec-{exec_id}") if resp is not None else None

    @classmethod
    async def _start(cls, sandbox_id: str, body: dict, text: bool) -> "_ContainerProcess":
        client = await get_client()
        # The POST carries an Idempotency-Key, so a retry after a server crash gets the command
        # the first attempt started (if any), never a second run.
        resp = await client.send("POST", f"/sandboxes/{sandbox_id}/exec", stream=True,
                                 json=body)
        try:
            if resp.status_code >= 400:
                from shoal._client import _error_from

                raise _error_from(resp.status_code, await resp.aread())
            frames = _frames(resp)
            exec_id = resp.headers.get("x-shoal-exec-id")
            if exec_id is None:  # a server that names it only in the start frame
                kind, payload = await frames.__anext__()
                if kind != FRAME_START:
                    raise exc.RemoteError("the server's exec stream did not start with the exec "
                                          "id")
                exec_id = json.loads(payload)["exec_id"]
        except BaseException:
            await resp.aclose()
            raise
        captured = tuple(s for s in ("stdout", "stderr") if body.get(s) == "pipe")
        proc = cls(exec_id, text, None, captured)

        def read() -> None:
            proc._reader = asyncio.get_running_loop().create_task(
                proc._read_output(resp, frames), name=f"shoal-exec-{proc._exec_id}")

        if BLOCKING.get():
            # Started from a caller's thread (_sync.in_callers_thread): the output is read by
            # a task on the SDK loop all the same, from the same connection. The task is made
            # before anything else this caller sends to the loop runs there.
            to_loop(resp, get_loop())
            on_loop(read)
        else:
            read()
        return proc

    async def _read_output(self, resp: httpx.Response | None, frames=None) -> None:
        """Move the exec stream into the channels; resume from offsets if the connection breaks."""
        deadline = None
        error: BaseException | None = None
        try:
            while True:
                try:
                    if resp is None:
                        resp = await self._reopen()
                        frames = _frames(resp)
                    async for kind, payload in frames or _frames(resp):
                        deadline = None
                        if kind in (FRAME_STDOUT, FRAME_STDERR):
                            await self._channels["stdout" if kind == FRAME_STDOUT
                                                 else "stderr"].put(payload)
                        elif kind == FRAME_EXIT:
                            self._returncode = _modal_rc(json.loads(payload))
                            self._exited.set()
                            # Nothing follows the exit: readers have it all now, not when the
                            # body's end has been read too.
                            for ch in self._channels.values():
                                await ch.close()
                        elif kind == FRAME_END and payload in (b"stdout", b"stderr"):
                            # One stream ended before the command: its reader has it all.
                            await self._channels[payload.decode()].close()
                        elif kind == FRAME_ERROR:
                            err = json.loads(payload)["error"]
                            raise exc.from_wire(err["type"], err["message"], err.get("errno"))
                    if self._exited.is_set():
                        return
                    raise httpx.ReadError("the exec stream ended before the exit code")
                except (httpx.TransportError, exc.ConnectionError) as e:
                    loop = asyncio.get_running_loop()
                    deadline = deadline or loop.time() + RECONNECT_FOR
                    if loop.time() > deadline:
                        raise exc.ConnectionError(f"lost the shoal server while reading the "
                                                  f"output of {self._exec_id}: {e}") from None
                    await asyncio.sleep(0.2)
                finally:
                    if resp is not None:
                        await resp.aclose()
                    resp = frames = None
        except Exception as e:
            error = e
        finally:
            # Readers see the end of the streams (or the error) however this task ends.
            for ch in self._channels.values():
                ch.error = ch.error or error
                ch.closed = True
                ch.wake.set()
                if not ch.changed.locked():
                    async with ch.changed:
                        ch.changed.notify_all()

    async def _reopen(self) -> httpx.Response:
        client = await get_client()
        resp = await client.send("GET", f"/execs/{self._exec_id}/stream", stream=True,
                                 params={s: ch.offset for s, ch in self._channels.items()})
        if resp.status_code >= 400:
            from shoal._client import _error_from

            body = await resp.aread()
            await resp.aclose()
            raise _error_from(resp.status_code, body)
        return resp

    @property
    def object_id(self) -> str:
        return self._exec_id

    @property
    def stdout(self) -> _StreamReader:
        return self._stdout

    @property
    def stderr(self) -> _StreamReader:
        return self._stderr

    @property
    def stdin(self) -> _StreamWriter:
        return self._stdin

    @property
    def returncode(self) -> int:
        """The exit code, once `wait()` or `poll()` has seen the process end.

        Raises InvalidError before that (as Modal's client does): call `wait()`, or `poll()`
        to check without blocking.

            p = sb.exec("true"); p.wait(); assert p.returncode == 0
        """
        if self._returncode is None:
            raise exc.InvalidError("You must call wait() before accessing the returncode. "
                                   "To poll for the status of a running process, use poll() "
                                   "instead.")
        return self._returncode

    async def resize(self, rows: int, cols: int) -> None:
        """Change the size of the process's terminal (an exec with `pty=True`); it gets
        SIGWINCH.

        Raises InvalidError for a process without a terminal or a size outside 1-1000.

            p = sb.exec("bash", pty=True); p.resize(40, 120)
        """
        if not all(isinstance(v, int) and 0 < v <= 1000 for v in (rows, cols)):
            raise exc.InvalidError(f"rows and cols must be between 1 and 1000, got {rows!r} x "
                                   f"{cols!r}")
        client = await get_client()
        await client.call("POST", f"/execs/{self._exec_id}/resize",
                          json={"rows": rows, "cols": cols})

    async def _wait(self, timeout: float) -> int | None:
        client = await get_client()
        r = await client.call("GET", f"/execs/{self._exec_id}/wait", params={"timeout": timeout})
        if r["done"]:
            self._returncode = _modal_rc(r)
        return self._returncode

    @known_without_io(lambda self: self._returncode)
    async def poll(self) -> int | None:
        """The exit code if the process has ended, else None (does not block).

        Raises ConnectionError if the server cannot be reached.

            rc = p.poll()  # None while it runs
        """
        if self._returncode is None and not self._exited.is_set():
            await self._wait(0)
        return self._returncode

    @known_without_io(lambda self: self._returncode)
    async def wait(self) -> int:
        """Wait for the process to end; returns its exit code.

        Raises ConnectionError if the server stays unreachable, NotFoundError if the exec ended
        more than 10 minutes ago.

            rc = sb.exec("sh", "-c", "exit 3").wait()  # 3
        """
        reader_stuck = self._reader is None or self._reader.done() or any(
            ch.full() for ch in self._channels.values())
        if self._returncode is None and not reader_stuck:
            # The usual end: the stream's exit frame, no request of its own.
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._exited.wait()), 0.5)
        while self._returncode is None:
            # The exit code is behind output nobody reads (or the stream is gone), or behind
            # output a process left in the background still holds open (the exit frame comes
            # after all output): ask the server, which answers at the process's own exit.
            await self._wait(60)
        return self._returncode

    def __repr__(self) -> str:
        return f"ContainerProcess({self._exec_id}, returncode={self._returncode})"


ContainerProcess = synchronize_api(_ContainerProcess)
