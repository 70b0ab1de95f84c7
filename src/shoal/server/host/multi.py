"""A `SandboxHost` that owns one host per runtime (runc, gVisor) and routes each call by sandbox.

`create` picks the host by `SandboxSpec.runtime` (None: the server's default); every later call
goes to the host that has the sandbox: first the one that created or adopted it in this server,
else the one whose marker the sandbox's directory carries (`gvisor_host.MARKER`, for sandboxes an
earlier server left). A runtime that is not installed is refused at create with InvalidError.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

from shoal.exception import InvalidError
from shoal.server.host.base import HostEvent, SandboxHost, SandboxSpec

RUNTIMES = ("runc", "gvisor")


def check_runtime(name: str) -> str:
    if name not in RUNTIMES:
        raise InvalidError(f"runtime must be one of {', '.join(RUNTIMES)}, got {name!r}")
    return name


class MultiHost:
    def __init__(self, hosts: dict[str, SandboxHost], default: str, root: Path,
                 unavailable: dict[str, str] | None = None):
        self.hosts = hosts
        self.default = check_runtime(default)
        self.root = root
        self.unavailable = dict(unavailable or {})  # runtime -> why it cannot be used
        self.name = "multi"
        self.has_network = all(h.has_network for h in hosts.values())
        self.owner: dict[str, str] = {}  # sandbox id -> runtime (event loop only)

    def _runtime_of(self, sandbox_id: str) -> str:
        runtime = self.owner.get(sandbox_id)
        if runtime is None:
            with contextlib.suppress(OSError):
                marked = (self.root / sandbox_id / "runtime").read_text().strip()
                if marked in self.hosts:
                    return marked
            runtime = "runc"
        return runtime

    def host_of(self, sandbox_id: str) -> SandboxHost:
        return self.hosts[self._runtime_of(sandbox_id)]

    def runtime_of(self, sandbox_id: str) -> str:
        return self._runtime_of(sandbox_id)

    def check(self, runtime: str | None) -> str:
        """The runtime a request gets; InvalidError when it cannot be used here."""
        runtime = check_runtime(runtime or self.default)
        if runtime in self.unavailable:
            raise InvalidError(f"runtime {runtime!r} is not available on this server: "
                               f"{self.unavailable[runtime]}")
        return runtime

    # --- life
    async def create(self, spec: SandboxSpec) -> None:
        runtime = self.check(spec.runtime)
        self.owner[spec.id] = runtime
        try:
            await self.hosts[runtime].create(spec)
        except BaseException:
            self.owner.pop(spec.id, None)
            raise

    async def create_from_snapshot(self, spec: SandboxSpec, snapshot: Path) -> None:
        runtime = self.check(spec.runtime)
        self.owner[spec.id] = runtime
        try:
            await self.hosts[runtime].create_from_snapshot(spec, snapshot)
        except BaseException:
            self.owner.pop(spec.id, None)
            raise

    async def adopt(self, sandbox_id: str) -> bool:
        runtime = self._runtime_of(sandbox_id)
        if await self.hosts[runtime].adopt(sandbox_id):
            self.owner[sandbox_id] = runtime
            return True
        return False

    async def kill(self, sandbox_id: str) -> None:
        await self.host_of(sandbox_id).kill(sandbox_id)

    async def destroy(self, sandbox_id: str) -> None:
        await self.host_of(sandbox_id).destroy(sandbox_id)

    async def events(self) -> AsyncIterator[HostEvent]:
        queue: asyncio.Queue[HostEvent] = asyncio.Queue()

        async def pump(host: SandboxHost) -> None:
            async for event in host.events():
                queue.put_nowait(event)
        tasks = [asyncio.ensure_future(pump(h)) for h in self.hosts.values()]
        try:
            while True:
                yield await queue.get()
        finally:
            for t in tasks:
                t.cancel()

    async def sandboxes(self) -> set[str]:
        found: set[str] = set()
        for h in self.hosts.values():
            found |= await h.sandboxes()
        return found

    async def sandbox_logs(self) -> set[str]:
        found: set[str] = set()
        for h in self.hosts.values():
            found |= await h.sandbox_logs()
        return found

    async def forget(self, sandbox_id: str) -> None:
        await self.host_of(sandbox_id).forget(sandbox_id)
        self.owner.pop(sandbox_id, None)

    async def settle(self, live: set[str]) -> None:
        # One network manager serves both hosts: settle once.
        await self.hosts["runc"].settle(live)

    async def tunnels(self, sandbox_id: str) -> dict:
        return await self.host_of(sandbox_id).tunnels(sandbox_id)

    async def stats(self, sandbox_id: str):
        return await self.host_of(sandbox_id).stats(sandbox_id)

    async def upkeep(self) -> None:
        for h in self.hosts.values():
            await h.upkeep()

    async def close(self) -> None:
        for h in self.hosts.values():
            await h.close()

    def __getattr__(self, op: str):
        """Every per-sandbox operation (exec*, files, handles, probes, snapshots, stdio): the
        first argument is the sandbox id."""
        if op.startswith("_") or op not in _ROUTED:
            raise AttributeError(op)

        def routed(sandbox_id: str, *args, **kw):
            return getattr(self.host_of(sandbox_id), op)(sandbox_id, *args, **kw)
        return routed


_ROUTED = frozenset({
    "write_stdin", "resize_pty", "read_log", "exec", "exec_read", "exec_wait", "exec_exit",
    "exec_stdin", "exec_signal", "exec_resize", "exec_forget", "stat", "listdir", "read_file", "write_file", "mkdir",
    "remove", "rename", "watch", "handle_open", "handle_read", "handle_write", "handle_seek",
    "handle_flush", "handle_close", "probe_tcp", "export_changes", "snapshot_memory",
})
