"""uvicorn's HTTP/1.1 protocol (httptools), with an answer's head and body sent in one write.

uvicorn writes a response's status line and headers as soon as the app sends
`http.response.start`, and the body with each `http.response.body`: two `send` calls on the
socket for a small answer, and the client may be woken for each. Here the connection's writes
made in one turn of the event loop are joined and sent at the start of the next turn (a `call_soon`,
before the loop polls for I/O again): a head and the body sent right after it go out together,
and a streamed answer's later pieces each go out in their turn, as before.
"""

from __future__ import annotations

import asyncio

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol


class _JoinedWrites:
    """A transport whose writes made in one turn of the loop reach the socket in one write;
    everything else is the wrapped transport's."""

    __slots__ = ("transport", "loop", "held")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop):
        self.transport = transport
        self.loop = loop
        self.held: list[bytes] | None = None

    def write(self, data) -> None:
        if not data:
            return
        if self.held is None:
            self.held = [data]
            self.loop.call_soon(self.flush)
        else:
            self.held.append(data)

    def writelines(self, lines) -> None:
        for data in lines:
            self.write(data)

    def flush(self) -> None:
        held, self.held = self.held, None
        if held and not self.transport.is_closing():
            self.transport.write(held[0] if len(held) == 1 else b"".join(held))

    def get_write_buffer_size(self) -> int:
        return self.transport.get_write_buffer_size() + sum(map(len, self.held or ()))

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
    """uvicorn's httptools protocol on a transport that joins each turn's writes."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.transport = _JoinedWrites(transport, self.loop)  # type: ignore[assignment]

    def handle_websocket_upgrade(self) -> None:
        # The WebSocket protocol gets the socket's own transport (what was held goes first).
        joined = self.transport
        if isinstance(joined, _JoinedWrites):
            joined.flush()
            self.transport = joined.transport
        super().handle_websocket_upgrade()
