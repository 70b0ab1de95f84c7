"""Tunnels: how a client outside reaches a port of a sandbox (Modal's `modal.Tunnel`).

    sb = shoal.Sandbox.create("python3", "-m", "http.server", "8000", encrypted_ports=[8000])
    t = sb.tunnels()[8000]
    httpx.get(t.url, verify=shoal_ca_path)   # `shoal ca` prints the CA's path

A tunnel is a listener on the shoal host (SHOAL_TUNNEL_BIND, default 127.0.0.1) that forwards
to the sandbox's port; encrypted ones terminate TLS with a certificate from shoal's local CA.
Tunnels end with their sandbox.
"""

from __future__ import annotations

from dataclasses import dataclass

from shoal.exception import InvalidError


@dataclass(frozen=True)
class Tunnel:
    """A port forwarded from the host to a sandbox."""

    host: str
    port: int
    unencrypted_host: str | None = None
    unencrypted_port: int | None = None

    @property
    def url(self) -> str:
        """https://host[:port] of the TLS endpoint."""
        return f"https://{self.host}" + ("" if self.port == 443 else f":{self.port}")

    @property
    def tls_socket(self) -> tuple[str, int]:
        """(host, port) of the TLS endpoint."""
        return self.host, self.port

    @property
    def tcp_socket(self) -> tuple[str, int]:
        """(host, port) of the raw TCP endpoint; only for `unencrypted_ports`, else InvalidError."""
        if self.unencrypted_host is None or self.unencrypted_port is None:
            raise InvalidError("this tunnel has no raw TCP endpoint: list the port in "
                               "unencrypted_ports at Sandbox.create")
        return self.unencrypted_host, self.unencrypted_port
