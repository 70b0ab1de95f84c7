"""What every server-side object the SDK names shares (Volume, NetworkFileSystem, Dict, Queue):
an id looked up once on first use, calls on that id, and ephemeral objects that live on a lease the
client heart-beats."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from shoal._client import get_client


class NamedObject:
    """A handle to `{_prefix}/{id}`: `_name` is looked up (created if `_create_if_missing`) the
    first time the id is needed; the id comes back in the lookup answer's `_id_key`."""

    _prefix = ""
    _id_key = "id"

    def __init__(self, name: str | None = None, create_if_missing: bool = False,
                 object_id: str | None = None):
        self._name = name
        self._create_if_missing = create_if_missing
        self._object_id = object_id
        self._lock: asyncio.Lock | None = None

    async def _id(self) -> str:
        if self._object_id is None:
            if self._lock is None:
                self._lock = asyncio.Lock()
            async with self._lock:
                if self._object_id is None:
                    client = await get_client()
                    r = await client.call("POST", f"{self._prefix}/lookup", json={
                        "name": self._name, "create_if_missing": self._create_if_missing})
                    self._object_id = r[self._id_key]
        return self._object_id

    async def _call(self, method: str, suffix: str, **kwargs):
        client = await get_client()
        return await client.call(method, f"{self._prefix}/{await self._id()}{suffix}", **kwargs)

    @classmethod
    @contextlib.asynccontextmanager
    async def _leased(cls) -> AsyncIterator:
        """A new unnamed object for the block: the server removes it when the block ends, or when
        its lease runs out because this client died (the lease is renewed at a third of its TTL)."""
        client = await get_client()
        r = await client.call("POST", f"{cls._prefix}/ephemeral")
        obj = cls(object_id=r[cls._id_key])
        beat = asyncio.ensure_future(obj._heartbeat(r["lease_ttl"] / 3))
        try:
            yield obj
        finally:
            beat.cancel()
            with contextlib.suppress(Exception):
                await client.call("DELETE", f"{cls._prefix}/{obj._object_id}")

    async def _heartbeat(self, every: float) -> None:
        client = await get_client()
        while True:
            await asyncio.sleep(every)
            with contextlib.suppress(Exception):
                await client.call("POST", f"{self._prefix}/{self._object_id}/heartbeat")
