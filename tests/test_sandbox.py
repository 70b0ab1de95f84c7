"""Sandboxes and exec, through the public SDK against the session's real server."""

from __future__ import annotations

import asyncio
import time

import pytest

import shoal
from shoal.exception import (InvalidError, NotFoundError, SandboxTerminatedError,
                             SandboxTimeoutError)
from shoal.stream_type import StreamType


def test_exec_output_and_exit_code(sandbox):
    p = sandbox.exec("bash", "-c", "echo out; echo err >&2; exit 3")
    assert p.stdout.read() == "out\n"
    assert p.stderr.read() == "err\n"
    assert p.wait() == 3
    assert p.returncode == 3


def test_python_and_bash_are_in_the_default_image(sandbox):
    p = sandbox.exec("python", "-c", "import sys; print(sys.version_info[:2])")
    assert p.stdout.read().strip() == "(3, 11)"
    assert p.wait() == 0


def test_exec_bytes_mode(sandbox):
    p = sandbox.exec("printf", "\\xff\\x00a", text=False)
    assert p.stdout.read() == b"\xff\x00a"


def test_stdin_roundtrip_of_megabytes(sandbox):
    data = bytes(range(256)) * 4096 * 3  # 3 MiB
    p = sandbox.exec("sha256sum")
    p.stdin.write(data)
    p.stdin.write_eof()
    p.stdin.drain()
    import hashlib

    assert p.stdout.read().split()[0] == hashlib.sha256(data).hexdigest()
    assert p.wait() == 0


def test_output_streams_while_the_process_runs(sandbox):
    """Causal, not timed: the process cannot go on (let alone end) until the test has read its
    first line and answered on stdin. Output held back until exit would leave `read` waiting until
    its 30 s guard, and the process would end with 7 and no second line."""
    p = sandbox.exec("bash", "-c", "echo first; read -t 30 x || exit 7; echo second $x")
    lines = iter(p.stdout)
    assert next(lines) == "first\n"
    p.stdin.write(b"go\n")
    p.stdin.drain()
    assert next(lines) == "second go\n"
    assert p.wait() == 0


def test_wait_without_reading_large_output_does_not_hang(sandbox):
    # 40 MiB is more than a pipe holds and more than the server buffers (16 MiB): wait() must
    # still return once the output is read, and the output must arrive whole.
    p = sandbox.exec("bash", "-c", "head -c 41943040 /dev/zero | tr '\\0' x")
    out = p.stdout.read()
    assert len(out) == 40 << 20
    assert p.wait() == 0


def test_wait_without_reading_returns(sandbox):
    p = sandbox.exec("bash", "-c", "seq 1 100000")
    assert p.wait() == 0
    assert p.stdout.read().endswith("100000\n")


def test_stderr_into_stdout_and_devnull(sandbox):
    p = sandbox.exec("bash", "-c", "echo a; echo b >&2", stderr=StreamType.STDOUT)
    assert sorted(p.stdout.read().split()) == ["a", "b"]
    p = sandbox.exec("bash", "-c", "echo a; echo b >&2", stdout=StreamType.DEVNULL)
    assert p.stderr.read() == "b\n"
    assert p.wait() == 0


def test_exec_timeout_gives_minus_one(sandbox):
    # Modal's client: an exec past its timeout waits to -1 (the sandbox's own timeout is 124).
    start = time.monotonic()
    p = sandbox.exec("sleep", "30", timeout=1)
    assert p.wait() == -1
    assert time.monotonic() - start < 10


def test_wait_returns_when_the_process_exits_though_a_background_child_holds_its_output(
        sandbox):
    """`sh -c "server & echo started"` (an agent starting a server): wait() and poll() answer
    when the shell exits, as Popen's and Modal's do, not when the server lets go of the output;
    reading the output still waits for its end, as reading a pipe does."""
    p = sandbox.exec("sh", "-c", "(sleep 3; echo late) & echo started; exit 4")
    t = time.monotonic()
    assert p.wait() == 4
    assert time.monotonic() - t < 2.0
    assert p.poll() == 4 and p.returncode == 4
    assert p.stdout.read() == "started\nlate\n"
    assert time.monotonic() - t >= 2.5
    q = sandbox.exec("sh", "-c", "sleep 3 & exit 0")
    deadline = time.monotonic() + 2.0
    while q.poll() is None:
        assert time.monotonic() < deadline, "poll() did not see the shell's exit"
        time.sleep(0.05)
    assert q.returncode == 0


def test_a_stream_closed_before_the_exit_ends_its_read(sandbox):
    """A command that closes its stdout and goes on: stdout.read() returns what it wrote when
    the stream ends, as reading a pipe does, not at the command's exit; stderr stays open."""
    p = sandbox.exec("sh", "-c", "echo a; exec >&-; echo b >&2; sleep 3; echo c >&2")
    t = time.monotonic()
    assert p.stdout.read() == "a\n"
    assert time.monotonic() - t < 2.0
    assert p.stderr.read() == "b\nc\n" and p.wait() == 0
    assert time.monotonic() - t >= 2.5


def test_exec_env_workdir_and_secrets(sandbox):
    secret = shoal.Secret.from_dict({"TOKEN": "s3cret"})
    p = sandbox.exec("bash", "-c", "echo $FOO $TOKEN; pwd", env={"FOO": "bar"}, secrets=[secret],
                     workdir="/tmp")
    assert p.stdout.read() == "bar s3cret\n/tmp\n"


def test_sandbox_env_and_workdir_apply_to_exec(app):
    sb = shoal.Sandbox.create(app=app, env={"A": "1"}, workdir="/work/dir", timeout=60)
    try:
        p = sb.exec("bash", "-c", "echo $A; pwd")
        assert p.stdout.read() == "1\n/work/dir\n"
    finally:
        sb.terminate()


def test_entrypoint_output_and_exit_code(app):
    sb = shoal.Sandbox.create("bash", "-c", "echo hello; echo oops >&2; exit 7", app=app)
    sb.wait(raise_on_termination=False)
    assert sb.returncode == 7
    assert sb.stdout.read() == "hello\n"
    assert sb.stderr.read() == "oops\n"


def test_entrypoint_stdin(app):
    sb = shoal.Sandbox.create("python", "-c", "import sys; print(sys.stdin.read()[::-1])", app=app)
    sb.stdin.write(b"abc")
    sb.stdin.write_eof()
    sb.stdin.drain()
    sb.wait()
    assert sb.stdout.read() == "cba\n"
    assert sb.returncode == 0


def test_terminate_gives_137_and_poll(app):
    sb = shoal.Sandbox.create(app=app)
    assert sb.poll() is None
    assert sb.returncode is None
    sb.terminate()
    assert sb.poll() == 137
    with pytest.raises(SandboxTerminatedError):
        sb.wait()
    sb.terminate()  # terminating twice is harmless


def test_exec_after_terminate_is_a_clear_error(app):
    sb = shoal.Sandbox.create(app=app)
    sb.terminate()
    with pytest.raises(SandboxTerminatedError, match="finished"):
        sb.exec("true")


def test_sandbox_timeout_gives_124(app):
    sb = shoal.Sandbox.create(app=app, timeout=1)
    with pytest.raises(SandboxTimeoutError):
        sb.wait()
    assert sb.returncode == 124


def test_running_processes_die_with_the_sandbox(app):
    sb = shoal.Sandbox.create(app=app)
    p = sb.exec("sleep", "60")
    sb.terminate()
    assert p.wait() != 0


def test_from_id_and_list(app):
    sb = shoal.Sandbox.create(app=app, tags={"suite": "list"})
    try:
        same = shoal.Sandbox.from_id(sb.object_id)
        assert same.exec("echo", "x").stdout.read() == "x\n"
        listed = [s.object_id for s in shoal.Sandbox.list(tags={"suite": "list"})]
        assert listed == [sb.object_id]
    finally:
        sb.terminate()
    assert [s.object_id for s in shoal.Sandbox.list(tags={"suite": "list"})] == []
    with pytest.raises(NotFoundError):
        shoal.Sandbox.from_id("sb-doesnotexist0000000000")


def test_names_are_unique_among_running_sandboxes(app):
    sb = shoal.Sandbox.create(app=app, name="unique-one")
    try:
        with pytest.raises(shoal.exception.AlreadyExistsError):
            shoal.Sandbox.create(app=app, name="unique-one")
    finally:
        sb.terminate()
    shoal.Sandbox.create(app=app, name="unique-one").terminate()  # free again once it ended


@pytest.mark.parametrize("kwargs, match", [
    ({"timeout": 0}, "timeout"),
    ({"timeout": -5}, "timeout"),
    ({"workdir": "relative/dir"}, "workdir"),
    ({"cpu": 1000}, "cpu"),
    ({"memory": 1}, "memory"),
    ({"gpu": "A100"}, "gpu"),
    ({"env": {"A": 1}}, "env"),
    ({"name": "bad name!"}, "name"),
    ({"image": "debian"}, "image"),
])
def test_bad_create_arguments_are_invalid_error(app, kwargs, match):
    with pytest.raises(InvalidError, match=match):
        shoal.Sandbox.create(app=app, **kwargs)


def test_bad_exec_arguments_are_invalid_error(sandbox):
    with pytest.raises(InvalidError):
        sandbox.exec()
    with pytest.raises(InvalidError):
        sandbox.exec("echo", 5)
    with pytest.raises(InvalidError):
        sandbox.exec("echo", "a\x00b")
    with pytest.raises(InvalidError):
        sandbox.exec("pwd", workdir="../etc")
    # More than one command can carry (the agent protocol's frame): refused before it is sent,
    # and the sandbox's agent serves the next command as before.
    with pytest.raises(InvalidError, match="too large"):
        sandbox.exec("echo", "x" * (2 << 20))
    with pytest.raises(InvalidError, match="too large"):
        sandbox.exec("true", *["a"] * 5000)
    with pytest.raises(InvalidError, match="too large"):
        sandbox.exec("env", env={f"V{i}": "x" * 300 for i in range(4000)})
    p = sandbox.exec("sh", "-c", 'echo "$#"', "sh", *["a"] * 3000)
    assert p.stdout.read() == "3000\n" and p.wait() == 0


def test_unsupported_python_version_says_what_is_available(app):
    with pytest.raises(InvalidError, match="3.11"):
        shoal.Sandbox.create(app=app, image=shoal.Image.debian_slim(python_version="3.8"))


def test_ids_and_names_that_cannot_be_are_invalid_error(server):
    """An id (and a sandbox's name in from_name) goes into the API's URL paths: one with '/',
    '..' or '?' is refused in the SDK (InvalidError) instead of reaching another route ("no
    route GET /etc" before)."""
    for bad in ("../../etc", "sb-x/terminate", "sb-x?y=1", "", "sb-", "im-x", 5):
        with pytest.raises(InvalidError):
            shoal.Sandbox.from_id(bad)
    for make in (shoal.Image.from_id, shoal.SandboxSnapshot.from_id, shoal.Volume.from_id,
                 shoal.Dict.from_id, shoal.Queue.from_id):
        with pytest.raises(InvalidError):
            make("x/../../sandboxes")
    with pytest.raises(NotFoundError):
        shoal.Sandbox.from_id("sb-0123456789abcdef")
    for bad in ("../../health", "a/b", "x?y=1", ""):  # a name, too, goes into a path
        with pytest.raises(InvalidError, match="invalid sandbox name"):
            shoal.Sandbox.from_name("tests", bad)


def test_app_lookup_without_create_is_not_found(server):
    with pytest.raises(NotFoundError):
        shoal.App.lookup("no-such-app-xyz")


def test_async_api(app):
    async def main():
        sb = await shoal.Sandbox.create.aio(app=app)
        p = await sb.exec.aio("bash", "-c", "echo one; echo two")
        lines = [line async for line in p.stdout]
        rc = await p.wait.aio()
        await sb.terminate.aio()
        return lines, rc, await sb.poll.aio()

    assert asyncio.run(main()) == (["one\n", "two\n"], 0, 137)


def test_concurrent_sandboxes(app):
    async def one(i):
        sb = await shoal.Sandbox.create.aio(app=app)
        p = await sb.exec.aio("echo", str(i))
        out = await p.stdout.read.aio()
        await sb.terminate.aio()
        return out

    async def main():
        return await asyncio.gather(*(one(i) for i in range(8)))

    assert asyncio.run(main()) == [f"{i}\n" for i in range(8)]


@pytest.mark.parametrize("how", ["terminate", "exit", "timeout"])
def test_an_ended_sandbox_leaves_no_container_mount_or_cgroup(app, how):
    import subprocess
    from pathlib import Path

    from shoal import config

    from conftest import sandbox_cgroups

    # "exit": a command that ends by itself, late enough that its cgroup is seen first.
    args = ("sleep", "2") if how == "exit" else ()
    sb = shoal.Sandbox.create(*args, app=app, timeout=2 if how == "timeout" else 60)
    sid = sb.object_id
    # The precondition the absence check below relies on: the sandbox had cgroups we can find
    # (on cgroup v1, v2 or hybrid), so "none left" is not vacuous.
    assert sandbox_cgroups(sid), f"no cgroup found for running sandbox {sid}"
    if how == "terminate":
        sb.terminate()
    sb.wait(raise_on_termination=False)
    paths = config.paths()
    state = subprocess.run(["runc", "--root", str(paths.runc_root), "state", sid],
                           capture_output=True)
    assert state.returncode != 0, "runc still knows the container"
    assert str(paths.sandboxes / sid) not in Path("/proc/self/mountinfo").read_text()
    assert not sandbox_cgroups(sid)
    assert not (paths.sandboxes / sid / "upper").exists()


@pytest.mark.slow
def test_entrypoint_output_is_capped_and_the_program_is_not_blocked(app):
    """A chatty entrypoint cannot fill the host's disk: past the cap (64 MiB a stream) the agent
    writes one marker line and drops the rest, still draining the pipe."""
    sb = shoal.Sandbox.create("sh", "-c", "head -c 80000000 /dev/zero | tr '\\0' a; echo done >&2",
                              app=app, timeout=120)
    sb.wait(raise_on_termination=False)
    assert sb.returncode == 0
    out = sb.stdout.read()
    assert len(out) < 64 * 2**20 + 200, len(out)
    assert out.startswith("aaaa") and "[shoal: output limit of 67108864 bytes reached" in out[-200:]
    assert sb.stderr.read() == "done\n"


def test_blocking_exec_and_file_calls_run_in_the_callers_thread(sandbox):
    """From the blocking face, the file API's calls and the start of an exec run in the
    caller's own thread: no trip to the SDK loop (run_blocking's task) for them; an exec's
    output is still read by a task there."""
    from shoal._sync import get_loop

    loop = get_loop()
    made: list[str] = []

    def factory(loop, coro, **kwargs):
        made.append(getattr(coro, "__qualname__", ""))
        return asyncio.Task(coro, loop=loop, **kwargs)

    sandbox.filesystem.write_text("x", "/tmp/direct.txt")  # (the SDK's client is ready)
    loop.set_task_factory(factory)
    try:
        sandbox.filesystem.write_text("direct", "/tmp/direct.txt")
        assert sandbox.filesystem.read_text("/tmp/direct.txt") == "direct"
        assert sandbox.filesystem.stat("/tmp/direct.txt").size == 6
        with pytest.raises(shoal.exception.SandboxFilesystemNotFoundError):
            sandbox.filesystem.read_bytes("/tmp/no-such-file")
        assert not any("runner" in m for m in made), made
        p = sandbox.exec("sh", "-c", "echo hi; exit 4")
        assert p.stdout.read() == "hi\n" and p.wait() == 4
        assert "_ContainerProcess._read_output" in made
        assert not any("runner" in m for m in made), made
    finally:
        loop.set_task_factory(None)


def test_blocking_calls_from_many_threads_at_once(sandbox):
    import threading

    from shoal._client import _clients
    from shoal._sync import get_loop
    from shoal._transport import MAX_IDLE

    errors: list[BaseException] = []

    def worker(i: int) -> None:
        try:
            for j in range(8):
                path = f"/tmp/thread-{i}"
                sandbox.filesystem.write_text(f"{i}-{j}", path)
                assert sandbox.filesystem.read_text(path) == f"{i}-{j}"
                p = sandbox.exec("echo", f"{i}-{j}")
                assert p.stdout.read() == f"{i}-{j}\n" and p.wait() == 0
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert errors == [] and not any(t.is_alive() for t in threads)
    assert len(_clients[id(get_loop())].transport._idle) <= MAX_IDLE
