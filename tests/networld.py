"""A small "outside world" for network tests, made of network namespaces this test session owns.

Tests send packets only to loopback or to these namespaces (the workplace's network safety rule):
- world `swt<pid>w`: 198.18.<k>.2 and .3 (198.18.0.0/15 is reserved for benchmarking), an HTTP
  server answering "world-ok" on port 80 of both, and a DNS server on .2:53 answering
  `world.test` → .2 and REFUSED for every other name (so a resolver tries the next server).
- private `swt<pid>p`: 10.254.<k>.2 and 169.254.169.254 (routed from the host), an HTTP server
  answering "private-ok" — what sandboxes must never reach; if a block failed, the packet would
  only reach this namespace.
Each is joined to the host by a veth (`swt<pid>a`, `swt<pid>b`) with forwarding on its host end.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

DNS_SERVER = r'''
import socket, struct, sys
ip, answer = sys.argv[1], sys.argv[2]
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((ip, 53))
while True:
    data, addr = s.recvfrom(512)
    try:
        tid = struct.unpack(">H", data[:2])[0]
        i, labels = 12, []
        while data[i]:
            labels.append(data[i + 1:i + 1 + data[i]])
            i += 1 + data[i]
        qname = b".".join(labels).lower()
        qtype = struct.unpack(">H", data[i + 1:i + 3])[0]
        question = data[12:i + 5]
    except (IndexError, struct.error):
        continue
    if qname == b"world.test":
        ans = (b"\xc0\x0c" + struct.pack(">HHIH", 1, 1, 60, 4) + socket.inet_aton(answer)
               if qtype == 1 else b"")
        resp = struct.pack(">HHHHHH", tid, 0x8180, 1, 1 if ans else 0, 0, 0) + question + ans
    else:
        resp = struct.pack(">HHHHHH", tid, 0x8185, 1, 0, 0, 0) + question  # REFUSED
    s.sendto(resp, addr)
'''


def sh(*argv: str, input: str | None = None, check: bool = True) -> str:
    r = subprocess.run(argv, input=input, capture_output=True, text=True, timeout=20)
    if check and r.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {r.stderr.strip()}")
    return r.stdout


class World:
    def __init__(self, pid: int | None = None):
        self.pid = pid or os.getpid()
        k = 20 + self.pid % 200
        self.world_ns, self.private_ns = f"swt{self.pid}w", f"swt{self.pid}p"
        self.world_if, self.private_if = f"swt{self.pid}a", f"swt{self.pid}b"
        self.world_ip, self.world_ip2 = f"198.18.{k}.2", f"198.18.{k}.3"
        self.world_host_ip = f"198.18.{k}.1"
        self.private_ip, self.private_host_ip = f"10.254.{k}.2", f"10.254.{k}.1"
        self.metadata_ip = "169.254.169.254"
        self.procs: list[subprocess.Popen] = []
        self.dir = Path(tempfile.mkdtemp(prefix=f"shoal-world-{self.pid}-", dir="/tmp"))

    def _netns(self, ns: str, host_if: str, host_ip: str, addrs: list[str]) -> None:
        sh("ip", "netns", "add", ns)
        sh("ip", "link", "add", host_if, "type", "veth", "peer", "name", "eth0", "netns", ns)
        sh("ip", "addr", "add", f"{host_ip}/24", "dev", host_if)
        sh("ip", "link", "set", host_if, "up")
        Path(f"/proc/sys/net/ipv4/conf/{host_if}/forwarding").write_text("1")
        batch = "".join(f"addr add {a} dev eth0\n" for a in addrs)
        sh("ip", "-n", ns, "-batch", "-", input=batch + "link set lo up\nlink set eth0 up\n"
           f"route add default via {host_ip}\n")

    def _serve(self, ns: str, *argv: str) -> None:
        self.procs.append(subprocess.Popen(["ip", "netns", "exec", ns, *argv],
                                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))

    def start(self) -> World:
        self._netns(self.world_ns, self.world_if, self.world_host_ip,
                    [f"{self.world_ip}/24", f"{self.world_ip2}/24"])
        self._netns(self.private_ns, self.private_if, self.private_host_ip,
                    [f"{self.private_ip}/24", f"{self.metadata_ip}/32"])
        # `replace`: the metadata address is one per host, and two test sessions may run at once
        # (a developer's and CI's); either way it leads only into a test session's namespace.
        sh("ip", "route", "replace", f"{self.metadata_ip}/32", "via", self.private_ip)
        for name, text in (("w", "world-ok"), ("p", "private-ok")):
            (self.dir / name).mkdir()
            (self.dir / name / "index.html").write_text(text)
        (self.dir / "dns.py").write_text(DNS_SERVER)
        self._serve(self.world_ns, sys.executable, "-m", "http.server", "80", "--bind", "0.0.0.0",
                    "--directory", str(self.dir / "w"))
        self._serve(self.world_ns, sys.executable, str(self.dir / "dns.py"), self.world_ip,
                    self.world_ip)
        self._serve(self.private_ns, sys.executable, "-m", "http.server", "80", "--bind",
                    "0.0.0.0", "--directory", str(self.dir / "p"))
        deadline = time.monotonic() + 15
        for ip in (self.world_ip, self.private_ip):
            while True:
                try:
                    urllib.request.urlopen(f"http://{ip}/", timeout=1).read()
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)
        return self

    def close(self) -> None:
        for p in self.procs:
            p.kill()
            p.wait()
        for ns in (self.world_ns, self.private_ns):
            sh("ip", "netns", "del", ns, check=False)
        import shutil

        shutil.rmtree(self.dir, ignore_errors=True)


def clean_stale() -> None:
    """Worlds of test sessions that were killed before their teardown."""
    import shutil

    for d in Path("/tmp").glob("shoal-world-*-*"):
        pid = d.name.split("-")[2]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            shutil.rmtree(d, ignore_errors=True)
    for ns in Path("/run/netns").glob("swt*") if Path("/run/netns").exists() else []:
        pid = ns.name[3:-1]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            sh("ip", "netns", "del", ns.name, check=False)
    with contextlib.suppress(Exception):
        for line in sh("ip", "route", "show", "169.254.169.254").splitlines():
            if "swt" in line:
                dev = line.split("dev")[1].split()[0]
                if not Path(f"/proc/{dev[3:-1]}").exists():
                    sh("ip", "route", "del", "169.254.169.254/32", check=False)
