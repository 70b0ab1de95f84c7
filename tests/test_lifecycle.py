"""Lifecycle features beyond create/exec/terminate: names, tags, idle timeouts, readiness probes,
missing commands, filesystem snapshots."""

from __future__ import annotations

import os
import time
import uuid

import pytest

import shoal
from shoal.exception import InvalidError, NotFoundError, SandboxTimeoutError


def test_missing_command_is_127_like_a_shell(sandbox):
    p = sandbox.exec("no-such-command", "arg")
    assert p.wait() == 127
    assert "not found" in p.stderr.read()
    p = sandbox.exec("/bin/nope")
    assert p.wait() == 127 and "No such file" in p.stderr.read()
    sandbox.exec("bash", "-c", "echo data > /tmp/noexec; chmod 644 /tmp/noexec").wait()
    p = sandbox.exec("/tmp/noexec")  # exists, not executable
    assert p.wait() == 126 and "Permission denied" in p.stderr.read()
    p = sandbox.exec("no-such-command", stderr=shoal.StreamType.STDOUT)
    assert "not found" in p.stdout.read() and p.wait() == 127


def test_commands_are_found_on_the_sandbox_path(app):
    sb = shoal.Sandbox.create(app=app, env={"PATH": "/opt/tools:/usr/bin:/bin"})
    try:
        sb.exec("bash", "-c", "mkdir -p /opt/tools && printf '#!/bin/sh\\necho tool\\n' "
                              "> /opt/tools/mytool && chmod +x /opt/tools/mytool").wait()
        assert sb.exec("mytool").stdout.read() == "tool\n"
        p = sb.exec("./rel", workdir="/opt/tools")
        assert p.wait() == 127
    finally:
        sb.terminate()


def test_from_name_and_tags(app):
    name = f"named-{uuid.uuid4().hex[:8]}"
    sb = shoal.Sandbox.create(app=app, name=name, tags={"a": "1"})
    try:
        same = shoal.Sandbox.from_name("tests", name)
        assert same.object_id == sb.object_id
        assert sb.get_tags() == {"a": "1"}
        sb.set_tags({"role": "worker", "run": "7"})
        assert same.get_tags() == {"role": "worker", "run": "7"}
        assert [s.object_id for s in shoal.Sandbox.list(tags={"role": "worker", "run": "7"})] \
            == [sb.object_id]
        assert list(shoal.Sandbox.list(tags={"role": "other"})) == []
    finally:
        sb.terminate()
    with pytest.raises(NotFoundError):
        shoal.Sandbox.from_name("tests", name)


def test_idle_timeout_ends_an_idle_sandbox_but_not_a_busy_one(app):
    idle = shoal.Sandbox.create(app=app, idle_timeout=1)
    busy = shoal.Sandbox.create(app=app, idle_timeout=1)
    p = busy.exec("sleep", "3")
    with pytest.raises(SandboxTimeoutError):
        idle.wait()
    assert busy.poll() is None, "a sandbox with a running exec is not idle"
    p.wait()
    busy.wait(raise_on_termination=False)
    assert busy.returncode == 124


def test_readiness_probe_exec(app):
    sb = shoal.Sandbox.create(
        "bash", "-c", "sleep 1; touch /tmp/ready; sleep 60", app=app,
        readiness_probe=shoal.Probe.with_exec("test", "-f", "/tmp/ready", interval_ms=50))
    try:
        start = time.monotonic()
        sb.wait_until_ready(timeout=20)
        assert 0.8 < time.monotonic() - start < 10
        assert sb.exec("test", "-f", "/tmp/ready").wait() == 0
    finally:
        sb.terminate()


def test_readiness_probe_tcp_and_timeout(app):
    sb = shoal.Sandbox.create(app=app, readiness_probe=shoal.Probe.with_tcp(8123))
    try:
        with pytest.raises(shoal.exception.TimeoutError):
            sb.wait_until_ready(timeout=1)
        sb.exec("python", "-c", "import socket,time; s=socket.socket(); "
                "s.bind(('127.0.0.1', 8123)); s.listen(); time.sleep(60)")
        sb.wait_until_ready(timeout=20)
    finally:
        sb.terminate()
    with pytest.raises(shoal.exception.SandboxTerminatedError):
        sb.wait_until_ready(timeout=1)


def test_no_probe_is_ready_at_once(sandbox):
    t0 = time.monotonic()
    sandbox.wait_until_ready(timeout=0)  # no waiting allowed: ready as soon as created
    assert time.monotonic() - t0 < 2.0  # one loopback round trip, with room for a busy machine


@pytest.mark.parametrize("kwargs", [
    {"readiness_probe": "tcp"}, {"idle_timeout": 0}, {"idle_timeout": -1},
    {"pty": True, "pty_info": (0, 80)},
])
def test_bad_lifecycle_arguments(app, kwargs):
    with pytest.raises(InvalidError):
        shoal.Sandbox.create(app=app, **kwargs)
    with pytest.raises(InvalidError):
        shoal.Probe.with_tcp(70000)


def test_snapshot_filesystem_carries_changes_and_deletions(app):
    sb = shoal.Sandbox.create(app=app)
    try:
        sb.exec("bash", "-c", "echo state > /root/state.txt; mkdir -p /srv/app; "
                              "echo v1 > /srv/app/code.py; rm /etc/issue").wait()
        image = sb.snapshot_filesystem()
        sb.exec("bash", "-c", "echo later > /root/later.txt").wait()  # after: not in the image
    finally:
        sb.terminate()
    sb2 = shoal.Sandbox.create(app=app, image=image)
    try:
        p = sb2.exec("bash", "-c", "cat /root/state.txt /srv/app/code.py; "
                                   "test -e /etc/issue && echo issue; test -e /root/later.txt "
                                   "&& echo later; python -c 'print(42)'")
        assert p.stdout.read() == "state\nv1\n42\n"
        # A snapshot of a sandbox started from a snapshot stacks another layer.
        sb2.exec("bash", "-c", "echo v2 > /srv/app/code.py").wait()
        image2 = sb2.snapshot_filesystem()
    finally:
        sb2.terminate()
    sb3 = shoal.Sandbox.create(app=app, image=image2)
    try:
        assert sb3.exec("cat", "/srv/app/code.py", "/root/state.txt").stdout.read() == "v2\nstate\n"
    finally:
        sb3.terminate()


def test_snapshots_do_not_contain_volumes_and_are_shared(app):
    from shoal import config

    with shoal.Volume.ephemeral() as vol:
        sb = shoal.Sandbox.create(app=app, volumes={"/data": vol})
        sb.exec("bash", "-c", "echo in-volume > /data/v.txt").wait()
        image = sb.snapshot_filesystem()
        sb.terminate()
    sbs = [shoal.Sandbox.create(app=app, image=image) for _ in range(3)]
    try:
        assert sbs[0].exec("bash", "-c", "ls /data 2>/dev/null | wc -l").stdout.read() == "0\n"
        from shoal.server.images.store import ImageStore

        store = ImageStore(config.paths().images)
        layer = store.layer_path(store.manifest(image.object_id).layers[-1])
        assert layer.is_dir() and (layer / ".shoal").exists() is False
        same = (layer.stat().st_dev, layer.stat().st_ino)
        for sb in sbs:  # every sandbox stacks the same layer directory; nothing is copied
            mounts = open("/proc/self/mountinfo").read()
            line = next(m for m in mounts.splitlines() if sb.object_id in m and "overlay" in m)
            lower = line.split("lowerdir=")[1].split(",")[0].split(":")
            # (under a user namespace each lower dir is an idmapped bind of the layer: the same
            # directory, so the same device and inode)
            assert any((os.stat(d).st_dev, os.stat(d).st_ino) == same for d in lower), lower
    finally:
        for sb in sbs:
            sb.terminate()


def test_snapshot_of_a_finished_sandbox_is_an_error(app):
    sb = shoal.Sandbox.create(app=app)
    sb.terminate()
    with pytest.raises(shoal.exception.SandboxTerminatedError):
        sb.snapshot_filesystem()
    with pytest.raises(NotFoundError):
        shoal.Sandbox.create(app=app, image=shoal.Image.from_id("im-" + "0" * 22))


def test_a_cgroup_whose_processes_were_just_killed_is_still_removed():
    """What a start cut short leaves (a pool sandbox being made when the server stopped): a
    cgroup with live processes in it. `remove_cgroups` kills them and removes the cgroup, which
    the kernel refuses (EBUSY) until they have exited: it must wait for that, not give up at
    once and leave an empty cgroup behind (the session's leak check found such ones)."""
    import asyncio
    import subprocess

    from shoal.server.host.runc import CGROUP_PARENT, CGROUP_ROOT, remove_cgroups

    cid = f"sb-test-{uuid.uuid4().hex[:12]}"
    leaves = [c / CGROUP_PARENT / cid for c in (CGROUP_ROOT / "pids", CGROUP_ROOT / "memory")]
    procs = []
    try:
        for leaf in leaves:
            leaf.mkdir(parents=True)
        for _ in range(8):  # several, some with children: exiting takes a while
            p = subprocess.Popen(["sh", "-c", "sleep 60 & sleep 60 & wait"])
            procs.append(p)
            for leaf in leaves:
                (leaf / "cgroup.procs").write_text(str(p.pid))
        asyncio.run(remove_cgroups(cid))
        assert [leaf for leaf in leaves if leaf.exists()] == []
    finally:
        for p in procs:
            p.kill()
            p.wait()
        for leaf in leaves:
            if leaf.exists():
                for pid in (leaf / "cgroup.procs").read_text().split():
                    os.kill(int(pid), 9)
                time.sleep(0.2)
                leaf.rmdir()
