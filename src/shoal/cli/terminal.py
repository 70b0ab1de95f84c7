"""Running a command in a sandbox from the terminal (`shoal sandbox exec`, `shoal shell`).

With a pty (-t), the local terminal is put in raw mode for the command's lifetime, so every key —
Ctrl-C included — goes to the process in the sandbox, whose terminal does the rest (echo, line
editing, signals); the local size is sent at start and on every SIGWINCH. The terminal's modes
are restored however the command ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import sys
import termios
import threading
import tty as ttylib


def terminal_size() -> tuple[int, int]:
    """(rows, cols) of the local terminal; $LINES/$COLUMNS or 24x80 without one."""
    for fd in (0, 1, 2):
        with contextlib.suppress(OSError):
            size = os.get_terminal_size(fd)
            return size.lines, size.columns
    cols, rows = shutil.get_terminal_size((80, 24))
    return rows, cols


async def _session(sandbox_id: str, argv: list[str], pty: bool, interactive: bool,
                   env: dict[str, str], resize_hook: list) -> int:
    from shoal._client import get_client
    from shoal.container_process import _ContainerProcess

    body = {"args": argv, "env": env, "workdir": None, "timeout": None, "stdout": "pipe",
            "stderr": "pipe"}
    if pty:
        body["pty_rows"], body["pty_cols"] = terminal_size()
    proc = await _ContainerProcess._start(sandbox_id, body, text=False)
    client = await get_client()
    loop = asyncio.get_running_loop()
    path = f"/execs/{proc.object_id}/stdin"

    async def resize() -> None:
        rows, cols = terminal_size()
        with contextlib.suppress(Exception):
            await client.call("POST", f"/execs/{proc.object_id}/resize",
                              json={"rows": rows, "cols": cols})

    if pty:
        resize_hook.append(lambda: asyncio.run_coroutine_threadsafe(resize(), loop))

    queue: asyncio.Queue[bytes | None] = asyncio.Queue()

    def read_stdin() -> None:  # a daemon thread: a blocked read must not keep us alive
        while True:
            try:
                data = os.read(0, 65536)
            except OSError:
                data = b""
            loop.call_soon_threadsafe(queue.put_nowait, data or None)
            if not data:
                return

    async def send_stdin() -> None:
        offset = 0
        while True:
            data = await queue.get()
            eof = data is None
            # Ctrl-D in a pty is a byte for the terminal in the sandbox, not the end of input.
            await client.call("POST", path, content=data or b"",
                              params={"offset": offset, "eof": "true" if eof else "false"})
            offset += len(data or b"")
            if eof:
                return

    if interactive:
        threading.Thread(target=read_stdin, name="shoal-stdin", daemon=True).start()
    elif not pty:
        queue.put_nowait(None)  # no input: the command sees the end of stdin at once
    sender = loop.create_task(send_stdin())

    async def pump(stream: str, fd: int) -> None:
        ch = proc._channels[stream]
        while data := await ch.get():
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]

    try:
        await asyncio.gather(pump("stdout", 1), pump("stderr", 2))
        return await proc.wait()
    finally:
        sender.cancel()
        with contextlib.suppress(BaseException):
            await sender


def run(sandbox_id: str, argv: list[str], pty: bool, interactive: bool) -> int:
    """Run `argv` in the sandbox attached to this terminal; returns its exit code."""
    from shoal._sync import run_blocking

    env = {}
    if pty:
        env["TERM"] = os.environ.get("TERM") or "xterm-256color"
    raw = pty and interactive and os.isatty(0)
    saved = termios.tcgetattr(0) if raw else None
    resize_hook: list = []
    old_winch = signal.signal(signal.SIGWINCH, lambda *_: [h() for h in resize_hook])

    def hangup(signo, frame):
        raise SystemExit(128 + signo)

    old_term = signal.signal(signal.SIGTERM, hangup)
    old_hup = signal.signal(signal.SIGHUP, hangup)
    try:
        if raw:
            ttylib.setraw(0, termios.TCSANOW)
        return run_blocking(_session(sandbox_id, argv, pty, interactive, env, resize_hook))
    finally:
        if saved is not None:
            termios.tcsetattr(0, termios.TCSADRAIN, saved)
        signal.signal(signal.SIGWINCH, old_winch)
        signal.signal(signal.SIGTERM, old_term)
        signal.signal(signal.SIGHUP, old_hup)
        sys.stdout.flush()
