"""Memory snapshots (Modal's `Sandbox._experimental_snapshot` and
`Sandbox._experimental_from_snapshot`): a gVisor sandbox saved with its processes, memory and
files, and new sandboxes that continue from it. The sandboxes ask for gVisor themselves, so these
tests run in a runc session too."""

from __future__ import annotations

import time

import pytest

import shoal
from shoal.exception import (AlreadyExistsError, InvalidError, NotFoundError,
                             SandboxFilesystemNotFoundError, SandboxTerminatedError)

GVISOR = {"runtime": "gvisor"}
# A process whose state lives only in its memory: a random token drawn at start and a counter.
COUNTER = """
import os, time
token = os.urandom(8).hex()
i = 0
while True:
    i += 1
    with open('/root/state.tmp', 'w') as f:
        f.write(f'{token} {i} {os.getpid()}')
    os.replace('/root/state.tmp', '/root/state')
    time.sleep(0.05)
"""


def _state(sb) -> tuple[str, int, int]:
    token, count, pid = sb.filesystem.read_text("/root/state").split()
    return token, int(count), int(pid)


def _exists(sb, path: str) -> bool:
    try:
        sb.filesystem.stat(path)
        return True
    except SandboxFilesystemNotFoundError:
        return False


def _wait_for(pred, what: str, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def _counter(app, **kw):
    sb = shoal.Sandbox.create("python3", "-c", COUNTER, app=app, experimental_options=GVISOR,
                              block_network=True, timeout=300, **kw)
    _wait_for(lambda: _exists(sb, "/root/state"), "the counter did not start")
    return sb


def test_processes_memory_and_files_continue_in_the_restored_sandbox(app):
    sb = _counter(app)
    copies = []
    try:
        sb.filesystem.write_text("from the file API", "/root/note.txt")
        p = sb.exec("sh", "-c", "echo in-memory > /tmp/inmem")  # gVisor's own tmpfs
        assert p.wait() == 0
        snapshot = sb._experimental_snapshot()
        assert isinstance(snapshot, shoal.SandboxSnapshot)
        assert snapshot.object_id.startswith("sn-")
        sb.filesystem.write_text("written after", "/root/after.txt")

        # The source keeps running: its counter goes on, exec and files work.
        token, count, pid = _state(sb)
        _wait_for(lambda: _state(sb)[1] > count, "the source stopped counting")
        assert sb.exec("echo", "source").stdout.read() == "source\n"

        restored = shoal.Sandbox._experimental_from_snapshot(
            shoal.SandboxSnapshot.from_id(snapshot.object_id))
        copies.append(restored)
        assert restored.object_id != sb.object_id and restored.runtime == "gvisor"
        r_token, r_count, r_pid = _state(restored)
        # Same process (its random token is in its memory only), going on from the save.
        assert (r_token, r_pid) == (token, pid)
        _wait_for(lambda: _state(restored)[1] > r_count, "the restored process does not run")
        p = restored.exec("cat", "/tmp/inmem", "/root/note.txt")
        assert p.stdout.read() == "in-memory\nfrom the file API" and p.wait() == 0
        assert not _exists(restored, "/root/after.txt")
        restored.filesystem.write_text("mine", "/root/mine.txt")
        assert restored.filesystem.read_text("/root/mine.txt") == "mine"
        assert not _exists(sb, "/root/mine.txt")  # its own files

        # One snapshot, many sandboxes (fork-like).
        second = shoal.Sandbox._experimental_from_snapshot(snapshot)
        copies.append(second)
        assert _state(second)[0] == token and second.object_id != restored.object_id
    finally:
        for s in [sb, *copies]:
            s.terminate()
    assert restored.poll() == 137


def test_an_exec_running_during_the_snapshot_is_not_cut(app):
    sb = shoal.Sandbox.create(app=app, experimental_options=GVISOR, block_network=True,
                              timeout=120)
    try:
        p = sb.exec("sh", "-c", "for i in $(seq 1 30); do echo $i; sleep 0.05; done; exit 7")
        chunks = iter(p.stdout)
        first = next(chunks)  # the command runs and streams when the snapshot is taken
        snapshot = sb._experimental_snapshot()
        assert first + "".join(chunks) == "".join(f"{i}\n" for i in range(1, 31))
        assert p.wait() == 7
        restored = shoal.Sandbox._experimental_from_snapshot(snapshot)
        try:
            assert restored.exec("true").wait() == 0
        finally:
            restored.terminate()
    finally:
        sb.terminate()


def test_names_of_restored_sandboxes(app):
    sb = shoal.Sandbox.create(app=app, name="snap-named", experimental_options=GVISOR,
                              block_network=True, timeout=120)
    try:
        snapshot = sb._experimental_snapshot()
        with pytest.raises(AlreadyExistsError, match="name=None"):
            shoal.Sandbox._experimental_from_snapshot(snapshot)
        other = shoal.Sandbox._experimental_from_snapshot(snapshot, name="snap-other")
        try:
            assert shoal.Sandbox.from_name("tests", "snap-other").object_id == other.object_id
        finally:
            other.terminate()
    finally:
        sb.terminate()
    kept = shoal.Sandbox._experimental_from_snapshot(snapshot)  # the name is free again
    try:
        assert shoal.Sandbox.from_name("tests", "snap-named").object_id == kept.object_id
    finally:
        kept.terminate()


def test_what_cannot_be_snapshotted_is_refused_with_a_typed_error(app):
    runc = shoal.Sandbox.create(app=app, experimental_options={"runtime": "runc"},
                                block_network=True, timeout=60)
    networked = shoal.Sandbox.create(app=app, experimental_options=GVISOR, timeout=60)
    try:
        with pytest.raises(InvalidError, match="'runtime': 'gvisor'"):
            runc._experimental_snapshot()
        with pytest.raises(InvalidError, match="block_network=True"):
            networked._experimental_snapshot()
        assert runc.exec("true").wait() == 0 and networked.exec("true").wait() == 0
    finally:
        runc.terminate()
        networked.terminate()
    with pytest.raises(SandboxTerminatedError):
        networked._experimental_snapshot()


def test_unknown_snapshots(app):
    with pytest.raises(InvalidError, match="sn-"):
        shoal.SandboxSnapshot.from_id("im-123")
    missing = shoal.SandboxSnapshot.from_id("sn-" + "0" * 22)
    with pytest.raises(NotFoundError):
        missing.hydrate()
    with pytest.raises(NotFoundError):
        shoal.Sandbox._experimental_from_snapshot(missing)
    with pytest.raises(InvalidError, match="SandboxSnapshot"):
        shoal.Sandbox._experimental_from_snapshot("sn-" + "0" * 22)
