"""The sandbox host: the one seam between the control plane and whatever runs sandboxes.

The control plane (`server/control/`) asks a `SandboxHost` to create, run commands in, read and write
files of, snapshot and destroy sandboxes, all named by their id. What crosses the seam is data: ids,
specs, bytes, exit codes, file metadata. No host pid, file descriptor, path into a sandbox or
`asyncio.subprocess.Process` does — those stay inside the implementation (`runc_host.RuncHost`
today; gVisor and remote machines plug in beside it). Inputs the control plane owns do cross as
paths: the image layers to stack and the volume directories to mount.

Every method may raise `HostError` (the runtime failed: the message says how), `OSError` subclasses
for file operations (`FileNotFoundError`, ...; the message names the sandbox path), or
`SandboxGone` when the sandbox is no longer running. `fake.FakeHost` implements the same contract in
memory, for the control plane's unit tests.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from shoal.server.host.oci import Limits, Mount


class RuntimeError_(Exception):
    """The OCI runtime refused or failed an operation; the message is the runtime's own."""


class HostError(Exception):
    """The host could not do what was asked (a runtime call failed or timed out)."""


class SandboxGone(Exception):
    """The sandbox is not running on this host (any more)."""


@dataclass
class ContainerState:
    id: str
    status: str  # "created", "running", "paused", "stopped"
    pid: int


@dataclass
class SandboxSpec:
    """What a sandbox is made of, in terms every host understands."""
    id: str
    layers: list[Path]  # image layers, top first
    args: list[str]  # the entrypoint; empty: idle until terminated
    env: dict[str, str] = field(default_factory=dict)
    workdir: str = "/"
    user: str | None = None  # the image's USER ("name", "uid", "name:group", "uid:gid")
    limits: Limits = field(default_factory=Limits)
    mounts: list[Mount] = field(default_factory=list)
    hostname: str = "sandbox"
    log_limit: int = 64 << 20  # bytes of entrypoint output kept per stream
    network: object | None = None  # a shoal.server.network.Policy; None: loopback only
    runtime: str | None = None  # "runc" | "gvisor"; None: the server's default (host/multi.py)
    # (rows, cols): the entrypoint runs on a pseudo-terminal of that size (its stdin, stdout and
    # stderr; everything it writes goes to the stdout log); None: pipes
    pty: tuple[int, int] | None = None


@dataclass
class ExecSpec:
    exec_id: str
    argv: list[str]
    env: dict[str, str]
    cwd: str = "/"
    user: tuple[int, int] | None = None  # None: the sandbox's user
    stdin: str = "pipe"  # pipe | null
    stdout: str = "pipe"  # pipe | null
    stderr: str = "pipe"  # pipe | null | stdout
    timeout: float | None = None  # seconds; then SIGKILL and exit code 124
    pty: tuple[int, int] | None = None  # (rows, cols)


@dataclass
class SandboxStats:
    """Resource use of one sandbox, read from the host side (never from inside the sandbox)."""
    cpu_usec: int  # CPU time used since the sandbox started, microseconds
    memory_bytes: int  # memory charged now (page cache included, as the kernel counts it)
    memory_limit: int | None  # bytes; None: unlimited
    pids: int  # processes and threads now
    disk_bytes: int  # what the sandbox wrote to its root filesystem (its private upper layer)


@dataclass
class HostEvent:
    sandbox_id: str
    kind: str  # "exited"
    returncode: int | None  # None: unknown (a sandbox adopted from an earlier server)
    oom: bool = False


class SandboxHost(Protocol):
    name: str
    has_network: bool  # whether it can give sandboxes a network (SandboxSpec.network)

    # --- life
    async def create(self, spec: SandboxSpec) -> None:
        """Start the sandbox; returns once its agent answers. On failure nothing is left."""

    async def adopt(self, sandbox_id: str) -> bool:
        """After a server restart: take over a sandbox an earlier server started. False when it
        no longer runs (then `destroy` it)."""

    async def kill(self, sandbox_id: str) -> None:
        """End every process of the sandbox now; an "exited" event follows."""

    async def destroy(self, sandbox_id: str) -> None:
        """Remove everything the sandbox had on this host (after kill). Idempotent."""

    def events(self) -> AsyncIterator[HostEvent]:
        """Exits (and out-of-memory kills) of sandboxes, as they happen."""

    async def sandboxes(self) -> set[str]:
        """Ids of the sandboxes this host has anything of (running or left over), logs aside."""

    async def sandbox_logs(self) -> set[str]:
        """Ids of sandboxes whose logs this host keeps."""

    async def forget(self, sandbox_id: str) -> None:
        """Remove an ended sandbox's last traces (its logs)."""

    async def settle(self, live: set[str]) -> None:
        """After a restart's reconcile: release what no sandbox in `live` owns (networks, ...)."""

    async def tunnels(self, sandbox_id: str) -> dict:
        """The sandbox's port tunnels: {sandbox port: shoal.server.network.TunnelInfo}."""

    async def upkeep(self) -> None:
        """Periodic housekeeping (reaping the runtime's stray processes, ...)."""

    async def close(self) -> None:
        """Server shutdown: stop watching; sandboxes keep running for the next server."""

    async def stats(self, sandbox_id: str) -> SandboxStats:
        """Current resource use; SandboxGone if the sandbox does not run."""

    # --- the entrypoint's stdio
    async def write_stdin(self, sandbox_id: str, data: bytes, eof: bool) -> None: ...

    async def resize_pty(self, sandbox_id: str, rows: int, cols: int) -> None:
        """Resize the entrypoint's terminal (`SandboxSpec.pty`; it gets SIGWINCH). OSError
        (EINVAL) when it was started without one."""

    def read_log(self, sandbox_id: str, stream: str, offset: int,
                 finished) -> AsyncIterator[bytes]:
        """The entrypoint's `stream` from `offset`, following it until `finished` (an
        asyncio.Event) is set. Works after the sandbox ended, until `forget`."""

    # --- commands
    async def exec(self, sandbox_id: str, spec: ExecSpec) -> None: ...

    async def exec_read(self, sandbox_id: str, exec_id: str, stream: str,
                        offset: int) -> tuple[bytes, bool]:
        """Bytes of `stream` at `offset` once there are some (or b"", True at its end)."""

    async def exec_wait(self, sandbox_id: str, exec_id: str) -> tuple[int, bool]:
        """(exit code, timed out) once the command has ended and its output is readable."""

    async def exec_exit(self, sandbox_id: str, exec_id: str) -> tuple[int, bool]:
        """(exit code, timed out) once the command's process has exited, even while a process
        it started in the background still holds its output open (`exec_wait` waits for that
        output's end too)."""

    async def exec_stdin(self, sandbox_id: str, exec_id: str, offset: int, data: bytes,
                         eof: bool) -> int:
        """Write `data` at stdin position `offset` (bytes already written are skipped)."""

    async def exec_signal(self, sandbox_id: str, exec_id: str, signo: int) -> None: ...

    async def exec_resize(self, sandbox_id: str, exec_id: str, rows: int, cols: int) -> None: ...

    async def exec_forget(self, sandbox_id: str, exec_id: str) -> None: ...

    # --- files (paths as the sandbox sees them)
    async def stat(self, sandbox_id: str, path: str) -> dict: ...

    async def listdir(self, sandbox_id: str, path: str, offset: int = 0,
                      limit: int | None = None) -> list[dict]:
        """Entries `offset`.. in name order, at most `limit` (and at most the host's page size,
        10,000 for runc): callers page through large directories."""

    async def read_file(self, sandbox_id: str, path: str,
                        limit: int | None) -> tuple[int, AsyncIterator[bytes]]:
        """(size, chunks); files over `limit` raise SandboxFilesystemFileTooLargeError."""

    async def write_file(self, sandbox_id: str, path: str, chunks: AsyncIterator[bytes],
                         parents: bool) -> int:
        """Replace `path` atomically with the chunks; returns the bytes written."""

    async def mkdir(self, sandbox_id: str, path: str, parents: bool, exist_ok: bool) -> None: ...

    async def remove(self, sandbox_id: str, path: str, recursive: bool) -> None: ...

    async def rename(self, sandbox_id: str, src: str, dst: str, overwrite: bool) -> None: ...

    async def watch(self, sandbox_id: str, path: str, recursive: bool, timeout: float | None,
                    finished) -> AsyncIterator[dict]:
        """Events {"paths": [...], "type": ...}; errors (a missing path) are raised before the
        first event."""

    async def handle_open(self, sandbox_id: str, path: str, mode: str) -> str: ...

    async def handle_read(self, sandbox_id: str, handle: str, n: int, line: bool) -> bytes:
        """At most 16 MiB per call (runc): larger `n` reads short; a whole-file read or a line
        over it raises SandboxFilesystemFileTooLargeError."""

    async def handle_write(self, sandbox_id: str, handle: str, data: bytes) -> int: ...

    async def handle_seek(self, sandbox_id: str, handle: str, offset: int, whence: int) -> int: ...

    async def handle_flush(self, sandbox_id: str, handle: str) -> int: ...

    async def handle_close(self, sandbox_id: str, handle: str) -> None: ...

    # --- probes and snapshots
    async def probe_tcp(self, sandbox_id: str, port: int) -> bool: ...

    async def export_changes(self, sandbox_id: str, dest: Path) -> None:
        """Copy what the sandbox changed in its root filesystem, as an overlay layer (whiteouts
        for deletions), into `dest` — consistently: the sandbox is frozen meanwhile."""

    # --- memory snapshots (Modal's `Sandbox._experimental_snapshot`)
    async def snapshot_memory(self, sandbox_id: str, dest: Path) -> None:
        """Save the running sandbox — its processes, their memory and its root filesystem's
        changes, of one instant — into the new directory `dest`; the sandbox keeps running.
        HostError when this host cannot (runc: no working CRIU; a sandbox with a network)."""

    async def create_from_snapshot(self, spec: SandboxSpec, snapshot: Path) -> None:
        """Like `create`, but the sandbox `spec.id` continues from `snapshot` (a directory
        `snapshot_memory` filled) instead of starting its entrypoint: same processes and memory,
        same files, its own id, limits, logs and stdin. `spec.layers` must be the snapshotted
        sandbox's. Returns once its agent answers; on failure nothing is left."""
