"""Network file systems: shared storage whose writes are visible live (Modal's
`modal.NetworkFileSystem`)."""

from __future__ import annotations

import asyncio
import io
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from shoal._client import get_client
from shoal._sync import synchronize_api
from shoal.exception import InvalidError
from shoal.volume import _file_chunks, _StorageObject, _VolumeManager


class _NetworkFileSystem(_StorageObject):
    """Mounted with `Sandbox.create(network_file_systems={path: nfs})`. A write from the client is
    visible inside running sandboxes at once, and a sandbox's write to the client."""

    _prefix = "/nfs"
    _label = "network file system"

    async def write_file(self, remote_path: str, fp: BinaryIO, progress_cb=None) -> int:
        """Write the contents of the binary file object `fp` to `remote_path` atomically: readers
        see the old file or the whole new one. Returns the number of bytes written."""
        if isinstance(fp, (bytes, bytearray)):
            fp = io.BytesIO(fp)
        if not hasattr(fp, "read"):
            raise InvalidError("write_file needs a binary file object (open(path, 'rb'), BytesIO)")
        r = await self._call("PUT", "/file", params={"path": remote_path},
                             content=_file_chunks(fp, progress_cb))
        return r["bytes"]

    async def add_local_file(self, local_path: str | Path,
                             remote_path: str | PurePosixPath | None = None,
                             progress_cb=None) -> int:
        """Upload a local file (to its name at the root, by default)."""
        local = Path(local_path)
        if not local.is_file():
            raise FileNotFoundError(f"no such local file: {local_path}")
        remote = str(remote_path) if remote_path is not None else local.name
        with open(local, "rb") as fp:
            return await self.write_file(remote, fp, progress_cb)

    async def add_local_dir(self, local_path: str | Path,
                            remote_path: str | PurePosixPath | None = None,
                            progress_cb=None) -> None:
        """Upload a local directory's files (to a directory of its name, by default)."""
        local = Path(local_path)
        if not local.is_dir():
            raise NotADirectoryError(f"no such local directory: {local_path}")
        base = PurePosixPath(str(remote_path) if remote_path is not None else local.name)
        sem = asyncio.Semaphore(4)

        async def one(f: Path):
            async with sem:
                await self.add_local_file(f, base / f.relative_to(local).as_posix(), progress_cb)

        await asyncio.gather(*(one(f) for f in sorted(local.rglob("*")) if f.is_file()))

    @staticmethod
    async def delete(name: str) -> None:
        """Delete a named network file system and its data."""
        await _VolumeManager._delete(_NetworkFileSystem, name, allow_missing=False)

    @staticmethod
    async def create_deployed(name: str) -> str:
        """Create a named network file system; returns its id."""
        client = await get_client()
        r = await client.call("POST", "/nfs", json={"name": name, "allow_existing": False})
        return r["volume_id"]


_NetworkFileSystem.objects = _VolumeManager(_NetworkFileSystem)
NetworkFileSystem = synchronize_api(_NetworkFileSystem)
