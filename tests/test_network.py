"""Sandbox networking against a test "outside world" (tests/networld.py): outbound NAT and DNS,
block_network, cidr_allowlist, what is never reachable, tunnels, and clean-up after kill -9.

Packets go only to loopback and to namespaces this session made (the world, the private host);
every "must be blocked" target is one of those, and each test first shows the host reaches it.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import ssl
import subprocess
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from conftest import TEST_RUNTIME

import shoal
from shoal.exception import InvalidError, SandboxTerminatedError
from conftest import shoal_cli

PROBE = r'''
import json, socket, sys, threading, urllib.request
targets = json.loads(sys.argv[1])
result = {}
def probe(key, host, port):
    s = socket.socket()
    s.settimeout(1.5)
    try:
        s.connect((host, port))
        result[key] = "open"
    except socket.timeout:
        result[key] = "timeout"
    except OSError as e:
        result[key] = type(e).__name__
    finally:
        s.close()
ts = [threading.Thread(target=probe, args=(k, h, p)) for k, (h, p) in targets.items()]
[t.start() for t in ts]
[t.join() for t in ts]
print(json.dumps(result))
'''

FETCH = r'''
import sys, urllib.request
try:
    print(urllib.request.urlopen(sys.argv[1], timeout=4).read().decode())
except Exception as e:
    print("error", type(e).__name__, e)
'''


def run_py(sb, code: str, *args: str) -> str:
    p = sb.exec("python3", "-c", code, *args)
    out, err = p.stdout.read(), p.stderr.read()
    assert p.wait() == 0, err
    return out.strip()


def probe(sb, targets: dict[str, tuple[str, int]]) -> dict[str, str]:
    return json.loads(run_py(sb, PROBE, json.dumps(targets)))


def host_can_connect(host: str, port: int) -> bool:
    try:
        socket.create_connection((host, port), timeout=2).close()
        return True
    except OSError:
        return False


def host_addresses() -> list[str]:
    out = subprocess.run(["ip", "-j", "-4", "addr"], capture_output=True, text=True).stdout
    return [a["local"] for i in json.loads(out) for a in i.get("addr_info", [])
            if a.get("scope") == "global" and i["ifname"] != "lo"
            and not i["ifname"].startswith("swt")]


def sandbox_address(sb, world) -> str:
    # A UDP connect picks the source address and sends nothing.
    return run_py(sb, "import socket,sys; s=socket.socket(2,2); s.connect((sys.argv[1],9)); "
                      "print(s.getsockname()[0])", world.world_ip)


@pytest.fixture(scope="module")
def host_listener():
    """A TCP listener on every host address (standing for the shoal server on TCP and any other
    host service)."""
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("0.0.0.0", 0))
    srv.listen(64)
    stop = threading.Event()

    def accept():
        srv.settimeout(0.2)
        while not stop.is_set():
            try:
                srv.accept()[0].close()
            except OSError:
                pass

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    yield srv.getsockname()[1]
    stop.set()
    t.join()
    srv.close()


@pytest.fixture(scope="module")
def peer(app, world):
    """A sandbox serving HTTP on port 8000: the "other sandbox" that must be unreachable."""
    sb = shoal.Sandbox.create("python3", "-m", "http.server", "8000", app=app, timeout=300,
                              readiness_probe=shoal.Probe.with_tcp(8000))
    sb.wait_until_ready(timeout=30)
    yield sb, sandbox_address(sb, world)
    sb.terminate()


def test_world_answers_the_host(world, server):
    """Preconditions of every test below: the host reaches the world and the private host."""
    for ip in (world.world_ip, world.world_ip2):
        assert urllib.request.urlopen(f"http://{ip}/", timeout=3).read() == b"world-ok"
    ips = [world.private_ip]
    # The metadata address has one route per host; a concurrent test session may hold it.
    if world.private_ip in subprocess.run(["ip", "route", "show", world.metadata_ip],
                                          capture_output=True, text=True).stdout:
        ips.append(world.metadata_ip)
    for ip in ips:
        assert urllib.request.urlopen(f"http://{ip}/", timeout=3).read() == b"private-ok"
    import struct
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(3)
    s.sendto(struct.pack(">HHHHHH", 7, 0x100, 1, 0, 0, 0) + b"\x05world\x04test\x00\x00\x01\x00\x01",
             (world.world_ip, 53))
    assert socket.inet_ntoa(s.recv(512)[-4:]) == world.world_ip


def test_default_reaches_the_world_by_address_and_by_name(app, world):
    sb = shoal.Sandbox.create(app=app, timeout=120)
    try:
        assert run_py(sb, FETCH, f"http://{world.world_ip}/") == "world-ok"
        assert run_py(sb, FETCH, "http://world.test/") == "world-ok"
        resolv = sb.exec("cat", "/etc/resolv.conf").stdout.read()
        assert f"nameserver {world.world_ip}" in resolv
        # IPv6: none but link-local, and no route.
        v6 = sb.exec("cat", "/proc/net/if_inet6").stdout.read().split("\n")
        assert all(line.split()[0].startswith("fe80") or line.split()[-1] == "lo"
                   for line in v6 if line.strip())
    finally:
        sb.terminate()


def test_block_network_has_only_loopback(app, world):
    sb = shoal.Sandbox.create(app=app, timeout=120, block_network=True)
    try:
        ifaces = run_py(sb, "print([l.split(':')[0].strip() for l in "
                            "open('/proc/net/dev').read().splitlines()[2:]])")
        assert ifaces == "['lo']"
        res = probe(sb, {"world": (world.world_ip, 80)})
        assert res["world"] == "OSError" or res["world"] != "open", res
        assert run_py(sb, FETCH, f"http://{world.world_ip}/").startswith("error")
    finally:
        sb.terminate()


@pytest.mark.parametrize("mode", ["default", "allow-all-cidrs"])
def test_never_reachable(app, world, peer, host_listener, mode):
    peer_sb, peer_ip = peer
    targets = {"private": (world.private_ip, 80), "metadata": (world.metadata_ip, 80),
               "peer": (peer_ip, 8000), "host-loopback": ("127.0.0.1", host_listener)}
    for i, addr in enumerate(host_addresses()):
        targets[f"host-{i}"] = (addr, host_listener)
    # Preconditions: from the host, every target answers.
    for key, (host, port) in targets.items():
        assert host_can_connect(host, port), key
    kw = {"cidr_allowlist": ["0.0.0.0/0"]} if mode == "allow-all-cidrs" else {}
    sb = shoal.Sandbox.create(app=app, timeout=120, **kw)
    try:
        ip = sandbox_address(sb, world)
        gateway = ip.rsplit(".", 1)[0] + "." + str(int(ip.rsplit(".", 1)[1]) - 1)
        targets["host-veth"] = (gateway, host_listener)
        assert host_can_connect(gateway, host_listener)
        targets["world"] = (world.world_ip, 80)  # control: the sandbox does have a network
        res = probe(sb, targets)
        assert res.pop("world") == "open", res
        # 127.0.0.1 is the sandbox's own loopback, where nothing listens.
        assert res.pop("host-loopback") == "ConnectionRefusedError", res
        assert all(v != "open" for v in res.values()), res
    finally:
        sb.terminate()


def test_cidr_allowlist_allows_exactly_what_it_lists(app, world):
    sb = shoal.Sandbox.create(app=app, timeout=120, cidr_allowlist=[f"{world.world_ip}/32"])
    try:
        assert run_py(sb, FETCH, f"http://{world.world_ip}/") == "world-ok"
        assert run_py(sb, FETCH, "http://world.test/") == "world-ok"  # DNS stays allowed
        res = probe(sb, {"listed": (world.world_ip, 80), "unlisted": (world.world_ip2, 80)})
        assert res == {"listed": "open", "unlisted": "timeout"}
    finally:
        sb.terminate()
    sb = shoal.Sandbox.create(app=app, timeout=120, cidr_allowlist=[])
    try:
        assert probe(sb, {"w": (world.world_ip, 80)}) == {"w": "timeout"}
    finally:
        sb.terminate()


@pytest.mark.parametrize("kw, words", [
    ({"cidr_allowlist": ["not-a-cidr"]}, "not a CIDR"),
    ({"cidr_allowlist": ["10.0.0.0/33"]}, "not a CIDR"),
    ({"cidr_allowlist": ["2001:db8::/32"]}, "IPv6"),
    ({"cidr_allowlist": "1.2.3.0/24"}, "list"),
    ({"block_network": True, "cidr_allowlist": ["1.2.3.0/24"]}, "contradict"),
    ({"encrypted_ports": [70000]}, "not a TCP port|less than or equal to 65535"),
    ({"outbound_domain_allowlist": ["pypi.org"]}, "not supported"),
])
def test_invalid_network_arguments(app, kw, words):
    with pytest.raises(InvalidError, match=words):
        shoal.Sandbox.create(app=app, timeout=60, **kw)


@pytest.mark.parametrize("kw", [{}, {"block_network": True}])
def test_tcp_probe_runs_in_the_sandboxs_namespace(app, host_listener, kw):
    """Probe.with_tcp(port) connects to the port inside the sandbox: a host service listening on
    the same port at the host's 127.0.0.1 does not make the sandbox ready."""
    port = host_listener
    assert host_can_connect("127.0.0.1", port)
    sb = shoal.Sandbox.create(app=app, timeout=120, readiness_probe=shoal.Probe.with_tcp(port),
                              **kw)
    try:
        with pytest.raises(shoal.exception.TimeoutError):
            sb.wait_until_ready(timeout=2)
        sb.exec("python3", "-c", "import socket,sys,time; s=socket.socket(); "
                "s.bind(('127.0.0.1', int(sys.argv[1]))); s.listen(); time.sleep(60)", str(port))
        sb.wait_until_ready(timeout=20)
    finally:
        sb.terminate()


def test_image_build_steps_get_a_natd_namespace_without_net_raw(app, world, host_listener):
    """A build step reaches the world by address and by name, never the host, the private
    networks or the metadata address, and has no CAP_NET_RAW (image builds: docs/network.md)."""
    import base64
    import uuid

    targets = {"world": (world.world_ip, 80), "private": (world.private_ip, 80),
               "metadata": (world.metadata_ip, 80)}
    for i, addr in enumerate(host_addresses()):
        targets[f"host-{i}"] = (addr, host_listener)
    for key, (host, port) in targets.items():
        assert host_can_connect(host, port), key
    script = base64.b64encode(PROBE.encode()).decode()
    image = shoal.Image.debian_slim().run_commands(
        f"echo {uuid.uuid4().hex} > /marker",
        f"echo {script} | base64 -d > /tmp/probe.py",
        f"python3 /tmp/probe.py '{json.dumps(targets)}' > /netprobe.json",
        "getent hosts world.test > /dns.txt || true",
        "grep CapBnd /proc/self/status > /capbnd.txt")
    sb = shoal.Sandbox.create(app=app, image=image, timeout=120, block_network=True)
    try:
        res = json.loads(sb.exec("cat", "/netprobe.json").stdout.read())
        assert res.pop("world") == "open", res
        assert all(v != "open" for v in res.values()), res
        assert world.world_ip in sb.exec("cat", "/dns.txt").stdout.read()
        capbnd = int(sb.exec("cat", "/capbnd.txt").stdout.read().split()[1], 16)
        assert capbnd and not capbnd & (1 << 13), hex(capbnd)  # CAP_NET_RAW is bit 13
    finally:
        sb.terminate()


def test_conntrack_entries_are_bounded_per_sandbox(app, server, world):
    """SHOAL_NET_CT_LIMIT bounds the connections one sandbox has tracked (new ones beyond it are
    dropped, UDP too), so it cannot fill the host's shared conntrack table."""
    flows = r'''
import select, socket, struct, sys
q = struct.pack(">HHHHHH", 7, 0x100, 1, 0, 0, 0) + b"\x05world\x04test\x00\x00\x01\x00\x01"
socks = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(int(sys.argv[2]))]
for s in socks:
    s.sendto(q, (sys.argv[1], 53))
answered, left = set(), set(socks)
while left:
    ready = select.select(list(left), [], [], 2)[0]
    if not ready:
        break
    for s in ready:
        s.recv(512)
        answered.add(s)
        left.discard(s)
print(len(answered))
'''

    def answered() -> int:
        sb = shoal.Sandbox.create(app=app, timeout=120)
        try:
            return int(run_py(sb, flows, world.world_ip, "40"))
        finally:
            sb.terminate()

    assert answered() == 40  # control: under the default limit (4096) every flow is answered
    os.environ["SHOAL_NET_CT_LIMIT"] = "16"
    try:
        server.restart()
        n = answered()
        assert 0 < n <= 16, n
    finally:
        del os.environ["SHOAL_NET_CT_LIMIT"]
        server.restart()


def test_tunnels_plain_and_tls(app):
    ca = shoal_cli("ca").stdout.strip()
    assert Path(ca).is_file()
    sb = shoal.Sandbox.create("python3", "-m", "http.server", "8000", app=app, timeout=120,
                              unencrypted_ports=[8000], encrypted_ports=[8001],
                              readiness_probe=shoal.Probe.with_tcp(8000))
    try:
        sb.wait_until_ready(timeout=30)
        tunnels = sb.tunnels()
        assert set(tunnels) == {8000, 8001}
        t = tunnels[8000]
        assert isinstance(t, shoal.Tunnel) and t.host == "127.0.0.1"
        host, port = t.tcp_socket
        body = urllib.request.urlopen(f"http://{host}:{port}/", timeout=5).read()
        assert b"Directory listing" in body
        ctx = ssl.create_default_context(cafile=ca)
        body = urllib.request.urlopen(t.url + "/", timeout=5, context=ctx).read()
        assert b"Directory listing" in body
        with pytest.raises(urllib.error.URLError) as e:  # not trusted without shoal's CA
            urllib.request.urlopen(t.url + "/", timeout=5,
                                   context=ssl.create_default_context()).read()
        assert isinstance(e.value.reason, ssl.SSLCertVerificationError)
        with pytest.raises(InvalidError):
            tunnels[8001].tcp_socket
        ports = [t.tls_socket[1], port, tunnels[8001].port]
    finally:
        sb.terminate()
    for p in ports:
        assert not host_can_connect("127.0.0.1", p), p
    with pytest.raises(SandboxTerminatedError):
        sb.tunnels()


def test_kill9_restart_removes_what_no_sandbox_owns(app, server, world):
    from shoal.server.network.manager import instance_tag

    home = server.home
    tag = instance_tag(home)
    sb = shoal.Sandbox.create(app=app, timeout=120)
    ended = shoal.Sandbox.create(app=app, timeout=120)
    state = json.loads((home / "network" / "state.json").read_text())
    gone_slot = state["owned"][ended.object_id]["slot"]
    server.kill(signal.SIGKILL)
    # What a crash can leave: a sandbox that ended meanwhile, an unrecorded namespace and veth.
    runtime = [TEST_RUNTIME if TEST_RUNTIME == "runc" else "runsc", "--root",
               str(home / ("runc" if TEST_RUNTIME == "runc" else "runsc"))]
    subprocess.run([*runtime, "kill", ended.object_id, "KILL"], check=True)
    # It has ended before the restart: `runsc kill` returns before gVisor's sandbox has stopped
    # (a restart in between adopts it as running, and releases it only once it stops).
    deadline = time.monotonic() + 20
    while json.loads(subprocess.run([*runtime, "state", ended.object_id], capture_output=True,
                                    text=True, check=True).stdout)["status"] == "running":
        assert time.monotonic() < deadline, "the killed sandbox did not stop"
        time.sleep(0.05)
    subprocess.run(["ip", "netns", "add", f"shoal-{tag}-1999"], check=True)
    subprocess.run(["ip", "link", "add", f"sh{tag}1998", "type", "veth", "peer", "name",
                    f"sh{tag}1997"], check=True)
    assert Path(f"/run/netns/shoal-{tag}-{gone_slot}").exists()
    server.start()
    try:
        assert not Path(f"/run/netns/shoal-{tag}-1999").exists()
        assert not Path(f"/sys/class/net/sh{tag}1998").exists()
        # The ended sandbox's namespace was released; its slot may already serve a new sandbox
        # (the warm pool refills at start), but never the ended one.
        state = json.loads((home / "network" / "state.json").read_text())
        assert ended.object_id not in state["owned"]
        owner = {v["slot"]: k for k, v in state["owned"].items()}.get(gone_slot)
        assert not Path(f"/run/netns/shoal-{tag}-{gone_slot}").exists() or owner is not None
        assert run_py(sb, FETCH, f"http://{world.world_ip}/") == "world-ok"  # adopted, working
    finally:
        sb.terminate()


@pytest.mark.slow
def test_pip_download_from_inside_a_sandbox(app):
    """The host reaches PyPI (through the host's resolvers); so does a sandbox, through NAT."""
    sb = shoal.Sandbox.create(app=app, timeout=300)
    try:
        bundle = Path("/etc/ssl/certs/ca-certificates.crt").read_bytes()
        with sb.open("/tmp/ca.crt", "wb") as f:
            f.write(bundle)
        p = sb.exec("python3", "-m", "pip", "download", "--no-deps", "--no-cache-dir",
                    "--cert", "/tmp/ca.crt", "-d", "/tmp/dl", "six",
                    env={"PIP_INDEX_URL": "https://pypi.org/simple"})
        p.stdout.read()
        err = p.stderr.read()
        if p.wait() != 0 and "No module named pip" in err:
            code = ("import ssl,urllib.request; c=ssl.create_default_context(cafile='/tmp/ca.crt');"
                    "print(urllib.request.urlopen('https://pypi.org/simple/six/', context=c,"
                    " timeout=30).status)")
            assert run_py(sb, code) == "200"
        else:
            assert p.returncode == 0, err
            assert "six" in sb.exec("ls", "/tmp/dl").stdout.read()
    finally:
        sb.terminate()
