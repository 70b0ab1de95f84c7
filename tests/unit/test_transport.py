"""The SDK's HTTP/1.1 transport (shoal/_transport.py) against small real servers on a Unix socket:
bodies both ways, keep-alive and what must not be reused, and httpx's errors for failures."""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
from pathlib import Path

import httpx
import pytest

from shoal._transport import AsyncSocketTransport


@contextlib.asynccontextmanager
async def _serve(handler):
    """A Unix-socket server whose connections `handler(reader, writer)` answers: its path."""
    with tempfile.TemporaryDirectory(prefix="transport-test-") as tmp:
        path = str(Path(tmp) / "s.sock")
        server = await asyncio.start_unix_server(handler, path)
        async with server:
            yield path


async def _request(reader) -> tuple[bytes, dict, bytes]:
    """One request: (request line, headers, body) — Content-Length or chunked bodies."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    headers = {}
    for line in lines[1:]:
        if line:
            k, _, v = line.partition(b":")
            headers[k.strip().lower()] = v.strip()
    body = b""
    if headers.get(b"transfer-encoding") == b"chunked":
        while True:
            size = int((await reader.readuntil(b"\r\n"))[:-2], 16)
            data = await reader.readexactly(size + 2)
            if size == 0:
                break
            body += data[:-2]
    elif b"content-length" in headers:
        body = await reader.readexactly(int(headers[b"content-length"]))
    return lines[0], headers, body


def _run(coro):
    return asyncio.run(asyncio.wait_for(coro, 20))


def test_bodies_both_ways_and_keep_alive():
    connections = []

    async def handler(reader, writer):
        connections.append(writer)
        while True:
            try:
                line, headers, body = await _request(reader)
            except asyncio.IncompleteReadError:
                return
            if line.startswith(b"GET /chunked"):
                writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"
                             b"3\r\nabc\r\n5;ext=1\r\ndefgh\r\n0\r\n\r\n")
            else:
                answer = line + b"|" + body
                writer.write(b"HTTP/1.1 201 Created\r\nx-a: 1\r\ncontent-length: %d\r\n\r\n%s"
                             % (len(answer), answer))
            await writer.drain()

    async def main():
        async with _serve(handler) as path:
            t = AsyncSocketTransport(uds=path)
            async with httpx.AsyncClient(transport=t, base_url="http://shoal") as c:
                r = await c.post("/x?y=1", content=b"hello")
                assert (r.status_code, r.headers["x-a"], r.content) == (
                    201, "1", b"POST /x?y=1 HTTP/1.1|hello")
                r = await c.get("/chunked")
                assert r.content == b"abcdefgh"

                async def gen():
                    for part in (b"a" * 70000, b"", b"tail"):
                        yield part

                r = await c.put("/up", content=gen())  # chunked upload
                assert r.content == b"PUT /up HTTP/1.1|" + b"a" * 70000 + b"tail"
                big = b"z" * (3 << 20)
                r = await c.put("/big", content=big)
                assert r.content == b"PUT /big HTTP/1.1|" + big
            assert len(connections) == 1  # all on one kept-alive connection

    _run(main())


def test_a_connection_is_not_reused_after_an_unread_body_or_when_the_server_closed_it():
    connections = []

    async def handler(reader, writer):
        connections.append(writer)
        n = 0
        while True:
            try:
                await _request(reader)
            except (asyncio.IncompleteReadError, ConnectionError):
                return
            n += 1
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 100000\r\n\r\n" + b"x" * 100000)
            await writer.drain()
            if n == 1 and len(connections) == 2:
                writer.close()  # like uvicorn's keep-alive timeout
                return

    async def main():
        async with _serve(handler) as path:
            async with httpx.AsyncClient(transport=AsyncSocketTransport(uds=path),
                                         base_url="http://shoal") as c:
                async with c.stream("GET", "/") as r:
                    await r.aiter_raw().__anext__()  # then left unread
                assert len((await c.get("/")).content) == 100000
                assert len(connections) == 2
                await asyncio.sleep(0.1)  # the server has closed the second connection
                assert len((await c.get("/")).content) == 100000
                assert len(connections) == 3

    _run(main())


def test_failures_are_httpx_errors():
    async def handler(reader, writer):
        line, _, _ = await _request(reader)
        if b"/hang" in line:
            await asyncio.sleep(10)
        elif b"/half" in line:
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nabc")
        elif b"/junk" in line:
            writer.write(b"SSH-2.0-OpenSSH\r\n\r\n")
        writer.close()

    async def main():
        async with _serve(handler) as path:
            async with httpx.AsyncClient(transport=AsyncSocketTransport(uds=path),
                                         base_url="http://shoal") as c:
                with pytest.raises(httpx.RemoteProtocolError):
                    await c.get("/gone")  # closed without an answer
                with pytest.raises(httpx.RemoteProtocolError):
                    await c.get("/half")
                with pytest.raises(httpx.RemoteProtocolError):
                    await c.get("/junk")
                with pytest.raises(httpx.ReadTimeout):
                    await c.get("/hang", timeout=0.2)
        async with httpx.AsyncClient(transport=AsyncSocketTransport(uds=path + ".none"),
                                     base_url="http://shoal") as c:
            with pytest.raises(httpx.ConnectError):
                await c.get("/")

    _run(main())


def test_the_sdks_requests_are_what_httpx_would_send():
    """`Client` builds its requests without httpx's URL parser and, for this transport, without
    httpx's Request (`_client._LeanRequest`): the server must receive the very request line,
    headers and body that httpx's own client sends, the second time (URL cache) too."""
    from shoal._client import Client

    seen: list[tuple[bytes, dict, bytes]] = []

    async def handler(reader, writer):
        while True:
            try:
                line, headers, body = await _request(reader)
            except asyncio.IncompleteReadError:
                return
            seen.append((line, headers, body))
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}")
            await writer.drain()

    calls = [
        ("GET", "/sandboxes/sb-1/fs/file", {"params": {"path": "/tmp/a b&c=d/é", "whole": True,
                                                       "n": 3, "none": None}}),
        ("GET", "/sandboxes/sb-1/fs/file", {"params": {"path": "/tmp/a b&c=d/é", "whole": 1}}),
        ("POST", "/sandboxes/sb-1/exec", {"json": {"args": ["echo", "héllo", "a\nb"], "t": 1.5,
                                                   "none": None},
                                          "headers": {"Idempotency-Key": "key-1"}}),
        ("PUT", "/volumes/v/file", {"params": {"path": "/x"}, "content": b"\x00\xffdata"}),
        ("POST", "/sandboxes/sb-1/terminate", {"headers": {"Idempotency-Key": "key-2"}}),
        ("DELETE", "/volumes/v/file", {"params": {"path": "/x", "recursive": False}}),
    ]

    async def go():
        async with _serve(handler) as path:
            transport = AsyncSocketTransport(uds=path)
            client = Client("http://shoal", transport, token="tok")
            plain = httpx.AsyncClient(base_url="http://shoal", transport=AsyncSocketTransport(
                uds=path), headers={"x-shoal-api-version": "1", "authorization": "Bearer tok"})
            for method, url, kwargs in calls:
                for _ in range(2):
                    await client.send(method, url, **kwargs)
                    await plain.request(method, url, **kwargs)
            await client.aclose()
            await plain.aclose()
    _run(go())
    assert len(seen) == 4 * len(calls)
    for i in range(0, len(seen), 2):
        ours, theirs = seen[i], seen[i + 1]
        assert ours[0] == theirs[0] and ours[2] == theirs[2], (ours, theirs)
        assert ours[1] == theirs[1], (ours[1], theirs[1])


@contextlib.contextmanager
def _serve_in_thread(handler):
    """`_serve` on an event loop in another thread, for calls that block this one."""
    import threading

    loop = asyncio.new_event_loop()
    started, stop = threading.Event(), asyncio.Event()
    box = {}

    async def main():
        async with _serve(handler) as path:
            box["path"] = path
            started.set()
            await stop.wait()
            others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in others:
                task.cancel()
            await asyncio.gather(*others, return_exceptions=True)

    thread = threading.Thread(target=loop.run_until_complete, args=(main(),), daemon=True)
    thread.start()
    assert started.wait(10)
    try:
        yield box["path"]
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(10)
        loop.close()


def test_blocking_calls_in_the_callers_thread_share_connections_with_the_loop():
    """With BLOCKING set (a call run in its caller's thread), the same transport blocks on its
    sockets; idle connections go both ways between that thread and the loop, and a response
    begun in the thread can be finished on the loop (an exec's output)."""
    import threading

    from shoal._sync import run_direct
    from shoal._transport import to_loop

    connections = []

    async def handler(reader, writer):
        connections.append(writer)
        while True:
            try:
                line, _, body = await _request(reader)
            except (asyncio.IncompleteReadError, ConnectionError):
                return
            if b"/hang" in line:
                await asyncio.sleep(10)
            elif b"/stream" in line:
                writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n")
                await writer.drain()
                await asyncio.sleep(0.2)
                writer.write(b"2\r\nde\r\n0\r\n\r\n")
            else:
                answer = line + b"|" + body
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s"
                             % (len(answer), answer))
            await writer.drain()

    def request(method, url, content=b"", timeout=None):
        return httpx.Request(method, "http://shoal" + url, content=content,
                             extensions={"timeout": {"read": timeout}})

    async def call(t, req):
        resp = await t.handle_async_request(req)
        try:
            return await resp.aread(), threading.get_ident()
        finally:
            await resp.aclose()

    with _serve_in_thread(handler) as path:
        t = AsyncSocketTransport(uds=path)
        big = b"q" * (3 << 20)
        me = threading.get_ident()
        assert run_direct(call(t, request("PUT", "/a", big))) == (b"PUT /a HTTP/1.1|" + big, me)
        assert run_direct(call(t, request("GET", "/b"))) == (b"GET /b HTTP/1.1|", me)
        assert len(connections) == 1 and len(t._idle) == 1  # kept alive, reused

        async def on_loop():
            body, where = await call(t, request("GET", "/c"))
            assert where == me and body == b"GET /c HTTP/1.1|"  # (asyncio.run: this thread)
            return t._idle[0].loop

        assert asyncio.run(on_loop()) is not None  # the same connection, non-blocking there
        assert len(connections) == 1

        # An answer whose head is read here and whose body is read on a loop.
        resp = run_direct(t.handle_async_request(request("GET", "/stream")))

        async def finish():
            to_loop(resp, asyncio.get_running_loop())
            ticks = 0

            async def tick():
                nonlocal ticks
                while True:
                    await asyncio.sleep(0.02)
                    ticks += 1

            ticker = asyncio.create_task(tick())
            body = await resp.aread()  # the server pauses 0.2 s mid-body
            ticker.cancel()
            return body, ticks

        body, ticks = asyncio.run(finish())
        assert body == b"abcde" and ticks >= 3  # the loop did not block on the socket
        assert len(connections) == 1

        with pytest.raises(httpx.ReadTimeout):
            run_direct(call(t, request("GET", "/hang", timeout=0.2)))
        assert run_direct(call(t, request("GET", "/d")))[0] == b"GET /d HTTP/1.1|"
        assert len(connections) == 2  # the timed-out connection was not reused
        asyncio.run(t.aclose())
    with pytest.raises(httpx.ConnectError):
        run_direct(call(AsyncSocketTransport(uds=path), request("GET", "/")))
