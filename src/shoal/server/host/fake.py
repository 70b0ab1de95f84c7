"""An in-memory `SandboxHost`, for unit tests of the control plane: no containers, no agent.

Sandboxes are records; a command is looked up in `commands` (argv[0] -> a function of the argv
returning (stdout, stderr, exit code)) or, when absent, "runs" until signalled. Files are a dict
of path -> bytes per sandbox. Tests drive exits with `exit(sandbox_id, code)` and inspect `calls`.
"""

from __future__ import annotations

import asyncio
import errno
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

from shoal.server.host.base import (ExecSpec, HostError, HostEvent, SandboxGone, SandboxSpec,
                                    SandboxStats)


@dataclass
class _Exec:
    spec: ExecSpec
    out: dict[str, bytearray] = field(default_factory=lambda: {"stdout": bytearray(),
                                                               "stderr": bytearray()})
    ended: asyncio.Event = field(default_factory=asyncio.Event)  # exited and output closed
    exited: asyncio.Event = field(default_factory=asyncio.Event)  # the process alone
    code: int | None = None
    stdin: bytearray = field(default_factory=bytearray)

    def end(self) -> None:
        self.exited.set()
        self.ended.set()


@dataclass
class _FakeSandbox:
    spec: SandboxSpec
    running: bool = True
    execs: dict[str, _Exec] = field(default_factory=dict)
    files: dict[str, bytes] = field(default_factory=dict)
    stdin: bytearray = field(default_factory=bytearray)


def _echo(argv: list[str]) -> tuple[bytes, bytes, int]:
    return (" ".join(argv[1:]) + "\n").encode(), b"", 0


def _fail(argv: list[str]) -> tuple[bytes, bytes, int]:
    return b"", b"failed\n", int(argv[1]) if len(argv) > 1 else 1


class FakeHost:
    name = "fake"
    has_network = True  # accepts any policy; no packets move

    def __init__(self) -> None:
        self.boxes: dict[str, _FakeSandbox] = {}
        self.logs: set[str] = set()
        self.calls: list[tuple] = []
        self.fail_create: Exception | None = None
        self.create_seconds = 0.0  # how long a create takes
        self.creates_cut = 0  # creates cancelled before they finished (a runtime left half done)
        self.commands: dict[str, Callable[[list[str]], tuple[bytes, bytes, int]]] = {
            "echo": _echo, "fail": _fail, "true": lambda a: (b"", b"", 0)}
        self._events: asyncio.Queue[HostEvent] = asyncio.Queue()
        self.open_ports: set[int] = set()
        self.saved: dict[str, dict[str, bytes]] = {}  # snapshot dir -> files

    def _box(self, sandbox_id: str) -> _FakeSandbox:
        box = self.boxes.get(sandbox_id)
        if box is None or not box.running:
            raise SandboxGone(sandbox_id)
        return box

    # --- test controls
    def exit(self, sandbox_id: str, code: int | None, oom: bool = False) -> None:
        box = self.boxes[sandbox_id]
        box.running = False
        for ex in box.execs.values():
            if not ex.ended.is_set():
                ex.code = 137 if ex.code is None else ex.code
                ex.end()
        self._events.put_nowait(HostEvent(sandbox_id, "exited", code, oom))

    def exit_exec(self, sandbox_id: str, exec_id: str, code: int, output_open: bool) -> None:
        """The command's process exits with `code`; with `output_open`, a process it left in
        the background still holds its output (until `end_exec_output`)."""
        ex = self.boxes[sandbox_id].execs[exec_id]
        ex.code = code
        ex.exited.set()
        if not output_open:
            ex.end()

    def end_exec_output(self, sandbox_id: str, exec_id: str) -> None:
        self.boxes[sandbox_id].execs[exec_id].end()

    # --- life
    async def create(self, spec: SandboxSpec) -> None:
        self.calls.append(("create", spec.id))
        if self.fail_create is not None:
            raise self.fail_create
        if self.create_seconds:
            try:
                await asyncio.sleep(self.create_seconds)
            except asyncio.CancelledError:
                self.creates_cut += 1
                raise
        self.boxes[spec.id] = _FakeSandbox(spec)
        self.logs.add(spec.id)

    async def adopt(self, sandbox_id: str) -> bool:
        box = self.boxes.get(sandbox_id)
        return box is not None and box.running

    async def kill(self, sandbox_id: str) -> None:
        self.calls.append(("kill", sandbox_id))
        box = self.boxes.get(sandbox_id)
        if box is not None and box.running:
            self.exit(sandbox_id, 137)

    async def destroy(self, sandbox_id: str) -> None:
        self.calls.append(("destroy", sandbox_id))
        self.boxes.pop(sandbox_id, None)

    async def events(self) -> AsyncIterator[HostEvent]:
        while True:
            yield await self._events.get()

    async def sandboxes(self) -> set[str]:
        return set(self.boxes)

    async def sandbox_logs(self) -> set[str]:
        return set(self.logs)

    async def forget(self, sandbox_id: str) -> None:
        self.logs.discard(sandbox_id)

    async def upkeep(self) -> None:
        pass

    async def settle(self, live: set[str]) -> None:
        pass

    async def tunnels(self, sandbox_id: str) -> dict:
        self._box(sandbox_id)
        return {}

    async def close(self) -> None:
        pass

    # --- stdio
    async def stats(self, sandbox_id: str) -> SandboxStats:
        box = self._box(sandbox_id)
        running = sum(1 for e in box.execs.values() if e.code is None)
        disk = sum(len(v) for v in box.files.values())
        return SandboxStats(cpu_usec=1000 * len(box.execs), memory_bytes=(1 + running) << 20,
                            memory_limit=box.spec.limits.memory_mib << 20, pids=1 + running,
                            disk_bytes=disk)

    async def write_stdin(self, sandbox_id: str, data: bytes, eof: bool) -> None:
        self._box(sandbox_id).stdin += data

    async def resize_pty(self, sandbox_id: str, rows: int, cols: int) -> None:
        box = self._box(sandbox_id)
        if box.spec.pty is None:
            raise OSError(errno.EINVAL, "the entry-point has no pty")
        box.spec.pty = (rows, cols)
        self.calls.append(("resize_pty", sandbox_id, rows, cols))

    async def read_log(self, sandbox_id, stream, offset, finished) -> AsyncIterator[bytes]:
        await finished.wait()
        yield b""

    # --- commands
    async def exec(self, sandbox_id: str, spec: ExecSpec) -> None:
        box = self._box(sandbox_id)
        self.calls.append(("exec", sandbox_id, spec.argv))
        if spec.exec_id in box.execs:  # as the agent: one session per id
            raise FileExistsError(f"exec id {spec.exec_id} is in use")
        ex = box.execs[spec.exec_id] = _Exec(spec)
        fn = self.commands.get(spec.argv[0])
        if fn is not None:
            out, err, code = fn(spec.argv)
            ex.out["stdout"] += out
            ex.out["stdout" if spec.stderr == "stdout" else "stderr"] += err
            ex.code = code
            ex.end()
        elif spec.timeout is not None:
            async def expire() -> None:
                await asyncio.sleep(spec.timeout)
                if ex.code is None:
                    ex.code = 124
                    ex.end()
            asyncio.get_running_loop().create_task(expire())

    def _exec(self, sandbox_id: str, exec_id: str) -> _Exec:
        ex = self._box(sandbox_id).execs.get(exec_id)
        if ex is None:
            raise ProcessLookupError(errno.ESRCH, f"no exec {exec_id}")
        return ex

    async def exec_read(self, sandbox_id, exec_id, stream, offset) -> tuple[bytes, bool]:
        ex = self._exec(sandbox_id, exec_id)
        await ex.ended.wait()
        data = bytes(ex.out[stream][offset:])
        return data, not data

    async def exec_wait(self, sandbox_id, exec_id) -> tuple[int, bool]:
        ex = self._exec(sandbox_id, exec_id)
        await ex.ended.wait()
        return ex.code, ex.code == 124

    async def exec_exit(self, sandbox_id, exec_id) -> tuple[int, bool]:
        ex = self._exec(sandbox_id, exec_id)
        await ex.exited.wait()
        return ex.code, ex.code == 124

    async def exec_stdin(self, sandbox_id, exec_id, offset, data, eof) -> int:
        ex = self._exec(sandbox_id, exec_id)
        if offset < len(ex.stdin):
            data = data[len(ex.stdin) - offset:]
        ex.stdin += data
        return len(ex.stdin)

    async def exec_signal(self, sandbox_id, exec_id, signo) -> None:
        ex = self._exec(sandbox_id, exec_id)
        ex.code = 128 + signo
        ex.end()

    async def exec_resize(self, sandbox_id, exec_id, rows, cols) -> None:
        self._exec(sandbox_id, exec_id)

    async def exec_forget(self, sandbox_id, exec_id) -> None:
        self._box(sandbox_id).execs.pop(exec_id, None)

    # --- files
    async def stat(self, sandbox_id: str, path: str) -> dict:
        data = self._box(sandbox_id).files.get(path)
        if data is None:
            raise FileNotFoundError(errno.ENOENT, f"No such file or directory: {path!r}")
        return {"path": path, "type": "FILE", "size": len(data)}

    async def listdir(self, sandbox_id: str, path: str, offset: int = 0,
                      limit: int | None = None) -> list[dict]:
        prefix = path.rstrip("/") + "/"
        found = [{"path": p, "type": "FILE", "size": len(d)}
                 for p, d in sorted(self._box(sandbox_id).files.items()) if p.startswith(prefix)]
        return found[offset:None if limit is None else offset + limit]

    async def read_file(self, sandbox_id, path, limit):
        data = self._box(sandbox_id).files.get(path)
        if data is None:
            raise FileNotFoundError(errno.ENOENT, f"No such file or directory: {path!r}")

        async def chunks():
            yield data
        return len(data), chunks()

    async def write_file(self, sandbox_id, path, chunks, parents) -> int:
        box = self._box(sandbox_id)
        data = b"".join([c async for c in chunks])
        box.files[path] = data
        return len(data)

    async def mkdir(self, sandbox_id, path, parents, exist_ok) -> None:
        self._box(sandbox_id)

    async def remove(self, sandbox_id, path, recursive) -> None:
        if self._box(sandbox_id).files.pop(path, None) is None:
            raise FileNotFoundError(errno.ENOENT, f"No such file or directory: {path!r}")

    async def rename(self, sandbox_id, src, dst, overwrite) -> None:
        files = self._box(sandbox_id).files
        if dst in files and not overwrite:
            raise FileExistsError(errno.EEXIST, f"File exists: {dst!r}")
        files[dst] = files.pop(src)

    async def watch(self, sandbox_id, path, recursive, timeout, finished):
        self._box(sandbox_id)

        async def events():
            return
            yield
        return events()

    async def handle_open(self, sandbox_id, path, mode) -> str:
        raise HostError("the fake host has no file handles")

    handle_read = handle_write = handle_seek = handle_flush = handle_close = handle_open

    # --- probes and snapshots
    async def probe_tcp(self, sandbox_id: str, port: int) -> bool:
        self._box(sandbox_id)
        return port in self.open_ports

    async def export_changes(self, sandbox_id: str, dest: Path) -> None:
        for path, data in self._box(sandbox_id).files.items():
            target = dest / path.lstrip("/")
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)

    # --- memory snapshots: the files and running commands' output, copied (no processes)
    async def snapshot_memory(self, sandbox_id: str, dest: Path) -> None:
        self.calls.append(("snapshot_memory", sandbox_id))
        box = self._box(sandbox_id)
        dest.mkdir(parents=True)
        (dest / "fake").write_text(sandbox_id)
        self.saved[str(dest)] = dict(box.files)

    async def create_from_snapshot(self, spec: SandboxSpec, snapshot: Path) -> None:
        self.calls.append(("create_from_snapshot", spec.id))
        if self.fail_create is not None:
            raise self.fail_create
        files = self.saved.get(str(snapshot))
        if files is None or not (snapshot / "fake").exists():
            raise HostError(f"no snapshot at {snapshot}")
        self.boxes[spec.id] = _FakeSandbox(spec, files=dict(files))
        self.logs.add(spec.id)
