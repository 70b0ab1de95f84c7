"""Cost of the per-sandbox disk limit (host/disk.py) on sandbox create and destroy.

Measures, on the host and without runc (the rest of a create is the same either way), the root
filesystem set-up and teardown of one sandbox:
- before: overlay with a plain upper dir (no disk limit);
- after, spare: the upper on an ext4 image taken from the pool of formatted spares (the usual case);
- after, fresh: the image formatted on the create path (a non-default size, or an empty pool).

    .venv/bin/python bench/disk_bench.py --runs 20

Run as root. Everything lives under a temp dir that is removed at the end.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from shoal.server.host import disk
from shoal.server.host.rootfs import Rootfs


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=20)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="shoal-diskbench-", dir="/var/tmp") as tmp:
        base = Path(tmp)
        lower = base / "lower"
        (lower / "tmp").mkdir(parents=True)
        pool = disk.DiskPool(base / "spares", spares=1)
        mib = disk.default_mib()
        rows: dict[str, tuple[list[float], list[float]]] = {}
        for case in ("before", "after, spare", "after, fresh"):
            ups, downs = [], []
            for i in range(args.runs):
                if case == "after, spare":
                    pool.refill()  # off the clock, as the server does in the background
                sdir = base / f"sb{i}"
                sdir.mkdir()
                fs = Rootfs(sdir)
                t0 = time.perf_counter()
                if case == "before":
                    fs.mount([lower])
                elif case == "after, spare":
                    fs.mount([lower], (pool, mib))
                else:
                    fs.mount([lower], (disk.DiskPool(base / "nospare", spares=0), mib))
                t1 = time.perf_counter()
                Rootfs(sdir).destroy()
                t2 = time.perf_counter()
                sdir.rmdir()
                ups.append((t1 - t0) * 1000)
                downs.append((t2 - t1) * 1000)
            rows[case] = (ups, downs)
        pool.clear()
        print(f"disk limit {mib} MiB, {args.runs} runs, medians (p90) in ms")
        print("| case | set-up | teardown |\n|---|---|---|")
        for case, (ups, downs) in rows.items():
            q = lambda xs: f"{statistics.median(xs):.1f} ({sorted(xs)[int(len(xs) * .9) - 1]:.1f})"
            print(f"| {case} | {q(ups)} | {q(downs)} |")


if __name__ == "__main__":
    main()
