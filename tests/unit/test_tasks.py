"""Owned background tasks and the state store's worker thread (server/tasks.py), and the pruning
of the sandbox service's `ended` map."""

from __future__ import annotations

import asyncio
import logging
import threading
import time

from shoal.server.storage.state import AppRecord, SqliteStore
from shoal.server.tasks import AsyncStore, TaskSet


def test_taskset_logs_failures_by_name_and_forgets_finished_tasks(caplog):
    async def main():
        ts = TaskSet()

        async def boom():
            raise RuntimeError("kaputt")

        ts.spawn(boom(), "the-boom")
        ts.spawn(asyncio.sleep(0), "quick")
        assert len(ts) == 2
        await asyncio.sleep(0.05)
        return len(ts)

    with caplog.at_level(logging.ERROR, logger="shoal.server"):
        left = asyncio.run(main())
    assert left == 0
    failed = [r for r in caplog.records if "the-boom" in r.getMessage()]
    assert failed and failed[0].exc_info[0] is RuntimeError


def test_taskset_drain_cancels_and_waits():
    finished = []

    async def main():
        ts = TaskSet()

        async def forever():
            try:
                await asyncio.sleep(3600)
            finally:
                finished.append("cleaned up")

        ts.spawn(forever(), "forever")
        await asyncio.sleep(0)
        t0 = time.monotonic()
        await ts.drain()
        return time.monotonic() - t0, len(ts)

    took, left = asyncio.run(main())
    assert finished == ["cleaned up"] and left == 0 and took < 1


def test_async_store_runs_every_call_in_one_worker_thread(tmp_path):
    store = SqliteStore(tmp_path / "state.db")
    seen = set()
    real = store.app_get

    def spy(app_id):
        seen.add(threading.get_ident())
        return real(app_id)
    store.app_get = spy

    async def main():
        astore = AsyncStore(store)
        await astore.app_create(AppRecord("ap-1", "x", time.time()))
        got = await asyncio.gather(*(astore.app_get("ap-1") for _ in range(20)))
        on_loop = threading.get_ident()
        astore.close()
        return got, on_loop

    got, on_loop = asyncio.run(main())
    assert all(r is not None and r.name == "x" for r in got)
    assert len(seen) == 1 and on_loop not in seen
    store.close()


def test_async_store_blocks_the_worker_not_the_loop(tmp_path):
    """A slow store call leaves the loop free: a ticker keeps ticking meanwhile."""
    class Slow:
        def slow(self):
            time.sleep(0.3)
            return "done"

    async def main():
        astore = AsyncStore(Slow())
        ticks = 0

        async def ticker():
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1
        t = asyncio.ensure_future(ticker())
        out = await astore.slow()
        t.cancel()
        astore.close()
        return out, ticks

    out, ticks = asyncio.run(main())
    assert out == "done" and ticks >= 10


def test_ended_map_is_pruned_after_retention(tmp_path):
    from shoal.server.control import sandboxes as sbx
    from .test_control_sandboxes import FakeImages
    from shoal.server.control.volumes import VolumeService
    from shoal.server.host.fake import FakeHost
    from shoal.server.storage.volumes import LocalVolumeStorage

    store = SqliteStore(tmp_path / "state.db")
    svc = sbx.SandboxService(store, FakeHost(), VolumeService(
        store, LocalVolumeStorage(tmp_path / "volumes")), FakeImages())

    async def main():
        svc.ended_event("sb-gone").set()
        svc.ended_event("sb-live")
        svc.live["sb-live"] = object()
        assert svc.prune_ended(now=100.0) == 0  # first seen gone now
        assert svc.prune_ended(now=100.0 + sbx.ENDED_RETENTION - 1) == 0
        assert svc.prune_ended(now=100.0 + sbx.ENDED_RETENTION) == 1
        return set(svc.ended), set(svc._gone_since)

    ended, gone = asyncio.run(main())
    assert ended == {"sb-live"} and gone == set()
    store.close()


def test_finalize_collects_volumes_and_writes_state_off_the_loop(tmp_path):
    """A sandbox's end removes a deferred-deleted volume (an rmtree) and writes its row: neither
    runs on the event loop's thread."""
    from shoal.server.control.sandboxes import SandboxService
    from shoal.server.control.volumes import VolumeService
    from shoal.server.host.fake import FakeHost
    from shoal.server.models import CreateSandbox, MountSpec
    from shoal.server.storage.volumes import LocalVolumeStorage
    from .test_control_sandboxes import FakeImages

    store = SqliteStore(tmp_path / "state.db")
    store.app_create(AppRecord("ap-1", "tests", time.time()))
    vols = VolumeService(store, LocalVolumeStorage(tmp_path / "volumes"))
    host = FakeHost()
    svc = SandboxService(store, host, vols, FakeImages())
    threads = {"collect": set(), "update": set()}
    collect, update = vols.collect, store.sandbox_update

    def spy_collect(vid):
        threads["collect"].add(threading.get_ident())
        return collect(vid)

    def spy_update(*a, **k):
        threads["update"].add(threading.get_ident())
        return update(*a, **k)
    vols.collect, store.sandbox_update = spy_collect, spy_update

    async def main():
        await svc.start()
        loop_thread = threading.get_ident()
        with_vol = vols.ephemeral("volume")
        rec = await svc.create(CreateSandbox(app_id="ap-1", args=["sleep"], mounts=[
            MountSpec(volume_id=with_vol.id, path="/mnt/v")]))
        await asyncio.to_thread(vols.delete, with_vol.id)  # deferred: the sandbox mounts it
        assert vols.storage.host_path(with_vol.id).exists()
        host.exit(rec.id, 0)
        await svc.wait(rec.id, 5)
        gone = not vols.storage.host_path(with_vol.id).exists()
        await svc.close()
        return loop_thread, gone

    loop_thread, gone = asyncio.run(asyncio.wait_for(main(), 10))
    assert gone
    assert threads["collect"] and loop_thread not in threads["collect"]
    assert threads["update"] and loop_thread not in threads["update"]
    store.close()
