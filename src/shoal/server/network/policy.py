"""What a sandbox may reach: validated from the request, enforced by manager.py's nft rules."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

from shoal.exception import InvalidError

# Never reachable from a sandbox, whatever its policy or the operator's configuration: "this"
# network, loopback, link-local (cloud metadata at 169.254.169.254), multicast, reserved, broadcast.
ALWAYS_BLOCKED = ["0.0.0.0/8", "127.0.0.0/8", "169.254.0.0/16", "224.0.0.0/4", "240.0.0.0/4"]
# Blocked unless the operator allows part of them (SHOAL_NET_ALLOW_PRIVATE): RFC 1918.
DEFAULT_PRIVATE = ["10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16"]


@dataclass(frozen=True)
class PortSpec:
    port: int
    kind: str  # "encrypted" (TLS terminated on the host), "unencrypted" (TLS and raw TCP), "h2"


@dataclass(frozen=True)
class Policy:
    """outbound: "all" (NAT'd, minus what is never reachable), "cidrs" (only `cidrs`, plus DNS to
    shoal's resolvers), or "none" (an interface for tunnels, nothing outbound)."""
    outbound: str = "all"
    cidrs: tuple[str, ...] = ()
    ports: tuple[PortSpec, ...] = field(default_factory=tuple)


def parse_networks(values, what: str) -> list[ipaddress.IPv4Network]:
    nets = []
    for v in values:
        try:
            net = ipaddress.ip_network(str(v).strip(), strict=False)
        except ValueError:
            raise InvalidError(f"{what}: {v!r} is not a CIDR block (write e.g. '203.0.113.0/24' "
                               "or '198.51.100.7/32')") from None
        if net.version != 4:
            raise InvalidError(f"{what}: {v!r} is IPv6, and sandboxes have no IPv6 (docs/"
                               "network.md); list IPv4 blocks only")
        nets.append(net)
    return nets


def validate_policy(block_network: bool, cidr_allowlist, encrypted_ports=(), unencrypted_ports=(),
                    h2_ports=(), outbound_domain_allowlist=None) -> Policy | None:
    """The policy of a create request, or None: no network namespace of shoal's, only loopback.
    Raises InvalidError naming the argument that is wrong."""
    if outbound_domain_allowlist:
        raise InvalidError("outbound_domain_allowlist is not supported by shoal yet: resolve the "
                           "names yourself and pass their addresses as cidr_allowlist")
    if block_network and cidr_allowlist is not None:
        raise InvalidError("block_network=True and cidr_allowlist contradict each other: pass one")
    ports: list[PortSpec] = []
    seen: set[int] = set()
    for kind, values in (("encrypted", encrypted_ports), ("unencrypted", unencrypted_ports),
                         ("h2", h2_ports)):
        for p in values or ():
            if not isinstance(p, int) or isinstance(p, bool) or not 0 < p < 65536:
                raise InvalidError(f"{kind}_ports: {p!r} is not a TCP port (1-65535)")
            if p in seen:
                raise InvalidError(f"port {p} is listed twice across encrypted_ports, "
                                   "unencrypted_ports and h2_ports")
            seen.add(p)
            ports.append(PortSpec(p, kind))
    if cidr_allowlist is not None:
        if isinstance(cidr_allowlist, str):
            raise InvalidError("cidr_allowlist must be a list of CIDR strings, not one string")
        nets = parse_networks(cidr_allowlist, "cidr_allowlist")
        return Policy("cidrs", tuple(str(n) for n in nets), tuple(ports))
    if block_network:
        return Policy("none", (), tuple(ports)) if ports else None
    return Policy("all", (), tuple(ports))


def subtract(blocked: list[str], allowed: list[str]) -> list[str]:
    """`blocked` minus `allowed`, as a list of CIDRs."""
    result = [ipaddress.ip_network(b) for b in blocked]
    for a in (ipaddress.ip_network(x) for x in allowed):
        nxt = []
        for b in result:
            if a.version != b.version or not b.overlaps(a):
                nxt.append(b)
            elif a.supernet_of(b):
                continue
            else:
                nxt.extend(b.address_exclude(a))
        result = nxt
    return [str(n) for n in sorted(result)]
