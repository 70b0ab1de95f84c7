"""The in-sandbox agent and its host client, end to end: the real static binary, real
processes, real files (the agent runs here as a plain subprocess, not in a container)."""

from __future__ import annotations

import asyncio
import errno
import functools
import json
import os
import random
import signal
import socket
import struct
import subprocess
import time
from pathlib import Path

import pytest

from shoal.server.agent import SOURCE_DIR, ensure_built, load_protocol
from shoal.server.host import agent_client
from shoal.server.host.agent_client import AgentConnectionError, OPEN_FLAGS, connect, encode_frame

ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C"}
LIMITS = load_protocol()["limits"]


def async_test(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        return asyncio.run(asyncio.wait_for(fn(*args, **kwargs), 60))
    return wrapper


def _children(pid: int) -> list[tuple[int, str]]:
    """(pid, state) of the processes whose parent is pid."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2:].split()
        if int(fields[1]) == pid:
            out.append((int(entry.name), fields[0]))
    return out


class Agent:
    """A shoal-agent subprocess listening in its own directory."""

    def __init__(self, directory: Path, entry: list[str] | None = None, log_limit: int | None = None,
                 compat: bool = False):
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.sock = directory / "agent.sock"
        self.stdout_path = directory / "agent.out"
        self.stderr_path = directory / "agent.err"
        args = [str(ensure_built()), "--socket", str(self.sock)]
        if log_limit is not None:
            args += ["--log-limit", str(log_limit)]
        if compat:
            args.append("--compat")
        if entry is not None:
            args += ["--", *entry]
        with open(self.stdout_path, "wb") as out, open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen(args, stdout=out, stderr=err, stdin=subprocess.DEVNULL)

    async def connect(self, timeout: float = 10.0) -> agent_client.AgentClient:
        return await connect(self.dir, timeout=timeout)

    def rss_kib(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise AssertionError("no VmRSS")

    def stop(self) -> None:
        # Exec sessions run in their own process groups: end them with the agent.
        for pid, _ in _children(self.proc.pid):
            try:
                os.killpg(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)


@pytest.fixture(scope="module")
def agent(tmp_path_factory):
    a = Agent(tmp_path_factory.mktemp("agent"))
    yield a
    a.stop()


@pytest.fixture
def fresh_agent(tmp_path):
    a = Agent(tmp_path / "fresh")
    yield a
    a.stop()


async def run(c, exec_id: str, argv: list[str], **kw) -> tuple[bytes, bytes, int]:
    """Runs argv to completion through the client: (stdout, stderr, code)."""
    await c.exec(exec_id, argv, kw.pop("env", ENV), **kw)
    outs = []
    for stream in ("stdout", "stderr"):
        data, off = b"", 0
        while True:
            chunk, eof = await c.read(exec_id, stream, off)
            data += chunk
            off += len(chunk)
            if eof:
                break
        outs.append(data)
    code, _ = await c.wait(exec_id)
    return outs[0], outs[1], code


# ---------------------------------------------------------------- contract


def test_protocol_header_is_generated_and_client_uses_json():
    import importlib.util

    spec = importlib.util.spec_from_file_location("gen_header", SOURCE_DIR / "gen_header.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    proto = json.loads((SOURCE_DIR / "protocol.json").read_text())
    assert (SOURCE_DIR / "protocol.h").read_text() == gen.render(proto)
    assert agent_client.TYPES == proto["types"]
    assert agent_client.TAGS == proto["tags"]
    assert agent_client.LIMITS == proto["limits"]
    assert agent_client.VERSION == proto["version"]
    assert agent_client.MAX_PAYLOAD == proto["frame"]["max_payload"]
    assert set(agent_client.TAG_TYPES) == set(proto["tags"])
    for enum, members in proto["enums"].items():
        assert agent_client.ENUMS[enum] == members


def test_ensure_built_is_cached():
    ensure_built()
    t = time.monotonic()
    path = ensure_built()
    assert path.is_file() and os.access(path, os.X_OK)
    assert time.monotonic() - t < 0.5
    out = subprocess.run(["file", str(path)], capture_output=True, text=True).stdout
    assert "statically linked" in out or "static-pie" in out or not out


# ---------------------------------------------------------------- handshake


@async_test
async def test_handshake(agent):
    c = await agent.connect()
    assert c.version == 1 and c.pid == agent.proc.pid and c.agent.startswith("shoal-agent")
    await c.close()
    assert c.closed.done()


def _raw(agent: Agent) -> socket.socket:
    deadline = time.monotonic() + 5
    while not agent.sock.exists() and time.monotonic() < deadline:
        time.sleep(0.005)  # a fresh agent is still starting
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(5)
    s.connect(str(agent.sock))
    return s


def _recv_frame(s: socket.socket) -> tuple[int, int, dict]:
    head = b""
    while len(head) < 4:
        chunk = s.recv(4 - len(head))
        if not chunk:
            raise EOFError
        head += chunk
    (n,) = struct.unpack("<I", head)
    body = b""
    while len(body) < n:
        chunk = s.recv(n - len(body))
        if not chunk:
            raise EOFError
        body += chunk
    return body[0], int.from_bytes(body[1:5], "little"), agent_client._decode_fields(body[5:])


def _assert_closed(s: socket.socket) -> None:
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            if s.recv(65536) == b"":
                return
        except ConnectionResetError:
            return


def test_agent_refuses_other_version(agent):
    s = _raw(agent)
    s.sendall(encode_frame("HELLO", 7, [("VERSION", 99)]))
    kind, req_id, fields = _recv_frame(s)
    assert (kind, req_id, fields["ERRNO"]) == (3, 7, errno.EPROTO)
    _assert_closed(s)


@async_test
async def test_client_refuses_other_version(tmp_path):
    async def fake_agent(reader, writer):
        head = await reader.readexactly(4)
        body = await reader.readexactly(struct.unpack("<I", head)[0])
        req_id = int.from_bytes(body[1:5], "little")
        writer.write(encode_frame("HELLO", req_id, [("VERSION", 2), ("AGENT", "x"), ("PID", 1)]))
        await writer.drain()

    server = await asyncio.start_unix_server(fake_agent, path=str(tmp_path / "agent.sock"))
    async with server:
        with pytest.raises(AgentConnectionError, match="version"):
            await connect(tmp_path, timeout=2)


@async_test
async def test_connect_refuses_planted_symlink(agent, tmp_path):
    # The sandbox replaced the socket with a symlink to a socket it likes better: never follow.
    (tmp_path / "agent.sock").symlink_to(agent.sock)
    t = time.monotonic()
    with pytest.raises(AgentConnectionError):
        await connect(tmp_path, timeout=0.3)
    assert time.monotonic() - t < 2


@async_test
async def test_connect_waits_for_the_socket(tmp_path):
    async def start_later():
        await asyncio.sleep(0.2)
        return Agent(tmp_path)

    task = asyncio.ensure_future(start_later())
    c = await connect(tmp_path, timeout=5)
    a = await task
    try:
        assert c.pid == a.proc.pid
        await c.close()
    finally:
        a.stop()


# ---------------------------------------------------------------- exec


@async_test
async def test_exec_streams(agent):
    c = await agent.connect()
    assert await run(c, "echo", ["echo", "hi"]) == (b"hi\n", b"", 0)
    assert await run(c, "both", ["sh", "-c", "echo out; echo err >&2"]) == (b"out\n", b"err\n", 0)
    out, err, code = await run(c, "merged", ["sh", "-c", "echo out; echo err >&2"], stderr="stdout")
    assert (out, err, code) == (b"out\nerr\n", b"", 0)
    out, _, _ = await run(c, "fds", ["ls", "/proc/self/fd"])
    assert out.split() == [b"0", b"1", b"2", b"3"]  # no descriptor of the agent leaks
    assert await run(c, "null", ["sh", "-c", "echo out; echo err >&2; cat"], stdout="null",
                     stderr="null", stdin="null") == (b"", b"", 0)
    await c.close()


@async_test
async def test_exit_codes_and_shell_messages(agent, tmp_path):
    c = await agent.connect()
    assert (await run(c, "x3", ["sh", "-c", "exit 3"]))[2] == 3
    assert (await run(c, "kill9", ["sh", "-c", "kill -9 $$"]))[2] == 137
    assert await run(c, "nf", ["no-such-command"]) == (b"", b"no-such-command: command not found\n", 127)
    assert await run(c, "np", ["/no/such/file"]) == (b"", b"/no/such/file: No such file or directory\n", 127)
    plain = tmp_path / "plain"
    plain.write_text("data")
    assert await run(c, "nx", [str(plain)]) == (b"", f"{plain}: Permission denied\n".encode(), 126)
    assert await run(c, "dir", [str(tmp_path)]) == (b"", f"{tmp_path}: Permission denied\n".encode(), 126)
    out, err, code = await run(c, "nf-merged", ["no-such-command"], stderr="stdout")
    assert (out, code) == (b"no-such-command: command not found\n", 127)
    out, err, code = await run(c, "cwd", ["pwd"], cwd="/no/such/dir")
    assert code == 1 and err == b'shoal: cannot change to directory "/no/such/dir": No such file or directory\n'
    assert (await run(c, "cwd2", ["pwd"], cwd=str(tmp_path)))[0] == f"{tmp_path}\n".encode()
    out, _, _ = await run(c, "env", ["/usr/bin/env"], env={"A": "1", "B": "x=y", "PATH": "/bin"})
    assert out == b"A=1\nB=x=y\nPATH=/bin\n"
    out, _, code = await run(c, "uid", ["sh", "-c", "id -u; id -g; id -G"], uid=65534, gid=65534)
    assert (out, code) == (b"65534\n65534\n65534\n", 0)  # supplementary groups cleared
    with pytest.raises(FileExistsError):
        await c.exec("uid", ["true"], ENV)
    await c.close()


@async_test
async def test_timeout_kills_process_group(agent):
    c = await agent.connect()
    t = time.monotonic()
    await c.exec("to", ["sh", "-c", "sleep 30 & sleep 30"], ENV, timeout_ms=200)
    assert await c.wait("to") == (124, True)
    assert time.monotonic() - t < 3
    await c.close()


@async_test
async def test_stdin_offsets_are_idempotent(agent):
    c = await agent.connect()
    await c.exec("cat", ["cat"], ENV)
    assert await c.stdin("cat", 0, b"hello ") == 6
    assert await c.stdin("cat", 0, b"hello ") == 6  # a retry after a lost answer
    assert await c.stdin("cat", 3, b"lo wor") == 9  # overlapping: only the new bytes
    with pytest.raises(OSError) as e:
        await c.stdin("cat", 20, b"gap")
    assert e.value.errno == errno.EINVAL
    assert await c.stdin("cat", 9, b"ld", eof=True) == 11
    assert await c.stdin("cat", 9, b"ld", eof=True) == 11  # repeated EOF write: fine
    with pytest.raises(OSError) as e:
        await c.stdin("cat", 11, b"more")
    assert e.value.errno == errno.EINVAL
    data, eof = await c.read("cat", "stdout", 0)
    while not eof:
        more, eof = await c.read("cat", "stdout", len(data))
        data += more
    assert data == b"hello world"
    assert await c.wait("cat") == (0, False)
    # Big stdin: more than stdin_buffer and max_data, through a process that reads it all.
    await c.exec("wc", ["wc", "-c"], ENV)
    blob = os.urandom(3 * LIMITS["max_data"] + 5)
    assert await c.stdin("wc", 0, blob, eof=True) == len(blob)
    assert (await c.read("wc", "stdout", 0))[0].strip() == str(len(blob)).encode()
    await c.close()


@async_test
async def test_read_offsets_survive_reconnect(agent):
    c = await agent.connect()
    await c.exec("seq", ["seq", "1", "400000"], ENV)
    expected = subprocess.run(["seq", "1", "400000"], capture_output=True).stdout
    assert len(expected) > LIMITS["stream_retain"] + LIMITS["max_data"]
    first, _ = await c.read("seq", "stdout", 0, max=1000)
    assert first == expected[:len(first)]
    await c.close()  # the server restarts: the session lives on in the agent
    c = await agent.connect()
    again, _ = await c.read("seq", "stdout", 0, max=1000)  # re-read what was in flight
    assert again == first
    data = b""
    while True:
        chunk, eof = await c.read("seq", "stdout", len(data))
        data += chunk
        if eof:
            break
    assert data == expected
    with pytest.raises(OSError) as e:
        await c.read("seq", "stdout", 0)
    assert e.value.errno == errno.ERANGE
    # The retained window before the highest offset read is still there.
    tail, eof = await c.read("seq", "stdout", len(data) - 100)
    assert tail == data[-100:] and eof
    with pytest.raises(OSError) as e:
        await c.read("seq", "stdout", len(data) + 1)
    assert e.value.errno == errno.EINVAL
    assert await c.wait("seq") == (0, False)
    await c.close()


@async_test
async def test_back_pressure_bounds_memory(fresh_agent):
    c = await fresh_agent.connect()
    total = 100 << 20
    await c.exec("flood", ["sh", "-c", f"head -c {total} /dev/zero; echo done >&2"], ENV)
    await asyncio.sleep(1.0)
    rss = fresh_agent.rss_kib() * 1024
    assert rss < 2 * LIMITS["stream_buffer"], rss
    assert (await c.list_execs())[0]["state"] == "RUNNING"  # blocked on its pipe
    got = 0
    while True:
        chunk, eof = await c.read("flood", "stdout", got)
        got += len(chunk)
        if eof:
            break
    assert got == total
    assert (await c.read("flood", "stderr", 0))[0] == b"done\n"
    assert await c.wait("flood") == (0, False)
    assert fresh_agent.rss_kib() * 1024 < 2 * LIMITS["stream_buffer"] + (4 << 20)
    await c.close()


@async_test
async def test_wait_comes_after_all_output(agent):
    c = await agent.connect()
    t = time.monotonic()
    await c.exec("bg", ["sh", "-c", "(sleep 0.4; echo late) & echo early"], ENV)
    assert await c.wait("bg") == (0, False)
    assert time.monotonic() - t >= 0.35
    data, eof = await c.read("bg", "stdout", 0)
    if not eof:
        more, eof = await c.read("bg", "stdout", len(data))
        data += more
    assert data == b"early\nlate\n" and eof
    await c.close()


@async_test
async def test_wait_exit_only_comes_at_the_process_exit(agent):
    """WAIT EXIT_ONLY (the SDK's wait/poll): answered when the process exits, though a child it
    left in the background holds its output; the plain WAIT still comes after all output, and
    only it says where the streams end."""
    c = await agent.connect()
    t = time.monotonic()
    await c.exec("bg2", ["sh", "-c", "(sleep 0.6; echo late) & echo early; exit 3"], ENV)
    full = asyncio.ensure_future(c.wait("bg2"))
    assert await c.exit("bg2") == (3, False)
    assert time.monotonic() - t < 0.4 and not full.done()
    assert "bg2" not in c._ends  # (the streams' ends are not known yet)
    assert await full == (3, False)
    assert time.monotonic() - t >= 0.55
    assert await c.exit("bg2") == (3, False)  # after the end: at once
    with pytest.raises(ProcessLookupError):
        await c.exit("no-such-exec")
    await c.close()


@async_test
async def test_signal_and_pipelined_waits(agent):
    c = await agent.connect()
    await c.exec("sleeper", ["sleep", "30"], ENV)
    waits = [asyncio.ensure_future(c.wait("sleeper")) for _ in range(3)]
    await asyncio.sleep(0.05)
    assert not any(w.done() for w in waits)
    assert await c.probe_tcp(1, timeout_ms=200) in (True, False)  # answered while WAITs wait
    await c.signal("sleeper", signal.SIGTERM)
    assert [await w for w in waits] == [(143, False)] * 3
    with pytest.raises(ProcessLookupError):
        await c.signal("sleeper", signal.SIGTERM)
    with pytest.raises(ProcessLookupError):
        await c.wait("no-such-exec")
    await c.close()


@async_test
async def test_pty_and_resize(agent):
    c = await agent.connect()
    out, err, code = await run(c, "pty1", ["/bin/sh", "-c", "stty size; tty"], pty=(24, 80))
    assert code == 0 and err == b""
    lines = out.replace(b"\r", b"").split(b"\n")
    assert lines[0] == b"24 80" and lines[1].startswith(b"/dev/pts/"), out
    await c.exec("pty2", ["/bin/sh", "-c", "read x; stty size"], ENV, pty=(24, 80))
    await c.resize("pty2", 40, 100)
    await c.stdin("pty2", 0, b"go\n")
    data = b""
    while True:
        chunk, eof = await c.read("pty2", "stdout", len(data))
        data += chunk
        if eof:
            break
    assert b"40 100" in data
    assert await c.wait("pty2") == (0, False)
    for exec_id, rows in (("pty1", 0), ("nopty", 10)):  # bad size; no pty
        if exec_id == "nopty":
            await c.exec("nopty", ["true"], ENV)
        with pytest.raises(OSError) as e:
            await c.resize(exec_id, rows, 10)
        assert e.value.errno == errno.EINVAL
    await c.close()


@async_test
async def test_list_forget_and_session_limit(fresh_agent):
    c = await fresh_agent.connect()
    await c.exec("long", ["sleep", "30"], ENV)
    await c.exec("short", ["true"], ENV)
    await c.wait("short")
    execs = {e["exec_id"]: e for e in await c.list_execs()}
    assert execs["long"]["state"] == "RUNNING" and execs["long"]["code"] is None
    assert execs["short"]["state"] == "EXITED" and execs["short"]["code"] == 0
    pid = execs["long"]["pid"]
    await c.forget("long")
    with pytest.raises(ProcessLookupError):
        await c.wait("long")
    for _ in range(100):
        if not Path(f"/proc/{pid}").exists():
            break
        await asyncio.sleep(0.01)
    assert not Path(f"/proc/{pid}").exists()  # killed and reaped
    # Past max_sessions, finished sessions are forgotten oldest first.
    n = LIMITS["max_sessions"]
    for i in range(0, n + 5, 64):
        ids = [f"t{j}" for j in range(i, min(i + 64, n + 5))]
        await asyncio.gather(*(c.exec(x, ["true"], ENV, stdout="null", stderr="null", stdin="null")
                               for x in ids))
        await asyncio.gather(*(c.wait(x) for x in ids))
    names = {e["exec_id"] for e in await c.list_execs()}
    assert len(names) == n and "short" not in names and "t0" not in names and f"t{n + 4}" in names
    await c.close()


# ---------------------------------------------------------------- files


@async_test
async def test_stat_list_and_read_file(agent, tmp_path):
    c = await agent.connect()
    f = tmp_path / "f.txt"
    f.write_bytes(b"0123456789")
    os.chmod(f, 0o640)
    st = await c.stat(str(f))
    assert st["type"] == "FILE" and st["size"] == 10 and st["mode"] == 0o640
    assert abs(st["mtime"] - f.stat().st_mtime) < 0.001 and st["link"] is None
    assert (await c.stat(str(tmp_path)))["type"] == "DIRECTORY"
    with pytest.raises(FileNotFoundError):
        await c.stat(str(tmp_path / "missing"))
    with pytest.raises(OSError) as e:
        await c.stat(str(tmp_path) + "/../etc")
    assert e.value.errno == errno.EINVAL
    assert await c.read_file(str(f), 0, 4) == (b"0123", False, 10)
    assert await c.read_file(str(f), 4, 100) == (b"456789", True, 10)
    assert await c.read_file(str(f), 20, 5) == (b"", True, 10)
    with pytest.raises(IsADirectoryError):
        await c.read_file(str(tmp_path), 0, 1)
    big = tmp_path / "big"
    many = tmp_path / "many"
    many.mkdir()
    names = sorted(f"n{i:05d}" for i in range(LIMITS["max_list_entries"] * 2 + 7))
    for name in names:
        (many / name).touch()
    os.symlink("n00000", many / "zlink")
    entries = await c.listdir(str(many))
    assert [e["name"] for e in entries] == names + ["zlink"]
    assert entries[-1]["type"] == "SYMLINK" and entries[-1]["link"] == "n00000"
    big.write_bytes(os.urandom(3 * LIMITS["max_data"]))
    data, off = b"", 0
    while True:
        chunk, eof, size = await c.read_file(str(big), off, 10 << 20)
        assert len(chunk) <= LIMITS["max_data"]
        data += chunk
        off += len(chunk)
        if eof:
            break
    assert data == big.read_bytes()
    await c.close()


@async_test
async def test_atomic_write(agent, tmp_path):
    c = await agent.connect()
    target = tmp_path / "out.bin"
    blob = os.urandom(2 * LIMITS["max_data"] + 123)
    h = await c.write_begin(str(target))
    await c.write_chunk(h, blob[:1000])
    await c.write_chunk(h, blob[1000:])
    assert os.listdir(tmp_path) == []  # nothing visible before commit
    await c.write_commit(h)
    assert os.listdir(tmp_path) == ["out.bin"]  # no temporary name left behind
    assert target.read_bytes() == blob and (target.stat().st_mode & 0o7777) == 0o644
    # Replacing keeps the old owner and mode.
    os.chown(target, 1234, 5678)
    os.chmod(target, 0o600)
    h = await c.write_begin(str(target), mode=0o777)
    await c.write_chunk(h, b"new")
    await c.write_commit(h)
    st = target.stat()
    assert target.read_bytes() == b"new" and (st.st_uid, st.st_gid, st.st_mode & 0o7777) == (1234, 5678, 0o600)
    # Abort leaves nothing.
    h = await c.write_begin(str(tmp_path / "aborted"))
    await c.write_chunk(h, b"x")
    await c.write_abort(h)
    assert os.listdir(tmp_path) == ["out.bin"]
    # A write not committed when the connection closes is discarded.
    h = await c.write_begin(str(tmp_path / "dropped"))
    await c.write_chunk(h, b"x")
    await c.close()
    c = await agent.connect()
    assert os.listdir(tmp_path) == ["out.bin"]
    h = await c.write_begin(str(tmp_path / "a" / "b" / "c.txt"), parents=True, mode=0o755)
    await c.write_commit(h)
    assert (tmp_path / "a/b/c.txt").stat().st_mode & 0o7777 == 0o755
    with pytest.raises(IsADirectoryError):
        await c.write_begin(str(tmp_path / "a"))
    with pytest.raises(FileNotFoundError):
        await c.write_begin(str(tmp_path / "nodir" / "x"))
    with pytest.raises(PermissionError):
        await c.write_begin("/proc/sys/kernel/hostname")
    with pytest.raises(OSError) as e:
        await c.write_chunk(9999, b"x")
    assert e.value.errno == errno.EBADF
    await c.close()


@async_test
async def test_mkdir_remove_rename(agent, tmp_path):
    c = await agent.connect()
    d = tmp_path / "d"
    await c.mkdir(str(d))
    with pytest.raises(FileExistsError):
        await c.mkdir(str(d))
    await c.mkdir(str(d), exist_ok=True)
    with pytest.raises(FileNotFoundError):
        await c.mkdir(str(tmp_path / "x" / "y"))
    await c.mkdir(str(tmp_path / "x" / "y" / "z"), parents=True)
    assert (tmp_path / "x/y/z").is_dir()
    (d / "f").write_text("f")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep").write_text("keep")
    os.symlink(outside, d / "link-to-outside")
    with pytest.raises(OSError) as e:
        await c.remove(str(d))
    assert e.value.errno == errno.ENOTEMPTY
    await c.remove(str(d), recursive=True)
    assert not d.exists() and (outside / "keep").exists()  # the symlink was not followed
    await c.remove(str(outside / "keep"))
    with pytest.raises(FileNotFoundError):
        await c.remove(str(outside / "keep"))
    a, b = tmp_path / "a", tmp_path / "b"
    a.write_text("a")
    b.write_text("b")
    with pytest.raises(FileExistsError):
        await c.rename(str(a), str(b))
    await c.rename(str(a), str(b), overwrite=True)
    assert b.read_text() == "a" and not a.exists()
    await c.rename(str(b), str(tmp_path / "c"))
    with pytest.raises(OSError) as e:
        await c.rename(str(tmp_path / "x"), str(tmp_path / "x" / "y" / "inside"))
    assert e.value.errno == errno.EINVAL
    await c.close()


@async_test
async def test_fifo_never_blocks_and_symlinks(agent, tmp_path):
    c = await agent.connect()
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    t = time.monotonic()
    assert (await c.stat(str(fifo)))["type"] == "OTHER"
    with pytest.raises(OSError) as e:
        await c.read_file(str(fifo), 0, 10)
    assert e.value.errno == errno.EINVAL
    with pytest.raises(OSError):
        await c.h_open(str(fifo), OPEN_FLAGS["READ"])
    with pytest.raises(OSError):
        await c.h_open(str(fifo), OPEN_FLAGS["WRITE"])
    assert time.monotonic() - t < 1
    with pytest.raises(OSError):
        await c.read_file("/dev/zero", 0, 10)  # a device node is never opened
    real = tmp_path / "real"
    real.write_text("real")
    os.symlink("real", tmp_path / "rel")
    st = await c.stat(str(tmp_path / "rel"))
    assert st["type"] == "SYMLINK" and st["link"] == "real"
    assert (await c.read_file(str(tmp_path / "rel"), 0, 100))[0] == b"real"
    # A magic link (/proc/self/root) is refused, also behind an ordinary symlink.
    os.symlink("/proc/self/root/etc/hostname", tmp_path / "magic")
    with pytest.raises(OSError) as e:
        await c.read_file(str(tmp_path / "magic"), 0, 100)
    assert e.value.errno in (errno.ELOOP, errno.EXDEV)
    # Replacing a symlink by an atomic write replaces the link, not its target.
    h = await c.write_begin(str(tmp_path / "rel"))
    await c.write_chunk(h, b"new")
    await c.write_commit(h)
    assert real.read_text() == "real" and (tmp_path / "rel").read_text() == "new"
    await c.close()


@async_test
async def test_files_without_openat2_and_tmpfile(tmp_path):
    # The code paths of kernels without openat2 and O_TMPFILE (gVisor).
    a = Agent(tmp_path / "agent", compat=True)
    try:
        c = await a.connect()
        d = tmp_path / "files"
        d.mkdir()
        (d / "real").write_text("real")
        os.symlink("real", d / "rel")
        os.symlink(str(d / "rel"), d / "abs-to-rel")
        os.symlink("/proc/self/root/etc/hostname", d / "magic")
        assert (await c.read_file(str(d / "abs-to-rel"), 0, 10))[0] == b"real"
        assert (await c.stat(str(d / "rel")))["type"] == "SYMLINK"
        with pytest.raises(OSError) as e:
            await c.read_file(str(d / "magic"), 0, 10)
        assert e.value.errno == errno.ELOOP
        h = await c.write_begin(str(d / "new"))
        await c.write_chunk(h, b"x")
        assert any(n.startswith(".shoal-tmp-") for n in os.listdir(d))  # the named fallback
        await c.write_commit(h)
        h = await c.write_begin(str(d / "aborted"))
        await c.write_abort(h)
        assert sorted(os.listdir(d)) == ["abs-to-rel", "magic", "new", "real", "rel"]
        assert (d / "new").read_bytes() == b"x"
        await c.close()
    finally:
        a.stop()


@async_test
async def test_file_handles(agent, tmp_path):
    c = await agent.connect()
    path = str(tmp_path / "h.txt")
    F = OPEN_FLAGS
    with pytest.raises(FileNotFoundError):
        await c.h_open(path, F["READ"])
    h = await c.h_open(path, F["READ"] | F["WRITE"] | F["CREATE"])
    await c.h_write(h, b"one\ntwo\nthree")
    await c.h_flush(h)
    assert await c.h_seek(h, 0, 0) == 0
    assert await c.h_read(h, 100, line=True) == (b"one\n", False)
    assert await c.h_read(h, 100, line=True) == (b"two\n", False)
    assert await c.h_read(h, 100, line=True) == (b"three", True)
    assert await c.h_seek(h, -5, 2) == 8
    assert await c.h_read(h, 2) == (b"th", False)
    assert await c.h_read(h, 100) == (b"ree", True)
    await c.h_close(h)
    with pytest.raises(OSError):
        await c.h_read(h, 1)
    with pytest.raises(FileExistsError):
        await c.h_open(path, F["WRITE"] | F["CREATE"] | F["EXCLUSIVE"])
    h = await c.h_open(path, F["WRITE"] | F["APPEND"])
    await c.h_write(h, b"\nfour")
    await c.h_close(h)
    assert Path(path).read_bytes() == b"one\ntwo\nthree\nfour"
    h = await c.h_open(path, F["WRITE"] | F["TRUNCATE"])
    await c.h_close(h)
    assert Path(path).read_bytes() == b""
    with pytest.raises(IsADirectoryError):
        await c.h_open(str(tmp_path), F["READ"])
    await c.close()


# ---------------------------------------------------------------- watches, probes


async def _next_events(w, want: set[tuple[str, str]], timeout: float = 5) -> set:
    seen: set = set()

    async def collect():
        async for ev in w:
            seen.add(ev)
            if want <= seen:
                return

    await asyncio.wait_for(collect(), timeout)
    return seen


@async_test
async def test_watches(agent, tmp_path):
    c = await agent.connect()
    with pytest.raises(FileNotFoundError):
        async with c.watch(str(tmp_path / "missing")):
            pass
    root = tmp_path / "w"
    root.mkdir()
    async with c.watch(str(root)) as w:
        (root / "a").write_text("x")
        with open(root / "a", "a") as f:
            f.write("y")
        (root / "a").unlink()
        await _next_events(w, {(f"{root}/a", "Create"), (f"{root}/a", "Modify"), (f"{root}/a", "Remove")})
    async with c.watch(str(root), recursive=True) as w:
        (root / "sub").mkdir()
        await _next_events(w, {(f"{root}/sub", "Create")})
        await asyncio.sleep(0.05)
        (root / "sub" / "deep").write_text("x")  # a directory made after WATCH is watched
        await _next_events(w, {(f"{root}/sub/deep", "Create")})
    single = root / "single"
    single.write_text("x")
    async with c.watch(str(single), recursive=True) as w:  # a file: watched itself
        single.write_text("y")
        await _next_events(w, {(str(single), "Modify")})
    # After UNWATCH the connection still works and gets no more events.
    (root / "after").write_text("x")
    await c.stat(str(root))
    await c.close()


@async_test
async def test_probe_tcp(agent):
    c = await agent.connect()
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()
    port = srv.getsockname()[1]
    assert await c.probe_tcp(port) is True
    srv.close()
    assert await c.probe_tcp(port) is False
    await c.close()


# ---------------------------------------------------------------- the entry-point


def test_entrypoint_exit_code_log_cap_and_orphans(tmp_path):
    script = ("head -c 5000 /dev/zero | tr '\\0' a; echo err >&2; "
              "(sleep 0.1 &) ; head -c 3000000 /dev/zero; sleep 0.4; exit 7")
    a = Agent(tmp_path, entry=["sh", "-c", script], log_limit=1000)
    try:
        time.sleep(0.35)
        zombies = [p for p, state in _children(a.proc.pid) if state == "Z"]
        assert zombies == []  # the orphaned sleep was reaped
        assert a.proc.wait(timeout=10) == 7
    finally:
        a.stop()
    out = a.stdout_path.read_bytes()
    assert out == b"a" * 1000 + b"\n[shoal: output limit of 1000 bytes reached; the rest is dropped]\n"
    assert a.stderr_path.read_bytes() == b"err\n"


def test_entrypoint_signals_are_forwarded(tmp_path):
    a = Agent(tmp_path, entry=["sleep", "30"])
    try:
        asyncio.run(_connected(a))
        a.proc.send_signal(signal.SIGTERM)
        assert a.proc.wait(timeout=30) == 128 + signal.SIGTERM
    finally:
        a.stop()


async def _connected(a: Agent) -> None:
    c = await a.connect()
    await c.close()


def test_entrypoint_command_not_found(tmp_path):
    a = Agent(tmp_path, entry=["no-such-entrypoint"])
    try:
        assert a.proc.wait(timeout=5) == 127
    finally:
        a.stop()
    assert b"no-such-entrypoint: command not found" in a.stderr_path.read_bytes()


# ---------------------------------------------------------------- hostile input


@async_test
async def test_malformed_frames_close_only_that_connection(agent):
    good = await agent.connect()
    rng = random.Random(1234)
    hello = encode_frame("HELLO", 1, [("VERSION", 1)])
    cases = [
        struct.pack("<I", 0xFFFFFFF0) + b"x" * 16,                     # length over max_payload
        struct.pack("<I", 3) + b"abc",                                   # shorter than a header
        hello + struct.pack("<IBI", 5 + 4, 30, 2) + b"\x28\x00\xff\xff",  # field overruns
        hello + struct.pack("<IBI", 5 + 6, 30, 3) + struct.pack("<HI", 40, 1000),
    ]
    for _ in range(40):
        junk = bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 300)))
        cases.append(junk)
        cases.append(hello + junk)
        # Well-framed garbage: random types and fields must get answers or be ignored.
        body = bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 64)))
        cases.append(hello + struct.pack("<IBI", 5 + len(body), rng.randint(0, 255), 9) + body)
    loop = asyncio.get_running_loop()
    for data in cases:
        s = socket.socket(socket.AF_UNIX)
        s.setblocking(False)
        await loop.sock_connect(s, str(agent.sock))
        try:
            await loop.sock_sendall(s, data)
        except OSError:
            pass
        s.close()
    # Frames with bad field values get errors, not a crash. (The agent may still be closing
    # the fuzz connections: until then they count against max_connections.)
    for attempt in range(50):
        try:
            s = _raw(agent)
            s.sendall(hello)
            _recv_frame(s)
            break
        except (OSError, EOFError):  # refused, reset, or the backlog is full
            s.close()
            await asyncio.sleep(0.02)
    s.sendall(encode_frame("STAT", 2, [("PATH", b"relative")]))
    assert _recv_frame(s)[2]["ERRNO"] == errno.EINVAL
    s.sendall(encode_frame("READ", 3, [("EXEC_ID", "x"), ("STREAM", b"1"), ("OFFSET", 0)]))
    assert _recv_frame(s)[0] == 3
    s.sendall(encode_frame("EXEC", 4, [("EXEC_ID", "bad id!"), ("ARG", "true")]))
    assert _recv_frame(s)[2]["ERRNO"] == errno.EINVAL
    s.sendall(struct.pack("<IBI", 5, 200, 5))
    assert _recv_frame(s)[2]["ERRNO"] == errno.ENOSYS
    s.sendall(struct.pack("<I", 1 << 30))
    _assert_closed(s)
    s.close()
    assert agent.proc.poll() is None
    assert (await good.stat("/"))["type"] == "DIRECTORY"
    assert await run(good, "after-fuzz", ["echo", "ok"]) == (b"ok\n", b"", 0)
    await good.close()


def test_structured_fuzz_keeps_the_agent_alive(fresh_agent, tmp_path):
    """Well-framed requests of every type with random fields: answers or closes, never a crash.
    Paths stay under tmp_path and EXEC only runs `true`: the fuzz must not touch the machine."""
    proto = load_protocol()
    rng = random.Random(99)
    ints = [0, 1, -1, 2, 7, 255, 4096, 1 << 20, 1 << 31, (1 << 63) - 1, -(1 << 63)]
    tags = list(proto["tags"])
    types = [t for t in proto["types"] if t != "HELLO"]
    (tmp_path / "f").write_text("x")
    paths = [str(tmp_path / n) for n in ("f", "d", "missing", "")] + ["/", "rel", "/a/../b", ""]

    def value(tag):
        kind = proto["tag_types"][tag]
        if tag in ("PATH", "PATH2", "CWD"):
            return rng.choice(paths)
        if tag == "ARG":
            return "true"
        if kind == "int":
            return rng.choice(ints) if rng.random() < 0.8 else os.urandom(rng.randint(0, 9))
        return os.urandom(rng.randint(0, 40)) if rng.random() < 0.3 else "abc"

    s = _raw(fresh_agent)
    s.sendall(encode_frame("HELLO", 1, [("VERSION", 1)]))
    _recv_frame(s)
    sent = 0
    for i in range(1500):
        kind = rng.choice(types)
        fields = [(t, value(t)) for t in rng.sample(tags, rng.randint(0, 6))]
        if kind == "EXEC":
            fields = [("EXEC_ID", f"fz{i}"), ("ARG", "true")] + [f for f in fields if f[0] != "ARG"]
        if kind in ("WATCH", "READ", "WAIT", "STDIN"):
            continue  # may legitimately wait forever on a fuzzed connection
        if kind == "QUIESCE":
            continue  # closes every connection by design (tested on its own below)
        try:
            s.sendall(encode_frame(kind, 100 + i, fields))
            sent += 1
        except OSError:
            break
    s.sendall(encode_frame("LIST_EXECS", 99999, []))  # answered last: requests run in order
    replies = 0
    try:
        while _recv_frame(s)[1] != 99999:
            replies += 1
    except (OSError, EOFError):
        pass
    assert replies == sent
    s.close()
    assert fresh_agent.proc.poll() is None
    s = _raw(fresh_agent)
    s.sendall(encode_frame("HELLO", 1, [("VERSION", 1)]))
    assert _recv_frame(s)[0] == 1
    s.close()


@async_test
async def test_connection_limit_and_lost_connection(fresh_agent):
    clients = [await fresh_agent.connect() for _ in range(LIMITS["max_connections"])]
    with pytest.raises(AgentConnectionError):
        await fresh_agent.connect(timeout=0.3)
    await clients.pop().close()
    # The agent frees the slot when it reads the close, which a loaded machine may delay.
    deadline = time.monotonic() + 10
    while True:
        try:
            clients.append(await fresh_agent.connect(timeout=1.0))
            break
        except AgentConnectionError:
            assert time.monotonic() < deadline, "a closed connection's slot was never freed"
            await asyncio.sleep(0.05)
    c = clients[0]
    await c.exec("hang", ["sleep", "30"], ENV)
    pending = asyncio.ensure_future(c.wait("hang"))
    await asyncio.sleep(0.05)
    fresh_agent.proc.kill()
    with pytest.raises(AgentConnectionError):
        await pending
    await asyncio.wait_for(c.closed, 5)
    for cl in clients:
        await cl.close()


# ---------------------------------------------------------------- checkpoints (QUIESCE)


async def _gone(path: Path, present: bool = False, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while path.exists() != present:
        assert time.monotonic() < deadline, f"{path} {'absent' if present else 'present'}"
        await asyncio.sleep(0.01)


@async_test
async def test_quiesce_closes_everything_and_relisten_signal_reopens(fresh_agent):
    c = await fresh_agent.connect()
    other = await fresh_agent.connect()
    await c.exec("q1", ["sh", "-c", "echo before; read x; echo after $x"], ENV)
    data, _ = await c.read("q1", "stdout", 0)
    assert data == b"before\n"
    await c.quiesce(60_000)
    await _gone(fresh_agent.sock)
    with pytest.raises(agent_client.AgentConnectionError):
        await other.stat("/")  # every connection closed, not only the one that asked
    await c.close()
    await other.close()
    with pytest.raises(agent_client.AgentConnectionError):
        await fresh_agent.connect(timeout=0.3)  # nothing listens while quiesced
    fresh_agent.proc.send_signal(agent_client.SIGNALS["RELISTEN"])
    await _gone(fresh_agent.sock, present=True)
    c = await fresh_agent.connect()
    try:  # the exec session lived on: continue it by id and offset
        assert await c.stdin("q1", 0, b"now\n", eof=True) == 4
        data, _ = await c.read("q1", "stdout", len(b"before\n"))
        assert data == b"after now\n"
        assert (await c.wait("q1"))[0] == 0
    finally:
        await c.close()
    assert fresh_agent.proc.poll() is None  # the signal is the agent's, not the entry-point's


@async_test
async def test_quiesce_times_out_into_listening_again(fresh_agent):
    c = await fresh_agent.connect()
    with pytest.raises(OSError) as e:
        await c.quiesce(0)
    assert e.value.errno == errno.EINVAL
    await c.quiesce(300)
    await c.close()
    await _gone(fresh_agent.sock)
    c = await fresh_agent.connect(timeout=10)  # back by itself after TIMEOUT_MS
    await c.close()
    fresh_agent.proc.send_signal(agent_client.SIGNALS["RELISTEN"])  # not quiesced: nothing
    await asyncio.sleep(0.1)
    c = await fresh_agent.connect()
    assert (await c.stat("/"))["type"] == "DIRECTORY"
    await c.close()


# ---------------------------------------------------------------- host mode (--host-launch)


def test_host_launch_sets_the_limit_binds_the_rootfs_and_fails_cleanly(tmp_path):
    """`shoal-agent --host-launch` (agent/launch.c) is how the runc host starts runc for a sandbox
    with a user namespace: RLIMIT_NOFILE set, a private mount namespace with the rootfs bound at
    the mount point (and nothing of it visible outside), then the program; a failure is one line
    and exit 125, never the program run half set up."""
    binary = str(ensure_built())
    rootfs, point = tmp_path / "rootfs", tmp_path / "point"
    rootfs.mkdir()
    point.mkdir()
    (rootfs / "marker").write_text("inside\n")
    r = subprocess.run([binary, "--host-launch", "-", str(rootfs), str(point), "1234", "--", "sh",
                        "-c", f"ulimit -n; cat {point}/marker"],
                       capture_output=True, text=True, timeout=30)
    assert (r.returncode, r.stdout) == (0, "1234\ninside\n"), r.stderr
    assert not (point / "marker").exists()  # the bind lived in the launcher's own namespace
    r = subprocess.run([binary, "--host-launch", str(tmp_path / "no-netns"), str(rootfs),
                        str(point), "1234", "--", "true"], capture_output=True, text=True,
                       timeout=30)
    assert r.returncode == 125 and "joining the network namespace" in r.stderr, r.stderr
    r = subprocess.run([binary, "--host-launch", "-", str(rootfs), str(point), "0", "--", "true"],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 125 and "NOFILE" in r.stderr, r.stderr
