"""Test harness: every session gets its own SHOAL_HOME and its own real server.

The image store is shared with the set-up's (SHOAL_IMAGES), so a session does not rebuild the
default image; everything else — database, socket, volumes, sandboxes, runc state — is the
session's, and the session checks at the end that it left no container, mount or process behind.
"""

from __future__ import annotations

import os
import concurrent.futures
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TEST_RUNTIME = os.environ.get("SHOAL_TEST_RUNTIME") or "runc"  # runc | gvisor
# The server's SHOAL_USERNS (passed on through the environment): runc sandboxes in user namespaces.
TEST_USERNS = TEST_RUNTIME == "runc" and os.environ.get("SHOAL_USERNS", "1") != "0"
DEFAULT_IMAGES = Path(os.environ.get("SHOAL_IMAGES") or Path.home() / ".shoal" / "images")


def _orphaned_test_servers() -> list[tuple[int, str]]:
    """(pid, SHOAL_HOME) of `shoal serve` processes that earlier test sessions left when they were
    killed before their teardown: a live session's server is its pytest's child, an orphan's
    parent is PID 1."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
            stat = (entry / "stat").read_text()
            env = dict(kv.split("=", 1) for kv in (entry / "environ").read_text().split("\0")
                       if "=" in kv)
        except OSError:
            continue
        if b"serve" not in cmdline or b"shoal" not in cmdline:
            continue
        home = env.get("SHOAL_HOME", "")
        ppid = stat[stat.rfind(")") + 2:].split()[1]
        if home.startswith("/tmp/shoal-test-") and ppid == "1":
            found.append((int(entry.name), home))
    return found


def _clean_after_killed_sessions() -> None:
    """Machines are reused: stop what a killed test session left (servers, their sandboxes, old
    homes), so this session starts clean and its own leak check means something."""
    for pid, home in _orphaned_test_servers():
        if _server_alive(Path(home)) and Path(home, "session.pid").exists():
            continue  # a live session's own (restarted) server
        env = {**os.environ, "SHOAL_HOME": home}
        subprocess.run([sys.executable, "-m", "shoal", "stop"], env=env, capture_output=True,
                       timeout=60)
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    cutoff = time.time() - 600
    for old in Path("/tmp").glob("shoal-test-*"):
        if old.stat().st_mtime > cutoff or _server_alive(old):
            continue  # a live session's, or too recent to tell
        if leftovers(old):
            # Sandboxes of a session killed mid-run: a server on that home adopts them at start
            # (reconcile), and `shoal stop` terminates them and cleans their mounts and cgroups.
            env = {**os.environ, "SHOAL_HOME": str(old)}
            srv = subprocess.Popen([sys.executable, "-m", "shoal", "serve"], env=env,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            deadline = time.monotonic() + 30
            while not (old / "shoal.sock").exists() and time.monotonic() < deadline:
                time.sleep(0.1)
            subprocess.run([sys.executable, "-m", "shoal", "stop"], env=env,
                           capture_output=True, timeout=120)
            srv.wait(timeout=30)
        if not leftovers(old):
            shutil.rmtree(old, ignore_errors=True)


def _server_alive(home: Path) -> bool:
    try:  # the home's test session still runs (its server may be mid-restart)
        os.kill(int((home / "session.pid").read_text()), 0)
        return True
    except (OSError, ValueError):
        pass
    try:
        os.kill(int((home / "server.pid").read_text()), 0)
        return True
    except (OSError, ValueError):
        return False


def pytest_configure(config):
    # Before any SDK import reads the environment. A short path: Unix socket paths are limited.
    home = Path(tempfile.mkdtemp(prefix="shoal-test-", dir="/tmp"))
    os.environ["SHOAL_HOME"] = str(home)
    os.environ["SHOAL_IMAGES"] = str(DEFAULT_IMAGES)
    os.environ["SHOAL_LEASE_TTL"] = "3"
    # Tests restart the server themselves (ServerProcess.restart); an SDK that restarts it too
    # after losing it would race them for the server lock. Later than any restart takes here.
    os.environ["SHOAL_AUTOSTART_AFTER"] = "120"
    os.environ.pop("SHOAL_SERVER", None)
    os.environ.pop("SHOAL_TOKEN", None)
    # --- runtimes (issue 10): SHOAL_TEST_RUNTIME=gvisor runs the session's server with gVisor as
    # its default runtime, so every sandbox the tests make is a gVisor one.
    os.environ["SHOAL_RUNTIME"] = TEST_RUNTIME
    config._shoal_home = home
    config._started = time.time()
    (home / "session.pid").write_text(str(os.getpid()))  # whose home this is, for other sessions
    if not hasattr(config, "workerinput"):
        _clean_after_killed_sessions()
        from networld import clean_stale

        clean_stale()


def temp_home(prefix: str = "shoal-test-") -> Path:
    """A fresh directory under /tmp for a test's own shoal home, marked as this session's (so a
    concurrent session's leak check does not count it as a leak). The test removes it."""
    home = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    (home / "session.pid").write_text(str(os.getpid()))
    return home


def shoal_cli(*args: str, env: dict | None = None, check: bool = True, **kw):
    return subprocess.run([sys.executable, "-m", "shoal", *args], env=env or os.environ.copy(),
                          check=check, capture_output=True, text=True, **kw)


def _die_with_parent() -> None:
    import ctypes

    ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


# PR_SET_PDEATHSIG fires when the *thread* that forked the child ends, not the process: a server
# started from a short-lived thread (a test's threading.Timer) got SIGTERM as soon as that thread
# returned. Every server is therefore forked by this one thread, which lives as long as pytest.
_SPAWNER = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="server-spawner")


class ServerProcess:
    """The session's `shoal serve`, which tests may kill and restart."""

    def __init__(self, home: Path):
        self.home = home
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        from shoal import config

        paths = config.paths()
        paths.logs.mkdir(parents=True, exist_ok=True)
        self._end_others(paths)
        log = open(paths.server_log, "ab")
        # The server dies with this pytest (PR_SET_PDEATHSIG) if the session is killed before
        # its teardown; a normal teardown stops it with `shoal stop`.
        self.proc = _SPAWNER.submit(
            subprocess.Popen, [sys.executable, "-m", "shoal", "serve"], stdout=log, stderr=log,
            stdin=subprocess.DEVNULL, start_new_session=True, preexec_fn=_die_with_parent,
        ).result()
        import httpx

        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, paths.server_log.read_text()[-3000:]
            try:
                with httpx.Client(transport=httpx.HTTPTransport(uds=str(paths.socket)),
                                  base_url="http://shoal", timeout=2) as c:
                    if c.get("/health").status_code == 200:
                        return
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise RuntimeError("server did not start in 60 s: " + paths.server_log.read_text()[-3000:])

    def _end_others(self, paths) -> None:
        """A server of this home that is not ours (an SDK call that found the server gone
        started one, as clients do) would answer in place of ours: the session owns this home,
        so end it first."""
        try:
            pid = int(paths.server_pid.read_text())
        except (OSError, ValueError):
            return
        if self.proc is not None and pid == self.proc.pid:
            return
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + 30
        while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
            try:
                if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                    break
            except (OSError, IndexError):
                break
            time.sleep(0.05)

    def kill(self, sig: int = signal.SIGKILL) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)
        self.proc.wait(timeout=30)

    def restart(self, sig: int = signal.SIGKILL) -> None:
        self.kill(sig)
        self.start()

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            shoal_cli("stop", check=False, timeout=120)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture(scope="session")
def world():
    """The session's test "outside world" (tests/networld.py). The server's sandboxes resolve
    names through its DNS server first, then the host's resolvers (for the slow pip test)."""
    from networld import World
    from shoal.server.network.manager import host_resolvers

    w = World().start()
    os.environ["SHOAL_NET_DNS"] = ",".join([w.world_ip, *host_resolvers()])
    yield w
    w.close()


@pytest.fixture(scope="session")
def server(pytestconfig, world):
    from shoal.server.images.base import ensure_base_image

    ensure_base_image(DEFAULT_IMAGES, log=lambda line: None)
    srv = ServerProcess(pytestconfig._shoal_home)
    srv.start()
    yield srv
    srv.stop()


def pytest_report_header(config):
    return f"shoal sandbox runtime: {TEST_RUNTIME} (SHOAL_TEST_RUNTIME)"


def runc_only(reason: str):
    """Skip a test under gVisor: `reason` says what about it is runc's by nature."""
    return pytest.mark.skipif(TEST_RUNTIME != "runc", reason=f"runc only: {reason}")


@pytest.fixture(scope="session")
def app(server):
    import shoal

    return shoal.App.lookup("tests", create_if_missing=True)


@pytest.fixture
def sandbox(app):
    import shoal

    sb = shoal.Sandbox.create(app=app, timeout=120)
    yield sb
    sb.terminate()


def server_log_size() -> int:
    """Where the session server's log ends now (for `server_log_since`)."""
    from shoal import config

    return config.paths().server_log.stat().st_size


def server_log_since(offset: int) -> str:
    """What the session server logged after `offset` (`server_log_size()` taken before)."""
    from shoal import config

    with open(config.paths().server_log, "rb") as f:
        f.seek(offset)
        return f.read().decode(errors="replace")


# Server log lines that are bugs whatever the test saw: a route's traceback, a task dropped
# while it still waited.
LOG_CRASHES = ("unhandled error in", "Exception in ASGI application",
               "Task was destroyed but it is pending")


def sandbox_host_pid(sb) -> int:
    """A runc sandbox's init (its agent) as the host sees it."""
    import json

    out = subprocess.run(["runc", "--root", str(Path(os.environ["SHOAL_HOME"]) / "runc"),
                          "state", sb.object_id], capture_output=True, text=True, timeout=30,
                         check=True).stdout
    return int(json.loads(out)["pid"])


def sandbox_cgroups(sid: str) -> list[Path]:
    """The host cgroup directories of a sandbox (cgroupsPath /shoal/<sid>) on cgroup v1 (one per
    controller: /sys/fs/cgroup/<controller>/shoal/<sid>), v2 (/sys/fs/cgroup/shoal/<sid>) or a
    hybrid host (/sys/fs/cgroup/unified/shoal/<sid>)."""
    root = Path("/sys/fs/cgroup")
    return [p for p in [root / "shoal" / sid, *root.glob(f"*/shoal/{sid}")] if p.is_dir()]


def leftovers(home: Path, server_may_run: bool = False, only: str | None = None) -> list[str]:
    """Containers, mounts, cgroups and processes that a finished test session must not leave
    (`only`: of that one sandbox)."""
    found = []
    runc_root = home / "runc"
    if runc_root.exists():
        out = subprocess.run(["runc", "--root", str(runc_root), "list", "-q"],
                             capture_output=True, text=True).stdout.split()
        found += [f"container {c}" for c in out]
    runsc_root = home / "runsc"
    if runsc_root.exists():
        out = subprocess.run(["runsc", "--root", str(runsc_root), "list", "-quiet"],
                             capture_output=True, text=True).stdout.split()
        found += [f"gvisor container {c}" for c in out]
        from shoal.server.host.runsc import RunscRuntime
        found += [f"runsc process {p}" for p in RunscRuntime(runsc_root).stray_pids()]
    with open("/proc/self/mountinfo") as f:
        found += [f"mount {line.split()[4]}" for line in f if str(home) in line.split()[4]]
    sandboxes = home / "sandboxes"
    for sid in (os.listdir(sandboxes) if sandboxes.exists() else []):
        found += [f"cgroup {c}" for c in sandbox_cgroups(sid)]
    found += [f"bucket mount process {pid}" for pid in _bucket_mount_processes(home)]
    # --- disk limits (issue 10): loop devices bound to a sandbox's disk image, and the images
    from shoal.server.host.disk import loop_devices_of

    found += [f"loop device {d}" for d in loop_devices_of(str(home))]
    found += [f"disk image {p}" for p in sandboxes.glob("*/disk.img")] if sandboxes.exists() \
        else []
    # --- end disk limits
    if only:
        found = [f for f in found if only in f]
    pid_file = home / "server.pid"
    if not server_may_run and not _server_alive(home):
        # Namespaces, interfaces and the nft table of this home (shoal.server.network): none once
        # its server has stopped with no sandbox running.
        from shoal.server.network.manager import leftovers as network_leftovers

        found += network_leftovers(home)
    if pid_file.exists() and not server_may_run:
        try:
            state = Path(f"/proc/{int(pid_file.read_text())}/stat").read_text()
            if state.rsplit(")", 1)[1].split()[0] != "Z":  # a zombie has exited already
                found.append(f"server process {pid_file.read_text()}")
        except (FileNotFoundError, ValueError):
            pass
    return found


def _bucket_mount_processes(home: Path) -> list[int]:
    """s3fs/rclone processes serving a mount under `home` (bucket mounts end with their sandbox)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv and Path(argv[0].decode(errors="replace")).name in ("s3fs", "rclone") \
                and any(str(home).encode() in a for a in argv):
            pids.append(int(entry.name))
    return pids


def stray_temp_dirs(home: Path, since: float) -> list[str]:
    """Homes and test worlds that this session's tests made under /tmp and did not remove (a
    concurrent session's own are told apart by its live pid)."""

    def suspects() -> list[Path]:
        found = []
        for d in [*Path("/tmp").glob("shoal-test-*"), *Path("/tmp").glob("shoal-nobody-*"),
                  *Path("/tmp").glob("shoal-stale-*"), *Path("/tmp").glob("shoal-world-*")]:
            try:
                if d == home or d.stat().st_ctime < since:
                    continue
                owner = (d / "session.pid").read_text() if (d / "session.pid").exists() else \
                    (d.name.split("-")[2] if d.name.startswith("shoal-world-") else "")
            except OSError:
                continue
            if owner.isdigit() and int(owner) != os.getpid() and Path(f"/proc/{owner}").exists():
                continue  # another live session's
            found.append(d)
        return found

    first = suspects()
    if first:
        # A concurrent session's home is briefly without its session.pid while it is made or
        # removed: a real leak is still there, unowned, a moment later.
        time.sleep(2)
        first = [d for d in suspects() if d in first]
    return [f"temporary dir {d}" for d in first]


def pytest_sessionfinish(session, exitstatus):
    home = getattr(session.config, "_shoal_home", None)
    if home is None:
        return
    # The server fixture has stopped the server by now; anything left is a leak.
    left = leftovers(home) + stray_temp_dirs(home, session.config._started)
    if left:
        print("\nLEAKED after the test session:\n  " + "\n  ".join(left), file=sys.stderr)
        session.exitstatus = 1
    log = home / "logs" / "server.log"
    crashes = [line for line in log.read_text(errors="replace").splitlines()
               if any(c in line for c in LOG_CRASHES)] if log.exists() else []
    if crashes:
        # A request the server answered with its last-resort 500: a bug, whatever the test saw.
        # Reported, not failed on: the routes' own tests check their errors; this catches the
        # paths no test aimed at (SHOAL_TEST_STRICT_LOG=1 fails the session on them).
        print("\nthe server crashed on requests (see its log):\n  " + "\n  ".join(crashes),
              file=sys.stderr)
        if os.environ.get("SHOAL_TEST_STRICT_LOG") == "1":
            session.exitstatus = 1
    if session.exitstatus != 0 and log.exists():
        # Kept for whoever reads the failure (CI prints where it is).
        kept = f"/tmp/shoal-last-failed-server-{os.getpid()}.log"
        shutil.copy(log, kept)
        print(f"\nthe session's server log: {kept}", file=sys.stderr)
        session.config._server_log_problems = [
            line[:300] for line in log.read_text(errors="replace").splitlines()
            if " WARNING " in line or " ERROR " in line or "Traceback" in line][-12:]
    shutil.rmtree(home, ignore_errors=True)


def pytest_unconfigure(config):
    # After pytest's own summary, so that a reader who sees only the end of a failed run's output
    # (CI) sees what the server complained of.
    problems = getattr(config, "_server_log_problems", None)
    if problems:
        print("\nthe server log's last warnings and errors:\n  " + "\n  ".join(problems),
              file=sys.stderr)
