"""`SandboxHost` for gVisor (`runsc`): RuncHost's life cycle, with a user-space kernel between the
sandbox and the host's.

What it shares with RuncHost: the overlay root on the host, the agent as PID 1 with its socket in a
bind-mounted run dir (runsc's `--host-uds=all` lets the host connect to it), entrypoint logs and
stdin as files and a pipe, exit status from a pidfd (here of the runsc sandbox process, whose exit
status is the container's), network namespaces from the network manager, snapshots from the
overlay's upper dir.

What differs (docs/gvisor.md):
- Files: `/proc/<pid>/root` of a gVisor sandbox is not its root, so every file operation goes
  through the agent (`agent_files.AgentFiles`), with the same errors the runc file API gives.
- Limits: memory and cpu through the cgroups runsc makes; a host `pids.max` panics the whole
  sandbox, so processes are bounded by RLIMIT_NPROC instead (which, as on Linux, does not bind
  uid 0 — the memory limit still does).
- Network: runsc's own network stack refuses to start on this kernel; runsc runs with
  `--network=host` inside the sandbox's namespace, so gVisor's sockets are the namespace's and the
  host's nftables policy applies unchanged. `block_network`: `--network=none` (gVisor loopback).
- `watch`: inotify inside gVisor sees what the sandbox does, not what the host writes into a shared
  volume directory.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from pathlib import Path

from shoal.server.host import agent_client, runc_files, runsc
from shoal.server.host.agent_files import AgentFiles
from shoal.server.host.base import HostError, RuntimeError_, SandboxGone, SandboxSpec
from shoal.server.host.oci import ContainerSpec, build_config
from shoal.server.host.rootfs import Rootfs, copy_tree
from shoal.server.host.runc import CGROUP_PARENT
from shoal.server.host.runc_host import (AGENT_TIMEOUT, RUN_DIR, RuncHost, _Sandbox,
                                         reap_zombie_children)

log = logging.getLogger("shoal.host.gvisor")
MARKER = "runtime"  # sandboxes/<id>/runtime: "gvisor", so a restarted server knows the owner
IMAGE = "image"  # in a memory snapshot's directory: runsc's checkpoint files (beside upper/)
RELISTEN = agent_client.SIGNALS["RELISTEN"]
QUIESCE_MS = 60_000  # the agent listens again by itself this long after QUIESCE (a lost host)


class GvisorHost(RuncHost):
    name = "gvisor"
    agent_flags = ("--compat",)

    def __init__(self, root: Path, runsc_root: Path, tools_dir: Path, network=None):
        super().__init__(root, runsc_root.parent / "runc", tools_dir, network)
        self.runtime = runsc.RunscRuntime(runsc_root)
        self.agent_files = AgentFiles(self._call)

    # --- life
    async def _start(self, cspec: ContainerSpec, bundle: Path, stdin: int, stdout: int,
                     stderr: int, snapshot: Path | None = None) -> int:
        (bundle.parent / MARKER).write_text(self.name)
        config = gvisor_config(cspec)
        if snapshot is None:
            flags = ("--dcache=0",) if has_fuse_source(cspec.mounts) else ()
            return await self.runtime.start(config, cspec.id, bundle,
                                            cspec.netns_path is not None, stdin, stdout, stderr,
                                            flags)
        if cspec.netns_path is not None:
            raise RuntimeError_("a memory snapshot restores without a network")
        pid = await self.runtime.restore(config, cspec.id, bundle, snapshot / IMAGE, stdin,
                                         stdout, stderr)
        # The restored agent is quiesced, as it was when saved: it listens again now.
        await self.runtime.signal_init(cspec.id, RELISTEN)
        return pid

    # --- memory snapshots
    async def snapshot_memory(self, sandbox_id: str, dest: Path) -> None:
        """Save the sandbox's processes and memory (`runsc checkpoint --leave-running`) and its
        root filesystem's changes (the overlay's upper dir) into `dest`; the sandbox goes on.

        gVisor refuses to save a Unix socket bound on or connected to the host, so the agent
        first closes its socket and connections (QUIESCE) and listens again afterwards
        (RELISTEN); agent calls meanwhile wait (`thawed`) and calls whose connection closed are
        asked again (`_call`). The sandbox is paused while its upper dir is copied and its
        memory saved, so files and memory are of the same instant."""
        sb = self._running(sandbox_id)
        async with sb.agent_lock:
            if not sb.thawed.is_set():
                raise HostError(f"sandbox {sandbox_id} is already being snapshotted")
            sb.thawed.clear()
            sb.snapshots += 1
            try:
                agent = sb.agent
                if agent is None or agent.closed.done():
                    agent = await agent_client.connect(sb.dir / RUN_DIR, timeout=AGENT_TIMEOUT)
                try:
                    await agent.quiesce(QUIESCE_MS)
                finally:
                    await agent.close()
                    sb.agent = None
                await _socket_gone(sb.dir / RUN_DIR / "agent.sock")
                await self._save(sb, dest)
            except (RuntimeError_, OSError, agent_client.AgentConnectionError) as e:
                if sb.exited:
                    raise SandboxGone(f"sandbox {sandbox_id} is not running") from None
                raise HostError(f"memory snapshot of {sandbox_id} failed: {e}") from None
            finally:
                with contextlib.suppress(RuntimeError_):
                    await self.runtime.signal_init(sandbox_id, RELISTEN)
                sb.thawed.set()

    async def _save(self, sb: _Sandbox, dest: Path) -> None:
        await self.runtime.pause(sb.id)
        try:
            (dest / "upper").mkdir(parents=True)
            await asyncio.to_thread(copy_tree, sb.rootfs.upper, dest / "upper")
            await self.runtime.checkpoint(sb.id, dest / IMAGE)
        finally:
            state = await self.runtime.state(sb.id)
            if state is not None and state.status == "paused":
                await self.runtime.resume(sb.id)

    async def create_from_snapshot(self, spec: SandboxSpec, snapshot: Path) -> None:
        """A new sandbox `spec.id` restored from `snapshot_memory`'s `snapshot`: the saved
        upper dir over the same image layers, its own cgroups, bundle, logs and stdin; its
        processes go on from the saved instant. `spec` must have no network."""
        if spec.network is not None:
            raise HostError("a memory snapshot restores without a network (block_network)")
        await self._create(spec, snapshot)

    def _hold_root(self, sb: _Sandbox) -> None:
        pass  # no host-side view of a gVisor sandbox's root: files go through the agent

    async def adopt(self, sandbox_id: str) -> bool:
        return await super().adopt(sandbox_id)

    async def destroy(self, sandbox_id: str) -> None:
        self.agent_files.forget(sandbox_id)
        sb = self.live.get(sandbox_id)
        if sb is not None and not sb.exited and sb.pidfd is not None:
            # After kill: let the pidfd watcher reap the sandbox process (and read its status);
            # `runsc delete` waits for it to be gone, and an unreaped zombie never is.
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(sb.exit_event.wait(), 5)
        reaper = asyncio.ensure_future(self._reap_while_deleting())
        try:
            await super().destroy(sandbox_id)
        finally:
            reaper.cancel()

    async def _reap_while_deleting(self) -> None:
        """The gofer and runsc's helpers exit during `runsc delete`: reap them as they go."""
        while True:
            _reap_runsc_strays({s.pid for s in self.live.values() if not s.exited})
            await asyncio.sleep(0.01)

    async def sandboxes(self) -> set[str]:
        found = {c.id for c in await self.runtime.list()}
        found.update(p.name for p in self.root.iterdir() if owns(self.root, p.name)
                     and (Rootfs(p).is_mounted() or (p / "bundle").exists()))
        return found

    async def upkeep(self) -> None:
        await asyncio.to_thread(_reap_runsc_strays, {sb.pid for sb in self.live.values()})

    def _on_exit(self, sb: _Sandbox) -> None:
        super()._on_exit(sb)
        # The gofer ends with the sandbox; reap it now, so `runsc delete` does not wait for it.
        _reap_runsc_strays({s.pid for s in self.live.values() if not s.exited})

    # --- files, through the agent
    async def stat(self, sandbox_id: str, path: str) -> dict:
        return await self.agent_files.stat(sandbox_id, path)

    async def listdir(self, sandbox_id: str, path: str, offset: int = 0,
                      limit: int | None = None) -> list[dict]:
        # The agent pages its LIST replies; the whole directory is gathered, then the page cut.
        entries = await self.agent_files.listdir(sandbox_id, path)
        return entries[offset:offset + (limit if limit is not None else runc_files.LIST_PAGE)]

    async def read_file(self, sandbox_id: str, path: str,
                        limit: int | None) -> tuple[int, AsyncIterator[bytes]]:
        return await self.agent_files.read_file(sandbox_id, path, limit)

    async def write_file(self, sandbox_id: str, path: str, chunks: AsyncIterator[bytes],
                         parents: bool) -> int:
        return await self.agent_files.write_file(sandbox_id, path, chunks, parents)

    async def mkdir(self, sandbox_id: str, path: str, parents: bool, exist_ok: bool) -> None:
        await self.agent_files.mkdir(sandbox_id, path, parents, exist_ok)

    async def remove(self, sandbox_id: str, path: str, recursive: bool) -> None:
        await self.agent_files.remove(sandbox_id, path, recursive)

    async def rename(self, sandbox_id: str, src: str, dst: str, overwrite: bool) -> None:
        await self.agent_files.rename(sandbox_id, src, dst, overwrite)

    async def watch(self, sandbox_id: str, path: str, recursive: bool, timeout: float | None,
                    finished) -> AsyncIterator[dict]:
        sb = self._running(sandbox_id)
        agent = await self._agent(sb)
        return await self.agent_files.watch(agent, path, recursive, timeout, finished)

    async def handle_open(self, sandbox_id: str, path: str, mode: str) -> str:
        return await self.agent_files.handle_open(sandbox_id, path, mode)

    async def handle_read(self, sandbox_id: str, handle: str, n: int, line: bool) -> bytes:
        return await self.agent_files.handle_read(sandbox_id, handle, n, line)

    async def handle_write(self, sandbox_id: str, handle: str, data: bytes) -> int:
        return await self.agent_files.handle_write(sandbox_id, handle, data)

    async def handle_seek(self, sandbox_id: str, handle: str, offset: int, whence: int) -> int:
        return await self.agent_files.handle_seek(sandbox_id, handle, offset, whence)

    async def handle_flush(self, sandbox_id: str, handle: str) -> int:
        return await self.agent_files.handle_flush(sandbox_id, handle)

    async def handle_close(self, sandbox_id: str, handle: str) -> None:
        await self.agent_files.handle_close(sandbox_id, handle)


def owns(root: Path, sandbox_id: str) -> bool:
    """Whether sandbox `sandbox_id`'s directory says it is a gVisor sandbox."""
    with contextlib.suppress(OSError):
        return (root / sandbox_id / MARKER).read_text().strip() == GvisorHost.name
    return False


def has_fuse_source(mounts) -> bool:
    """Whether a bind mount's source is a FUSE mount on the host (a CloudBucketMount's s3fs).

    gVisor keeps the host file of a closed file open while its dentry stays cached, so s3fs (which
    uploads when the last descriptor is released) would upload only when the sandbox ends, not at
    close(). `runsc --dcache=0` evicts unreferenced dentries at once, so the host file is closed
    when the sandbox closes it: the object is in the bucket when close() returns, as under runc.
    Measured cost: ~0.2 ms more per open of a file anywhere in that sandbox."""
    points = set()
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            sep = fields.index("-")
            if fields[sep + 1].startswith("fuse"):
                points.add(fields[4].encode().decode("unicode_escape"))
    return any(m.source in points for m in mounts)


def gvisor_config(cspec: ContainerSpec) -> dict:
    """runc's config for the same sandbox, changed where gVisor needs it."""
    config = build_config(cspec, f"/{CGROUP_PARENT}/{cspec.id}")
    resources = config["linux"]["resources"]
    nproc = resources.pop("pids")["limit"]  # a host pids.max panics the sandbox
    resources.pop("devices", None)
    config["process"]["rlimits"].append(
        {"type": "RLIMIT_NPROC", "hard": nproc, "soft": nproc})
    config["linux"].pop("seccomp", None)  # not applied (see runsc.py): say so by its absence
    return config


def _reap_runsc_strays(keep: set[int]) -> None:
    """Exited runsc processes (gofers, helpers) — never a sandbox process in `keep`, whose exit
    status a pidfd watcher reads, nor a runsc command asyncio waits for."""
    reap_zombie_children(lambda comm: comm.startswith("runsc") or comm == "exe",
                         keep | runsc.OWNED)


async def _socket_gone(path: Path, timeout: float = 5.0) -> None:
    """Wait for the quiesced agent to remove its socket (it closes the listener first)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while path.exists() or path.is_symlink():
        if loop.time() > deadline:
            raise HostError("the agent did not close its socket for the snapshot")
        await asyncio.sleep(0.002)
