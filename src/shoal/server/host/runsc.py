"""gVisor's `runsc`, driven through its command line, beside `runc.py`.

What differs from runc (RUNTIME-NOTES.md, measured on this machine):
- ids are matched by prefix ("ambiguous" errors): shoal's sandbox ids all have one length;
- `runsc run --detach` leaves two host processes, the sandbox (the gVisor kernel, whose exit status
  is the container's) and the gofer (file access); both re-parent to the server, a child subreaper,
  which must reap them or `delete --force` waits ~1.8 s;
- a killed `runsc run` leaves sandbox and gofer running and unlisted: `kill_strays` ends them by
  pid (their command lines name our state root and the id);
- `--network=sandbox` fails on this kernel: with a network, runsc runs with `--network=host` in
  the namespace the config names (policy stays in the host's nftables); without, `--network=none`;
- a host `pids.max` panics the whole sandbox: the config carries no pids limit (see gvisor_host);
- `--overlay2=none --file-access=shared`: rootfs writes land as real files in the host overlay's
  upper dir, coherent with the host, so snapshots copy them as for runc;
- no `--oci-seccomp`: with it, threads fail inside (glibc's clone3 -> clone fallback breaks under
  gVisor's emulation of the filter); the system calls runc's filter denies are served by gVisor's
  own kernel, never the host's; `--net-raw`: CAP_NET_RAW as under runc (ping), in the sandbox's
  own namespace.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal as _signal
from pathlib import Path

from shoal.server.host.base import ContainerState, RuntimeError_
from shoal.server.host.runc import CGROUP_PARENT, _bounded, remove_cgroups, run_cli

BINARY = os.environ.get("SHOAL_RUNSC", "runsc")
CALL_TIMEOUT = 30.0
START_TIMEOUT = 60.0
CHECKPOINT_TIMEOUT = 120.0  # a sandbox with GiBs of memory takes seconds to write out


def installed(binary: str = BINARY) -> str | None:
    """None when runsc can be used, else why not (for a clear error at create)."""
    import shutil
    import subprocess

    path = shutil.which(binary)
    if path is None:
        return ("gVisor's runsc is not installed on this server (install it with "
                "scripts/install.sh)")
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True,
                             timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"runsc does not run: {e}"
    if "20221219" in out:
        return ("runsc 20221219 (Debian 12's own) is broken on this kernel; install "
                "0.0~20240729 from bookworm-backports (scripts/install.sh)")
    return None


class RunscRuntime:
    name = "gvisor"

    def __init__(self, state_root: Path, binary: str = BINARY):
        self.root = state_root
        self.binary = binary
        self.root.mkdir(parents=True, exist_ok=True)

    def _cmd(self, *args: str, network: str = "none", flags: tuple[str, ...] = ()) -> list[str]:
        return [self.binary, "--root", str(self.root), "--platform=systrap",
                f"--network={network}", "--overlay2=none", "--file-access=shared",
                "--host-uds=all", "--net-raw", *flags, *args]

    async def _run(self, *args: str, check: bool = True, timeout: float = CALL_TIMEOUT) -> str:
        return await run_cli(self._cmd(*args), f"runsc {args[0]}", check, timeout, owned=OWNED)

    async def start(self, config: dict, container_id: str, bundle: Path, network: bool,
                    stdin: int, stdout: int, stderr: int, flags: tuple[str, ...] = ()) -> int:
        """`runsc run --detach` (with extra global `flags`); returns the pid of the sandbox
        process (gVisor's kernel), whose exit status is the container's. On failure, whatever it
        left is killed."""
        bundle.mkdir(parents=True, exist_ok=True)
        (bundle / "config.json").write_text(json.dumps(config))
        pid_file = bundle / "init.pid"
        proc = await _exec(
            *self._cmd("run", "--detach", "--bundle", str(bundle), "--pid-file", str(pid_file),
                       container_id, network="host" if network else "none", flags=flags),
            stdin=stdin, stdout=stdout, stderr=stderr)
        try:
            rc = await _waited(proc, proc.wait(), START_TIMEOUT, "runsc run")
        except RuntimeError_:
            self.kill_strays(container_id)
            raise
        if rc != 0:
            self.kill_strays(container_id)
            raise RuntimeError_(f"runsc run exited with {rc}")
        return int(pid_file.read_text())

    async def kill(self, container_id: str, signal: int = _signal.SIGKILL) -> None:
        await self._run("kill", "--all", container_id, str(int(signal)), check=False)

    async def signal_init(self, container_id: str, signo: int) -> None:
        """Send `signo` to the container's init (the agent) only."""
        await self._run("kill", container_id, str(int(signo)))

    async def checkpoint(self, container_id: str, image_path: Path) -> None:
        """Save the sandbox's state (processes, memory, gVisor's own tmpfs mounts such as /tmp)
        into `image_path`; `--leave-running`: the sandbox goes on. Uncompressed: the fastest
        to write and to restore (tens of MB for an idle Python)."""
        image_path.mkdir(parents=True, exist_ok=True)
        await self._run("checkpoint", "--leave-running", "--compression=none",
                        "--image-path", str(image_path), container_id,
                        timeout=CHECKPOINT_TIMEOUT)

    async def restore(self, config: dict, container_id: str, bundle: Path, image_path: Path,
                      stdin: int, stdout: int, stderr: int) -> int:
        """`runsc restore --detach` of a checkpoint into a new container `container_id` (its
        own bundle, cgroups and stdio); returns the sandbox process's pid, as `start`. The
        network is gVisor's loopback only: a checkpoint holds no host-network sockets."""
        bundle.mkdir(parents=True, exist_ok=True)
        (bundle / "config.json").write_text(json.dumps(config))
        pid_file = bundle / "init.pid"
        proc = await _exec(
            *self._cmd("restore", "--detach", "--image-path", str(image_path), "--bundle",
                       str(bundle), "--pid-file", str(pid_file), container_id),
            stdin=stdin, stdout=stdout, stderr=stderr)
        try:
            rc = await _waited(proc, proc.wait(), START_TIMEOUT, "runsc restore")
        except RuntimeError_:
            self.kill_strays(container_id)
            raise
        if rc != 0:
            self.kill_strays(container_id)
            raise RuntimeError_(f"runsc restore exited with {rc}")
        return int(pid_file.read_text())

    async def pause(self, container_id: str) -> None:
        await self._run("pause", container_id)

    async def resume(self, container_id: str) -> None:
        await self._run("resume", container_id)

    async def delete(self, container_id: str) -> None:
        """`delete --force`, checked: it exits 0 even for an unknown id, so the state is read
        again afterwards; what is still there is ended by pid."""
        await self._run("delete", "--force", container_id, check=False)
        if await self.state(container_id) is not None:
            self.kill_strays(container_id)
            await self._run("delete", "--force", container_id, check=False)
            if await self.state(container_id) is not None:
                raise RuntimeError_(f"runsc delete --force {container_id} left the container")
        self.kill_strays(container_id)
        await remove_cgroups(container_id)

    async def state(self, container_id: str) -> ContainerState | None:
        proc = await _exec(
            *self._cmd("state", container_id), stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL)
        out, _ = await _waited(proc, proc.communicate(), CALL_TIMEOUT, "runsc state")
        if proc.returncode != 0:
            return None
        data = json.loads(out)
        if data.get("id") != container_id:  # a prefix match: not ours
            return None
        return ContainerState(data["id"], data["status"], int(data.get("pid") or 0))

    async def list(self) -> list[ContainerState]:
        out = await self._run("list", "--format", "json", check=False)
        items = json.loads(out or "null") or []
        return [ContainerState(i["id"], i["status"], int(i.get("pid") or 0)) for i in items]

    def stray_pids(self, container_id: str | None = None) -> list[int]:
        """Host processes of runsc (sandbox, gofer) started with our state root — of one
        container, or of all."""
        root = str(self.root).encode()
        found = []
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            try:
                with open(f"/proc/{entry.name}/cmdline", "rb") as f:
                    argv = f.read().split(b"\0")
            except OSError:
                continue
            if not argv or not argv[0].endswith(b"runsc") and b"runsc" not in argv[0]:
                continue
            if root not in argv and b"--root=" + root not in argv:
                continue
            if container_id is not None and container_id.encode() not in argv:
                continue
            found.append(int(entry.name))
        return found

    def kill_strays(self, container_id: str) -> None:
        for pid in self.stray_pids(container_id):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, _signal.SIGKILL)


__all__ = ["RunscRuntime", "installed", "CGROUP_PARENT"]


# Pids of runsc commands that asyncio waits for. The server reaps runsc's zombie helpers itself
# (it is a child subreaper); it must never reap one of these, or asyncio reports exit code 255.
OWNED: set[int] = set()


async def _exec(*argv, **kw) -> asyncio.subprocess.Process:
    proc = await asyncio.create_subprocess_exec(*argv, **kw)
    OWNED.add(proc.pid)
    return proc


async def _waited(proc: asyncio.subprocess.Process, aw, timeout: float, what: str):
    try:
        return await _bounded(proc, aw, timeout, what)
    finally:
        OWNED.discard(proc.pid)
