"""Memory snapshots of gVisor sandboxes (`Sandbox._experimental_snapshot` and
`Sandbox._experimental_from_snapshot`), through the shoal SDK, beside a cold create.

The sandbox: gVisor, `block_network=True` (what memory snapshots need), its entrypoint a Python
process holding WORKING_MIB of touched memory and counting in a loop — the state a snapshot
saves. Per run:

1. snapshot: `sb._experimental_snapshot()` of that running sandbox (the SDK call: the agent
   quiesced, the sandbox paused while its upper dir is copied and `runsc checkpoint
   --leave-running` writes its memory, the agent back).
2. restore -> first output: `Sandbox._experimental_from_snapshot(snapshot)` until
   `sb.exec("echo", "hi").stdout.read()` returns (teardown after the clock stops).
3. baseline, cold create -> first output of the same sandbox: `Sandbox.create("python3", "-c",
   ...)` until the exec answers *and* the program has its memory (it writes a file then).

    .venv/bin/python bench/memory_snapshot_bench.py --runs 10 [--json]

Own server on a fresh SHOAL_HOME under /tmp (warm pool off), removed at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sandbox_bench import bench_workdir, start_server, stop_server, unmount_all, wait_ready  # noqa: E402

WORKING_MIB = 64
PROGRAM = f"""
import time
block = bytearray({WORKING_MIB} << 20)
for i in range(0, len(block), 4096):
    block[i] = 1
open('/root/ready', 'w').close()
n = 0
while True:
    n += 1
    time.sleep(0.05)
"""


def ms(samples: list[float]) -> dict:
    s = sorted(samples)
    return {"p50": round(statistics.median(s) * 1000, 1),
            "p90": round(s[min(len(s) - 1, int(len(s) * 0.9))] * 1000, 1), "n": len(s)}


def ready(sb) -> None:
    """Until the program has its memory (it then writes /root/ready)."""
    deadline = time.monotonic() + 120
    while sb.exec("test", "-e", "/root/ready").wait() != 0:
        if time.monotonic() > deadline:
            raise RuntimeError("the program did not start")
        time.sleep(0.02)


def du_mib(path: Path) -> float:
    out = subprocess.run(["du", "-sk", str(path)], capture_output=True, text=True,
                         timeout=60).stdout.split()
    return round(int(out[0]) / 1024, 1) if out else 0.0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    workdir, home = bench_workdir("shoal-snapbench-", SHOAL_POOL="0")
    server = None
    live = []
    result: dict = {"runs": args.runs, "working_set_mib": WORKING_MIB,
                    "loadavg_start": os.getloadavg()[0]}
    try:
        server = start_server(home)
        wait_ready(home, server)
        import shoal

        app = shoal.App.lookup("bench", create_if_missing=True)
        opts = {"app": app, "experimental_options": {"runtime": "gvisor"},
                "block_network": True, "timeout": 600}
        cold, snaps, restores, sizes = [], [], [], []
        for _ in range(args.runs):
            t0 = time.perf_counter()
            sb = shoal.Sandbox.create("python3", "-c", PROGRAM, **opts)
            assert sb.exec("echo", "hi").stdout.read() == "hi\n"
            ready(sb)
            cold.append(time.perf_counter() - t0)
            live.append(sb)

            t0 = time.perf_counter()
            snapshot = sb._experimental_snapshot()
            snaps.append(time.perf_counter() - t0)
            sizes.append(du_mib(home / "memory-snapshots" / snapshot.object_id))
            sb.terminate()
            live.remove(sb)

            t0 = time.perf_counter()
            copy = shoal.Sandbox._experimental_from_snapshot(snapshot)
            assert copy.exec("echo", "hi").stdout.read() == "hi\n"
            restores.append(time.perf_counter() - t0)
            live.append(copy)
            assert copy.exec("test", "-e", "/root/ready").wait() == 0
            copy.terminate()
            live.remove(copy)
        result["cold_create_to_program_ready_ms"] = ms(cold)
        result["snapshot_ms"] = ms(snaps)
        result["restore_to_first_output_ms"] = ms(restores)
        result["snapshot_size_mib_median"] = statistics.median(sizes)
        result["loadavg_end"] = os.getloadavg()[0]
    finally:
        for sb in live:
            try:
                sb.terminate()
            except Exception:
                pass
        if server:
            stop_server(home, server)
        if unmount_all(workdir):
            shutil.rmtree(workdir, ignore_errors=True)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"gVisor, block_network, a Python process holding {WORKING_MIB} MiB; "
              f"{args.runs} runs; ms p50 / p90")
        for key, label in (("snapshot_ms", "_experimental_snapshot()"),
                           ("restore_to_first_output_ms", "_experimental_from_snapshot -> exec"),
                           ("cold_create_to_program_ready_ms", "cold create -> program ready")):
            v = result[key]
            print(f"{label:40}{v['p50']:>10.1f} / {v['p90']:.1f}")
        print(f"snapshot size on disk (median): {result['snapshot_size_mib_median']} MiB; "
              f"load {result['loadavg_start']:.2f} -> {result['loadavg_end']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
