"""Clients ride through a `kill -9` and restart of the server: streams resume by offset, calls
wait for the server and are repeated only where that cannot repeat their effect."""

from __future__ import annotations

import signal
import threading
import time

import pytest

import shoal

pytestmark = pytest.mark.slow


def test_a_for_line_loop_over_exec_loses_and_repeats_nothing_across_kill_9(server, sandbox):
    n = 150
    p = sandbox.exec("sh", "-c", f"for i in $(seq 1 {n}); do echo line-$i; sleep 0.04; done")
    got = []
    restarted_at = None
    for line in p.stdout:
        got.append(line)
        if len(got) == 10:
            server.restart(signal.SIGKILL)
            restarted_at = len(got)
    assert restarted_at == 10  # precondition: the kill came while output was still coming
    assert got == [f"line-{i}\n" for i in range(1, n + 1)]
    assert p.wait() == 0


def test_calls_after_a_kill_wait_for_the_server_instead_of_failing(server, sandbox):
    server.kill(signal.SIGKILL)
    threading.Timer(1.0, server.start).start()
    began = time.monotonic()
    assert sandbox.exec("echo", "back").stdout.read() == "back\n"
    assert time.monotonic() - began >= 0.9  # precondition: the call met a dead server
    shoal.Sandbox.from_id(sandbox.object_id).poll()


@pytest.mark.parametrize("delay", [0.05, 0.3, 0.8])
def test_a_create_in_flight_at_a_kill_returns_one_sandbox_or_fails_leaving_none(server, app,
                                                                               delay):
    before = {s.object_id for s in shoal.Sandbox.list(app_id=app.app_id)}
    result: dict = {}

    def create():
        try:
            result["sb"] = shoal.Sandbox.create(app=app, timeout=120)
        except Exception as e:  # noqa: BLE001 - failing cleanly is allowed
            result["error"] = e

    t = threading.Thread(target=create)
    t.start()
    time.sleep(delay)
    server.restart(signal.SIGKILL)
    t.join(timeout=90)
    assert not t.is_alive()
    running = {s.object_id for s in shoal.Sandbox.list(app_id=app.app_id)} - before
    if "sb" in result:
        assert running <= {result["sb"].object_id}, "a second sandbox was made"
        result["sb"].terminate()
    else:
        assert isinstance(result["error"], shoal.exception.Error), result["error"]
        assert running == set(), "a sandbox no client holds is running"


@pytest.mark.parametrize("kind", ["sandbox file", "nfs file"])
def test_an_upload_cut_by_a_kill_is_sent_again_and_lands_whole(server, sandbox, tmp_path, kind):
    import hashlib

    local = tmp_path / "big.bin"
    block = hashlib.sha256(kind.encode()).digest() * (1 << 15)  # 1 MiB
    local.write_bytes(block * 192)
    want = hashlib.sha256(local.read_bytes()).hexdigest()
    result: dict = {}
    nfs_ctx = shoal.NetworkFileSystem.ephemeral() if kind == "nfs file" else None
    nfs = nfs_ctx.__enter__() if nfs_ctx else None

    def upload():
        try:
            if nfs is None:
                sandbox.filesystem.copy_from_local(local, "/tmp/big.bin")
            else:
                with open(local, "rb") as f:
                    nfs.write_file("/big.bin", f)
        except Exception as e:  # noqa: BLE001 - reported below
            result["error"] = e

    try:
        t = threading.Thread(target=upload)
        t.start()
        time.sleep(0.05)
        in_flight = t.is_alive()
        server.restart(signal.SIGKILL)
        t.join(timeout=120)
        assert not t.is_alive()
        assert in_flight, "precondition: the kill came while the upload was in flight"
        assert "error" not in result, result.get("error")
        if nfs is None:
            got = sandbox.exec("sha256sum", "/tmp/big.bin").stdout.read().split()[0]
        else:
            got = hashlib.sha256(b"".join(nfs.read_file("/big.bin"))).hexdigest()
        assert got == want
    finally:
        if nfs_ctx:
            nfs_ctx.__exit__(None, None, None)
