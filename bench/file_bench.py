"""Sandbox file API: latency of small files and throughput of big ones, against the shell way and
plain host file operations, in one run on one sandbox.

1. Small files (1 KiB, `--iters` timed calls per case after `--warmup` uncounted ones; p50/p99):
   - `sb.filesystem.read_bytes("/tmp/small")`; and the same, 5 in a row (each one a sample),
     the way an agent reads several files at once
   - `sb.filesystem.write_bytes(data, "/tmp/small")` (atomic: temp file, fsync, rename)
   - `with sb.open("/tmp/small", "rb") as f: f.read()` (open + read + close: three calls)
   baselines:
   (a) `p = sb.exec("cat", "/tmp/small"); p.stdout.read(); p.wait()`, what the file API replaces;
   (b) the same file read on the host through the sandbox's merged rootfs directory
       ($SHOAL_HOME/sandboxes/<id>/rootfs/tmp/small) with plain open/read: the floor; for scale
       next to write_bytes, also a host atomic write there (temp file, write, fsync, rename);
   (c) one SDK HTTP round trip, `GET /health` through shoal._client: the transport floor.
   The cases run interleaved (one call of each per round, the order rotating), so load changes on
   the machine hit them all alike; after each exec an untimed 20 ms pause lets the server finish
   the exec's clean-up (reaping, closing streams), which would otherwise land in the next case.
   The project's goal is a read_bytes p50 of at most 1.5 ms (issue #8), judged on the one-a-round
   case; the in-a-row case shows what calls that follow each other cost.

2. Big files (`--size-mib`, default 256 MiB of os.urandom; `--runs` samples, median GB/s, 1e9):
   - `sb.filesystem.copy_from_local(local, "/tmp/big")` (streamed, fsynced by the server)
   - `sb.filesystem.copy_to_local("/tmp/big", local)` (streamed, not fsynced)
   baselines:
   (a) `sb.exec("sh", "-c", "cat > /tmp/big")` with the data written to stdin, write_eof, drain,
       wait (no fsync); and `sb.exec("cat", "/tmp/big", text=False)`, stdout.read(), wait;
   (b) host copies into / out of the merged rootfs directory: shutil.copyfile + fsync (the
       ratios are against these); copyfile without fsync is printed too, for scale.
   Before every sample earlier outputs are removed and `sync` runs (untimed), so no writeback of
   one sample lands in the next; the page cache stays warm. Contents are checked (sha256) on the
   first run.

The benchmark runs its own shoal server on a fresh SHOAL_HOME under /tmp (as sandbox_bench.py does,
whose helpers it uses), reusing the image store (SHOAL_IMAGES, default ~/.shoal/images), and
removes the sandbox, the server, its mounts and every file it made on exit, Ctrl-C included.
Needs root.

    .venv/bin/python bench/file_bench.py [--iters 200] [--warmup 20] [--runs 5] [--json]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sandbox_bench import log, start_server, stop_server, unmount_all, wait_ready  # noqa: E402

MiB = 1 << 20
SMALL = "/tmp/small"
BIG = "/tmp/big"
GOAL_P50_MS = 1.5
WRITE_BLOCK = 64 * MiB
SETTLE = 0.02
IN_A_ROW = 5  # reads of the in-a-row case per round

SMALL_CASES = {
    "read_bytes": "fs.read_bytes (1 KiB)",
    "read_bytes_in_a_row": f"fs.read_bytes, {IN_A_ROW} in a row",
    "write_bytes": "fs.write_bytes (1 KiB)",
    "open_read": "sb.open(rb).read() + close",
    "exec_cat": "(a) exec cat + read + wait",
    "host_read": "(b) host open/read, merged rootfs",
    "host_write": "(b) host tmp+write+fsync+rename",
    "health": "(c) SDK GET /health",
}
BIG_CASES = {
    "copy_from_local": ("in", "fs.copy_from_local"),
    "exec_stdin": ("in", "(a) exec sh -c 'cat > f' + stdin"),
    "host_in_fsync": ("in", "(b) host copyfile + fsync"),
    "host_in": ("in", "    host copyfile, no fsync"),
    "copy_to_local": ("out", "fs.copy_to_local"),
    "exec_stdout": ("out", "(a) exec cat f, stdout bytes"),
    "host_out_fsync": ("out", "(b) host copyfile + fsync"),
    "host_out": ("out", "    host copyfile, no fsync"),
}
HOST_REF = {"in": "host_in_fsync", "out": "host_out_fsync"}


# --- small files ------------------------------------------------------------------------------


class SmallCases:
    def __init__(self, sb, rootfs: Path, data: bytes):
        from shoal._client import get_client
        from shoal._sync import run_blocking

        self.sb, self.fs, self.data = sb, sb.filesystem, data
        self.host_path = rootfs / SMALL.lstrip("/")
        self.host_tmp = rootfs / "tmp" / ".bench-small.tmp"
        self._run_blocking, self._get_client = run_blocking, get_client

    def read_bytes(self) -> bytes:
        return self.fs.read_bytes(SMALL)

    def read_bytes_in_a_row(self) -> list[float]:
        """IN_A_ROW reads back to back: the time of each."""
        times = []
        for _ in range(IN_A_ROW):
            t0 = time.perf_counter()
            self.fs.read_bytes(SMALL)
            times.append(time.perf_counter() - t0)
        return times

    def write_bytes(self) -> None:
        self.fs.write_bytes(self.data, SMALL)

    def open_read(self) -> bytes:
        with self.sb.open(SMALL, "rb") as f:
            return f.read()

    def exec_cat(self) -> bytes:
        p = self.sb.exec("cat", SMALL, text=False)
        out = p.stdout.read()
        if p.wait() != 0:
            raise RuntimeError(f"cat {SMALL} failed")
        return out

    def host_read(self) -> bytes:
        with open(self.host_path, "rb") as f:
            return f.read()

    def host_write(self) -> None:
        fd = os.open(self.host_tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.write(fd, self.data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(self.host_tmp, self.host_path)

    def health(self) -> None:
        async def call() -> None:
            await (await self._get_client()).call("GET", "/health")

        self._run_blocking(call())

    def check(self) -> None:
        """Every reading case returns the file's bytes."""
        for name in ("read_bytes", "open_read", "exec_cat", "host_read"):
            got = getattr(self, name)()
            if got != self.data:
                raise RuntimeError(f"{name} returned {len(got)} bytes, not the file's contents")


def run_small(cases: SmallCases, iters: int, warmup: int) -> dict[str, list[float]]:
    names = list(SMALL_CASES)
    samples: dict[str, list[float]] = defaultdict(list)
    cases.write_bytes()
    cases.check()
    for i in range(warmup + iters):
        k = i % len(names)
        for name in names[k:] + names[:k]:
            fn = getattr(cases, name)
            if name == "read_bytes_in_a_row":
                if i >= warmup:
                    samples[name].extend(fn())
                else:
                    fn()
                continue
            t0 = time.perf_counter()
            fn()
            dt = time.perf_counter() - t0
            if i >= warmup:
                samples[name].append(dt)
            if name == "exec_cat":
                time.sleep(SETTLE)  # let the server finish the exec's clean-up, untimed
        if (i + 1) % 50 == 0:
            log(f"small files: round {i + 1}/{warmup + iters}")
    cases.check()  # the writes left the right contents behind
    return samples


def pct(ms: list[float], p: int) -> float:
    if len(ms) == 1:
        return ms[0]
    return statistics.quantiles(ms, n=100, method="inclusive")[p - 1]


def small_stats(samples: dict[str, list[float]]) -> dict:
    out = {}
    for name in SMALL_CASES:
        ms = [s * 1000 for s in samples[name]]
        out[name] = {"p50_ms": round(pct(ms, 50), 3), "p99_ms": round(pct(ms, 99), 3),
                     "mean_ms": round(statistics.fmean(ms), 3), "n": len(ms)}
    health = out["health"]["p50_ms"]
    for name, e in out.items():
        e["x_health_p50"] = round(e["p50_ms"] / health, 2)
    return out


# --- big files --------------------------------------------------------------------------------


def make_data(path: Path, size: int) -> str:
    h = hashlib.sha256()
    with open(path, "wb") as f:
        left = size
        while left:
            block = os.urandom(min(WRITE_BLOCK, left))
            h.update(block)
            f.write(block)
            left -= len(block)
        f.flush()
        os.fsync(f.fileno())
    return h.hexdigest()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(4 * MiB):
            h.update(chunk)
    return h.hexdigest()


def copy_fsync(src: Path, dst: Path, fsync: bool) -> None:
    shutil.copyfile(src, dst)
    if fsync:
        fd = os.open(dst, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class BigCases:
    """Each case moves `size` bytes once; `check` verifies what it produced."""

    def __init__(self, sb, rootfs: Path, workdir: Path, src: Path, size: int, digest: str):
        self.sb, self.fs = sb, sb.filesystem
        self.rootfs, self.src, self.size, self.digest = rootfs, src, size, digest
        self.out = workdir / "out.bin"
        self.host_big = rootfs / BIG.lstrip("/")
        self.data: bytes | None = None  # the source in memory, for the exec stdin case
        self.got: bytes | None = None

    def reset(self, case: str) -> None:
        """Untimed: remove outputs of earlier samples, put the input in place, sync."""
        self.got = None
        self.out.unlink(missing_ok=True)
        if BIG_CASES[case][0] == "in":
            self.host_big.unlink(missing_ok=True)
        elif not self.host_big.exists():
            copy_fsync(self.src, self.host_big, fsync=True)
        if case == "exec_stdin" and self.data is None:
            self.data = self.src.read_bytes()
        subprocess.run(["sync"], check=True)

    def copy_from_local(self) -> None:
        self.fs.copy_from_local(self.src, BIG)

    def exec_stdin(self) -> None:
        p = self.sb.exec("sh", "-c", f"cat > {BIG}", text=False)
        p.stdin.write(self.data)
        p.stdin.write_eof()
        p.stdin.drain()
        if p.wait() != 0:
            raise RuntimeError(f"cat > {BIG} failed: {p.stderr.read()!r}")

    def host_in_fsync(self) -> None:
        copy_fsync(self.src, self.host_big, fsync=True)

    def host_in(self) -> None:
        copy_fsync(self.src, self.host_big, fsync=False)

    def copy_to_local(self) -> None:
        self.fs.copy_to_local(BIG, self.out)

    def exec_stdout(self) -> None:
        p = self.sb.exec("cat", BIG, text=False)
        self.got = p.stdout.read()
        if p.wait() != 0:
            raise RuntimeError(f"cat {BIG} failed")

    def host_out_fsync(self) -> None:
        copy_fsync(self.host_big, self.out, fsync=True)

    def host_out(self) -> None:
        copy_fsync(self.host_big, self.out, fsync=False)

    def check(self, case: str) -> None:
        if case == "exec_stdout":
            ok = len(self.got) == self.size and hashlib.sha256(self.got).hexdigest() == self.digest
        elif BIG_CASES[case][0] == "in":
            ok = sha256_file(self.host_big) == self.digest
        else:
            ok = sha256_file(self.out) == self.digest
        if not ok:
            raise RuntimeError(f"{case}: the copied file differs from the source")
        self.got = None


def run_big(cases: BigCases, runs: int) -> dict[str, list[float]]:
    names = list(BIG_CASES)
    samples: dict[str, list[float]] = defaultdict(list)
    for r in range(runs):
        log(f"big files: run {r + 1}/{runs}")
        k = r % len(names)
        for name in names[k:] + names[:k]:
            cases.reset(name)
            t0 = time.perf_counter()
            getattr(cases, name)()
            samples[name].append(time.perf_counter() - t0)
            if r == 0:
                cases.check(name)
            cases.got = None
    cases.out.unlink(missing_ok=True)
    return samples


def big_stats(samples: dict[str, list[float]], size: int) -> dict:
    out = {}
    for name in BIG_CASES:
        rates = [size / s / 1e9 for s in samples[name]]
        out[name] = {"direction": BIG_CASES[name][0],
                     "median_s": round(statistics.median(samples[name]), 3),
                     "median_gbps": round(statistics.median(rates), 3),
                     "min_gbps": round(min(rates), 3), "max_gbps": round(max(rates), 3)}
    for name, e in out.items():
        ref = out[HOST_REF[e["direction"]]]["median_gbps"]
        e["x_host_copy"] = round(e["median_gbps"] / ref, 2)
    return out


# --- report -----------------------------------------------------------------------------------


def cpu_times() -> list[int]:
    with open("/proc/stat") as f:
        return [int(x) for x in f.readline().split()[1:]]


def cpu_usage(start: list[int], end: list[int]) -> dict:
    """Share of all CPUs busy (any process) and stolen by the hypervisor between two samples."""
    d = [b - a for a, b in zip(start, end)]
    total = sum(d[:8]) or 1  # user nice system idle iowait irq softirq steal
    return {"busy_pct": round(100 * (total - d[3] - d[4]) / total, 1),
            "steal_pct": round(100 * d[7] / total, 1) if len(d) > 7 else 0.0}


def machine_info() -> dict:
    import importlib.metadata

    versions = {}
    for pkg in ("httpx", "uvicorn", "fastapi", "h11", "httptools", "uvloop"):
        try:
            versions[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            pass
    return {"nproc": os.cpu_count(), "kernel": platform.release(),
            "python": platform.python_version(), "packages": versions,
            "loadavg_start": round(os.getloadavg()[0], 2)}


def print_table(result: dict) -> None:
    m = result["machine"]
    pkgs = " ".join(f"{k}={v}" for k, v in m["packages"].items())
    print(f"machine: nproc={m['nproc']}  kernel={m['kernel']}  python={m['python']}  "
          f"load1={m['loadavg_start']}->{m['loadavg_end']}")
    print(f"         cpu busy {m['cpu']['busy_pct']}% (all processes, all CPUs), steal "
          f"{m['cpu']['steal_pct']}% during the run; {pkgs}")
    if result.get("small"):
        print_small(result)
    if result.get("big"):
        print_big(result)


def print_small(result: dict) -> None:
    s = result["small"]
    print(f"\n1. small file, 1 KiB: {result['iters']} calls per case (+{result['warmup']} "
          "warm-up), interleaved; ms")
    head = f"{'case':<36} {'p50':>8} {'p99':>8} {'mean':>8} {'p50 / health':>13}"
    print(head)
    print("-" * len(head))
    for name, label in SMALL_CASES.items():
        e = s[name]
        print(f"{label:<36} {e['p50_ms']:>8.3f} {e['p99_ms']:>8.3f} {e['mean_ms']:>8.3f} "
              f"{e['x_health_p50']:>12.2f}x")
    rb, ex = s["read_bytes"]["p50_ms"], s["exec_cat"]["p50_ms"]
    print(f"\nread_bytes vs exec cat: {ex / rb:.1f}x faster at p50; vs host read: "
          f"{rb / s['host_read']['p50_ms']:.0f}x slower; open+read+close: "
          f"{s['open_read']['p50_ms'] / rb:.1f}x read_bytes")
    print(f"goal read_bytes p50 <= {GOAL_P50_MS:g} ms: "
          f"{'MET' if result['goal_met'] else 'NOT MET'} ({rb:.3f} ms one a round; "
          f"{s['read_bytes_in_a_row']['p50_ms']:.3f} ms {IN_A_ROW} in a row)")


def print_big(result: dict) -> None:
    b = result["big"]
    print(f"\n2. big file, {result['size_mib']} MiB: median of {result['runs']} runs; "
          "GB/s = 1e9 bytes/s; ratio = median GB/s / host copyfile+fsync, same direction")
    head = f"{'case':<36} {'median s':>9} {'GB/s':>7} {'min':>7} {'max':>7} {'x host':>7}"
    print(head)
    print("-" * len(head))
    for direction, title in (("in", "into the sandbox"), ("out", "out of the sandbox")):
        print(f"  {title}")
        for name, (d, label) in BIG_CASES.items():
            if d != direction:
                continue
            e = b[name]
            print(f"{label:<36} {e['median_s']:>9.3f} {e['median_gbps']:>7.3f} "
                  f"{e['min_gbps']:>7.3f} {e['max_gbps']:>7.3f} {e['x_host_copy']:>6.2f}x")
    print(f"\ncopy_from_local vs exec stdin: "
          f"{b['copy_from_local']['median_gbps'] / b['exec_stdin']['median_gbps']:.1f}x; "
          f"copy_to_local vs exec stdout: "
          f"{b['copy_to_local']['median_gbps'] / b['exec_stdout']['median_gbps']:.1f}x")
    print("notes: copy_from_local and the host +fsync rows fsync; exec stdin, copy_to_local "
          "and the no-fsync rows do not.")


# --- main -------------------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--iters", type=int, default=200, help="timed small-file calls per case")
    ap.add_argument("--warmup", type=int, default=20, help="uncounted small-file calls first")
    ap.add_argument("--runs", type=int, default=5, help="big-file samples per case (default 5)")
    ap.add_argument("--size-mib", type=int, default=256, help="big file size (default 256)")
    ap.add_argument("--skip-small", action="store_true", help="only the big-file part")
    ap.add_argument("--skip-big", action="store_true", help="only the small-file part")
    ap.add_argument("--images", default=os.environ.get("SHOAL_IMAGES")
                    or str(Path.home() / ".shoal" / "images"),
                    help="image store (default $SHOAL_IMAGES or ~/.shoal/images)")
    ap.add_argument("--json", action="store_true", help="print a JSON object instead of a table")
    args = ap.parse_args()
    if os.geteuid() != 0:
        log("file_bench.py needs root (it runs a shoal server)")
        return 2
    if args.iters < 1 or args.runs < 1 or args.size_mib < 1:
        ap.error("--iters, --runs and --size-mib must be at least 1")
    if args.skip_small and args.skip_big:
        ap.error("nothing to do")

    workdir = Path(tempfile.mkdtemp(prefix="shoal-file-bench-", dir="/tmp"))
    home = workdir / "home"
    os.environ.update(SHOAL_HOME=str(home), SHOAL_IMAGES=str(Path(args.images).absolute()))
    for var in ("SHOAL_SERVER", "SHOAL_TOKEN"):
        os.environ.pop(var, None)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    from shoal.server.images.base import ensure_base_image

    machine = machine_info()
    cpu_start = cpu_times()
    server = sb = None
    result: dict = {"machine": machine}
    try:
        ensure_base_image(Path(os.environ["SHOAL_IMAGES"]), log=log)
        log(f"starting a shoal server in {home}")
        server = start_server(home)
        wait_ready(home, server)
        import shoal

        app = shoal.App.lookup("bench", create_if_missing=True)
        sb = shoal.Sandbox.create(app=app, timeout=3600)
        rootfs = home / "sandboxes" / sb.object_id / "rootfs"
        if not (rootfs / "tmp").is_dir():
            raise RuntimeError(f"no merged rootfs at {rootfs}")
        result["server_pid"] = server.pid

        if not args.skip_small:
            small = SmallCases(sb, rootfs, os.urandom(1024))
            result.update(iters=args.iters, warmup=args.warmup,
                          small=small_stats(run_small(small, args.iters, args.warmup)))
            result["goal_met"] = result["small"]["read_bytes"]["p50_ms"] <= GOAL_P50_MS

        if not args.skip_big:
            size = args.size_mib * MiB
            src = workdir / "local.bin"
            log(f"writing {args.size_mib} MiB of test data")
            digest = make_data(src, size)
            big = BigCases(sb, rootfs, workdir, src, size, digest)
            result.update(runs=args.runs, size_mib=args.size_mib,
                          big=big_stats(run_big(big, args.runs), size))
            big.data = None
        machine["loadavg_end"] = round(os.getloadavg()[0], 2)
        machine["cpu"] = cpu_usage(cpu_start, cpu_times())
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        log("cleaning up")
        if sb is not None:
            try:
                sb.terminate()
            except Exception as e:
                log(f"warning: terminating {sb}: {e}")
        if server:
            stop_server(home, server)
        if unmount_all(workdir):
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            log(f"warning: left {workdir} in place: something is still mounted under it")

    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print_table(result)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        log("interrupted")
        sys.exit(130)
