"""`shoal sandbox|app|status|stop|serve` run for real, as subprocesses, against real servers."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx
import pytest

from conftest import DEFAULT_IMAGES, leftovers, shoal_cli, temp_home


def cli(*args: str, ok: bool = True, env: dict | None = None, **kw):
    r = shoal_cli(*args, check=False, timeout=120, env=env, **kw)
    if ok:
        assert r.returncode == 0, r.stderr
    return r


@pytest.fixture
def named(app):
    import shoal

    name = f"ops-{uuid.uuid4().hex[:6]}"
    sb = shoal.Sandbox.create("sh", "-c", "echo hello; echo oops >&2; sleep 300", app=app,
                              name=name, tags={"team": "ops", "run": name}, timeout=120)
    yield sb, name
    sb.terminate()


def test_list_inspect_logs_exec(named):
    sb, name = named
    rows = json.loads(cli("sandbox", "list", "--json").stdout)
    assert sb.object_id in [r["sandbox_id"] for r in rows]
    tagged = json.loads(cli("sandbox", "list", "--tag", f"run={name}", "--json").stdout)
    assert [r["sandbox_id"] for r in tagged] == [sb.object_id]
    assert tagged[0]["app_name"] == "tests" and tagged[0]["runtime"] == "runc"
    assert json.loads(cli("sandbox", "list", "--tag", "run=nobody", "--json").stdout) == []
    assert sb.object_id in cli("sandbox", "list", "--app", "tests").stdout
    info = json.loads(cli("sandbox", "inspect", name).stdout)
    assert info["sandbox_id"] == sb.object_id and info["image_id"].startswith("im-")
    deadline = time.monotonic() + 10
    while "hello" not in (r := cli("sandbox", "logs", name)).stdout:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert r.stdout == "hello\n" and r.stderr == "oops\n"
    r = cli("sandbox", "exec", name, "--", "sh", "-c", "echo out; echo err >&2; exit 7", ok=False)
    assert (r.returncode, r.stdout, r.stderr) == (7, "out\n", "err\n")
    r = cli("sandbox", "exec", "-i", sb.object_id, "--", "wc", "-c", input="12345")
    assert r.stdout.strip() == "5"
    assert cli("sandbox", "exec", "-t", name, "--", "tput", "cols",
               env={**os.environ, "COLUMNS": "97", "LINES": "20"}).stdout.strip() == "97"


def _popen_cli(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "shoal", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def test_logs_follow_is_live_and_ends_with_the_sandbox(app):
    import shoal

    sb = shoal.Sandbox.create("sh", "-c", "echo line1; while [ ! -e /tmp/go ]; do sleep 0.1; done;"
                              " echo line2", app=app, timeout=60)
    follow = _popen_cli("sandbox", "logs", "-f", sb.object_id)
    try:
        assert follow.stdout.readline() == "line1\n"  # printed while the sandbox still runs
        assert sb.poll() is None and follow.poll() is None
        sb.exec("touch", "/tmp/go").wait()
        out, err = follow.communicate(timeout=60)
    finally:
        follow.kill()
    assert (follow.returncode, out, err) == (0, "line2\n", "")


def test_ctrl_c_and_closed_pipe_exit_codes(named):
    """Ctrl-C exits 130 and a reader that went away (`| head`) 141, each without a message."""
    sb, name = named
    follow = _popen_cli("sandbox", "logs", "-f", name)
    assert follow.stdout.readline() == "hello\n"
    follow.send_signal(signal.SIGINT)
    _, err = follow.communicate(timeout=60)
    # The entrypoint's stderr ("oops", if its stream was read before the signal), nothing else.
    assert follow.returncode == 130 and err in ("", "oops\n"), err
    stats = _popen_cli("sandbox", "stats", "--interval", "0.1")
    tables = 0
    while tables < 2:  # live: it prints a fresh table again and again
        line = stats.stdout.readline()
        assert line, stats.stderr.read()
        tables += line.startswith("ID ")
    stats.stdout.close()
    assert stats.wait(timeout=60) == 141 and stats.stderr.read() == ""
    r = cli("sandbox", "stats", "--interval", "0", ok=False)
    assert r.returncode == 2 and "--interval" in r.stderr


def test_stop_and_list_all(app):
    import shoal

    a = shoal.Sandbox.create(app=app, name=f"stop-{uuid.uuid4().hex[:6]}", timeout=60)
    b = shoal.Sandbox.create(app=app, timeout=60)
    assert cli("sandbox", "stop", a.object_id, b.object_id).stdout.split() == [a.object_id,
                                                                               b.object_id]
    assert a.poll() == 137
    everything = json.loads(cli("sandbox", "list", "--all", "--json").stdout)
    ended = {r["sandbox_id"]: r for r in everything}
    assert ended[b.object_id]["end_reason"] == "terminated"
    running = {r["sandbox_id"] for r in json.loads(cli("sandbox", "list", "--json").stdout)}
    assert a.object_id not in running and b.object_id not in running
    assert cli("sandbox", "stop", ok=False).returncode == 2  # neither ids nor --all


def test_stats(named):
    sb, name = named
    sb.exec("sh", "-c", "head -c 3000000 /dev/zero > /tmp/blob").wait()
    rows = {r["sandbox_id"]: r for r in json.loads(cli("sandbox", "stats", "--json").stdout)}
    mine = rows[sb.object_id]
    assert mine["memory_bytes"] > 0 and mine["pids"] >= 2  # the agent and the entrypoint
    from shoal.server.host.oci import default_memory_mib
    assert mine["memory_limit"] == default_memory_mib() << 20  # no limit asked: the host cap
    assert mine["disk_bytes"] >= 3_000_000
    assert mine["cpu_percent"] is not None
    table = cli("sandbox", "stats", "--no-stream").stdout
    assert "CPU %" in table and name in table


def test_app_list_and_stop(server):
    import shoal

    app_name = f"ops-app-{uuid.uuid4().hex[:6]}"
    a = shoal.App.lookup(app_name, create_if_missing=True)
    sbs = [shoal.Sandbox.create(app=a, timeout=60) for _ in range(2)]
    apps = {x["name"]: x for x in json.loads(cli("app", "list", "--json").stdout)}
    assert apps[app_name]["sandboxes_running"] == 2
    assert "terminated 2 sandbox(es)" in cli("app", "stop", app_name).stdout
    assert all(sb.poll() == 137 for sb in sbs)
    assert cli("app", "stop", "no-such-app-here", ok=False).returncode == 1


def test_errors_help_and_exit_codes(server):
    r = cli("sandbox", "inspect", "sb-0000000000000000000000", ok=False)
    assert r.returncode == 1 and r.stderr.startswith("Error: ") and len(r.stderr.splitlines()) == 1
    r = cli("sandbox", "logs", "nobody-is-called-this", ok=False)
    assert r.returncode == 1 and "shoal sandbox list" in r.stderr
    for args in (["-h"], ["sandbox", "-h"], ["sandbox", "list", "-h"], ["app", "stop", "-h"],
                 ["status", "--help"], ["shell", "-h"]):
        assert "Usage:" in cli(*args).stdout
    assert "Exit codes" in cli("--help").stdout
    assert cli("sandbox", "list", "--bogus", ok=False).returncode == 2


def test_status(server):
    info = json.loads(cli("status", "--json").stdout)
    assert "runc" in info["runtimes"] and info["version"]
    assert info["pid"] == server.proc.pid and info["uptime"] > 0
    assert info["log_path"].endswith("server.log") and info["disk_used"] > 0
    assert "uptime:" in cli("status").stdout
    with tempfile.TemporaryDirectory(prefix="shoal-none-", dir="/tmp") as empty:
        r = cli("status", ok=False, env={**os.environ, "SHOAL_HOME": empty})
        assert r.returncode == 3 and "no shoal server answers" in r.stderr
        r = cli("sandbox", "list", ok=False, env={**os.environ, "SHOAL_HOME": empty})
        assert r.returncode == 3
        assert not (Path(empty) / "shoal.sock").exists()  # nothing was started


def test_stop_never_signals_a_stranger(tmp_path):
    """A stale server.pid (after kill -9) pointing at some other process: left alone."""
    home = temp_home("shoal-stale-")
    stranger = subprocess.Popen(["sleep", "60"])
    try:
        (home / "server.pid").write_text(str(stranger.pid))
        (home / "server.lock").touch()
        r = cli("stop", env={**os.environ, "SHOAL_HOME": str(home)})
        assert "no server is running" in r.stdout
        assert stranger.poll() is None
    finally:
        stranger.kill()
        stranger.wait()
        shutil.rmtree(home, ignore_errors=True)


def _nobody_env(home: str) -> dict:
    return {**os.environ, "SHOAL_HOME": home, "HOME": home}


def test_non_root_gets_one_sentence():
    home = str(temp_home("shoal-nobody-"))
    os.chmod(home, 0o777)
    drop = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable]
    r = subprocess.run([*drop, "-m", "shoal", "serve"], env=_nobody_env(home),
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1
    assert r.stderr.startswith("Error: shoal needs root") and len(r.stderr.splitlines()) == 1
    r = subprocess.run([*drop, "-c", "import shoal; shoal.App.lookup('x', create_if_missing=True)"],
                       env=_nobody_env(home), capture_output=True, text=True, timeout=60)
    assert "shoal needs root" in r.stderr and "Permission denied" not in r.stderr
    assert not os.path.exists(os.path.join(home, "shoal.sock"))
    shutil.rmtree(home)


def test_ctrl_c_on_foreground_serve_hands_sandboxes_over():
    """Ctrl-C: clean shutdown, the sandbox keeps running, the next server adopts it; JSON log
    lines with events and request ids, the access log, one line for a client abort."""
    home = temp_home()
    env = {**os.environ, "SHOAL_HOME": str(home), "SHOAL_IMAGES": str(DEFAULT_IMAGES)}
    log = home / "fg.log"

    def start(*flags: str):
        return subprocess.Popen([sys.executable, "-m", "shoal", "serve", "--log-format", "json",
                                 *flags], env=env, stdout=open(log, "ab"),
                                stderr=subprocess.STDOUT)

    def events(text: str) -> list[dict]:
        return [json.loads(line) for line in text.splitlines() if line.startswith("{")]

    def http():
        return httpx.Client(transport=httpx.HTTPTransport(uds=str(home / "shoal.sock")),
                            base_url="http://shoal", timeout=30)

    def wait_up(proc):
        for _ in range(600):
            assert proc.poll() is None, log.read_text()[-2000:]
            try:
                with http() as c:
                    if c.get("/health").status_code == 200:
                        return
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise AssertionError("server did not start")

    srv = start("--access-log")
    try:
        wait_up(srv)
        code = ("import shoal; a = shoal.App.lookup('fg', create_if_missing=True); "
                "print(shoal.Sandbox.create(app=a, timeout=120).object_id)")
        sid = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                             text=True, timeout=120, check=True).stdout.strip()
        # A client that goes away in the middle of a streamed response.
        with http() as c, c.stream("GET", f"/sandboxes/{sid}/logs/stdout",
                                   params={"follow": True}, timeout=1) as r:
            assert r.status_code == 200
        with http() as c:  # an error answer: its access-log line carries the client's request id
            assert c.get("/sandboxes/sb-0000000000000000000000",
                         headers={"x-request-id": "req-from-test"}).status_code == 404
        # A client that goes away in the middle of its request's body.
        import socket
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(str(home / "shoal.sock"))
            s.sendall(f"PUT /sandboxes/{sid}/fs/file?path=/tmp/x HTTP/1.1\r\nHost: shoal\r\n"
                      "X-Request-Id: mid-body\r\nContent-Length: 100000\r\n\r\n".encode()
                      + b"x" * 10)
            time.sleep(0.3)  # the route is reading the body now
        deadline = time.monotonic() + 10
        while "mid-body" not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.1)
        srv.send_signal(signal.SIGINT)
        assert srv.wait(timeout=30) == 0
        assert not (home / "shoal.sock").exists()
        first = log.read_text()
        lines = events(first)
        assert {"sandbox.created", "http.request", "client.abort"} <= {e.get("event")
                                                                       for e in lines}
        created = next(e for e in lines if e.get("event") == "sandbox.created")
        assert created["sandbox_id"] == sid and created["request_id"]
        assert any(e.get("event") == "http.request" and e.get("request_id") == "req-from-test"
                   and " 404 " in e["message"] for e in lines)
        aborts = [e for e in lines if e.get("event") == "client.abort"]
        assert len(aborts) == 1 and "/logs/stdout" in aborts[0]["message"]
        mid_body = [e for e in lines if e.get("request_id") == "mid-body"
                    and e.get("event") != "http.request"]
        assert len(mid_body) == 1 and "disconnected" in mid_body[0]["message"], mid_body
        assert "Traceback" not in first
        assert "running sandboxes keep running" in first

        srv = start()  # no --access-log this time
        wait_up(srv)
        with http() as c:
            assert c.get(f"/sandboxes/{sid}").json()["state"] == "running"  # adopted
        code = ("import shoal; a = shoal.App.lookup('fg', create_if_missing=True); "
                "sb = shoal.Sandbox.create(app=a, timeout=120); sb.exec('true').wait(); "
                "print(sb.object_id)")
        other = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                               text=True, timeout=120, check=True).stdout.strip()
        r = subprocess.run([sys.executable, "-m", "shoal", "sandbox", "stop", "--all"], env=env,
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0 and set(r.stdout.split()) == {sid, other}, r.stderr
        with http() as c:
            assert c.get("/ops/sandboxes").json() == []
        deadline = time.monotonic() + 30
        while len([e for e in events(log.read_text()[len(first):])
                   if e.get("event") == "sandbox.ended"]) < 2:
            assert time.monotonic() < deadline, log.read_text()[len(first):][-3000:]
            time.sleep(0.1)
        second = events(log.read_text()[len(first):])
        assert "http.request" not in {e.get("event") for e in second}  # the access log is off
        ended = {e["sandbox_id"]: e for e in second if e.get("event") == "sandbox.ended"}
        assert {ended[i]["reason"] for i in (sid, other)} == {"terminated"}
        assert {ended[i]["returncode"] for i in (sid, other)} == {137}
        started = [e for e in second if e.get("event") == "exec.started"]
        assert [e["sandbox_id"] for e in started] == [other]
        assert any(e.get("event") == "exec.ended" and e.get("exec_id") == started[0]["exec_id"]
                   for e in second)
    finally:
        if srv.poll() is not None:  # failed between the servers: one to end the handed-over
            srv = start()
            wait_up(srv)
        subprocess.run([sys.executable, "-m", "shoal", "stop"], env=env, timeout=120)
        srv.wait(timeout=30)
    assert not leftovers(home)
    shutil.rmtree(home)


def _scrape() -> dict[tuple, float]:
    """The session server's /metrics as {(sample name, sorted labels): value}."""
    from prometheus_client.parser import text_string_to_metric_families

    from shoal import config

    with httpx.Client(transport=httpx.HTTPTransport(uds=str(config.paths().socket)),
                      base_url="http://shoal", timeout=30) as c:
        text = c.get("/metrics").text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(text) for s in f.samples}


def _sum(samples: dict, name: str, **labels) -> float:
    return sum(v for (n, ls), v in samples.items()
               if n == name and all(dict(ls).get(k) == w for k, w in labels.items()))


def test_metrics_move_when_things_happen(app):
    """Each family of /metrics moves when its thing happens (not only exists)."""
    import io

    import shoal
    from conftest import TEST_RUNTIME
    from shoal.exception import AlreadyExistsError, NotFoundError

    deadline = time.monotonic() + 120  # a warm sandbox to hit (earlier tests may have used them)
    while _sum(_scrape(), "shoal_pool_idle") < 1:
        assert time.monotonic() < deadline, "the warm pool never refilled"
        time.sleep(0.5)
    before = _scrape()

    def moved(name: str, **labels) -> float:
        return _sum(_scrape(), name, **labels) - _sum(before, name, **labels)

    pooled = shoal.Sandbox.create(app=app, timeout=60)  # default: served by the warm pool
    name = f"metrics-{uuid.uuid4().hex[:6]}"
    named = shoal.Sandbox.create("sleep", "60", app=app, name=name, timeout=60)  # a pool miss
    with pytest.raises(AlreadyExistsError):
        shoal.Sandbox.create("sleep", "60", app=app, name=name, timeout=60)
    assert moved("shoal_pool_hits_total") >= 1 and moved("shoal_pool_misses_total") >= 1
    assert moved("shoal_sandbox_creations_total", result="ok") == 2
    assert moved("shoal_sandbox_creations_total", result="error") == 1
    assert moved("shoal_sandbox_create_seconds_count") == 2
    assert moved("shoal_errors_total", type="AlreadyExistsError") == 1
    assert moved("shoal_sandboxes", state="running", runtime=TEST_RUNTIME) >= 2

    with pytest.raises(NotFoundError):
        shoal.Sandbox.from_id("sb-0000000000000000000000")
    assert moved("shoal_errors_total", type="NotFoundError") >= 1

    assert pooled.exec("true").wait() == 0
    assert moved("shoal_exec_start_seconds_count") == 1
    pooled.filesystem.write_text("metrics", "/tmp/m.txt")
    assert pooled.filesystem.read_text("/tmp/m.txt") == "metrics"
    assert moved("shoal_file_api_seconds_count", op="put file") == 1
    assert moved("shoal_file_api_seconds_count", op="get file") == 1
    assert list(pooled.watch("/tmp", timeout=1)) == []  # a watch lasts as long as it is asked to
    assert moved("shoal_file_api_seconds_count") == 2  # so it is no latency

    data = os.urandom(12345)
    vol = shoal.Volume.from_name(f"metrics-{uuid.uuid4().hex[:6]}", create_if_missing=True)
    try:
        with vol.batch_upload() as b:
            b.put_file(io.BytesIO(data), "/blob")
        assert b"".join(vol.read_file("blob")) == data
        assert moved("shoal_volume_bytes_total", direction="in") == len(data)
        assert moved("shoal_volume_bytes_total", direction="out") == len(data)
    finally:
        shoal.Volume.objects.delete(vol.name)

    # One build request per image of the chain the SDK has not resolved yet: the (cached) base
    # unless this process built it already, then the new step.
    img = shoal.Image.debian_slim().run_commands(f"echo {uuid.uuid4().hex} > /marker").build()
    assert moved("shoal_image_build_seconds_count", result="ok") in (1, 2)
    from shoal import config  # the build is in the server's (text) log as an event, too
    assert f"[image.built image_id={img.object_id} seconds=" in config.paths().server_log.read_text()
    assert moved("shoal_image_build_seconds_sum") > 0  # the step's time was added (no timing bound:
    # a build container's step took 0.09 s on a quiet machine)
    # A failed build still answers 200 (the failure is the stream's last line): counted as one.
    failing = shoal.Image.debian_slim().run_commands(f"echo {uuid.uuid4().hex}; exit 3")
    with pytest.raises(shoal.exception.Error):
        failing.build()
    assert moved("shoal_image_build_seconds_count", result="error") == 1
    assert moved("shoal_errors_total", type="ExecutionError") == 1

    for sb in (pooled, named):
        sb.terminate()
    assert moved("shoal_sandboxes", state="terminated", runtime=TEST_RUNTIME) >= 2
