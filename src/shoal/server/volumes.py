"""Volumes and network file systems: their records, their leases, their data.

Both kinds are directories that sandboxes bind-mount, so writes are visible to every mount at once;
they differ in name space (`kind`) and in the SDK methods built on them.

Ephemeral objects hold a lease that the client renews by heart-beating. A lease that runs out, or an
explicit delete, marks the object `deleting`: it is gone for clients at once, and its data is
removed as soon as no running sandbox mounts it — a running sandbox keeps the files it was given
until it ends, and never writes into a directory that has been removed under it.
"""

from __future__ import annotations

import os
import re
import secrets
import time

from shoal.exception import AlreadyExistsError, InvalidError, NotFoundError
from shoal.storage.state import StateStore, VolumeRecord
from shoal.storage.volumes import VolumeStorage

NAME_RE = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
KINDS = ("volume", "nfs")
LEASE_TTL = float(os.environ.get("SHOAL_LEASE_TTL", "30"))


def new_id(prefix: str) -> str:
    # Fixed length: gVisor matches container ids by prefix (RUNTIME-NOTES.md).
    return f"{prefix}-{secrets.token_hex(11)}"


def check_name(name: str, what: str = "volume") -> str:
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise InvalidError(f"invalid {what} name {name!r}: use 1-64 characters from "
                           "letters, digits, '.', '_' and '-'")
    return name


class VolumeService:
    def __init__(self, store: StateStore, storage: VolumeStorage, lease_ttl: float = LEASE_TTL):
        self.store = store
        self.storage = storage
        self.lease_ttl = lease_ttl

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
        self.get(volume_id)
        self.store.volume_update(volume_id, state="deleting")
        self.collect(volume_id)

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
        """Expire leases of clients that stopped heart-beating; finish deferred deletions."""
        now = time.time()
        for rec in self.store.volume_list():
            if rec.state == "ready" and rec.lease_expires is not None and rec.lease_expires < now:
                self.store.volume_update(rec.id, state="deleting")
                rec.state = "deleting"
            if rec.state == "deleting":
                self.collect(rec.id)
