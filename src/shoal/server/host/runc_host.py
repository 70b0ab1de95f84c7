"""`SandboxHost` for runc: overlay roots, `runc run`, the agent inside, host-side file access.

Per sandbox this host holds (event loop only, no lock needed):
- the container's init (the agent, PID 1) as a pidfd: the server is a child subreaper, so init is
  its child and its exit status is the entrypoint's;
- a connection to the agent (`agent_client`), opened again on demand after it drops;
- a descriptor of the sandbox's root (`/proc/<init>/root`, opened while init was known to run) for
  the file API, held by `runc_files.SandboxFiles`, which makes it safe against descriptor reuse.

Commands run through the agent (one socket round trip, no `runc exec`), so neither their
environment nor their arguments ever appear on a host command line. Files are read and written
from the host through the root descriptor with openat2(RESOLVE_IN_ROOT) — faster than through the
agent for large files, and proven by the isolation tests; the agent serves files for runtimes
where the host cannot see the sandbox's root (gVisor).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import os
import shutil
import signal
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

from shoal.server.host import agent_client, cgroups, disk, filemax, idmap, mountpaths, tools
from shoal.server.host.base import (HostError, HostEvent, RuntimeError_, SandboxGone, SandboxSpec,
                                    SandboxStats, ExecSpec)
from shoal.server.host.oci import DEFAULT_PATH, USERNS_ROOTFS, ContainerSpec, Mount
from shoal.server.host.rootfs import IDMAP, Rootfs
from shoal.server.host.runc import RuncRuntime
from shoal.server.host import runc_files
from shoal.server.host.runc_files import SandboxFiles
from shoal.server.host.users import resolve_user

log = logging.getLogger("shoal.host.runc")

_DIE_WITH_SERVER = ("setpriv", "--pdeathsig", "KILL", "--") if shutil.which("setpriv") else ()
RUN_DIR = "run"  # per sandbox, bind-mounted at /.shoal/run: the agent's socket
AGENT_SOCKET = f"{tools.MOUNT_POINT}/run/agent.sock"
AGENT_TIMEOUT = 10.0  # seconds for a new sandbox's agent to answer
CALL_TIMEOUT = 30.0  # seconds for an agent call that is not a long poll
READ_MAX = 1 << 20


def exit_code(status: int) -> int:
    code = os.waitstatus_to_exitcode(status)
    return 128 - code if code < 0 else code


@dataclass
class _Sandbox:
    id: str
    dir: Path
    rootfs: Rootfs
    pid: int = 0
    pidfd: int | None = None
    stdin_fd: int | None = None
    agent: agent_client.AgentClient | None = None
    agent_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    exited: bool = False
    exit_event: asyncio.Event = field(default_factory=asyncio.Event)
    memory_cgroup: Path | None = None
    user: tuple[int, int] = (0, 0)  # of the entrypoint and of commands
    # Memory snapshots (gVisor): the agent is quiesced while `thawed` is clear; `snapshots`
    # counts them, so a call whose connection a snapshot closed knows to try again.
    snapshots: int = 0
    thawed: asyncio.Event = field(default_factory=lambda: _set(asyncio.Event()))


def _set(event: asyncio.Event) -> asyncio.Event:
    event.set()
    return event


class RuncHost:
    name = "runc"
    agent_flags: tuple[str, ...] = ()  # extra agent arguments (gVisor: --compat)

    def __init__(self, root: Path, runc_root: Path, tools_dir: Path, network=None):
        self.root = root
        self.network = network  # a shoal.server.network.NetworkManager, or None: loopback only
        self.has_network = network is not None  # sandboxes/<id>/: rootfs, bundle, run/, logs
        self.runtime = RuncRuntime(runc_root)
        self.tools_dir = tools_dir
        self.files = SandboxFiles()
        self.live: dict[str, _Sandbox] = {}
        self._events: asyncio.Queue[HostEvent] = asyncio.Queue()
        self.root.mkdir(parents=True, exist_ok=True)
        # --- disk limits (issue 10): formatted images kept beside, not inside, sandboxes/
        self.disks = disk.DiskPool(root.parent / "disk-spares")
        self._refill: asyncio.Future | None = None
        # User namespaces (host/idmap.py, SHOAL_USERNS): runc sandboxes only; runsc isolates
        # itself (GvisorHost reuses this class).
        self.userns = idmap.enabled() and self.name == "runc"
        if self.userns:
            os.makedirs(USERNS_ROOTFS, mode=0o755, exist_ok=True)
        filemax.ensure()  # open files: see host/filemax.py

    # --- life
    async def create(self, spec: SandboxSpec) -> None:
        await self._create(spec)

    async def _create(self, spec: SandboxSpec, snapshot: Path | None = None) -> None:
        """`create`; with `snapshot` (a `snapshot_memory` directory), the sandbox is restored
        from it instead of started: its saved upper dir seeds the new overlay, and the runtime
        restores its processes (`_start`)."""
        sdir = self.root / spec.id
        sdir.mkdir(parents=True)
        run_dir = sdir / RUN_DIR
        run_dir.mkdir(mode=0o700)
        sb = _Sandbox(spec.id, sdir, Rootfs(sdir))
        self.live[spec.id] = sb
        stdin_r = stdout = stderr = -1
        try:
            mib = spec.limits.disk_mib or disk.default_mib()
            self.disks.check_room(mib)
            userns = self.userns
            merged = await asyncio.to_thread(sb.rootfs.mount, spec.layers, (self.disks, mib),
                                             snapshot / "upper" if snapshot else None, userns)
            self._refill_disks()
            # ValueError: a mount path that is a symlink, reserved or nested (mountpaths.py)
            await asyncio.to_thread(mountpaths.check_targets, merged,
                                    [m.destination for m in spec.mounts])
            sb.user = uid, gid = resolve_user(merged, spec.user)  # ValueError: a bad USER
            (sdir / "user").write_text(f"{uid}:{gid}")
            args = [tools.AGENT, "--socket", AGENT_SOCKET, "--uid", str(uid), "--gid", str(gid),
                    "--log-limit", str(spec.log_limit), *self.agent_flags,
                    *(("--pty", "%d:%d" % spec.pty) if spec.pty else ()), "--", *spec.args]
            mounts, ns = list(spec.mounts), sb.rootfs.userns
            if ns is not None:
                # the agent (root inside) makes its socket there
                os.chown(run_dir, ns.base, ns.base)
                mounts = await asyncio.to_thread(_idmap_mounts, sb.rootfs, ns, mounts)
            cspec = ContainerSpec(
                id=spec.id, rootfs=str(merged), args=args, env=spec.env, cwd=spec.workdir,
                hostname=spec.hostname, limits=spec.limits,
                mounts=[*mounts, Mount(str(run_dir), f"{tools.MOUNT_POINT}/run",
                                       read_only=False)],
                tools_dir=str(self.tools_dir), user=(0, 0), init=False,
                userns=(ns.path, ns.base, ns.size) if ns is not None else None)
            if spec.network is not None:
                att = await self.network.attach(spec.id, spec.network)
                cspec.netns_path = att.netns_path
                if ns is not None:
                    await asyncio.to_thread(idmap.set_netns_sysctls, att.netns_path)
                if att.resolv_conf:
                    cspec.mounts.append(Mount(str(att.resolv_conf), "/etc/resolv.conf", True))
            stdin_r, sb.stdin_fd = os.pipe()
            os.set_blocking(sb.stdin_fd, False)
            stdout = os.open(sdir / "stdout", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            stderr = os.open(sdir / "stderr", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            try:
                sb.pid = await self._start(cspec, sdir / "bundle", stdin_r, stdout, stderr,
                                           snapshot)
            except RuntimeError_ as e:
                detail = (sdir / "stderr").read_text(errors="replace").strip()
                raise HostError(f"the sandbox failed to start: {detail or e}") from None
            await self._release_userns(sb)
            self._hold_root(sb)
            sb.memory_cgroup = _memory_cgroup(sb.pid)
            self._watch(sb)
            await self._first_contact(sb)
            if spec.network is not None and spec.network.ports:
                await self.network.open_tunnels(spec.id, spec.network.ports)
        except BaseException:
            await self._release_userns(sb)
            await self.kill(spec.id)
            await self.destroy(spec.id)
            raise
        finally:
            for fd in (stdin_r, stdout, stderr):
                if fd >= 0:
                    os.close(fd)

    async def _start(self, cspec: ContainerSpec, bundle: Path, stdin: int, stdout: int,
                     stderr: int, snapshot: Path | None = None) -> int:
        """Start the container; returns the pid whose exit status is the sandbox's (a hook for
        runtimes built on this host: gvisor_host, which also restores from `snapshot`)."""
        if snapshot is not None:
            raise RuntimeError_("runc cannot restore memory snapshots")
        return await self.runtime.start(cspec, bundle, stdin, stdout, stderr)

    @staticmethod
    async def _release_userns(sb: _Sandbox) -> None:
        """End the helper that held the sandbox's user namespace until runc joined it."""
        if sb.rootfs.userns is not None:
            await asyncio.to_thread(sb.rootfs.userns.close)
            sb.rootfs.userns = None

    async def _first_contact(self, sb: _Sandbox) -> None:
        """Wait for the new sandbox's agent to answer — or for the sandbox to end first (an
        entrypoint that exits at once is a normal sandbox, not a failed start)."""
        connect = asyncio.ensure_future(self._agent(sb, timeout=AGENT_TIMEOUT))
        ended = asyncio.ensure_future(sb.exit_event.wait())
        try:
            await asyncio.wait({connect, ended}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            ended.cancel()
        if connect.done() and (sb.exited or connect.exception() is None):
            connect.exception()  # retrieved: a sandbox that ended has no agent to reach
            return
        if not connect.done():
            connect.cancel()
            with contextlib.suppress(asyncio.CancelledError, SandboxGone, HostError):
                await connect
            return
        # The agent's socket went away: an agent that exited with its entrypoint does that just
        # before its pidfd reports the exit.
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(sb.exit_event.wait(), 2)
        if not sb.exited:
            raise connect.exception()

    def _refill_disks(self) -> None:
        if self._refill is None or self._refill.done():
            self._refill = asyncio.get_running_loop().run_in_executor(None, self.disks.refill)

    async def adopt(self, sandbox_id: str) -> bool:
        state = await self.runtime.state(sandbox_id)
        sdir = self.root / sandbox_id
        sb = _Sandbox(sandbox_id, sdir, Rootfs(sdir))
        if state is not None and state.status == "paused" and sb.rootfs.is_mounted():
            # Frozen by a snapshot the earlier server was taking when it died (export_changes).
            log.info("resuming sandbox %s, paused by an interrupted snapshot", sandbox_id)
            with contextlib.suppress(RuntimeError_):
                await self.runtime.resume(sandbox_id)
            state = await self.runtime.state(sandbox_id)
        if state is None or state.status != "running" or not sb.rootfs.is_mounted():
            return False
        sb.pid = state.pid
        with contextlib.suppress(OSError, ValueError):
            uid, gid = (sdir / "user").read_text().split(":")
            sb.user = int(uid), int(gid)
        self.live[sandbox_id] = sb
        self._hold_root(sb)
        sb.memory_cgroup = _memory_cgroup(sb.pid)
        self._watch(sb)
        return True

    def _hold_root(self, sb: _Sandbox) -> None:
        """Open the sandbox's root for the file API while its init is known to be ours and alive
        (it is not reaped before `_watch`); an init that already exited has no root to hold."""
        try:
            fd = os.open(f"/proc/{sb.pid}/root", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        except (FileNotFoundError, ProcessLookupError, NotADirectoryError):
            return
        self.files.add(sb.id, fd, sb.rootfs.uid_base())

    def _watch(self, sb: _Sandbox) -> None:
        loop = asyncio.get_running_loop()
        try:
            sb.pidfd = os.pidfd_open(sb.pid)
        except ProcessLookupError:
            loop.call_soon(self._on_exit, sb)
        else:
            loop.add_reader(sb.pidfd, self._on_exit, sb)

    def _on_exit(self, sb: _Sandbox) -> None:
        if sb.pidfd is not None:
            asyncio.get_running_loop().remove_reader(sb.pidfd)
            os.close(sb.pidfd)
            sb.pidfd = None
        if sb.exited:
            return
        sb.exited = True
        sb.exit_event.set()
        returncode = None
        try:
            pid, status = os.waitpid(sb.pid, os.WNOHANG)
            if pid:
                returncode = exit_code(status)
        except ChildProcessError:
            pass  # adopted from an earlier server: not our child, its status is not ours to read
        oom = _oom_killed(sb.memory_cgroup)
        self._events.put_nowait(HostEvent(sb.id, "exited", returncode, oom))

    async def events(self) -> AsyncIterator[HostEvent]:
        while True:
            yield await self._events.get()

    async def kill(self, sandbox_id: str) -> None:
        try:
            await self.runtime.kill(sandbox_id, signal.SIGKILL)
        except RuntimeError_ as e:
            log.warning("kill %s: %s", sandbox_id, e)

    async def destroy(self, sandbox_id: str) -> None:
        sb = self.live.pop(sandbox_id, None)
        if sb is not None:
            if sb.pidfd is not None:
                asyncio.get_running_loop().remove_reader(sb.pidfd)
                os.close(sb.pidfd)
                sb.pidfd = None
            if sb.stdin_fd is not None:
                os.close(sb.stdin_fd)
                sb.stdin_fd = None
            if sb.agent is not None:
                await sb.agent.close()
        root = self.files.take(sandbox_id)
        if root is not None:
            await asyncio.to_thread(root.close)
        try:
            await self.runtime.delete(sandbox_id)
        except RuntimeError_ as e:
            log.warning("delete %s: %s", sandbox_id, e)
        if self.network is not None:
            try:
                await self.network.detach(sandbox_id)
            except Exception:
                log.exception("releasing the network of %s", sandbox_id)
        sdir = self.root / sandbox_id
        await asyncio.to_thread(_remove_sandbox_files, sdir)

    async def forget(self, sandbox_id: str) -> None:
        await asyncio.to_thread(_forget_files, self.root / sandbox_id)

    async def sandboxes(self) -> set[str]:
        found = {c.id for c in await self.runtime.list()}
        found.update(p.name for p in self.root.iterdir()
                     if Rootfs(p).is_mounted() or (p / "bundle").exists()
                     or (p / disk.IMAGE).exists() or (p / IDMAP).exists())
        return found

    async def sandbox_logs(self) -> set[str]:
        return {p.name for p in self.root.iterdir()}

    async def settle(self, live: set[str]) -> None:
        if self.network is not None:
            await self.network.reconcile(live)

    async def tunnels(self, sandbox_id: str) -> dict:
        self._running(sandbox_id)
        return self.network.tunnels_of(sandbox_id) if self.network is not None else {}

    async def upkeep(self) -> None:
        await asyncio.to_thread(_reap_runc_strays)

    async def close(self) -> None:
        loop = asyncio.get_running_loop()
        if self._refill is not None:
            await self._refill
        for sb in self.live.values():
            if sb.pidfd is not None:
                loop.remove_reader(sb.pidfd)
                os.close(sb.pidfd)
                sb.pidfd = None
            if sb.agent is not None:
                await sb.agent.close()

    # --- the agent
    def _running(self, sandbox_id: str) -> _Sandbox:
        sb = self.live.get(sandbox_id)
        if sb is None or sb.exited:
            raise SandboxGone(f"sandbox {sandbox_id} is not running")
        return sb

    async def _agent(self, sb: _Sandbox, timeout: float = CALL_TIMEOUT) -> agent_client.AgentClient:
        if sb.agent is not None and not sb.agent.closed.done():
            return sb.agent
        async with sb.agent_lock:
            if sb.agent is None or sb.agent.closed.done():
                try:
                    sb.agent = await agent_client.connect(sb.dir / RUN_DIR, timeout=timeout)
                except (agent_client.AgentConnectionError, OSError) as e:
                    if sb.exited:
                        raise SandboxGone(f"sandbox {sb.id} is not running") from None
                    raise HostError(f"the agent of sandbox {sb.id} does not answer: {e}") from None
            return sb.agent

    async def _call(self, sandbox_id: str, method: str, *args, **kw):
        sb = self._running(sandbox_id)
        for attempt in range(2):
            await sb.thawed.wait()
            snapshots = sb.snapshots
            agent = await self._agent(sb)
            try:
                return await getattr(agent, method)(*args, **kw)
            except agent_client.AgentConnectionError as e:
                if sb.exited or sandbox_id not in self.live:
                    raise SandboxGone(f"sandbox {sandbox_id} is not running") from None
                if attempt == 0 and sb.snapshots != snapshots and _repeatable(method, args):
                    continue  # a memory snapshot closed the connection: ask again
                raise HostError(f"lost the agent of sandbox {sandbox_id}: {e}") from None
            except FileExistsError:
                if attempt == 1 and method == "exec":
                    return None  # the first attempt started it before the snapshot
                raise

    # --- the entrypoint's stdio
    async def write_stdin(self, sandbox_id: str, data: bytes, eof: bool) -> None:
        sb = self._running(sandbox_id)
        if sb.stdin_fd is None:
            raise BrokenPipeError("the sandbox's stdin was closed (write_eof, or a server restart)")
        await _write_all_nonblocking(sb.stdin_fd, data)
        if eof:
            os.close(sb.stdin_fd)
            sb.stdin_fd = None

    async def resize_pty(self, sandbox_id: str, rows: int, cols: int) -> None:
        await self._call(sandbox_id, "resize_entry", rows, cols)

    def read_log(self, sandbox_id: str, stream: str, offset: int, finished) -> AsyncIterator[bytes]:
        return _tail_file(self.root / sandbox_id / stream, offset, finished)

    async def stats(self, sandbox_id: str) -> SandboxStats:
        sb = self._running(sandbox_id)

        def read() -> SandboxStats:
            try:
                dirs = cgroups.cgroup_dirs(sb.pid)
            except (OSError, ValueError):
                raise SandboxGone(sandbox_id) from None
            cpu, mem, limit, pids = cgroups.read_stats(dirs)
            return SandboxStats(cpu, mem, limit, pids, cgroups.tree_size(sb.rootfs.upper))

        return await asyncio.to_thread(read)

    # --- commands
    async def exec(self, sandbox_id: str, spec: ExecSpec) -> None:
        uid, gid = spec.user or self._running(sandbox_id).user
        env = {"PATH": DEFAULT_PATH, "HOME": "/root", "TERM": "xterm", "LANG": "C.UTF-8",
               **spec.env}
        await self._call(sandbox_id, "exec", spec.exec_id, spec.argv, env, cwd=spec.cwd,
                         uid=uid, gid=gid, stdin=spec.stdin,
                         stdout=spec.stdout, stderr=spec.stderr,
                         timeout_ms=None if spec.timeout is None else int(spec.timeout * 1000),
                         pty=spec.pty)

    async def exec_read(self, sandbox_id: str, exec_id: str, stream: str,
                        offset: int) -> tuple[bytes, bool]:
        return await self._call(sandbox_id, "read", exec_id, stream, offset, READ_MAX)

    async def exec_wait(self, sandbox_id: str, exec_id: str) -> tuple[int, bool]:
        return await self._call(sandbox_id, "wait", exec_id)

    async def exec_exit(self, sandbox_id: str, exec_id: str) -> tuple[int, bool]:
        return await self._call(sandbox_id, "exit", exec_id)

    async def exec_stdin(self, sandbox_id: str, exec_id: str, offset: int, data: bytes,
                         eof: bool) -> int:
        return await self._call(sandbox_id, "stdin", exec_id, offset, data, eof)

    async def exec_signal(self, sandbox_id: str, exec_id: str, signo: int) -> None:
        await self._call(sandbox_id, "signal", exec_id, signo)

    async def exec_resize(self, sandbox_id: str, exec_id: str, rows: int, cols: int) -> None:
        await self._call(sandbox_id, "resize", exec_id, rows, cols)

    async def exec_forget(self, sandbox_id: str, exec_id: str) -> None:
        await self._call(sandbox_id, "forget", exec_id)

    # --- files, from the host through the root descriptor
    async def _files(self, sandbox_id: str, fn, *args):
        self._running(sandbox_id)
        return await asyncio.to_thread(self.files.call, sandbox_id, fn, *args)

    async def stat(self, sandbox_id: str, path: str) -> dict:
        return await self._files(sandbox_id, self.files.stat, path)

    async def listdir(self, sandbox_id: str, path: str, offset: int = 0,
                      limit: int | None = None) -> list[dict]:
        return await self._files(sandbox_id, self.files.list, path, offset,
                                 limit if limit is not None else runc_files.LIST_PAGE)

    async def read_file(self, sandbox_id: str, path: str,
                        limit: int | None) -> tuple[int, AsyncIterator[bytes]]:
        def open_read() -> tuple[int, int, bytes]:
            # One worker-thread trip for a small file: open, size, and its bytes.
            fd = self.files.call(sandbox_id, self.files.open_read, path, limit)
            try:
                size = os.fstat(fd).st_size
                return fd, size, os.read(fd, size) if 0 < size <= (64 << 10) else b""
            except BaseException:
                os.close(fd)
                raise
        self._running(sandbox_id)
        fd, size, head = await asyncio.to_thread(open_read)
        return size, _iter_fd(fd, head)

    async def write_file(self, sandbox_id: str, path: str, chunks: AsyncIterator[bytes],
                         parents: bool) -> int:
        out = await self._files(sandbox_id, self.files.begin_write, path, parents)
        try:
            async for chunk in chunks:
                await asyncio.to_thread(out.write, chunk) if len(chunk) > (256 << 10) \
                    else out.write(chunk)
            await self._files(sandbox_id, self.files.commit_write, out)
        finally:
            out.close()
        return out.written

    async def mkdir(self, sandbox_id: str, path: str, parents: bool, exist_ok: bool) -> None:
        await self._files(sandbox_id, self.files.mkdir, path, parents, exist_ok)

    async def remove(self, sandbox_id: str, path: str, recursive: bool) -> None:
        await self._files(sandbox_id, self.files.remove, path, recursive)

    async def rename(self, sandbox_id: str, src: str, dst: str, overwrite: bool) -> None:
        await self._files(sandbox_id, self.files.rename, src, dst, overwrite)

    async def watch(self, sandbox_id: str, path: str, recursive: bool, timeout: float | None,
                    finished) -> AsyncIterator[dict]:
        w = await self._files(sandbox_id, self.files.open_watch, path, recursive)

        async def events():
            async for line in w.stream(timeout, finished):
                yield json.loads(line)
        return events()

    async def handle_open(self, sandbox_id: str, path: str, mode: str) -> str:
        return await self._files(sandbox_id, self.files.handle_open, path, mode)

    def _handle_op(self, sandbox_id: str, handle: str, op: str, *args):
        h = self.files.handle(sandbox_id, handle)
        if op == "read":
            return self.files.handle_read(sandbox_id, handle, *args)  # bounded per call
        if op == "write":
            # Write-through, as Modal's FileIO: each write reaches the file before the call
            # returns, so another process sees it without flush()/close() (SWE-bench does this).
            n = h.file.write(args[0])
            h.file.flush()
            return n
        if op == "seek":
            return h.file.seek(*args)
        if op == "flush":
            h.file.flush()
            return h.file.tell()
        raise ValueError(op)

    async def handle_read(self, sandbox_id: str, handle: str, n: int, line: bool) -> bytes:
        return await self._files(sandbox_id, self._handle_op, handle, "read", n, line)

    async def handle_write(self, sandbox_id: str, handle: str, data: bytes) -> int:
        return await self._files(sandbox_id, self._handle_op, handle, "write", data)

    async def handle_seek(self, sandbox_id: str, handle: str, offset: int, whence: int) -> int:
        return await self._files(sandbox_id, self._handle_op, handle, "seek", offset, whence)

    async def handle_flush(self, sandbox_id: str, handle: str) -> int:
        return await self._files(sandbox_id, self._handle_op, handle, "flush")

    async def handle_close(self, sandbox_id: str, handle: str) -> None:
        await self._files(sandbox_id, self.files.handle_close, handle)

    # --- probes and snapshots
    async def probe_tcp(self, sandbox_id: str, port: int) -> bool:
        return await self._call(sandbox_id, "probe_tcp", port, 1000)

    async def snapshot_memory(self, sandbox_id: str, dest: Path) -> None:
        self._running(sandbox_id)
        raise HostError("runc sandboxes have no memory snapshots (CRIU does not work on this "
                        "kernel): create the sandbox with experimental_options="
                        "{'runtime': 'gvisor'}")

    async def create_from_snapshot(self, spec: SandboxSpec, snapshot: Path) -> None:
        raise HostError("runc cannot restore memory snapshots; they are gVisor's")

    async def export_changes(self, sandbox_id: str, dest: Path) -> None:
        sb = self._running(sandbox_id)
        base, view = sb.rootfs.uid_base(), sb.rootfs.upper
        await self.runtime.pause(sandbox_id)
        try:
            if base is not None:
                # Layers are portable: the upper dir's owners (base + N on disk) are copied as N,
                # through an idmapped view with the inverse mapping.
                view = sb.rootfs.idmap / "snapshot"
                await asyncio.to_thread(_unmapped_view, sb.rootfs.upper, view, base)
            # setpriv --pdeathsig: the copy dies with the server, so it cannot write on into a
            # scratch directory that the next server's sweep removes.
            proc = await asyncio.create_subprocess_exec(
                *_DIE_WITH_SERVER, "cp", "-a", "--reflink=auto", f"{view}/.", str(dest),
                stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
            try:
                async with asyncio.timeout(600):
                    _, err = await proc.communicate()
            except TimeoutError:
                proc.kill()
                await proc.wait()
                raise HostError("copying the sandbox's changes took over 10 minutes") from None
            if proc.returncode != 0:
                raise HostError(f"copying the sandbox's changes failed: "
                                f"{err.decode(errors='replace').strip()}")
        finally:
            if view != sb.rootfs.upper:
                await asyncio.to_thread(idmap.unmount_under, view)
            await self.runtime.resume(sandbox_id)
        # shoal's own mount points, not the sandbox's files
        for name in (tools.MOUNT_POINT.lstrip("/"), ".shoal-build"):
            await asyncio.to_thread(shutil.rmtree, dest / name, True)


# Agent calls that may be sent again after a memory snapshot closed their connection: asking
# twice has the effect of asking once (reads and waits by offset, stdin at an offset, an exec
# whose id then exists, lookups).
_REPEATABLE = frozenset({"read", "wait", "exit", "probe_tcp", "stat", "listdir", "read_file",
                         "list_execs", "exec"})


def _repeatable(method: str, args: tuple) -> bool:
    if method == "stdin":
        return len(args) > 1 and args[1] >= 0  # an offset, not "append"
    return method in _REPEATABLE


def _idmap_mounts(rootfs: Rootfs, ns: idmap.Userns, mounts: list[Mount]) -> list[Mount]:
    """The sandbox's volume, network-file-system and bucket mounts with each source replaced by an
    idmapped bind mount of it (idmap.py): root inside reads and writes uid 0 on disk. A file
    system that cannot be idmapped (a bucket's FUSE mount) is bound as it is. Blocking."""
    out = []
    for i, m in enumerate(mounts):
        target = rootfs.idmap / f"m{i}"
        try:
            idmap.idmapped_bind(m.source, target, ns.fd, m.read_only)
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise
            log.info("%s cannot be idmapped (%s): bound with its host owners", m.source, e)
            out.append(m)
            continue
        out.append(Mount(str(target), m.destination, m.read_only))
    return out


def _unmapped_view(upper: Path, view: Path, base: int) -> None:
    ns = idmap.Userns(base, inverse=True)
    try:
        idmap.idmapped_bind(str(upper), view, ns.fd, read_only=True)
    finally:
        ns.close()


def _forget_files(sdir: Path) -> None:
    """Remove a sandbox's directory — never through a mount left in it (an idmapped volume)."""
    if idmap.unmount_under(sdir):
        log.warning("%s still has mounts; left in place", sdir)
        return
    shutil.rmtree(sdir, ignore_errors=True)


def _remove_sandbox_files(sdir: Path) -> None:
    """Everything of a sandbox but its logs (kept for readers until `forget`)."""
    Rootfs(sdir).destroy()
    for name in ("bundle", RUN_DIR):
        shutil.rmtree(sdir / name, ignore_errors=True)


def _memory_cgroup(pid: int) -> Path | None:
    try:
        for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
            _, controllers, path = line.split(":", 2)
            if "memory" in controllers.split(","):
                return Path("/sys/fs/cgroup/memory") / path.lstrip("/")
            if controllers == "" and Path("/sys/fs/cgroup/cgroup.controllers").exists():
                return Path("/sys/fs/cgroup") / path.lstrip("/")
    except (OSError, ValueError):
        pass
    return None


def _oom_killed(cgroup: Path | None) -> bool:
    """Whether the kernel's OOM killer killed a process of the sandbox (cgroup v1 memory.oom_control
    or v2 memory.events)."""
    if cgroup is None:
        return False
    for name in ("memory.oom_control", "memory.events"):
        with contextlib.suppress(OSError, ValueError):
            for line in (cgroup / name).read_text().splitlines():
                key, _, value = line.partition(" ")
                if key == "oom_kill" and int(value) > 0:
                    return True
    return False


def reap_zombie_children(match, keep: set[int] = frozenset()) -> None:
    """Reap exited children of the server (a child subreaper, so the runtime's own helpers
    re-parent to it) whose command name `match`es, and only those: any other child is waited for
    by whoever started it (asyncio's watcher, or a sandbox's pidfd), and pids in `keep` too."""
    me = str(os.getpid())
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) in keep:
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as f:
                stat_line = f.read()
        except OSError:
            continue
        comm = stat_line[stat_line.find("(") + 1:stat_line.rfind(")")]
        fields = stat_line[stat_line.rfind(")") + 2:].split()
        if fields[1] == me and fields[0] == "Z" and match(comm):
            with contextlib.suppress(ChildProcessError):
                os.waitpid(int(entry.name), os.WNOHANG)


def _reap_runc_strays() -> None:
    """runc's intermediate processes (`runc:[1:CHILD]` ...)."""
    reap_zombie_children(lambda comm: comm.startswith("runc:["))


async def _write_all_nonblocking(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            n = os.write(fd, view)
            view = view[n:]
        except BlockingIOError:
            await asyncio.sleep(0.005)
        except BrokenPipeError:
            return


async def _iter_fd(fd: int, head: bytes = b"") -> AsyncIterator[bytes]:
    try:
        if head:
            yield head
        while data := await asyncio.to_thread(os.read, fd, 1 << 20):
            yield data
    finally:
        os.close(fd)


async def _tail_file(path: Path, offset: int, finished: asyncio.Event,
                     poll: float = 0.02) -> AsyncIterator[bytes]:
    """A log file's bytes from `offset` as they are written, until `finished` is set and the file
    is read to its end. Reads run in worker threads (a big or cold log never stalls the loop);
    they are `pread`s at our own position, so a read still queued when a cancelled reader has
    closed the descriptor cannot move the offset of whatever file reuses its number."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return
    pos = offset
    try:
        while True:
            data = await asyncio.to_thread(os.pread, fd, 1 << 20, pos)
            if data:
                pos += len(data)
                yield data
                continue
            if finished.is_set():
                # what the writer wrote before it went
                while data := await asyncio.to_thread(os.pread, fd, 1 << 20, pos):
                    pos += len(data)
                    yield data
                return
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.shield(finished.wait()), poll)
    finally:
        os.close(fd)

