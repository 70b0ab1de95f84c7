"""Operations pieces without a server: pty execs and stats through the control plane over the
fake host, cgroup parsing (v1 and v2), and the log's JSON lines and size cap."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from shoal.exception import InvalidError
from shoal.server.host import cgroups
from shoal.server.models import ExecRequest

from unit.test_control_sandboxes import create, env, run, started  # noqa: F401


def test_pty_exec_passes_the_size_and_merges_stderr(env):  # noqa: F811
    svc, host = env

    async def go():
        await started(svc)
        sb = await svc.create(create())
        rec = await svc.exec(sb.id, ExecRequest(args=["echo", "hi"], pty_rows=30, pty_cols=100))
        spec = host.boxes[sb.id].execs[rec.id].spec
        assert spec.pty == (30, 100) and spec.stderr == "stdout" and rec.streams == ("stdout",)
        with pytest.raises(InvalidError, match="both"):
            await svc.exec(sb.id, ExecRequest(args=["true"], pty_rows=30))
        stats = await host.stats(sb.id)
        from shoal.server.host.oci import default_memory_mib
        assert stats.pids >= 1 and stats.memory_limit == default_memory_mib() << 20
        await svc.close()
    run(go())


def test_cgroup_v1_and_v2(tmp_path):
    v1 = tmp_path / "v1"
    for c, files in {"cpu,cpuacct": {"cpuacct.usage": "2500000000"},
                     "memory": {"memory.usage_in_bytes": "1048576",
                                "memory.limit_in_bytes": "9223372036854771712"},
                     "pids": {"pids.current": "4"}}.items():
        d = v1 / c / "shoal" / "sb-x"
        d.mkdir(parents=True)
        for name, text in files.items():
            (d / name).write_text(text + "\n")
    dirs = {"cpuacct": v1 / "cpu,cpuacct/shoal/sb-x", "memory": v1 / "memory/shoal/sb-x",
            "pids": v1 / "pids/shoal/sb-x"}
    assert cgroups.read_stats(dirs) == (2_500_000, 1_048_576, None, 4)
    v2 = tmp_path / "v2" / "shoal" / "sb-x"
    v2.mkdir(parents=True)
    (v2 / "cpu.stat").write_text("usage_usec 1234\nuser_usec 1000\n")
    (v2 / "memory.current").write_text("2048\n")
    (v2 / "memory.max").write_text("max\n")
    (v2 / "pids.current").write_text("2\n")
    assert cgroups.read_stats({"unified": v2}) == (1234, 2048, None, 2)
    (v2 / "memory.max").write_text("4096\n")
    assert cgroups.read_stats({"unified": v2})[2] == 4096


def test_json_log_lines_and_size_cap(tmp_path):
    log = tmp_path / "server.log"
    code = textwrap.dedent("""
        import logging
        from shoal.server import logs
        logs.setup("json", "info", max_bytes=4000)
        log = logging.getLogger("shoal.test")
        for i in range(310):
            log.info("line %d", i, extra={"event": "test.line", "n": i})
    """)
    with open(log, "wb") as f:
        subprocess.run([sys.executable, "-c", code], stderr=f, check=True, timeout=60)
    rotated = tmp_path / "server.log.1"
    assert rotated.exists() and log.stat().st_size < 8000
    lines = [json.loads(x) for x in log.read_text().splitlines()]
    assert lines[-1]["event"] == "test.line" and lines[-1]["n"] == 309
    assert lines[-1]["message"] == "line 309" and lines[-1]["level"] == "info"


def test_every_listing_command_has_json_and_h():
    """`--json` wherever a list is printed (every `list`, `ls` and `stats` command, and status),
    `-h` everywhere."""
    import click

    from shoal.cli.main import main

    def walk(cmd, path, parent):
        ctx = click.Context(cmd, info_name=path[-1], parent=parent, **cmd.context_settings)
        yield path, cmd, ctx
        for name, sub in getattr(cmd, "commands", {}).items():
            yield from walk(sub, [*path, name], ctx)

    listing = []
    for path, cmd, ctx in walk(main, ["shoal"], None):
        assert "-h" in cmd.get_help_option(ctx).opts, path
        if path[-1] in ("list", "ls", "stats", "status"):
            listing.append(" ".join(path[1:]))
            assert any("--json" in p.opts for p in cmd.params), path
    assert {"sandbox list", "sandbox stats", "app list", "volume list", "volume ls", "nfs list",
            "nfs ls", "image list", "secret list", "status"} <= set(listing)
