"""Volumes: named or ephemeral storage mounted into sandboxes (Modal's `modal.Volume`).

Consistency model. A shoal volume is one directory on the server's disk, bind-mounted into every
sandbox that uses it. So:
- a write inside a sandbox is visible at once to every other sandbox mounting the volume and to
  the client (`read_file`, `listdir`) — no commit is needed, and none is lost if a sandbox dies;
- a client upload (`batch_upload`, `copy_files`) is visible to running sandboxes the moment the
  call returns; each file lands whole (written aside, fsynced, renamed into place);
- `commit()` and `reload()` are accepted for Modal code and return once the server has confirmed
  the volume exists: there is nothing to flush or fetch.
Two writers of one file inside sandboxes get POSIX semantics (as two processes on one machine);
two client uploads of one path: the last to complete wins, whole.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime
import enum
from collections.abc import AsyncIterator, Callable
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from shoal._client import Replayable, checked_id, get_client
from shoal._named import NamedObject
from shoal._sync import synchronize_api
from shoal.client import check_client
from shoal.exception import InvalidError, NotFoundError

UPLOAD_CONCURRENCY = 4
UPLOAD_CHUNK = 4 << 20
READ_CHUNK = 4 << 20


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


@dataclasses.dataclass(frozen=True)
class VolumeInfo:
    name: str | None
    created_at: datetime.datetime
    created_by: str | None = None


def _entries(rows: list[dict]) -> list[FileEntry]:
    return [FileEntry(r["path"], FileEntryType(r["type"]), r["mtime"], r["size"]) for r in rows]


async def _file_chunks(fp: BinaryIO, progress: Callable[[int], None] | None):
    while True:
        chunk = await asyncio.to_thread(fp.read, UPLOAD_CHUNK)
        if not chunk:
            return
        if isinstance(chunk, str):
            raise TypeError("uploads need a binary file object (open(path, 'rb')), not a text one")
        if progress:
            progress(len(chunk))
        yield chunk


def _replayable_chunks(fp: BinaryIO, progress: Callable[[int], None] | None):
    """An upload body from `fp` that is sent again from where it started after a server restart
    when `fp` can seek back there; else a plain stream (the call fails if the server restarts)."""
    try:
        start = fp.tell() if fp.seekable() else None
    except (OSError, ValueError):
        start = None
    if start is None:
        return _file_chunks(fp, progress)

    def again():
        fp.seek(start)
        return _file_chunks(fp, progress)

    return Replayable(again)


def _check_version(version) -> None:
    if version not in (None, 1, 2):
        raise InvalidError(f"version must be 1 or 2 (Modal's volume formats), got {version!r}")


class _StorageObject(NamedObject):
    """What volumes and network file systems share: lookup, leases, reading, listing, removing."""

    _prefix = "/volumes"
    _id_key = "volume_id"
    _label = "volume"

    def __init__(self, name: str | None = None, create_if_missing: bool = False,
                 object_id: str | None = None, read_only: bool = False):
        super().__init__(name, create_if_missing, object_id)
        self._read_only = read_only

    @classmethod
    def from_name(cls, name: str, *, environment_name: str | None = None,
                  create_if_missing: bool = False, version: int | None = None,
                  create_options: dict | None = None, client=None):
        """A handle to the named object; it is looked up on first use. `version` (Modal's volume
        format, 1 or 2) is accepted: shoal has one format, as consistent as either.

        Raises NotFoundError on first use if it does not exist (unless `create_if_missing=True`);
        InvalidError for a bad name, `create_options`, or a `client=` naming another server.

            vol = shoal.Volume.from_name("my-data", create_if_missing=True)
        """
        check_client(client, environment_name)
        if not isinstance(name, str):
            raise InvalidError(f"{cls._label} name must be a str, got {type(name).__name__}")
        _check_version(version)
        if create_options:
            raise InvalidError("create_options is not supported by shoal")
        return cls(name=name, create_if_missing=create_if_missing)

    @classmethod
    def _from_id(cls, object_id: str):
        if not isinstance(object_id, str) or not object_id:
            raise InvalidError("the id must be a non-empty str")
        return cls(object_id=checked_id(object_id, cls._label))

    @classmethod
    @contextlib.asynccontextmanager
    async def ephemeral(cls, client=None, environment_name: str | None = None,
                        version: int | None = None, create_options: dict | None = None,
                        _heartbeat_sleep: float | None = None) -> AsyncIterator["_StorageObject"]:
        """An unnamed object that lives as long as the `with` (or `async with`) block, and is
        removed by the server shortly after its client dies without leaving the block (the client
        heart-beats a lease; see SHOAL_LEASE_TTL, which sets the beat: `_heartbeat_sleep` is
        refused).

        Raises InvalidError for `create_options`, `_heartbeat_sleep` or another server's client.

            with shoal.Volume.ephemeral() as vol: ...
        """
        check_client(client, environment_name)
        _check_version(version)
        if create_options or _heartbeat_sleep is not None:
            raise InvalidError("ephemeral(create_options=, _heartbeat_sleep=) are not supported "
                               "by shoal")
        async with cls._leased() as obj:
            yield obj

    async def hydrate(self, client=None):
        """Look the object up now (it is otherwise looked up on first use); returns it.

        Raises NotFoundError if it does not exist (and was not to be created).

            vol = shoal.Volume.from_name("data").hydrate()
        """
        check_client(client)
        await self._id()
        return self

    @property
    def client(self):
        """The Client for the server this object lives on."""
        from shoal.client import _Client

        return _Client()

    @property
    def object_id(self) -> str | None:
        return self._object_id

    @property
    def name(self) -> str | None:
        return self._name

    async def info(self) -> VolumeInfo:
        """Name and creation time.

        Raises NotFoundError for a deleted volume (or file system).

            print(vol.info().created_at)
        """
        r = await self._call("GET", "")
        return VolumeInfo(r["name"], datetime.datetime.fromtimestamp(r["created_at"],
                                                                     datetime.timezone.utc))

    async def read_file(self, path: str) -> AsyncIterator[bytes]:
        """The file's contents as a stream of byte chunks (never held whole in memory).
        FileNotFoundError if there is no such file.

            for chunk in vol.read_file("a.txt"): ...

        Raises FileNotFoundError for a missing file, NotFoundError for a deleted volume (or file
        system).
        """
        client = await get_client()
        vid = await self._id()
        async with client.stream("GET", f"{self._prefix}/{vid}/file", params={"path": path}) as r:
            # httpcore hands over ~64 KiB at a time; every yield to a blocking caller is a thread
            # hop, so chunks are gathered into a few MiB first (2x faster reads, measured).
            parts: list[bytes] = []
            size = 0
            async for chunk in r.aiter_raw():
                parts.append(chunk)
                size += len(chunk)
                if size >= READ_CHUNK:
                    yield b"".join(parts)
                    parts, size = [], 0
            if parts:
                yield b"".join(parts)

    async def read_file_into_fileobj(self, path: str, fileobj: BinaryIO,
                                     progress_cb: Callable[[int], None] | None = None) -> int:
        """Stream the file into a binary file object; returns the number of bytes.

        Raises FileNotFoundError for a missing file, NotFoundError for a deleted volume (or file
        system).

            with open("out.bin", "wb") as f: vol.read_file_into_fileobj("/out.bin", f)
        """
        n = 0
        async for chunk in self.read_file(path):
            await asyncio.to_thread(fileobj.write, chunk)
            n += len(chunk)
            if progress_cb:
                progress_cb(len(chunk))
        return n

    async def listdir(self, path: str = "/", recursive: bool = False) -> list[FileEntry]:
        """Entries under `path` (relative to the root); with `recursive`, the whole tree. Glob
        patterns (`*`, `?`, `**`) list the matching entries.

        Raises FileNotFoundError for a missing path, NotFoundError for a deleted volume (or file
        system).

            paths = [e.path for e in vol.listdir("/")]
        """
        return _entries(await self._call("GET", "/listdir",
                                         params={"path": path, "recursive": recursive}))

    async def iterdir(self, path: str = "/", recursive: bool = True) -> AsyncIterator[FileEntry]:
        """Like `listdir`, as an iterator (recursive by default, as Modal's).

        Raises FileNotFoundError for a missing path, NotFoundError for a deleted volume (or file
        system).

            for entry in vol.iterdir("/", recursive=True): print(entry.path)
        """
        for entry in await self.listdir(path, recursive=recursive):
            yield entry

    async def remove_file(self, path: str, recursive: bool = False) -> None:
        """Remove a file, link or directory (a non-empty one only with `recursive`).
        FileNotFoundError if there is none.

        Raises FileNotFoundError for a missing path; a non-empty directory needs `recursive=True`.

            vol.remove_file("/old", recursive=True)
        """
        await self._call("DELETE", "/file", params={"path": path, "recursive": recursive})

    def _mount_spec(self, mount_path: str) -> dict:
        return {"path": mount_path, "volume_id": self._object_id, "read_only": self._read_only}

    def __repr__(self) -> str:
        return f"{type(self).__name__.lstrip('_')}({self._name or self._object_id})"


class _VolumeUploadContextManager:
    """Collects `put_file` / `put_directory` calls; on leaving the block, uploads everything and
    lands it together. Without `force`, if any target exists, FileExistsError is raised and nothing
    from the batch lands. An exception inside the block uploads nothing."""

    def __init__(self, volume: "_Volume", force: bool,
                 progress_cb: Callable[[int], None] | None = None):
        self._volume = volume
        self._force = force
        self._progress = progress_cb
        self._items: list[tuple[object, str, int | None]] = []

    def put_file(self, local_file: str | Path | BinaryIO, remote_path: str | PurePosixPath,
                 mode: int | None = None) -> None:
        """Upload a local file (path or binary file object) to `remote_path`.

        Raises FileNotFoundError (on leaving the block) for a missing local file.

            batch.put_file("a.txt", "/a.txt")
        """
        remote = str(remote_path)
        if remote.endswith("/"):
            if isinstance(local_file, (str, Path)):
                remote += Path(local_file).name
            else:
                raise InvalidError("remote_path must name a file, not a directory")
        if isinstance(local_file, (str, Path)):
            if not Path(local_file).is_file():
                raise FileNotFoundError(f"no such local file: {local_file}")
        elif not hasattr(local_file, "read"):
            raise InvalidError("put_file takes a path or a binary file object")
        if mode is not None and not (isinstance(mode, int) and 0 <= mode <= 0o7777):
            raise InvalidError(f"mode must be an int like 0o644, got {mode!r}")
        self._items.append((local_file, remote, mode))

    def put_directory(self, local_path: str | Path, remote_path: str | PurePosixPath,
                      recursive: bool = True) -> None:
        """Upload the files of a local directory under `remote_path` (symlinks are followed only
        when they point to files; the upload never writes outside `remote_path`).

        Raises FileNotFoundError (on leaving the block) for a missing local directory.

            batch.put_directory("data/", "/data")
        """
        local = Path(local_path)
        if not local.is_dir():
            raise NotADirectoryError(f"no such local directory: {local_path}")
        base = PurePosixPath(str(remote_path))
        files = local.rglob("*") if recursive else local.glob("*")
        for f in sorted(files):
            if f.is_file():
                rel = f.relative_to(local).as_posix()
                self._items.append((f, str(base / rel), f.stat().st_mode & 0o777))

    async def __aenter__(self) -> "_VolumeUploadContextManager":
        return self

    async def __aexit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None or not self._items:
            return
        client = await get_client()
        prefix = f"{self._volume._prefix}/{await self._volume._id()}/batches"
        batch = (await client.call("POST", prefix, json={
            "paths": [remote for _, remote, _ in self._items], "force": self._force}))["batch_id"]
        sem = asyncio.Semaphore(UPLOAD_CONCURRENCY)

        async def put(item):
            local, remote, mode = item
            async with sem:
                fp = open(local, "rb") if isinstance(local, (str, Path)) else local
                try:
                    params = {"path": remote}
                    if mode is not None:
                        params["mode"] = format(mode, "o")
                    await client.call("PUT", f"{prefix}/{batch}/file", params=params,
                                      content=_file_chunks(fp, self._progress))
                finally:
                    if fp is not local:
                        fp.close()

        try:
            await asyncio.gather(*(put(i) for i in self._items))
            await client.call("POST", f"{prefix}/{batch}/commit",
                              params={"force": self._force})
        except BaseException:
            with contextlib.suppress(Exception):
                await client.call("DELETE", f"{prefix}/{batch}")
            raise


class _Volume(_StorageObject):
    """Persistent (named) or ephemeral storage, mounted with `Sandbox.create(volumes={path: vol})`.
    See this module's docstring for when writes become visible (at once, everywhere)."""

    @classmethod
    def from_id(cls, volume_id: str, client=None) -> "_Volume":
        """A handle to the volume with this id.

        Raises InvalidError for an empty id; NotFoundError on first use if there is none.

            vol = shoal.Volume.from_id("vo-...")
        """
        check_client(client)
        return cls._from_id(volume_id)

    def read_only(self) -> "_Volume":
        """The same volume, mounted read-only (`with_mount_options(read_only=True)`).

        Raises nothing.

            sb = shoal.Sandbox.create(volumes={"/data": vol.read_only()})
        """
        return self.with_mount_options(read_only=True)

    def with_mount_options(self, *, read_only: bool = False,
                           sub_path: str | None = None) -> "_Volume":
        """The same volume, mounted read-only: writes inside the sandbox fail with EROFS.

        Raises InvalidError for `sub_path` (mounting a part of a volume is not supported yet).

            sb = shoal.Sandbox.create(volumes={"/data": vol.with_mount_options(read_only=True)})
        """
        if sub_path is not None:
            raise InvalidError("with_mount_options(sub_path=...) is not supported by shoal yet: "
                               "mount the whole volume and use the sub-directory")
        copy = type(self)(self._name, self._create_if_missing, self._object_id, read_only)
        copy._lock = self._lock
        return copy

    async def commit(self) -> None:
        """Writes are visible everywhere already (see the consistency model); returns once the
        volume is confirmed to exist.

        Raises NotFoundError for a deleted volume (or file system).

            vol.commit()
        """
        await self._call("GET", "")

    async def reload(self) -> None:
        """Writes are visible everywhere already (see the consistency model); returns once the
        volume is confirmed to exist.

        Raises NotFoundError for a deleted volume (or file system).

            vol.reload()
        """
        await self._call("GET", "")

    def batch_upload(self, force: bool = False,
                     progress_cb: Callable[[int], None] | None = None
                     ) -> _VolumeUploadContextManager:
        """Upload files together, in one batch sent when the block ends.

        Raises FileNotFoundError for a missing local file, FileExistsError for an existing remote
        file unless `force`.

            with vol.batch_upload() as batch:
                batch.put_file("local.txt", "/remote.txt")
                batch.put_directory("data/", "/data")
        """
        return _VolumeUploadContextManager(self, force, progress_cb)

    async def copy_files(self, src_paths: list[str], dst_path: str,
                         recursive: bool = False) -> None:
        """Copy within the volume, like `cp`: into `dst_path` if it is a directory (required for
        several sources), else to `dst_path`; directories only with `recursive`.

        Raises FileNotFoundError for a missing source, InvalidError for several sources into a non-
        directory.

            vol.copy_files(["/a.txt"], "/backup/")
        """
        if isinstance(src_paths, str):
            raise InvalidError("src_paths must be a list of paths")
        await self._call("POST", "/copy", json={"src_paths": list(src_paths), "dst": dst_path,
                                                "recursive": recursive})

    @staticmethod
    async def rename(old_name: str, new_name: str, *, client=None,
                     environment_name: str | None = None) -> None:
        """Rename a named volume.

        Raises NotFoundError if there is no `old_name`, AlreadyExistsError if `new_name` exists.

            shoal.Volume.rename("old", "new")
        """
        check_client(client, environment_name)
        client = await get_client()
        await client.call("POST", "/volumes/rename",
                          json={"old_name": old_name, "new_name": new_name})

    @staticmethod
    async def delete(name: str) -> None:
        """Delete a named volume and its data (Modal 0.x name; prefer `Volume.objects.delete`).

        Raises NotFoundError if there is no such volume.

            shoal.Volume.delete("scratch")
        """
        await _VolumeManager._delete(_Volume, name, allow_missing=False)


class _VolumeManager:
    """`Volume.objects`: create, list and delete named volumes."""

    def __init__(self, cls=None):
        self._cls = cls

    async def create(self, name: str, *, allow_existing: bool = False,
                     environment_name: str | None = None) -> None:
        """Create a named volume. AlreadyExistsError if it exists, unless `allow_existing`.

        Raises AlreadyExistsError if it exists (unless `allow_existing`), InvalidError for a bad
        name.

            shoal.Volume.objects.create("data")
        """
        client = await get_client()
        await client.call("POST", self._cls._prefix,
                          json={"name": name, "allow_existing": allow_existing})

    async def list(self, *, environment_name: str | None = None) -> list:
        """All named volumes.

        Raises ConnectionError if the server cannot be reached.

            names = [v.name for v in shoal.Volume.objects.list()]
        """
        client = await get_client()
        return [self._cls(r["name"], object_id=r["volume_id"])
                for r in await client.call("GET", self._cls._prefix)]

    async def delete(self, name: str, *, allow_missing: bool = False,
                     environment_name: str | None = None) -> None:
        """Delete a named volume and its data. NotFoundError if missing, unless
        `allow_missing`; ConflictError while a running sandbox mounts it.

        Raises NotFoundError if there is no such volume (unless `allow_missing`).

            shoal.Volume.objects.delete("data")
        """
        await self._delete(self._cls, name, allow_missing)

    @staticmethod
    async def _delete(cls, name: str, allow_missing: bool) -> None:
        client = await get_client()
        try:
            r = await client.call("POST", f"{cls._prefix}/lookup",
                                  json={"name": name, "create_if_missing": False})
        except NotFoundError:
            if allow_missing:
                return
            raise
        await client.call("DELETE", f"{cls._prefix}/{r['volume_id']}")


VolumeUploadContextManager = synchronize_api(_VolumeUploadContextManager)
_Volume.objects = _VolumeManager(_Volume)
VolumeManager = synchronize_api(_VolumeManager)
Volume = synchronize_api(_Volume)

__all__ = ["FileEntry", "FileEntryType", "Volume", "VolumeInfo", "VolumeUploadContextManager"]
