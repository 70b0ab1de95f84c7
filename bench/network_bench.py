"""Sandbox networking: what a network costs at create, and how fast a sandbox sends.

1. create -> first output, with a network (the default policy) and without (`block_network=True`),
   interleaved, N runs each: `Sandbox.create(app=app, ...)` until `sb.exec("echo", "hi")` returns
   "hi\\n". Also with `cidr_allowlist` (one nft batch on the create path). Teardown is untimed.
   The network's cost is given as the difference of the medians and as the median of the
   differences within each round (paired: steadier on a shared machine).
2. Throughput to a test "outside world" namespace (tests/networld.py, 198.18.0.0/15): a sandbox
   sends 512 MiB over one TCP connection to a sink in the world (through its veth, the host's
   forward path, nftables and NAT); the baseline is the host sending to the same sink over the
   world's plain veth, without shoal. Both senders are the same Python loop (256 KiB writes).

Runs its own shoal server on a fresh SHOAL_HOME under /tmp (images from SHOAL_IMAGES) and removes
everything at the end, with the warm sandbox pool off (SHOAL_POOL=0): a pooled sandbox serves only
default-policy requests, so with the pool on, the "network" creates would be pre-started sandboxes
and the others not. `--runtime gvisor` makes every sandbox a gVisor one. Needs root. Traffic goes
only to the namespaces it creates.

    .venv/bin/python bench/network_bench.py --runs 20 [--runtime runc|gvisor] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

SINK = r'''
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], 9000)); s.listen(8)
while True:
    c, _ = s.accept()
    n = 0
    while d := c.recv(1 << 20):
        n += len(d)
    c.sendall(str(n).encode()); c.close()
'''
SEND = r'''
import socket, sys, time
total = int(sys.argv[2]); buf = b"x" * (256 * 1024)
s = socket.create_connection((sys.argv[1], 9000)); t = time.perf_counter(); sent = 0
while sent < total:
    s.sendall(buf); sent += len(buf)
s.shutdown(socket.SHUT_WR); got = int(s.recv(64)); el = time.perf_counter() - t
print(got * 8 / el / 1e9)
'''


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p * (len(xs) - 1))))]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--mib", type=int, default=512)
    ap.add_argument("--runtime", choices=["runc", "gvisor"], default="runc")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    from networld import World

    home = Path(tempfile.mkdtemp(prefix="shoal-netbench-"))
    os.environ["SHOAL_HOME"] = str(home)
    os.environ.setdefault("SHOAL_IMAGES", str(Path.home() / ".shoal" / "images"))
    os.environ["SHOAL_POOL"] = "0"
    os.environ["SHOAL_RUNTIME"] = args.runtime
    world = World().start()
    os.environ["SHOAL_NET_DNS"] = world.world_ip
    sink = subprocess.Popen(["ip", "netns", "exec", world.world_ns, sys.executable, "-c", SINK,
                             world.world_ip2])
    server = subprocess.Popen([sys.executable, "-m", "shoal", "serve"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    results: dict = {"runtime": args.runtime, "load_before": os.getloadavg()[0]}
    try:
        import shoal

        deadline = time.monotonic() + 30
        while not (home / "shoal.sock").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        app = shoal.App.lookup("netbench", create_if_missing=True)
        modes = {"network": {}, "no_network": {"block_network": True},
                 "cidr_allowlist": {"cidr_allowlist": [f"{world.world_ip}/32"]}}
        times: dict[str, list[float]] = {m: [] for m in modes}
        for i in range(args.runs + 2):
            for m, kw in (list(modes.items()) if i % 2 else list(modes.items())[::-1]):
                t = time.perf_counter()
                sb = shoal.Sandbox.create(app=app, **kw)
                assert sb.exec("echo", "hi").stdout.read() == "hi\n"
                el = time.perf_counter() - t
                sb.terminate()
                if i >= 2:
                    times[m].append(el * 1000)
                # Let the namespace pool refill (it starts SHOAL_NET_REFILL_DELAY = 0.5 s after
                # an attach), so no create is measured while competing with a refill for the CPU.
                time.sleep(1.0)
        for m, xs in times.items():
            results[f"create_first_output_{m}_ms"] = {"p50": statistics.median(xs),
                                                      "p90": pct(xs, 0.9)}
        results["network_cost_p50_ms"] = (results["create_first_output_network_ms"]["p50"]
                                          - results["create_first_output_no_network_ms"]["p50"])
        # The same, paired: the median of (network - no network) within each round, which cancels
        # most of what other users of a shared machine add to both.
        results["network_cost_paired_p50_ms"] = statistics.median(
            a - b for a, b in zip(times["network"], times["no_network"]))
        total = str(args.mib << 20)
        host = [float(subprocess.run([sys.executable, "-c", SEND, world.world_ip2, total],
                                     capture_output=True, text=True, check=True).stdout)
                for _ in range(3)]
        sb = shoal.Sandbox.create(app=app)
        box = []
        for _ in range(3):
            p = sb.exec("python3", "-c", SEND, world.world_ip2, total)
            box.append(float(p.stdout.read()))
        sb.terminate()
        results["throughput_gbit_s"] = {"host_to_world_plain_veth": statistics.median(host),
                                        "sandbox_to_world_via_shoal": statistics.median(box)}
        results["load_after"] = os.getloadavg()[0]
    finally:
        subprocess.run([sys.executable, "-m", "shoal", "stop"], capture_output=True, timeout=120)
        server.wait(timeout=30)
        sink.kill()
        sink.wait()
        world.close()
        shutil.rmtree(home, ignore_errors=True)
    if args.json:
        print(json.dumps(results, indent=1))
    else:
        for k, v in results.items():
            print(f"{k:45s} {v}")


if __name__ == "__main__":
    main()
