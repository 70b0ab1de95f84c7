"""Behaviour that programs written for Modal notice (issue 13), checked against a real server.

Each case names what Modal's client does (read from its source, modal 1.6.4 and, for the FileIO
API Modal removed in 1.6, modal 1.0.5).
"""

from __future__ import annotations

import logging
import os

import pytest

import shoal
from shoal.exception import InvalidError
from shoal.server.host.oci import default_memory_mib

CGROUP = "/sys/fs/cgroup"


def _cg(controller: str, sid: str) -> str:
    return f"{CGROUP}/{controller}/shoal/{sid}"


def test_open_write_is_visible_without_flush_or_close(sandbox):
    # Modal's FileIO.write sends each chunk to the container and waits for it to be written, so
    # another process sees it at once (SWE-bench writes a patch this way and applies it).
    f = sandbox.open("/tmp/patch.diff", "w")
    f.write("--- a\n+++ b\n")
    p = sandbox.exec("cat", "/tmp/patch.diff")
    assert p.stdout.read() == "--- a\n+++ b\n"
    f.write("more\n")
    assert sandbox.exec("wc", "-l", "/tmp/patch.diff").stdout.read().split()[0] == "3"
    f.close()


def test_exec_timeout_returncode_is_minus_one_and_returncode_needs_wait(sandbox):
    p = sandbox.exec("sleep", "30", timeout=1)
    # Modal: ContainerProcess.returncode before wait()/poll() raises InvalidError.
    with pytest.raises(InvalidError, match="wait()"):
        p.returncode
    # Modal: an exec past its deadline waits to -1 (no ExecTimeoutError), output just ends.
    assert p.wait() == -1
    assert p.returncode == -1
    assert p.stdout.read() == ""
    q = sandbox.exec("sh", "-c", "exit 3")
    assert q.wait() == 3 and q.poll() == 3
    k = sandbox.exec("sh", "-c", "kill -9 $$")
    assert k.wait() == 137  # 128 + SIGKILL, as Modal


def test_exec_timeout_poll_after_the_end(sandbox):
    p = sandbox.exec("sleep", "30", timeout=1)
    assert p.poll() is None
    p.wait()
    assert p.poll() == -1


def test_cpu_and_memory_numbers_are_requests_tuples_are_limits(app):
    sb = shoal.Sandbox.create(app=app, timeout=60, cpu=0.5, memory=128)
    try:
        sid = sb.object_id
        # A request: a CPU share, no quota; a memory reservation, the host-protecting cap only.
        assert int(open(f"{_cg('cpu', sid)}/cpu.shares").read()) == 512
        assert int(open(f"{_cg('cpu', sid)}/cpu.cfs_quota_us").read()) == -1
        assert int(open(f"{_cg('memory', sid)}/memory.limit_in_bytes").read()) == \
            default_memory_mib() << 20
        assert int(open(f"{_cg('memory', sid)}/memory.soft_limit_in_bytes").read()) == 128 << 20
        # Bursting past the request works: 300 MB with memory=128.
        p = sb.exec("python3", "-c", "x = b'1' * (300 << 20); print(len(x))")
        assert p.wait() == 0 and p.stdout.read() == f"{300 << 20}\n"
    finally:
        sb.terminate()
    sb = shoal.Sandbox.create(app=app, timeout=60, cpu=(0.25, 1), memory=(64, 256))
    try:
        sid = sb.object_id
        assert int(open(f"{_cg('cpu', sid)}/cpu.shares").read()) == 256
        assert int(open(f"{_cg('cpu', sid)}/cpu.cfs_quota_us").read()) == 100_000
        assert int(open(f"{_cg('memory', sid)}/memory.limit_in_bytes").read()) == 256 << 20
    finally:
        sb.terminate()


@pytest.mark.parametrize("kw, match", [
    ({"cpu": (2, 1)}, "CPU limit lower than request"),
    ({"memory": (512, 256)}, "memory limit lower than request"),
    ({"cpu": (0, 1)}, "CPU request must be a positive number"),
    ({"memory": "1G"}, "memory must be"),
    ({"cpu": (os.cpu_count() or 1) + 1}, "this machine's cores"),
    ({"cpu": (1, (os.cpu_count() or 1) + 1)}, "this machine's cores"),
    ({"memory": 1 << 30}, "this machine's memory"),
])
def test_bad_resources_are_refused(app, kw, match):
    with pytest.raises(InvalidError, match=match):
        shoal.Sandbox.create(app=app, timeout=30, **kw)


def test_oom_killed_sandbox_is_visible(app, caplog):
    sb = shoal.Sandbox.create("python3", "-c", "print('start', flush=True); "
                              "x = b'1' * (400 << 20)", app=app, timeout=60, memory=(32, 64))
    with caplog.at_level(logging.WARNING, logger="shoal"):
        sb.wait()  # Modal: no exception for an OOM kill, the exit code says it
    assert sb.returncode == 137
    assert any("OOM-killed" in r.getMessage() for r in caplog.records)
    entries = list(sb.logs().tail(10))
    assert [e.message for e in entries if e.source == "stdout"] == ["start\n"]
    system = [e for e in entries if e.source == "system"]
    assert len(system) == 1 and "ran out of memory" in system[0].message


def test_logs_tail_and_fetch(app):
    import datetime

    sb = shoal.Sandbox.create("sh", "-c", "echo one; echo two >&2; echo three", app=app,
                              timeout=60)
    sb.wait()
    entries = list(sb.logs().tail())
    assert [(e.source, e.message) for e in entries] == [
        ("stdout", "one\n"), ("stdout", "three\n"), ("stderr", "two\n"),
        ("system", f"sandbox {sb.object_id} ended: exited, returncode 0\n")]
    assert [e.message for e in sb.logs().tail(1, source="stdout")] == ["three\n"]
    now = datetime.datetime.now(datetime.timezone.utc)
    got = list(sb.logs().fetch(since=now - datetime.timedelta(minutes=5), search_text="t"))
    assert [e.message for e in got][:2] == ["three\n", "two\n"] and len(got) == 3  # + system
    assert list(sb.logs().fetch(since=now + datetime.timedelta(minutes=5))) == []
    assert str(entries[0]) == "one\n"


def test_directory_snapshots_and_image_mounts_are_refused(sandbox):
    for call in (lambda: sandbox.snapshot_directory("/tmp"),
                 lambda: sandbox.mount_image("/data", shoal.Image.debian_slim()),
                 lambda: sandbox.unmount_image("/data")):
        with pytest.raises(InvalidError, match="not supported by shoal"):
            call()
