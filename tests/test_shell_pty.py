"""Pseudo-terminals end to end: the SDK's exec(pty=True) and resize, Sandbox.create(pty=True) (the
entrypoint on a terminal, under runc and gVisor), and `shoal shell` driven in a real terminal
(tmux): prompt, width, SIGWINCH, Ctrl-C to the sandbox, the terminal restored."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import time
import uuid

import pytest
from conftest import shoal_cli

import shoal


def test_exec_pty_size_and_resize(sandbox):
    p = sandbox.exec("sh", "-c", "stty size; read x; stty size; test -t 0 && echo tty",
                     pty=True, pty_info=(33, 111))
    first = _until(p.stdout, "33 111")  # before the resize: else the first size is the new one
    p.resize(40, 100)
    p.stdin.write("\n")
    p.stdin.drain()
    rest = p.stdout.read()
    out = first + rest
    assert p.wait() == 0
    assert "33 111" in out and "40 100" in out and "tty" in out


def test_exec_pty_merges_stderr(sandbox):
    p = sandbox.exec("sh", "-c", "echo to-err >&2", pty=True)
    assert "to-err" in p.stdout.read()
    assert p.stderr.read() == ""
    assert p.wait() == 0


def test_pty_argument_errors(sandbox, app):
    with pytest.raises(shoal.exception.InvalidError, match="pty_info"):
        sandbox.exec("true", pty=True, pty_info=(0, 80))
    with pytest.raises(shoal.exception.InvalidError, match="pty_info"):
        shoal.Sandbox.create("true", app=app, pty=True, pty_info=(24, 0))
    with pytest.raises(shoal.exception.InvalidError, match="no terminal to resize"):
        sandbox.resize_pty(30, 100)  # created without pty=True
    with pytest.raises(shoal.exception.InvalidError, match="between 1 and 1000"):
        sandbox.resize_pty(0, 10)
    p = sandbox.exec("true")
    p.wait()
    with pytest.raises(shoal.exception.InvalidError):
        p.resize(0, 10)


# --- Sandbox.create(pty=True): the entrypoint on a terminal --------------------------------------

RUNTIMES = ["runc", "gvisor"]


def _until(stream, text: str) -> str:
    """Lines of `stream` up to and including the first that contains `text`."""
    seen = ""
    for line in stream:
        seen += line
        if text in line:
            return seen
    raise AssertionError(f"{text!r} never came; the stream ended after {seen!r}")


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_create_pty_entrypoint_is_on_a_terminal(app, runtime):
    # isatty on all three; a session leader whose terminal's foreground group is its own (so
    # the pty is its controlling terminal); TERM; the size asked for; then a typed line.
    script = "\n".join([
        "import os, sys",
        "print('ttys', [os.isatty(fd) for fd in (0, 1, 2)])",
        "print('leader', os.getsid(0) == os.getpid(), os.tcgetpgrp(0) == os.getpgrp())",
        "print('term', os.environ.get('TERM'), 'size', tuple(os.get_terminal_size(0)))",
        "print('err-line', file=sys.stderr, flush=True)",
        "print('ready', flush=True)",
        "print('got:' + input())",
        "sys.exit(7)"])
    sb = shoal.Sandbox.create("python3", "-c", script, app=app, pty=True, pty_info=(33, 111),
                              experimental_options={"runtime": runtime}, timeout=60)
    try:
        head = _until(sb.stdout, "ready")
        sb.stdin.write("hello pty\n")
        sb.stdin.drain()
        rest = _until(sb.stdout, "got:")
        sb.wait(raise_on_termination=False)
    finally:
        sb.terminate()
    assert "ttys [True, True, True]" in head and "leader True True" in head
    assert "term xterm size (111, 33)" in head  # (columns, lines)
    assert "err-line\r\n" in head  # stderr is the terminal too: merged, with its line ends
    assert "hello pty\r\n" in rest  # the terminal echoes what is typed
    assert "got:hello pty\r\n" in rest
    assert sb.returncode == 7
    assert sb.stderr.read() == ""
    logs = shoal_cli("sandbox", "logs", sb.object_id)  # the log files have it all too
    assert "got:hello pty" in logs.stdout and "err-line" in logs.stdout and logs.stderr == ""


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_create_pty_ctrl_c_interrupts_the_program(app, runtime):
    sb = shoal.Sandbox.create("sh", "-c", "echo ready; sleep 60; echo not-interrupted",
                              app=app, pty=True, experimental_options={"runtime": runtime},
                              timeout=60)
    try:
        _until(sb.stdout, "ready")
        started = time.monotonic()
        sb.stdin.write(b"\x03")  # Ctrl-C, as typed: the line discipline sends SIGINT
        sb.stdin.drain()
        sb.wait(raise_on_termination=False)
    finally:
        sb.terminate()
    assert sb.returncode == 130 and time.monotonic() - started < 20
    assert "not-interrupted" not in sb.stdout.read()


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_create_pty_default_size_and_resize(app, runtime, monkeypatch):
    # Without pty_info the size is this terminal's (COLUMNS/LINES when set), as Modal's.
    monkeypatch.setenv("COLUMNS", "100")
    monkeypatch.setenv("LINES", "30")
    sb = shoal.Sandbox.create("sh", "-c", "stty size; echo ready; read x; stty size; "
                              "read y; echo bye",
                              app=app, pty=True, experimental_options={"runtime": runtime},
                              timeout=60)
    try:
        head = _until(sb.stdout, "ready")
        sb.resize_pty(40, 120)
        sb.stdin.write("\n")
        sb.stdin.drain()
        rest = _until(sb.stdout, "40 120")
        sb.stdin.write_eof()  # ^D: read gets end of file
        sb.stdin.drain()
        sb.wait(raise_on_termination=False)
    finally:
        sb.terminate()
    assert "30 100" in head and "40 120" in rest
    assert sb.returncode == 0 and "bye" in sb.stdout.read()


class Tmux:
    def __init__(self, cols: int = 90, rows: int = 30):
        self.name = f"shoal-{uuid.uuid4().hex[:8]}"
        self.cols, self.rows = cols, rows

    def run(self, *args: str, check: bool = True) -> str:
        return subprocess.run(["tmux", "-L", self.name, *args], capture_output=True, text=True,
                              check=check, timeout=30).stdout

    def start(self, command: str) -> None:
        self.run("new-session", "-d", "-x", str(self.cols), "-y", str(self.rows), "-s", "t",
                 "sh", "-c", command)
        self.run("set-option", "-t", "t", "remain-on-exit", "on")

    def screen(self) -> str:
        return self.run("capture-pane", "-p", "-t", "t", "-S", "-200")

    def keys(self, *keys: str) -> None:
        self.run("send-keys", "-t", "t", *keys)

    def wait_for(self, text: str, timeout: float = 20) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            s = self.screen()
            if text in s:
                return s
            time.sleep(0.1)
        raise AssertionError(f"{text!r} not on screen:\n{self.screen()}")

    def kill(self) -> None:
        self.run("kill-server", check=False)


@pytest.fixture
def tmux():
    t = Tmux()
    yield t
    t.kill()


def test_shell_in_a_real_terminal(sandbox, tmux, tmp_path):
    env = " ".join(f"{k}={shlex.quote(v)}" for k, v in os.environ.items()
                   if k.startswith("SHOAL_"))
    marker = tmp_path / "done"
    # After the shell: record the local terminal's modes, to check they were restored.
    tmux.start(f"env {env} TERM=xterm-256color {sys.executable} -m shoal shell "
               f"{sandbox.object_id}; echo \"exit=$?\" > {marker}.tmp; stty -a >> {marker}.tmp; "
               f"mv {marker}.tmp {marker}")
    tmux.wait_for("root@sandbox")  # bash's prompt, from /etc/bash.bashrc over a real pty
    tmux.keys("tput cols; echo W=$(tput cols)", "Enter")
    tmux.wait_for(f"W={tmux.cols}")
    tmux.run("resize-window", "-t", "t", "-x", "70", "-y", "20")
    time.sleep(0.5)
    tmux.keys("echo R=$(stty size)", "Enter")
    tmux.wait_for("R=20 70")
    tmux.keys("ls --color=always /; echo listed", "Enter")
    tmux.wait_for("\nlisted")
    screen = tmux.run("capture-pane", "-e", "-p", "-t", "t")
    assert "\x1b[" in screen  # colours reach the terminal
    tmux.keys("sleep 30; echo after-sleep=$?", "Enter")
    time.sleep(1)
    tmux.keys("C-c")
    tmux.wait_for("root@sandbox", timeout=5)
    tmux.keys("echo still-here", "Enter")
    tmux.wait_for("still-here")
    # Ctrl-C ended the sleep and the rest of its line with it, within a second, not 30.
    assert "^C" in tmux.screen() and not re.search(r"after-sleep=\d", tmux.screen())
    tmux.keys("exit 5", "Enter")
    deadline = time.monotonic() + 20
    while not marker.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    text = marker.read_text()
    assert text.startswith("exit=5")
    assert " icanon " in f" {text} " and " echo " in f" {text} "  # cooked mode again
    assert sandbox.poll() is None  # the sandbox keeps running


def test_exec_it_in_a_real_terminal(sandbox, tmux, tmp_path):
    """`shoal sandbox exec -it ID -- CMD`: the terminal's size, typed input, the exit code."""
    env = " ".join(f"{k}={shlex.quote(v)}" for k, v in os.environ.items()
                   if k.startswith("SHOAL_"))
    marker = tmp_path / "done"
    inner = shlex.quote('stty size; read x; echo "got-$x"; exit 3')
    tmux.start(f"env {env} TERM=xterm-256color {sys.executable} -m shoal sandbox exec -it "
               f"{sandbox.object_id} -- sh -c {inner}; echo \"exit=$?\" > {marker}.tmp; "
               f"mv {marker}.tmp {marker}")
    tmux.wait_for(f"{tmux.rows} {tmux.cols}")
    tmux.keys("typed-here", "Enter")
    tmux.wait_for("got-typed-here")
    deadline = time.monotonic() + 20
    while not marker.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert marker.read_text() == "exit=3\n"


def test_agent_pty_flag_and_resize_entry(tmp_path):
    """The agent run directly (no container): `--pty ROWS:COLS`, RESIZE_ENTRY, stdin typed on
    the terminal, EOF typed as ^D; RESIZE_ENTRY refused without a pty; a bad size refused."""
    import asyncio

    from shoal.server.agent import ensure_built
    from shoal.server.host.agent_client import connect

    agent = str(ensure_built())
    script = "stty size; echo ready; read x; stty size; cat; echo end"
    out = tmp_path / "out"
    with open(out, "wb") as f:
        proc = subprocess.Popen([agent, "--socket", str(tmp_path / "agent.sock"), "--pty", "5:50",
                                 "--", "sh", "-c", script], stdin=subprocess.PIPE, stdout=f)
    plain = subprocess.Popen([agent, "--socket", str(tmp_path / "plain.sock"), "--", "sleep",
                              "30"], stdin=subprocess.DEVNULL)

    async def go():
        deadline = time.monotonic() + 10
        while b"ready" not in out.read_bytes():
            assert time.monotonic() < deadline and proc.poll() is None, out.read_bytes()
            await asyncio.sleep(0.02)
        c = await connect(tmp_path, timeout=10)
        p = await connect(tmp_path, "plain.sock", timeout=10)
        try:
            await c.resize_entry(7, 70)
            with pytest.raises(OSError) as e:
                await p.resize_entry(7, 70)
            assert e.value.errno == 22  # EINVAL: no pty
        finally:
            await c.close()
            await p.close()

    try:
        asyncio.run(go())
        proc.stdin.write(b"\nline\n")
        proc.stdin.close()  # the host's EOF: ^D on the terminal ends cat
        assert proc.wait(timeout=10) == 0
    finally:
        for x in (proc, plain):
            x.kill()
            x.wait()
    text = out.read_bytes()  # what was typed is echoed as it arrives: order aside
    assert text.startswith(b"5 50\r\nready\r\n") and text.endswith(b"line\r\nend\r\n")
    assert b"7 70\r\n" in text and text.count(b"line\r\n") == 2  # the echo, and cat's copy
    bad = subprocess.run([agent, "--socket", str(tmp_path / "bad.sock"), "--pty", "0:80", "--",
                          "true"], capture_output=True, text=True)
    assert bad.returncode == 2 and "--pty ROWS:COLS" in bad.stderr
