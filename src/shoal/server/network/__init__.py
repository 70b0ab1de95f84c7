"""Sandbox networking: one network namespace per sandbox, a routed /31 veth, NAT and policy in
nftables, and port tunnels. See docs/network.md. Imports only shoal.exception and
shoal.server.linux, so the control plane (and image builds) can use it without a web stack."""

from shoal.server.network.manager import Attachment, NetworkConfig, NetworkManager, instance_tag
from shoal.server.network.policy import Policy, PortSpec, validate_policy
from shoal.server.network.tunnels import TunnelInfo

__all__ = ["Attachment", "NetworkConfig", "NetworkManager", "Policy", "PortSpec", "TunnelInfo",
           "instance_tag", "validate_policy"]
