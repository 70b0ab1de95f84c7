"""Volumes and network file systems: their records, their leases, their data.

Both kinds are directories that sandboxes bind-mount, so writes are visible to every mount at once;
they differ in name space (`kind`) and in the SDK methods built on them.

Ephemeral objects hold a lease that the client renews by heart-beating. A lease that runs out, or an
explicit delete, marks the object `deleting`: it is gone for clients at once, and its data is
removed as soon as no running sandbox mounts it — a running sandbox keeps the files it was given
until it ends, and never writes into a directory that has been removed under it.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from shoal.exception import AlreadyExistsError, ConflictError, InvalidError, NotFoundError
from shoal.server.names import check_name  # noqa: F401 - re-exported (apps, kv, secrets)
from shoal.server.storage.paths import normalize
from shoal.server.storage.state import StateStore, VolumeRecord
from shoal.server.storage.volumes import VolumeStorage

KINDS = ("volume", "nfs")
LEASE_TTL = float(os.environ.get("SHOAL_LEASE_TTL", "30"))


def new_id(prefix: str) -> str:
    # Fixed length: gVisor matches container ids by prefix (RUNTIME-NOTES.md).
    return f"{prefix}-{secrets.token_hex(11)}"




BATCH_IDLE_LIMIT = 3600.0  # an upload batch untouched this long is dropped


@dataclass
class Batch:
    """Files uploaded to staging, waiting for `commit` to land them all."""
    id: str
    volume_id: str
    staged: dict[str, str] = field(default_factory=dict)  # target path -> staged name
    last_used: float = field(default_factory=time.time)


class VolumeService:
    def __init__(self, store: StateStore, storage: VolumeStorage, lease_ttl: float = LEASE_TTL):
        self.store = store
        self.storage = storage
        self.lease_ttl = lease_ttl
        # Leases run on from this server's start, not from the last beat a crashed server saw:
        # its clients could not beat while no server ran.
        self.started = time.time()
        self.batches: dict[str, Batch] = {}  # event loop only

    def _label(self, kind: str) -> str:
        return "network file system" if kind == "nfs" else "volume"

    def lookup(self, kind: str, name: str, create_if_missing: bool) -> VolumeRecord:
        check_name(name, self._label(kind))
        rec = self.store.volume_by_name(kind, name)
        if rec and rec.state == "ready":
            return rec
        if rec is None and create_if_missing:
            return self.create(kind, name, allow_existing=True)
        raise NotFoundError(f"{self._label(kind)} {name!r} not found; create it with "
                            f"create_if_missing=True or `shoal {'nfs' if kind == 'nfs' else 'volume'}"
                            f" create {name}`")

    def create(self, kind: str, name: str, allow_existing: bool = False) -> VolumeRecord:
        check_name(name, self._label(kind))
        existing = self.store.volume_by_name(kind, name)
        if existing:
            if allow_existing and existing.state == "ready":
                return existing
            raise AlreadyExistsError(f"{self._label(kind)} {name!r} already exists")
        rec = VolumeRecord(new_id("vo" if kind == "volume" else "sv"), kind, name, "ready",
                           time.time())
        self.storage.create(rec.id)
        try:
            self.store.volume_insert(rec)
        except Exception:  # lost a race for the name: the other creator's volume stands
            self.storage.destroy(rec.id)
            winner = self.store.volume_by_name(kind, name)
            if winner and allow_existing:
                return winner
            raise AlreadyExistsError(f"{self._label(kind)} {name!r} already exists") from None
        return rec

    def ephemeral(self, kind: str) -> VolumeRecord:
        rec = VolumeRecord(new_id("vo" if kind == "volume" else "sv"), kind, None, "ready",
                           time.time(), lease_expires=time.time() + self.lease_ttl)
        self.storage.create(rec.id)
        self.store.volume_insert(rec)
        return rec

    def get(self, volume_id: str, kind: str | None = None) -> VolumeRecord:
        rec = self.store.volume_get(volume_id)
        if rec is None or rec.state != "ready" or (kind and rec.kind != kind):
            raise NotFoundError(f"{self._label(kind or 'volume')} {volume_id} not found "
                                "(deleted, or its ephemeral lease ran out)")
        return rec

    def heartbeat(self, volume_id: str) -> VolumeRecord:
        rec = self.get(volume_id)
        if rec.lease_expires is not None:
            rec.lease_expires = time.time() + self.lease_ttl
            self.store.volume_update(volume_id, lease_expires=rec.lease_expires)
        return rec

    def delete(self, volume_id: str) -> None:
        """Delete a volume. A named one that a running sandbox mounts is refused (ConflictError);
        an ephemeral one (its client is leaving) is hidden at once and removed when the last
        sandbox using it ends."""
        rec = self.get(volume_id)
        users = self.store.volume_running_mounts(volume_id)
        if users and rec.name is not None:
            ids = ", ".join(sorted({m.sandbox_id for m in users}))
            raise ConflictError(f"{self._label(rec.kind)} {rec.name!r} is mounted by running "
                                f"sandbox(es) {ids}; terminate them first")
        self.store.volume_update(volume_id, state="deleting")
        self.collect(volume_id)

    def rename(self, kind: str, old: str, new: str) -> VolumeRecord:
        rec = self.lookup(kind, old, create_if_missing=False)
        check_name(new, self._label(kind))
        if self.store.volume_by_name(kind, new):
            raise AlreadyExistsError(f"{self._label(kind)} {new!r} already exists")
        self.store.volume_update(rec.id, name=new)
        rec.name = new
        return rec

    # --- uploads
    async def upload(self, volume_id: str, body: AsyncIterator[bytes],
                     mode: int | None = None) -> tuple[str, int]:
        """Stream `body` into a staged file; returns (staged name, bytes)."""
        up = self.storage.new_upload(volume_id, mode)
        try:
            async for chunk in body:
                up.write(chunk)
            staged = await asyncio.to_thread(up.finish)
        finally:
            up.close()
        return staged, up.written

    async def write_file(self, volume_id: str, path: str, body: AsyncIterator[bytes]) -> int:
        normalize(path)
        staged, n = await self.upload(volume_id, body)
        await asyncio.to_thread(self.storage.land_or_discard, volume_id, staged, path)
        return n

    def _check_absent(self, volume_id: str, paths) -> None:
        clash = [p for p in paths if self.storage.exists(volume_id, p)]
        if clash:
            raise FileExistsError(
                f"{len(clash)} file(s) of the upload already exist (first: {clash[0]!r}); "
                "nothing was written. Use force=True (CLI: --force) to overwrite")

    def batch_create(self, volume_id: str, paths: list[str] = (), force: bool = True) -> Batch:
        """Open an upload batch. With `force=False`, the planned `paths` are checked first, so a
        clash is reported before any byte is sent (commit checks again)."""
        self.get(volume_id)
        if not force:
            self._check_absent(volume_id, [normalize(p) for p in paths])
        batch = Batch(new_id("bt"), volume_id)
        self.batches[batch.id] = batch
        return batch

    def _batch(self, volume_id: str, batch_id: str) -> Batch:
        batch = self.batches.get(batch_id)
        if batch is None or batch.volume_id != volume_id:
            raise NotFoundError(f"upload batch {batch_id} not found (it was committed, aborted, "
                                "idle for an hour, or the server restarted): upload again")
        batch.last_used = time.time()
        return batch

    async def batch_put(self, volume_id: str, batch_id: str, path: str, mode: int | None,
                        body: AsyncIterator[bytes]) -> int:
        batch = self._batch(volume_id, batch_id)
        rel = normalize(path)
        if not rel:
            raise InvalidError("cannot upload to the volume root; give a file path")
        staged, n = await self.upload(volume_id, body, mode)
        old = batch.staged.pop(rel, None)
        if old:
            await asyncio.to_thread(self.storage.discard, volume_id, old)
        batch.staged[rel] = staged
        return n

    async def batch_commit(self, volume_id: str, batch_id: str, force: bool) -> int:
        """Land every file of the batch. Without `force`, if any target exists nothing lands."""
        batch = self._batch(volume_id, batch_id)
        self.batches.pop(batch_id, None)
        count = len(batch.staged)
        try:
            if not force:
                await asyncio.to_thread(self._check_absent, volume_id, list(batch.staged))
            while batch.staged:
                path, staged = next(iter(batch.staged.items()))
                await asyncio.to_thread(self.storage.land, volume_id, staged, path, force)
                del batch.staged[path]
        finally:
            for staged in list(batch.staged.values()):
                await asyncio.to_thread(self.storage.discard, volume_id, staged)
        return count

    def batch_abort(self, volume_id: str, batch_id: str) -> None:
        batch = self.batches.pop(batch_id, None)
        if batch and batch.volume_id == volume_id:
            for staged in batch.staged.values():
                self.storage.discard(volume_id, staged)

    def collect(self, volume_id: str) -> None:
        """Remove a `deleting` volume's data once no running sandbox mounts it."""
        rec = self.store.volume_get(volume_id)
        if rec is None or rec.state != "deleting":
            return
        if self.store.volume_running_mounts(volume_id):
            return
        self.storage.destroy(volume_id)
        self.store.volume_remove(volume_id)

    def reap(self) -> None:
        """Expire leases of clients that stopped heart-beating; finish deferred deletions; drop
        idle upload batches."""
        now = time.time()
        # Runs in a worker thread (upkeep): list() first, routes may add batches meanwhile.
        for batch in [b for b in list(self.batches.values())
                      if b.last_used < now - BATCH_IDLE_LIMIT]:
            self.batch_abort(batch.volume_id, batch.id)
        for rec in self.store.volume_list():
            if rec.state == "ready" and rec.lease_expires is not None \
                    and max(rec.lease_expires, self.started + self.lease_ttl) < now:
                self.store.volume_update(rec.id, state="deleting")
                rec.state = "deleting"
            if rec.state == "deleting":
                self.collect(rec.id)
