"""Dicts and Queues (Modal's `modal.Dict`, `modal.Queue`): named or ephemeral stores that
sandboxes' clients share to coordinate. Keys and values arrive pickled by the client; the server
stores them as bytes and never unpickles them.

A blocking `Queue.get` long-polls: the route waits on the queue's condition (notified by every
put) for at most MAX_WAIT seconds, and the client asks again until its own timeout.
"""

from __future__ import annotations

import asyncio
import os
import time

from shoal.exception import InvalidError, NotFoundError, RequestSizeError, ResourceExhaustedError
from shoal.server.control.volumes import LEASE_TTL, check_name, new_id
from shoal.server.storage.state import KvRecord, KvStore
from shoal.server.tasks import TaskSet

MAX_KEY = 64 << 10
MAX_DICT_VALUE = int(os.environ.get("SHOAL_DICT_MAX_VALUE", str(16 << 20)))
MAX_QUEUE_VALUE = int(os.environ.get("SHOAL_QUEUE_MAX_VALUE", str(1 << 20)))
MAX_QUEUE_ITEMS = int(os.environ.get("SHOAL_QUEUE_MAX_ITEMS", "100000"))
MAX_PARTITION = 64
MAX_WAIT = 50.0
KINDS = {"dict": "di", "queue": "qu"}


class KvService:
    def __init__(self, store: KvStore, lease_ttl: float = LEASE_TTL):
        self.store = store
        self.lease_ttl = lease_ttl
        self.started = time.time()  # leases run on from here after a restart (volumes.py)
        self.changed: dict[str, asyncio.Condition] = {}  # per queue id: notified on put and get
        self.tasks = TaskSet()  # the wake-ups of _notify; drained at shutdown

    # --- objects
    def lookup(self, kind: str, name: str, create_if_missing: bool) -> KvRecord:
        check_name(name, kind)
        rec = self.store.by_name(kind, name)
        if rec is None:
            if not create_if_missing:
                raise NotFoundError(f"{kind} {name!r} not found; use create_if_missing=True")
            rec = self.store.insert(KvRecord(new_id(KINDS[kind]), kind, name, time.time()))
        return rec

    def ephemeral(self, kind: str) -> KvRecord:
        return self.store.insert(KvRecord(new_id(KINDS[kind]), kind, None, time.time(),
                                          time.time() + self.lease_ttl))

    def get(self, kind: str, obj_id: str) -> KvRecord:
        rec = self.store.get(kind, obj_id)
        if rec is None:
            raise NotFoundError(f"{kind} {obj_id} not found")
        return rec

    def heartbeat(self, kind: str, obj_id: str) -> None:
        rec = self.get(kind, obj_id)
        if rec.lease_expires is not None:
            self.store.renew(obj_id, time.time() + self.lease_ttl)

    def delete(self, kind: str, obj_id: str) -> None:
        self.get(kind, obj_id)
        self.store.remove(obj_id)
        self._notify(obj_id, forget=True)

    def delete_named(self, kind: str, name: str, allow_missing: bool) -> None:
        rec = self.store.by_name(kind, name)
        if rec is None:
            if allow_missing:
                return
            raise NotFoundError(f"{kind} {name!r} not found")
        self.delete(kind, rec.id)

    def list(self, kind: str) -> list[KvRecord]:
        return self.store.list(kind)

    def reap(self) -> None:
        """Ephemeral objects whose client stopped heart-beating; expired queue items."""
        now = time.time()
        cutoff = now if now >= self.started + self.lease_ttl else 0.0  # none in the grace time
        for obj_id in self.store.expired(cutoff):
            self.store.remove(obj_id)
            self._notify(obj_id, forget=True)
        self.store.queue_expire(now)

    # --- dicts
    def dict_get(self, dict_id: str, key: bytes) -> bytes | None:
        self.get("dict", dict_id)
        return self.store.dict_get(dict_id, key)

    def dict_put(self, dict_id: str, items: list[tuple[bytes, bytes]],
                 skip_if_exists: bool) -> int:
        self.get("dict", dict_id)
        for k, v in items:
            _bound(k, MAX_KEY, "a Dict key")
            _bound(v, MAX_DICT_VALUE, "a Dict value")
        return self.store.dict_put(dict_id, items, skip_if_exists)

    def dict_pop(self, dict_id: str, key: bytes) -> bytes | None:
        self.get("dict", dict_id)
        return self.store.dict_pop(dict_id, key)

    def dict_len(self, dict_id: str) -> int:
        self.get("dict", dict_id)
        return self.store.dict_len(dict_id)

    def dict_items(self, dict_id: str) -> list[tuple[bytes, bytes]]:
        self.get("dict", dict_id)
        return self.store.dict_items(dict_id)

    def dict_clear(self, dict_id: str) -> None:
        self.get("dict", dict_id)
        self.store.dict_clear(dict_id)

    # --- queues
    def _cond(self, queue_id: str) -> asyncio.Condition:
        self.loop = asyncio.get_running_loop()  # conditions belong to the server's loop
        return self.changed.setdefault(queue_id, asyncio.Condition())

    def _notify(self, queue_id: str, forget: bool = False) -> None:
        """Wake the waiters of a queue; callable from worker threads (sync routes) too. With
        `forget` (the queue is gone) its condition is dropped too (they woke to NotFound)."""
        cond = self.changed.pop(queue_id, None) if forget else self.changed.get(queue_id)
        if cond is not None:
            async def wake():
                async with cond:
                    cond.notify_all()
            self.loop.call_soon_threadsafe(
                lambda: self.tasks.spawn(wake(), f"queue-wake-{queue_id}"))

    async def queue_put(self, queue_id: str, values: list[bytes], partition: str | None,
                        partition_ttl: float, timeout: float | None) -> None:
        """Append `values`; if the queue is full, wait up to `timeout` (None: not at all) for
        room, then ResourceExhaustedError. The store is called in worker threads (as the sync
        routes do), never on the loop."""
        await asyncio.to_thread(self.get, "queue", queue_id)
        part = _partition(partition)
        for v in values:
            _bound(v, MAX_QUEUE_VALUE, "a Queue item")
        deadline = time.monotonic() + min(timeout or 0, MAX_WAIT)
        cond = self._cond(queue_id)
        async with cond:
            while await asyncio.to_thread(self.store.queue_len, queue_id, None, time.time()) \
                    + len(values) > MAX_QUEUE_ITEMS:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise ResourceExhaustedError(
                        f"the queue is full ({MAX_QUEUE_ITEMS} items, SHOAL_QUEUE_MAX_ITEMS)")
                try:
                    await asyncio.wait_for(cond.wait(), left)
                except TimeoutError:
                    pass
            expires = time.time() + partition_ttl if partition is not None else None
            await asyncio.to_thread(self.store.queue_put, queue_id, part, values, expires)
            cond.notify_all()

    async def queue_get(self, queue_id: str, n: int, partition: str | None,
                        timeout: float) -> list[bytes]:
        """Up to `n` items, waiting up to `timeout` seconds (at most MAX_WAIT) for the first."""
        await asyncio.to_thread(self.get, "queue", queue_id)
        if n < 1:
            raise InvalidError(f"n_values must be at least 1, got {n}")
        part = _partition(partition)
        deadline = time.monotonic() + min(max(timeout, 0.0), MAX_WAIT)
        cond = self._cond(queue_id)
        async with cond:
            while True:
                got = await asyncio.to_thread(self.store.queue_take, queue_id, part, n, time.time())
                if got:
                    cond.notify_all()
                    return got
                left = deadline - time.monotonic()
                if left <= 0 or await asyncio.to_thread(self.store.get, "queue", queue_id) is None:
                    return []
                try:
                    await asyncio.wait_for(cond.wait(), left)
                except TimeoutError:
                    pass

    def queue_peek(self, queue_id: str, partition: str | None) -> list[bytes]:
        self.get("queue", queue_id)
        return self.store.queue_peek(queue_id, _partition(partition), time.time())

    def queue_len(self, queue_id: str, partition: str | None, total: bool) -> int:
        self.get("queue", queue_id)
        return self.store.queue_len(queue_id, None if total else _partition(partition),
                                    time.time())

    def queue_clear(self, queue_id: str, partition: str | None, all: bool) -> None:
        self.get("queue", queue_id)
        self.store.queue_clear(queue_id, None if all else _partition(partition))
        self._notify(queue_id)


def _partition(partition: str | None) -> str:
    if partition is None:
        return ""
    if not isinstance(partition, str) or not 0 < len(partition.encode()) <= MAX_PARTITION:
        raise InvalidError(f"partition must be a non-empty str of at most {MAX_PARTITION} bytes")
    return partition


def _bound(data: bytes, limit: int, what: str) -> None:
    if len(data) > limit:
        raise RequestSizeError(f"{what} is {len(data)} bytes; the limit is {limit} bytes")
