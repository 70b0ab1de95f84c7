"""Port tunnels: a listener on the host (SHOAL_TUNNEL_BIND, default 127.0.0.1, a port the kernel
picks) that forwards each connection to a port of the sandbox's address, terminating TLS with the
local CA's certificate for encrypted ports. A tunnel lives as long as its sandbox's network."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from dataclasses import dataclass

from shoal.server.network.policy import PortSpec

log = logging.getLogger("shoal.network")
CONNECT_TIMEOUT = 10.0
CHUNK = 256 * 1024


@dataclass(frozen=True)
class TunnelInfo:
    """Modal's Tunnel fields: TLS at (host, port); raw TCP at (unencrypted_host, unencrypted_port)
    for unencrypted ports."""
    host: str
    port: int
    unencrypted_host: str | None = None
    unencrypted_port: int | None = None


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(CHUNK):
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
    except (ConnectionError, OSError):
        pass


class SandboxTunnels:
    """The listeners of one sandbox."""

    def __init__(self, target: str, bind: str, public_host: str,
                 tls: ssl.SSLContext | None, h2_tls: ssl.SSLContext | None):
        self.target = target
        self.bind = bind
        self.public_host = public_host
        self.tls = tls
        self.h2_tls = h2_tls
        self.servers: list[asyncio.base_events.Server] = []
        self.conns: set[asyncio.Task] = set()
        self.info: dict[int, TunnelInfo] = {}

    async def _listen(self, port: int, ctx: ssl.SSLContext | None) -> int:
        async def handle(reader, writer):
            task = asyncio.current_task()
            self.conns.add(task)
            try:
                async with asyncio.timeout(CONNECT_TIMEOUT):
                    up_r, up_w = await asyncio.open_connection(self.target, port)
            except (OSError, TimeoutError):
                writer.close()
                self.conns.discard(task)
                return
            try:
                await asyncio.gather(_pump(reader, up_w), _pump(up_r, writer))
            finally:
                for w in (writer, up_w):
                    w.close()
                self.conns.discard(task)

        server = await asyncio.start_server(handle, self.bind, 0, ssl=ctx, reuse_address=True)
        self.servers.append(server)
        return server.sockets[0].getsockname()[1]

    async def open(self, ports: tuple[PortSpec, ...]) -> None:
        for p in ports:
            ctx = self.h2_tls if p.kind == "h2" else self.tls
            tls_port = await self._listen(p.port, ctx)
            raw = await self._listen(p.port, None) if p.kind == "unencrypted" else None
            self.info[p.port] = TunnelInfo(self.public_host, tls_port,
                                           self.public_host if raw else None, raw)

    async def close(self) -> None:
        for s in self.servers:
            s.close()
        for t in list(self.conns):
            t.cancel()
        for s in self.servers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(s.wait_closed(), 2)
        self.servers.clear()
        self.info.clear()


def server_contexts(cert: str, key: str) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """(HTTP/1.1 context, context offering h2 by ALPN) for the tunnels' TLS listeners."""
    plain = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    plain.load_cert_chain(cert, key)
    h2 = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    h2.load_cert_chain(cert, key)
    h2.set_alpn_protocols(["h2", "http/1.1"])
    return plain, h2
