"""Named secrets: SDK, server storage and the `shoal secret` CLI; values never leak."""

from __future__ import annotations

import json
import os
import stat
import uuid
from pathlib import Path

import pytest

import shoal
from conftest import shoal_cli
from shoal.exception import AlreadyExistsError, InvalidError, NotFoundError

VALUE = "v4lue-" + uuid.uuid4().hex  # searched for in logs and listings


def cli(*args: str, ok: bool = True):
    r = shoal_cli(*args, check=False, timeout=120)
    if ok:
        assert r.returncode == 0, r.stderr
    return r


@pytest.fixture
def name(server):
    n = f"sec-{uuid.uuid4().hex[:8]}"
    yield n
    shoal.Secret.objects.delete(n, allow_missing=True)


def test_from_name_in_sandbox_and_exec(app, name):
    shoal.Secret.objects.create(name, {"TOKEN": VALUE, "OTHER": "o"})
    sec = shoal.Secret.from_name(name, required_keys=["TOKEN"])
    sb = shoal.Sandbox.create(app=app, secrets=[sec], timeout=60)
    try:
        assert sb.exec("sh", "-c", "echo $TOKEN $OTHER").stdout.read() == f"{VALUE} o\n"
        # an inline secret and env win over the named one
        p = sb.exec("sh", "-c", "echo $OTHER", secrets=[sec, shoal.Secret.from_dict({"OTHER": "i"})])
        assert p.stdout.read() == "i\n"
        p = sb.exec("sh", "-c", "echo $OTHER", secrets=[sec], env={"OTHER": "e"})
        assert p.stdout.read() == "e\n"
    finally:
        sb.terminate()


def test_missing_name_and_required_keys(app, name):
    with pytest.raises(NotFoundError, match="not found"):
        shoal.Secret.from_name("no-such-secret-x").hydrate()
    with pytest.raises(NotFoundError):
        shoal.Sandbox.create(app=app, secrets=[shoal.Secret.from_name("no-such-secret-x")])
    shoal.Secret.objects.create(name, {"A": VALUE})
    with pytest.raises(InvalidError, match="B") as e:
        shoal.Secret.from_name(name, required_keys=["A", "B"]).hydrate()
    assert VALUE not in str(e.value)
    info = shoal.Secret.from_name(name).info()
    assert info.keys == ["A"] and info.name == name


def test_create_conflict_force_delete(name):
    shoal.Secret.objects.create(name, {"A": "1"})
    with pytest.raises(AlreadyExistsError):
        shoal.Secret.objects.create(name, {"A": "2"})
    shoal.Secret.objects.create(name, {"B": "2"}, allow_existing=True)
    assert shoal.Secret.from_name(name).info().keys == ["B"]
    shoal.Secret.objects.delete(name)
    with pytest.raises(NotFoundError):
        shoal.Secret.objects.delete(name)
    with pytest.raises(InvalidError):
        shoal.Secret.objects.create(name, {"1BAD": "x"})
    with pytest.raises(InvalidError):
        shoal.Secret.objects.create("bad/name", {"A": "x"})


def test_local_constructors(tmp_path, monkeypatch):
    monkeypatch.setenv("SHOAL_T_X", "1")
    assert shoal.Secret.from_local_environ(["SHOAL_T_X"])._impl._env == {"SHOAL_T_X": "1"}
    with pytest.raises(InvalidError, match="SHOAL_T_MISSING"):
        shoal.Secret.from_local_environ(["SHOAL_T_MISSING"])
    (tmp_path / ".env").write_text('# c\nexport A=1\nB="two words"\nC=\'x\' \nD=3 # note\n')
    sub = tmp_path / "sub"
    sub.mkdir()
    (sub / "script.py").write_text("")
    for start in (tmp_path, sub, sub / "script.py"):
        s = shoal.Secret.from_dotenv(start)
        assert s._impl._env == {"A": "1", "B": "two words", "C": "x", "D": "3"}
    (tmp_path / "prod.env").write_text("P=1\n")
    assert shoal.Secret.from_dotenv(sub, filename="prod.env")._impl._env == {"P": "1"}
    monkeypatch.chdir(tmp_path)
    assert shoal.Secret.from_dotenv()._impl._env["A"] == "1"


def test_cli_create_list_delete_never_prints_values(name, tmp_path):
    dotenv = tmp_path / "x.env"
    dotenv.write_text(f"FROM_FILE={VALUE}\nK=file\n")
    r = cli("secret", "create", name, f"K={VALUE}", "--from-dotenv", str(dotenv))
    assert VALUE not in r.stdout + r.stderr
    r = cli("secret", "create", name, "K=2", ok=False)
    assert r.returncode == 1 and "already exists" in r.stderr
    cli("secret", "create", name, f"K={VALUE}", "FROM_FILE=x", "--force")
    r = cli("secret", "list")
    assert name in r.stdout and "FROM_FILE, K" in r.stdout and VALUE not in r.stdout
    rows = json.loads(cli("secret", "list", "--json").stdout)
    assert [row["keys"] for row in rows if row["name"] == name] == [["FROM_FILE", "K"]]
    assert VALUE not in json.dumps(rows)
    r = cli("secret", "create", name, "NOEQUALS", ok=False)
    assert r.returncode != 0
    cli("secret", "delete", name)
    assert name not in cli("secret", "list").stdout
    r = cli("secret", "delete", name, ok=False)
    assert r.returncode == 1 and "not found" in r.stderr


def test_values_private_on_disk_and_absent_from_logs(app, name):
    shoal.Secret.objects.create(name, {"TOKEN": VALUE})
    sb = shoal.Sandbox.create(app=app, secrets=[shoal.Secret.from_name(name)], timeout=60)
    sb.exec("true").wait()
    sb.terminate()
    home = Path(os.environ["SHOAL_HOME"])
    assert stat.S_IMODE(home.stat().st_mode) == 0o700
    for f in home.glob("state.db*"):
        assert stat.S_IMODE(f.stat().st_mode) == 0o600, f
    for f in (home / "logs").rglob("*"):
        if f.is_file():
            assert VALUE not in f.read_text(errors="replace"), f


def test_named_secret_in_image_build_not_in_layer(app, name):
    from shoal.server.images.store import ImageStore

    shoal.Secret.objects.create(name, {"BUILD_TOKEN": VALUE})
    img = shoal.Image.debian_slim().run_commands(
        f"test \"$BUILD_TOKEN\" = {VALUE} && echo ok > /named-token-{uuid.uuid4().hex[:6]}",
        secrets=[shoal.Secret.from_name(name)])
    img.build()
    store = ImageStore(Path(os.environ["SHOAL_IMAGES"]))
    layer = store.layer_path(store.manifest(img.object_id).layers[-1])
    assert [p.read_text() for p in layer.glob("named-token-*")] == ["ok\n"]
    hits = [p for p in layer.rglob("*") if p.is_file() and VALUE.encode() in p.read_bytes()]
    assert hits == []
    with pytest.raises(NotFoundError):
        shoal.Image.debian_slim().run_commands(
            "true", secrets=[shoal.Secret.from_name("no-such-secret-x")]).build()
