"""The life of a sandbox: create, exec, wait, terminate, time out, and survive a server restart.

State of running sandboxes lives in two places: the database (what exists, for everyone) and
`self.live` (handles that only this process can hold: pidfds, pipes, timers). Everything here runs
on the server's event loop, so neither needs a lock; the database has its own.

A sandbox outlives its client and the server: the server is a child subreaper, so a sandbox's init
is its child while it runs, and a restarted server adopts what the last one left (or ends it, when
its timeout passed in between) — see `reconcile`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import posixpath
import re
import secrets
import shutil
import signal
import stat
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from shoal.server import linux as _linux
from shoal.exception import (AlreadyExistsError, ExecutionError, InvalidError, NotFoundError,
                             SandboxTerminatedError)
from shoal.server.host import tools
from shoal.server.host.base import ExecIO, Runtime, RuntimeError_
from shoal.server.host.oci import ContainerSpec, Limits, Mount
from shoal.server.images.users import resolve_user
from shoal.server.host.rootfs import Rootfs
from shoal.server.host.runc_files import RESOLVE_SANDBOX, SandboxFiles, sandbox_rel
from shoal.server.control.images import ImageService
from shoal.server.models import CreateSandbox, ExecRequest
from shoal.server.streams import OutputBuffer, tail_file
from shoal.server.control.volumes import VolumeService, new_id
from shoal.server.storage.state import MountRecord, SandboxRecord, StateStore

log = logging.getLogger("shoal.sandboxes")

RC_TIMEOUT = 124  # as `timeout(1)` and Modal
RC_KILLED = 137  # 128 + SIGKILL
MAX_TIMEOUT = 24 * 3600
RESERVED_MOUNT_PREFIXES = ("/proc", "/sys", "/dev", "/.shoal")
NAME_RE = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
LOG_RETENTION = 3600.0  # seconds an ended sandbox's output stays readable


def exit_code(status: int) -> int:
    code = os.waitstatus_to_exitcode(status)
    return 128 - code if code < 0 else code


def check_workdir(path: str) -> str:
    path = check_abs_path(path, "workdir")
    if any(path == p or path.startswith(p + "/") for p in RESERVED_MOUNT_PREFIXES):
        raise InvalidError(f"workdir {path!r} is inside a virtual file system; choose another")
    return path


def check_abs_path(path: str, what: str) -> str:
    if not isinstance(path, str) or not path.startswith("/"):
        raise InvalidError(f"{what} must be an absolute path, got {path!r}")
    if "\x00" in path or ".." in path.split("/"):
        raise InvalidError(f"{what} {path!r} must not contain '..' or NUL")
    return posixpath.normpath(path)


@dataclass
class LiveSandbox:
    """What this server process holds for a running sandbox."""
    id: str
    pid: int
    dir: Path
    rootfs: Rootfs
    exited: asyncio.Event = field(default_factory=asyncio.Event)
    pidfd: int | None = None
    stdin_fd: int | None = None
    timer: asyncio.TimerHandle | None = None
    end_reason: str | None = None  # set by whoever ends it first (terminate, timeout)
    finalized: bool = False
    last_active: float = field(default_factory=time.monotonic)
    running_execs: int = 0
    idle_timeout: float | None = None
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    probe_task: asyncio.Task | None = None

    def touch(self) -> None:
        self.last_active = time.monotonic()


@dataclass
class ExecSession:
    id: str
    sandbox_id: str
    proc: asyncio.subprocess.Process | None  # None: the command was not found, nothing ran
    pid_file: Path
    stdout: OutputBuffer | None
    stderr: OutputBuffer | None
    done: asyncio.Event = field(default_factory=asyncio.Event)
    returncode: int | None = None
    timed_out: bool = False
    tasks: list[asyncio.Task] = field(default_factory=list)

    def kill(self) -> None:
        try:
            pid = int(self.pid_file.read_text())
            os.kill(pid, signal.SIGKILL)  # the process itself: killing runc would not reach it
        except (OSError, ValueError):
            pass


class SandboxService:
    def __init__(self, store: StateStore, runtime: Runtime, volumes: VolumeService,
                 images: ImageService, root: Path, tools_dir: Path):
        self.store = store
        self.runtime = runtime
        self.volumes = volumes
        self.images = images
        self.root = root
        self.tools_dir, has_busybox = tools.prepare(tools_dir)
        self.idle_args = tools.idle_args(has_busybox)
        self.live: dict[str, LiveSandbox] = {}
        self.ended: dict[str, asyncio.Event] = {}  # set when a sandbox ends; for waiters
        self.execs: dict[str, ExecSession] = {}
        self.files = SandboxFiles(lambda sid: self.runtime.open_root(self._running(sid).pid))
        self.root.mkdir(parents=True, exist_ok=True)

    # --- named secrets and bucket mounts (issue 12): set by the app after construction
    secrets = None  # control.secrets.SecretService
    buckets = None  # storage.buckets.BucketMounts

    def _secret_env(self, secret_ids: list[str]) -> dict[str, str]:
        return self.secrets.resolve(secret_ids) if self.secrets and secret_ids else {}

    async def _mount_buckets(self, sid: str, req: CreateSandbox) -> list[Mount]:
        if not req.bucket_mounts:
            return []
        if self.buckets is None:
            raise InvalidError("this server has no bucket support")
        return [Mount(*m) for m in
                await self.buckets.mount_all(sid, req.bucket_mounts, self._secret_env)]
    # --- end named secrets and bucket mounts

    # --- queries
    def get(self, sandbox_id: str) -> SandboxRecord:
        rec = self.store.sandbox_get(sandbox_id)
        if rec is None:
            raise NotFoundError(f"sandbox {sandbox_id} not found")
        return rec

    def _running(self, sandbox_id: str) -> LiveSandbox:
        rec = self.get(sandbox_id)
        live = self.live.get(sandbox_id)
        if rec.state != "running" or live is None or live.exited.is_set():
            raise SandboxTerminatedError(
                f"sandbox {sandbox_id} has finished ({rec.end_reason or 'exited'}, "
                f"returncode {rec.returncode}); create a new one")
        return live

    def ended_event(self, sandbox_id: str) -> asyncio.Event:
        """Set when the sandbox has ended (for waiters and streams)."""
        return self.ended.setdefault(sandbox_id, asyncio.Event())

    # --- create
    def _validate(self, req: CreateSandbox) -> None:
        if not all(isinstance(a, str) and "\x00" not in a for a in req.args):
            raise InvalidError("entrypoint arguments must be strings without NUL bytes")
        if not 0 < req.timeout <= MAX_TIMEOUT:
            raise InvalidError(f"timeout must be between 1 and {MAX_TIMEOUT} seconds, "
                               f"got {req.timeout}")
        if req.name is not None and not NAME_RE.match(req.name):
            raise InvalidError(f"invalid sandbox name {req.name!r}: use 1-64 characters from "
                               "letters, digits, '.', '_' and '-'")
        if req.workdir is not None:
            check_workdir(req.workdir)
        if req.idle_timeout is not None and not 0 < req.idle_timeout <= MAX_TIMEOUT:
            raise InvalidError(f"idle_timeout must be between 1 and {MAX_TIMEOUT} seconds")
        if req.readiness_probe is not None:
            p = req.readiness_probe
            if (p.exec_args is None) == (p.tcp_port is None):
                raise InvalidError("a readiness probe checks either a command or a TCP port")
            if p.tcp_port is not None and not 0 < p.tcp_port < 65536:
                raise InvalidError(f"readiness probe port {p.tcp_port} is not a TCP port")
            if not 10 <= p.interval_ms <= 60_000:
                raise InvalidError("readiness probe interval_ms must be between 10 and 60000")
        for k, v in req.env.items():
            if not k or "=" in k or "\x00" in k or "\x00" in v:
                raise InvalidError(f"invalid environment variable {k!r}")
        r = req.resources
        if r.cpu is not None and not 0.01 <= r.cpu <= (os.cpu_count() or 1):
            raise InvalidError(f"cpu must be between 0.01 and {os.cpu_count()} (this machine's "
                               f"cores), got {r.cpu}")
        if r.memory is not None and r.memory < 16:
            raise InvalidError(f"memory is in MiB and must be at least 16, got {r.memory}")
        if r.pids is not None and r.pids < 8:
            raise InvalidError(f"pids must be at least 8, got {r.pids}")
        seen = set()
        for m in [*req.mounts, *req.bucket_mounts]:
            path = check_abs_path(m.path, "mount path")
            if path == "/":
                raise InvalidError("a volume cannot be mounted at '/'")
            if any(path == p or path.startswith(p + "/") for p in RESERVED_MOUNT_PREFIXES):
                raise InvalidError(f"mount path {path!r} is reserved; choose another")
            if path in seen:
                raise InvalidError(f"two volumes are mounted at {path!r}")
            seen.add(path)

    async def create(self, req: CreateSandbox) -> SandboxRecord:
        self._validate(req)
        if self.store.app_get(req.app_id) is None:
            raise NotFoundError(f"app {req.app_id} not found")
        if req.name and self.store.sandbox_running_by_name(req.app_id, req.name):
            raise AlreadyExistsError(f"a running sandbox named {req.name!r} already exists in "
                                     "this app")
        vols = [(m, self.volumes.get(m.volume_id)) for m in req.mounts]
        image = self.images.manifest(req.image_id) if req.image_id else await self.images.default()
        layers = await self.images.mount_layers(image)
        env = {**image.config.env, **self._secret_env(req.secret_ids), **req.env}
        workdir = req.workdir or image.config.workdir
        args = list(req.args)
        if args and image.config.entrypoint:
            args = [*image.config.entrypoint, *args]

        sid = new_id("sb")
        sdir = self.root / sid
        sdir.mkdir(parents=True)
        rootfs = Rootfs(sdir)
        now = time.time()
        spec = {**req.model_dump(exclude={"bucket_mounts": {"__all__": {"secret_env"}}}), "env": env, "workdir": workdir, "image_id": image.id,
                "layers": image.layers}
        rec = SandboxRecord(id=sid, app_id=req.app_id, name=req.name, state="running", spec=spec,
                            created_at=now, deadline=now + req.timeout, tags=dict(req.tags))
        # Recorded before anything runs, so a crash from here on is found by `reconcile`.
        self.store.sandbox_insert(rec, [MountRecord(sid, v.id, posixpath.normpath(m.path),
                                                    m.read_only) for m, v in vols])
        live = LiveSandbox(sid, 0, sdir, rootfs)
        self.live[sid] = live
        stdin_r = stdout = stderr = -1
        try:
            buckets = await self._mount_buckets(sid, req)  # fails before anything runs
            merged = rootfs.mount(layers)
            try:
                user = resolve_user(merged, image.config.user)
            except ValueError as e:
                raise InvalidError(f"image {image.id}: {e}") from None
            limits = Limits(
                memory_mib=req.resources.memory or Limits.memory_mib,
                cpu=req.resources.cpu,
                pids=req.resources.pids or Limits.pids,
            )
            cspec = ContainerSpec(
                id=sid, rootfs=str(merged), args=args or self.idle_args,
                env=env, cwd=workdir or "/", limits=limits,
                mounts=[Mount(str(self.volumes.storage.host_path(v.id)),
                              posixpath.normpath(m.path), m.read_only) for m, v in vols]
                + buckets,
                tools_dir=str(self.tools_dir), user=user)
            # The workdir is created by runc, inside the container's root: never on the host,
            # where the image's absolute symlinks (/var/run -> /run) would lead out of it.
            stdin_r, live.stdin_fd = os.pipe()
            os.set_blocking(live.stdin_fd, False)
            stdout = os.open(sdir / "stdout", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            stderr = os.open(sdir / "stderr", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            try:
                live.pid = await self.runtime.start(cspec, sdir / "bundle", stdin_r, stdout,
                                                    stderr)
            except RuntimeError_ as e:
                detail = (sdir / "stderr").read_text(errors="replace").strip()
                raise ExecutionError(f"the sandbox failed to start: {detail or e}") from None
        except BaseException:
            live.end_reason = "failed-to-start"
            await self._finalize(live, returncode=None)
            raise
        finally:
            for fd in (stdin_r, stdout, stderr):
                if fd >= 0:
                    os.close(fd)
        self.store.sandbox_update(sid, pid=live.pid)
        live.idle_timeout = req.idle_timeout
        self._watch(live, deadline=rec.deadline)
        self._start_probe(live, req)
        return self.get(sid)

    def _watch(self, live: LiveSandbox, deadline: float | None) -> None:
        loop = asyncio.get_running_loop()
        try:
            live.pidfd = os.pidfd_open(live.pid)
        except ProcessLookupError:
            loop.call_soon(self._on_exit, live)
        else:
            loop.add_reader(live.pidfd, self._on_exit, live)
        if deadline is not None:
            delay = max(0.0, deadline - time.time())
            live.timer = loop.call_later(delay, lambda: asyncio.ensure_future(
                self._stop(live.id, "timeout")))

    def _on_exit(self, live: LiveSandbox) -> None:
        if live.pidfd is not None:
            asyncio.get_running_loop().remove_reader(live.pidfd)
        if live.exited.is_set():
            return
        returncode = None
        try:
            pid, status = os.waitpid(live.pid, os.WNOHANG)
            if pid:
                returncode = exit_code(status)
        except ChildProcessError:
            pass  # adopted from an earlier server: not our child, its status is not ours to read
        live.exited.set()
        asyncio.ensure_future(self._finalize(live, returncode))

    async def _finalize(self, live: LiveSandbox, returncode: int | None) -> None:
        if live.finalized:
            return
        live.finalized = True
        reason = live.end_reason or "exited"
        if reason in ("timeout", "idle-timeout"):
            returncode = RC_TIMEOUT
        elif reason == "terminated":
            returncode = RC_KILLED
        if live.timer:
            live.timer.cancel()
        if live.probe_task:
            live.probe_task.cancel()
        self.files.forget(live.id)
        if live.pidfd is not None:
            os.close(live.pidfd)
            live.pidfd = None
        if live.stdin_fd is not None:
            os.close(live.stdin_fd)
            live.stdin_fd = None
        try:
            await self.runtime.delete(live.id)
        except Exception:
            log.exception("deleting container %s", live.id)
        if self.buckets:
            await self.buckets.unmount_all(live.id)
        live.rootfs.destroy()
        shutil.rmtree(live.dir / "bundle", ignore_errors=True)
        live.exited.set()
        self.store.sandbox_update(live.id, state="terminated", returncode=returncode,
                                  ended_at=time.time(), end_reason=reason)
        self.live.pop(live.id, None)
        for m in self.store.mounts_of(live.id):
            self.volumes.collect(m.volume_id)  # a deferred volume deletion may now proceed
        self.ended_event(live.id).set()
        log.info("sandbox %s ended: %s, returncode %s", live.id, reason, returncode)

    async def _stop(self, sandbox_id: str, reason: str) -> None:
        live = self.live.get(sandbox_id)
        if live is None or live.exited.is_set():
            return
        live.end_reason = live.end_reason or reason
        await self.runtime.kill(sandbox_id, signal.SIGKILL)
        try:
            await asyncio.wait_for(live.exited.wait(), 10)
        except asyncio.TimeoutError:
            log.warning("sandbox %s did not exit 10 s after SIGKILL; deleting it", sandbox_id)
            live.exited.set()
            await self._finalize(live, None)
        await self.ended_event(sandbox_id).wait()

    # --- tags, names
    def set_tags(self, sandbox_id: str, tags: dict[str, str]) -> SandboxRecord:
        self.get(sandbox_id)
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in tags.items()):
            raise InvalidError("tags must be a dict of str to str")
        self.store.sandbox_update(sandbox_id, tags=tags)
        return self.get(sandbox_id)

    def by_name(self, app_id: str, name: str) -> SandboxRecord:
        rec = self.store.sandbox_running_by_name(app_id, name)
        if rec is None:
            raise NotFoundError(f"no running sandbox named {name!r} in this app")
        return rec

    # --- snapshots
    async def snapshot(self, sandbox_id: str) -> str:
        """The sandbox's root filesystem now (its image plus what it changed) as a new image.
        Volumes are not part of it. The sandbox is frozen while its layer is copied."""
        live = self._running(sandbox_id)
        live.touch()
        parent = self.images.manifest(self.get(sandbox_id).spec["image_id"])
        await self.runtime.pause(sandbox_id)
        try:
            return await self.images.snapshot(live.rootfs.upper, parent)
        finally:
            await self.runtime.resume(sandbox_id)

    # --- readiness
    def _start_probe(self, live: LiveSandbox, req: CreateSandbox) -> None:
        probe = req.readiness_probe
        if probe is None:
            live.ready.set()
            return

        async def run() -> None:
            while not live.exited.is_set():
                if await self._probe_once(live, probe):
                    live.ready.set()
                    return
                await asyncio.sleep(probe.interval_ms / 1000)

        live.probe_task = asyncio.ensure_future(run())

    async def _probe_once(self, live: LiveSandbox, probe) -> bool:
        if probe.tcp_port is not None:
            # Connect from inside the sandbox's network namespace (it has only loopback).
            code = ("import socket,sys\n"
                    f"s=socket.socket(); s.settimeout(1); s.connect(('127.0.0.1', {probe.tcp_port}))")
            proc = await asyncio.create_subprocess_exec(
                "nsenter", f"--net=/proc/{live.pid}/ns/net", "--", sys.executable, "-c", code,
                stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.DEVNULL)
            return await proc.wait() == 0
        pid_file = live.dir / f"probe-{secrets.token_hex(4)}.pid"
        try:
            proc = await self.runtime.exec(
                live.id, list(probe.exec_args), self.get(live.id).spec.get("env", {}), None,
                ExecIO(asyncio.subprocess.DEVNULL, asyncio.subprocess.DEVNULL,
                       asyncio.subprocess.DEVNULL), pid_file)
            return await proc.wait() == 0
        finally:
            pid_file.unlink(missing_ok=True)

    async def wait_ready(self, sandbox_id: str, timeout: float) -> bool:
        live = self._running(sandbox_id)
        ended = self.ended_event(sandbox_id)
        waiters = [asyncio.ensure_future(live.ready.wait()), asyncio.ensure_future(ended.wait())]
        await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        for w in waiters:
            w.cancel()
        if live.ready.is_set():
            return True
        self._running(sandbox_id)  # raises if it ended meanwhile
        return False

    def touch(self, sandbox_id: str) -> None:
        live = self.live.get(sandbox_id)
        if live:
            live.touch()

    def stop_idle(self) -> None:
        """End sandboxes idle (no exec running, no exec, stdin or file call) past idle_timeout."""
        now = time.monotonic()
        for live in list(self.live.values()):
            if (live.idle_timeout is not None and live.running_execs == 0
                    and now - live.last_active > live.idle_timeout):
                asyncio.ensure_future(self._stop(live.id, "idle-timeout"))

    # --- terminate / wait
    async def terminate(self, sandbox_id: str) -> SandboxRecord:
        self.get(sandbox_id)
        await self._stop(sandbox_id, "terminated")
        return self.get(sandbox_id)

    async def wait(self, sandbox_id: str, timeout: float) -> SandboxRecord:
        rec = self.get(sandbox_id)
        if rec.state == "running":
            try:
                await asyncio.wait_for(self.ended_event(sandbox_id).wait(), timeout)
            except asyncio.TimeoutError:
                pass
        return self.get(sandbox_id)

    # --- entrypoint stdio
    def output(self, sandbox_id: str, stream: str, offset: int):
        rec = self.get(sandbox_id)
        if stream not in ("stdout", "stderr"):
            raise InvalidError(f"stream must be stdout or stderr, got {stream!r}")
        finished = self.ended_event(sandbox_id)
        if rec.state != "running":
            finished.set()
        return tail_file(self.root / sandbox_id / stream, offset, finished)

    async def write_stdin(self, sandbox_id: str, data: bytes, eof: bool) -> None:
        live = self._running(sandbox_id)
        if live.stdin_fd is None:
            raise InvalidError("the sandbox's stdin was closed (write_eof, or a server restart)")
        live.touch()
        await _write_all_nonblocking(live.stdin_fd, data)
        if eof:
            os.close(live.stdin_fd)
            live.stdin_fd = None

    # --- exec
    async def exec(self, sandbox_id: str, req: ExecRequest) -> ExecSession:
        live = self._running(sandbox_id)
        if not req.args or not all(isinstance(a, str) and "\x00" not in a for a in req.args):
            raise InvalidError("exec needs at least one argument, all strings without NUL bytes")
        if req.workdir is not None:
            check_workdir(req.workdir)
        if req.timeout is not None and req.timeout <= 0:
            raise InvalidError(f"timeout must be positive, got {req.timeout}")
        modes = {"pipe": asyncio.subprocess.PIPE, "devnull": asyncio.subprocess.DEVNULL}
        if req.stdout not in modes or req.stderr not in (*modes, "stdout"):
            raise InvalidError("stdout must be 'pipe' or 'devnull'; stderr 'pipe', 'devnull' or "
                               "'stdout'")
        spec = self.get(sandbox_id).spec
        env = {**spec.get("env", {}), **self._secret_env(req.secret_ids), **req.env}
        workdir = req.workdir or spec.get("workdir") or "/"
        eid = new_id("ex")
        pid_file = live.dir / f"exec-{eid}.pid"
        live.touch()
        missing = self._missing_command(sandbox_id, req.args[0], env, workdir)
        if missing:
            return await self._not_run(eid, sandbox_id, pid_file, req, *missing)
        stderr_mode = asyncio.subprocess.STDOUT if req.stderr == "stdout" else modes[req.stderr]
        proc = await self.runtime.exec(
            sandbox_id, list(req.args), env, workdir,
            ExecIO(asyncio.subprocess.PIPE, modes[req.stdout], stderr_mode), pid_file)
        live.running_execs += 1
        sess = ExecSession(eid, sandbox_id, proc, pid_file,
                           OutputBuffer() if proc.stdout else None,
                           OutputBuffer() if proc.stderr else None)
        if sess.stdout:
            sess.tasks.append(asyncio.ensure_future(sess.stdout.pump(proc.stdout)))
        if sess.stderr:
            sess.tasks.append(asyncio.ensure_future(sess.stderr.pump(proc.stderr)))
        sess.tasks.append(asyncio.ensure_future(self._exec_wait(sess, req.timeout)))
        self.execs[eid] = sess
        return sess

    def _missing_command(self, sandbox_id: str, argv0: str, env: dict[str, str],
                         workdir: str) -> tuple[int, str] | None:
        """(exit code, message) as a shell would give them if `argv0` cannot run, else None.
        Looked up in the sandbox's root, with its PATH."""
        try:
            root = self.files.root(sandbox_id).fd
        except OSError:
            return None  # let the runtime report it
        if "/" in argv0:
            candidates = [posixpath.join(workdir, argv0)]
        else:
            path_var = env.get("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
            candidates = [posixpath.join(d or ".", argv0) for d in path_var.split(":")]
            candidates = [c if c.startswith("/") else posixpath.join(workdir, c)
                          for c in candidates]
        found_non_exec = False
        for cand in candidates:
            try:
                fd = _linux.openat2(root, sandbox_rel(cand), os.O_PATH, 0, RESOLVE_SANDBOX)
            except (OSError, InvalidError):
                continue
            try:
                st = os.fstat(fd)
            finally:
                os.close(fd)
            if stat.S_ISREG(st.st_mode) and st.st_mode & 0o111:
                return None
            found_non_exec = True
        if found_non_exec:
            return 126, f"{argv0}: Permission denied\n"
        if "/" in argv0:
            return 127, f"{argv0}: No such file or directory\n"
        return 127, f"{argv0}: command not found\n"

    async def _not_run(self, eid: str, sandbox_id: str, pid_file: Path, req: ExecRequest,
                       returncode: int, message: str) -> ExecSession:
        stdout = OutputBuffer() if req.stdout == "pipe" else None
        stderr = OutputBuffer() if req.stderr == "pipe" else None
        target = stdout if req.stderr == "stdout" else stderr
        if target is not None:
            await target.put(message.encode())
        for buf in (stdout, stderr):
            if buf:
                await buf.close()
        sess = ExecSession(eid, sandbox_id, None, pid_file, stdout, stderr, returncode=returncode)
        sess.done.set()
        self.execs[eid] = sess
        asyncio.get_running_loop().call_later(600, self.execs.pop, eid, None)
        return sess

    async def _exec_wait(self, sess: ExecSession, timeout: float | None) -> None:
        try:
            await asyncio.wait_for(sess.proc.wait(), timeout)
        except asyncio.TimeoutError:
            sess.timed_out = True
            sess.kill()
            await sess.proc.wait()
        sess.returncode = RC_TIMEOUT if sess.timed_out else sess.proc.returncode
        sess.pid_file.unlink(missing_ok=True)
        live = self.live.get(sess.sandbox_id)
        if live:
            live.running_execs -= 1
            live.touch()
        sess.done.set()
        # Forget the session a while after it ended, once its client has had time to read it.
        asyncio.get_running_loop().call_later(600, self.execs.pop, sess.id, None)

    def get_exec(self, exec_id: str) -> ExecSession:
        sess = self.execs.get(exec_id)
        if sess is None:
            raise NotFoundError(f"exec {exec_id} not found (it ended more than 10 minutes ago, or "
                                "the server restarted)")
        return sess

    async def exec_wait(self, exec_id: str, timeout: float) -> int | None:
        sess = self.get_exec(exec_id)
        try:
            await asyncio.wait_for(asyncio.shield(sess.done.wait()), timeout)
        except asyncio.TimeoutError:
            return None
        return sess.returncode

    async def exec_stdin(self, exec_id: str, data: bytes, eof: bool) -> None:
        sess = self.get_exec(exec_id)
        stdin = sess.proc.stdin if sess.proc else None
        if stdin is None or stdin.is_closing():
            raise InvalidError("stdin of this process is closed")
        try:
            if data:
                stdin.write(data)
                await stdin.drain()
            if eof:
                stdin.close()
        except (BrokenPipeError, ConnectionResetError):
            pass  # the process has exited or closed its stdin: like a pipe, the data is dropped

    # --- restart and shutdown
    async def reconcile(self) -> None:
        """Adopt or end what an earlier server left: running rows, containers, mounts, cgroups."""
        known = {c.id: c for c in await self.runtime.list()}
        for rec in self.store.sandbox_list(state="running"):
            state = known.pop(rec.id, None)
            live = LiveSandbox(rec.id, rec.pid, self.root / rec.id, Rootfs(self.root / rec.id))
            self.live[rec.id] = live
            expired = rec.deadline is not None and rec.deadline <= time.time()
            if state and state.status == "running" and not expired and live.rootfs.is_mounted():
                log.info("adopting sandbox %s (pid %s)", rec.id, state.pid)
                live.pid = state.pid
                self._watch(live, rec.deadline)
                continue
            if state and state.status == "running":
                await self.runtime.kill(rec.id, signal.SIGKILL)
            live.end_reason = "timeout" if expired else "server-restart"
            live.exited.set()
            await self._finalize(live, None)
        for orphan in known:  # a container with no row: created by a crashed create
            if orphan.startswith("sb-"):
                await self.runtime.kill(orphan, signal.SIGKILL)
                await self.runtime.delete(orphan)
        if self.buckets:
            await self.buckets.reconcile(set(self.live))
        for sdir in self.root.iterdir():
            if sdir.name not in self.live:
                Rootfs(sdir).destroy()
                rec = self.store.sandbox_get(sdir.name)
                if rec is None or (rec.ended_at or 0) < time.time() - LOG_RETENTION:
                    shutil.rmtree(sdir, ignore_errors=True)

    def layers_in_use(self) -> tuple[set[str], set[str]]:
        """(layer ids, image ids) of running sandboxes: never pruned or removed."""
        layers, images = set(), set()
        for rec in self.store.sandbox_list(state="running"):
            layers.update(rec.spec.get("layers") or [])
            if rec.spec.get("image_id"):
                images.add(rec.spec["image_id"])
        return layers, images

    @staticmethod
    def reap_strays() -> None:
        """Reap runc's own intermediate processes (`runc:[1:CHILD]` ...) that re-parent to this
        server, a child subreaper, and would stay zombies. Only those: any other child is waited
        for by whoever started it (asyncio's watcher, or the sandbox's pidfd)."""
        me = str(os.getpid())
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            try:
                with open(f"/proc/{entry.name}/stat") as f:
                    stat_line = f.read()
            except OSError:
                continue
            comm = stat_line[stat_line.find("(") + 1:stat_line.rfind(")")]
            fields = stat_line[stat_line.rfind(")") + 2:].split()
            if fields[1] == me and fields[0] == "Z" and comm.startswith("runc:["):
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(int(entry.name), os.WNOHANG)

    def collect_logs(self) -> None:
        cutoff = time.time() - LOG_RETENTION
        for rec in self.store.sandbox_list(state="terminated"):
            if rec.ended_at and rec.ended_at < cutoff and (self.root / rec.id).exists():
                shutil.rmtree(self.root / rec.id, ignore_errors=True)

    async def terminate_all(self) -> int:
        ids = list(self.live)
        await asyncio.gather(*(self._stop(i, "terminated") for i in ids), return_exceptions=True)
        return len(ids)

    def detach_all(self) -> None:
        """Server shutdown: stop watching, leave the sandboxes running for the next server."""
        loop = asyncio.get_running_loop()
        for live in self.live.values():
            if live.pidfd is not None:
                loop.remove_reader(live.pidfd)
                os.close(live.pidfd)
                live.pidfd = None
            if live.timer:
                live.timer.cancel()
        for sess in self.execs.values():
            for t in sess.tasks:
                t.cancel()


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
