"""The seam between the server and an OCI runtime. The server only talks to `Runtime`; runc is the
one implementation today, runsc (gVisor) plugs in beside it."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from shoal.server.host.oci import ContainerSpec


class RuntimeError_(Exception):
    """The runtime refused or failed an operation; the message is the runtime's own."""


@dataclass
class ContainerState:
    id: str
    status: str  # "created", "running", "paused", "stopped"
    pid: int


@dataclass
class ExecIO:
    """File descriptors (or asyncio.subprocess.PIPE / DEVNULL) for an exec'd process."""
    stdin: int
    stdout: int
    stderr: int


class Runtime(Protocol):
    name: str

    async def start(self, spec: ContainerSpec, bundle: Path, stdin: int, stdout: int,
                    stderr: int) -> int:
        """Create and start the container; return the host pid of its init."""

    async def exec(self, container_id: str, argv: list[str], env: dict[str, str], cwd: str | None,
                   io: ExecIO, pid_file: Path) -> asyncio.subprocess.Process:
        """Start `argv` inside the container; the process's host pid is written to `pid_file`."""

    async def kill(self, container_id: str, signal: int) -> None: ...

    async def pause(self, container_id: str) -> None:
        """Freeze every process of the container (for a consistent snapshot)."""

    async def resume(self, container_id: str) -> None: ...

    async def delete(self, container_id: str) -> None:
        """Forget a stopped container and remove its cgroups."""

    async def state(self, container_id: str) -> ContainerState | None: ...

    async def list(self) -> list[ContainerState]: ...

    def open_root(self, pid: int) -> int:
        """A descriptor of the sandbox's root as its processes see it, for the file API."""
