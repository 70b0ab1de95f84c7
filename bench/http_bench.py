"""Where one SDK HTTP call's time goes: `GET /health` taken apart, in one run on one server.

Cases, interleaved (one call of each per round), `--iters` timed calls after `--warmup`:
  raw socket      a hand-written `GET /health` over a blocking Unix socket, kept alive: the
                  server's answer plus the kernel (no client library at all)
  SDK transport   `Client.call("GET", "/health")` timed on the SDK's event loop: httpx's client
                  over shoal's transport (shoal/_transport.py), the path every SDK call takes
  httpcore        the same call through httpx's default transport (httpcore over anyio), which
                  the SDK used before, on the same loop, for comparison
  blocking call   `run_blocking(Client.call(...))` from the main thread: what a blocking SDK
                  method pays (the hop to the SDK loop's thread and back included)
  thread hop      `run_blocking(<a coroutine that returns at once>)`: the hop alone
For the on-loop cases the client's CPU time per call (the loop thread's) is given too.

It runs its own server on a fresh SHOAL_HOME under /tmp (no warm pool, no sandbox networking: a
`GET /health` touches neither) with sandbox_bench.py's helpers, and removes it on exit. Needs
root (the server does).

    .venv/bin/python bench/http_bench.py [--iters 300] [--warmup 30] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sandbox_bench import log, start_server, stop_server, unmount_all, wait_ready  # noqa: E402

REQUEST = b"GET /health HTTP/1.1\r\nhost: shoal\r\nx-shoal-api-version: 1\r\n\r\n"


class RawSocket:
    def __init__(self, path: str):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(path)

    def get(self) -> None:
        self.sock.sendall(REQUEST)
        buf = b""
        while b"\r\n\r\n" not in buf:
            buf += self.sock.recv(65536)
        head, _, body = buf.partition(b"\r\n\r\n")
        length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length:"))
        while len(body) < length:
            body += self.sock.recv(65536)


def measure(iters: int, warmup: int, sock_path: str) -> dict:
    import httpx

    from shoal._client import Client, get_client
    from shoal._sync import run_blocking

    raw = RawSocket(sock_path)
    sdk: Client = run_blocking(get_client())
    old = Client("http://shoal", httpx.AsyncHTTPTransport(uds=sock_path))

    async def on_loop(client: Client) -> tuple[float, float]:
        t, c = time.perf_counter(), time.thread_time()
        await client.call("GET", "/health")
        return time.perf_counter() - t, time.thread_time() - c

    async def noop() -> None:
        return None

    def timed(fn) -> float:
        t = time.perf_counter()
        fn()
        return time.perf_counter() - t

    cases = {
        "raw socket": lambda: (timed(raw.get), None),
        "SDK transport": lambda: run_blocking(on_loop(sdk)),
        "httpcore": lambda: run_blocking(on_loop(old)),
        "blocking call": lambda: (timed(lambda: run_blocking(sdk.call("GET", "/health"))), None),
        "thread hop": lambda: (timed(lambda: run_blocking(noop())), None),
    }
    wall: dict[str, list[float]] = {k: [] for k in cases}
    cpu: dict[str, list[float]] = {k: [] for k in cases}
    names = list(cases)
    for i in range(warmup + iters):
        order = names[i % len(names):] + names[:i % len(names)]
        for name in order:
            w, c = cases[name]()
            if i >= warmup:
                wall[name].append(w)
                if c is not None:
                    cpu[name].append(c)
    run_blocking(old.aclose())
    out = {}
    for name in names:
        xs = sorted(wall[name])
        out[name] = {"p50_ms": round(statistics.median(xs) * 1000, 3),
                     "p90_ms": round(xs[int(len(xs) * 0.9) - 1] * 1000, 3)}
        if cpu[name]:
            out[name]["client_cpu_ms"] = round(statistics.median(cpu[name]) * 1000, 3)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--iters", type=int, default=300)
    ap.add_argument("--warmup", type=int, default=30)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if os.geteuid() != 0:
        log("http_bench.py needs root (the server does)")
        return 2
    workdir = Path(tempfile.mkdtemp(prefix="shoal-http-bench-", dir="/tmp"))
    home = workdir / "home"
    os.environ.update(SHOAL_HOME=str(home), SHOAL_POOL="0", SHOAL_NET="off")
    for var in ("SHOAL_SERVER", "SHOAL_TOKEN"):
        os.environ.pop(var, None)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    server = None
    load = os.getloadavg()[0]
    try:
        server = start_server(home)
        wait_ready(home, server)
        result = measure(args.iters, args.warmup, str(home / "shoal.sock"))
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        if server:
            stop_server(home, server)
        if unmount_all(workdir):
            shutil.rmtree(workdir, ignore_errors=True)
    result = {"load_start": round(load, 2), "load_end": round(os.getloadavg()[0], 2),
              "iters": args.iters, "cases": result}
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"GET /health, {args.iters} calls per case; load average {result['load_start']} -> "
          f"{result['load_end']} ({os.cpu_count()} CPUs)")
    print(f"  {'case':<15} {'p50 ms':>8} {'p90 ms':>8} {'client CPU ms':>14}")
    for name, v in result["cases"].items():
        c = f"{v['client_cpu_ms']:.3f}" if "client_cpu_ms" in v else ""
        print(f"  {name:<15} {v['p50_ms']:>8.3f} {v['p90_ms']:>8.3f} {c:>14}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
