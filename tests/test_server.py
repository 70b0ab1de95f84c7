"""The server as a process: restarts, crashes, zero set-up, TCP with a token, the API contract."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

import shoal
from conftest import leftovers, shoal_cli, temp_home
from shoal import config

ROOT = Path(__file__).resolve().parent.parent


def test_running_sandbox_is_adopted_after_kill_9(server, app):
    sb = shoal.Sandbox.create(app=app, timeout=120)
    sb.exec("bash", "-c", "echo before > /tmp/state").wait()
    server.restart(signal.SIGKILL)
    p = sb.exec("cat", "/tmp/state")
    assert p.stdout.read() == "before\n"
    assert sb.poll() is None
    sb.terminate()
    assert sb.poll() == 137


def test_adopted_sandbox_still_times_out(server, app):
    sb = shoal.Sandbox.create(app=app, timeout=3)
    server.restart(signal.SIGKILL)
    with pytest.raises(shoal.exception.SandboxTimeoutError):
        sb.wait()
    assert sb.returncode == 124


def test_sandbox_whose_timeout_passed_while_the_server_was_down_is_ended(server, app):
    sb = shoal.Sandbox.create(app=app, timeout=1)
    server.kill(signal.SIGKILL)
    time.sleep(1.5)
    server.start()
    assert sb.poll() == 124
    assert leftovers(config.home(), server_may_run=True, only=sb.object_id) == []


def test_graceful_stop_keeps_sandboxes_for_the_next_server(server, app):
    sb = shoal.Sandbox.create(app=app, timeout=120)
    server.restart(signal.SIGTERM)
    assert sb.exec("echo", "alive").stdout.read() == "alive\n"
    sb.terminate()


def test_leftovers_of_a_crashed_create_are_cleaned(server, app):
    """A container and an overlay mount that no database row knows of (as a crash between
    `runc run` and the insert would leave) are removed by the next server."""
    from shoal.server.images.base import rootfs_if_built
    from shoal.server.host.oci import ContainerSpec, build_config
    from shoal.server.host.rootfs import Rootfs

    paths = config.paths()
    sid = "sb-" + "0" * 22
    sdir = paths.sandboxes / sid
    merged = Rootfs(sdir).mount([rootfs_if_built(paths.images)])
    (sdir / "bundle").mkdir()
    cfg = build_config(ContainerSpec(id=sid, rootfs=str(merged), args=["sleep", "infinity"],
                                     tools_dir=str(paths.home / "tools")), f"/shoal/{sid}")
    (sdir / "bundle" / "config.json").write_text(json.dumps(cfg))
    subprocess.run(["runc", "--root", str(paths.runc_root), "run", "--detach", "--bundle",
                    str(sdir / "bundle"), sid], check=True, stdin=subprocess.DEVNULL,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    server.restart(signal.SIGKILL)
    log_tail = config.paths().server_log.read_text(errors="replace")[-3000:]
    assert leftovers(config.home(), server_may_run=True, only=sid) == [], log_tail
    assert not sdir.exists()


def _fresh_env(home: str) -> dict:
    env = os.environ.copy()
    env["SHOAL_HOME"] = home
    return env


def test_zero_setup_sdk_starts_a_server(server):
    home = str(temp_home("shoal-test-zs-"))
    env = _fresh_env(home)
    try:
        code = ("import shoal\n"
                "sb = shoal.Sandbox.create()\n"
                "print(sb.exec('echo', 'zero').stdout.read(), end='')\n"
                "sb.terminate()\n")
        # Two clients at once start one server between them.
        procs = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for _ in range(2)]
        for p in procs:
            out, err = p.communicate(timeout=120)
            assert p.returncode == 0, err
            assert out == "zero\n"
        assert Path(home, "shoal.sock").exists()
        assert oct(Path(home, "shoal.sock").stat().st_mode & 0o777) == "0o600"
        log = Path(home, "logs", "server.log").read_text()
        assert log.count("shoal server ready") == 1
    finally:
        shoal_cli("stop", env=env, check=False, timeout=60)
        assert leftovers(Path(home)) == []
        subprocess.run(["rm", "-rf", home])


def test_second_server_on_the_same_home_refuses(server):
    r = shoal_cli("serve", check=False, timeout=30)
    assert r.returncode == 1
    assert "already serves" in r.stderr
    assert "Traceback" not in r.stderr


def test_tcp_requires_the_token(server):
    home = str(temp_home("shoal-test-tcp-"))
    env = _fresh_env(home)
    port = 20000 + os.getpid() % 10000
    proc = subprocess.Popen([sys.executable, "-m", "shoal", "serve", "--tcp", f"127.0.0.1:{port}",
                             "--token", "s3cret-token"], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(200):
            try:
                httpx.get(url + "/health", timeout=1)
                break
            except httpx.HTTPError:
                time.sleep(0.05)
        assert httpx.get(url + "/health").status_code == 401
        assert httpx.get(url + "/health", headers={"authorization": "Bearer nope"}).status_code == 401
        ok = httpx.get(url + "/health", headers={"authorization": "Bearer s3cret-token"})
        assert ok.status_code == 200
        code = ("import shoal\n"
                "sb = shoal.Sandbox.create()\n"
                "print(sb.exec('echo', 'tcp').stdout.read(), end='')\n"
                "sb.terminate()\n")
        env2 = {**env, "SHOAL_SERVER": url, "SHOAL_TOKEN": "s3cret-token"}
        r = subprocess.run([sys.executable, "-c", code], env=env2, capture_output=True, text=True,
                           timeout=60)
        assert r.stdout == "tcp\n", r.stderr
        env3 = {**env2, "SHOAL_TOKEN": "wrong"}
        r = subprocess.run([sys.executable, "-c", code], env=env3, capture_output=True, text=True,
                           timeout=60)
        assert r.returncode != 0 and "AuthError" in r.stderr
    finally:
        shoal_cli("stop", env=env, check=False, timeout=60)
        proc.wait(timeout=30)
        assert leftovers(Path(home)) == []
        subprocess.run(["rm", "-rf", home])


def test_unreachable_server_is_a_connection_error(server):
    env = {**os.environ, "SHOAL_SERVER": "/tmp/no-such-shoal.sock"}
    r = subprocess.run([sys.executable, "-c", "import shoal; shoal.Sandbox.create()"], env=env,
                       capture_output=True, text=True, timeout=60)
    assert "shoal.exception.ConnectionError" in r.stderr


def test_openapi_document_is_up_to_date():
    """docs/openapi.json is the API contract; regenerate it with
    `python -m shoal.server.openapi > docs/openapi.json` when the API changes on purpose."""
    from shoal.server.openapi import document

    checked_in = json.loads((ROOT / "docs" / "openapi.json").read_text())
    assert document() == checked_in


@pytest.mark.parametrize("route", ["POST /execs/{exec_id}/stdin", "POST /sandboxes/{sandbox_id}/stdin",
                                   "PUT /sandboxes/{sandbox_id}/fs/file?path=/tmp/x"])
def test_a_client_gone_mid_body_is_not_a_server_crash(server, sandbox, route):
    import socket

    p = sandbox.exec("cat")
    path = route.format(exec_id=p._impl._exec_id, sandbox_id=sandbox.object_id)
    log = config.paths().server_log
    before = log.read_text(errors="replace").count("unhandled error")
    s = socket.socket(socket.AF_UNIX)
    s.connect(str(config.paths().socket))
    s.sendall(f"{path} HTTP/1.1\r\nHost: shoal\r\nContent-Length: 100000\r\n"
              "Content-Type: application/octet-stream\r\n\r\n".encode() + b"x" * 10)
    time.sleep(0.3)  # the route is reading the body now
    s.close()
    deadline = time.monotonic() + 10
    while "client disconnected" not in log.read_text(errors="replace") \
            and time.monotonic() < deadline:
        time.sleep(0.1)
    text = log.read_text(errors="replace")
    assert text.count("unhandled error") == before, text[-3000:]
    assert p.stdin is not None and sandbox.exec("echo", "up").stdout.read() == "up\n"


def _http() -> httpx.Client:
    return httpx.Client(transport=httpx.HTTPTransport(uds=str(config.paths().socket)),
                        base_url="http://shoal", timeout=60)


def _exec(http: httpx.Client, sid: str, body: dict, key: str) -> tuple[int, str]:
    """POST /sandboxes/{sid}/exec with an Idempotency-Key, read to its end: (status, the exec
    id or the error's type)."""
    import struct

    with http.stream("POST", f"/sandboxes/{sid}/exec", json=body,
                     headers={"idempotency-key": key}) as r:
        data = r.read()
    if r.status_code != 200:
        return r.status_code, json.loads(data)["error"]["type"]
    assert data[0] == 0  # the start frame
    (size,) = struct.unpack(">I", data[1:5])
    exec_id = json.loads(data[5:5 + size])["exec_id"]
    assert r.headers["x-shoal-exec-id"] == exec_id  # the head names it too
    return 200, exec_id


def test_an_exec_stream_the_client_leaves_ends_on_the_server(sandbox):
    """A client that stops reading an exec's stream and closes its connection: the server ends
    that answer at once (one client.abort line, no traceback), not when the command next writes
    or ends; the command carries on, and its output can be read again by its id."""
    log = config.paths().server_log
    seen = log.stat().st_size
    script = "echo started; sleep 6; echo done"
    with _http() as http:
        with http.stream("POST", f"/sandboxes/{sandbox.object_id}/exec",
                         json={"args": ["sh", "-c", script]}) as r:
            exec_id = r.headers["x-shoal-exec-id"]
            got = b""
            for chunk in r.iter_raw():
                got += chunk
                if b"started" in got:
                    break
        deadline = time.monotonic() + 4  # well before the command writes again
        while True:
            with open(log, "rb") as f:
                f.seek(seen)
                tail = f.read().decode(errors="replace")
            if f"client went away during POST /sandboxes/{sandbox.object_id}/exec" in tail:
                break
            assert time.monotonic() < deadline, tail[-2000:]
            time.sleep(0.1)
        assert "Traceback" not in tail and "Exception in ASGI" not in tail
        done = http.get(f"/execs/{exec_id}/wait", params={"timeout": 15}).json()
        assert done["done"] and done["returncode"] == 0


def test_the_server_keeps_its_startup_heap_out_of_full_collections(server):
    """What the server holds once started (modules, routes, services: ~86,000 objects) is
    frozen out of the cyclic collector: a full collection of it held the event loop ~120 ms."""
    ready = re.findall(r"\[server\.ready gc_frozen=(\d+)\]",
                       config.paths().server_log.read_text(errors="replace"))
    assert ready, "no server.ready line in the server's log"
    assert int(ready[-1]) > 10_000


def test_a_repeated_exec_request_runs_its_command_once(app, sandbox):
    sid, key = sandbox.object_id, f"exec-{os.getpid()}-{time.time()}"
    run = {"args": ["sh", "-c", "echo run >> /tmp/runs"]}
    other = shoal.Sandbox.create(app=app, timeout=60)
    try:
        with _http() as http:
            first = _exec(http, sid, run, key)
            assert first[0] == 200
            assert _exec(http, sid, run, key) == first
            # The key belongs to that request: not to another sandbox's, running or not.
            assert _exec(http, other.object_id, run, key) == (400, "InvalidError")
            assert _exec(http, "sb-" + "0" * 22, run, key) == (400, "InvalidError")
            # A request exec refuses stores nothing under its key.
            bad = {"args": ["true"], "pty_rows": 24}
            assert _exec(http, sid, bad, key + "-2") == (400, "InvalidError")
            assert _exec(http, sid, {"args": ["true"]}, key + "-2")[0] == 200
    finally:
        other.terminate()
    assert sandbox.exec("cat", "/tmp/runs").stdout.read() == "run\n"


def test_answers_carry_the_request_id_and_versions_and_a_keyed_post_is_answered_once(server):
    key = f"app-{os.getpid()}-{time.time()}"
    with _http() as http:
        r = http.get("/health", headers={"x-request-id": "req-123"})
        assert r.headers["x-request-id"] == "req-123" and r.headers["x-shoal-api-versions"] == "1"
        assert len(http.get("/health").headers["x-request-id"]) == 12
        body = {"name": f"idem-{os.getpid()}", "create_if_missing": True}
        first = http.post("/apps/lookup", json=body, headers={"idempotency-key": key})
        again = http.post("/apps/lookup", json=body, headers={"idempotency-key": key})
        assert first.status_code == again.status_code == 200 and again.json() == first.json()
        assert again.headers["idempotent-replayed"] == "true"
        assert "idempotent-replayed" not in first.headers
        assert again.headers["x-shoal-api-versions"] == "1" and again.headers["x-request-id"]
        other = http.post("/volumes/lookup", json=body, headers={"idempotency-key": key})
        assert other.status_code == 400 and "another request" in other.json()["error"]["message"]
        refused = http.get("/health", headers={"x-shoal-api-version": "0"})
        assert refused.status_code == 400 and refused.headers["x-shoal-api-versions"] == "1"
