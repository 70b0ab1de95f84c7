"""Server memory over many sandbox lifecycles: RSS must stay flat.

Runs its own server (fresh SHOAL_HOME under /tmp, the shared image store) and does `--cycles`
cycles of `Sandbox.create` → `exec("echo", i)` + read + wait → `terminate`, `--parallel` at a time.
The server's VmRSS (from /proc/<pid>/status) is sampled every `--every` cycles. Reported: RSS after
the warm-up (the first 10 % of cycles), at the end, the growth between them (total and per 1,000
cycles), and the sizes of the service's in-memory maps cannot be seen from outside, so a flat RSS
is the claim.

Retention windows are shortened for the run (SHOAL_EXEC_RETENTION, SHOAL_ENDED_RETENTION, both
`--retention` seconds, default 20), so that a run of minutes reaches the steady state the default
windows (600 s / 60 s) reach after 10 minutes: with them, memory grows for the first window and is
flat after it.

    .venv/bin/python bench/memory_bench.py [--cycles 2000] [--parallel 4] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cycles", type=int, default=2000)
    ap.add_argument("--parallel", type=int, default=4)
    ap.add_argument("--every", type=int, default=100)
    ap.add_argument("--retention", type=float, default=20.0)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--images", default=os.environ.get("SHOAL_IMAGES")
                    or str(Path.home() / ".shoal" / "images"))
    args = ap.parse_args()

    home = Path(tempfile.mkdtemp(prefix="shoal-membench-"))
    os.environ.update(SHOAL_HOME=str(home), SHOAL_IMAGES=str(Path(args.images).absolute()),
                      SHOAL_EXEC_RETENTION=str(args.retention),
                      SHOAL_ENDED_RETENTION=str(args.retention))
    srv = subprocess.Popen([sys.executable, "-m", "shoal", "serve"], env=os.environ.copy(),
                           stdout=subprocess.DEVNULL, stderr=open(home / "bench-server.log", "w"),
                           start_new_session=True)
    samples: list[tuple[int, float, int]] = []  # (cycles done, seconds, RSS KiB)
    try:
        import httpx

        sock = home / "shoal.sock"
        deadline = time.monotonic() + 60
        while True:
            if time.monotonic() > deadline or srv.poll() is not None:
                raise RuntimeError("the server did not start")
            try:
                if sock.exists() and httpx.Client(
                        transport=httpx.HTTPTransport(uds=str(sock)), timeout=2).get(
                        "http://shoal/health").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        import shoal

        app = shoal.App.lookup("membench", create_if_missing=True)

        def cycle(i: int) -> None:
            sb = shoal.Sandbox.create(app=app)
            try:
                p = sb.exec("echo", str(i))
                out = p.stdout.read()
                p.wait()
                if out.strip() != str(i):
                    raise RuntimeError(f"cycle {i}: got {out!r}")
            finally:
                sb.terminate()

        t0 = time.monotonic()
        samples.append((0, 0.0, rss_kib(srv.pid)))
        done = 0
        with ThreadPoolExecutor(args.parallel) as pool:
            while done < args.cycles:
                n = min(args.every, args.cycles - done)
                list(pool.map(cycle, range(done, done + n)))
                done += n
                samples.append((done, round(time.monotonic() - t0, 1), rss_kib(srv.pid)))
                print(f"[memory_bench] {done} cycles, {samples[-1][1]} s, RSS "
                      f"{samples[-1][2] / 1024:.1f} MiB", file=sys.stderr, flush=True)
        time.sleep(args.retention + 5)  # let the retention windows pass: what is left is kept
        samples.append((done, round(time.monotonic() - t0, 1), rss_kib(srv.pid)))
    finally:
        subprocess.run([sys.executable, "-m", "shoal", "stop"], env=os.environ.copy(),
                       capture_output=True, timeout=120)
        try:
            srv.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(srv.pid, signal.SIGKILL)
            srv.wait()
        shutil.rmtree(home, ignore_errors=True)
    warm = next(s for s in samples if s[0] >= args.cycles // 10)
    end = samples[-1]
    growth = end[2] - warm[2]
    result = {"cycles": args.cycles, "parallel": args.parallel, "retention_s": args.retention,
              "seconds": end[1], "rss_start_mib": round(samples[0][2] / 1024, 1),
              "rss_warm_mib": round(warm[2] / 1024, 1), "rss_end_mib": round(end[2] / 1024, 1),
              "growth_after_warmup_mib": round(growth / 1024, 1),
              "growth_per_1000_cycles_mib": round(growth / 1024 * 1000 /
                                                  max(1, args.cycles - warm[0]), 2),
              "samples": samples}
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        for k, v in result.items():
            if k != "samples":
                print(f"{k:28} {v}")
        print("samples (cycles, s, RSS KiB):", samples)
    return 0


if __name__ == "__main__":
    sys.exit(main())
