"""`shoal.Dict` (Modal's `modal.Dict`): a key-value store kept by the server, shared by every client
of it. Keys and values are pickled on the client (plain pickle); the server stores bytes.

    d = shoal.Dict.from_name("results", create_if_missing=True)
    d["job-1"] = {"ok": True}
    print(d.get("job-1"), len(d), "job-1" in d)

Limits: a key 64 KiB and a value 16 MiB pickled (SHOAL_DICT_MAX_VALUE); larger → RequestSizeError.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from shoal._kv import _KvManager, _KvObject, dumps, loads
from shoal._sync import run_blocking, synchronize_api
from shoal.exception import InvalidError


class _Dict(_KvObject):
    """A distributed dict: `from_name`, `ephemeral`, then get/put/pop/update/len/contains/items."""

    _kind = "dict"

    @classmethod
    def from_name(cls, name: str, *, environment_name: str | None = None,
                  create_if_missing: bool = False, client=None) -> "_Dict":
        """A handle to the named Dict, looked up on first use.

        Raises NotFoundError on first use if it does not exist (unless `create_if_missing`).

            d = shoal.Dict.from_name("results", create_if_missing=True)
        """
        return cls._from_name(name, environment_name, create_if_missing, client)

    @classmethod
    def from_id(cls, dict_id: str, client=None) -> "_Dict":
        """A handle to the Dict with this id.

        Raises NotFoundError on first use if there is none.

            d = shoal.Dict.from_id("di-...")
        """
        return cls._from_id(dict_id, client)

    @classmethod
    @contextlib.asynccontextmanager
    async def ephemeral(cls, *, client=None, environment_name: str | None = None,
                        _heartbeat_sleep: float | None = None) -> AsyncIterator["_Dict"]:
        """A Dict that lives as long as the `with` (or `async with`) block; the server removes
        it shortly after its client dies.

        Raises InvalidError for `_heartbeat_sleep` or another server's client.

            with shoal.Dict.ephemeral() as d: d["k"] = 1
        """
        async with cls._ephemeral(client, environment_name, _heartbeat_sleep) as obj:
            yield obj

    async def get(self, key, default=None):
        """The value of `key`, or `default`.

        Raises SerializationError for an unpicklable key, DeserializationError if the value
        cannot be unpickled here.

            d.get("job-1", {})
        """
        r = await self._call("POST", "/get", json={"key": dumps(key)})
        return loads(r["value"]) if r["found"] else default

    async def contains(self, key) -> bool:
        """Whether `key` is in the Dict.

        Raises SerializationError for an unpicklable key.

            if d.contains("job-1"): ...
        """
        r = await self._call("POST", "/get", json={"key": dumps(key)})
        return r["found"]

    async def put(self, key, value, *, skip_if_exists: bool = False) -> bool:
        """Set `key` to `value`; with `skip_if_exists`, only if `key` is absent. Returns whether
        it was written.

        Raises SerializationError for what cannot be pickled, RequestSizeError past the limits.

            d.put("job-1", {"ok": True})
        """
        r = await self._call("POST", "/put", json={"items": [[dumps(key), dumps(value)]],
                                                   "skip_if_exists": skip_if_exists})
        return r["written"] > 0

    async def update(self, other=None, **kwargs) -> None:
        """Set several keys at once (from a mapping or pairs, and keywords), in one transaction.

        Raises SerializationError for what cannot be pickled, RequestSizeError past the limits.

            d.update({"a": 1}, b=2)
        """
        items = dict(other or {}, **kwargs)
        if items:
            await self._call("POST", "/put", json={
                "items": [[dumps(k), dumps(v)] for k, v in items.items()]})

    async def pop(self, key, default=...):
        """Remove `key` and return its value (or `default`).

        Raises KeyError if `key` is absent and no `default` was given.

            value = d.pop("job-1")
        """
        r = await self._call("POST", "/pop", json={"key": dumps(key)})
        if r["found"]:
            return loads(r["value"])
        if default is ...:
            raise KeyError(key)
        return default

    async def len(self) -> int:
        """The number of keys.

        Raises NotFoundError if the Dict does not exist.

            n = d.len()
        """
        return (await self._call("GET", "/len"))["len"]

    async def clear(self) -> None:
        """Remove every key.

        Raises NotFoundError if the Dict does not exist.

            d.clear()
        """
        await self._call("POST", "/clear")

    async def _items(self) -> list[tuple]:
        return [(loads(k), loads(v)) for k, v in await self._call("GET", "/items")]

    async def items(self) -> AsyncIterator[tuple]:
        """The (key, value) pairs, in insertion order, as of the call.

        Raises DeserializationError if a pair cannot be unpickled here.

            for k, v in d.items(): ...
        """
        for kv in await self._items():
            yield kv

    async def keys(self) -> AsyncIterator:
        """The keys, in insertion order.

        Raises DeserializationError if a key cannot be unpickled here.

            list(d.keys())
        """
        for k, _ in await self._items():
            yield k

    async def values(self) -> AsyncIterator:
        """The values, in insertion order.

        Raises DeserializationError if a value cannot be unpickled here.

            sum(d.values())
        """
        for _, v in await self._items():
            yield v

    async def __aiter__(self):
        for k, _ in await self._items():
            yield k


_Dict.objects = _KvManager(_Dict)
DictManager = synchronize_api(_KvManager, "DictManager")
Dict = synchronize_api(_Dict)


# Mapping syntax on the blocking face, as Modal's: d[k], d[k] = v, del d[k], k in d, len(d).
def _getitem(self, key):
    sentinel = object()
    value = run_blocking(self._impl.get(key, sentinel))
    if value is sentinel:
        raise KeyError(key)
    return value


def _setitem(self, key, value):
    run_blocking(self._impl.put(key, value))


def _delitem(self, key):
    run_blocking(self._impl.pop(key))


Dict.__getitem__ = _getitem
Dict.__setitem__ = _setitem
Dict.__delitem__ = _delitem
Dict.__contains__ = lambda self, key: run_blocking(self._impl.contains(key))
Dict.__len__ = lambda self: run_blocking(self._impl.len())

__all__ = ["Dict"]
del InvalidError
