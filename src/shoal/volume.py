"""Volumes: named or ephemeral storage mounted into sandboxes (Modal's `modal.Volume`)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
from collections.abc import AsyncIterator

from shoal._client import get_client
from shoal._sync import synchronize_api
from shoal.exception import InvalidError


class FileEntryType(enum.IntEnum):
    UNSPECIFIED = 0
    FILE = 1
    DIRECTORY = 2
    SYMLINK = 3
    FIFO = 4
    SOCKET = 5


@dataclasses.dataclass(frozen=True)
class FileEntry:
    """One entry of a listing: path relative to the root, type, mtime (epoch seconds), size."""
    path: str
    type: FileEntryType
    mtime: int
    size: int


class _StorageObject:
    """What volumes and network file systems share: lookup, ephemeral leases, reading, listing."""

    _prefix = "/volumes"
    _label = "volume"

    def __init__(self, name: str | None = None, create_if_missing: bool = False,
                 object_id: str | None = None, read_only: bool = False):
        self._name = name
        self._create_if_missing = create_if_missing
        self._object_id = object_id
        self._read_only = read_only
        self._lock: asyncio.Lock | None = None

    @classmethod
    def from_name(cls, name: str, *, create_if_missing: bool = False,
                  environment_name: str | None = None, version: int | None = None):
        """A handle to the named object; it is looked up on first use, and NotFoundError is raised
        then if it does not exist (unless `create_if_missing=True`).

            vol = shoal.Volume.from_name("my-data", create_if_missing=True)
        """
        if not isinstance(name, str):
            raise InvalidError(f"{cls._label} name must be a str, got {type(name).__name__}")
        return cls(name=name, create_if_missing=create_if_missing)

    @classmethod
    @contextlib.asynccontextmanager
    async def ephemeral(cls, **_ignored) -> AsyncIterator["_StorageObject"]:
        """An unnamed object that lives as long as the `with` block (and is removed by the server
        shortly after its client dies without leaving the block: the client heart-beats a lease).

            with shoal.Volume.ephemeral() as vol: ...
        """
        client = await get_client()
        r = await client.call("POST", f"{cls._prefix}/ephemeral")
        obj = cls(object_id=r["volume_id"])
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

    async def hydrate(self):
        """Look the object up now (it is otherwise looked up on first use)."""
        await self._id()
        return self

    async def _id(self) -> str:
        if self._object_id is None:
            if self._lock is None:
                self._lock = asyncio.Lock()
            async with self._lock:
                if self._object_id is None:
                    client = await get_client()
                    r = await client.call("POST", f"{self._prefix}/lookup", json={
                        "name": self._name, "create_if_missing": self._create_if_missing})
                    self._object_id = r["volume_id"]
        return self._object_id

    @property
    def object_id(self) -> str | None:
        return self._object_id

    @property
    def name(self) -> str | None:
        return self._name

    async def read_file(self, path: str) -> AsyncIterator[bytes]:
        """The file's contents, in chunks, streamed. FileNotFoundError if there is none.

            for chunk in vol.read_file("a.txt"): ...
        """
        client = await get_client()
        vid = await self._id()
        async with client.stream("GET", f"{self._prefix}/{vid}/file", params={"path": path}) as r:
            async for chunk in r.aiter_raw():
                yield chunk

    async def listdir(self, path: str = "/", recursive: bool = False) -> list[FileEntry]:
        """Entries under `path` (relative to the root); with `recursive`, the whole tree."""
        client = await get_client()
        vid = await self._id()
        rows = await client.call("GET", f"{self._prefix}/{vid}/listdir",
                                 params={"path": path, "recursive": recursive})
        return [FileEntry(r["path"], FileEntryType(r["type"]), r["mtime"], r["size"]) for r in rows]

    async def iterdir(self, path: str = "/", recursive: bool = True) -> AsyncIterator[FileEntry]:
        """Like `listdir`, as an iterator."""
        for entry in await self.listdir(path, recursive=recursive):
            yield entry

    def _mount_spec(self, mount_path: str) -> dict:
        return {"path": mount_path, "volume_id": self._object_id, "read_only": self._read_only}

    def __repr__(self) -> str:
        return f"{type(self).__name__.lstrip('_')}({self._name or self._object_id})"


class _Volume(_StorageObject):
    """Persistent (named) or ephemeral storage, mounted with `Sandbox.create(volumes={path: vol})`.
    A sandbox's writes are visible to the client (`read_file`, `listdir`) and to other sandboxes
    mounting the same volume at once: shoal volumes are local directories, not snapshots."""

    async def commit(self) -> None:
        """Writes are already visible everywhere; kept for Modal code that calls it."""
        await self._id()

    async def reload(self) -> None:
        """Writes are already visible everywhere; kept for Modal code that calls it."""
        await self._id()


Volume = synchronize_api(_Volume)
