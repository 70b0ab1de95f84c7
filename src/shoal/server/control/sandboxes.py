"""The life of a sandbox: create, exec, wait, terminate, time out, and survive a server restart.

This service is orchestration and a state machine; everything that touches a sandbox goes through
the `SandboxHost` seam (`server/host/base.py`), so it runs unchanged over runc, gVisor or the
in-memory `FakeHost` of the unit tests.

State lives in three places: the database (what exists, for everyone), the host (the sandboxes
themselves, and in each one's agent its exec sessions and their output), and `self.live` / 
`self.execs` here (timers, probe tasks, waiters: what only this process needs, rebuilt by
`reconcile` after a restart). Everything here runs on the server's event loop: no locks.
Background work is started with `_spawn`, which keeps, names and logs every task; `close` drains
them.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import errno
import logging
import os
import posixpath
import re
import secrets
import shutil
import time
from collections.abc import AsyncIterator, Coroutine
from dataclasses import dataclass, field
from pathlib import Path

from shoal.exception import (AlreadyExistsError, ExecutionError, InvalidError, NotFoundError,
                             SandboxTerminatedError)
from shoal.server.control.images import ImageService
from shoal.server.control.volumes import VolumeService, new_id
from shoal.server.host.base import (ExecSpec, HostError, HostEvent, SandboxGone, SandboxHost,
                                    SandboxSpec)
from shoal.server.host import disk, mountpaths
from shoal.server.host.oci import Limits, Mount, default_memory_mib, host_memory_mib
from shoal.server.control.pool import WarmPool
from shoal.server.models import CreateSandbox, ExecRequest, Resources
from shoal.server.names import check_name
from shoal.server.storage.state import WriteConflict
from shoal.server.network import TunnelInfo, validate_policy
from shoal.server.storage.state import (MemorySnapshotRecord, MountRecord, SandboxRecord,
                                        StateStore)
from shoal.server.tasks import AsyncStore, TaskSet

log = logging.getLogger("shoal.sandboxes")

RC_TIMEOUT = 124  # as `timeout(1)` and Modal
RC_KILLED = 137  # 128 + SIGKILL
MAX_TIMEOUT = 24 * 3600
RESERVED_MOUNT_PREFIXES = ("/proc", "/sys", "/dev", "/.shoal")
LOG_RETENTION = 3600.0  # seconds an ended sandbox's output stays readable
# seconds a finished exec's output stays readable (its record is then dropped)
EXEC_RETENTION = float(os.environ.get("SHOAL_EXEC_RETENTION", 600))
# seconds a command runs before its process's own exit is watched (ExecRecord.exited)
EXIT_WATCH_AFTER = 0.1
# seconds an ended sandbox's `ended` event stays in memory (prune_ended, every upkeep tick)
ENDED_RETENTION = float(os.environ.get("SHOAL_ENDED_RETENTION", 60))
STREAMS = ("stdout", "stderr")
NODE = os.uname().nodename  # recorded with each sandbox: the machine that runs it
DEFAULT_POLICY = validate_policy(False, None)  # Modal's default: outbound network, no ports
# seconds a memory snapshot is kept after it was taken (Modal: 7 days, not extendable)
MEMORY_SNAPSHOT_TTL = float(os.environ.get("SHOAL_MEMORY_SNAPSHOT_TTL", 7 * 24 * 3600))
KEEP_NAME = object()  # restore: the snapshotted sandbox's name (Modal's default)


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


def _limits(r: Resources) -> Limits:
    """A request's resources as the host's limits (the defaults filled in)."""
    return Limits(memory_mib=r.memory_limit or max(default_memory_mib(), r.memory or 0),
                  cpu=r.cpu_limit, cpu_request=r.cpu, memory_request_mib=r.memory,
                  pids=r.pids or Limits.pids, disk_mib=r.ephemeral_disk)


def exec_sandbox(exec_id: str) -> str:
    """The sandbox an exec id belongs to: exec ids embed it, so they resolve after a restart."""
    if not re.fullmatch(r"ex-[0-9a-f]{22}-(?:[0-9a-f]{8}){1,2}", exec_id or ""):
        raise NotFoundError(f"exec {exec_id!r} not found")
    return "sb-" + exec_id[3:25]


@dataclass
class LiveSandbox:
    """What this server process holds for a running sandbox."""
    id: str
    timer: asyncio.TimerHandle | None = None
    end_reason: str | None = None  # set by whoever ends it first (terminate, timeout)
    finalized: bool = False
    exited: asyncio.Event = field(default_factory=asyncio.Event)
    last_active: float = field(default_factory=time.monotonic)
    running_execs: int = 0
    idle_timeout: float | None = None
    env: dict[str, str] = field(default_factory=dict)  # of commands: the spec's, kept at hand
    workdir: str | None = None
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    probe_task: asyncio.Task | None = None

    def touch(self) -> None:
        self.last_active = time.monotonic()


@dataclass
class ExecRecord:
    id: str
    sandbox_id: str
    streams: tuple[str, ...]  # the captured ones ("stdout", "stderr")
    done: asyncio.Event = field(default_factory=asyncio.Event)  # exited, and its output ended
    # The process exited (its returncode is known), though something it started in the
    # background may still hold its output open: what exec_wait (the SDK's wait/poll) waits for.
    exited: asyncio.Event = field(default_factory=asyncio.Event)
    returncode: int | None = None
    timed_out: bool = False
    exit_watch: asyncio.Task | None = None
    exit_timer: asyncio.TimerHandle | None = None


_EXEC_MODES = {"pipe": "pipe", "devnull": "null"}


def _check_exec_request(req: ExecRequest) -> None:
    """What exec() refuses whatever the sandbox's state (InvalidError)."""
    if not req.args or not all(isinstance(a, str) and "\x00" not in a for a in req.args):
        raise InvalidError("exec needs at least one argument, all strings without NUL bytes")
    if req.workdir is not None:
        check_workdir(req.workdir)
    if req.timeout is not None and req.timeout <= 0:
        raise InvalidError(f"timeout must be positive, got {req.timeout}")
    if req.stdout not in _EXEC_MODES or req.stderr not in (*_EXEC_MODES, "stdout"):
        raise InvalidError("stdout must be 'pipe' or 'devnull'; stderr 'pipe', 'devnull' or "
                           "'stdout'")
    for k, v in req.env.items():
        if not k or "=" in k or "\x00" in k or "\x00" in v:
            raise InvalidError(f"invalid environment variable {k!r}")
    if (req.pty_rows is None) != (req.pty_cols is None):
        raise InvalidError("a pty needs both pty_rows and pty_cols")


# What one command may carry, its arguments and its whole environment (the sandbox's, its
# secrets' and its own) together: one frame of the agent protocol holds them (at most 1 MiB +
# 64 KiB and 4096 fields, agent/protocol.json), with room left for the rest of the request.
EXEC_MAX_STRINGS = 4000
EXEC_MAX_BYTES = 1 << 20


def _check_exec_size(args: list[str], *envs: dict[str, str]) -> None:
    """InvalidError for a command too large to send (before anything is stored or started)."""
    count = len(args) + sum(len(e) for e in envs)
    size = sum(map(len, args)) + sum(len(k) + len(v) + 1 for e in envs for k, v in e.items())
    if size * 4 > EXEC_MAX_BYTES:  # (characters; only a large command is measured in bytes)
        size = sum(len(a.encode()) for a in args) + sum(
            len(k.encode()) + len(v.encode()) + 1 for e in envs for k, v in e.items())
    if count > EXEC_MAX_STRINGS or size > EXEC_MAX_BYTES:
        raise InvalidError(
            f"exec's arguments and environment are too large: {count} strings, {size} bytes "
            f"(at most {EXEC_MAX_STRINGS} strings and {EXEC_MAX_BYTES >> 20} MiB in all, the "
            "sandbox's environment included); pass large data through stdin or a file")


def _capture(fn, *args):
    """fn(*args), or the Exception it raised (raised later by `_result`)."""
    try:
        return fn(*args)
    except Exception as e:
        return e


def _result(value):
    if isinstance(value, Exception):
        raise value
    return value


def _claim_key(store: StateStore, key: str, path: str, exec_id: str):
    """In the store's thread: the stored answer of `key`, or None after storing `exec_id` as
    its answer."""
    done = store.idempotent_get(key)
    if done is None:
        store.idempotent_put(key, "POST", path, 0, exec_id.encode(), "exec-id", time.time())
    return done


class SandboxService:
    def __init__(self, store: StateStore, host: SandboxHost, volumes: VolumeService,
                 images: ImageService, pool_sizes: dict[str, int] | None = None,
                 pool_refill_delay: float = 0.0):
        self.store = store
        self.host = host
        self.volumes = volumes
        self.images = images
        self.live: dict[str, LiveSandbox] = {}
        self.ended: dict[str, asyncio.Event] = {}  # set when a sandbox ends; for waiters
        self._gone_since: dict[str, float] = {}  # ended entries of non-live sandboxes: since when
        self.execs: dict[str, ExecRecord] = {}
        self.tasks = TaskSet()
        self.astore = AsyncStore(store)  # the store from async code: its one worker thread
        self.pool = (WarmPool(host, images, pool_sizes,
                              DEFAULT_POLICY if host.has_network else None, pool_refill_delay)
                     if pool_sizes else None)

    # --- owned background work
    def _spawn(self, coro: Coroutine, name: str) -> asyncio.Task:
        return self.tasks.spawn(coro, name)

    async def start(self) -> None:
        """Reconcile with what the host has, then follow its events."""
        await self.reconcile()
        self._spawn(self._follow_events(), "host-events")
        if self.pool is not None:
            self._spawn(self.pool.run(), "warm-pool")

    async def _follow_events(self) -> None:
        async for event in self.host.events():
            live = self.live.get(event.sandbox_id)
            if live is not None:
                await self._finalize(live, event)
            elif self.pool is not None and self.pool.owns(event.sandbox_id):
                await self.pool.lost(event.sandbox_id)

    async def close(self) -> None:
        """Server shutdown: sandboxes keep running for the next server; our tasks end."""
        for live in self.live.values():
            if live.timer:
                live.timer.cancel()
        await self.tasks.drain()
        if self.pool is not None:
            await self.pool.close()
        await self.host.close()
        self.astore.close()

    # --- named secrets and bucket mounts (issue 12): set by the app after construction
    secrets = None  # control.secrets.SecretService
    buckets = None  # storage.buckets.BucketMounts

    def _create_lookups(self, req: CreateSandbox, key: str | None) -> dict:
        """In the store's thread: what `create` looks up. A volume's or the secrets' error is
        returned in their place (create raises it when it gets to them)."""
        done = self.store.sandbox_by_idempotency_key(key) if key is not None else None
        if done is not None:
            return {"done": done}
        return {"done": None, "app": self.store.app_get(req.app_id),
                "named": bool(req.name) and self.store.sandbox_running_by_name(req.app_id,
                                                                               req.name),
                "vols": [_capture(self.volumes.get, m.volume_id) for m in req.mounts],
                "secret_env": _capture(self._secret_env, req.secret_ids)}

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

    # --- runtimes (issue 10)
    def _runtime(self, requested: str | None) -> str:
        """The runtime a request gets: its own or the server's default (InvalidError when it is
        unknown or not installed). A host with one runtime has no choice to offer."""
        check = getattr(self.host, "check", None)
        if check is not None:
            return check(requested)
        if requested not in (None, self.host.name):
            raise InvalidError(f"runtime {requested!r} is not available on this server "
                               f"(it runs {self.host.name} only)")
        return self.host.name
    # --- end runtimes

    # --- queries
    def get(self, sandbox_id: str) -> SandboxRecord:
        rec = self.store.sandbox_get(sandbox_id)
        if rec is None:
            raise NotFoundError(f"sandbox {sandbox_id} not found")
        return rec

    async def aget(self, sandbox_id: str) -> SandboxRecord:
        """`get` for async code: the read runs in the store's thread."""
        rec = await self.astore.sandbox_get(sandbox_id)
        if rec is None:
            raise NotFoundError(f"sandbox {sandbox_id} not found")
        return rec

    def _running(self, sandbox_id: str) -> LiveSandbox:
        live = self.live.get(sandbox_id)
        if live is not None and not live.exited.is_set():
            return live  # the hot path (exec, files): no database read
        rec = self.get(sandbox_id)
        if rec.state != "running" or live is None or live.exited.is_set():
            raise SandboxTerminatedError(
                f"sandbox {sandbox_id} has finished ({rec.end_reason or 'exited'}, "
                f"returncode {rec.returncode}); create a new one")
        return live

    def ended_event(self, sandbox_id: str) -> asyncio.Event:
        """Set when the sandbox has ended (for waiters and streams)."""
        return self.ended.setdefault(sandbox_id, asyncio.Event())

    def prune_ended(self, now: float | None = None) -> int:
        """Forget `ended` events of sandboxes that have not been live for ENDED_RETENTION (called
        by the app's upkeep every tick). Waiters already hold their event; a later waiter finds
        the sandbox's row terminated and does not wait. Returns how many were dropped."""
        now = time.monotonic() if now is None else now
        dropped = 0
        for sid in list(self.ended):
            if sid in self.live:
                self._gone_since.pop(sid, None)
                continue
            since = self._gone_since.setdefault(sid, now)
            if now - since >= ENDED_RETENTION:
                del self.ended[sid]
                del self._gone_since[sid]
                dropped += 1
        for sid in [s for s in self._gone_since if s not in self.ended]:
            del self._gone_since[sid]
        return dropped
    @contextlib.contextmanager
    def _gone_as_terminated(self, sandbox_id: str):
        try:
            yield
        except SandboxGone:
            raise SandboxTerminatedError(f"sandbox {sandbox_id} has finished; create a new "
                                         "one") from None
        except HostError as e:
            raise ExecutionError(str(e)) from None

    # --- create
    def _validate(self, req: CreateSandbox) -> None:
        if not all(isinstance(a, str) and "\x00" not in a for a in req.args):
            raise InvalidError("entrypoint arguments must be strings without NUL bytes")
        if not 0 < req.timeout <= MAX_TIMEOUT:
            raise InvalidError(f"timeout must be between 1 and {MAX_TIMEOUT} seconds, "
                               f"got {req.timeout}")
        if req.name is not None:
            check_name(req.name, "sandbox")
        for key in req.tags:
            check_name(key, "tag")
        if req.workdir is not None:
            check_workdir(req.workdir)
        if req.idle_timeout is not None and not 0 < req.idle_timeout <= MAX_TIMEOUT:
            raise InvalidError(f"idle_timeout must be between 1 and {MAX_TIMEOUT} seconds")
        if (req.pty_rows is None) != (req.pty_cols is None):
            raise InvalidError("a pty needs both pty_rows and pty_cols")
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
        for what, v in (("cpu", r.cpu), ("cpu limit", r.cpu_limit)):
            if v is not None and not 0.01 <= v <= (os.cpu_count() or 1):
                raise InvalidError(f"{what} must be between 0.01 and {os.cpu_count()} (this "
                                   f"machine's cores), got {v}")
        for what, v in (("memory", r.memory), ("memory limit", r.memory_limit)):
            if v is not None and not 16 <= v <= host_memory_mib():
                raise InvalidError(f"{what} is in MiB and must be between 16 and "
                                   f"{host_memory_mib()} (this machine's memory), got {v}")
        if None not in (r.cpu, r.cpu_limit) and r.cpu_limit < r.cpu:
            raise InvalidError(f"cpu limit {r.cpu_limit} is lower than the request {r.cpu}")
        if None not in (r.memory, r.memory_limit) and r.memory_limit < r.memory:
            raise InvalidError(f"memory limit {r.memory_limit} is lower than the request "
                               f"{r.memory}")
        if r.pids is not None and r.pids < 8:
            raise InvalidError(f"pids must be at least 8, got {r.pids}")
        # --- disk limit (issue 10)
        if r.ephemeral_disk is not None and not disk.MIN_MIB <= r.ephemeral_disk <= disk.MAX_MIB:
            raise InvalidError(f"ephemeral_disk is in MiB and must be between {disk.MIN_MIB} and "
                               f"{disk.MAX_MIB}, got {r.ephemeral_disk}")
        # --- end disk limit
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
        try:  # issue 10: runc 1.1.5 lacks the CVE-2024-45310 fix
            mountpaths.check_nesting(list(seen))
        except ValueError as e:
            raise InvalidError(str(e)) from None

    async def create(self, req: CreateSandbox, idempotency_key: str | None = None
                     ) -> SandboxRecord:
        """Start a sandbox. With `idempotency_key`, a repeated request (a client retrying after
        a lost connection or a server crash) returns the sandbox the first one made: the key is
        stored in the sandbox's row, in the same transaction that records it."""
        # Every lookup a create needs, in one trip to the store's thread (each trip was ~0.5 ms
        # of a warm create); their answers and errors are used below in the order they always were.
        looked = await self.astore.run(self._create_lookups, req, idempotency_key)
        if looked["done"] is not None:
            return looked["done"]
        self._validate(req)
        policy = validate_policy(req.block_network, req.cidr_allowlist, req.encrypted_ports,
                                 req.unencrypted_ports, req.h2_ports,
                                 req.outbound_domain_allowlist)
        if policy is not None and not self.host.has_network:
            raise InvalidError("this server runs without sandbox networking (SHOAL_NET=off): "
                               "pass block_network=True")
        runtime = self._runtime(req.runtime)  # runtimes (issue 10)
        if looked["app"] is None:
            raise NotFoundError(f"app {req.app_id} not found")
        if looked["named"]:
            raise AlreadyExistsError(f"a running sandbox named {req.name!r} already exists in "
                                     "this app")
        vols = [(m, _result(v)) for m, v in zip(req.mounts, looked["vols"])]
        image = self.images.manifest(req.image_id) if req.image_id else await self.images.default()
        layers = await self.images.mount_layers(image)
        env = {**image.config.env, **_result(looked["secret_env"]), **req.env}
        workdir = req.workdir or image.config.workdir
        args = list(req.args)
        if args and image.config.entrypoint:
            args = [*image.config.entrypoint, *args]

        # A warm sandbox serves a request that asks for nothing it was not started with (its
        # agent was started without a terminal, so never a pty request).
        pty = (req.pty_rows, req.pty_cols) if req.pty_rows is not None else None
        fits = (not args and pty is None and not req.mounts and not req.bucket_mounts
                and req.resources == Resources()
                and policy == (DEFAULT_POLICY if self.host.has_network else None)
                and runtime == self._runtime(None))
        pooled = self.pool.claim(image.id, fits) if self.pool is not None else None
        sid = pooled or new_id("sb")
        now = time.time()
        spec = {**req.model_dump(exclude={"bucket_mounts": {"__all__": {"secret_env"}}}),
                "env": env, "workdir": workdir, "image_id": image.id, "layers": image.layers,
                "user": image.config.user, "runtime": runtime}
        rec = SandboxRecord(id=sid, app_id=req.app_id, name=req.name, state="running", spec=spec,
                            created_at=now, deadline=now + req.timeout, tags=dict(req.tags),
                            runtime=runtime, node=NODE,
                            idempotency_key=idempotency_key)
        # Recorded before anything runs, so a crash from here on is found by `reconcile`. The
        # database refuses a second running sandbox of the same name (a conditional write).
        try:
            await self.astore.sandbox_insert(
                rec, [MountRecord(sid, v.id, posixpath.normpath(m.path), m.read_only)
                      for m, v in vols])
        except WriteConflict as e:
            if pooled is not None:
                self._spawn(self.pool.lost(pooled), f"pool-return-{pooled}")
            if e.constraint == "idempotency_key":
                return (await self.astore.sandbox_by_idempotency_key(idempotency_key))
            raise AlreadyExistsError(str(e)) from None
        live = LiveSandbox(sid, idle_timeout=req.idle_timeout, env=env, workdir=workdir)
        self.live[sid] = live
        hspec = SandboxSpec(
            id=sid, layers=layers, args=args, env=env, workdir=workdir or "/",
            user=image.config.user,
            limits=_limits(req.resources),
            mounts=[Mount(str(self.volumes.storage.host_path(v.id)), posixpath.normpath(m.path),
                          m.read_only) for m, v in vols],
            network=policy, runtime=runtime, pty=pty)
        try:
            buckets = await self._mount_buckets(sid, req)  # fails before anything runs
            hspec.mounts.extend(buckets)
            if pooled is None:
                await self.host.create(hspec)
            elif workdir and workdir != (image.config.workdir or "/"):
                await self.host.mkdir(sid, workdir, True, True)  # as runc does for a new one
        except BaseException as e:
            await self._failed_to_start(live, e)
            if isinstance(e, ValueError):
                raise InvalidError(f"image {image.id}: {e}") from None
            raise
        self._arm(live, rec.deadline)
        self._start_probe(live, req.readiness_probe)
        log.info("sandbox %s created", sid, extra={
            "event": "sandbox.created", "sandbox_id": sid, "app_id": req.app_id,
            "image_id": image.id, "pooled": pooled is not None})
        return self.get(sid)

    async def _failed_to_start(self, live, e: BaseException) -> None:
        """End a sandbox the host could not start (nothing of it is left), and raise what the
        client should see for the host's errors; returns for the others, which the caller
        raises or translates."""
        live.end_reason = "failed-to-start"
        live.exited.set()
        await self._finalize(live, HostEvent(live.id, "exited", None))
        if isinstance(e, HostError):
            raise ExecutionError(str(e)) from None
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            raise InvalidError(str(e.strerror or e)) from None  # the host lacks the room

    def _arm(self, live: LiveSandbox, deadline: float | None) -> None:
        if deadline is not None:
            delay = max(0.0, deadline - time.time())
            live.timer = asyncio.get_running_loop().call_later(
                delay, lambda: self._spawn(self._stop(live.id, "timeout"), f"timeout-{live.id}"))

    async def _finalize(self, live: LiveSandbox, event: HostEvent) -> None:
        if live.finalized:
            return
        live.finalized = True
        live.exited.set()
        reason = live.end_reason or ("oom" if event.oom else "exited")
        returncode = event.returncode
        if reason in ("timeout", "idle-timeout"):
            returncode = RC_TIMEOUT
        elif reason == "terminated":
            returncode = RC_KILLED
        if live.timer:
            live.timer.cancel()
        if live.probe_task:
            live.probe_task.cancel()
        try:
            await self.host.destroy(live.id)
        except Exception:
            log.exception("destroying sandbox %s", live.id)
        if self.buckets:
            await self.buckets.unmount_all(live.id)
        await self.astore.sandbox_update(live.id, state="terminated", returncode=returncode,
                                         ended_at=time.time(), end_reason=reason)
        self.live.pop(live.id, None)
        for rec in self.execs.values():
            if rec.sandbox_id == live.id and not rec.done.is_set():
                rec.returncode = RC_KILLED
                rec.done.set()
        for m in await self.astore.mounts_of(live.id):
            # a deferred volume deletion may now proceed (its rmtree: in a worker thread)
            await asyncio.to_thread(self.volumes.collect, m.volume_id)
        self.ended_event(live.id).set()
        log.info("sandbox %s ended: %s, returncode %s", live.id, reason, returncode,
                 extra={"event": "sandbox.ended", "sandbox_id": live.id, "reason": reason,
                        "returncode": returncode})

    async def _stop(self, sandbox_id: str, reason: str) -> None:
        live = self.live.get(sandbox_id)
        if live is None or live.exited.is_set():
            return
        live.end_reason = live.end_reason or reason
        await self.host.kill(sandbox_id)
        try:
            await asyncio.wait_for(live.exited.wait(), 10)
        except asyncio.TimeoutError:
            log.warning("sandbox %s did not exit 10 s after SIGKILL; removing it", sandbox_id)
            await self._finalize(live, HostEvent(sandbox_id, "exited", None))
        await self.ended_event(sandbox_id).wait()

    # --- tags, names
    def set_tags(self, sandbox_id: str, tags: dict[str, str]) -> SandboxRecord:
        self.get(sandbox_id)
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in tags.items()):
            raise InvalidError("tags must be a dict of str to str")
        for key in tags:
            check_name(key, "tag")
        self.store.sandbox_update(sandbox_id, tags=tags)
        return self.get(sandbox_id)

    def by_name(self, app_id: str, name: str, include_terminated: bool = False) -> SandboxRecord:
        rec = self.store.sandbox_running_by_name(app_id, name)
        if rec is None and include_terminated:  # the most recent one of that name
            rec = next((r for r in reversed(self.store.sandbox_list(app_id)) if r.name == name),
                       None)
        if rec is None:
            raise NotFoundError(f"no running sandbox named {name!r} in this app")
        return rec

    # --- snapshots
    async def snapshot(self, sandbox_id: str) -> str:
        """The sandbox's root filesystem now (its image plus what it changed) as a new image.
        Volumes are not part of it. The sandbox is frozen while its changes are copied."""
        live = self._running(sandbox_id)
        live.touch()
        parent = self.images.manifest((await self.aget(sandbox_id)).spec["image_id"])
        with self._gone_as_terminated(sandbox_id):
            return await self.images.snapshot(
                parent, lambda dest: self.host.export_changes(sandbox_id, dest))

    # --- readiness
    def _start_probe(self, live: LiveSandbox, probe) -> None:
        if probe is None:
            live.ready.set()
            return

        async def run() -> None:
            while not live.exited.is_set():
                try:
                    if await self._probe_once(live, probe):
                        live.ready.set()
                        return
                except (SandboxGone, HostError):
                    pass
                await asyncio.sleep(probe.interval_ms / 1000)

        live.probe_task = self._spawn(run(), f"probe-{live.id}")

    async def _probe_once(self, live: LiveSandbox, probe) -> bool:
        if probe.tcp_port is not None:
            return await self.host.probe_tcp(live.id, probe.tcp_port)
        rec = await self.aget(live.id)
        eid = self._new_exec_id(live.id)
        await self.host.exec(live.id, ExecSpec(
            eid, list(probe.exec_args), rec.spec.get("env", {}), rec.spec.get("workdir") or "/",
            stdin="null", stdout="null", stderr="null"))
        try:
            code, _ = await self.host.exec_wait(live.id, eid)
        finally:
            with contextlib.suppress(SandboxGone, HostError, OSError):
                await self.host.exec_forget(live.id, eid)
        return code == 0

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
                self._spawn(self._stop(live.id, "idle-timeout"), f"idle-{live.id}")

    # --- terminate / wait
    async def terminate(self, sandbox_id: str) -> SandboxRecord:
        await self.aget(sandbox_id)
        await self._stop(sandbox_id, "terminated")
        return await self.aget(sandbox_id)

    async def wait(self, sandbox_id: str, timeout: float) -> SandboxRecord:
        rec = await self.aget(sandbox_id)
        if rec.state == "running":
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.ended_event(sandbox_id).wait(), timeout)
        return await self.aget(sandbox_id)

    # --- entrypoint stdio
    def output(self, sandbox_id: str, stream: str, offset: int) -> AsyncIterator[bytes]:
        rec = self.get(sandbox_id)
        if stream not in STREAMS:
            raise InvalidError(f"stream must be stdout or stderr, got {stream!r}")
        finished = self.ended_event(sandbox_id)
        if rec.state != "running":
            finished.set()
        return self.host.read_log(sandbox_id, stream, offset, finished)

    async def write_stdin(self, sandbox_id: str, data: bytes, eof: bool) -> None:
        live = self._running(sandbox_id)
        live.touch()
        with self._gone_as_terminated(sandbox_id):
            try:
                await self.host.write_stdin(sandbox_id, data, eof)
            except BrokenPipeError as e:
                raise InvalidError(str(e)) from None

    async def resize_pty(self, sandbox_id: str, rows: int, cols: int) -> None:
        """Resize the terminal of an entrypoint started with one (it gets SIGWINCH)."""
        self._running(sandbox_id)
        with self._gone_as_terminated(sandbox_id):
            try:
                await self.host.resize_pty(sandbox_id, rows, cols)
            except OSError as e:
                raise InvalidError(f"sandbox {sandbox_id} has no terminal to resize: create it "
                                   f"with pty=True ({e.strerror or e})") from None

    # --- exec
    @staticmethod
    def _new_exec_id(sandbox_id: str, key: str | None = None) -> str:
        """A new exec's id. With an Idempotency-Key it is derived from the key, so every attempt
        of one request names the same session, and the agent refuses to start that twice."""
        if key is None:
            return f"ex-{sandbox_id[3:]}-{secrets.token_hex(8)}"
        digest = hashlib.sha256(f"{sandbox_id}\0{key}".encode()).hexdigest()
        return f"ex-{sandbox_id[3:]}-{digest[:16]}"

    async def exec(self, sandbox_id: str, req: ExecRequest,
                   idempotency_key: str | None = None, first_attempt: bool = False
                   ) -> ExecRecord:
        """Start a command. With `idempotency_key`, a repeated request returns the command the
        first one started, never a second run: the key is stored with the exec id, and the id is
        derived from the key, so a repeat that finds no stored key (its first attempt's server
        died before storing it) names the running session, which the agent refuses to start
        again. `first_attempt` (the client says it never sent this key before) skips the
        lookup: the key's write is queued in the store's thread, not waited for."""
        eid = None
        keyed_id = False
        if idempotency_key is not None:
            live = self.live.get(sandbox_id)
            if live is not None and not live.exited.is_set() and not req.secret_ids:
                # The usual case in one store call: the key is looked up and, if new, stored
                # with the new command's id. A request this exec() refuses is refused the same
                # way on every attempt, so it is checked first and stores nothing.
                _check_exec_request(req)
                _check_exec_size(req.args, live.env, req.env)
                eid = self._new_exec_id(sandbox_id, idempotency_key)
                keyed_id = True
                if first_attempt:
                    # Submitted now: the store's one thread runs calls in order, so a retry's
                    # lookup finds it (~0.7 ms less before the command starts).
                    self.astore.submit(_claim_key, self.store, idempotency_key,
                                       f"exec:{sandbox_id}", eid)
                    done = None
                else:
                    done = await self.astore.run(_claim_key, self.store, idempotency_key,
                                                 f"exec:{sandbox_id}", eid)
            else:
                done = await self.astore.idempotent_get(idempotency_key)
            if done is not None:
                if done[1] != f"exec:{sandbox_id}":
                    raise InvalidError("this Idempotency-Key was used for another request")
                return self.get_exec(done[3].decode())
        live = self._running(sandbox_id)
        _check_exec_request(req)
        modes = _EXEC_MODES
        env = {**live.env, **(await self.astore.run(self._secret_env, req.secret_ids)
                              if req.secret_ids else {}), **req.env}
        workdir = req.workdir or live.workdir or "/"
        if not keyed_id:  # (a keyed request was measured before its key was stored)
            _check_exec_size(req.args, env)
        if eid is None:
            eid = self._new_exec_id(sandbox_id)
            if idempotency_key is not None:
                await self.astore.idempotent_put(idempotency_key, "POST", f"exec:{sandbox_id}",
                                                 0, eid.encode(), "exec-id", time.time())
        live.touch()
        stderr = "stdout" if req.stderr == "stdout" else modes[req.stderr]
        # --- pty (operations): everything the process writes arrives on stdout
        pty = None
        if req.pty_rows is not None:
            pty = (req.pty_rows, req.pty_cols)
            stderr = "stdout"
        with self._gone_as_terminated(sandbox_id):
            try:
                await self.host.exec(sandbox_id, ExecSpec(
                    eid, list(req.args), env, workdir, stdin="pipe", stdout=modes[req.stdout],
                    stderr=stderr, timeout=req.timeout, pty=pty))
            except FileExistsError:
                if not keyed_id:
                    raise
                return self.get_exec(eid)  # the first attempt started it: that is the answer
        streams = tuple(s for s, mode in (("stdout", req.stdout), ("stderr", req.stderr))
                        if mode == "pipe" and not (pty and s == "stderr"))
        rec = self._track(eid, sandbox_id, streams)
        live.running_execs += 1
        log.info("exec %s started", eid, extra={"event": "exec.started", "exec_id": eid,
                                                "sandbox_id": sandbox_id, "pty": pty is not None})
        return rec

    def _track(self, eid: str, sandbox_id: str, streams: tuple[str, ...]) -> ExecRecord:
        rec = self.execs[eid] = ExecRecord(eid, sandbox_id, streams)
        self._spawn(self._watch_exec(rec), f"exec-{eid}")
        # A command still going a moment from now may be one whose background child holds its
        # output: its own exit is watched from then on, for poll() (a short one never is).
        rec.exit_timer = asyncio.get_running_loop().call_later(EXIT_WATCH_AFTER,
                                                               self._watch_exit, rec)
        return rec

    async def _watch_exec(self, rec: ExecRecord) -> None:
        try:
            rec.returncode, rec.timed_out = await self.host.exec_wait(rec.sandbox_id, rec.id)
        except (SandboxGone, HostError, OSError):
            rec.returncode = RC_KILLED
        finally:
            rec.done.set()
            rec.exited.set()
            if rec.exit_timer is not None:
                rec.exit_timer.cancel()
            log.info("exec %s ended, returncode %s", rec.id, rec.returncode,
                     extra={"event": "exec.ended", "exec_id": rec.id, "returncode": rec.returncode,
                            "timed_out": rec.timed_out})
            live = self.live.get(rec.sandbox_id)
            if live:
                live.running_execs = max(0, live.running_execs - 1)
                live.touch()
        # Forget the session a while after it ended, once its client has had time to read it.
        await asyncio.sleep(EXEC_RETENTION)
        self.execs.pop(rec.id, None)
        with contextlib.suppress(SandboxGone, HostError, OSError):
            if rec.sandbox_id in self.live:
                await self.host.exec_forget(rec.sandbox_id, rec.id)

    def get_exec(self, exec_id: str) -> ExecRecord:
        rec = self.execs.get(exec_id)
        if rec is not None:
            return rec
        # Not known to this process: an exec of a sandbox adopted after a restart lives on in
        # the sandbox's agent.
        sandbox_id = exec_sandbox(exec_id)
        if sandbox_id not in self.live:
            raise NotFoundError(f"exec {exec_id} not found (it ended more than 10 minutes ago, "
                                "or its sandbox ended)")
        return self._track(exec_id, sandbox_id, STREAMS)

    async def exec_wait(self, exec_id: str, timeout: float) -> int | None:
        """The returncode once the command's process has exited (None after `timeout`), as
        Popen.wait: not held back by a process it left in the background with its output."""
        rec = self.get_exec(exec_id)
        if not rec.exited.is_set():
            self._watch_exit(rec)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.shield(rec.exited.wait()), timeout)
        return rec.returncode if rec.exited.is_set() else None

    def _watch_exit(self, rec: ExecRecord) -> None:
        """Once per exec, and only for someone waiting: ask the host for the process's own exit
        (the exec's output, and with it `done`, may end much later)."""
        if rec.exit_watch is not None or rec.done.is_set():
            return

        async def watch() -> None:
            try:
                code, timed_out = await self.host.exec_exit(rec.sandbox_id, rec.id)
            except (SandboxGone, HostError, OSError):
                return  # (_watch_exec reports the end)
            if not rec.exited.is_set():
                rec.returncode, rec.timed_out = code, timed_out
                rec.exited.set()
        rec.exit_watch = self._spawn(watch(), f"exit-{rec.id}")

    async def exec_stdin(self, exec_id: str, data: bytes, eof: bool, offset: int | None) -> int:
        rec = self.get_exec(exec_id)
        self.touch(rec.sandbox_id)
        if offset is None:
            offset = -1  # the agent appends at its current position
        try:
            return await self.host.exec_stdin(rec.sandbox_id, exec_id, offset, data, eof)
        except (SandboxGone, HostError):
            if rec.done.is_set():
                return 0  # like a pipe whose reader is gone: the data is dropped
            raise SandboxTerminatedError("the sandbox has finished") from None
        except OSError as e:
            raise InvalidError(f"stdin of this process: {e.strerror or e}") from None

    async def exec_output(self, exec_id: str, offsets: dict[str, int]
                          ) -> AsyncIterator[tuple[str, bytes | int]]:
        """("stdout"|"stderr", bytes) as the process writes them, from `offsets`, ("end",
        "stdout"|"stderr") for a stream that ends before the command does, then ("exit",
        returncode)."""
        async for batch in self.exec_output_batches(exec_id, offsets):
            for event in batch:
                yield event

    async def exec_output_batches(self, exec_id: str, offsets: dict[str, int]
                                  ) -> AsyncIterator[list[tuple[str, bytes | int]]]:
        """`exec_output`'s events, in lists of those that are ready together: a stream's last
        bytes, the other stream's end and the exit of a short command usually are, and go to
        the client in one write (one wake-up of it, not three)."""
        rec = self.get_exec(exec_id)
        sid = rec.sandbox_id
        pos = {s: offsets.get(s, 0) for s in rec.streams}

        def read(stream: str) -> asyncio.Task:
            return asyncio.ensure_future(self.host.exec_read(sid, exec_id, stream, pos[stream]))

        pending = {read(s): s for s in rec.streams}
        ended: list[str] = []
        try:
            while pending:
                done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                batch: list[tuple[str, bytes | int]] = []
                while done:
                    for task in done:
                        stream = pending.pop(task)
                        try:
                            data, eof = task.result()
                        except (SandboxGone, HostError):
                            eof, data = True, b""
                        except OSError as e:
                            raise InvalidError(f"{stream} of exec {exec_id}: "
                                               f"{e.strerror or e}") from None
                        if data:
                            pos[stream] += len(data)
                            batch.append((stream, data))
                        if not eof:
                            pending[read(stream)] = stream
                        else:
                            ended.append(stream)
                    if not pending or not batch:
                        break
                    # One turn of the loop: a read answered at once (the stream's end is
                    # already known) joins this batch instead of making its own.
                    await asyncio.sleep(0)
                    done = {t for t in pending if t.done()}
                if batch:
                    self.touch(sid)
                if not pending and rec.done.is_set():
                    batch.append(("exit", rec.returncode))  # (it ends every stream)
                    yield batch
                    return
                # A stream that ended while the command goes on (it closed its stdout; or a
                # child it left holds the other one): its readers have all of it now.
                batch += [("end", s) for s in ended]
                ended.clear()
                if batch:
                    yield batch
            await rec.done.wait()
            yield [("exit", rec.returncode)]
        finally:
            for task in pending:
                task.cancel()

    async def exec_resize(self, exec_id: str, rows: int, cols: int) -> None:
        """Resize the pty of a command started with one (the process gets SIGWINCH)."""
        rec = self.get_exec(exec_id)
        if rec.done.is_set():
            return
        with self._gone_as_terminated(rec.sandbox_id):
            try:
                await self.host.exec_resize(rec.sandbox_id, exec_id, rows, cols)
            except OSError as e:
                raise InvalidError(f"exec {exec_id} has no terminal to resize "
                                   f"({e.strerror or e})") from None

    # --- files
    async def files(self, sandbox_id: str, op: str, *args):
        """Run file operation `op` of the host on a running sandbox."""
        self._running(sandbox_id).touch()
        with self._gone_as_terminated(sandbox_id):
            return await getattr(self.host, op)(sandbox_id, *args)

    # --- restart and shutdown
    async def reconcile(self) -> None:
        """Adopt or end what an earlier server left: running rows, containers, mounts, logs."""
        known = await self.host.sandboxes()
        for rec in await self.astore.sandbox_list(state="running"):
            known.discard(rec.id)
            live = LiveSandbox(rec.id, idle_timeout=rec.spec.get("idle_timeout"),
                               env=rec.spec.get("env") or {}, workdir=rec.spec.get("workdir"))
            self.live[rec.id] = live
            expired = rec.deadline is not None and rec.deadline <= time.time()
            if not expired and await self.host.adopt(rec.id):
                log.info("adopting sandbox %s", rec.id)
                live.ready.set()
                self._arm(live, rec.deadline)
                continue
            await self.host.kill(rec.id)
            live.end_reason = "timeout" if expired else "server-restart"
            await self._finalize(live, HostEvent(rec.id, "exited", None))
        for orphan in known:  # a container with no row: created by a crashed create
            if orphan.startswith("sb-"):
                await self.host.kill(orphan)
                await self.host.destroy(orphan)
        await self.host.settle(set(self.live))
        if self.buckets:
            await self.buckets.reconcile(set(self.live))
        await self.collect_logs(startup=True)

    async def collect_logs(self, startup: bool = False) -> None:
        """Remove the logs of sandboxes that ended over LOG_RETENTION ago (and, at start, of
        sandboxes no row knows)."""
        cutoff = time.time() - LOG_RETENTION
        for sid in await self.host.sandbox_logs():
            if sid in self.live:
                continue
            rec = await self.astore.sandbox_get(sid)
            if (rec is None and startup) or (rec is not None and rec.state != "running"
                                             and (rec.ended_at or 0) < cutoff):
                await self.host.forget(sid)
        await self.expire_memory_snapshots(startup=startup)  # the same minutely upkeep

    async def tunnels(self, sandbox_id: str) -> dict[int, TunnelInfo]:
        self._running(sandbox_id)
        with self._gone_as_terminated(sandbox_id):
            return await self.host.tunnels(sandbox_id)

    def layers_in_use(self) -> tuple[set[str], set[str]]:
        """(layer ids, image ids) of running sandboxes and of memory snapshots (a restore stacks
        the snapshot's files on the same layers): never pruned or removed."""
        layers, images = set(), set()
        for rec in [*self.store.sandbox_list(state="running"),
                    *self.store.memory_snapshot_list()]:
            layers.update(rec.spec.get("layers") or [])
            if rec.spec.get("image_id"):
                images.add(rec.spec["image_id"])
        return layers, images

    async def terminate_all(self) -> int:
        ids = list(self.live)
        await asyncio.gather(*(self._stop(i, "terminated") for i in ids), return_exceptions=True)
        return len(ids)

    # --- memory snapshots (Modal's Sandbox._experimental_snapshot / _experimental_from_snapshot)
    memory_snapshots: Path | None = None  # <home>/memory-snapshots: set by the app

    def _memory_snapshot_dir(self, snapshot_id: str) -> Path:
        if self.memory_snapshots is None:
            raise InvalidError("this server keeps no memory snapshots")
        return self.memory_snapshots / snapshot_id

    async def snapshot_memory(self, sandbox_id: str) -> MemorySnapshotRecord:
        """Save the running sandbox — processes, memory, files — as a memory snapshot; the
        sandbox keeps running. Only gVisor sandboxes without a network can be saved (runc has no
        working CRIU here; gVisor cannot save host-network sockets): InvalidError otherwise."""
        live = self._running(sandbox_id)
        rec = await self.aget(sandbox_id)
        spec = rec.spec
        if (spec.get("runtime") or "runc") != "gvisor":
            raise InvalidError(
                f"sandbox {sandbox_id} runs under runc, which cannot save memory: memory "
                "snapshots need Sandbox.create(..., experimental_options={'runtime': 'gvisor'}, "
                "block_network=True)")
        if not spec.get("block_network"):
            raise InvalidError(
                f"sandbox {sandbox_id} has a network, and gVisor cannot save host-network "
                "sockets: memory snapshots need Sandbox.create(..., block_network=True)")
        if spec.get("bucket_mounts"):
            raise InvalidError(f"sandbox {sandbox_id} has cloud bucket mounts, which memory "
                               "snapshots cannot restore; use a Volume")
        live.touch()
        snapshot_id = new_id("sn")
        dest = self._memory_snapshot_dir(snapshot_id)
        dest.parent.mkdir(mode=0o700, exist_ok=True)
        started = time.monotonic()
        try:
            with self._gone_as_terminated(sandbox_id):
                await self.host.snapshot_memory(sandbox_id, dest)
        except BaseException:
            await asyncio.to_thread(shutil.rmtree, dest, True)
            raise
        now = time.time()
        snap = MemorySnapshotRecord(snapshot_id, sandbox_id, rec.app_id, spec, now,
                                    now + MEMORY_SNAPSHOT_TTL)
        await self.astore.memory_snapshot_insert(snap)
        log.info("memory snapshot %s of %s taken", snapshot_id, sandbox_id, extra={
            "event": "sandbox.memory_snapshot", "sandbox_id": sandbox_id,
            "snapshot_id": snapshot_id, "seconds": round(time.monotonic() - started, 3)})
        return snap

    async def memory_snapshot(self, snapshot_id: str) -> MemorySnapshotRecord:
        """The snapshot's record; NotFoundError for an unknown or expired one."""
        snap = None
        if re.fullmatch(r"sn-[0-9a-f]{22}", snapshot_id or ""):
            snap = await self.astore.memory_snapshot_get(snapshot_id)
        if snap is None or snap.expires_at <= time.time():
            raise NotFoundError(f"memory snapshot {snapshot_id!r} not found (snapshots are kept "
                                f"{MEMORY_SNAPSHOT_TTL / 86400:g} days after they are taken)")
        return snap

    async def restore_memory_snapshot(self, snapshot_id: str, name=KEEP_NAME) -> SandboxRecord:
        """A new sandbox that continues from the snapshot: its processes, memory and files as
        they were, with the snapshotted sandbox's image, env, limits, volumes and timeout (from
        now). `name`: KEEP_NAME (the snapshotted sandbox's; AlreadyExistsError while a running
        sandbox of the app has it), None, or a new name."""
        snap = await self.memory_snapshot(snapshot_id)
        spec = dict(snap.spec)
        req = CreateSandbox.model_validate({k: spec[k] for k in CreateSandbox.model_fields
                                            if k in spec})
        name = req.name if name is KEEP_NAME else name
        if name is not None:
            check_name(name, "sandbox")
        runtime = self._runtime("gvisor")
        if await self.astore.app_get(snap.app_id) is None:
            raise NotFoundError(f"app {snap.app_id} of the snapshot no longer exists")
        if name and await self.astore.sandbox_running_by_name(snap.app_id, name):
            raise AlreadyExistsError(
                f"a running sandbox named {name!r} already exists in this app (the snapshotted "
                "one?): restore with name=None or another name")
        vols = [(m, await self.astore.run(self.volumes.get, m.volume_id)) for m in req.mounts]
        layers = await self.images.mount_layers(self.images.manifest(spec["image_id"]))
        sid = new_id("sb")
        now = time.time()
        rec = SandboxRecord(id=sid, app_id=snap.app_id, name=name, state="running",
                            spec={**spec, "name": name, "restored_from": snapshot_id},
                            created_at=now, deadline=now + req.timeout, tags=dict(req.tags),
                            runtime=runtime, node=NODE)
        try:
            await self.astore.sandbox_insert(
                rec, [MountRecord(sid, v.id, posixpath.normpath(m.path), m.read_only)
                      for m, v in vols])
        except WriteConflict as e:
            raise AlreadyExistsError(str(e)) from None
        live = LiveSandbox(sid, idle_timeout=req.idle_timeout, env=spec.get("env") or {},
                           workdir=spec.get("workdir"))
        self.live[sid] = live
        hspec = SandboxSpec(
            id=sid, layers=layers, args=list(req.args), env=spec.get("env") or {},
            workdir=spec.get("workdir") or "/", user=spec.get("user"),
            limits=_limits(req.resources),
            mounts=[Mount(str(self.volumes.storage.host_path(v.id)), posixpath.normpath(m.path),
                          m.read_only) for m, v in vols],
            network=None, runtime=runtime,
            pty=(req.pty_rows, req.pty_cols) if req.pty_rows is not None else None)
        started = time.monotonic()
        try:
            await self.host.create_from_snapshot(hspec, self._memory_snapshot_dir(snapshot_id))
        except BaseException as e:
            await self._failed_to_start(live, e)
            raise
        self._arm(live, rec.deadline)
        self._start_probe(live, req.readiness_probe)
        log.info("sandbox %s restored from %s", sid, snapshot_id, extra={
            "event": "sandbox.created", "sandbox_id": sid, "app_id": snap.app_id,
            "image_id": spec["image_id"], "snapshot_id": snapshot_id,
            "seconds": round(time.monotonic() - started, 3)})
        return self.get(sid)

    async def expire_memory_snapshots(self, now: float | None = None,
                                      startup: bool = False) -> int:
        """Remove snapshots past their expiry (and, at start, directories no row knows: a crash
        during a snapshot). Returns how many were removed."""
        if self.memory_snapshots is None:
            return 0
        now = time.time() if now is None else now
        rows = await self.astore.memory_snapshot_list()
        gone = [r.id for r in rows if r.expires_at <= now]
        if startup and self.memory_snapshots.is_dir():
            known = {r.id for r in rows}
            gone += [p.name for p in self.memory_snapshots.iterdir() if p.name not in known]
        for snapshot_id in gone:
            await asyncio.to_thread(shutil.rmtree, self.memory_snapshots / snapshot_id, True)
            await self.astore.memory_snapshot_remove(snapshot_id)
        return len(gone)
