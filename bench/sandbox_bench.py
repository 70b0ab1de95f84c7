"""Sandbox latency: the shoal SDK against raw runc commands, on the same machine, in one run.

Three steps are measured on both sides, N times each (medians and p90 are reported):

1. create -> first output, cold
   shoal: `Sandbox.create(app=app, memory=2048)` (the default limit, spelled out, so the warm pool
   does not serve it) until `sb.exec("echo", "hi").stdout.read()` returns "hi\\n".
   raw:   overlay mount + config.json + `runc run --detach` + `runc exec <id> echo hi`.
   Tearing the sandbox down happens after the clock stops.
1b. create -> first output, warm: `Sandbox.create(app=app)` served by the warm pool, then the same
   exec; after each sample the benchmark waits until the pool has refilled (`/health`).
2. exec round trip, in one sandbox started beforehand
   shoal: `p = sb.exec("echo", "hi"); p.stdout.read(); p.wait()`.
   raw:   `runc exec <id> echo hi`, capturing stdout.
2b. exec round trip, 5 in a row: step 2 five times back to back in each round, each a sample: a
   loop of commands as an agent runs them (step 2's single exec comes right after the round's
   container starts and teardowns, with caches and cores cold from them).
3. end to end: step 1, then tear down inside the timed region
   shoal: `sb.terminate()`.
   raw:   `runc kill <id> KILL`, wait for the init to exit, `runc delete`, umount, remove the dir.

The raw side builds its config.json with shoal's own `build_config` (same namespaces, seccomp
filter, tini init and limits as a shoal sandbox), mounts the overlay with the same ctypes call as
the server, and lowers onto the same image, so the difference between the two columns is what the
server, the HTTP API and the SDK add on top of runc. Steps run interleaved (shoal and raw
alternate which goes first), after a few uncounted warm-up rounds. Sub-step times (each SDK call,
each runc command) are recorded too and printed as a breakdown, with two floors for reference:
one SDK HTTP call (`GET /health`) and one fork+exec of `/bin/true` from Python.

The benchmark runs its own shoal server on a fresh SHOAL_HOME under /tmp, reusing the image store
(SHOAL_IMAGES, default ~/.shoal/images) so nothing is rebuilt, and stops it at the end. Raw
containers live under their own runc root and the cgroup parent `shoal-bench`. Everything is
removed on exit, Ctrl-C included. Needs root.

    .venv/bin/python bench/sandbox_bench.py --runs 20 [--warmup 3] [--json]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import select
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

IN_A_ROW = 5  # execs back to back in one round (an agent's loop of commands), each a sample
CGROUP_PARENT = "shoal-bench"
CGROUP_ROOT = Path("/sys/fs/cgroup")
STEPS = {
    "create_first_output": "create -> first output (cold)",
    "warm_first_output": "create -> first output (warm pool)",
    "exec_round_trip": "exec round trip",
    "exec_in_a_row": f"exec round trip, {IN_A_ROW} in a row",
    "end_to_end": "end to end (create, exec, terminate)",
}
EXPECTED = "hi\n"


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class Laps:
    """Named intervals between consecutive `lap` calls; their sum is the timed region."""

    def __init__(self) -> None:
        self.parts: dict[str, float] = {}
        self.last = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.parts[name] = now - self.last
        self.last = now

    @property
    def total(self) -> float:
        return sum(self.parts.values())


def check_output(side: str, out: str | bytes) -> None:
    if out != EXPECTED:
        raise RuntimeError(f"{side}: echo hi printed {out!r}")


class RawRunc:
    """Containers driven with runc's command line only, as the baseline."""

    def __init__(self, workdir: Path, lowerdir: Path):
        from shoal.server import linux as _linux
        from shoal.server.host import tools
        from shoal.server.host.oci import ContainerSpec, build_config

        self._linux, self._spec, self._build_config = _linux, ContainerSpec, build_config
        self.tools_dir, has_busybox = tools.prepare(workdir / "tools")
        self.idle = tools.idle_args(has_busybox)
        self.workdir = workdir
        self.lowerdir = lowerdir
        self.root = workdir / "runc"
        self.root.mkdir(parents=True)
        self.live: dict[str, int] = {}
        self._ids = (f"bench-{os.getpid():07d}-{n:05d}" for n in itertools.count())

    def _runc(self, *args: str, **kwargs) -> subprocess.CompletedProcess:
        return subprocess.run(["runc", "--root", str(self.root), *args], **kwargs)

    def create(self, laps: Laps) -> str:
        cid = next(self._ids)
        bundle = self.workdir / cid
        upper, work, merged = bundle / "upper", bundle / "work", bundle / "rootfs"
        for d in (upper, work, merged):
            d.mkdir(parents=True)
        self.live[cid] = 0
        self._linux.mount("overlay", str(merged), "overlay", 0,
                          f"lowerdir={self.lowerdir},upperdir={upper},workdir={work}")
        spec = self._spec(id=cid, rootfs=str(merged), args=self.idle,
                          tools_dir=str(self.tools_dir))
        config = self._build_config(spec, f"/{CGROUP_PARENT}/{cid}")
        (bundle / "config.json").write_text(json.dumps(config))
        laps.lap("mount + config")
        self._runc("run", "--detach", "--bundle", str(bundle), "--pid-file",
                   str(bundle / "init.pid"), cid, stdin=subprocess.DEVNULL,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
        laps.lap("runc run --detach")
        self.live[cid] = int((bundle / "init.pid").read_text())
        return cid

    def exec_echo(self, cid: str, laps: Laps) -> None:
        proc = self._runc("exec", cid, "echo", "hi", stdin=subprocess.DEVNULL,
                          capture_output=True, text=True)
        laps.lap("runc exec echo")
        if proc.returncode != 0:
            raise RuntimeError(f"runc exec: {proc.stderr.strip()}")
        check_output("raw", proc.stdout)

    def destroy(self, cid: str, laps: Laps) -> None:
        self._runc("kill", cid, "KILL", stdin=subprocess.DEVNULL, check=True)
        wait_exit(self.live[cid])
        laps.lap("runc kill + wait")
        self._runc("delete", cid, stdin=subprocess.DEVNULL, check=True)
        laps.lap("runc delete")
        bundle = self.workdir / cid
        self._linux.umount(str(bundle / "rootfs"))
        shutil.rmtree(bundle)
        laps.lap("umount + rm")
        del self.live[cid]

    def force_remove(self, cid: str) -> None:
        quiet = {"stdin": subprocess.DEVNULL, "stdout": subprocess.DEVNULL,
                 "stderr": subprocess.DEVNULL}
        self._runc("kill", cid, "KILL", **quiet)
        if self.live.get(cid):
            wait_exit(self.live[cid])
        self._runc("delete", "--force", cid, **quiet)
        remove_cgroups(cid)
        bundle = self.workdir / cid
        if unmount_all(bundle):
            shutil.rmtree(bundle, ignore_errors=True)
        self.live.pop(cid, None)

    def close(self) -> None:
        for cid in list(self.live):
            try:
                self.force_remove(cid)
            except Exception as e:
                log(f"warning: removing container {cid}: {e}")
        remove_cgroups()


def wait_exit(pid: int, timeout: float = 10.0) -> None:
    """Wait for a process to end and reap it (it is our child: we are a subreaper)."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        fd = None
    if fd is not None:
        try:
            if not select.select([fd], [], [], timeout)[0]:
                raise TimeoutError(f"process {pid} did not exit within {timeout:.0f} s")
        finally:
            os.close(fd)
    try:
        os.waitpid(pid, 0)
    except ChildProcessError:
        pass


def remove_cgroups(cid: str | None = None) -> None:
    """Remove one container's cgroup dirs, or (no id) the empty `shoal-bench` parents."""
    for controller in CGROUP_ROOT.iterdir():
        target = controller / CGROUP_PARENT / cid if cid else controller / CGROUP_PARENT
        try:
            target.rmdir()
        except OSError:
            pass


def unmount_all(path: Path) -> bool:
    """Lazily unmount everything at or below `path`; True if nothing is left mounted there."""
    from shoal.server import linux as _linux

    for point in _linux.mounts_under(str(path)):
        try:
            _linux.umount(point, _linux.MNT_DETACH)
        except OSError as e:
            log(f"warning: could not unmount {point}: {e}")
    return not _linux.mounts_under(str(path))


class ShoalSide:
    """The same steps through the SDK, against a server of the benchmark's own SHOAL_HOME."""

    def __init__(self) -> None:
        import shoal

        self.shoal = shoal
        self.app = shoal.App.lookup("bench", create_if_missing=True)
        self.live: set = set()

    def create(self, laps: Laps, warm: bool = False):
        sb = self.shoal.Sandbox.create(app=self.app) if warm else \
            self.shoal.Sandbox.create(app=self.app, memory=2048)
        laps.lap("Sandbox.create")
        self.live.add(sb)
        return sb

    def pool_idle(self) -> int:
        from shoal._client import get_client
        from shoal._sync import run_blocking

        async def health() -> dict:
            return await (await get_client()).call("GET", "/health")

        return run_blocking(health()).get("pool_idle", 0)

    def wait_pool(self, want: int = 1, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while self.pool_idle() < want:
            if time.monotonic() > deadline:
                raise RuntimeError("the warm pool did not refill within 30 s")
            time.sleep(0.01)

    def exec_echo(self, sb, laps: Laps, wait: bool = False) -> None:
        p = sb.exec("echo", "hi")
        laps.lap("sb.exec")
        out = p.stdout.read()
        laps.lap("stdout.read")
        if wait:
            p.wait()
            laps.lap("p.wait")
        check_output("shoal", out)

    def terminate(self, sb, laps: Laps | None = None) -> None:
        sb.terminate()
        if laps:
            laps.lap("sb.terminate")
        self.live.discard(sb)

    def http_floor(self) -> float:
        from shoal._client import get_client
        from shoal._sync import run_blocking

        async def health() -> None:
            await (await get_client()).call("GET", "/health")

        t0 = time.perf_counter()
        run_blocking(health())
        return time.perf_counter() - t0

    def close(self) -> None:
        for sb in list(self.live):
            try:
                self.terminate(sb)
            except Exception as e:
                log(f"warning: terminating {sb}: {e}")


def measure_round(shoal: ShoalSide, raw: RawRunc, shoal_sb, raw_cid: str,
                  shoal_first: bool) -> dict[tuple[str, str], Laps]:
    """One sample of every step on both sides."""

    def shoal_first_output() -> Laps:
        laps = Laps()
        sb = shoal.create(laps)
        shoal.exec_echo(sb, laps)
        shoal.terminate(sb)
        return laps

    def raw_first_output() -> Laps:
        laps = Laps()
        cid = raw.create(laps)
        raw.exec_echo(cid, laps)
        raw.destroy(cid, Laps())
        return laps

    def shoal_warm_output() -> Laps:
        shoal.wait_pool()
        laps = Laps()
        sb = shoal.create(laps, warm=True)
        shoal.exec_echo(sb, laps)
        shoal.terminate(sb)
        shoal.wait_pool()
        return laps

    def shoal_exec() -> Laps:
        laps = Laps()
        shoal.exec_echo(shoal_sb, laps, wait=True)
        return laps

    def raw_exec() -> Laps:
        laps = Laps()
        raw.exec_echo(raw_cid, laps)
        return laps

    def shoal_in_a_row() -> list[Laps]:
        return [shoal_exec() for _ in range(IN_A_ROW)]

    def raw_in_a_row() -> list[Laps]:
        return [raw_exec() for _ in range(IN_A_ROW)]

    def shoal_end_to_end() -> Laps:
        laps = Laps()
        sb = shoal.create(laps)
        shoal.exec_echo(sb, laps)
        shoal.terminate(sb, laps)
        return laps

    def raw_end_to_end() -> Laps:
        laps = Laps()
        cid = raw.create(laps)
        raw.exec_echo(cid, laps)
        raw.destroy(cid, laps)
        return laps

    plan = {
        "create_first_output": (shoal_first_output, raw_first_output),
        "warm_first_output": (shoal_warm_output, raw_first_output),
        "exec_round_trip": (shoal_exec, raw_exec),
        "exec_in_a_row": (shoal_in_a_row, raw_in_a_row),
        "end_to_end": (shoal_end_to_end, raw_end_to_end),
    }
    results = {}
    for step, (on_shoal, on_raw) in plan.items():
        order = [("shoal", on_shoal), ("raw", on_raw)]
        for side, fn in order if shoal_first else reversed(order):
            results[(step, side)] = fn()
    return results


def floor_true() -> float:
    t0 = time.perf_counter()
    subprocess.run(["true"], stdin=subprocess.DEVNULL, check=True)
    return time.perf_counter() - t0


def stats_ms(samples: list[float]) -> dict[str, float]:
    ms = [s * 1000 for s in samples]
    p90 = statistics.quantiles(ms, n=10, method="inclusive")[-1] if len(ms) > 1 else ms[0]
    return {"median_ms": round(statistics.median(ms), 2), "p90_ms": round(p90, 2)}


def summarize(samples: dict[tuple[str, str], list[Laps]], floors: dict[str, list[float]]) -> dict:
    steps = {}
    for step in STEPS:
        entry: dict = {}
        for side in ("shoal", "raw"):
            runs = samples[(step, side)]
            entry[side] = stats_ms([r.total for r in runs])
            parts = defaultdict(list)
            for r in runs:
                for name, dt in r.parts.items():
                    parts[name].append(dt)
            entry[side]["breakdown"] = {name: stats_ms(v) for name, v in parts.items()}
        entry["ratio"] = round(entry["shoal"]["median_ms"] / entry["raw"]["median_ms"], 2)
        steps[step] = entry
    return {"steps": steps, "floors": {name: stats_ms(v) for name, v in floors.items()}}


def machine_info() -> dict:
    runc = subprocess.run(["runc", "--version"], capture_output=True, text=True).stdout
    return {"nproc": os.cpu_count(), "kernel": platform.release(),
            "runc": runc.splitlines()[0].removeprefix("runc version ") if runc else "?",
            "python": platform.python_version(),
            "loadavg_start": round(os.getloadavg()[0], 2)}


def print_table(result: dict) -> None:
    m = result["machine"]
    print(f"machine: nproc={m['nproc']}  kernel={m['kernel']}  runc={m['runc']}  "
          f"python={m['python']}  load1={m['loadavg_start']}->{m['loadavg_end']}")
    print(f"N = {result['runs']} runs per step and side (+{result['warmup']} warm-up), "
          "times in ms\n")
    head = f"{'step':<38} {'shoal med':>10} {'raw med':>9} {'ratio':>6} {'shoal p90':>10} " \
           f"{'raw p90':>9}"
    print(head)
    print("-" * len(head))
    for step, label in STEPS.items():
        e = result["steps"][step]
        s, r = e["shoal"], e["raw"]
        print(f"{label:<38} {s['median_ms']:>10.1f} {r['median_ms']:>9.1f} {e['ratio']:>5.2f}x "
              f"{s['p90_ms']:>10.1f} {r['p90_ms']:>9.1f}")
    print("\nbreakdown (median / p90 ms)")
    for step, label in STEPS.items():
        print(f"  {label}")
        for side in ("shoal", "raw"):
            parts = result["steps"][step][side]["breakdown"]
            text = ", ".join(f"{n} {v['median_ms']:.1f}/{v['p90_ms']:.1f}"
                             for n, v in parts.items())
            print(f"    {side:<5}  {text}")
    print("\nfloors (median / p90 ms)")
    for name, v in result["floors"].items():
        print(f"  {name:<38} {v['median_ms']:.2f} / {v['p90_ms']:.2f}")


def start_server(home: Path) -> subprocess.Popen:
    """`shoal serve` for the benchmark's SHOAL_HOME, in its own session (Ctrl-C is ours)."""
    (home / "logs").mkdir(parents=True)
    with open(home / "logs" / "server.log", "ab") as out:
        return subprocess.Popen([sys.executable, "-m", "shoal", "serve"],
                                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)


def wait_ready(home: Path, server: subprocess.Popen) -> None:
    import httpx

    transport = httpx.HTTPTransport(uds=str(home / "shoal.sock"))
    deadline = time.monotonic() + 60
    with httpx.Client(transport=transport, base_url="http://shoal", timeout=5) as client:
        while time.monotonic() < deadline:
            if server.poll() is not None:
                tail = (home / "logs" / "server.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"shoal serve exited with {server.returncode}:\n{tail}")
            try:
                if client.get("/health").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.05)
    raise RuntimeError("shoal serve did not answer within 60 s")


def stop_server(home: Path, server: subprocess.Popen) -> None:
    """`shoal stop` (it terminates the server's sandboxes first); the server is our child, so we
    reap it, and end it ourselves if `shoal stop` could not."""
    env = {**os.environ, "SHOAL_HOME": str(home)}
    stop = subprocess.Popen([sys.executable, "-m", "shoal", "stop"], env=env, text=True,
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    try:
        server.wait(timeout=30)
    except subprocess.TimeoutExpired:
        pass
    out, _ = stop.communicate()
    if server.poll() is None:
        log(f"warning: shoal stop did not end the server ({out.strip()}); sending SIGTERM")
        server.terminate()
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def bench_workdir(prefix: str, images: str | None = None, **env: str) -> tuple[Path, Path]:
    """A fresh working directory under /tmp and the shoal home inside it, set in this process's
    environment (with the image store, `images` or $SHOAL_IMAGES or ~/.shoal/images, and `env`),
    no remote server or token, and SIGTERM turned into a normal exit so clean-up runs."""
    workdir = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    home = workdir / "home"
    images = images or os.environ.get("SHOAL_IMAGES") or str(Path.home() / ".shoal" / "images")
    os.environ.update(SHOAL_HOME=str(home), SHOAL_IMAGES=str(Path(images).absolute()), **env)
    for var in ("SHOAL_SERVER", "SHOAL_TOKEN"):
        os.environ.pop(var, None)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    return workdir, home


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=20, help="measured runs per step (default 20)")
    ap.add_argument("--warmup", type=int, default=3, help="uncounted rounds first (default 3)")
    ap.add_argument("--images", default=os.environ.get("SHOAL_IMAGES")
                    or str(Path.home() / ".shoal" / "images"),
                    help="image store (default $SHOAL_IMAGES or ~/.shoal/images)")
    ap.add_argument("--json", action="store_true", help="print a JSON object instead of a table")
    args = ap.parse_args()
    if os.geteuid() != 0:
        log("sandbox_bench.py needs root (runc, overlay mounts)")
        return 2
    if args.runs < 1:
        ap.error("--runs must be at least 1")

    workdir, home = bench_workdir("shoal-bench-", args.images)

    from shoal.server import linux as _linux
    from shoal.server.images.base import ensure_base_image

    _linux.set_child_subreaper()
    machine = machine_info()
    shoal_side = raw = server = None
    try:
        lowerdir = ensure_base_image(Path(os.environ["SHOAL_IMAGES"]), log=log)
        raw = RawRunc(workdir / "raw", lowerdir)
        log(f"starting a shoal server in {home}")
        server = start_server(home)
        wait_ready(home, server)
        shoal_side = ShoalSide()
        shoal_sb = shoal_side.create(Laps())
        raw_cid = raw.create(Laps())

        samples: dict[tuple[str, str], list[Laps]] = defaultdict(list)
        floors: dict[str, list[float]] = defaultdict(list)
        total = args.warmup + args.runs
        for i in range(total):
            counted = i >= args.warmup
            log(f"round {i + 1}/{total}" + ("" if counted else " (warm-up)"))
            round_ = measure_round(shoal_side, raw, shoal_sb, raw_cid, shoal_first=i % 2 == 0)
            http, true = shoal_side.http_floor(), floor_true()
            if counted:
                for key, laps in round_.items():
                    samples[key].extend(laps if isinstance(laps, list) else [laps])
                floors["SDK HTTP call (GET /health)"].append(http)
                floors["fork+exec /bin/true (subprocess.run)"].append(true)

        machine["loadavg_end"] = round(os.getloadavg()[0], 2)
        result = {"machine": machine, "runs": args.runs, "warmup": args.warmup,
                  **summarize(samples, floors)}
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        log("cleaning up")
        if shoal_side:
            shoal_side.close()
        if raw:
            raw.close()
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
