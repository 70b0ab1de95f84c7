"""`shoal volume` and `shoal nfs` as a user types them."""

from __future__ import annotations

import json
import os
import uuid

import pytest

from conftest import shoal_cli


def cli(*args: str, ok: bool = True, **kw):
    r = shoal_cli(*args, check=False, timeout=120, **kw)
    if ok:
        assert r.returncode == 0, r.stderr
    return r


@pytest.fixture
def volname(server):
    name = f"cli-{uuid.uuid4().hex[:8]}"
    cli("volume", "create", name)
    yield name
    cli("volume", "delete", name, "-y", ok=False)


def test_volume_roundtrip(volname, tmp_path):
    src = tmp_path / "data.bin"
    src.write_bytes(os.urandom(6 << 20))  # over the progress-bar threshold
    (tmp_path / "tree" / "sub").mkdir(parents=True)
    (tmp_path / "tree" / "sub" / "t.txt").write_text("tree")
    cli("volume", "put", volname, str(src), "/in/")
    cli("volume", "put", volname, str(tmp_path / "tree"), "/tree")
    listing = json.loads(cli("volume", "ls", volname, "/", "-r", "--json").stdout)
    assert {e["path"] for e in listing} >= {"in/data.bin", "tree/sub/t.txt"}
    assert cli("volume", "get", volname, "/tree/sub/t.txt", "-").stdout == "tree"
    out = tmp_path / "out.bin"
    cli("volume", "get", volname, "in/data.bin", str(out))
    assert out.read_bytes() == src.read_bytes()
    dl = tmp_path / "dl"
    cli("volume", "get", volname, "tree", str(dl))
    assert (dl / "sub" / "t.txt").read_text() == "tree"
    cli("volume", "cp", volname, "in/data.bin", "copy.bin")
    cli("volume", "rm", volname, "tree", "-r")
    names = {e["path"] for e in json.loads(cli("volume", "ls", volname, "--json").stdout)}
    assert names == {"in", "copy.bin"}
    assert volname in [v["name"] for v in json.loads(cli("volume", "list", "--json").stdout)]


def test_volume_errors_are_one_line(volname, tmp_path):
    (tmp_path / "f").write_text("x")
    cli("volume", "put", volname, str(tmp_path / "f"), "/f")
    for args in (("volume", "put", volname, str(tmp_path / "f"), "/f"),   # exists, no --force
                 ("volume", "get", volname, "/missing", "-"),
                 ("volume", "rm", volname, "/missing"),
                 ("volume", "ls", "no-such-volume-here"),
                 ("volume", "create", "bad name"),
                 ("volume", "get", volname, "../etc/passwd", "-")):
        r = cli(*args, ok=False)
        assert r.returncode == 1, args
        assert r.stderr.startswith("Error: "), (args, r.stderr)
        assert "Traceback" not in r.stderr and "pattern" not in r.stderr, r.stderr
    cli("volume", "put", volname, str(tmp_path / "f"), "/f", "--force")
    r = cli("volume", "get", volname, "/f", str(tmp_path / "f"), ok=False)
    assert r.returncode == 1 and "--force" in r.stderr


def test_volume_rename_and_delete(server):
    a, b = f"cli-{uuid.uuid4().hex[:8]}", f"cli-{uuid.uuid4().hex[:8]}"
    cli("volume", "create", a)
    cli("volume", "rename", a, b)
    names = [v["name"] for v in json.loads(cli("volume", "list", "--json").stdout)]
    assert b in names and a not in names
    cli("volume", "delete", b, "--yes")
    assert cli("volume", "delete", b, "--yes", ok=False).returncode == 1


def test_nfs_commands(server, tmp_path):
    name = f"cli-nfs-{uuid.uuid4().hex[:8]}"
    (tmp_path / "hello.txt").write_text("hello")
    cli("nfs", "create", name)
    cli("nfs", "put", name, str(tmp_path / "hello.txt"))
    assert cli("nfs", "get", name, "hello.txt", "-").stdout == "hello"
    assert "hello.txt" in cli("nfs", "ls", name).stdout
    assert cli("nfs", "put", name, str(tmp_path / "hello.txt"), ok=False).returncode == 1
    cli("nfs", "rm", name, "hello.txt")
    assert name in cli("nfs", "list").stdout
    cli("nfs", "delete", name, "-y")
    assert name not in cli("nfs", "list").stdout
