"""Sandboxes: isolated containers to run untrusted code in (Modal's `modal.Sandbox`)."""

from __future__ import annotations

import asyncio
import datetime
import logging
import time
from dataclasses import dataclass
from collections.abc import AsyncIterator, Sequence

from shoal import output
from shoal._client import checked_id, get_client
from shoal._names import RULE as NAME_RULE, valid_name
from shoal._sync import in_callers_thread, synchronize_api
from shoal._tunnel import Tunnel
from shoal.app import _App
from shoal.client import check_client
from shoal.container_process import _ContainerProcess
from shoal.exception import (InvalidError, NotFoundError, SandboxTerminatedError,
                             SandboxTimeoutError, TimeoutError)
from shoal.file_io import FileWatchEvent, FileWatchEventType, _FileIO
from shoal.sandbox_fs import _SandboxFilesystem, watch_events
from shoal.image import _Image
from shoal.io_streams import _StreamReader, _StreamWriter
from shoal.network_file_system import _NetworkFileSystem
from shoal.cloud_bucket_mount import CloudBucketMount
from shoal.secret import merge_env, secret_ids
from shoal.snapshot import _SandboxSnapshot
from shoal.stream_type import StreamType
from shoal.volume import _Volume

_UNSUPPORTED = ("gpu", "cloud", "region", "proxy", "_experimental_scheduler_placement")

LIST_PAGE = 10_000  # entries per listing call (server/host/runc_files.LIST_PAGE)
_KEEP_NAME = "__keep_the_snapshotted_sandbox_s_name__"  # _experimental_from_snapshot's default


def _refuse_create(given: dict) -> None:
    """Modal's Sandbox.create parameters that shoal cannot honour: refused unless at defaults."""
    defaults = {"gpu": None, "cloud": None, "region": None, "runtime": None,
                "outbound_cidr_allowlist": None, "inbound_cidr_allowlist": None,
                "custom_domain": None, "proxy": None,
                "include_oidc_identity_token": False}
    bad = sorted(k for k, d in defaults.items() if given[k] not in (d, None, (), [], {}, False))
    if bad:
        raise InvalidError(f"Sandbox.create: {', '.join(bad)} not supported by shoal "
                           "(see docs/modal-parity.md)")


# --- runtimes (issue 10)
_EXPERIMENTAL_OPTIONS = {"runtime": ("runc", "gvisor")}


def _experimental(options: dict | None) -> dict:
    """Modal's `experimental_options`: shoal knows `runtime` ("runc" or "gvisor",
    docs/gvisor.md); any other key is refused rather than ignored."""
    if options is None:
        return {}
    if not isinstance(options, dict):
        raise InvalidError(f"experimental_options must be a dict, got {type(options).__name__}")
    unknown = sorted(set(options) - set(_EXPERIMENTAL_OPTIONS))
    if unknown:
        raise InvalidError(f"Sandbox.create: experimental_options {', '.join(map(repr, unknown))} "
                           f"not supported by shoal (known: {', '.join(_EXPERIMENTAL_OPTIONS)})")
    runtime = options.get("runtime")
    if runtime is not None and runtime not in _EXPERIMENTAL_OPTIONS["runtime"]:
        raise InvalidError(f"experimental_options['runtime'] must be 'runc' or 'gvisor', "
                           f"got {runtime!r}")
    return {"runtime": runtime}
# --- end runtimes


def _check_args(args: Sequence, what: str) -> list[str]:
    for a in args:
        if not isinstance(a, str):
            raise InvalidError(f"{what} arguments must be str, got {type(a).__name__} ({a!r})")
    return list(args)


def _mounts(mapping: dict, cls: type, what: str) -> list:
    if not isinstance(mapping, dict):
        raise InvalidError(f"{what} must be a dict of mount path to {cls.__name__.lstrip('_')}")
    for path, obj in mapping.items():
        if not isinstance(path, str) or not path.startswith("/"):
            raise InvalidError(f"{what}: mount path {path!r} must be an absolute path")
        if path.rstrip("/") == "":
            raise InvalidError(f"{what}: cannot mount at '/'")
        if not isinstance(obj, cls):
            raise InvalidError(f"{what}[{path!r}] must be a {cls.__name__.lstrip('_')}, "
                               f"got {type(obj).__name__}")
    return list(mapping.items())


class _Probe:
    """How `Sandbox.wait_until_ready` knows the sandbox is ready."""

    def __init__(self, spec: dict):
        self._spec = spec

    @staticmethod
    def with_exec(*args: str, interval_ms: int = 100) -> "_Probe":
        """Ready once this command exits 0.

        Raises InvalidError without a command or with non-str arguments.

            probe = shoal.Probe.with_exec("test", "-f", "/tmp/ready")
        """
        if not args:
            raise InvalidError("Probe.with_exec needs a command")
        return _Probe({"exec_args": _check_args(args, "probe"), "interval_ms": interval_ms})

    @staticmethod
    def with_tcp(port: int, interval_ms: int = 100) -> "_Probe":
        """Ready once something inside the sandbox accepts TCP connections on `port`.

        Raises InvalidError for a port outside 1-65535.

            probe = shoal.Probe.with_tcp(8000)
        """
        if not isinstance(port, int) or not 0 < port < 65536:
            raise InvalidError(f"port must be an int between 1 and 65535, got {port!r}")
        return _Probe({"tcp_port": port, "interval_ms": interval_ms})

    @property
    def exec_argv(self) -> tuple[str, ...] | None:
        """The probe's command (with_exec), else None."""
        argv = self._spec.get("exec_args")
        return tuple(argv) if argv else None

    @property
    def tcp_port(self) -> int | None:
        """The probe's port (with_tcp), else None."""
        return self._spec.get("tcp_port")

    @property
    def interval_ms(self) -> int:
        """How often the probe is tried, in milliseconds."""
        return self._spec["interval_ms"]

    def __repr__(self) -> str:
        return f"Probe({self._spec})"


def _resources(cpu, memory) -> dict:
    """Modal's `cpu=` / `memory=`: a number is a request the sandbox may burst past (a CPU share,
    a memory reservation); a `(request, limit)` tuple adds a hard cap (a CPU quota, a memory
    limit past which processes are OOM-killed). Checks as Modal's client does; the server
    refuses more than the machine has (cores, RAM) with an InvalidError."""
    def pair(v, what: str, kind: tuple) -> tuple:
        if v is None or v == 0:
            return None, None
        if isinstance(v, tuple):
            if len(v) != 2 or not all(isinstance(x, kind) and not isinstance(x, bool) for x in v):
                raise InvalidError(f"{what} must be a number or a (request, limit) tuple, "
                                   f"got {v!r}")
            if not v[0] or v[0] <= 0:
                raise InvalidError(f"{what.upper() if what == 'cpu' else 'Memory'} request must "
                                   "be a positive number")
            if not v[1] or v[1] <= 0:
                raise InvalidError(f"{what.upper() if what == 'cpu' else 'Memory'} limit must be "
                                   "a positive number")
            if v[1] < v[0]:
                raise InvalidError(f"Cannot specify a {what.upper() if what == 'cpu' else what} "
                                   f"limit lower than request: {v[1]} < {v[0]}")
            return v
        if not isinstance(v, kind) or isinstance(v, bool) or v < 0:
            raise InvalidError(f"{what} must be a positive number or a (request, limit) tuple, "
                               f"got {v!r}")
        return v, None

    cpu_req, cpu_lim = pair(cpu, "cpu", (int, float))
    mem_req, mem_lim = pair(memory, "memory", (int,))
    return {"cpu": cpu_req, "cpu_limit": cpu_lim, "memory": mem_req, "memory_limit": mem_lim}


def _pty_size(pty: bool, info) -> tuple[int, int] | None:
    """(rows, cols) for `pty=True, pty_info=...` (exec and create), or None without a pty."""
    if not pty and info is None:
        return None
    if isinstance(info, (tuple, list)) and len(info) == 2:
        rows, cols = info
    elif info is not None:
        rows, cols = getattr(info, "winsz_rows", 0), getattr(info, "winsz_cols", 0)
    else:
        import shutil

        cols, rows = shutil.get_terminal_size((80, 24))
    if not all(isinstance(v, int) and 0 < v <= 1000 for v in (rows, cols)):
        raise InvalidError(f"pty_info needs rows and columns between 1 and 1000, got "
                           f"{rows!r} x {cols!r}")
    return rows, cols


class _Sandbox:
    """An isolated Linux container with its own root filesystem, limits and lifetime.

        sb = shoal.Sandbox.create(app=app)
        p = sb.exec("python", "-c", "print(1 + 1)")
        print(p.stdout.read())     # "2\\n"
        sb.terminate()
    """

    def __init__(self, sandbox_id: str):
        self._sandbox_id = sandbox_id
        self._returncode: int | None = None
        self._end_reason: str | None = None
        self._runtime: str | None = None
        self._stdout = _StreamReader(f"/sandboxes/{sandbox_id}/output/stdout", resumable=True)
        self._stderr = _StreamReader(f"/sandboxes/{sandbox_id}/output/stderr", resumable=True)
        self._stdin = _StreamWriter(f"/sandboxes/{sandbox_id}/stdin")

    @classmethod
    async def create(
        cls,
        *args: str,
        app: _App | None = None,
        name: str | None = None,
        tags: dict[str, str] | None = None,
        image: _Image | None = None,
        env: dict[str, str | None] | None = None,
        secrets: Sequence = (),
        volumes: dict | None = None,
        network_file_systems: dict | None = None,
        timeout: int = 300,
        idle_timeout: int | None = None,
        workdir: str | None = None,
        cpu: float | tuple[float, float] | None = None,
        memory: int | tuple[int, int] | None = None,
        ephemeral_disk: int | None = None,
        block_network: bool = False,
        cidr_allowlist: Sequence[str] | None = None,
        encrypted_ports: Sequence[int] = (),
        unencrypted_ports: Sequence[int] = (),
        h2_ports: Sequence[int] = (),
        outbound_domain_allowlist: Sequence[str] | None = None,
        readiness_probe: _Probe | None = None,
        pty: bool = False,
        verbose: bool = False,
        # --- Modal parameters shoal refuses unless left at their defaults (see _refuse_create)
        gpu: str | None = None,
        cloud: str | None = None,
        region: str | Sequence[str] | None = None,
        runtime: str | None = None,
        outbound_cidr_allowlist: Sequence[str] | None = None,
        inbound_cidr_allowlist: Sequence[str] | None = None,
        custom_domain: str | None = None,
        proxy=None,
        include_oidc_identity_token: bool = False,
        experimental_options: dict | None = None,
        _experimental_enable_snapshot: bool = False,
        client=None,
        environment_name: str | None = None,
        pty_info=None,
        **unsupported,
    ) -> "_Sandbox":
        """Start a sandbox. With `args`, they run as its entrypoint and the sandbox ends when they
        do; without, it stays up until `terminate()` or `timeout` seconds (default 300).

        Raises InvalidError for a bad argument, NotFoundError for a missing volume, app or image,
        AlreadyExistsError when `name` is taken by a running sandbox of the app.

        Network (docs/network.md): by default the sandbox reaches the internet through NAT, never
        the host, other sandboxes, link-local/metadata or the operator's private networks.
        `block_network=True`: loopback only. `cidr_allowlist=["203.0.113.0/24"]`: only those
        IPv4 networks (plus DNS to shoal's resolvers); a bad CIDR raises InvalidError.
        `encrypted_ports` / `unencrypted_ports` / `h2_ports`: ports reachable through
        `tunnels()`.

        `ephemeral_disk`: MiB for the sandbox's writable root and /tmp (default: the server's,
        10 GiB); writing past it fails with ENOSPC inside the sandbox (docs/security.md).
        Runtime (docs/gvisor.md): `experimental_options={"runtime": "gvisor"}` runs the sandbox
        under gVisor's user-space kernel instead of the server's default (runc unless `shoal
        serve --runtime gvisor`); InvalidError when the server has no gVisor or for any other key.
        `_experimental_enable_snapshot` (Modal's) is accepted and changes nothing: every gVisor
        sandbox with `block_network=True` can be memory-snapshotted (`_experimental_snapshot`).

        `pty=True`: the entrypoint runs on a pseudo-terminal inside the sandbox (its stdin,
        stdout and stderr; `isatty()` is true, `TERM` is `xterm` unless `env` sets it). Its size
        comes from `pty_info` (Modal's object with `winsz_rows`/`winsz_cols`, or a (rows, cols)
        tuple), else this terminal's, else 24x80; `sb.resize_pty(rows, cols)` changes it.
        `sb.stdin` is typed on the terminal (echoed; "\\x03" is Ctrl-C and interrupts the
        program; `write_eof()` types Ctrl-D), `sb.stdout` carries everything the program writes
        (with the terminal's "\\r\\n" line ends), `sb.stderr` stays empty. InvalidError for a
        size outside 1-1000.

            sb = shoal.Sandbox.create("python3", "-i", pty=True, app=app)
            sb.stdin.write(b"print(6 * 7)\\n"); sb.stdin.drain()

            sb = shoal.Sandbox.create(app=app, cpu=(0.5, 2), memory=(512, 1024))
        """
        check_client(client, environment_name)
        _refuse_create(locals())
        experimental = _experimental(experimental_options)
        bad = [k for k in unsupported if k in _UNSUPPORTED or not k.startswith("_")]
        if bad:
            raise InvalidError(f"Sandbox.create: {', '.join(sorted(bad))} not supported by shoal")
        if idle_timeout is not None and (not isinstance(idle_timeout, (int, float))
                                         or idle_timeout <= 0):
            raise InvalidError(f"idle_timeout must be a positive number of seconds, "
                               f"got {idle_timeout!r}")
        if readiness_probe is not None and not isinstance(readiness_probe, _Probe):
            raise InvalidError("readiness_probe must be a shoal.Probe")
        pty_size = _pty_size(pty, pty_info)
        if not isinstance(timeout, (int, float)) or isinstance(timeout, bool) or timeout <= 0:
            raise InvalidError(f"timeout must be a positive number of seconds, got {timeout!r}")
        if image is not None and not isinstance(image, _Image):
            raise InvalidError(f"image must be a shoal.Image, got {type(image).__name__}")
        if isinstance(app, _App):  # the App's defaults (App(image=, secrets=, volumes=))
            image, secrets, volumes = app._sandbox_defaults(image, secrets, volumes)
        resources = _resources(cpu, memory)
        volumes = dict(volumes or {})  # CloudBucketMounts stand beside volumes (issue 12)
        buckets = _mounts({p: volumes.pop(p) for p in list(volumes)
                           if isinstance(volumes[p], CloudBucketMount)}, CloudBucketMount, "volumes")
        vols = _mounts(volumes, _Volume, "volumes")
        nfss = _mounts(network_file_systems or {}, _NetworkFileSystem, "network_file_systems")
        app = app if app is not None else _App("default")
        if not isinstance(app, _App):
            raise InvalidError(f"app must be a shoal.App, got {type(app).__name__}")

        started = time.monotonic()
        image = image or _Image.debian_slim()
        app_id = await app._resolve(create_if_missing=True)
        objs = [o for _, o in vols + nfss]
        await asyncio.gather(*(o._id() for o in objs))
        body = {
            "app_id": app_id,
            "args": _check_args(args, "entrypoint"),
            "name": name,
            "tags": dict(tags or {}),
            "image_id": await image._resolve(),
            "env": merge_env(env, secrets),
            "workdir": workdir,
            "timeout": timeout,
            "idle_timeout": idle_timeout,
            "readiness_probe": readiness_probe._spec if readiness_probe else None,
            "mounts": [o._mount_spec(p) for p, o in vols + nfss],
            "resources": {**resources, "ephemeral_disk": ephemeral_disk},
            "block_network": bool(block_network),
            "cidr_allowlist": list(cidr_allowlist) if cidr_allowlist is not None else None,
            "outbound_domain_allowlist": (list(outbound_domain_allowlist)
                                          if outbound_domain_allowlist is not None else None),
            "encrypted_ports": list(encrypted_ports),
            "unencrypted_ports": list(unencrypted_ports),
            "h2_ports": list(h2_ports),
            "secret_ids": await secret_ids(secrets),
            "bucket_mounts": [await b._mount_spec(p) for p, b in buckets],
            "runtime": experimental.get("runtime"),
        }
        if pty_size is not None:
            body["pty_rows"], body["pty_cols"] = pty_size
        output.emit("creating sandbox")
        client = await get_client()
        try:
            r = await client.call("POST", "/sandboxes", json=body)
        except NotFoundError as e:
            if "image" not in str(e):
                raise
            body["image_id"] = await image._resolve(fresh=True)  # removed since we resolved it
            r = await client.call("POST", "/sandboxes", json=body)
        output.emit(f"sandbox {r['sandbox_id']} started in {time.monotonic() - started:.2f} s")
        sb = cls(r["sandbox_id"])
        sb._runtime = r.get("runtime")
        return sb

    @classmethod
    async def from_id(cls, sandbox_id: str, client=None) -> "_Sandbox":
        """A handle to an existing sandbox (running or finished).

        Raises NotFoundError if there is no such sandbox, InvalidError for a string that is
        not a sandbox id.

            sb = shoal.Sandbox.from_id("sb-...")
        """
        check_client(client)
        checked_id(sandbox_id, "sandbox", "sb-")
        client = await get_client()
        r = await client.call("GET", f"/sandboxes/{sandbox_id}")
        sb = cls(r["sandbox_id"])
        sb._update(r)
        return sb

    @classmethod
    async def from_name(cls, app_name: str, name: str, *, environment_name: str | None = None,
                        include_terminated: bool = False, client=None) -> "_Sandbox":
        """The running sandbox called `name` in the app `app_name`; with `include_terminated`,
        the most recent one of that name even if it has finished.

        Raises NotFoundError if there is none, InvalidError for a name no sandbox can have.

            sb = shoal.Sandbox.from_name("my-app", "worker-1")
        """
        check_client(client, environment_name)
        if not valid_name(name):  # (it goes into the URL's path)
            raise InvalidError(f"invalid sandbox name {name!r}: {NAME_RULE}")
        client = await get_client()
        app = await client.call("POST", "/apps/lookup", json={"name": app_name})
        r = await client.call("GET", f"/apps/{app['app_id']}/sandboxes/{name}",
                              params={"include_terminated": include_terminated})
        sb = cls(r["sandbox_id"])
        sb._update(r)
        return sb

    @classmethod
    async def list(cls, *, app_id: str | None = None, tags: dict[str, str] | None = None,
                   client=None) -> AsyncIterator["_Sandbox"]:
        """Running sandboxes, optionally of one app and with all of `tags`.

        Raises InvalidError for a `client=` naming another server.

            for sb in shoal.Sandbox.list(app_id=app.app_id): print(sb.object_id)
        """
        import json

        check_client(client)
        client = await get_client()
        params = {}
        if app_id:
            params["app_id"] = app_id
        if tags:
            params["tags"] = json.dumps(tags)
        for r in await client.call("GET", "/sandboxes", params=params):
            sb = cls(r["sandbox_id"])
            sb._update(r)
            yield sb

    def logs(self) -> "_SandboxLogsManager":
        """The entrypoint's logs (Modal's `Sandbox.logs()`): `.tail(n)` and `.fetch(since=...)`
        yield LogEntry objects (message, timestamp, source "stdout"/"stderr"/"system").
        Output of `exec()` is not included, as in Modal. "system" entries say how the sandbox
        ended (an OOM kill says so). Raises NotFoundError (when iterated) for an unknown sandbox.

            for entry in sb.logs().tail(20):
                print(entry.source, entry.message, end="")
        """
        return _SandboxLogsManager(self._sandbox_id)

    def _update(self, info: dict) -> None:
        self._runtime = info.get("runtime", self._runtime)
        if info["state"] != "running":
            self._returncode = info["returncode"]
            self._end_reason = info["end_reason"]

    @property
    def object_id(self) -> str:
        return self._sandbox_id

    @property
    def runtime(self) -> str | None:
        """The runtime isolating this sandbox: "runc" (Linux namespaces, cgroups and seccomp
        around the host kernel) or "gvisor" (gVisor's user-space kernel in between; choose it with
        `Sandbox.create(..., experimental_options={"runtime": "gvisor"})`; docs/gvisor.md).
        None for a handle made from an id alone until `from_id`/`list` filled it in.

            sb = shoal.Sandbox.create(experimental_options={"runtime": "gvisor"})
            assert sb.runtime == "gvisor"
        """
        return self._runtime

    @property
    def returncode(self) -> int | None:
        """None while running (as of the last `poll()`/`wait()`); then the exit code: the
        entrypoint's, 137 after `terminate()`, 124 after the timeout."""
        return self._returncode

    @property
    def stdout(self) -> _StreamReader:
        return self._stdout

    @property
    def stderr(self) -> _StreamReader:
        return self._stderr

    @property
    def stdin(self) -> _StreamWriter:
        return self._stdin

    async def resize_pty(self, rows: int, cols: int) -> None:
        """Change the size of the entrypoint's terminal (a sandbox created with `pty=True`); the
        program gets SIGWINCH.

        Raises InvalidError for a sandbox without a terminal or a size outside 1-1000,
        SandboxTerminatedError once it has finished.

            sb = shoal.Sandbox.create("bash", pty=True, app=app); sb.resize_pty(40, 120)
        """
        if not all(isinstance(v, int) and not isinstance(v, bool) and 0 < v <= 1000
                   for v in (rows, cols)):
            raise InvalidError(f"rows and cols must be between 1 and 1000, got {rows!r} x "
                               f"{cols!r}")
        client = await get_client()
        await client.call("POST", f"/sandboxes/{self._sandbox_id}/resize",
                          json={"rows": rows, "cols": cols})

    # From the blocking face, in the caller's thread (no hop to the SDK loop) unless named
    # secrets need looking up first.
    @in_callers_thread(lambda *args, secrets=(), **kwargs: not secrets)
    async def exec(
        self,
        *args: str,
        stdout: StreamType = StreamType.PIPE,
        stderr: StreamType = StreamType.PIPE,
        timeout: int | None = None,
        workdir: str | None = None,
        env: dict[str, str | None] | None = None,
        secrets: Sequence = (),
        text: bool = True,
        bufsize: int = -1,
        pty: bool = False,
        pty_info=None,
        _pty_info=None,
    ) -> _ContainerProcess:
        """Run a command in the sandbox; returns at once with a handle whose output streams while
        the command runs.

            p = sb.exec("bash", "-c", "echo hi; exit 3")
            p.stdout.read()   # "hi\\n"
            p.wait()          # 3

        With `pty=True` the command runs in a pseudo-terminal (size from `pty_info`, an object
        with `winsz_rows`/`winsz_cols` as Modal's, or a (rows, cols) tuple; default this
        terminal's or 24x80): everything it writes arrives on `stdout`, and
        `p.resize(rows, cols)` changes the size.

        Raises SandboxTerminatedError if the sandbox has finished; InvalidError for arguments
        that are not strings or hold NUL bytes, and for a command whose arguments and whole
        environment exceed 4000 strings or 1 MiB (pass large data through stdin or a file).
        A command that cannot be run still starts: exit code 127 (not found) or 126.
        """
        if not args:
            raise InvalidError("exec needs a command, e.g. sb.exec('ls', '-l')")
        pty_size = _pty_size(pty, pty_info or _pty_info)
        if bufsize not in (-1, 1):
            raise InvalidError("bufsize must be -1 (chunks) or 1 (lines)")
        if not isinstance(stdout, StreamType) or stdout == StreamType.STDOUT:
            raise InvalidError("stdout must be StreamType.PIPE or StreamType.DEVNULL")
        if not isinstance(stderr, StreamType):
            raise InvalidError("stderr must be a StreamType")
        if timeout is not None and (not isinstance(timeout, (int, float)) or timeout <= 0):
            raise InvalidError(f"timeout must be a positive number of seconds, got {timeout!r}")
        body = {
            "args": _check_args(args, "exec"),
            "env": merge_env(env, secrets),
            "workdir": workdir,
            "timeout": timeout,
            "stdout": stdout.wire(),
            "stderr": stderr.wire(),
            "secret_ids": await secret_ids(secrets),
        }
        if pty_size is not None:
            body["pty_rows"], body["pty_cols"] = pty_size
        return await _ContainerProcess._start(self._sandbox_id, body, text)

    async def _wait_once(self, timeout: float) -> bool:
        client = await get_client()
        r = await client.call("GET", f"/sandboxes/{self._sandbox_id}/wait",
                              params={"timeout": timeout})
        if r["done"]:
            info = await client.call("GET", f"/sandboxes/{self._sandbox_id}")
            self._update(info)
        return r["done"]

    async def wait(self, raise_on_termination: bool = True) -> None:
        """Wait for the sandbox to finish.

        Raises SandboxTimeoutError if it reached its timeout, and SandboxTerminatedError if it
        was terminated, unless `raise_on_termination=False`. A sandbox killed for running out of
        memory ends as Modal's does: no exception, `returncode` 137, and a warning on the
        "shoal" logger plus a "system" entry in `sb.logs()` saying it was OOM-killed.

            sb.wait(raise_on_termination=False); print(sb.returncode)
        """
        while not await self._wait_once(60):
            pass
        if self._end_reason == "oom":
            _log.warning("%s", _oom_message(self._sandbox_id))
        if raise_on_termination:
            if self._end_reason in ("timeout", "idle-timeout"):
                raise SandboxTimeoutError(f"sandbox {self._sandbox_id} reached its timeout")
            if self._end_reason in ("terminated", "server-restart"):
                raise SandboxTerminatedError(f"sandbox {self._sandbox_id} was terminated")

    async def poll(self) -> int | None:
        """The return code if the sandbox has finished, else None (does not block).

        Raises NotFoundError for an unknown sandbox.

            if sb.poll() is not None: print(sb.returncode)
        """
        await self._wait_once(0)
        return self._returncode

    async def terminate(self, *, wait: bool = False) -> int | None:
        """Stop the sandbox (SIGKILL to all its processes). Its returncode becomes 137. Terminating
        a finished sandbox does nothing.

        Raises NotFoundError for an unknown sandbox.

            sb.terminate(); sb.wait(raise_on_termination=False)
        """
        client = await get_client()
        info = await client.call("POST", f"/sandboxes/{self._sandbox_id}/terminate")
        self._update(info)
        return self._returncode if wait else None

    async def set_tags(self, tags: dict[str, str], *, client=None) -> None:
        """Replace the sandbox's tags (used by `Sandbox.list(tags=...)`).

        Raises InvalidError if `tags` is not a dict of str to str.

            sb.set_tags({"job": "42"})
        """
        check_client(client)
        if not isinstance(tags, dict):
            raise InvalidError("tags must be a dict of str to str")
        client = await get_client()
        await client.call("PUT", f"/sandboxes/{self._sandbox_id}/tags", json={"tags": tags})

    async def get_tags(self) -> dict[str, str]:
        """The sandbox's tags.

        Raises NotFoundError for an unknown sandbox.

            tags = sb.get_tags()
        """
        client = await get_client()
        return (await client.call("GET", f"/sandboxes/{self._sandbox_id}"))["tags"]

    async def tunnels(self, timeout: float = 50) -> dict[int, Tunnel]:
        """The tunnels of the ports given at create (`encrypted_ports`, `unencrypted_ports`,
        `h2_ports`), by sandbox port. They exist once create returns; `timeout` is accepted for
        Modal compatibility. SandboxTerminatedError if the sandbox has ended.

            t = sb.tunnels()[8000]
            print(t.url)                # https://127.0.0.1:40123

        Raises SandboxTerminatedError if the sandbox has ended.
        """
        client = await get_client()
        r = await client.call("GET", f"/sandboxes/{self._sandbox_id}/tunnels")
        return {int(p): Tunnel(**t) for p, t in r["tunnels"].items()}

    async def wait_until_ready(self, *, timeout: float = 300) -> None:
        """Wait for the readiness probe given at create to pass (at once without one). Raises
        shoal.exception.TimeoutError after `timeout` seconds, SandboxTerminatedError if the sandbox
        ends first.

            sb.wait_until_ready(timeout=60)
        """
        client = await get_client()
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            r = await client.call("GET", f"/sandboxes/{self._sandbox_id}/ready",
                                  params={"timeout": max(0.0, min(left, 60))})
            if r["done"]:
                return
            if deadline - time.monotonic() <= 0:
                raise TimeoutError(f"sandbox {self._sandbox_id} was not ready within {timeout} s")

    async def snapshot_filesystem(self, timeout: int = 55, *, ttl=None) -> _Image:
        """The sandbox's root filesystem as it is now, as an Image: start new sandboxes from it
        with `Sandbox.create(image=...)`. Volumes are not part of it; layers are shared, not
        copied per sandbox. Snapshots are kept until `shoal image rm`/`prune`: `ttl` is refused.

        Raises InvalidError for `ttl`, SandboxTerminatedError if the sandbox has finished.

            image = sb.snapshot_filesystem()
        """
        if ttl is not None:
            raise InvalidError("snapshot_filesystem(ttl=...) is not supported by shoal: "
                               "snapshots are kept until removed with `shoal image rm`")
        client = await get_client()
        r = await client.call("POST", f"/sandboxes/{self._sandbox_id}/snapshot")
        return _Image.from_id(r["image_id"])

    async def snapshot_directory(self, path: str, *, timeout: int = 55, ttl: int | None = None,
                                 _experimental_encryption_key: bytes | None = None) -> _Image:
        """Not supported by shoal: always raises InvalidError (Modal's directory snapshots are
        images mounted live into running sandboxes, which shoal's runtime cannot do yet). Use
        `snapshot_filesystem()` and `Sandbox.create(image=...)`, or a Volume, instead.

            image = sb.snapshot_filesystem()   # the whole root filesystem instead
        """
        raise InvalidError("Sandbox.snapshot_directory is not supported by shoal (no live image "
                           "mounts); use sb.snapshot_filesystem() and Sandbox.create(image=...), "
                           "or a Volume (see docs/modal-parity.md)")

    async def mount_image(self, path: str, image: _Image, *,
                          _experimental_encryption_key: bytes | None = None) -> None:
        """Not supported by shoal: always raises InvalidError (mounting an image into a running
        sandbox needs a live mount into its mount namespace). Start a sandbox from the image
        with `Sandbox.create(image=...)`, or share files through a Volume.

            sb = shoal.Sandbox.create(image=image, app=app)   # instead of mount_image
        """
        raise InvalidError("Sandbox.mount_image is not supported by shoal (no live image "
                           "mounts); start a sandbox with Sandbox.create(image=...), or use a "
                           "Volume (see docs/modal-parity.md)")

    async def unmount_image(self, path: str) -> None:
        """Not supported by shoal (see `mount_image`): always raises InvalidError.

        sb.unmount_image("/data")   # raises InvalidError

            sb.unmount_image("/data")  # InvalidError
        """
        raise InvalidError("Sandbox.unmount_image is not supported by shoal: nothing can be "
                           "mounted with mount_image (see docs/modal-parity.md)")

    # --- memory snapshots (Modal's experimental API)
    async def _experimental_snapshot(self) -> _SandboxSnapshot:
        """Save this sandbox — its processes, their memory and its files — as a SandboxSnapshot;
        the sandbox keeps running (it is paused for the moment of the save). Start copies with
        `Sandbox._experimental_from_snapshot(snapshot)`. Needs a gVisor sandbox without a
        network: `Sandbox.create(..., experimental_options={"runtime": "gvisor"},
        block_network=True)` (runc cannot save memory here; gVisor cannot save host-network
        sockets). Volumes are not saved: a copy mounts the same volumes. Snapshots are kept 7
        days. Open `watch()` streams and file handles of the sandbox end with the save.

        Raises InvalidError for a runc sandbox, one with a network or with cloud bucket mounts;
        SandboxTerminatedError if it has finished; ExecutionError if gVisor fails to save it.

            snapshot = sb._experimental_snapshot()
            print(snapshot.object_id)   # "sn-..."
        """
        client = await get_client()
        r = await client.call("POST", f"/sandboxes/{self._sandbox_id}/memory-snapshot")
        snapshot = _SandboxSnapshot(r["snapshot_id"])
        snapshot._info = r
        return snapshot

    @staticmethod
    async def _experimental_from_snapshot(snapshot: _SandboxSnapshot, client=None, *,
                                          name=_KEEP_NAME) -> "_Sandbox":
        """A new sandbox that continues from a memory snapshot: the processes that ran when it
        was taken run on, with their memory and the files as they were; exec and the file API
        work on it. It gets the snapshotted sandbox's image, environment, limits, volumes and
        timeout (counted from now), gVisor and no network. `name`: by default the snapshotted
        sandbox's name; None for no name, or a new name.

        Raises NotFoundError for an unknown or expired snapshot; AlreadyExistsError when the
        name is held by a running sandbox of the app (pass name=None); InvalidError for a
        `snapshot` that is not a SandboxSnapshot.

            sb2 = shoal.Sandbox._experimental_from_snapshot(snapshot, name=None)
        """
        check_client(client)
        if not isinstance(snapshot, _SandboxSnapshot):
            raise InvalidError(f"snapshot must be a shoal.SandboxSnapshot, got "
                               f"{type(snapshot).__name__}")
        body = ({"keep_name": True} if name is _KEEP_NAME
                else {"keep_name": False, "name": name})
        c = await get_client()
        r = await c.call("POST", f"/memory-snapshots/{snapshot.object_id}/restore", json=body)
        sb = _Sandbox(r["sandbox_id"])
        sb._update(r)
        return sb

    # --- files (Modal's first file API)
    @in_callers_thread()
    async def open(self, path: str, mode: str = "r") -> _FileIO:
        """Open a file in the sandbox, like the built-in `open` (modes r w a x, with b and +).
        Each write reaches the file before it returns, as with Modal's FileIO.

        Raises ValueError for a bad mode; FileNotFoundError, IsADirectoryError, PermissionError
        or FileExistsError as the built-in `open` does.

            with sb.open("/tmp/out.txt", "w") as f:
                f.write("hi")
        """
        return await _FileIO.create(path, mode, self._sandbox_id)

    @in_callers_thread()
    async def ls(self, path: str) -> list[str]:
        """Names in a directory of the sandbox.

        Raises FileNotFoundError, NotADirectoryError, SandboxTerminatedError if the sandbox has
        finished.

            names = sb.ls("/tmp")
        """
        names, offset = [], 0
        while True:  # the server answers in pages of at most LIST_PAGE entries
            page = await self._fs("GET", "list", params={"path": path, "offset": offset,
                                                         "limit": LIST_PAGE})
            names += [d["name"] for d in page]
            offset += len(page)
            if len(page) < LIST_PAGE:
                return names

    @in_callers_thread()
    async def mkdir(self, path: str, parents: bool = False) -> None:
        """Make a directory in the sandbox (with its parents, and no error if it exists, when
        `parents`).

        Raises FileExistsError, FileNotFoundError (a missing parent), SandboxTerminatedError.

            sb.mkdir("/work/out", parents=True)
        """
        await self._fs("POST", "mkdir", json={"path": path, "parents": parents,
                                              "exist_ok": parents})

    @in_callers_thread()
    async def rm(self, path: str, recursive: bool = False) -> None:
        """Remove a file or an empty directory (a non-empty one with `recursive`).

        Raises FileNotFoundError, SandboxFilesystemDirectoryNotEmptyError without `recursive`,
        SandboxTerminatedError.

            sb.rm("/tmp/build", recursive=True)
        """
        await self._fs("DELETE", "file", params={"path": path, "recursive": recursive})

    async def mv(self, src: str, dst: str) -> None:
        """Move or rename a file or directory inside the sandbox (atomic; not in Modal).

        Raises FileNotFoundError if `src` is missing, SandboxTerminatedError.

            sb.mv("/tmp/a", "/tmp/b")
        """
        await self._fs("POST", "rename", json={"src": src, "dst": dst, "overwrite": True})

    async def watch(self, path: str, filter: list[FileWatchEventType] | None = None,
                    recursive: bool | None = None,
                    timeout: int | None = None) -> AsyncIterator[FileWatchEvent]:
        """File events under `path`, as they happen, until `timeout` seconds pass or the sandbox
        ends. FileNotFoundError if `path` does not exist.

        Raises FileNotFoundError if `path` does not exist.

            for event in sb.watch("/tmp", timeout=10): print(event.type, event.paths)
        """
        async for event in watch_events(self._sandbox_id, path, filter, recursive, timeout):
            yield event

    async def _fs(self, method: str, op: str, **kwargs):
        client = await get_client()
        return await client.call(method, f"/sandboxes/{self._sandbox_id}/fs/{op}", **kwargs)

    @property
    def filesystem(self) -> _SandboxFilesystem:
        """Whole-file access: read_bytes, write_text, copy_from_local, list_files, stat, ..."""
        return _SandboxFilesystem(self._sandbox_id)

    # --- parity additions (Modal's object protocol; no exec internals) -----------------------
    async def hydrate(self, client=None) -> "_Sandbox":
        """Fetch the sandbox's state now (returncode if it has finished); returns the sandbox.

        Raises NotFoundError if the sandbox no longer exists.

            sb = shoal.Sandbox.from_id(sid).hydrate()
        """
        check_client(client)
        c = await get_client()
        self._update(await c.call("GET", f"/sandboxes/{self._sandbox_id}"))
        return self

    @property
    def client(self):
        """The Client for the server this sandbox lives on."""
        from shoal.client import _Client

        return _Client()

    async def reload_volumes(self, *, timeout: float | None = None) -> None:
        """Does nothing, by design: shoal's volumes are live bind mounts, so a sandbox sees every
        write to a mounted volume at once (Modal needs this call to see new commits).

        Raises nothing.

            sb.reload_volumes()
        """

    async def detach(self) -> None:
        """Forget this handle; the sandbox keeps running (it was never tied to the client).

        Raises nothing.

            sb.detach()
        """

    def __repr__(self) -> str:
        return f"Sandbox({self._sandbox_id})"


_log = logging.getLogger("shoal")


def _oom_message(sandbox_id: str) -> str:
    return (f"sandbox {sandbox_id} ran out of memory and was OOM-killed (returncode 137); "
            "give it more with memory=(request, limit) or see docs/modal-parity.md")


@dataclass(frozen=True)
class LogEntry:
    """One log line of a sandbox (Modal's `modal.types.LogEntry`). shoal does not timestamp
    each line: `timestamp` is when the sandbox started."""

    message: str
    timestamp: datetime.datetime
    source: str
    object_id: str
    context_ids: list

    def __str__(self) -> str:
        return self.message


class _SandboxLogsManager:
    """Access to a sandbox's entrypoint logs: `tail(entries)` and `fetch(since=...)`."""

    def __init__(self, sandbox_id: str):
        self._sandbox_id = sandbox_id

    async def _entries(self, source: str | None, search_text: str = "") -> list[LogEntry]:
        client = await get_client()
        info = await client.call("GET", f"/sandboxes/{self._sandbox_id}")
        at = datetime.datetime.fromtimestamp(info["created_at"], datetime.timezone.utc)
        out = []
        for stream in ("stdout", "stderr"):
            if source not in (None, stream):
                continue
            resp = await client.http.get(f"/sandboxes/{self._sandbox_id}/logs/{stream}")
            if resp.status_code >= 400:
                from shoal._client import _error_from

                raise _error_from(resp.status_code, resp.content)
            for line in resp.content.decode(errors="replace").splitlines(keepends=True):
                out.append(LogEntry(line, at, stream, self._sandbox_id, [self._sandbox_id]))
        if source in (None, "system") and info["state"] != "running":
            msg = (_oom_message(self._sandbox_id) if info["end_reason"] == "oom" else
                   f"sandbox {self._sandbox_id} ended: {info['end_reason']}, returncode "
                   f"{info['returncode']}")
            out.append(LogEntry(msg + "\n", at, "system", self._sandbox_id, [self._sandbox_id]))
        return [e for e in out if search_text in e.message]

    async def tail(self, entries: int = 100, *, source: str | None = None
                   ) -> AsyncIterator[LogEntry]:
        """The last `entries` log lines (stdout and stderr, then how the sandbox ended).

        Raises NotFoundError for an unknown sandbox.

            for e in sb.logs().tail(10): print(e.message, end="")
        """
        for e in (await self._entries(source))[-entries:] if entries > 0 else []:
            yield e

    async def fetch(self, *, since: datetime.datetime, until: datetime.datetime | None = None,
                    source: str | None = None, search_text: str = "") -> AsyncIterator[LogEntry]:
        """Log lines containing `search_text`, of a sandbox that started between `since` and
        `until` (lines carry no time of their own: all or none of a sandbox's lines match).

        Raises NotFoundError for an unknown sandbox.

            for e in sb.logs().fetch(since=datetime.now() - timedelta(hours=1)): print(e)
        """
        def utc(d):
            return d if d.tzinfo else d.astimezone(datetime.timezone.utc)

        for e in await self._entries(source, search_text):
            if utc(since) <= e.timestamp and (until is None or e.timestamp <= utc(until)):
                yield e


SandboxLogsManager = synchronize_api(_SandboxLogsManager)
Probe = synchronize_api(_Probe)
Sandbox = synchronize_api(_Sandbox)
