"""The sandbox service as a state machine, against the in-memory FakeHost: milliseconds a test,
no containers. What runc and gVisor must do is in the end-to-end tests; this is what the control
plane does with what a host tells it."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from shoal.exception import (AlreadyExistsError, ExecutionError, InvalidError, NotFoundError,
                             SandboxTerminatedError)
from shoal.server.control.sandboxes import SandboxService, exec_sandbox
from shoal.server.control.volumes import VolumeService
from shoal.server.host.base import HostError
from shoal.server.host.fake import FakeHost
from shoal.server.images.store import ImageConfig, Manifest
from shoal.server.models import CreateSandbox, ExecRequest, ProbeSpec
from shoal.server.storage.state import AppRecord, SqliteStore
from shoal.server.storage.volumes import LocalVolumeStorage


class FakeImages:
    def __init__(self) -> None:
        self.image = Manifest("im-test", ["layers/a"], ImageConfig(env={"A": "1"}), time.time())
        self.snapshots = 0

    def manifest(self, image_id: str) -> Manifest:
        if image_id != self.image.id:
            raise NotFoundError(image_id)
        return self.image

    async def default(self) -> Manifest:
        return self.image

    async def mount_layers(self, m: Manifest) -> list[Path]:
        return [Path("/nonexistent/layer")]

    async def snapshot(self, parent: Manifest, export) -> str:
        import tempfile

        with tempfile.TemporaryDirectory() as d:
            await export(Path(d))
            self.snapshots += 1
            return f"im-snap{self.snapshots}"


@pytest.fixture
def env(tmp_path):
    """(service, host, app id), inside a running event loop."""
    store = SqliteStore(tmp_path / "state.db")
    store.app_create(AppRecord("ap-1", "tests", time.time()))
    vols = VolumeService(store, LocalVolumeStorage(tmp_path / "volumes"))
    host = FakeHost()
    svc = SandboxService(store, host, vols, FakeImages())
    return svc, host


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 10))


def create(**kw) -> CreateSandbox:
    return CreateSandbox(app_id="ap-1", **kw)


def unchecked(**kw) -> CreateSandbox:
    """A request the wire schema would refuse: the service must refuse it too."""
    return CreateSandbox(app_id="ap-1").model_copy(update=kw)


async def started(svc: SandboxService) -> SandboxService:
    await svc.start()
    return svc


async def drain(svc: SandboxService, exec_id: str) -> tuple[bytes, bytes, int]:
    out = {"stdout": b"", "stderr": b""}
    code = None
    async for stream, data in svc.exec_output(exec_id, {}):
        if stream == "exit":
            code = data
        elif stream != "end":
            out[stream] += data
    return out["stdout"], out["stderr"], code


def test_create_records_then_runs_and_exit_finalizes(env):
    svc, host = env

    async def go():
        await started(svc)
        rec = await svc.create(create(args=["sleep"]))
        assert rec.state == "running" and host.boxes[rec.id].spec.env == {"A": "1"}
        host.exit(rec.id, 3)
        done = await svc.wait(rec.id, 5)
        assert (done.state, done.returncode, done.end_reason) == ("terminated", 3, "exited")
        assert ("destroy", rec.id) in host.calls and rec.id not in svc.live
        await svc.close()
    run(go())


def test_oom_is_the_end_reason(env):
    svc, host = env

    async def go():
        await started(svc)
        rec = await svc.create(create())
        host.exit(rec.id, 137, oom=True)
        done = await svc.wait(rec.id, 5)
        assert (done.returncode, done.end_reason) == (137, "oom")
        await svc.close()
    run(go())


def test_terminate_is_137_and_timeout_is_124(env):
    svc, host = env

    async def go():
        await started(svc)
        a = await svc.create(create())
        assert (await svc.terminate(a.id)).returncode == 137
        b = await svc.create(create(timeout=0.05))
        done = await svc.wait(b.id, 5)
        assert (done.returncode, done.end_reason) == (124, "timeout")
        await svc.close()
    run(go())


def test_failed_create_leaves_a_terminated_row_and_no_live_state(env):
    svc, host = env

    async def go():
        await started(svc)
        host.fail_create = HostError("runc said no")
        with pytest.raises(ExecutionError, match="runc said no"):
            await svc.create(create())
        [rec] = svc.store.sandbox_list()
        assert (rec.state, rec.end_reason) == ("terminated", "failed-to-start")
        assert not svc.live and ("destroy", rec.id) in host.calls
        await svc.close()
    run(go())


def test_bad_requests_are_refused_before_the_host_is_asked(env):
    svc, host = env

    async def go():
        await started(svc)
        for bad in (unchecked(timeout=0), unchecked(name="a\n"), unchecked(name="x" * 65),
                    unchecked(name="."), unchecked(name=".."), unchecked(tags={"a\n": "1"}),
                    create(workdir="/proc/x"), unchecked(env={"A=B": "1"}),
                    unchecked(args=["a\x00b"])):
            with pytest.raises(InvalidError):
                await svc.create(bad)
        assert not [c for c in host.calls if c[0] == "create"]
        await svc.close()
    run(go())


def test_names_are_unique_among_running_sandboxes(env):
    svc, host = env

    async def go():
        await started(svc)
        a = await svc.create(create(name="web"))
        with pytest.raises(AlreadyExistsError):
            await svc.create(create(name="web"))
        await svc.terminate(a.id)
        await svc.create(create(name="web"))
        await svc.close()
    run(go())


def test_a_short_commands_output_and_exit_come_in_one_batch(env):
    """What is ready together goes to the client together (one write): the output of a command
    that has already ended, the other stream's end and the exit code; not one batch each."""
    svc, _ = env

    async def go():
        await started(svc)
        sb = await svc.create(create())
        rec = await svc.exec(sb.id, ExecRequest(args=["echo", "hi"]))
        await asyncio.sleep(0.05)  # it has ended, and the service has seen its exit
        batches = [b async for b in svc.exec_output_batches(rec.id, {})]
        assert batches == [[("stdout", b"hi\n"), ("exit", 0)]]
        await svc.close()
    run(go())


def test_exec_streams_output_then_exit_code(env):
    svc, host = env

    async def go():
        await started(svc)
        sb = await svc.create(create())
        rec = await svc.exec(sb.id, ExecRequest(args=["echo", "hi"]))
        assert exec_sandbox(rec.id) == sb.id
        assert await drain(svc, rec.id) == (b"hi\n", b"", 0)
        rec = await svc.exec(sb.id, ExecRequest(args=["fail", "4"], stderr="stdout"))
        assert await drain(svc, rec.id) == (b"failed\n", b"", 4)
        assert await svc.exec_wait(rec.id, 1) == 4
        spec = host.boxes[sb.id].execs[rec.id].spec
        assert spec.env == {"A": "1"} and spec.stderr == "stdout"
        await svc.close()
    run(go())


def test_a_command_too_large_to_send_is_refused_before_anything_is_stored(env):
    """Arguments and environment over what one agent frame carries (the sandbox's environment
    counts): InvalidError, the host never asked, the Idempotency-Key not spent; a command at
    the limit runs."""
    svc, host = env

    async def go():
        await started(svc)
        sb = await svc.create(create())
        for req in (ExecRequest(args=["echo", "x" * (1 << 20)]),
                    ExecRequest(args=["true", *["a"] * 3999]),
                    ExecRequest(args=["env"], env={f"V{i}": "1" for i in range(4000)})):
            for key, first in ((None, False), ("k-1", True), ("k-1", False)):
                with pytest.raises(InvalidError, match="too large"):
                    await svc.exec(sb.id, req, key, first)
        assert [c for c in host.calls if c[0] == "exec"] == []
        await asyncio.sleep(0.05)
        assert await svc.astore.idempotent_get("k-1") is None
        ok = await svc.exec(sb.id, ExecRequest(args=["echo", "x" * 1000]), "k-1", True)
        assert (await drain(svc, ok.id))[2] == 0
        await svc.close()
    run(go())


def test_exec_wait_answers_at_the_process_exit_while_its_output_is_held(env):
    """A command that exits leaving a background child with its output (`sh -c "server &"`):
    exec_wait (the SDK's wait/poll) answers at the process's exit, as Popen.wait would; the
    output stream and its exit frame still end only when the output does."""
    svc, host = env

    async def go():
        await started(svc)
        sb = await svc.create(create())
        rec = await svc.exec(sb.id, ExecRequest(args=["serve-in-background"]))
        assert await svc.exec_wait(rec.id, 0) is None  # running
        host.exit_exec(sb.id, rec.id, 0, output_open=True)
        assert await svc.exec_wait(rec.id, 2) == 0
        assert not rec.done.is_set()
        stream = asyncio.ensure_future(drain(svc, rec.id))
        await asyncio.sleep(0.05)
        assert not stream.done()  # the output is still open
        host.end_exec_output(sb.id, rec.id)
        assert (await stream)[2] == 0
        # A command that runs a while has its exit watched before anyone asks (poll() then
        # sees it at once); a short one never has it.
        rec2 = await svc.exec(sb.id, ExecRequest(args=["serve-in-background"]))
        await asyncio.sleep(0.2)
        assert rec2.exit_watch is not None
        host.exit_exec(sb.id, rec2.id, 5, output_open=True)
        await asyncio.sleep(0.05)
        assert await svc.exec_wait(rec2.id, 0) == 5
        short = await svc.exec(sb.id, ExecRequest(args=["echo", "hi"]))
        await asyncio.sleep(0.2)
        assert short.exit_watch is None and await svc.exec_wait(short.id, 0) == 0
        await svc.close()
    run(go())


def test_exec_on_an_ended_sandbox_is_terminated_error(env):
    svc, host = env

    async def go():
        await started(svc)
        sb = await svc.create(create())
        await svc.terminate(sb.id)
        with pytest.raises(SandboxTerminatedError):
            await svc.exec(sb.id, ExecRequest(args=["echo"]))
        with pytest.raises(NotFoundError):
            svc.get_exec("ex-nonsense")
        await svc.close()
    run(go())


def test_running_exec_ends_with_its_sandbox(env):
    svc, host = env

    async def go():
        await started(svc)
        sb = await svc.create(create())
        rec = await svc.exec(sb.id, ExecRequest(args=["sleep"]))
        assert await svc.exec_wait(rec.id, 0) is None
        await svc.terminate(sb.id)
        assert await svc.exec_wait(rec.id, 1) == 137
        await svc.close()
    run(go())


def test_stdin_offsets_make_retries_harmless(env):
    svc, host = env

    async def go():
        await started(svc)
        sb = await svc.create(create())
        rec = await svc.exec(sb.id, ExecRequest(args=["cat"]))
        assert await svc.exec_stdin(rec.id, b"abc", False, 0) == 3
        assert await svc.exec_stdin(rec.id, b"abc", False, 0) == 3  # the retry
        assert await svc.exec_stdin(rec.id, b"de", False, 3) == 5
        assert bytes(host.boxes[sb.id].execs[rec.id].stdin) == b"abcde"
        await svc.close()
    run(go())


def test_idle_timeout_spares_sandboxes_with_running_commands(env):
    svc, host = env

    async def go():
        await started(svc)
        idle = await svc.create(create(idle_timeout=0.05))
        busy = await svc.create(create(idle_timeout=0.05))
        await svc.exec(busy.id, ExecRequest(args=["sleep"]))
        await asyncio.sleep(0.1)
        svc.stop_idle()
        done = await svc.wait(idle.id, 5)
        assert (done.end_reason, done.returncode) == ("idle-timeout", 124)
        assert svc.get(busy.id).state == "running"
        await svc.close()
    run(go())


def test_readiness_probe_waits_for_the_port(env):
    svc, host = env

    async def go():
        await started(svc)
        sb = await svc.create(create(readiness_probe=ProbeSpec(tcp_port=8000, interval_ms=10)))
        assert await svc.wait_ready(sb.id, 0.05) is False
        host.open_ports.add(8000)
        assert await svc.wait_ready(sb.id, 2) is True
        await svc.close()
    run(go())


def test_reconcile_adopts_running_and_ends_the_rest(env):
    svc, host = env

    async def go():
        await started(svc)
        keep = await svc.create(create())
        lost = await svc.create(create())
        expired = await svc.create(create(timeout=60))
        await svc.close()
        host.boxes[lost.id].running = False  # died while no server ran
        svc.store.sandbox_update(expired.id, deadline=time.time() - 1)
        host.boxes["sb-" + "0" * 22] = host.boxes[keep.id].__class__(host.boxes[keep.id].spec)

        again = SandboxService(svc.store, host, svc.volumes, svc.images)
        await again.start()
        assert set(again.live) == {keep.id}
        assert again.get(lost.id).end_reason == "server-restart"
        assert (again.get(expired.id).end_reason, again.get(expired.id).returncode) == \
            ("timeout", 124)
        assert "sb-" + "0" * 22 not in host.boxes  # an orphan no row knows
        await again.close()
    run(go())


def test_snapshot_exports_through_the_host(env):
    svc, host = env

    async def go():
        await started(svc)
        sb = await svc.create(create())
        host.boxes[sb.id].files["/etc/x"] = b"1"
        assert await svc.snapshot(sb.id) == "im-snap1"
        await svc.close()
    run(go())


def test_background_tasks_are_drained_on_close(env):
    svc, host = env

    async def go():
        await started(svc)
        sb = await svc.create(create(timeout=30, readiness_probe=ProbeSpec(tcp_port=1,
                                                                            interval_ms=10)))
        await svc.exec(sb.id, ExecRequest(args=["sleep"]))
        assert svc.tasks
        await svc.close()
        assert not svc.tasks
    run(go())


# --- the warm pool ---------------------------------------------------------------------------------

def pooled_env(tmp_path, sizes, refill_delay=0.0):
    store = SqliteStore(tmp_path / "state.db")
    store.app_create(AppRecord("ap-1", "tests", time.time()))
    vols = VolumeService(store, LocalVolumeStorage(tmp_path / "volumes"))
    host = FakeHost()
    return SandboxService(store, host, vols, FakeImages(), sizes, refill_delay), host


async def until(cond, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.005)


def test_pool_serves_plain_requests_and_refills_to_its_size(tmp_path):
    svc, host = pooled_env(tmp_path, {"default": 2})

    async def go():
        await svc.start()
        await until(lambda: svc.pool.total() == 2)
        warm = set(host.boxes)
        rec = await svc.create(create(env={"B": "2"}, workdir="/work", name="w"))
        assert rec.id in warm and svc.pool.hits == 1
        assert ("create", rec.id) in host.calls and host.calls.count(("create", rec.id)) == 1
        assert rec.spec["env"] == {"A": "1", "B": "2"} and rec.name == "w"
        await until(lambda: svc.pool.total() == 2)
        assert len(host.boxes) == 3  # two idle, one claimed: never more than asked
        ex = await svc.exec(rec.id, ExecRequest(args=["echo", "x"]))
        assert await drain(svc, ex.id) == (b"x\n", b"", 0)
        assert host.boxes[rec.id].execs[ex.id].spec.cwd == "/work"
        await svc.close()
        assert len(host.boxes) == 1  # the idle ones are removed at shutdown; the claimed stays
    run(go())


def test_a_pool_start_in_flight_when_the_server_stops_finishes_and_is_removed(tmp_path):
    """The server stops while the pool is starting a sandbox (a test session's end, right after
    its last sandbox left): the start is not cut short halfway through the runtime's commands
    (under gVisor that left a container `runsc delete` could not remove); it finishes, and the
    sandbox is removed with the idle ones."""
    svc, host = pooled_env(tmp_path, {"default": 1})

    async def go():
        host.create_seconds = 0.3
        await svc.start()
        await asyncio.sleep(0.1)  # the pool's first start is under way
        await svc.close()
        assert host.creates_cut == 0
        assert host.boxes == {}  # started, then removed
        created = [c[1] for c in host.calls if c[0] == "create"]
        assert len(created) == 1 and ("destroy", created[0]) in host.calls
    run(go())


def test_the_pool_refills_a_while_after_a_sandbox_left_it(tmp_path):
    """The refill (a runtime start) waits `refill_delay` after a claim, so that it does not
    compete with the first commands of the sandbox just handed out; the first fill does not."""
    svc, host = pooled_env(tmp_path, {"default": 1}, refill_delay=1.0)

    async def go():
        began = time.monotonic()
        await svc.start()
        await until(lambda: svc.pool.total() == 1)
        assert time.monotonic() - began < 1.0  # the first fill starts at once
        claimed = time.monotonic()  # (the claim, and so the delay, starts after this)
        rec = await svc.create(create())
        assert svc.pool.hits == 1 and svc.pool.total() == 0
        await asyncio.sleep(0.5)
        assert svc.pool.total() == 0 and len(host.boxes) == 1  # nothing started yet
        await until(lambda: svc.pool.total() == 1)
        assert time.monotonic() - claimed >= 1.0 and len(host.boxes) == 2
        await svc.terminate(rec.id)
        await svc.close()
    run(go())


def test_pool_refill_delay_parses(monkeypatch):
    from shoal.server.control.pool import refill_delay

    monkeypatch.delenv("SHOAL_POOL_REFILL_DELAY", raising=False)
    assert refill_delay() == 0.5
    monkeypatch.setenv("SHOAL_POOL_REFILL_DELAY", "0")
    assert refill_delay() == 0.0
    for bad in ("soon", "-1", "61"):
        monkeypatch.setenv("SHOAL_POOL_REFILL_DELAY", bad)
        with pytest.raises(ValueError):
            refill_delay()


def test_pool_is_not_used_for_requests_it_cannot_serve_exactly(tmp_path):
    svc, host = pooled_env(tmp_path, {"default": 1})

    async def go():
        await svc.start()
        await until(lambda: svc.pool.total() == 1)
        from shoal.server.models import Resources
        for req in (create(args=["sleep"]), create(resources=Resources(memory=512)),
                    create(block_network=True), create(cidr_allowlist=["198.18.0.0/15"])):
            rec = await svc.create(req)
            assert svc.pool.total() == 1 and rec.id not in svc.pool.members
        assert svc.pool.hits == 0 and svc.pool.misses == 4
        await svc.close()
    run(go())


def test_a_pooled_sandbox_that_dies_is_replaced(tmp_path):
    svc, host = pooled_env(tmp_path, {"default": 1})

    async def go():
        await svc.start()
        await until(lambda: svc.pool.total() == 1)
        [sid] = [s for ids in svc.pool.idle.values() for s in ids]
        host.exit(sid, 1)
        await until(lambda: svc.pool.total() == 1 and sid not in svc.pool.members)
        assert ("destroy", sid) in host.calls and not svc.store.sandbox_list()
        await svc.close()
    run(go())


def test_pool_sizes_parse():
    from shoal.server.control.pool import parse_sizes

    assert parse_sizes("default:2,im-abc:1") == {"default": 2, "im-abc": 1}
    assert parse_sizes("3") == {"default": 3}
    assert parse_sizes("0") == {} and parse_sizes("") == {}
    for bad in ("default:x", "default:-1", "default:65"):
        with pytest.raises(ValueError):
            parse_sizes(bad)


# --- runtime calls are bounded ----------------------------------------------------------------------

def test_a_hung_runtime_call_is_killed_and_reported(tmp_path):
    from shoal.server.host import runc
    from shoal.server.host.base import RuntimeError_

    fake = tmp_path / "hung-runc"
    fake.write_text("#!/bin/sh\nexec sleep 60\n")
    fake.chmod(0o755)
    rt = runc.RuncRuntime(tmp_path / "state", binary=str(fake))

    async def go():
        t0 = time.monotonic()
        with pytest.raises(RuntimeError_, match="did not finish within"):
            await rt._run("kill", "x", timeout=0.2)
        assert time.monotonic() - t0 < 5
    run(go())


# --- memory snapshots (Modal's _experimental_snapshot / _experimental_from_snapshot)


def _gvisor_env(env, tmp_path):
    svc, host = env
    host.name = "gvisor"  # the control plane allows memory snapshots of gVisor sandboxes only
    svc.memory_snapshots = tmp_path / "memory-snapshots"
    return svc, host


def test_memory_snapshot_restores_into_a_new_sandbox(env, tmp_path):
    svc, host = _gvisor_env(env, tmp_path)

    async def go():
        await started(svc)
        src = await svc.create(create(block_network=True, name="web", env={"K": "v"}))
        host.boxes[src.id].files["/root/a"] = b"saved"
        snap = await svc.snapshot_memory(src.id)
        assert snap.id.startswith("sn-") and snap.sandbox_id == src.id
        assert (svc.memory_snapshots / snap.id / "fake").exists()
        assert snap.expires_at - snap.created_at == pytest.approx(7 * 24 * 3600)
        host.boxes[src.id].files["/root/b"] = b"after the snapshot"
        assert (await svc.memory_snapshot(snap.id)).id == snap.id

        with pytest.raises(AlreadyExistsError, match="name=None"):
            await svc.restore_memory_snapshot(snap.id)  # "web" still runs
        new = await svc.restore_memory_snapshot(snap.id, None)
        assert new.id != src.id and new.state == "running" and new.name is None
        assert new.spec["restored_from"] == snap.id and new.runtime == "gvisor"
        box = host.boxes[new.id]
        assert box.files == {"/root/a": b"saved"} and box.spec.env == {"A": "1", "K": "v"}
        assert box.spec.network is None
        assert ("create_from_snapshot", new.id) in host.calls
        assert svc.live[new.id].env == {"A": "1", "K": "v"}

        await svc.terminate(src.id)
        again = await svc.restore_memory_snapshot(snap.id)  # the name is free now
        assert again.name == "web"
        await svc.close()
    run(go())


def test_memory_snapshot_refusals(env, tmp_path):
    svc, host = env
    svc.memory_snapshots = tmp_path / "memory-snapshots"

    async def go():
        await started(svc)
        runc = await svc.create(create(block_network=True))
        with pytest.raises(InvalidError, match="gvisor"):
            await svc.snapshot_memory(runc.id)
        host.name = "gvisor"
        networked = await svc.create(create())
        with pytest.raises(InvalidError, match="block_network=True"):
            await svc.snapshot_memory(networked.id)
        for bad in ("sn-" + "0" * 22, "nope", "", "sn-../../etc"):
            with pytest.raises(NotFoundError):
                await svc.memory_snapshot(bad)
            with pytest.raises(NotFoundError):
                await svc.restore_memory_snapshot(bad)
        host.exit(networked.id, 0)
        await svc.wait(networked.id, 5)
        with pytest.raises(SandboxTerminatedError):
            await svc.snapshot_memory(networked.id)
        assert not any(c[0] == "snapshot_memory" for c in host.calls)
        await svc.close()
    run(go())


def test_memory_snapshots_expire_and_a_failed_restore_leaves_a_terminated_row(env, tmp_path):
    svc, host = _gvisor_env(env, tmp_path)

    async def go():
        await started(svc)
        src = await svc.create(create(block_network=True))
        snap = await svc.snapshot_memory(src.id)
        host.fail_create = HostError("runsc restore exited with 1")
        with pytest.raises(ExecutionError, match="runsc restore"):
            await svc.restore_memory_snapshot(snap.id)
        failed = [r for r in svc.store.sandbox_list() if r.spec.get("restored_from") == snap.id]
        assert [(r.state, r.end_reason) for r in failed] == [("terminated", "failed-to-start")]
        host.fail_create = None
        # the image's layers stay in use while the snapshot exists
        assert "layers/a" in svc.layers_in_use()[0]
        (svc.memory_snapshots / "sn-leftover").mkdir()  # a crash mid-snapshot
        assert await svc.expire_memory_snapshots(startup=True) == 1
        assert await svc.expire_memory_snapshots(now=snap.expires_at + 1) == 1
        assert not (svc.memory_snapshots / snap.id).exists()
        with pytest.raises(NotFoundError, match="7 days"):
            await svc.restore_memory_snapshot(snap.id)
        await svc.terminate(src.id)
        assert "layers/a" not in svc.layers_in_use()[0]
        await svc.close()
    run(go())
