"""uvicorn's HTTP/1.1 protocol (httptools), with an answer's head and body sent in one write.

uvicorn writes a response's status line and headers as soon as the app sends
`http.response.start`, and the body with each `http.response.body`: two `send` calls on the
socket for a small answer, and the client may be woken for each. Here the head waits for the
next write and goes out with it (at once: no added latency when the body follows right away); a
head whose body is not ready in the same turn of the event loop goes out alone at the start of
the next turn. Later writes go straight to the socket, as before.
"""

from __future__ import annotations

import asyncio

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from shoal.server.http_layer import CUT_EXTENSION

JOIN_LIMIT = 64 << 10  # bytes: a head and a body up to this size go out joined


class _JoinedWrites:
    """A transport that holds a response's head until the next write, and sends both in one;
    everything else is the wrapped transport's. A head not followed by a write in the same turn
    of the loop goes out at the start of the next (a `call_soon`). What counts as a head (a
    write that starts with a status line and ends with the blank line) only decides timing:
    held bytes always go out first, in order."""

    __slots__ = ("transport", "loop", "held")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop):
        self.transport = transport
        self.loop = loop
        self.held: bytes | None = None

    def write(self, data) -> None:
        held = self.held
        if held is not None:
            self.held = None
            if len(data) <= JOIN_LIMIT:
                self.transport.write(held + data)
                return
            self.transport.write(held)  # (a big body is not copied to join a head)
        elif data[:9] == b"HTTP/1.1 " and data[-4:] == b"\r\n\r\n" and len(data) <= JOIN_LIMIT:
            self.held = bytes(data)
            self.loop.call_soon(self.flush)
            return
        if data:
            self.transport.write(data)

    def writelines(self, lines) -> None:
        for data in lines:
            self.write(data)

    def flush(self) -> None:
        held, self.held = self.held, None
        if held is not None and not self.transport.is_closing():
            self.transport.write(held)

    def get_write_buffer_size(self) -> int:
        return self.transport.get_write_buffer_size() + len(self.held or b"")

    def write_eof(self) -> None:
        self.flush()
        self.transport.write_eof()

    def close(self) -> None:
        self.flush()
        self.transport.close()

    def abort(self) -> None:
        self.held = None
        self.transport.abort()

    def __getattr__(self, name: str):
        return getattr(self.transport, name)


class HttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol on a transport that sends an answer's head with its body."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.transport = _JoinedWrites(transport, self.loop)  # type: ignore[assignment]

    def on_message_begin(self) -> None:
        super().on_message_begin()
        # A way for the request layer to end an answer that cannot be finished: the connection
        # is closed at once (http_layer.AnswerCut).
        self.scope["extensions"] = {CUT_EXTENSION: self._cut}

    def _cut(self) -> None:
        self.transport.abort()

    def handle_websocket_upgrade(self) -> None:
        # The WebSocket protocol gets the socket's own transport (what was held goes first).
        joined = self.transport
        if isinstance(joined, _JoinedWrites):
            joined.flush()
            self.transport = joined.transport
        super().handle_websocket_upgrade()
