"""NetworkManager: each sandbox's network namespace, its veth, the nftables policy, and tunnels.

Topology (measured in RUNTIME-NOTES.md "Sandbox networking"): one routed /31 veth pair per
sandbox, no bridge. The host end `sh<tag><slot>` has the even address of the slot's /31, the
sandbox's `eth0` the odd one and a default route to it. The host masquerades what leaves toward
any other interface. Policy is keyed by input interface, in one nftables table per shoal instance
(`inet shoal_<tag>`); per-sandbox state is an element of a set or map, or a small chain for an
allow-list. IPv6 is disabled on the host ends (and dropped by the rules), so it is never a side
door.

Creating a namespace and veth costs several ms of `ip` calls, so a few are prepared ahead (a
pool): attaching a sandbox with the default policy then costs no external command at all.

Names carry the instance tag (a hash of SHOAL_HOME), so two servers on one host never touch each
other's objects and a restarted server finds its own: netns `shoal-<tag>-<slot>` (in
/run/netns), interfaces `sh<tag><slot>`, table `inet shoal_<tag>`. Which sandbox owns which slot
is kept in `<home>/network/state.json`; after a `kill -9`, `start` + `reconcile` remove what no
running sandbox owns.

Everything runs on the server's event loop; external commands are asyncio subprocesses with a
timeout. No lock: a slot is taken from the pool or allocated without awaiting in between.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import ipaddress
import json
import logging
import os
import socket
import ssl
from dataclasses import asdict, dataclass, field
from pathlib import Path

from shoal.exception import InvalidError
from shoal.server import linux as _linux
from shoal.server.network import ca as _ca
from shoal.server.network.policy import (ALWAYS_BLOCKED, DEFAULT_PRIVATE, Policy, PortSpec,
                                         parse_networks, subtract)
from shoal.server.network.tunnels import SandboxTunnels, TunnelInfo, server_contexts

log = logging.getLogger("shoal.network")

NETNS_DIR = Path("/run/netns")
CMD_TIMEOUT = 10.0
SLOTS_PER_POOL = 2048  # a /20 of /31s


def instance_tag(home: Path) -> str:
    """4 hex digits naming this SHOAL_HOME's network objects."""
    return hashlib.sha256(str(Path(home).resolve()).encode()).hexdigest()[:4]


def _env_list(name: str, default: list[str]) -> list[str]:
    raw = os.environ.get(name)
    if raw is None:
        return list(default)
    return [x.strip() for x in raw.split(",") if x.strip()]


def host_resolvers(path: str = "/etc/resolv.conf") -> list[str]:
    """The host's IPv4 name servers, minus loopback ones (a sandbox cannot reach the host's)."""
    found = []
    with contextlib.suppress(OSError):
        for line in Path(path).read_text().splitlines():
            parts = line.split()
            if len(parts) >= 2 and parts[0] == "nameserver":
                with contextlib.suppress(ValueError):
                    addr = ipaddress.ip_address(parts[1])
                    if addr.version == 4 and not addr.is_loopback:
                        found.append(str(addr))
    return found


@dataclass
class NetworkConfig:
    home: Path
    tag: str
    pool: ipaddress.IPv4Network  # sandbox addresses: /31 slots
    dns: list[str]  # resolvers written to the sandboxes' resolv.conf, and allowed on port 53
    blocked_private: list[str]  # operator-private networks, minus what the operator allows
    ct_limit: int = 4096  # tracked connections per sandbox
    pool_size: int = 4  # namespaces prepared ahead
    refill_delay: float = 0.5  # seconds between an attach and the pool refill it triggers
    tunnel_bind: str = "127.0.0.1"
    tunnel_host: str = ""  # the host name clients use in tunnel URLs (default: tunnel_bind)

    @classmethod
    def from_env(cls, home: Path) -> NetworkConfig:
        """SHOAL_NET_POOL (a /20 or larger IPv4 block), SHOAL_NET_DNS, SHOAL_NET_PRIVATE,
        SHOAL_NET_ALLOW_PRIVATE (comma-separated), SHOAL_NET_CT_LIMIT, SHOAL_NET_POOL_SIZE,
        SHOAL_NET_REFILL_DELAY, SHOAL_TUNNEL_BIND, SHOAL_TUNNEL_HOST. See docs/network.md."""
        tag = instance_tag(home)
        if os.environ.get("SHOAL_NET_POOL"):
            pool = ipaddress.IPv4Network(os.environ["SHOAL_NET_POOL"])
        else:  # one /20 of 100.64.0.0/10 (shared address space), picked by the tag
            base = int(ipaddress.IPv4Address("100.64.0.0")) + (int(tag, 16) % 1024) * 4096
            pool = ipaddress.IPv4Network(f"{ipaddress.IPv4Address(base)}/20")
        private = [str(n) for n in parse_networks(_env_list("SHOAL_NET_PRIVATE", DEFAULT_PRIVATE),
                                                  "SHOAL_NET_PRIVATE")]
        allow = [str(n) for n in parse_networks(_env_list("SHOAL_NET_ALLOW_PRIVATE", []),
                                                "SHOAL_NET_ALLOW_PRIVATE")]
        bind = os.environ.get("SHOAL_TUNNEL_BIND", "127.0.0.1")
        return cls(home=Path(home), tag=tag, pool=pool,
                   dns=_env_list("SHOAL_NET_DNS", host_resolvers()),
                   blocked_private=subtract(private, allow),
                   ct_limit=int(os.environ.get("SHOAL_NET_CT_LIMIT", "4096")),
                   pool_size=int(os.environ.get("SHOAL_NET_POOL_SIZE", "4")),
                   refill_delay=float(os.environ.get("SHOAL_NET_REFILL_DELAY", "0.5")),
                   tunnel_bind=bind, tunnel_host=os.environ.get("SHOAL_TUNNEL_HOST", bind))

    # --- names
    @property
    def prefix(self) -> str:
        return f"sh{self.tag}"

    @property
    def table(self) -> str:
        return f"shoal_{self.tag}"

    def netns(self, slot: int) -> str:
        return f"shoal-{self.tag}-{slot}"

    def host_if(self, slot: int) -> str:
        return f"{self.prefix}{slot}"

    def addrs(self, slot: int) -> tuple[str, str]:
        """(host end, sandbox end) of the slot's /31."""
        base = int(self.pool.network_address) + 2 * slot
        return str(ipaddress.IPv4Address(base)), str(ipaddress.IPv4Address(base + 1))

    @property
    def slots(self) -> int:
        return min(SLOTS_PER_POOL * 16, self.pool.num_addresses // 2)


@dataclass
class Attachment:
    netns_path: str  # for the OCI spec's network namespace "path"
    address: str  # the sandbox's IPv4 address
    resolv_conf: Path | None  # host file to bind-mount read-only at /etc/resolv.conf
    interface: str  # host end of the veth


@dataclass
class _Owned:
    slot: int
    outbound: str
    cidrs: list[str] = field(default_factory=list)
    ports: list[list] = field(default_factory=list)  # [port, kind]


class CommandError(RuntimeError):
    pass


async def run(argv: list[str], input: str | None = None, timeout: float = CMD_TIMEOUT,
              check: bool = True) -> str:
    proc = await asyncio.create_subprocess_exec(
        *argv, stdin=asyncio.subprocess.PIPE if input is not None else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        out, err = await asyncio.wait_for(
            proc.communicate(input.encode() if input is not None else None), timeout)
    except asyncio.TimeoutError:
        proc.kill()
        await proc.wait()
        raise CommandError(f"{argv[0]} timed out after {timeout} s") from None
    if check and proc.returncode != 0:
        raise CommandError(f"{' '.join(argv[:3])}: {err.decode(errors='replace').strip()}")
    return out.decode()


def _write_sysctl(path: str, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


def _elements(items: list[str]) -> str:
    return f"elements = {{ {', '.join(items)} }}" if items else ""


class NetworkManager:
    def __init__(self, config: NetworkConfig):
        self.cfg = config
        self.dir = config.home / "network"
        self.state_file = self.dir / "state.json"
        self.owned: dict[str, _Owned] = {}  # sandbox (or build) id -> its slot and policy
        self.pool: list[int] = []  # prepared, unowned slots
        self.preparing: set[int] = set()
        self.tunnels: dict[str, SandboxTunnels] = {}
        self.resolv_conf = self.dir / "resolv.conf"
        self.ca_dir = config.home / "ca"
        self._next_slot = 0
        self._refill: asyncio.Task | None = None
        self._tls: tuple[ssl.SSLContext, ssl.SSLContext] | None = None
        self.started = False

    # --- lifecycle
    async def start(self) -> None:
        """Install the rules, remove what no recorded owner has, prepare the pool (in the
        background). Call `reconcile` once the live sandboxes are known."""
        for tool in ("ip", "nft"):
            if not any(os.access(f"{d}/{tool}", os.X_OK) for d in ("/usr/sbin", "/sbin",
                                                                  "/usr/bin", "/bin")):
                raise RuntimeError(f"sandbox networking needs `{tool}` (Debian: apt-get install "
                                   "iproute2 nftables; scripts/install.sh does it)")
        self.dir.mkdir(parents=True, exist_ok=True)
        self._load()
        cfg = self.cfg
        resolvers = [d for d in cfg.dns if ipaddress.ip_address(d).version == 4][:3]
        self.resolv_conf.write_text("".join(f"nameserver {d}\n" for d in resolvers)
                                    + "options timeout:2 attempts:2\n")
        os.chmod(self.resolv_conf, 0o644)
        for uplink in await self._uplinks():
            _write_sysctl(f"/proc/sys/net/ipv4/conf/{uplink}/forwarding", "1")
        await self._nft(self._ruleset())
        await self._remove_unowned()
        names = [cfg.tunnel_host, cfg.tunnel_bind, "localhost", "127.0.0.1", socket.gethostname()]
        cert, key = await asyncio.to_thread(_ca.ensure_leaf, self.ca_dir,
                                            [n for n in names if n and n != "0.0.0.0"])
        self._tls = server_contexts(str(cert), str(key))
        self.started = True

    async def reconcile(self, live_ids: set[str]) -> None:
        """Release what no live sandbox owns; re-open tunnels of adopted sandboxes."""
        for sid in [s for s in self.owned if s not in live_ids]:
            await self.detach(sid)
        for sid, own in self.owned.items():
            if own.ports and sid not in self.tunnels:
                await self.open_tunnels(sid, tuple(PortSpec(p, k) for p, k in own.ports))
        self._kick()

    async def shutdown(self) -> None:
        """Server stop: close tunnels and the pool; running sandboxes keep their network (for the
        next server), and with none left the table goes too."""
        if self._refill:
            self._refill.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._refill
        for t in list(self.tunnels.values()):
            await t.close()
        self.tunnels.clear()
        for slot in self.pool:
            self._drop_netns(slot)
        self.pool.clear()
        if not self.owned:
            await self._nft(f"delete table inet {self.cfg.table}\n", check=False)

    # --- sandboxes
    async def attach(self, sandbox_id: str, policy: Policy) -> Attachment:
        if not self.started:
            raise RuntimeError("networking is not started")
        if self.pool:
            slot = self.pool.pop()
        else:
            slot = self._alloc()
            await self._prepare(slot)
        own = _Owned(slot, policy.outbound, list(policy.cidrs),
                     [[p.port, p.kind] for p in policy.ports])
        try:
            if policy.outbound != "all":
                await self._nft(self._policy_rules(slot, own))
        except BaseException:
            self._drop_netns(slot)
            raise
        self.owned[sandbox_id] = own
        self._save()
        # Not at once: the refill's `ip` processes would compete for the CPU with the sandbox
        # this attach is for, still starting (measured: +25-32 ms create -> first output at p50
        # on a loaded 2-core host, +4 ms with the refill after it; docs/network.md "Numbers").
        self._kick(self.cfg.refill_delay)
        host_if = self.cfg.host_if(slot)
        return Attachment(str(NETNS_DIR / self.cfg.netns(slot)), self.cfg.addrs(slot)[1],
                          self.resolv_conf if policy.outbound != "none" else None, host_if)

    async def detach(self, sandbox_id: str) -> None:
        """Close its tunnels, remove its policy and namespace (the kernel frees the veth)."""
        tun = self.tunnels.pop(sandbox_id, None)
        if tun:
            await tun.close()
        own = self.owned.pop(sandbox_id, None)
        if own is None:
            return
        self._save()
        if own.outbound != "all":
            hif = self.cfg.host_if(own.slot)
            t = self.cfg.table
            await self._nft(f"delete element inet {t} denied {{ \"{hif}\" }}\n"
                            if own.outbound == "none" else
                            f"delete element inet {t} allow {{ \"{hif}\" }}\n"
                            f"delete chain inet {t} allow_{own.slot}\n", check=False)
        self._drop_netns(own.slot)

    def address(self, sandbox_id: str) -> str | None:
        own = self.owned.get(sandbox_id)
        return self.cfg.addrs(own.slot)[1] if own else None

    async def open_tunnels(self, sandbox_id: str, ports: tuple[PortSpec, ...]
                           ) -> dict[int, TunnelInfo]:
        address = self.address(sandbox_id)
        if address is None:
            raise InvalidError(f"sandbox {sandbox_id} has no network interface for tunnels")
        tun = SandboxTunnels(address, self.cfg.tunnel_bind, self.cfg.tunnel_host, *self._tls)
        self.tunnels[sandbox_id] = tun
        try:
            await tun.open(ports)
        except BaseException:
            await self.close_tunnels(sandbox_id)
            raise
        return dict(tun.info)

    async def close_tunnels(self, sandbox_id: str) -> None:
        tun = self.tunnels.pop(sandbox_id, None)
        if tun:
            await tun.close()

    def tunnels_of(self, sandbox_id: str) -> dict[int, TunnelInfo]:
        tun = self.tunnels.get(sandbox_id)
        return dict(tun.info) if tun else {}

    # --- slots and namespaces
    def _alloc(self) -> int:
        used = {o.slot for o in self.owned.values()} | set(self.pool) | self.preparing
        for _ in range(self.cfg.slots):
            slot = self._next_slot
            self._next_slot = (self._next_slot + 1) % self.cfg.slots
            # A released slot's veth lingers until the kernel frees its namespace.
            if slot not in used and not Path(f"/sys/class/net/{self.cfg.host_if(slot)}").exists() \
                    and not (NETNS_DIR / self.cfg.netns(slot)).exists():
                self.preparing.add(slot)
                return slot
        raise RuntimeError(f"no free network slot in {self.cfg.pool}")

    async def _prepare(self, slot: int) -> None:
        """A namespace with lo up, eth0 addressed and a default route; the host end routed, with
        IPv4 forwarding on and IPv6 off. Three `ip` calls (RUNTIME-NOTES: lines of `ip -batch`
        cannot carry `-n`)."""
        cfg = self.cfg
        name, hif = cfg.netns(slot), cfg.host_if(slot)
        host, sbx = cfg.addrs(slot)
        try:
            await run(["ip", "netns", "add", name])
            await run(["ip", "-batch", "-"], f"link add {hif} type veth peer name eth0 netns "
                                              f"{name}\naddr add {host}/31 dev {hif}\n"
                                              f"link set {hif} up\n")
            _write_sysctl(f"/proc/sys/net/ipv6/conf/{hif}/disable_ipv6", "1")
            _write_sysctl(f"/proc/sys/net/ipv4/conf/{hif}/forwarding", "1")
            await run(["ip", "-n", name, "-batch", "-"],
                      f"addr add {sbx}/31 dev eth0\nlink set lo up\nlink set eth0 up\n"
                      f"route add default via {host}\n")
        except BaseException:
            self._drop_netns(slot)
            with contextlib.suppress(Exception):
                await run(["ip", "link", "del", hif], check=False)
            raise
        finally:
            self.preparing.discard(slot)

    def _drop_netns(self, slot: int) -> None:
        path = NETNS_DIR / self.cfg.netns(slot)
        with contextlib.suppress(OSError):
            _linux.umount(str(path), _linux.MNT_DETACH)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()

    def _kick(self, delay: float = 0.0) -> None:
        if self._refill is None or self._refill.done():
            self._refill = asyncio.ensure_future(self._fill_pool(delay))

    async def _fill_pool(self, delay: float = 0.0) -> None:
        if delay > 0:
            await asyncio.sleep(delay)
        failures = 0
        while len(self.pool) < self.cfg.pool_size and failures < 3:
            slot = self._alloc()
            try:
                await self._prepare(slot)
            except asyncio.CancelledError:
                raise
            except Exception:
                failures += 1
                log.exception("preparing network slot %s", slot)
                await asyncio.sleep(0.5 * failures)
                continue
            self.pool.append(slot)

    async def _remove_unowned(self) -> None:
        """Namespaces and interfaces of this instance that no recorded owner holds (a killed
        server's pool, or a crash between steps)."""
        cfg = self.cfg
        keep = {o.slot for o in self.owned.values()} | set(self.pool) | self.preparing
        prefix = f"shoal-{cfg.tag}-"
        for entry in (NETNS_DIR.iterdir() if NETNS_DIR.exists() else []):
            if entry.name.startswith(prefix):
                slot = entry.name[len(prefix):]
                if not (slot.isdigit() and int(slot) in keep):
                    self._drop_netns(int(slot)) if slot.isdigit() else None
        for entry in Path("/sys/class/net").iterdir():
            slot = entry.name[len(cfg.prefix):]
            if entry.name.startswith(cfg.prefix) and slot.isdigit() and int(slot) not in keep:
                await run(["ip", "link", "del", entry.name], check=False)

    async def _uplinks(self) -> list[str]:
        out = await run(["ip", "-j", "route", "show", "default"], check=False)
        try:
            return sorted({r["dev"] for r in json.loads(out or "[]") if "dev" in r})
        except ValueError:
            return []

    # --- nftables
    async def _nft(self, batch: str, check: bool = True) -> None:
        await run(["nft", "-f", "-"], batch, check=check)

    def _ruleset(self) -> str:
        cfg = self.cfg
        t, p = cfg.table, f'"{cfg.prefix}*"'
        always = ALWAYS_BLOCKED + [str(cfg.pool)]
        dns = [d for d in cfg.dns if ipaddress.ip_address(d).version == 4]
        lines = [
            # Re-created whole: what a killed server left is replaced, not merged.
            f"add table inet {t}", f"delete table inet {t}",
            f"table inet {t} {{",
            "  set ctl { type ifname; size 65535; flags dynamic; }",
            f"  set always4 {{ type ipv4_addr; flags interval; auto-merge; {_elements(always)} }}",
            f"  set private4 {{ type ipv4_addr; flags interval; auto-merge; "
            f"{_elements(cfg.blocked_private)} }}",
            f"  set dns4 {{ type ipv4_addr; {_elements(dns)} }}",
            "  set denied { type ifname; }",
            "  map allow { type ifname : verdict; }",
            "  chain input {",
            "    type filter hook input priority filter - 5; policy accept;",
            f"    iifname {p} ct state established,related accept",
            f"    iifname {p} drop",
            "  }",
            "  chain forward {",
            "    type filter hook forward priority filter - 5; policy accept;",
            f"    oifname {p} ct state established,related accept",
            f"    oifname {p} drop",
            f"    iifname {p} jump from_sandbox",
            "  }",
            "  chain from_sandbox {",
            "    meta nfproto ipv6 drop",
            "    fib saddr . iif oif missing drop",
            "    ct state established,related accept",
            f"    ct state new add @ctl {{ iifname ct count over {cfg.ct_limit} }} drop",
            "    ip daddr @always4 drop",
            "    iifname @denied drop",
            "    ip daddr @dns4 udp dport 53 accept",
            "    ip daddr @dns4 tcp dport 53 accept",
            "    ip daddr @private4 drop",
            "    iifname vmap @allow",
            "    accept",
            "  }",
            "  chain postrouting {",
            "    type nat hook postrouting priority srcnat; policy accept;",
            f"    ip saddr {cfg.pool} oifname != {p} masquerade",
            "  }",
            "}",
        ]
        text = "\n".join(lines) + "\n"
        for own in self.owned.values():
            text += self._policy_rules(own.slot, own)
        return text

    def _policy_rules(self, slot: int, own: _Owned) -> str:
        t, hif = self.cfg.table, self.cfg.host_if(slot)
        if own.outbound == "all":
            return ""
        if own.outbound == "none":
            return f'add element inet {t} denied {{ "{hif}" }}\n'
        cidrs = f"    ip daddr {{ {', '.join(own.cidrs)} }} accept\n" if own.cidrs else ""
        return (f"table inet {t} {{\n  chain allow_{slot} {{\n{cidrs}    drop\n  }}\n}}\n"
                f'add element inet {t} allow {{ "{hif}" : jump allow_{slot} }}\n')

    # --- state file
    def _load(self) -> None:
        with contextlib.suppress(FileNotFoundError, ValueError, TypeError):
            data = json.loads(self.state_file.read_text())
            self.owned = {sid: _Owned(**o) for sid, o in data.get("owned", {}).items()}
            self._next_slot = int(data.get("next_slot", 0)) % self.cfg.slots

    def _save(self) -> None:
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps({"owned": {s: asdict(o) for s, o in self.owned.items()},
                                   "next_slot": self._next_slot}))
        os.replace(tmp, self.state_file)


def leftovers(home: Path) -> list[str]:
    """This home's network objects that exist now (for tests: none once its server stopped)."""
    tag = instance_tag(home)
    found = [f"netns {p.name}" for p in (NETNS_DIR.iterdir() if NETNS_DIR.exists() else [])
             if p.name.startswith(f"shoal-{tag}-")]
    found += [f"interface {p.name}" for p in Path("/sys/class/net").iterdir()
              if p.name.startswith(f"sh{tag}")]
    import subprocess

    out = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True, timeout=10)
    found += [f"nft {line.strip()}" for line in out.stdout.splitlines()
              if line.strip() == f"table inet shoal_{tag}"]
    return found
