"""Network file systems: shared storage whose writes are visible live (Modal's
`modal.NetworkFileSystem`)."""

from __future__ import annotations

import io
from typing import BinaryIO

from shoal._client import get_client
from shoal._sync import synchronize_api
from shoal.exception import InvalidError
from shoal.volume import _StorageObject


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
        client = await get_client()
        vid = await self._id()

        async def body():
            while chunk := fp.read(1 << 20):
                if isinstance(chunk, str):
                    raise TypeError("write_file needs a binary file object, not a text one")
                yield chunk

        r = await client.call("PUT", f"{self._prefix}/{vid}/file", params={"path": remote_path},
                              content=body())
        return r["bytes"]


NetworkFileSystem = synchronize_api(_NetworkFileSystem)
