"""Memory snapshots of sandboxes (Modal's `modal.SandboxSnapshot`, `modal.snapshot`)."""

from __future__ import annotations

from shoal._client import checked_id, get_client
from shoal._sync import synchronize_api
from shoal.client import check_client


class _SandboxSnapshot:
    """A saved sandbox: its processes, their memory and its files at one instant, made by
    `Sandbox._experimental_snapshot()`. `Sandbox._experimental_from_snapshot(snapshot)` starts a
    new sandbox that continues from it. Kept 7 days after it was taken (as Modal;
    `SHOAL_MEMORY_SNAPSHOT_TTL` on the server), then removed.

        snapshot = sb._experimental_snapshot()
        sb2 = shoal.Sandbox._experimental_from_snapshot(snapshot)
    """

    def __init__(self, snapshot_id: str):
        self._snapshot_id = snapshot_id
        self._info: dict | None = None

    @property
    def object_id(self) -> str:
        return self._snapshot_id

    @staticmethod
    def from_id(sandbox_snapshot_id: str, client=None) -> "_SandboxSnapshot":
        """A snapshot by its id (`snapshot.object_id`); checked when used (or by `hydrate`).

        Raises InvalidError for a string that is not a snapshot id; NotFoundError (when used)
        for an unknown or expired one.

            snapshot = shoal.SandboxSnapshot.from_id("sn-...")
        """
        check_client(client)
        checked_id(sandbox_snapshot_id, "sandbox snapshot", "sn-")
        return _SandboxSnapshot(sandbox_snapshot_id)

    async def hydrate(self, client=None) -> "_SandboxSnapshot":
        """Check with the server that the snapshot exists; returns the snapshot.

        Raises NotFoundError for an unknown or expired snapshot.

            snapshot = shoal.SandboxSnapshot.from_id("sn-...").hydrate()
        """
        check_client(client)
        c = await get_client()
        self._info = await c.call("GET", f"/memory-snapshots/{self._snapshot_id}")
        return self

    def __repr__(self) -> str:
        return f"SandboxSnapshot({self._snapshot_id})"


SandboxSnapshot = synchronize_api(_SandboxSnapshot)
