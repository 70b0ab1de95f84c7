"""The server's HTTP protocol (shoal/server/http_protocol.py) in a real uvicorn on a Unix socket:
an answer's head and the body sent with it reach the socket in one write; later pieces of a
streamed answer in their own; a head whose body comes later is not held for it; a connection
the answer closes gets everything first."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import tempfile
from asyncio import selector_events
from pathlib import Path

import logging

import pytest
import uvicorn

from shoal.server.http_layer import AnswerCut, RequestLayer
from shoal.server.http_protocol import HttpProtocol


async def _app(scope, receive, send):
    if scope["type"] != "http":
        return
    if scope["path"] == "/small":
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-length", b"5")]})
        await send({"type": "http.response.body", "body": b"hello"})
    elif scope["path"] == "/later":
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await asyncio.sleep(0.5)
        await send({"type": "http.response.body", "body": b"late", "more_body": False})
    elif scope["path"] == "/big":
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-length", b"200000")]})
        await send({"type": "http.response.body", "body": b"x" * 200000})
    elif scope["path"] == "/stream":
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"first", "more_body": True})
        await asyncio.sleep(0.05)
        await send({"type": "http.response.body", "body": b"second", "more_body": False})


@contextlib.asynccontextmanager
async def _server(app=_app):
    with tempfile.TemporaryDirectory(prefix="http-protocol-test-") as tmp:
        path = str(Path(tmp) / "s.sock")
        server = uvicorn.Server(uvicorn.Config(app, uds=path, http=HttpProtocol, lifespan="off",
                                               log_config=None, access_log=False))
        task = asyncio.create_task(server.serve())
        while not server.started:
            await asyncio.sleep(0.01)
        try:
            yield path
        finally:
            server.should_exit = True
            await task


@pytest.fixture
def writes(monkeypatch):
    """What the server's socket transports were asked to write, one entry a write (the client
    below uses plain socket calls, no transport)."""
    seen: list[bytes] = []
    real = selector_events._SelectorSocketTransport.write

    def write(self, data):
        seen.append(bytes(data))
        return real(self, data)
    monkeypatch.setattr(selector_events._SelectorSocketTransport, "write", write)
    return seen


async def _exchange(path: str, request: bytes, until: bytes, at_least: int = 0) -> bytes:
    loop = asyncio.get_running_loop()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.setblocking(False)
        await loop.sock_connect(sock, path)
        await loop.sock_sendall(sock, request)
        got = b""
        async with asyncio.timeout(5):
            while not got.endswith(until) or len(got) < at_least:
                data = await loop.sock_recv(sock, 65536)
                if not data:
                    break
                got += data
        return got


def test_a_small_answer_is_one_write_and_a_streamed_one_a_write_a_turn(writes):
    async def main():
        async with _server() as path:
            small = await _exchange(path, b"GET /small HTTP/1.1\r\nhost: x\r\n\r\n", b"hello")
            assert small.startswith(b"HTTP/1.1 200 OK\r\n") and small.endswith(b"\r\n\r\nhello")
            assert writes == [small]  # status line, headers and body: one write

            writes.clear()
            streamed = await _exchange(path, b"GET /stream HTTP/1.1\r\nhost: x\r\n\r\n",
                                       b"0\r\n\r\n")
            assert streamed.endswith(b"5\r\nfirst\r\n6\r\nsecond\r\n0\r\n\r\n")
            # The head with the piece sent in the same turn; the later piece with the end.
            assert len(writes) == 2
            assert writes[0].startswith(b"HTTP/1.1 200 OK\r\n")
            assert writes[0].endswith(b"5\r\nfirst\r\n")
            assert writes[1] == b"6\r\nsecond\r\n0\r\n\r\n"

            writes.clear()  # a head whose body is not ready goes out on its own, at once
            loop = asyncio.get_running_loop()
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.setblocking(False)
                await loop.sock_connect(sock, path)
                await loop.sock_sendall(sock, b"GET /later HTTP/1.1\r\nhost: x\r\n\r\n")
                async with asyncio.timeout(0.3):
                    head = await loop.sock_recv(sock, 65536)
                assert head.startswith(b"HTTP/1.1 200 OK\r\n") and head.endswith(b"\r\n\r\n")
            await asyncio.sleep(0.5)

            writes.clear()  # a big body is not copied to join its head
            big = await _exchange(path, b"GET /big HTTP/1.1\r\nhost: x\r\n\r\n", b"x", 200000)
            assert len(big) > 200000 and len(writes) == 2 and len(writes[1]) == 200000

            writes.clear()  # an answer that closes the connection is all there before the end
            closing = await _exchange(
                path, b"GET /small HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n", b"hello")
            assert closing.endswith(b"hello") and len(writes) == 1
    asyncio.run(main())


async def _cut_midway(scope, receive, send):
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-length", b"100")]})
    await send({"type": "http.response.body", "body": b"x" * 10, "more_body": True})
    raise AnswerCut("the sandbox ended mid-answer")


def test_an_answer_cut_midway_closes_the_connection_with_one_warning(caplog):
    """A route that cannot finish an answer it began (AnswerCut): the client gets the part sent
    and then the connection's end, never a complete-looking answer; the log gets one warning
    line from the request layer and nothing from uvicorn (no traceback, no "returned without
    completing")."""
    async def main():
        async with _server(RequestLayer(_cut_midway)) as path:
            # (_exchange reads until the connection ends: a connection left open times out)
            got = await _exchange(path, b"GET /file HTTP/1.1\r\nhost: x\r\n\r\n", b"never")
            assert got.startswith(b"HTTP/1.1 200 OK\r\n") and got.endswith(b"\r\n\r\n" + b"x" * 10)
            await asyncio.sleep(0.1)
    with caplog.at_level(logging.INFO):
        asyncio.run(main())
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == [], [r.getMessage() for r in errors]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == ["GET /file: the sandbox ended mid-answer; connection closed"]
