"""Agent latency: a small request's round trip and `echo hi` end to end, through the client.

    .venv/bin/python bench/agent_bench.py [--n 2000]

Starts a shoal-agent subprocess (not in a container) and prints medians.
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import statistics
import struct
import subprocess
import tempfile
import time
from pathlib import Path

from shoal.server.agent import ensure_built
from shoal.server.host.agent_client import connect, encode_frame

ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin"}


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p * len(xs)))]


def raw_round_trips(sock_path: Path, n: int) -> list[float]:
    """The same request over a plain blocking socket: the agent's own cost plus the kernel's."""
    s = socket.socket(socket.AF_UNIX)
    s.connect(str(sock_path))
    s.sendall(encode_frame("HELLO", 1, [("VERSION", 1)]))
    s.recv(65536)
    frame = encode_frame("LIST_EXECS", 2, [])
    out = []
    for _ in range(n):
        t = time.perf_counter()
        s.sendall(frame)
        head = s.recv(4)
        body = s.recv(struct.unpack("<I", head)[0])
        out.append(time.perf_counter() - t)
        assert body
    s.close()
    return out


async def main(n: int, execs: int) -> None:
    binary = ensure_built()
    d = Path(tempfile.mkdtemp(prefix="agent-bench-"))
    proc = subprocess.Popen([str(binary), "--socket", str(d / "agent.sock")])
    try:
        c = await connect(d)
        rt = []
        for _ in range(n):  # LIST_EXECS with no sessions: a HELLO-sized request and reply
            t = time.perf_counter()
            await c.request("LIST_EXECS", [])
            rt.append(time.perf_counter() - t)
        t = time.perf_counter()
        await asyncio.gather(*(c.request("LIST_EXECS", []) for _ in range(n)))
        pipelined = (time.perf_counter() - t) / n
        ex = []
        for i in range(execs):
            t = time.perf_counter()
            await c.exec(f"e{i}", ["echo", "hi"], ENV)
            data, eof = await c.read(f"e{i}", "stdout", 0)
            while not eof:
                more, eof = await c.read(f"e{i}", "stdout", len(data))
                data += more
            code, _ = await c.wait(f"e{i}")
            ex.append(time.perf_counter() - t)
            assert data == b"hi\n" and code == 0
            await c.forget(f"e{i}")
        await c.close()
        raw = await asyncio.to_thread(raw_round_trips, d / "agent.sock", n)
        print(f"small request round trip, asyncio client: p50 {statistics.median(rt) * 1e6:.0f} µs, "
              f"p99 {pct(rt, 0.99) * 1e6:.0f} µs (n={n})")
        print(f"small request, {n} pipelined:            {pipelined * 1e6:.1f} µs each")
        print(f"small request round trip, raw socket:    p50 {statistics.median(raw) * 1e6:.0f} µs")
        print(f"exec echo hi -> output + exit:           p50 {statistics.median(ex) * 1e3:.2f} ms, "
              f"p99 {pct(ex, 0.99) * 1e3:.2f} ms (n={execs})")
    finally:
        proc.terminate()
        proc.wait()


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--execs", type=int, default=200)
    args = ap.parse_args()
    asyncio.run(main(args.n, args.execs))
