"""`shoal.Queue` (Modal's `modal.Queue`): a FIFO queue kept by the server, with optional named
partitions, shared by every client of it. Items are pickled on the client (plain pickle).

    q = shoal.Queue.from_name("work", create_if_missing=True)
    q.put_many([1, 2, 3])
    q.get()                      # 1 (waits for an item; `timeout=` bounds the wait)
    q.get_many(5, timeout=0)     # [2, 3]

Limits: an item is at most 1 MiB pickled (SHOAL_QUEUE_MAX_VALUE, else RequestSizeError); a queue
holds at most SHOAL_QUEUE_MAX_ITEMS items (100000; `put` then waits for room, or raises
queue.Full after `timeout`). Items of a named partition expire after `partition_ttl` seconds.
"""

from __future__ import annotations

import contextlib
import queue as stdlib_queue
import time
from collections.abc import AsyncIterator

from shoal._kv import _KvManager, _KvObject, dumps, loads
from shoal._sync import run_blocking, synchronize_api
from shoal.exception import InvalidError, ResourceExhaustedError

LONG_POLL = 50.0  # the server's longest wait per request


class _Queue(_KvObject):
    """A distributed FIFO queue: put/put_many, get/get_many (blocking with a timeout), len,
    clear, iterate; every call may name a `partition` (default: the queue's main one)."""

    _kind = "queue"

    @classmethod
    def from_name(cls, name: str, *, environment_name: str | None = None,
                  create_if_missing: bool = False, client=None) -> "_Queue":
        """A handle to the named Queue, looked up on first use.

        Raises NotFoundError on first use if it does not exist (unless `create_if_missing`).

            q = shoal.Queue.from_name("work", create_if_missing=True)
        """
        return cls._from_name(name, environment_name, create_if_missing, client)

    @classmethod
    def from_id(cls, queue_id: str, client=None) -> "_Queue":
        """A handle to the Queue with this id.

        Raises NotFoundError on first use if there is none.

            q = shoal.Queue.from_id("qu-...")
        """
        return cls._from_id(queue_id, client)

    @classmethod
    @contextlib.asynccontextmanager
    async def ephemeral(cls, client=None, environment_name: str | None = None,
                        _heartbeat_sleep: float | None = None) -> AsyncIterator["_Queue"]:
        """A Queue that lives as long as the `with` (or `async with`) block; the server removes
        it shortly after its client dies.

        Raises InvalidError for `_heartbeat_sleep` or another server's client.

            with shoal.Queue.ephemeral() as q: q.put(1)
        """
        async with cls._ephemeral(client, environment_name, _heartbeat_sleep) as obj:
            yield obj

    @staticmethod
    def validate_partition_key(partition: str | None) -> bytes:
        """The partition key as bytes.

        Raises InvalidError unless it is None or a str of 1 to 64 bytes.

            shoal.Queue.validate_partition_key("worker-1")
        """
        if partition is None:
            return b""
        key = partition.encode() if isinstance(partition, str) else b""
        if not 0 < len(key) <= 64:
            raise InvalidError("partition must be a non-empty str of at most 64 bytes")
        return key

    async def _get(self, n: int, block: bool, timeout: float | None,
                   partition: str | None) -> list:
        self.validate_partition_key(partition)
        if timeout is not None and timeout < 0:
            raise InvalidError(f"timeout must be >= 0, got {timeout!r}")
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = 0.0 if not block else (LONG_POLL if deadline is None
                                          else max(0.0, deadline - time.monotonic()))
            r = await self._call("POST", "/get", json={
                "n": n, "partition": partition, "timeout": min(left, LONG_POLL)})
            if r["values"] or not block or (deadline is not None and
                                            time.monotonic() >= deadline):
                return [loads(v) for v in r["values"]]

    async def get(self, block: bool = True, timeout: float | None = None, *,
                  partition: str | None = None):
        """Remove and return the next item. With `block` (default), wait for one: forever, or up
        to `timeout` seconds; then (or at once without `block`) raise `queue.Empty` — as Modal
        does, unless `block` is True and `timeout` None.

        Raises queue.Empty when there is no item in time; InvalidError for a bad partition.

            item = q.get(timeout=5)
        """
        got = await self._get(1, block, timeout, partition)
        if not got:
            raise stdlib_queue.Empty()
        return got[0]

    async def get_many(self, n_values: int, block: bool = True, timeout: float | None = None,
                       *, partition: str | None = None) -> list:
        """Remove and return up to `n_values` items; with `block`, wait for the first one
        (forever, or up to `timeout`). An empty list when none came in time.

        Raises InvalidError for `n_values` < 1 or a bad partition.

            batch = q.get_many(10, timeout=1)
        """
        if not isinstance(n_values, int) or n_values < 1:
            raise InvalidError(f"n_values must be a positive int, got {n_values!r}")
        return await self._get(n_values, block, timeout, partition)

    async def put(self, v, block: bool = True, timeout: float | None = None, *,
                  partition: str | None = None, partition_ttl: int = 24 * 3600) -> None:
        """Append `v`. If the queue is full, wait for room (up to `timeout`) when `block`.

        Raises queue.Full if it stays full, SerializationError if `v` cannot be pickled,
        RequestSizeError past the item size limit.

            q.put({"job": 1})
        """
        await self.put_many([v], block, timeout, partition=partition,
                            partition_ttl=partition_ttl)

    async def put_many(self, vs: list, block: bool = True, timeout: float | None = None, *,
                       partition: str | None = None, partition_ttl: int = 24 * 3600) -> None:
        """Append every item of `vs`, in order, at once.

        Raises queue.Full if there is no room in time, SerializationError, RequestSizeError.

            q.put_many([1, 2, 3])
        """
        self.validate_partition_key(partition)
        values = [dumps(v) for v in vs]
        if not values:
            return
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = 0.0 if not block else (LONG_POLL if deadline is None
                                          else max(0.0, deadline - time.monotonic()))
            try:
                await self._call("POST", "/put", json={
                    "values": values, "partition": partition, "partition_ttl": partition_ttl,
                    "timeout": min(left, LONG_POLL)})
                return
            except ResourceExhaustedError:
                if not block or (deadline is not None and time.monotonic() >= deadline):
                    raise stdlib_queue.Full() from None

    async def len(self, *, partition: str | None = None, total: bool = False) -> int:
        """The number of items (of `partition`; of all partitions with `total`).

        Raises InvalidError for a bad partition.

            n = q.len()
        """
        self.validate_partition_key(partition)
        params = {"total": total}
        if partition is not None:
            params["partition"] = partition
        return (await self._call("GET", "/len", params=params))["len"]

    async def clear(self, *, partition: str | None = None, all: bool = False) -> None:
        """Remove the items of `partition` (of every partition with `all`).

        Raises InvalidError for a bad partition.

            q.clear(all=True)
        """
        self.validate_partition_key(partition)
        await self._call("POST", "/clear", json={"partition": partition, "all": all})

    async def iterate(self, *, partition: str | None = None,
                      item_poll_timeout: float = 0.0) -> AsyncIterator:
        """The items, oldest first, without removing them; after the last, wait up to
        `item_poll_timeout` seconds for more before stopping.

        Raises DeserializationError if an item cannot be unpickled here.

            for item in q.iterate(): print(item)
        """
        self.validate_partition_key(partition)
        params = {"partition": partition} if partition is not None else {}
        seen = 0
        deadline = time.monotonic() + item_poll_timeout
        while True:
            items = await self._call("GET", "/items", params=params)
            for v in items[seen:]:
                yield loads(v)
                deadline = time.monotonic() + item_poll_timeout
            seen = max(seen, len(items))
            if time.monotonic() >= deadline:
                return
            import asyncio

            await asyncio.sleep(min(0.1, max(0.0, deadline - time.monotonic())))


_Queue.objects = _KvManager(_Queue)
QueueManager = synchronize_api(_KvManager, "QueueManager")
Queue = synchronize_api(_Queue)
Queue.__len__ = lambda self: run_blocking(self._impl.len())

__all__ = ["Queue"]
