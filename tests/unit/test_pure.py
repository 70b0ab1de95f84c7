"""Unit layer for pure code (no server, no runc, milliseconds): OCI config and seccomp profile,
build-step command quoting, volume glob matching, registry references, Dockerfile parsing, path
normalisation, and layer unpacking of hostile tar members. Each test asserts the property the
code exists for, so a regression fails it."""

from __future__ import annotations

import io
import os
import shlex
import subprocess
import tarfile
from pathlib import Path

import pytest

from shoal.exception import InvalidError


# --- OCI config and seccomp (server/host/oci.py) ---------------------------------------------
def _spec(**kw):
    from shoal.server.host.oci import ContainerSpec, Limits, Mount

    base = dict(id="sb-x", rootfs="/r", args=["python3", "-V"], env={"A": "1"}, cwd="/w",
                hostname="h", tools_dir="/tools", limits=Limits(memory_mib=256, cpu=0.5, pids=64),
                mounts=[Mount("/host/v", "/mnt/v", True), Mount("/host/w", "/mnt/w", False)])
    base.update(kw)
    fields = ContainerSpec.__dataclass_fields__
    return ContainerSpec(**{k: v for k, v in base.items() if k in fields})


def test_seccomp_denies_namespace_and_kernel_calls_and_user_namespaces():
    from shoal.server.host.oci import seccomp_profile

    p = seccomp_profile()
    assert p["defaultAction"] == "SCMP_ACT_ALLOW"
    denied = {n for rule in p["syscalls"] if rule["action"] == "SCMP_ACT_ERRNO" and
              "args" not in rule for n in rule["names"]}
    for call in ("mount", "unshare", "setns", "bpf", "ptrace", "kexec_load", "clone3"):
        assert call in denied, call
    clone = next(r for r in p["syscalls"] if r["names"] == ["clone"])
    assert clone["args"][0]["value"] == 0x10000000  # CLONE_NEWUSER, masked
    assert clone["args"][0]["op"] == "SCMP_CMP_MASKED_EQ"
    vsock = next(r for r in p["syscalls"] if r["names"] == ["socket"])
    assert vsock["args"][0]["value"] == 40  # AF_VSOCK


def test_oci_config_limits_mounts_caps_and_env():
    from shoal.server.host.oci import build_config

    cfg = build_config(_spec(), "shoal:sb-x")
    res = cfg["linux"]["resources"]
    assert res["memory"] == {"limit": 256 << 20, "swap": 256 << 20}  # no swap beyond the limit
    assert res["pids"]["limit"] == 64
    assert res["cpu"]["quota"] == 50_000 and res["cpu"]["period"] == 100_000
    assert res["devices"] == [{"allow": False, "access": "rwm"}]
    vols = {m["destination"]: m for m in cfg["mounts"] if m["source"].startswith("/host/")}
    assert "ro" in vols["/mnt/v"]["options"] and "ro" not in vols["/mnt/w"]["options"]
    assert all({"nosuid", "nodev"} <= set(m["options"]) for m in vols.values())
    proc = cfg["process"]
    assert proc["noNewPrivileges"] is True
    assert "CAP_SYS_ADMIN" not in proc["capabilities"]["bounding"]
    assert proc["args"][-2:] == ["python3", "-V"] and proc["cwd"] == "/w"
    assert "A=1" in proc["env"] and any(e.startswith("PATH=") for e in proc["env"])
    assert cfg["linux"]["cgroupsPath"] == "shoal:sb-x"
    assert cfg["linux"]["seccomp"]["syscalls"]


def test_oci_config_network_namespace_and_net_raw():
    from shoal.server.host.oci import build_config

    cfg = build_config(_spec(netns_path="/run/netns/x", net_raw=False), "c")
    assert {"type": "network", "path": "/run/netns/x"} in cfg["linux"]["namespaces"]
    assert "CAP_NET_RAW" not in cfg["process"]["capabilities"]["bounding"]
    cfg = build_config(_spec(), "c")
    assert {"type": "network"} in cfg["linux"]["namespaces"]  # no path: a fresh, empty one


def test_env_from_the_request_overrides_defaults():
    from shoal.server.host.oci import process_env

    env = process_env({"PATH": "/x", "B": "a=b"})
    assert "PATH=/x" in env and "B=a=b" in env
    assert sum(e.startswith("PATH=") for e in env) == 1


# --- build-step commands (server/images/build.py) --------------------------------------------
def test_apt_step_quotes_and_refuses_injection():
    from shoal.server.images.build import RecipeError, step_command

    cmd = step_command({"op": "apt_install", "packages": ["curl", "libssl-dev"]})
    assert "install -y -q --no-install-recommends curl libssl-dev" in cmd
    for bad in (["curl; rm -rf /"], ["$(id)"], ["a b"], []):
        with pytest.raises(RecipeError):
            step_command({"op": "apt_install", "packages": bad})


def test_pip_step_options_are_single_shell_words():
    from shoal.server.images.build import RecipeError, step_command

    cmd = step_command({"op": "pip_install", "packages": ["requests>=2"],
                        "index_url": "http://x/simple?a=1&b=2", "extra_options": ["--no-deps"],
                        "requirements": ["flask\n'; touch /pwned; '\n"]})
    words = shlex.split(cmd)
    assert "http://x/simple?a=1&b=2" in words and "requests>=2" in words
    assert "--no-deps" in words
    # The requirements text is one printf argument, never shell code.
    assert "flask\n'; touch /pwned; '\n" in words
    # Requirements are free-form (PEP 508) but every one is a single quoted word ...
    hostile = "x`id`$(id); touch /pwned"
    assert hostile in shlex.split(step_command({"op": "pip_install", "packages": [hostile]}))
    # ... and none can be read as a pip option.
    with pytest.raises(RecipeError):
        step_command({"op": "pip_install", "packages": ["--index-url=http://evil"]})
    with pytest.raises(RecipeError):
        step_command({"op": "uv_pip_install", "packages": ["x"], "uv_version": "1; id"})


def test_run_commands_keep_each_command_in_its_own_subshell(tmp_path):
    from shoal.server.images.build import step_command

    cmd = step_command({"op": "run_commands", "commands": ["cd /tmp # trailing comment",
                                                           f"echo ok > {tmp_path}/out"]})
    r = subprocess.run(["sh", "-c", cmd], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "out").read_text() == "ok\n"  # the comment did not eat the next command
    r = subprocess.run(["sh", "-c", step_command({"op": "run_commands",
                                                  "commands": ["false", "echo never"]})],
                       capture_output=True, text=True)
    assert r.returncode != 0 and "never" not in r.stdout


# --- glob matching (server/storage/volumes.py) ----------------------------------------------
@pytest.mark.parametrize("pattern,yes,no", [
    ("*.py", ["a.py"], ["d/a.py", "a.pyc"]),
    ("**/*.py", ["a.py", "d/a.py", "d/e/a.py"], ["a.txt", "d/a.pyx"]),
    ("d/?.txt", ["d/a.txt"], ["d/ab.txt", "d//.txt", "d/a/b.txt"]),
    ("[ab].c", ["a.c", "b.c"], ["c.c"]),
    ("[!ab].c", ["c.c"], ["a.c"]),
    ("a.b", ["a.b"], ["axb"]),  # regex metacharacters are literal
])
def test_glob_regex(pattern, yes, no):
    from shoal.server.storage.volumes import glob_regex

    rx = glob_regex(pattern)
    for p in yes:
        assert rx.fullmatch(p), (pattern, p)
    for p in no:
        assert not rx.fullmatch(p), (pattern, p)


def test_glob_unclosed_bracket_is_invalid():
    from shoal.server.storage.volumes import glob_regex

    with pytest.raises(InvalidError):
        glob_regex("a[b")


# --- registry references (server/images/registry.py) ----------------------------------------
@pytest.mark.parametrize("ref,want", [
    ("python:3.11-slim", ("https://registry-1.docker.io", "library/python", "3.11-slim")),
    ("alpine", ("https://registry-1.docker.io", "library/alpine", "latest")),
    ("team/app:1", ("https://registry-1.docker.io", "team/app", "1")),
    ("127.0.0.1:5000/team/app:1.2", ("http://127.0.0.1:5000", "team/app", "1.2")),
    ("localhost/app", ("http://localhost", "app", "latest")),
    ("ghcr.io/o/r@sha256:" + "a" * 64, ("https://ghcr.io", "o/r", "sha256:" + "a" * 64)),
])
def test_parse_ref(ref, want):
    from shoal.server.images.registry import parse_ref

    assert parse_ref(ref) == want


@pytest.mark.parametrize("ref", ["", "App", "a b", "x:", "app@sha256:short"])
def test_parse_ref_refuses_invalid(ref):
    from shoal.server.images.registry import RegistryError, parse_ref

    with pytest.raises(RegistryError):
        parse_ref(ref)


# --- Dockerfile parsing (src/shoal/_dockerfile.py) ------------------------------------------
def _steps(text: str, tmp_path: Path, **build_args):
    from shoal._dockerfile import apply_dockerfile

    img = apply_dockerfile(text, "Dockerfile", tmp_path, build_args, None)
    return img._spec


def test_dockerfile_run_env_workdir_arg(tmp_path):
    spec = _steps("FROM shoal/debian_slim\n"
                  "ARG V=1\n"
                  "ENV A=x B=\"y z\"\n"
                  "WORKDIR /app\n"
                  "WORKDIR sub\n"
                  "# a comment\n"
                  "RUN echo $V && \\\n    echo two\n"
                  "RUN [\"echo\", \"a b\"]\n", tmp_path, V="2")
    steps = spec["steps"]
    env = next(s for s in steps if s["op"] == "env")
    assert env["env"] == {"A": "x", "B": "y z"}
    assert [s["path"] for s in steps if s["op"] == "workdir"] == ["/app", "/app/sub"]
    runs = [s["commands"][0] for s in steps if s["op"] == "run_commands"]
    assert "export V=2;" in runs[0] and "cd /app/sub &&" in runs[0]
    # the continuation joined into one command line
    assert " ".join(runs[0].split()).endswith("echo $V && echo two") and "\n" not in runs[0]
    assert runs[1].endswith("echo 'a b'")


def test_dockerfile_stages(tmp_path):
    from shoal._dockerfile import apply_dockerfile

    (tmp_path / "f.txt").write_text("x")
    img = apply_dockerfile("FROM shoal/debian_slim AS Build\nRUN make\n"
                           "FROM build AS second\nRUN more\n"
                           "FROM shoal/debian_slim\nENV E=1\n"
                           "COPY --from=build /out /app/\nCOPY --from=1 --chown=u /o /p\n"
                           "COPY --chown=u:g f.txt /d/\n", "Dockerfile", tmp_path, {}, None)
    ops = [s["op"] for s in img._spec["steps"]]
    assert ops == ["env", "copy_from", "copy_from", "add_local", "run_commands"]
    first, second = img._sources[1], img._sources[2]
    assert [s["commands"] for s in first._spec["steps"]] == [["make"]]
    # stage 1 is `FROM build`: build's steps, then its own
    assert [s["commands"] for s in second._spec["steps"]] == [["make"], ["more"]]
    assert img._spec["steps"][2]["chown"] == "u:"  # a user alone: its group too
    chown = img._spec["steps"][4]
    assert chown["user"] == "root" and chown["commands"] == ["chown -hR u:g -- /d/f.txt"]


@pytest.mark.parametrize("text,msg", [
    ("RUN echo\n", "before FROM"),
    ("FROM shoal/debian_slim x y\n", "optionally `AS name`"),
    ("FROM shoal/debian_slim\nHEALTHCHECK NONE\n", "HEALTHCHECK"),
    ("FROM shoal/debian_slim\nCOPY --from=1 a b\n", "no earlier stage 1"),
    ("FROM shoal/debian_slim AS s\nFROM s\nCOPY --from=s *.txt b\n", "wildcard"),
    ("FROM shoal/debian_slim\nCOPY --chmod=600 a b\n", "--chmod is not supported"),
    ("FROM shoal/debian_slim\nCOPY ../etc/passwd /x\n", "outside the build context"),
    ("FROM scratch\n", "scratch"),
])
def test_dockerfile_refusals_name_the_problem(tmp_path, text, msg):
    with pytest.raises(InvalidError, match=msg):
        _steps(text, tmp_path)


# --- path normalisation (server/storage/paths.py) -------------------------------------------
@pytest.mark.parametrize("raw,clean", [
    ("/a/b", "a/b"), ("a//b/", "a/b"), ("./a/./b", "a/b"), ("/", ""), ("", ""),
])
def test_normalize(raw, clean):
    from shoal.server.storage.paths import normalize

    assert normalize(raw) == clean


@pytest.mark.parametrize("raw", ["../x", "a/../../b", "a/..", "a\x00b", "x" * 256,
                                 "a/" * 2049, 7])
def test_normalize_refuses(raw):
    from shoal.server.storage.paths import normalize

    with pytest.raises(InvalidError):
        normalize(raw)


# --- layer unpacking with hostile members (server/images/unpack.py) -------------------------
def _tar(members) -> io.BytesIO:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as t:
        for kind, name, arg in members:
            info = tarfile.TarInfo(name)
            info.uid = info.gid = os.getuid()
            if kind == "file":
                info.size = len(arg)
                info.mode = 0o6755  # setuid/setgid: must be dropped
                t.addfile(info, io.BytesIO(arg))
            elif kind == "dir":
                info.type, info.mode = tarfile.DIRTYPE, 0o755
                t.addfile(info)
            elif kind == "sym":
                info.type, info.linkname = tarfile.SYMTYPE, arg
                t.addfile(info)
            elif kind == "hard":
                info.type, info.linkname = tarfile.LNKTYPE, arg
                t.addfile(info)
    buf.seek(0)
    return buf


def test_unpack_plain_layer_and_drops_setuid(tmp_path):
    from shoal.server.images.unpack import unpack

    dest = tmp_path / "layer"
    dest.mkdir()
    counts = unpack(_tar([("dir", "etc", None), ("file", "etc/x", b"hi"),
                          ("sym", "etc/link", "x"), ("file", "deep/a/b", b"z")]), str(dest))
    assert (dest / "etc/x").read_bytes() == b"hi"
    assert (dest / "deep/a/b").read_bytes() == b"z"
    assert os.readlink(dest / "etc/link") == "x"
    assert not (dest / "etc/x").stat().st_mode & 0o6000
    assert counts["files"] == 2


@pytest.mark.parametrize("members", [
    [("file", "../evil", b"x")],
    [("file", "/abs/evil", b"x")],
    [("file", "a/../../evil", b"x")],
    [("hard", "h", "../../outside")],
])
def test_unpack_refuses_escapes_by_name(tmp_path, members):
    from shoal.server.images.unpack import UnsafeLayerError, unpack

    dest = tmp_path / "layer"
    dest.mkdir()
    with pytest.raises(UnsafeLayerError):
        unpack(_tar(members), str(dest))
    assert not (tmp_path / "evil").exists() and not Path("/abs/evil").exists()


def test_unpack_symlink_then_write_through_it_stays_inside(tmp_path):
    """A member `esc -> /` (or `-> ../..`) followed by `esc/target` must not write outside the
    layer: resolution is confined to the layer's root (RESOLVE_IN_ROOT)."""
    from shoal.server.images.unpack import UnsafeLayerError, unpack

    outside = tmp_path / "outside"
    outside.mkdir()
    dest = tmp_path / "layer"
    dest.mkdir()
    for link in (str(outside), "../outside"):
        try:
            unpack(_tar([("sym", "esc", link), ("file", "esc/pwned", b"x")]), str(dest))
        except UnsafeLayerError:
            pass
        assert not (outside / "pwned").exists(), link


def test_unpack_refuses_garbage(tmp_path):
    from shoal.server.images.unpack import UnsafeLayerError, unpack

    with pytest.raises(UnsafeLayerError):
        unpack(io.BytesIO(b"not a tar at all" * 100), str(tmp_path))
