"""Volume throughput: shoal's SDK and CLI against plain file copies, on the same disk, in one run.

Each case is timed `--runs` times on both sides, interleaved (the side that goes first alternates);
medians are reported as GB/s (decimal: 1e9 bytes/s) with the ratio shoal GB/s / baseline GB/s.

1. read_file, iterated and discarded: `for chunk in vol.read_file(p): pass`
   baselines: `cat <host file> > /dev/null`, and a Python `readinto` loop (1 MiB buffer), both on
   the very file the server reads ($SHOAL_HOME/volumes/<id>/data/...).
2. read_file_into_fileobj into a local file on the same disk; baseline `cp <host file> <dest>`.
3. batch_upload of a local file: `with vol.batch_upload(force=True) as b: b.put_file(src, p)`
   (the server fsyncs every uploaded file); baselines `shutil.copyfile` + `os.fsync`, and
   `dd bs=4M conv=fsync` (a user-space copy in 4 MiB chunks, like the SDK's).
4. the CLI, timed as whole commands (Python start-up and imports included):
   `python -m shoal volume get VOL /FILE DEST --force` against `cp`, and
   `python -m shoal volume put VOL FILE /` against copyfile + fsync. For scale, the time of a
   trivial CLI command (`python -m shoal volume ls VOL /`) is printed too.

Sizes: 256 MiB and 2 GiB (`--quick`, or less than 10 GB free under /tmp, skips 2 GiB). Test data is
os.urandom, written in 64 MiB blocks and fsynced. The page cache is warm: nothing is dropped and
every file is read once before its case is timed. Before every sample, outputs of earlier samples
are deleted and `sync` runs (untimed), so no writeback of an earlier sample lands in a later one.

Every shoal sample runs in a fresh client subprocess (the SDK ones time the transfer itself, after
connecting and looking the volume up), so its peak RSS is its own (ru_maxrss from wait4); the
server's RSS is sampled from /proc/<pid>/status every 20 ms during the sample (its VmHWM covers its
whole life, so it is of no use here), and once just before.

The benchmark runs its own shoal server on a fresh SHOAL_HOME under /tmp (as sandbox_bench.py does)
and removes it, the data and every process it started on exit, Ctrl-C included.

    .venv/bin/python bench/volume_bench.py [--runs 5] [--quick] [--json]
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sandbox_bench import log, start_server, stop_server, wait_ready  # noqa: E402

MiB, GiB = 1 << 20, 1 << 30
SIZES = {"256MiB": 256 * MiB, "2GiB": 2 * GiB}
BLOCK = 64 * MiB
READINTO_BUF = 1 * MiB
MIN_FREE_FOR_2GIB = 10e9
SAMPLE_EVERY = 0.020
VOLUME = "bench-vol"

_children: dict[int, subprocess.Popen] = {}  # live subprocesses of ours, for the cleanup


# --- the client side, in a subprocess -----------------------------------------------------------


def vm_kib(pid: int | str, field: str) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None


def worker(argv: list[str]) -> int:
    """`volume_bench.py _worker MODE VOLUME REMOTE LOCAL`: one timed SDK transfer; prints JSON."""
    mode, name, remote, local = argv
    import shoal

    vol = shoal.Volume.from_name(name)
    vol.hydrate()  # connect and look the volume up before the clock starts
    rss_before = vm_kib("self", "VmRSS")
    chunks = 0
    cpu0 = os.times()
    t0 = time.perf_counter()
    if mode == "read_iter":
        n = 0
        for chunk in vol.read_file(remote):
            n += len(chunk)
            chunks += 1
    elif mode == "read_into":
        with open(local, "wb") as f:
            n = vol.read_file_into_fileobj(remote, f)
    elif mode == "upload":
        with vol.batch_upload(force=True) as b:
            b.put_file(local, remote)
        n = os.path.getsize(local)
    else:
        raise SystemExit(f"unknown worker mode {mode!r}")
    seconds = time.perf_counter() - t0
    cpu1 = os.times()
    cpu = cpu1.user - cpu0.user + cpu1.system - cpu0.system
    print(json.dumps({"seconds": seconds, "cpu_s": cpu, "bytes": n, "chunks": chunks,
                      "rss_before_kib": rss_before, "hwm_kib": vm_kib("self", "VmHWM")}),
          flush=True)
    return 0


# --- measuring ----------------------------------------------------------------------------------


class RssSampler:
    """Max VmRSS of the server, sampled every 20 ms in a thread while the `with` block runs; and
    the last VmHWM seen of the client process, once `client` is set."""

    def __init__(self, pid: int):
        self.pid = pid
        self.before = vm_kib(pid, "VmRSS")
        self.peak = self.before or 0
        self.client: int | None = None
        self.client_hwm = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(SAMPLE_EVERY)

    def _sample(self) -> None:
        rss = vm_kib(self.pid, "VmRSS")
        if rss is not None:
            self.peak = max(self.peak, rss)
        if self.client is not None:
            self.client_hwm = max(self.client_hwm, vm_kib(self.client, "VmHWM") or 0)

    def __enter__(self) -> "RssSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_child(argv: list[str], server_pid: int, capture: bool) -> dict:
    """Run a client process to its end: wall time, its peak RSS, the server's RSS.

    The client's peak is its VmHWM, not ru_maxrss: on Linux, ru_maxrss of a child that was forked
    (or vforked) from this process and then exec'd also counts the memory image it had before the
    exec, a copy of ours, so it is never below this process's RSS. SDK workers read their own
    VmHWM at the end; for CLI commands the sampler reads it every 20 ms while they run."""
    server_cpu0 = cpu_seconds(server_pid)
    with RssSampler(server_pid) as server:
        t0 = time.perf_counter()
        with tempfile.TemporaryFile() as err:
            p = subprocess.Popen(argv, stdin=subprocess.DEVNULL,
                                 stdout=subprocess.PIPE if capture else subprocess.DEVNULL,
                                 stderr=err)
            _children[p.pid] = p
            server.client = p.pid
            out = p.stdout.read() if capture else b""
            _, status, usage = os.wait4(p.pid, 0)
            wall = time.perf_counter() - t0
            p.returncode = os.waitstatus_to_exitcode(status)
            _children.pop(p.pid, None)
            if p.stdout:
                p.stdout.close()
            err.seek(0)
            errors = err.read()[-2000:].decode(errors="replace")
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[1:])} exited with {p.returncode}:\n{errors}")
    return {"wall": wall, "out": out, "client_peak_kib": server.client_hwm,
            "client_cpu_s": usage.ru_utime + usage.ru_stime,
            "server_cpu_s": cpu_seconds(server_pid) - server_cpu0,
            "client_ru_maxrss_kib": usage.ru_maxrss,
            "server_before_kib": server.before, "server_peak_kib": server.peak}


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def run_quiet(*cmd: str) -> None:
    subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, check=True)


def warm(path: Path) -> None:
    """Read a file once so that it is in the page cache."""
    subprocess.run(["cat", str(path)], stdout=subprocess.DEVNULL, check=True)


def readinto_loop(path: Path) -> None:
    buf = bytearray(READINTO_BUF)
    with open(path, "rb", buffering=0) as f:
        while f.readinto(buf):
            pass


def copy_fsync(src: Path, dst: Path) -> None:
    shutil.copyfile(src, dst)
    fd = os.open(dst, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make_data(path: Path, size: int) -> None:
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(BLOCK, left)
            f.write(os.urandom(n))
            left -= n
        f.flush()
        os.fsync(f.fileno())


def rm(*paths: Path) -> None:
    for p in paths:
        p.unlink(missing_ok=True)


class Bench:
    def __init__(self, workdir: Path, home: Path, server_pid: int, runs: int):
        import shoal

        self.shoal = shoal
        self.workdir = workdir
        self.data = workdir / "data"
        self.out = workdir / "out"
        self.data.mkdir()
        self.out.mkdir()
        self.server_pid = server_pid
        self.runs = runs
        self.vol = shoal.Volume.from_name(VOLUME, create_if_missing=True)
        self.vol.hydrate()
        self.voldata = home / "volumes" / self.vol.object_id / "data"
        self.py = sys.executable
        self.me = str(Path(__file__).resolve())
        self.cases: dict[str, dict] = {}

    def remove_remote(self, remote: str) -> None:
        if (self.voldata / remote.lstrip("/")).exists():
            self.vol.remove_file(remote)

    def sdk(self, mode: str, remote: str, local: Path) -> dict:
        r = run_child([self.py, self.me, "_worker", mode, VOLUME, remote, str(local)],
                      self.server_pid, capture=True)
        w = json.loads(r.pop("out").decode().strip().splitlines()[-1])
        r.update(seconds=w["seconds"], bytes=w["bytes"], chunks=w["chunks"],
                 client_before_kib=w["rss_before_kib"], client_cpu_s=w["cpu_s"],
                 client_peak_kib=max(r["client_peak_kib"], w["hwm_kib"]))
        return r

    def cli(self, *args: str) -> dict:
        r = run_child([self.py, "-m", "shoal", *args], self.server_pid, capture=False)
        r.pop("out")
        r["seconds"] = r["wall"]
        return r

    def case(self, key: str, label: str, size: int, shoal_fn, baselines: dict, prep=None,
             landed: Path | None = None) -> None:
        """Time `shoal_fn` (returns a sample dict) and each baseline (a callable), interleaved;
        `prep` runs (untimed) before every sample; `landed` is the file shoal must have written."""
        shoal_samples: list[dict] = []
        base_samples: dict[str, list[float]] = {name: [] for name in baselines}
        for i in range(self.runs):
            log(f"  {label}: run {i + 1}/{self.runs}")
            order = [("shoal", shoal_fn), *baselines.items()]
            if i % 2:
                order.reverse()
            for name, fn in order:
                if prep:
                    prep()
                os.sync()
                if name == "shoal":
                    s = fn()
                    if s.get("bytes") not in (None, size):
                        raise RuntimeError(f"{label}: shoal moved {s['bytes']} bytes, not {size}")
                    if landed and landed.stat().st_size != size:
                        raise RuntimeError(f"{label}: {landed} has {landed.stat().st_size} bytes")
                    shoal_samples.append(s)
                else:
                    base_samples[name].append(timed(fn))
        if prep:
            prep()
        self.cases[key] = summarize_case(label, size, shoal_samples, base_samples)

    def run_size(self, tag: str, size: int) -> None:
        src = self.data / f"src-{tag}.bin"
        remote_read = f"/read-{tag}.bin"
        host_read = self.voldata / remote_read.lstrip("/")
        log(f"[{tag}] writing {size / MiB:.0f} MiB of random data to {src}")
        make_data(src, size)
        log(f"[{tag}] uploading it as {remote_read} (untimed) and checking it")
        with self.vol.batch_upload(force=True) as b:
            b.put_file(str(src), remote_read)
        subprocess.run(["cmp", str(src), str(host_read)], check=True)
        for p in (src, host_read):
            warm(p)

        # 1. read_file, iterated
        self.case(f"read_iter_{tag}", f"read_file {tag}, iterate + discard", size,
                  lambda: self.sdk("read_iter", remote_read, Path("-")),
                  {"cat > /dev/null": lambda: run_quiet("cat", str(host_read)),
                   f"python readinto ({READINTO_BUF // MiB} MiB buf)":
                       lambda: readinto_loop(host_read)})

        # 2. read_file_into_fileobj
        sdk_out, cp_out = self.out / "sdk.bin", self.out / "cp.bin"
        self.case(f"read_into_{tag}", f"read_file_into_fileobj {tag} -> local file", size,
                  lambda: self.sdk("read_into", remote_read, sdk_out),
                  {"cp": lambda: run_quiet("cp", str(host_read), str(cp_out))},
                  prep=lambda: rm(sdk_out, cp_out), landed=sdk_out)

        # 3. batch_upload
        remote_up = f"/up-{tag}.bin"
        copy_out, dd_out = self.out / "copy.bin", self.out / "dd.bin"
        self.case(f"upload_{tag}", f"batch_upload {tag} (server fsyncs)", size,
                  lambda: self.sdk("upload", remote_up, src),
                  {"copyfile + fsync": lambda: copy_fsync(src, copy_out),
                   "dd bs=4M conv=fsync": lambda: run_quiet(
                       "dd", f"if={src}", f"of={dd_out}", "bs=4M", "conv=fsync", "status=none")},
                  prep=lambda: (rm(copy_out, dd_out), self.remove_remote(remote_up)),
                  landed=self.voldata / remote_up.lstrip("/"))

        # 4. CLI get / put
        get_out = self.out / "get.bin"
        self.case(f"cli_get_{tag}", f"CLI volume get {tag} (whole command)", size,
                  lambda: self.cli("volume", "get", VOLUME, remote_read, str(get_out), "--force"),
                  {"cp": lambda: run_quiet("cp", str(host_read), str(cp_out))},
                  prep=lambda: rm(get_out, cp_out), landed=get_out)
        self.case(f"cli_put_{tag}", f"CLI volume put {tag} (whole command)", size,
                  lambda: self.cli("volume", "put", VOLUME, str(src), "/"),
                  {"copyfile + fsync": lambda: copy_fsync(src, copy_out)},
                  prep=lambda: (rm(copy_out), self.remove_remote("/" + src.name)),
                  landed=self.voldata / src.name)

        for remote in (remote_read, remote_up, "/" + src.name):
            self.remove_remote(remote)
        rm(src)
        os.sync()

    def cli_floor(self) -> dict:
        samples = [self.cli("volume", "ls", VOLUME, "/")["seconds"] for _ in range(self.runs)]
        return {"median_s": round(statistics.median(samples), 3),
                "samples_s": [round(s, 3) for s in samples]}


def gbps(size: int, seconds: float) -> float:
    return size / seconds / 1e9


def summarize_case(label: str, size: int, shoal: list[dict], bases: dict[str, list[float]]) -> dict:
    med = statistics.median(s["seconds"] for s in shoal)
    entry = {
        "label": label, "bytes": size,
        "shoal": {
            "median_s": round(med, 4), "gbps": round(gbps(size, med), 3),
            "samples_s": [round(s["seconds"], 4) for s in shoal],
            "client_peak_rss_mib": round(max(s["client_peak_kib"] for s in shoal) / 1024, 1),
            # polluted by the parent's image (see run_child); kept to show why it is not used
            "client_ru_maxrss_mib": round(max(s["client_ru_maxrss_kib"] for s in shoal) / 1024,
                                          1),
            "server_rss_before_mib": round(statistics.median(s["server_before_kib"]
                                                             for s in shoal) / 1024, 1),
            "server_peak_rss_mib": round(max(s["server_peak_kib"] for s in shoal) / 1024, 1),
            "client_cpu_s": round(statistics.median(s["client_cpu_s"] for s in shoal), 3),
            "server_cpu_s": round(statistics.median(s["server_cpu_s"] for s in shoal), 3),
        },
        "baselines": {},
    }
    if shoal[0].get("client_before_kib"):
        entry["shoal"]["client_rss_before_mib"] = round(
            statistics.median(s["client_before_kib"] for s in shoal) / 1024, 1)
    if shoal[0].get("chunks"):
        chunks = statistics.median(s["chunks"] for s in shoal)
        entry["shoal"]["chunks"] = int(chunks)
        entry["shoal"]["mean_chunk_kib"] = round(size / chunks / 1024, 1)
    for name, samples in bases.items():
        bmed = statistics.median(samples)
        entry["baselines"][name] = {
            "median_s": round(bmed, 4), "gbps": round(gbps(size, bmed), 3),
            "samples_s": [round(s, 4) for s in samples],
            "ratio": round(gbps(size, med) / gbps(size, bmed), 3)}
    return entry


# --- report -------------------------------------------------------------------------------------


def versions() -> dict:
    out = {}
    for pkg in ("httpx", "httpcore", "h11", "uvicorn", "starlette", "fastapi", "anyio",
                "httptools", "uvloop"):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def machine_info(workdir: Path) -> dict:
    fs = subprocess.run(["findmnt", "-no", "SOURCE,FSTYPE", "-T", str(workdir)],
                        capture_output=True, text=True).stdout.split()
    with open("/proc/meminfo") as f:
        mem_kib = int(f.readline().split()[1])
    dirty = {}
    for knob in ("dirty_background_ratio", "dirty_ratio"):
        try:
            dirty[knob] = int(Path(f"/proc/sys/vm/{knob}").read_text())
        except OSError:
            dirty[knob] = None
    return {"nproc": os.cpu_count(), "kernel": platform.release(), "vm": dirty,
            "python": platform.python_version(), "disk": " ".join(fs) or "?",
            "ram_gib": round(mem_kib / (1 << 20), 1),
            "loadavg_start": round(os.getloadavg()[0], 2), "packages": versions()}


def print_report(r: dict) -> None:
    m = r["machine"]
    pk = m["packages"]
    print(f"machine: nproc={m['nproc']}  kernel={m['kernel']}  python={m['python']}  "
          f"RAM={m['ram_gib']} GiB  disk={m['disk']} (all files under {r['workdir_parent']})  "
          f"load1={m['loadavg_start']}->{m['loadavg_end']}  "
          + "  ".join(f"vm.{k}={v}" for k, v in m["vm"].items()))
    print("stack: " + ", ".join(f"{k} {v or 'not installed'}" for k, v in pk.items()))
    print(f"N = {r['runs']} runs per case and side, medians; GB/s = 1e9 bytes/s; "
          "ratio = shoal GB/s / baseline GB/s (1.00 = as fast)")
    print("page cache WARM: nothing is dropped, every file is read once before its case; "
          "`sync` (untimed) before every sample")
    print("SDK rows time the transfer only (in a fresh client process, after connecting); "
          "CLI rows time the whole command, Python start-up and imports included")
    for note in r["notes"]:
        print(f"note: {note}")
    print()
    head = f"{'case':<44} {'side':<30} {'median s':>9} {'GB/s':>7} {'ratio':>7}  samples s"
    print(head)
    print("-" * (len(head) + 20))
    for c in r["cases"].values():
        s = c["shoal"]
        extra = f"  ({s['chunks']} chunks, mean {s['mean_chunk_kib']:.0f} KiB)" \
            if "chunks" in s else ""
        print(f"{c['label']:<44} {'shoal':<30} {s['median_s']:>9.3f} {s['gbps']:>7.3f} "
              f"{'':>7}  {' '.join(f'{x:.3f}' for x in s['samples_s'])}{extra}")
        for name, b in c["baselines"].items():
            print(f"{'':<44} {name:<30} {b['median_s']:>9.3f} {b['gbps']:>7.3f} "
                  f"{b['ratio']:>6.2f}x  {' '.join(f'{x:.3f}' for x in b['samples_s'])}")
    f = r["cli_floor"]
    print(f"\nCLI floor, `python -m shoal volume ls {VOLUME} /` (start-up + one call): "
          f"median {f['median_s']:.3f} s")
    print("\nmemory (MiB) and CPU (s, medians). client RSS: VmHWM of the client process, max "
          "over runs (read by the SDK worker at its end; for CLI commands sampled every "
          f"{SAMPLE_EVERY * 1000:.0f} ms). server RSS: VmRSS sampled every "
          f"{SAMPLE_EVERY * 1000:.0f} ms, just before the client starts and max while it runs. "
          "CPU = user + system; client CPU covers the transfer only for SDK rows, the whole "
          "command for CLI rows; server CPU covers the client's lifetime")
    head = f"{'case':<44} {'client before':>13} {'client peak':>12} {'server before':>14} " \
           f"{'server peak':>12} {'client CPU':>11} {'server CPU':>11} {'wall':>7}"
    print(head)
    print("-" * len(head))
    for c in r["cases"].values():
        s = c["shoal"]
        before = f"{s['client_rss_before_mib']:.1f}" if "client_rss_before_mib" in s else "-"
        print(f"{c['label']:<44} {before:>13} {s['client_peak_rss_mib']:>12.1f} "
              f"{s['server_rss_before_mib']:>14.1f} {s['server_peak_rss_mib']:>12.1f} "
              f"{s['client_cpu_s']:>11.2f} {s['server_cpu_s']:>11.2f} {s['median_s']:>7.2f}")


# --- main ---------------------------------------------------------------------------------------


def mounts_under(path: Path) -> list[str]:
    """Mount points at or below `path` (none are expected: volumes are only mounted into
    sandboxes, and this benchmark starts none)."""
    prefix = str(path)
    points = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            point = line.split()[4].encode().decode("unicode_escape")
            if point == prefix or point.startswith(prefix + "/"):
                points.append(point)
    return points


def kill_children() -> None:
    for pid, p in list(_children.items()):
        try:
            p.kill()
        except ProcessLookupError:
            pass
        try:
            os.waitpid(pid, 0)
        except ChildProcessError:
            pass
        p.returncode = -9
        _children.pop(pid, None)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=5, help="measured runs per case and side "
                    "(default 5)")
    ap.add_argument("--quick", action="store_true", help="skip the 2 GiB cases")
    ap.add_argument("--images", default=os.environ.get("SHOAL_IMAGES")
                    or str(Path.home() / ".shoal" / "images"),
                    help="image store (default $SHOAL_IMAGES or ~/.shoal/images; only passed on "
                    "to the server, volumes do not need an image)")
    ap.add_argument("--json", action="store_true", help="print a JSON object instead of a table")
    args = ap.parse_args()
    if args.runs < 1:
        ap.error("--runs must be at least 1")

    workdir = Path(tempfile.mkdtemp(prefix="shoal-volbench-", dir="/tmp"))
    home = workdir / "home"
    os.environ.update(SHOAL_HOME=str(home), SHOAL_IMAGES=str(Path(args.images).absolute()))
    for var in ("SHOAL_SERVER", "SHOAL_TOKEN"):
        os.environ.pop(var, None)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    machine = machine_info(workdir)
    notes: list[str] = []
    sizes = dict(SIZES)
    if args.quick:
        sizes.pop("2GiB")
        notes.append("--quick: 2 GiB cases skipped")
    elif shutil.disk_usage(workdir).free < MIN_FREE_FOR_2GIB:
        sizes.pop("2GiB")
        notes.append(f"2 GiB cases skipped: less than {MIN_FREE_FOR_2GIB / 1e9:.0f} GB free "
                     "under /tmp")
        log(f"warning: {notes[-1]}")
    server = bench = None
    try:
        log(f"starting a shoal server in {home}")
        server = start_server(home)
        wait_ready(home, server)
        bench = Bench(workdir, home, server.pid, args.runs)
        for tag, size in sizes.items():
            bench.run_size(tag, size)
        log("CLI floor")
        floor = bench.cli_floor()
        machine["loadavg_end"] = round(os.getloadavg()[0], 2)
        result = {"machine": machine, "runs": args.runs, "workdir_parent": "/tmp",
                  "notes": notes, "cases": bench.cases, "cli_floor": floor}
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        log("cleaning up")
        steps = [("ending client processes", kill_children)]
        if bench:
            steps.append((f"deleting volume {VOLUME}", lambda: bench.shoal.Volume.objects.delete(
                VOLUME, allow_missing=True)))
        if server:
            steps.append(("stopping the server", lambda: stop_server(home, server)))
        for what, step in steps:  # each step runs even if an earlier one failed
            try:
                step()
            except Exception as e:
                log(f"warning: {what}: {e}")
        if server and server.poll() is None:
            server.kill()
            server.wait()
        mounted = mounts_under(workdir)
        if mounted:
            log(f"warning: left {workdir} in place: {', '.join(mounted)} still mounted")
        else:
            shutil.rmtree(workdir, ignore_errors=True)

    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print_report(result)
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_worker":
        sys.exit(worker(sys.argv[2:]))
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        log("interrupted")
        sys.exit(130)
