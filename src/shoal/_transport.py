"""The SDK's HTTP/1.1 transport to the shoal server: plain sockets on the SDK's event loop.

An `httpx` transport (the seam `_client.Client` takes), for `unix:` sockets and plain `http://`
servers. httpx's default transport (httpcore over anyio) spent ~3 ms of client CPU per request
on this kind of machine, more than the server spends answering (bench/http_bench.py); this one
speaks only what the shoal server needs — keep-alive HTTP/1.1 with Content-Length or chunked
bodies both ways — with `loop.sock_*` calls and one buffer per connection.

Contract (as httpx's own transports): `handle_async_request` sends the request and returns once
the status line and headers are in; the body streams from the returned response, and the
connection goes back to the pool only when that body was read to its end. Failures are httpx's
exceptions — ConnectError (nothing listens), WriteError, ReadError, RemoteProtocolError (the
server went away or spoke nonsense), ConnectTimeout/ReadTimeout/WriteTimeout (the request's
`timeout` extension) — so callers see the same errors whichever transport they have. A
connection whose request was interrupted (cancelled, timed out, failed, body not read to the end)
is closed, never reused. An idle connection that the server has closed (uvicorn's keep-alive
timeout, a restart) is noticed before reuse (a zero-timeout poll) and replaced.

Blocking calls in the caller's thread: while `BLOCKING` is set (`_sync.run_direct` sets it for
a blocking call that runs its coroutine in the caller's own thread), the same code blocks on its
socket instead of awaiting the SDK loop: a connection is either the loop's (non-blocking, `loop`
set) or a calling thread's (blocking, `loop` None) while a request uses it. Idle connections
are shared by both; `list.pop`/`append` on the idle list are atomic.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import select
import socket
from collections.abc import AsyncIterator

import httpx

READ = 1 << 20  # bytes per recv: file transfers are the SDK's bulk traffic
MAX_HEAD = 64 << 10  # a response's status line and headers
MAX_IDLE = 16  # idle keep-alive connections kept per transport
# True while a blocking call runs in its caller's thread (above); never set on the SDK loop.
BLOCKING: contextvars.ContextVar[bool] = contextvars.ContextVar("shoal_blocking_io",
                                                               default=False)


class _Conn:
    """One socket to the server with its read buffer. `loop`: the SDK loop that uses it
    (non-blocking socket), or None while a calling thread uses it (blocking socket)."""

    __slots__ = ("sock", "buf", "loop")

    def __init__(self, sock: socket.socket, loop: asyncio.AbstractEventLoop | None):
        self.sock = sock
        self.buf = bytearray()
        self.loop = loop

    def use_from(self, loop: asyncio.AbstractEventLoop | None) -> None:
        """Hand the connection to `loop`, or (None) to the calling thread."""
        if loop is not self.loop:
            self.sock.setblocking(loop is None)
            self.loop = loop

    def _timeout(self, timeout: float | None) -> None:
        if self.sock.gettimeout() != timeout:  # (each settimeout is a system call)
            self.sock.settimeout(timeout)

    async def recv(self, n: int, timeout: float | None) -> bytes:
        """At least one and at most `n` bytes from the socket (_Eof at its end)."""
        if self.loop is None:
            self._timeout(timeout)
            data = self.sock.recv(n)  # TimeoutError past `timeout`, as asyncio.timeout's
        elif timeout is None:
            data = await self.loop.sock_recv(self.sock, n)
        else:
            async with asyncio.timeout(timeout):
                data = await self.loop.sock_recv(self.sock, n)
        if not data:
            raise _Eof()
        return data

    async def fill(self, timeout: float | None) -> None:
        """Append at least one byte to the buffer (_Eof at the socket's end)."""
        self.buf += await self.recv(READ, timeout)

    async def take(self, n: int, timeout: float | None) -> bytes:
        """At least one and at most `n` bytes: buffered ones first, else straight from the
        socket (a big body is not copied through the buffer)."""
        if self.buf:
            piece = bytes(self.buf[:n])
            del self.buf[:len(piece)]
            return piece
        return await self.recv(min(n, READ), timeout)

    def stale(self) -> bool:
        """Whether an idle connection can no longer be used (closed by the server, or holding
        bytes nobody asked for)."""
        if self.buf:
            return True
        try:
            p = select.poll()
            p.register(self.sock, select.POLLIN | select.POLLERR | select.POLLHUP)
            return bool(p.poll(0))
        except (OSError, ValueError):
            return True

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


class _Eof(Exception):
    """The server closed the connection."""


class AsyncSocketTransport(httpx.AsyncBaseTransport):
    """HTTP/1.1 over a Unix socket (`uds=`) or TCP (the `http://` URL's host and port)."""

    def __init__(self, uds: str | None = None):
        self.uds = uds
        self._idle: list[_Conn] = []  # the loop's and calling threads' (above)
        self._closed = False

    async def _connect(self, request: httpx.Request, timeout: float | None,
                       loop: asyncio.AbstractEventLoop | None) -> _Conn:
        if self.uds is not None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            addr: object = self.uds
        else:
            host, port = request.url.host, request.url.port or 80
            infos = (socket.getaddrinfo(host, port, type=socket.SOCK_STREAM) if loop is None
                     else await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM))
            if not infos:
                raise httpx.ConnectError(f"cannot resolve {host}", request=request)
            family, kind, proto, _, addr = infos[0]
            sock = socket.socket(family, kind, proto)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setblocking(loop is None)
        try:
            if loop is None:
                sock.settimeout(timeout)
                sock.connect(addr)
            elif timeout is None:
                await loop.sock_connect(sock, addr)
            else:
                async with asyncio.timeout(timeout):
                    await loop.sock_connect(sock, addr)
        except TimeoutError:
            sock.close()
            raise httpx.ConnectTimeout(f"connecting to {addr} timed out", request=request) \
                from None
        except OSError as e:
            sock.close()
            raise httpx.ConnectError(str(e), request=request) from None
        except BaseException:
            sock.close()
            raise
        return _Conn(sock, loop)

    async def _take(self, request: httpx.Request, timeout: float | None) -> tuple[_Conn, bool]:
        loop = None if BLOCKING.get() else asyncio.get_running_loop()
        while True:
            try:
                conn = self._idle.pop()  # (another thread may have taken the last one)
            except IndexError:
                break
            if not conn.stale():
                conn.use_from(loop)
                return conn, True
            conn.close()
        return await self._connect(request, timeout, loop), False

    def _give_back(self, conn: _Conn) -> None:
        if self._closed or len(self._idle) >= MAX_IDLE:
            conn.close()
        else:
            self._idle.append(conn)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        timeouts = request.extensions.get("timeout") or {}
        conn, _ = await self._take(request, timeouts.get("connect"))
        try:
            await self._send(conn, request, timeouts.get("write"))
            status, reason, headers, keep = await self._head(conn, request, timeouts.get("read"))
        except BaseException as e:
            conn.close()
            raise _mapped(e, request, reading=not isinstance(e, _WriteFailed)) from None
        try:
            body = _Body(self, conn, request, headers, status, keep, timeouts.get("read"))
        except BaseException:
            conn.close()
            raise
        return httpx.Response(status, headers=headers, stream=body,
                              extensions={"http_version": b"HTTP/1.1", "reason_phrase": reason})

    async def _send(self, conn: _Conn, request: httpx.Request, timeout: float | None) -> None:
        target = request.url.raw_path
        lines = [request.method.encode(), b" ", target, b" HTTP/1.1\r\n"]
        chunked = False
        for k, v in request.headers.raw:
            lines += (k, b": ", v, b"\r\n")
            if k.lower() == b"transfer-encoding" and v.lower() == b"chunked":
                chunked = True
        lines.append(b"\r\n")
        head = b"".join(lines)
        stream = request.stream
        try:
            if isinstance(stream, httpx.ByteStream):  # a body in memory: one write with the head
                body = b"".join(bytes(p) for p in stream)  # the ByteStream is sync-iterable
                await _sendall(conn, head + body if len(body) < (256 << 10) else head, timeout)
                if len(body) >= (256 << 10):
                    await _sendall(conn, body, timeout)
                return
            await _sendall(conn, head, timeout)
            async for piece in stream:
                if not piece:
                    continue
                if chunked:
                    await _sendall(conn, b"%x\r\n" % len(piece) + bytes(piece) + b"\r\n", timeout)
                else:
                    await _sendall(conn, piece, timeout)
            if chunked:
                await _sendall(conn, b"0\r\n\r\n", timeout)
        except (OSError, TimeoutError) as e:
            raise _WriteFailed(e) from None

    async def _head(self, conn: _Conn, request: httpx.Request, timeout: float | None):
        while True:
            end = conn.buf.find(b"\r\n\r\n")
            while end < 0:
                if len(conn.buf) > MAX_HEAD:
                    raise httpx.RemoteProtocolError("the server's response headers are too long",
                                                    request=request)
                try:
                    await conn.fill(timeout)
                except _Eof:
                    raise httpx.RemoteProtocolError("Server disconnected without sending a "
                                                    "response.", request=request) from None
                end = conn.buf.find(b"\r\n\r\n")
            block = bytes(conn.buf[:end])
            del conn.buf[:end + 4]
            lines = block.split(b"\r\n")
            parts = lines[0].split(b" ", 2)
            try:
                version, status = parts[0], int(parts[1])
            except (IndexError, ValueError):
                raise httpx.RemoteProtocolError(f"malformed status line {lines[0][:100]!r}",
                                                request=request) from None
            if not version.startswith(b"HTTP/1."):
                raise httpx.RemoteProtocolError(f"not HTTP/1.x: {lines[0][:100]!r}",
                                                request=request)
            headers = []
            for line in lines[1:]:
                name, sep, value = line.partition(b":")
                if not sep:
                    raise httpx.RemoteProtocolError(f"malformed header {line[:100]!r}",
                                                    request=request)
                headers.append((name.strip(), value.strip()))
            if 100 <= status < 200 and status != 101:
                continue  # 100 Continue and the like: the real answer follows
            reason = parts[2] if len(parts) > 2 else b""
            keep = version == b"HTTP/1.1" and not any(
                k.lower() == b"connection" and b"close" in v.lower() for k, v in headers)
            return status, reason, headers, keep

    async def aclose(self) -> None:
        self._closed = True
        idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()


class _WriteFailed(Exception):
    def __init__(self, cause: BaseException):
        super().__init__(str(cause))
        self.cause = cause


async def _sendall(conn: _Conn, data: bytes, timeout: float | None) -> None:
    if conn.loop is None:
        conn._timeout(timeout)
        conn.sock.sendall(data)
    elif timeout is None:
        await conn.loop.sock_sendall(conn.sock, data)
    else:
        async with asyncio.timeout(timeout):
            await conn.loop.sock_sendall(conn.sock, data)


def _mapped(e: BaseException, request: httpx.Request, reading: bool = True) -> BaseException:
    """httpx's exception for a failure of this transport (others pass through)."""
    if isinstance(e, _WriteFailed):
        cause = e.cause
        if isinstance(cause, TimeoutError):
            return httpx.WriteTimeout("writing the request timed out", request=request)
        return httpx.WriteError(str(cause) or type(cause).__name__, request=request)
    if isinstance(e, TimeoutError):
        return httpx.ReadTimeout("reading the response timed out", request=request)
    if isinstance(e, _Eof):
        return httpx.RemoteProtocolError("the server closed the connection mid-response",
                                         request=request)
    if isinstance(e, OSError):
        kind = httpx.ReadError if reading else httpx.WriteError
        return kind(str(e) or type(e).__name__, request=request)
    return e


class _Body(httpx.AsyncByteStream):
    """A response body: Content-Length, chunked, or up to the end of the connection."""

    def __init__(self, transport: AsyncSocketTransport, conn: _Conn, request: httpx.Request,
                 headers: list[tuple[bytes, bytes]], status: int, keep: bool,
                 timeout: float | None):
        self.transport, self.conn, self.request = transport, conn, request
        self.keep, self.timeout = keep, timeout
        self.length: int | None = None
        self.chunked = False
        for k, v in headers:
            k = k.lower()
            if k == b"content-length":
                try:
                    self.length = int(v)
                except ValueError:
                    raise httpx.RemoteProtocolError(f"bad Content-Length {v[:40]!r}",
                                                    request=request) from None
            elif k == b"transfer-encoding" and b"chunked" in v.lower():
                self.chunked = True
        if request.method == "HEAD" or status in (204, 304):
            self.length, self.chunked = 0, False
        elif self.length is None and not self.chunked:
            self.keep = False  # the body ends with the connection
        self.done = False
        self.iterated = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        if self.iterated:
            raise httpx.StreamConsumed()
        self.iterated = True
        conn = self.conn
        try:
            if self.chunked:
                async for piece in self._chunks():
                    yield piece
            elif self.length is not None:
                left = self.length
                while left > 0:
                    piece = await conn.take(left, self.timeout)
                    left -= len(piece)
                    yield piece
            else:
                while True:
                    if conn.buf:
                        piece = bytes(conn.buf)
                        conn.buf.clear()
                        yield piece
                    try:
                        await conn.fill(self.timeout)
                    except _Eof:
                        break
            self.done = True
        except GeneratorExit:
            raise
        except BaseException as e:
            self._release()
            raise _mapped(e, self.request) from None
        self._release()

    async def _chunks(self) -> AsyncIterator[bytes]:
        conn = self.conn
        while True:
            end = conn.buf.find(b"\r\n")
            while end < 0:
                if len(conn.buf) > 4096:
                    raise httpx.RemoteProtocolError("malformed chunked body",
                                                    request=self.request)
                await conn.fill(self.timeout)
                end = conn.buf.find(b"\r\n")
            try:
                size = int(bytes(conn.buf[:end]).split(b";", 1)[0], 16)
            except ValueError:
                raise httpx.RemoteProtocolError("malformed chunk size",
                                                request=self.request) from None
            del conn.buf[:end + 2]
            if size == 0:  # trailers (none expected), then the blank line
                while True:
                    end = conn.buf.find(b"\r\n")
                    while end < 0:
                        await conn.fill(self.timeout)
                        end = conn.buf.find(b"\r\n")
                    line = bytes(conn.buf[:end])
                    del conn.buf[:end + 2]
                    if not line:
                        return
            left = size
            while left > 0:
                piece = await conn.take(left, self.timeout)
                left -= len(piece)
                yield piece
            while len(conn.buf) < 2:
                await conn.fill(self.timeout)
            if conn.buf[:2] != b"\r\n":
                raise httpx.RemoteProtocolError("malformed chunked body", request=self.request)
            del conn.buf[:2]

    def _release(self) -> None:
        conn, self.conn = self.conn, None
        if conn is None:
            return
        if self.done and self.keep:
            self.transport._give_back(conn)
        else:
            conn.close()

    async def aclose(self) -> None:
        self._release()


def to_loop(response: httpx.Response, loop: asyncio.AbstractEventLoop) -> None:
    """Let `loop` read the rest of a response whose head a calling thread read (an exec's
    output, read by a task on the SDK loop)."""
    stream = response.stream
    if isinstance(stream, _Body) and stream.conn is not None:
        stream.conn.use_from(loop)
