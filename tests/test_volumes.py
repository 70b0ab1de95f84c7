"""Volumes and network file systems: reading, listing, leases, deletion, and paths that try to leave
the volume."""

from __future__ import annotations

import io
import os
import time
import uuid
from pathlib import Path

import pytest
from conftest import TEST_RUNTIME, TEST_USERNS, runc_only

import shoal
from shoal.exception import InvalidError, NotFoundError
from shoal.volume import FileEntryType


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def run(sb, script: str) -> str:
    p = sb.exec("bash", "-c", script)
    out = p.stdout.read()
    assert p.wait() == 0, p.stderr.read()
    return out


@pytest.fixture
def vol_sandbox(app):
    with shoal.Volume.ephemeral() as vol:
        sb = shoal.Sandbox.create(app=app, volumes={"/cache": vol}, timeout=120)
        yield vol, sb
        sb.terminate()


def test_read_file_streams_large_files_in_chunks(vol_sandbox):
    vol, sb = vol_sandbox
    run(sb, "head -c 10000000 /dev/urandom > /cache/big; sha256sum /cache/big > /cache/big.sum")
    chunks = list(vol.read_file("big"))
    data = b"".join(chunks)
    assert len(data) == 10_000_000 and len(chunks) > 1
    import hashlib

    expected = b"".join(vol.read_file("/big.sum")).split()[0].decode()
    assert hashlib.sha256(data).hexdigest() == expected


def test_listdir(vol_sandbox):
    vol, sb = vol_sandbox
    run(sb, "mkdir -p /cache/d/e; echo hi > /cache/d/f.txt; echo x > /cache/d/e/g; "
            "ln -s f.txt /cache/d/link; mkfifo /cache/d/pipe")
    entries = {e.path: e for e in vol.listdir("d")}
    if TEST_RUNTIME == "gvisor":  # gVisor's gofer refuses mkfifo/mknod in a host directory
        assert set(entries) == {"d/e", "d/f.txt", "d/link"}
        return
    assert set(entries) == {"d/e", "d/f.txt", "d/link", "d/pipe"}
    assert entries["d/e"].type == FileEntryType.DIRECTORY
    assert entries["d/f.txt"].type == FileEntryType.FILE and entries["d/f.txt"].size == 3
    assert entries["d/link"].type == FileEntryType.SYMLINK
    assert entries["d/pipe"].type == FileEntryType.FIFO
    assert abs(entries["d/f.txt"].mtime - time.time()) < 120
    assert {e.path for e in vol.listdir("/", recursive=True)} >= {"d", "d/e", "d/e/g", "d/f.txt"}
    assert [e.path for e in vol.listdir("d/f.txt")] == ["d/f.txt"]


def test_missing_file_is_file_not_found(vol_sandbox):
    vol, _ = vol_sandbox
    with pytest.raises(FileNotFoundError):
        b"".join(vol.read_file("nope.txt"))
    with pytest.raises(FileNotFoundError):
        vol.listdir("no/such/dir")


@pytest.mark.parametrize("path", ["../etc/passwd", "a/../../b", "x\x00y", "/../../root"])
def test_bad_paths_are_invalid_error(vol_sandbox, path):
    vol, _ = vol_sandbox
    with pytest.raises(InvalidError):
        b"".join(vol.read_file(path))
    with pytest.raises(InvalidError):
        vol.listdir(path)


def test_symlinks_made_in_the_sandbox_never_reach_the_host(vol_sandbox, tmp_path):
    vol, sb = vol_sandbox
    secret = tmp_path / "host-secret"
    secret.write_text("HOST SECRET")
    run(sb, f"ln -s /etc/shadow /cache/shadow; ln -s ../../.. /cache/up; "
            f"ln -s {secret} /cache/secret; ln -s / /cache/root; mkdir -p /cache/etc; "
            f"echo volume-etc > /cache/etc/hostname")
    # Each link resolves as it would inside the sandbox whose root is the volume: outside
    # paths do not exist there.
    for path in ("shadow", "secret", "up/etc/shadow", "root/etc/shadow",
                 f"up{secret}", f"root{secret}"):
        with pytest.raises(FileNotFoundError):
            b"".join(vol.read_file(path))
    # ... and a link to a path that does exist inside the volume reads the volume's file, not the
    # host's /etc/hostname.
    assert b"".join(vol.read_file("root/etc/hostname")) == b"volume-etc\n"
    assert b"".join(vol.read_file("up/up/up/etc/hostname")) == b"volume-etc\n"
    listed = {e.path for e in vol.listdir("up")}
    assert "up/etc" in listed and "up/proc" not in listed and "up/usr" not in listed
    # A recursive listing does not follow links out (or loop).
    paths = {e.path for e in vol.listdir("/", recursive=True)}
    assert not any(p.startswith(("up/", "root/")) for p in paths)


def test_symlinked_parent_directory_cannot_escape(vol_sandbox):
    vol, sb = vol_sandbox
    run(sb, "ln -s /etc /cache/etcdir; ln -s /proc/1/root /cache/proc1")
    with pytest.raises(FileNotFoundError):
        b"".join(vol.read_file("etcdir/passwd"))
    with pytest.raises((FileNotFoundError, InvalidError)):
        b"".join(vol.read_file("proc1/etc/passwd"))


def test_named_volume_persists_and_is_shared(app):
    name = unique("persist")
    vol = shoal.Volume.from_name(name, create_if_missing=True)
    sb = shoal.Sandbox.create(app=app, volumes={"/data": vol})
    run(sb, "echo one > /data/one.txt")
    sb.terminate()
    again = shoal.Volume.from_name(name)
    sb2 = shoal.Sandbox.create(app=app, volumes={"/mnt/v": again})
    assert run(sb2, "cat /mnt/v/one.txt") == "one\n"
    sb2.terminate()


def test_missing_named_volume_is_not_found_on_first_use(app):
    vol = shoal.Volume.from_name(unique("missing"))  # lazy: no error yet
    with pytest.raises(NotFoundError):
        shoal.Sandbox.create(app=app, volumes={"/data": vol})
    with pytest.raises(NotFoundError):
        vol.listdir("/")


@pytest.mark.parametrize("name", ["", "a b", "x" * 65, "semi;colon", "../up"])
def test_bad_volume_names(server, name):
    with pytest.raises(InvalidError, match="name"):
        shoal.Volume.from_name(name, create_if_missing=True).hydrate()


@pytest.mark.parametrize("path", ["relative", "/", "/proc/x", "/dev", "/a/../b"])
def test_bad_mount_paths(app, path):
    with shoal.Volume.ephemeral() as vol:
        with pytest.raises(InvalidError):
            shoal.Sandbox.create(app=app, volumes={path: vol})


def test_ephemeral_volume_is_gone_after_its_block(app):
    with shoal.Volume.ephemeral() as vol:
        vid = vol.object_id
        vol.listdir("/")
    from shoal import config

    assert not (config.paths().volumes / vid).exists()
    with pytest.raises(NotFoundError):
        vol.listdir("/")


def test_ephemeral_volume_of_a_dead_client_is_removed(server, tmp_path):
    """A client killed without leaving its `with` block stops heart-beating; the server removes
    the volume once the lease (3 s in tests) runs out."""
    import subprocess
    import sys

    script = ("import shoal, sys, time\n"
              "with shoal.Volume.ephemeral() as v:\n"
              "    v.listdir('/'); print(v.object_id, flush=True); time.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    vid = proc.stdout.readline().strip()
    from shoal import config

    vdir = config.paths().volumes / vid
    assert vdir.exists()
    time.sleep(4)  # heart-beats keep it past one lease
    assert vdir.exists()
    proc.kill()
    proc.wait()
    deadline = time.monotonic() + 10
    while vdir.exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not vdir.exists()


def test_deleting_a_mounted_ephemeral_volume_waits_for_the_sandbox(app):
    """The defined behaviour: the volume is gone for clients at once, but a running sandbox keeps
    its files (and can still write) until it ends; then the data is removed."""
    from shoal import config

    with shoal.Volume.ephemeral() as vol:
        sb = shoal.Sandbox.create(app=app, volumes={"/cache": vol})
        run(sb, "echo keep > /cache/f")
        vid = vol.object_id
    with pytest.raises(NotFoundError):
        vol.listdir("/")
    assert run(sb, "cat /cache/f; echo more > /cache/g; cat /cache/g") == "keep\nmore\n"
    assert (config.paths().volumes / vid).exists()
    sb.terminate()
    assert not (config.paths().volumes / vid).exists()


def test_nfs_writes_are_live_both_ways(app):
    with shoal.NetworkFileSystem.ephemeral() as nfs:
        sb = shoal.Sandbox.create(app=app, network_file_systems={"/mnt/nfs": nfs})
        try:
            assert nfs.write_file("from-client/hello.txt", io.BytesIO(b"hi there")) == 8
            assert run(sb, "cat /mnt/nfs/from-client/hello.txt") == "hi there"
            run(sb, "echo back > /mnt/nfs/from-sandbox.txt")
            assert b"".join(nfs.read_file("from-sandbox.txt")) == b"back\n"
            # Overwrite is atomic: the sandbox sees the old or the new content, whole.
            nfs.write_file("from-client/hello.txt", io.BytesIO(b"second"))
            assert run(sb, "cat /mnt/nfs/from-client/hello.txt") == "second"
            assert not [e for e in nfs.listdir("from-client") if ".shoal-tmp" in e.path]
        finally:
            sb.terminate()


def test_nfs_write_cannot_escape_through_symlinks(app, tmp_path):
    target = tmp_path / "outside"
    target.mkdir()
    with shoal.NetworkFileSystem.ephemeral() as nfs:
        sb = shoal.Sandbox.create(app=app, network_file_systems={"/mnt/nfs": nfs})
        run(sb, f"ln -s {target} /mnt/nfs/link; ln -s / /mnt/nfs/root")
        sb.terminate()
        with pytest.raises(FileNotFoundError, match="link/pwned"):  # dangling inside the volume
            nfs.write_file("link/pwned", io.BytesIO(b"x"))
        nfs.write_file("root/tmp/pwned", io.BytesIO(b"x"))
        assert list(target.iterdir()) == []
        assert not Path("/tmp/pwned").exists()
        with pytest.raises(InvalidError):
            nfs.write_file("../escape", io.BytesIO(b"x"))


def test_missing_nfs_is_not_found(server):
    with pytest.raises(NotFoundError):
        shoal.NetworkFileSystem.from_name(unique("nfs")).listdir("/")


@runc_only("gVisor serves volumes through its gofer (the mount options inside are gVisor's, "
           "without nosuid/nodev) and refuses mknod there; it has no host devices to reach")
def test_volume_and_nfs_are_mounted_without_suid_or_devices(app):
    with shoal.Volume.ephemeral() as vol:
        sb = shoal.Sandbox.create(app=app, volumes={"/cache": vol})
        opts = run(sb, "grep ' /cache ' /proc/self/mountinfo")
        sb.terminate()
    assert "nosuid" in opts and "nodev" in opts
    assert os.getuid() == 0


@runc_only("gVisor refuses mknod and mkfifo in volumes, so there is nothing to open; the file "
           "API's refusal of such files is tested in test_file_api under both runtimes")
def test_device_nodes_and_fifos_made_in_a_volume_are_never_opened_by_the_server(vol_sandbox):
    """A sandbox may mknod (CAP_MKNOD), and the server is not in its device cgroup: opening such a
    node on the host would read the host's device (or hang, for a FIFO)."""
    vol, sb = vol_sandbox
    run(sb, "mknod /cache/zero c 1 5; mkfifo /cache/fifo; mkdir -p /cache/d; mknod /cache/d/z c 1 5"
        + ("; true" if TEST_USERNS else ""))
    if TEST_USERNS:
        # In a user namespace the kernel refuses device nodes to the sandbox; one could still be
        # planted another way, so the host makes them in the volume's directory to probe.
        data = Path(os.environ["SHOAL_HOME"]) / "volumes" / vol.object_id / "data"
        for p in ("zero", "d/z"):
            if not (data / p).exists():
                os.mknod(data / p, 0o20666, os.makedev(1, 5))
    for path in ("zero", "fifo"):
        with pytest.raises(PermissionError, match="regular file"):
            b"".join(vol.read_file(path))
    with pytest.raises(PermissionError):
        vol.copy_files(["zero"], "copied")
    import shoal as _s

    _s.Volume.from_id(vol.object_id)  # the volume is still fine
    vol.copy_files(["d"], "d2", recursive=True)  # special files are skipped, not opened
    assert {e.path for e in vol.listdir("d2")} == set()
