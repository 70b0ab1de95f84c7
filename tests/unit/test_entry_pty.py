"""Sandbox.create(pty=True) at the host seam (FakeHost): the spec carries the terminal's size, the
warm pool never serves it, resizing reaches the host, and bad requests are refused."""

from __future__ import annotations

import asyncio
import time

import pytest

from shoal.exception import InvalidError
from shoal.server.control.sandboxes import SandboxService
from shoal.server.control.volumes import VolumeService
from shoal.server.host.fake import FakeHost
from shoal.server.models import CreateSandbox
from shoal.server.storage.state import AppRecord, SqliteStore
from shoal.server.storage.volumes import LocalVolumeStorage

from .test_control_sandboxes import FakeImages


def service(tmp_path, pool: dict[str, int] | None = None) -> tuple[SandboxService, FakeHost]:
    store = SqliteStore(tmp_path / "state.db")
    store.app_create(AppRecord("ap-1", "tests", time.time()))
    vols = VolumeService(store, LocalVolumeStorage(tmp_path / "volumes"))
    host = FakeHost()
    return SandboxService(store, host, vols, FakeImages(), pool), host


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 10))


async def until(cond, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.005)


def test_the_spec_carries_the_pty_and_the_pool_is_bypassed(tmp_path):
    svc, host = service(tmp_path, {"default": 1})

    async def go():
        await svc.start()
        await until(lambda: svc.pool.total() == 1)
        warm = set(host.boxes)
        # With and without an entrypoint: a warm sandbox's agent has no terminal.
        for args in (["bash"], []):
            rec = await svc.create(CreateSandbox(app_id="ap-1", args=args, pty_rows=33,
                                                 pty_cols=111))
            assert rec.id not in warm and host.calls.count(("create", rec.id)) == 1
            assert host.boxes[rec.id].spec.pty == (33, 111)
            assert rec.spec["pty_rows"] == 33 and rec.spec["pty_cols"] == 111
        assert svc.pool.hits == 0 and svc.pool.total() == 1
        plain = await svc.create(CreateSandbox(app_id="ap-1"))
        assert plain.id in warm and host.boxes[plain.id].spec.pty is None
        await svc.close()
    run(go())


def test_resize_reaches_the_host_and_needs_a_pty(tmp_path):
    svc, host = service(tmp_path)

    async def go():
        await svc.start()
        rec = await svc.create(CreateSandbox(app_id="ap-1", args=["bash"], pty_rows=24,
                                             pty_cols=80))
        await svc.resize_pty(rec.id, 40, 120)
        assert ("resize_pty", rec.id, 40, 120) in host.calls
        plain = await svc.create(CreateSandbox(app_id="ap-1", args=["bash"]))
        with pytest.raises(InvalidError, match="no terminal to resize"):
            await svc.resize_pty(plain.id, 40, 120)
        with pytest.raises(InvalidError, match="pty_rows and pty_cols"):
            await svc.create(CreateSandbox(app_id="ap-1", args=["bash"], pty_rows=24))
        await svc.close()
    run(go())
