"""runc, driven through its command line (the interface runc supports; it has no stable library API)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal as _signal
from pathlib import Path

from shoal.server.host.base import ContainerState, RuntimeError_
from shoal.server.host.oci import (USERNS_ROOTFS, ContainerSpec, build_config, host_nofile_cap,
                                   runc_netns)

CGROUP_PARENT = "shoal"
CALL_TIMEOUT = 30.0  # seconds for a runc command; a hung one is killed and reported
START_TIMEOUT = 60.0
CGROUP_ROOT = Path("/sys/fs/cgroup")


class RuncRuntime:
    name = "runc"

    def __init__(self, state_root: Path, binary: str = "runc"):
        self.root = state_root
        self.binary = binary
        self.root.mkdir(parents=True, exist_ok=True)

    def _cmd(self, *args: str) -> list[str]:
        return [self.binary, "--root", str(self.root), *args]

    async def _run(self, *args: str, check: bool = True, timeout: float = CALL_TIMEOUT) -> str:
        return await run_cli(self._cmd(*args), f"runc {args[0]}", check, timeout)

    async def start(self, spec: ContainerSpec, bundle: Path, stdin: int, stdout: int,
                    stderr: int) -> int:
        bundle.mkdir(parents=True, exist_ok=True)
        config = build_config(spec, f"/{CGROUP_PARENT}/{spec.id}")
        (bundle / "config.json").write_text(json.dumps(config))
        pid_file = bundle / "init.pid"
        launcher: list[str] = []
        if spec.userns is not None:  # see oci.USERNS_ROOTFS and oci.runc_netns
            # Network namespace, private mount namespace with the rootfs at USERNS_ROOTFS and
            # sysfs, RLIMIT_NOFILE: done by the static agent's host mode (agent/launch.c) and not
            # by a preexec_fn, which would make Python fork the whole server (~19 ms at 100 MB)
            # instead of a vfork (~1 ms).
            launcher = [str(Path(spec.tools_dir) / "agent"), "--host-launch",
                        runc_netns(spec) or "-", spec.rootfs, USERNS_ROOTFS,
                        str(host_nofile_cap(spec.limits.nofile)), "--"]
        # --detach: runc exits once the container runs, and the container keeps the stdio it was
        # given. Those must be files or pipes we do not wait on (a captured pipe hangs runc).
        proc = await asyncio.create_subprocess_exec(
            *launcher, *self._cmd("run", "--detach", "--bundle", str(bundle), "--pid-file",
                                  str(pid_file), spec.id),
            stdin=stdin, stdout=stdout, stderr=stderr)
        rc = await _bounded(proc, proc.wait(), START_TIMEOUT, "runc run")
        if rc != 0:
            raise RuntimeError_(f"runc run exited with {rc}")
        return int(pid_file.read_text())

    async def run(self, spec: ContainerSpec, bundle: Path, stdout: int,
                  stderr: int) -> asyncio.subprocess.Process:
        """Run a container in the foreground (image builds): runc stays its parent, relays its
        stdio, exits with its exit code, and deletes it afterwards."""
        bundle.mkdir(parents=True, exist_ok=True)
        config = build_config(spec, f"/{CGROUP_PARENT}/{spec.id}")
        (bundle / "config.json").write_text(json.dumps(config))
        return await asyncio.create_subprocess_exec(
            *self._cmd("run", "--bundle", str(bundle), spec.id),
            stdin=asyncio.subprocess.DEVNULL, stdout=stdout, stderr=stderr)

    async def kill(self, container_id: str, signal: int = _signal.SIGKILL) -> None:
        await self._run("kill", container_id, str(int(signal)), check=False)

    async def pause(self, container_id: str) -> None:
        await self._run("pause", container_id)

    async def resume(self, container_id: str) -> None:
        await self._run("resume", container_id)

    async def delete(self, container_id: str) -> None:
        await self._run("delete", "--force", container_id, check=False)
        await remove_cgroups(container_id)

    async def state(self, container_id: str) -> ContainerState | None:
        proc = await asyncio.create_subprocess_exec(
            *self._cmd("state", container_id), stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL)
        out, _ = await _bounded(proc, proc.communicate(), CALL_TIMEOUT, "runc state")
        if proc.returncode != 0:
            return None
        data = json.loads(out)
        return ContainerState(data["id"], data["status"], int(data.get("pid") or 0))

    async def list(self) -> list[ContainerState]:
        out = await self._run("list", "--format", "json", check=False)
        items = json.loads(out or "null") or []
        return [ContainerState(i["id"], i["status"], int(i.get("pid") or 0)) for i in items]


async def run_cli(argv: list[str], what: str, check: bool = True,
                  timeout: float = CALL_TIMEOUT, owned: set[int] | None = None) -> str:
    """Run a runtime's command to its end (bounded by `timeout`); its stdout. With `owned`, the
    pid is in that set while the command runs (see runsc.OWNED)."""
    proc = await asyncio.create_subprocess_exec(
        *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE)
    if owned is not None:
        owned.add(proc.pid)
    try:
        out, err = await _bounded(proc, proc.communicate(), timeout, what)
    finally:
        if owned is not None:
            owned.discard(proc.pid)
    if check and proc.returncode != 0:
        raise RuntimeError_(f"{what}: {err.decode(errors='replace').strip()}")
    return out.decode()


async def _bounded(proc: asyncio.subprocess.Process, aw, timeout: float, what: str):
    """Await `aw` (the process's completion); past `timeout`, kill the process and fail."""
    try:
        return await asyncio.wait_for(aw, timeout)
    except asyncio.TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        raise RuntimeError_(f"{what} did not finish within {timeout:.0f} s") from None


async def remove_cgroups(container_id: str, settle: float = 2.0) -> None:
    """Remove what the runtime may leave of a container's cgroups (after a crash, or a start cut
    short; `delete` removes them in the normal case). Processes still inside are killed first,
    and a cgroup is removable once they are gone: that takes a moment after SIGKILL (EBUSY
    until then), so removal is tried again for up to `settle` seconds."""
    if not CGROUP_ROOT.is_dir():
        return
    leaves = [c / CGROUP_PARENT / container_id for c in CGROUP_ROOT.iterdir()]
    leaves = [leaf for leaf in leaves if leaf.is_dir()]
    for leaf in leaves:
        try:
            for pid in (leaf / "cgroup.procs").read_text().split():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(pid), _signal.SIGKILL)
        except OSError:
            pass
    deadline = asyncio.get_running_loop().time() + settle
    while leaves:
        for leaf in list(leaves):
            try:
                leaf.rmdir()
            except FileNotFoundError:
                pass
            except OSError:
                continue  # (busy: its processes are still exiting)
            leaves.remove(leaf)
        if not leaves or asyncio.get_running_loop().time() > deadline:
            return
        await asyncio.sleep(0.01)


def remove_cgroup_parent() -> None:
    """Remove the empty `shoal` parent cgroups, so an idle machine carries nothing of ours."""
    if not CGROUP_ROOT.is_dir():
        return
    for controller in CGROUP_ROOT.iterdir():
        try:
            (controller / CGROUP_PARENT).rmdir()
        except OSError:
            pass  # absent, or still holds a sandbox of another server
