"""Network file systems: shared storage whose writes are visible live (Modal's
`modal.NetworkFileSystem`)."""

from __future__ import annotations

import asyncio
import contextlib
import io
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from shoal._client import get_client
from shoal._sync import synchronize_api
from shoal.client import check_client
from shoal.exception import InvalidError
from shoal.volume import _replayable_chunks, _StorageObject, _VolumeManager


class _NetworkFileSystem(_StorageObject):
    """Mounted with `Sandbox.create(network_file_systems={path: nfs})`. A write from the client is
    visible inside running sandboxes at once, and a sandbox's write to the client."""

    _prefix = "/nfs"
    _label = "network file system"

    @classmethod
    def from_name(cls, name: str, *, environment_name: str | None = None,
                  create_if_missing: bool = False, client=None):
        """A handle to the named network file system, looked up on first use.

        Raises NotFoundError on first use if it does not exist (unless `create_if_missing`).

            nfs = shoal.NetworkFileSystem.from_name("scratch", create_if_missing=True)
        """
        return super().from_name(name, environment_name=environment_name,
                                 create_if_missing=create_if_missing, client=client)

    async def write_file(self, remote_path: str, fp: BinaryIO, progress_cb=None) -> int:
        """Write the contents of the binary file object `fp` to `remote_path` atomically: readers
        see the old file or the whole new one. Returns the number of bytes written.

        Raises InvalidError for a bad path, NotFoundError for a deleted file system.

            with open("a.txt", "rb") as f: nfs.write_file("/a.txt", f)
        """
        if isinstance(fp, (bytes, bytearray)):
            fp = io.BytesIO(fp)
        if not hasattr(fp, "read"):
            raise InvalidError("write_file needs a binary file object (open(path, 'rb'), BytesIO)")
        r = await self._call("PUT", "/file", params={"path": remote_path},
                             content=_replayable_chunks(fp, progress_cb))
        return r["bytes"]

    async def add_local_file(self, local_path: str | Path,
                             remote_path: str | PurePosixPath | None = None,
                             progress_cb=None) -> int:
        """Upload a local file (to its name at the root, by default).

        Raises FileNotFoundError if `local_path` does not exist, NotFoundError for a deleted file
        system.

            nfs.add_local_file("model.bin", "/model.bin")
        """
        local = Path(local_path)
        if not local.is_file():
            raise FileNotFoundError(f"no such local file: {local_path}")
        remote = str(remote_path) if remote_path is not None else local.name
        with open(local, "rb") as fp:
            return await self.write_file(remote, fp, progress_cb)

    async def add_local_dir(self, local_path: str | Path,
                            remote_path: str | PurePosixPath | None = None,
                            progress_cb=None) -> None:
        """Upload a local directory's files (to a directory of its name, by default).

        Raises FileNotFoundError if `local_path` does not exist, NotFoundError for a deleted file
        system.

            nfs.add_local_dir("data", "/data")
        """
        local = Path(local_path)
        if not local.is_dir():
            raise NotADirectoryError(f"no such local directory: {local_path}")
        base = PurePosixPath(str(remote_path) if remote_path is not None else local.name)
        sem = asyncio.Semaphore(4)

        async def one(f: Path):
            async with sem:
                await self.add_local_file(f, base / f.relative_to(local).as_posix(), progress_cb)

        await asyncio.gather(*(one(f) for f in sorted(local.rglob("*")) if f.is_file()))

    @classmethod
    @contextlib.asynccontextmanager
    async def ephemeral(cls, client=None, environment_name: str | None = None,
                        _heartbeat_sleep: float | None = None):
        """An unnamed network file system that lives as long as the `with` (or `async with`)
        block; removed by the server shortly after its client dies.

        Raises InvalidError for `_heartbeat_sleep` or a `client=` naming another server.

            with shoal.NetworkFileSystem.ephemeral() as nfs: ...
        """
        async with _StorageObject.ephemeral.__func__(cls, client, environment_name,
                                                     _heartbeat_sleep=_heartbeat_sleep) as obj:
            yield obj

    @staticmethod
    async def delete(name: str, client=None, environment_name: str | None = None) -> None:
        """Delete a named network file system and its data.

        Raises NotFoundError if there is none, ConflictError while a running sandbox mounts it.

            shoal.NetworkFileSystem.delete("scratch")
        """
        check_client(client, environment_name)
        await _VolumeManager._delete(_NetworkFileSystem, name, allow_missing=False)

    @staticmethod
    async def create_deployed(deployment_name: str, client=None,
                              environment_name: str | None = None) -> str:
        """Create a named network file system; returns its id.

        Raises AlreadyExistsError if one of that name exists.

            nfs_id = shoal.NetworkFileSystem.create_deployed("scratch")
        """
        check_client(client, environment_name)
        client = await get_client()
        r = await client.call("POST", "/nfs", json={"name": deployment_name,
                                                    "allow_existing": False})
        return r["volume_id"]


_NetworkFileSystem.objects = _VolumeManager(_NetworkFileSystem)
NetworkFileSystem = synchronize_api(_NetworkFileSystem)
