"""gVisor beside runc: the shoal SDK on both runtimes, and raw `runsc`, on one machine in one run.

Per runtime (shoal, one server, `experimental_options={"runtime": ...}`; the warm pool is off so
every create is cold):

1. create -> first output: `Sandbox.create(app=app, ...)` until `sb.exec("echo", "hi")
   .stdout.read()` returns "hi\\n" (teardown after the clock stops).
2. exec p50: `p = sb.exec("echo", "hi"); p.stdout.read(); p.wait()` in a running sandbox.
3. file read p50: `sb.filesystem.read_bytes()` of a 1 KiB file.
4. idle memory: PSS (smaps_rollup) of every host process of one idle sandbox — for runc the
   processes in its cgroup, for gVisor the runsc sandbox, gofer and systrap stubs.

Raw runsc (the baseline of the 1.3x goal): overlay mount + shoal's own gVisor config.json
(`gvisor_host.gvisor_config`, same flags as the server: systrap, --network=none, --overlay2=none,
--file-access=shared) + `runsc run --detach` + `runsc exec <id> echo hi`, and `runsc exec` alone.

    .venv/bin/python bench/gvisor_bench.py --runs 20 [--json]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sandbox_bench import (bench_workdir, log, start_server, stop_server, unmount_all, wait_exit,  # noqa: E402
                           wait_ready)


def pss_kib(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total


def sandbox_pids(sid: str, home: Path) -> list[int]:
    pids: set[int] = set()
    for controller in ("memory", "pids", "cpu,cpuacct"):
        f = Path("/sys/fs/cgroup") / controller / "shoal" / sid / "cgroup.procs"
        if f.exists():
            pids.update(int(p) for p in f.read_text().split())
    from shoal.server.host.runsc import RunscRuntime
    pids.update(RunscRuntime(home / "runsc").stray_pids(sid))
    return sorted(pids)


class RawRunsc:
    def __init__(self, workdir: Path, lowerdir: Path):
        from shoal.server import linux as _linux
        from shoal.server.host import tools
        from shoal.server.host.oci import ContainerSpec
        from shoal.server.host.runsc import RunscRuntime

        self._linux, self._spec = _linux, ContainerSpec
        self.tools_dir, has_busybox = tools.prepare(workdir / "tools")
        self.idle = tools.idle_args(has_busybox)
        self.workdir, self.lowerdir = workdir, lowerdir
        self.runtime = RunscRuntime(workdir / "runsc")
        self.live: dict[str, int] = {}
        self._ids = (f"bench-{os.getpid():07d}-{n:05d}" for n in itertools.count())

    def _runsc(self, *args: str, **kw) -> subprocess.CompletedProcess:
        return subprocess.run(self.runtime._cmd(*args), **kw)

    def create(self) -> str:
        from shoal.server.host.gvisor_host import gvisor_config

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
        (bundle / "config.json").write_text(json.dumps(gvisor_config(spec)))
        self._runsc("run", "--detach", "--bundle", str(bundle), "--pid-file",
                    str(bundle / "init.pid"), cid, stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
        self.live[cid] = int((bundle / "init.pid").read_text())
        return cid

    def exec_echo(self, cid: str) -> None:
        p = self._runsc("exec", cid, "echo", "hi", stdin=subprocess.DEVNULL,
                        capture_output=True, text=True)
        if p.stdout != "hi\n":
            raise RuntimeError(f"runsc exec: {p.stdout!r} {p.stderr.strip()}")

    def destroy(self, cid: str) -> None:
        quiet = {"stdin": subprocess.DEVNULL, "stdout": subprocess.DEVNULL,
                 "stderr": subprocess.DEVNULL}
        self._runsc("kill", cid, "KILL", **quiet)
        if self.live.get(cid):
            try:
                wait_exit(self.live[cid])
            except TimeoutError:
                pass
        self._runsc("delete", "--force", cid, **quiet)
        self.runtime.kill_strays(cid)
        import asyncio

        from shoal.server.host.runc import remove_cgroups
        asyncio.run(remove_cgroups(cid))
        while True:  # reap the gofer and helpers (we are their subreaper)
            try:
                if os.waitpid(-1, os.WNOHANG)[0] == 0:
                    break
            except ChildProcessError:
                break
        bundle = self.workdir / cid
        if unmount_all(bundle):
            shutil.rmtree(bundle, ignore_errors=True)
        self.live.pop(cid, None)

    def close(self) -> None:
        for cid in list(self.live):
            self.destroy(cid)


def ms(samples: list[float]) -> dict:
    s = sorted(samples)
    return {"p50": round(statistics.median(s) * 1000, 2),
            "p90": round(s[min(len(s) - 1, int(len(s) * 0.9))] * 1000, 2), "n": len(s)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    workdir, home = bench_workdir("shoal-gvbench-", SHOAL_POOL="0")
    from shoal.server import linux as _linux
    from shoal.server.images.base import ensure_base_image

    _linux.set_child_subreaper()
    server = raw = None
    live = []
    result: dict = {"runs": args.runs, "loadavg_start": os.getloadavg()[0]}
    try:
        lowerdir = ensure_base_image(Path(os.environ["SHOAL_IMAGES"]), log=log)
        raw = RawRunsc(workdir / "raw", lowerdir)
        server = start_server(home)
        wait_ready(home, server)
        import shoal

        app = shoal.App.lookup("bench", create_if_missing=True)
        for runtime in ("runc", "gvisor"):
            opts = {"experimental_options": {"runtime": runtime}, "block_network": True}
            first, execs, reads, pss = [], [], [], []
            for _ in range(args.runs):
                t0 = time.perf_counter()
                sb = shoal.Sandbox.create(app=app, **opts)
                assert sb.exec("echo", "hi").stdout.read() == "hi\n"
                first.append(time.perf_counter() - t0)
                sb.terminate()
            sb = shoal.Sandbox.create(app=app, **opts)
            live.append(sb)
            sb.filesystem.write_bytes(os.urandom(1024), "/tmp/1k")
            for _ in range(args.runs):
                t0 = time.perf_counter()
                p = sb.exec("echo", "hi")
                p.stdout.read()
                p.wait()
                execs.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                assert len(sb.filesystem.read_bytes("/tmp/1k")) == 1024
                reads.append(time.perf_counter() - t0)
            time.sleep(2)
            pss.append(pss_kib(sandbox_pids(sb.object_id, home)))
            result[runtime] = {"create_first_output_ms": ms(first), "exec_ms": ms(execs),
                               "file_read_1k_ms": ms(reads), "idle_pss_mib":
                               round(pss[0] / 1024, 1)}
            log(f"{runtime}: {result[runtime]}")
        first, execs = [], []
        cid = raw.create()
        for _ in range(args.runs):
            t0 = time.perf_counter()
            raw.exec_echo(cid)
            execs.append(time.perf_counter() - t0)
        for _ in range(args.runs):
            t0 = time.perf_counter()
            c = raw.create()
            raw.exec_echo(c)
            first.append(time.perf_counter() - t0)
            raw.destroy(c)
        result["raw runsc"] = {"create_first_output_ms": ms(first), "exec_ms": ms(execs)}
        log(f"raw runsc: {result['raw runsc']}")
        g, r = result["gvisor"], result["raw runsc"]
        result["gvisor_vs_raw_first_output"] = round(
            g["create_first_output_ms"]["p50"] / r["create_first_output_ms"]["p50"], 2)
        result["loadavg_end"] = os.getloadavg()[0]
    finally:
        for sb in live:
            try:
                sb.terminate()
            except Exception:
                pass
        if raw:
            raw.close()
        if server:
            stop_server(home, server)
        if unmount_all(workdir):
            shutil.rmtree(workdir, ignore_errors=True)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        cols = ["runc", "gvisor", "raw runsc"]
        print(f"{'(ms, p50 / p90)':28}" + "".join(f"{c:>20}" for c in cols))
        for key, label in (("create_first_output_ms", "create -> first output"),
                           ("exec_ms", "exec echo"), ("file_read_1k_ms", "file read 1 KiB")):
            cells = []
            for c in cols:
                v = result[c].get(key)
                cells.append(f"{v['p50']:.1f} / {v['p90']:.1f}" if v else "-")
            print(f"{label:28}" + "".join(f"{x:>20}" for x in cells))
        print(f"{'idle PSS per sandbox (MiB)':28}" + "".join(
            f"{result[c].get('idle_pss_mib', '-'):>20}" for c in cols))
        print(f"gVisor create -> first output / raw runsc: {result['gvisor_vs_raw_first_output']}"
              f" (goal <= 1.3); load {result['loadavg_start']:.2f} -> {result['loadavg_end']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
