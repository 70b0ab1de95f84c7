"""The whole Volume / NetworkFileSystem API: objects, batches, copies, removals, globs, read-only
mounts and deletion rules."""

from __future__ import annotations

import hashlib
import io
import os
import threading
import uuid
from pathlib import Path

import pytest

import shoal
from shoal.exception import AlreadyExistsError, ConflictError, InvalidError, NotFoundError


def unique(prefix: str = "v") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def read(vol, path: str) -> bytes:
    return b"".join(vol.read_file(path))


def run(sb, script: str) -> tuple[int, str, str]:
    p = sb.exec("bash", "-c", script)
    out, err = p.stdout.read(), p.stderr.read()
    return p.wait(), out, err


@pytest.fixture
def vol(server):
    name = unique()
    shoal.Volume.objects.create(name)
    yield shoal.Volume.from_name(name)
    shoal.Volume.objects.delete(name, allow_missing=True)


def test_objects_create_list_delete_and_rename(server):
    name, other = unique(), unique()
    shoal.Volume.objects.create(name)
    with pytest.raises(AlreadyExistsError):
        shoal.Volume.objects.create(name)
    shoal.Volume.objects.create(name, allow_existing=True)
    assert name in [v.name for v in shoal.Volume.objects.list()]
    vid = shoal.Volume.from_name(name).hydrate().object_id
    assert shoal.Volume.from_id(vid).info().name == name
    shoal.Volume.rename(name, other)
    with pytest.raises(NotFoundError):
        shoal.Volume.from_name(name).hydrate()
    assert shoal.Volume.from_name(other).hydrate().object_id == vid
    shoal.Volume.objects.delete(other)
    with pytest.raises(NotFoundError):
        shoal.Volume.objects.delete(other)
    shoal.Volume.objects.delete(other, allow_missing=True)
    assert other not in [v.name for v in shoal.Volume.objects.list()]


def test_volume_and_nfs_names_are_separate(server):
    name = unique()
    shoal.Volume.objects.create(name)
    with pytest.raises(NotFoundError):
        shoal.NetworkFileSystem.from_name(name).hydrate()
    shoal.Volume.objects.delete(name)


def test_batch_upload_files_dirs_and_modes(vol, tmp_path):
    (tmp_path / "d" / "sub").mkdir(parents=True)
    (tmp_path / "d" / "a.txt").write_text("A")
    (tmp_path / "d" / "sub" / "b.txt").write_text("B")
    (tmp_path / "one.bin").write_bytes(b"\x00" * 1000)
    with vol.batch_upload() as batch:
        batch.put_file(tmp_path / "one.bin", "/bin/one.bin")
        batch.put_file(io.BytesIO(b"from memory"), "mem.txt", mode=0o600)
        batch.put_directory(tmp_path / "d", "/tree")
    assert read(vol, "bin/one.bin") == b"\x00" * 1000
    assert read(vol, "mem.txt") == b"from memory"
    assert read(vol, "tree/sub/b.txt") == b"B"
    assert {e.path for e in vol.listdir("tree", recursive=True)} == {
        "tree/a.txt", "tree/sub", "tree/sub/b.txt"}


def test_batch_upload_mode_is_what_the_sandbox_sees(app, vol):
    with vol.batch_upload() as batch:
        batch.put_file(io.BytesIO(b"#!/bin/sh\necho ran\n"), "run.sh", mode=0o755)
    sb = shoal.Sandbox.create(app=app, volumes={"/v": vol})
    try:
        assert run(sb, "stat -c %a /v/run.sh; /v/run.sh")[1] == "755\nran\n"
    finally:
        sb.terminate()


def test_batch_upload_without_force_lands_nothing_on_a_clash(vol):
    with vol.batch_upload() as batch:
        batch.put_file(io.BytesIO(b"old"), "exists.txt")
    with pytest.raises(FileExistsError):
        with vol.batch_upload() as batch:
            batch.put_file(io.BytesIO(b"new file"), "fresh.txt")
            batch.put_file(io.BytesIO(b"new"), "exists.txt")
    assert read(vol, "exists.txt") == b"old"
    with pytest.raises(FileNotFoundError):
        read(vol, "fresh.txt")
    with vol.batch_upload(force=True) as batch:
        batch.put_file(io.BytesIO(b"new"), "exists.txt")
    assert read(vol, "exists.txt") == b"new"


def test_an_exception_inside_the_batch_uploads_nothing(vol):
    with pytest.raises(RuntimeError):
        with vol.batch_upload() as batch:
            batch.put_file(io.BytesIO(b"x"), "never.txt")
            raise RuntimeError("user code failed")
    with pytest.raises(FileNotFoundError):
        read(vol, "never.txt")


def test_batch_upload_bad_input(vol, tmp_path):
    with pytest.raises(FileNotFoundError):
        with vol.batch_upload() as batch:
            batch.put_file(tmp_path / "missing", "x")
    with pytest.raises(InvalidError):
        with vol.batch_upload() as batch:
            batch.put_file(io.BytesIO(b"x"), "../escape")
    with pytest.raises(NotADirectoryError):
        with vol.batch_upload() as batch:
            batch.put_directory(tmp_path / "missing", "/x")


def test_uploads_through_sandbox_made_symlinks_stay_in_the_volume(app, vol, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    sb = shoal.Sandbox.create(app=app, volumes={"/v": vol})
    run(sb, f"ln -s / /v/root; ln -s {outside} /v/out; mkdir /v/d; ln -s ../../.. /v/d/up")
    sb.terminate()
    with vol.batch_upload(force=True) as batch:
        batch.put_file(io.BytesIO(b"x"), "root/tmp/slip.txt")
        batch.put_file(io.BytesIO(b"y"), "d/up/etc/slip.txt")
    assert read(vol, "tmp/slip.txt") == b"x"  # <volume>/tmp, as the sandbox sees "/tmp" via the link
    assert read(vol, "etc/slip.txt") == b"y"
    assert not Path("/tmp/slip.txt").exists() and not Path("/etc/slip.txt").exists()
    with pytest.raises(FileNotFoundError):
        with vol.batch_upload(force=True) as batch:
            batch.put_file(io.BytesIO(b"z"), "out/slip.txt")
    assert list(outside.iterdir()) == []


def test_read_file_into_fileobj(vol):
    data = os.urandom(3 << 20)
    with vol.batch_upload() as batch:
        batch.put_file(io.BytesIO(data), "r.bin")
    buf = io.BytesIO()
    assert vol.read_file_into_fileobj("r.bin", buf) == len(data)
    assert buf.getvalue() == data


def test_copy_files_like_cp(vol):
    with vol.batch_upload() as batch:
        batch.put_file(io.BytesIO(b"1"), "a.txt")
        batch.put_file(io.BytesIO(b"2"), "b.txt")
        batch.put_file(io.BytesIO(b"3"), "dir/c.txt")
    vol.copy_files(["a.txt"], "a-copy.txt")
    assert read(vol, "a-copy.txt") == b"1"
    vol.copy_files(["a.txt", "b.txt"], "dir")
    assert read(vol, "dir/a.txt") == b"1" and read(vol, "dir/b.txt") == b"2"
    with pytest.raises(IsADirectoryError):
        vol.copy_files(["dir"], "dir2")
    vol.copy_files(["dir"], "dir2", recursive=True)
    assert read(vol, "dir2/c.txt") == b"3"
    vol.copy_files(["dir"], "dir2", recursive=True)  # existing dir: copied into it
    assert read(vol, "dir2/dir/c.txt") == b"3"
    with pytest.raises(NotADirectoryError):
        vol.copy_files(["a.txt", "b.txt"], "a-copy.txt")
    with pytest.raises(FileNotFoundError):
        vol.copy_files(["missing.txt"], "x.txt")
    with pytest.raises(InvalidError):
        vol.copy_files(["dir"], "dir/inner", recursive=True)


def test_remove_file(vol):
    with vol.batch_upload() as batch:
        batch.put_file(io.BytesIO(b"1"), "d/e/f.txt")
        batch.put_file(io.BytesIO(b"1"), "top.txt")
    vol.remove_file("top.txt")
    with pytest.raises(FileNotFoundError):
        vol.remove_file("top.txt")
    with pytest.raises(InvalidError, match="recursive"):
        vol.remove_file("d")
    vol.remove_file("d", recursive=True)
    assert vol.listdir("/") == []
    with pytest.raises(InvalidError):
        vol.remove_file("/")


def test_removing_a_symlink_removes_the_link_not_its_target(app, vol):
    with vol.batch_upload() as batch:
        batch.put_file(io.BytesIO(b"keep"), "target/file.txt")
    sb = shoal.Sandbox.create(app=app, volumes={"/v": vol})
    run(sb, "ln -s /v/target /v/link; ln -s / /v/rootlink")
    sb.terminate()
    vol.remove_file("link", recursive=True)
    vol.remove_file("rootlink", recursive=True)
    assert read(vol, "target/file.txt") == b"keep"


def test_globs_in_listdir(vol):
    with vol.batch_upload() as batch:
        for p in ("a.py", "b.txt", "src/c.py", "src/deep/d.py", "src/deep/e.md"):
            batch.put_file(io.BytesIO(b"x"), p)
    assert {e.path for e in vol.listdir("*.py")} == {"a.py"}
    assert {e.path for e in vol.listdir("**/*.py")} == {"a.py", "src/c.py", "src/deep/d.py"}
    assert {e.path for e in vol.listdir("src/*/*.md")} == {"src/deep/e.md"}
    assert {e.path for e in vol.listdir("src/?.py")} == {"src/c.py"}
    assert vol.listdir("nothing/*.py") == []


def test_read_only_mount_refuses_writes(app, vol):
    with vol.batch_upload() as batch:
        batch.put_file(io.BytesIO(b"ro"), "f.txt")
    sb = shoal.Sandbox.create(app=app, volumes={"/v": vol.with_mount_options(read_only=True)})
    try:
        rc, out, err = run(sb, "cat /v/f.txt; echo x > /v/g.txt")
        assert out == "ro" and rc != 0 and "Read-only file system" in err
    finally:
        sb.terminate()


def test_deleting_a_named_volume_in_use_is_refused(app, vol):
    sb = shoal.Sandbox.create(app=app, volumes={"/v": vol})
    try:
        with pytest.raises(ConflictError, match=sb.object_id):
            shoal.Volume.objects.delete(vol.name)
        assert run(sb, "echo still > /v/ok; cat /v/ok")[1] == "still\n"
    finally:
        sb.terminate()
    shoal.Volume.objects.delete(vol.name)
    with pytest.raises(NotFoundError):
        vol.listdir("/")


def test_two_sandboxes_write_different_files(app, vol):
    sbs = [shoal.Sandbox.create(app=app, volumes={"/v": vol}) for _ in range(2)]
    try:
        procs = [sb.exec("bash", "-c", f"for i in $(seq 1 200); do echo $i > /v/s{n}-$i; done")
                 for n, sb in enumerate(sbs)]
        assert [p.wait() for p in procs] == [0, 0]
    finally:
        for sb in sbs:
            sb.terminate()
    assert len(vol.listdir("/")) == 400


def test_concurrent_uploads_of_one_path_never_interleave(vol):
    blobs = [bytes([i]) * (8 << 20) for i in range(4)]

    def upload(data):
        with vol.batch_upload(force=True) as batch:
            batch.put_file(io.BytesIO(data), "same.bin")

    threads = [threading.Thread(target=upload, args=(b,)) for b in blobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    digest = hashlib.sha256(read(vol, "same.bin")).hexdigest()
    assert digest in {hashlib.sha256(b).hexdigest() for b in blobs}


def test_nfs_api(app, tmp_path):
    (tmp_path / "dir" / "sub").mkdir(parents=True)
    (tmp_path / "dir" / "x.txt").write_text("x")
    (tmp_path / "dir" / "sub" / "y.txt").write_text("y")
    (tmp_path / "f.txt").write_text("f")
    name = unique("nfs")
    nfs = shoal.NetworkFileSystem.from_name(name, create_if_missing=True)
    nfs.add_local_file(tmp_path / "f.txt")
    nfs.add_local_file(tmp_path / "f.txt", "/renamed/f2.txt")
    nfs.add_local_dir(tmp_path / "dir")
    assert {e.path for e in nfs.listdir("**/*.txt")} == {
        "f.txt", "renamed/f2.txt", "dir/x.txt", "dir/sub/y.txt"}
    sb = shoal.Sandbox.create(app=app, network_file_systems={"/n": nfs})
    try:
        assert run(sb, "cat /n/dir/sub/y.txt")[1] == "y"
        nfs.remove_file("dir", recursive=True)
        assert run(sb, "ls /n")[1].split() == ["f.txt", "renamed"]
    finally:
        sb.terminate()
    shoal.NetworkFileSystem.delete(name)
    with pytest.raises(NotFoundError):
        nfs.listdir("/")


def test_landing_without_force_never_replaces_even_when_a_file_appears_late(tmp_path):
    """The batch checks targets before and at commit; a file created after that check (by a
    sandbox, say) must still not be replaced: landing itself refuses (RENAME_NOREPLACE)."""
    from shoal.server.storage.volumes import LocalVolumeStorage

    storage = LocalVolumeStorage(tmp_path)
    storage.create("v")
    (storage.host_path("v") / "late.txt").write_text("the sandbox's")
    with storage.new_upload("v") as up:
        up.write(b"the client's")
        staged = up.finish()
    with pytest.raises(FileExistsError):
        storage.land("v", staged, "late.txt", force=False)
    assert (storage.host_path("v") / "late.txt").read_text() == "the sandbox's"
    storage.land("v", staged, "late.txt", force=True)
    assert (storage.host_path("v") / "late.txt").read_text() == "the client's"
