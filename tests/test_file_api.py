"""The sandbox file API against the session's real server: `Sandbox.open` (FileIO), `ls`, `mkdir`,
`rm`, `mv`, `watch`, and `Sandbox.filesystem`.

What matters most here is that a path is the path *as the sandbox sees it*: no symlink, `..` or
/proc magic link the sandbox makes may lead the server (host root) to a host file, and no device
node or FIFO the sandbox makes is ever opened by the server. Every check compares against a value
that would differ if the feature were broken (a host marker, the sandbox's own copy, owner/mode as
seen from inside, checksums taken inside the sandbox).
"""

from __future__ import annotations

import hashlib
import io
import os
import resource
import secrets
import threading
import time
from pathlib import Path

import pytest
from conftest import (LOG_CRASHES, TEST_RUNTIME, sandbox_host_pid, server_log_since,
                      server_log_size)

import shoal
from shoal.exception import (InvalidError, SandboxFilesystemDirectoryNotEmptyError,
                             SandboxFilesystemError, SandboxFilesystemFileTooLargeError,
                             SandboxFilesystemIsADirectoryError,
                             SandboxFilesystemNotADirectoryError, SandboxFilesystemNotFoundError,
                             SandboxFilesystemPathAlreadyExistsError,
                             SandboxFilesystemPermissionError, SandboxTerminatedError)
from shoal.file_io import FileWatchEvent, FileWatchEventType
from shoal.sandbox_fs import FileInfo, FileType

MiB = 1 << 20


# --------------------------------------------------------------------------------------- helpers

def run(sb, script: str) -> tuple[int, str, str]:
    p = sb.exec("sh", "-c", script)
    out, err = p.stdout.read(), p.stderr.read()
    return p.wait(), out, err


def sh(sb, script: str) -> str:
    rc, out, err = run(sb, script)
    assert rc == 0, f"{script!r} exited {rc}: {err}"
    return out


def uniq(prefix: str = "/tmp/t") -> str:
    return f"{prefix}-{secrets.token_hex(4)}"


def exists_inside(sb, path: str) -> bool:
    return run(sb, f"test -e '{path}' || test -L '{path}'")[0] == 0


@pytest.fixture(scope="module")
def sb(app):
    s = shoal.Sandbox.create(app=app, timeout=600)
    yield s
    s.terminate()


@pytest.fixture
def own_sb(app):
    """A sandbox a test may terminate."""
    s = shoal.Sandbox.create(app=app, timeout=300)
    yield s
    s.terminate()


# ============================================================================ Sandbox.open / FileIO

def test_open_text_write_then_read_back(sb):
    path = uniq()
    with sb.open(path, "w") as f:
        assert f.write("hello\nwörld\n") == len("hello\nwörld\n")
    assert f.closed
    # What a process inside sees:
    assert sh(sb, f"cat {path}") == "hello\nwörld\n"
    with sb.open(path) as f:  # default mode "r"
        assert f.read() == "hello\nwörld\n"
        assert f.read() == ""  # at the end
    with sb.open(path, "r") as f:
        assert f.readline() == "hello\n"
        assert f.readline() == "wörld\n"
        assert f.readline() == ""
    with sb.open(path, "r") as f:
        assert f.readlines() == ["hello\n", "wörld\n"]


def test_open_reads_what_the_sandbox_wrote(sb):
    path = uniq()
    sh(sb, f"printf 'line1\\nline2\\nline3' > {path}")
    f = sb.open(path, "r")
    try:
        assert f.read(3) == "lin"
        assert f.tell() == 3
        assert f.readline() == "e1\n"
        assert f.readlines() == ["line2\n", "line3"]
    finally:
        f.close()


def test_open_binary_seek_tell(sb):
    path = uniq()
    data = bytes(range(256)) * 4
    with sb.open(path, "wb") as f:
        assert f.write(data) == len(data)
        assert f.tell() == len(data)
    assert sh(sb, f"sha256sum {path}").split()[0] == hashlib.sha256(data).hexdigest()
    with sb.open(path, "rb") as f:
        assert f.read(4) == b"\x00\x01\x02\x03"
        assert f.seek(10) == 10
        assert f.read(2) == b"\x0a\x0b"
        assert f.seek(-3, 2) == len(data) - 3
        assert f.read() == b"\xfd\xfe\xff"
        assert f.seek(-5, 1) == len(data) - 5
        assert f.tell() == len(data) - 5
        assert f.read(1) == b"\xfb"
        with pytest.raises(ValueError):
            f.seek(0, 3)


def test_open_plus_modes(sb):
    path = uniq()
    sh(sb, f"printf 'abcdef' > {path}")
    with sb.open(path, "r+") as f:  # read and write, no truncation
        assert f.read(2) == "ab"
        f.seek(2)
        f.write("XY")
        f.seek(0)
        assert f.read() == "abXYef"
    assert sh(sb, f"cat {path}") == "abXYef"
    with sb.open(path, "w+b") as f:  # truncates
        assert f.read() == b""
        f.write(b"new")
        f.seek(0)
        assert f.read() == b"new"
    assert sh(sb, f"cat {path}") == "new"
    with sb.open(path, "a+") as f:
        f.write("+tail")
        f.seek(0)
        assert f.read() == "new+tail"


def test_open_append_and_exclusive(sb):
    path = uniq()
    sh(sb, f"echo first > {path}")
    with sb.open(path, "a") as f:
        f.write("second\n")
    assert sh(sb, f"cat {path}") == "first\nsecond\n"
    with pytest.raises(FileExistsError):
        sb.open(path, "x")
    assert sh(sb, f"cat {path}") == "first\nsecond\n"  # "x" did not truncate it
    fresh = uniq()
    with sb.open(fresh, "xb") as f:
        f.write(b"only")
    assert sh(sb, f"cat {fresh}") == "only"


def test_open_w_truncates_existing(sb):
    path = uniq()
    sh(sb, f"echo 0123456789 > {path}")
    with sb.open(path, "w") as f:
        f.write("ab")
    assert sh(sb, f"cat {path}") == "ab"


def test_flush_makes_data_visible_before_close(sb):
    path = uniq()
    f = sb.open(path, "w")
    try:
        f.write("pending")
        f.flush()
        assert sh(sb, f"cat {path}") == "pending"
    finally:
        f.close()


@pytest.mark.parametrize("mode", ["rw", "", "z", "rr", "wa", "ra+", "r++", "bb", "b", "+", "rt"])
def test_bad_modes_raise_value_error(sb, mode):
    path = uniq()
    with pytest.raises(ValueError):
        sb.open(path, mode)
    assert not exists_inside(sb, path)  # nothing was created on the way


def test_wrong_data_type_for_the_mode(sb):
    path = uniq()
    sh(sb, f"printf keep > {path}")
    with sb.open(path, "a") as f:
        with pytest.raises(TypeError):
            f.write(b"bytes into a text file")
    with sb.open(path, "ab") as f:
        with pytest.raises(TypeError):
            f.write("str into a binary file")
    assert sh(sb, f"cat {path}") == "keep"


def test_operations_the_mode_forbids(sb):
    path = uniq()
    sh(sb, f"printf data > {path}")
    with sb.open(path, "r") as f:
        with pytest.raises(io.UnsupportedOperation):
            f.write("x")
    for mode in ("a", "wb"):
        with sb.open(path, mode) as f:
            with pytest.raises(io.UnsupportedOperation):
                f.read()
            with pytest.raises(io.UnsupportedOperation):
                f.readline()
    assert sh(sb, f"cat {path}") == ""  # "wb" truncated it, nothing else was written


def test_closed_file_raises_value_error(sb):
    path = uniq()
    f = sb.open(path, "w+")
    f.write("x")
    f.close()
    assert f.closed
    f.close()  # closing twice is fine
    for op in (lambda: f.read(), lambda: f.readline(), lambda: f.write("y"), lambda: f.flush(),
               lambda: f.seek(0), lambda: f.tell()):
        with pytest.raises(ValueError):
            op()
    assert sh(sb, f"cat {path}") == "x"


def test_open_sandbox_side_errors(sb):
    d = uniq()
    sh(sb, f"mkdir {d} && echo hi > {d}/file")
    with pytest.raises(FileNotFoundError):
        sb.open(f"{d}/missing")
    with pytest.raises(FileNotFoundError):
        sb.open(f"{d}/no/such/dir/new", "w")  # "w" creates the file, not its parents
    with pytest.raises(IsADirectoryError):
        sb.open(d)
    with pytest.raises(IsADirectoryError):
        sb.open(d, "w")
    with pytest.raises(NotADirectoryError):
        sb.open(f"{d}/file/below", "r")
    with pytest.raises(NotADirectoryError):
        sb.open(f"{d}/file/below", "w")


@pytest.mark.timeout(30)
def test_read_only_and_kernel_mounts_are_not_written(sb):
    # /sys and /proc/sys are read-only in every sandbox, /proc/sysrq-trigger too: the server (host
    # root, all capabilities) must not write there on the sandbox's behalf.
    hostname = sh(sb, "cat /proc/sys/kernel/hostname")
    for path in ("/sys/kernel/shoal-test", "/proc/sys/kernel/hostname", "/proc/sysrq-trigger",
                 "/proc/1/oom_score_adj"):
        for mode in ("w", "a", "r+"):
            # r+ does not create: on a missing file it is FileNotFoundError, as open() gives
            allowed = (PermissionError, FileNotFoundError) if mode == "r+" else PermissionError
            with pytest.raises(allowed):
                sb.open(path, mode)
    for path in ("/sys/kernel/shoal-test", "/proc/sys/kernel/hostname",
                 "/proc/sys/kernel/shoal-test", "/proc/1/oom_score_adj"):
        with pytest.raises(SandboxFilesystemError):
            sb.filesystem.write_bytes(b"pwned", path)
    assert sh(sb, "cat /proc/sys/kernel/hostname") == hostname
    assert sh(sb, "cat /proc/1/oom_score_adj") != "pwned"
    # kernel files the sandbox may not read (no CAP_SYSLOG) must not be read with the server's
    # privileges: the host's kernel log, real kernel addresses
    # (gVisor's kernel has no /proc/kmsg at all: nothing to read there either)
    with pytest.raises(PermissionError if TEST_RUNTIME == "runc"
                       else (PermissionError, FileNotFoundError)):
        sb.open("/proc/kmsg", "rb")
    try:
        syms = sb.filesystem.read_bytes("/proc/kallsyms")
    except (SandboxFilesystemPermissionError, SandboxFilesystemNotFoundError):
        syms = b""  # (gVisor has no /proc/kallsyms)
    assert all(line.startswith(b"0000000000000000") for line in syms.splitlines()[:1000])


def test_text_read_n_counts_characters(sb):
    path = uniq()
    with sb.open(path, "w") as f:
        f.write("héllo")
    with sb.open(path, "r") as f:
        assert f.read(2) == "hé"
        assert f.read() == "llo"


# ================================================================================ ls/mkdir/rm/mv

def test_ls_mkdir_rm(sb):
    d = uniq()
    sb.mkdir(d)
    assert sh(sb, f"stat -c %F {d}").strip() == "directory"
    assert sb.ls(d) == []
    sh(sb, f"touch {d}/b {d}/a && mkdir {d}/c && ln -s /etc {d}/link")
    assert sorted(sb.ls(d)) == ["a", "b", "c", "link"]
    with pytest.raises(FileExistsError):
        sb.mkdir(d)
    with pytest.raises(FileNotFoundError):
        sb.mkdir(f"{d}/x/y/z")  # parents=False
    sb.mkdir(f"{d}/x/y/z", parents=True)
    sb.mkdir(f"{d}/x/y/z", parents=True)  # exists: fine with parents=True
    assert sh(sb, f"test -d {d}/x/y/z && echo ok") == "ok\n"
    with pytest.raises(FileNotFoundError):
        sb.ls(f"{d}/nope")
    with pytest.raises(NotADirectoryError):
        sb.ls(f"{d}/a")
    sb.rm(f"{d}/a")
    sb.rm(f"{d}/link")  # the link, not /etc
    assert sh(sb, "test -f /etc/passwd && echo ok") == "ok\n"
    assert sorted(sb.ls(d)) == ["b", "c", "x"]
    with pytest.raises(SandboxFilesystemDirectoryNotEmptyError):
        sb.rm(f"{d}/x")
    assert exists_inside(sb, f"{d}/x/y/z")
    sb.rm(f"{d}/c")  # an empty directory goes without recursive
    sb.rm(f"{d}/x", recursive=True)
    assert sorted(sb.ls(d)) == ["b"]
    with pytest.raises(FileNotFoundError):
        sb.rm(f"{d}/x")
    sb.rm(d, recursive=True)
    assert not exists_inside(sb, d)


def test_ls_root_lists_the_sandbox_root(sb):
    names = sb.ls("/")
    inside = sh(sb, "ls -A /").split()
    assert sorted(names) == sorted(inside)
    assert "tmp" in names and "etc" in names


@pytest.mark.parametrize("path", ["/", "//", "/.", "/./"])
def test_rm_root_is_invalid(sb, path):
    with pytest.raises(InvalidError):
        sb.rm(path, recursive=True)
    with pytest.raises(InvalidError):
        sb.filesystem.remove(path, recursive=True)
    assert exists_inside(sb, "/etc/passwd")


def test_rm_recursive_does_not_follow_links(sb):
    d, victim = uniq(), uniq()
    sh(sb, f"mkdir -p {d}/sub {victim} && touch {victim}/keep && ln -s {victim} {d}/sub/link "
           f"&& ln -s / {d}/rootlink")
    sb.rm(d, recursive=True)
    assert not exists_inside(sb, d)
    assert exists_inside(sb, f"{victim}/keep")
    assert exists_inside(sb, "/etc/passwd")


def test_mv_is_a_rename(sb):
    src, dst = uniq(), uniq()
    sh(sb, f"echo payload > {src} && echo old > {dst}")
    inode = sh(sb, f"stat -c %i {src}")
    sb.mv(src, dst)  # replaces dst
    assert not exists_inside(sb, src)
    assert sh(sb, f"cat {dst}") == "payload\n"
    assert sh(sb, f"stat -c %i {dst}") == inode  # the same file, moved, not copied
    d = uniq()
    sh(sb, f"mkdir -p {d}/inner && touch {d}/inner/f")
    sb.mv(d, d + "-moved")
    assert exists_inside(sb, f"{d}-moved/inner/f") and not exists_inside(sb, d)
    with pytest.raises(FileNotFoundError):
        sb.mv(d, d + "-again")


def test_mv_dir_into_itself_is_invalid(sb):
    d = uniq()
    sh(sb, f"mkdir -p {d}/sub")
    with pytest.raises(InvalidError):
        sb.mv(d, f"{d}/sub/inside")
    with pytest.raises(InvalidError):
        sb.filesystem.rename(d, f"{d}/x")
    with pytest.raises(InvalidError):
        sb.mv(d, d)
    assert exists_inside(sb, f"{d}/sub")


def test_mv_dir_into_itself_through_a_symlink_is_invalid(sb):
    d = uniq()
    sh(sb, f"mkdir -p {d}/sub && ln -s {d} {d}-alias")
    with pytest.raises(InvalidError):
        sb.mv(d, f"{d}-alias/sub/inside")  # the kernel says EINVAL; the SDK should say so too
    assert exists_inside(sb, f"{d}/sub")


def test_a_name_longer_than_any_file_may_have_is_invalid(sb):
    """A path component over 255 bytes (NAME_MAX): InvalidError from every file call, as for
    any other path the sandbox cannot have, not the kernel's ENAMETOOLONG as a server error."""
    long = "/tmp/" + "n" * 256
    for call in (lambda: sb.filesystem.read_bytes(long),
                 lambda: sb.filesystem.write_bytes(b"x", long),
                 lambda: sb.filesystem.stat(long),
                 lambda: sb.filesystem.make_directory(long + "/d"),
                 lambda: sb.filesystem.rename("/tmp", long),
                 lambda: sb.open(long, "w"),
                 lambda: sb.ls(long)):
        with pytest.raises(InvalidError, match="longer than 255"):
            call()
    ok = "/tmp/" + "é" * 127  # 254 bytes: the longest name that still fits, taken as it is
    sb.filesystem.write_bytes(b"fits", ok)
    assert sb.filesystem.read_bytes(ok) == b"fits"


# ======================================================================== Sandbox.filesystem

def test_filesystem_text_and_bytes_roundtrip(sb):
    fs = sb.filesystem
    base = uniq()
    fs.write_text("héllo\n", f"{base}/deep/er/a.txt")  # parents created
    assert sh(sb, f"cat {base}/deep/er/a.txt") == "héllo\n"
    assert fs.read_text(f"{base}/deep/er/a.txt") == "héllo\n"
    assert fs.read_bytes(f"{base}/deep/er/a.txt") == "héllo\n".encode()
    blob = os.urandom(3 * MiB + 17)
    fs.write_bytes(blob, f"{base}/b.bin")
    assert fs.read_bytes(f"{base}/b.bin") == blob
    assert sh(sb, f"sha256sum {base}/b.bin").split()[0] == hashlib.sha256(blob).hexdigest()
    fs.write_bytes(b"", f"{base}/empty")
    assert fs.read_bytes(f"{base}/empty") == b""
    fs.write_text("replaced", f"{base}/b.bin")
    assert sh(sb, f"cat {base}/b.bin") == "replaced"
    # what the sandbox wrote
    sh(sb, f"printf 'from inside' > {base}/inside")
    assert fs.read_text(f"{base}/inside") == "from inside"
    with pytest.raises(TypeError):
        fs.write_text(b"bytes", f"{base}/x")
    with pytest.raises(TypeError):
        fs.write_bytes("str", f"{base}/x")
    assert not exists_inside(sb, f"{base}/x")
    # no temporary file is left next to the written ones
    assert sorted(sh(sb, f"ls -A {base}").split()) == ["b.bin", "deep", "empty", "inside"]


def test_filesystem_stat_and_list_files(sb):
    fs = sb.filesystem
    d = uniq()
    sh(sb, f"mkdir {d} && printf 12345 > {d}/f && chmod 640 {d}/f && mkdir {d}/sub "
           f"&& ln -s /etc/hostname {d}/ln && touch -d '2001-02-03 04:05:06 UTC' {d}/f")
    st = fs.stat(f"{d}/f")
    assert isinstance(st, FileInfo)
    assert (st.name, st.path, st.type, st.size, st.mode) == ("f", f"{d}/f", FileType.FILE, 5, 0o640)
    assert (st.owner, st.group) == ("root", "root")
    assert st.modified_time.timestamp() == pytest.approx(981173106)
    assert st.modified_time.utcoffset() is not None and st.symlink_target is None
    assert fs.stat(f"{d}/sub").type == FileType.DIRECTORY
    ln = fs.stat(f"{d}/ln")  # the link itself, not its target
    assert ln.type == FileType.SYMLINK and ln.symlink_target == "/etc/hostname"
    assert fs.stat("/").type == FileType.DIRECTORY
    entries = {e.name: e for e in fs.list_files(d)}
    assert sorted(entries) == ["f", "ln", "sub"]
    assert entries["f"].path == f"{d}/f" and entries["f"].size == 5
    assert entries["sub"].type == FileType.DIRECTORY
    assert entries["ln"].type == FileType.SYMLINK
    with pytest.raises(SandboxFilesystemNotFoundError):
        fs.stat(f"{d}/missing")
    with pytest.raises(SandboxFilesystemNotFoundError):
        fs.list_files(f"{d}/missing")
    with pytest.raises(SandboxFilesystemNotADirectoryError):
        fs.list_files(f"{d}/f")


def test_filesystem_directories_remove_rename(sb):
    fs = sb.filesystem
    d = uniq()
    fs.make_directory(f"{d}/a/b/c")  # create_parents defaults to True
    assert sh(sb, f"test -d {d}/a/b/c && echo ok") == "ok\n"
    fs.make_directory(f"{d}/a/b/c")  # already there: fine
    with pytest.raises(SandboxFilesystemNotFoundError):
        fs.make_directory(f"{d}/q/r", create_parents=False)
    with pytest.raises(SandboxFilesystemPathAlreadyExistsError):
        fs.make_directory(f"{d}/a", create_parents=False)
    fs.write_text("x", f"{d}/a/b/c/file")
    with pytest.raises(SandboxFilesystemDirectoryNotEmptyError):
        fs.remove(f"{d}/a")
    assert exists_inside(sb, f"{d}/a/b/c/file")
    fs.rename(f"{d}/a/b/c/file", f"{d}/moved")
    assert sh(sb, f"cat {d}/moved") == "x"
    with pytest.raises(SandboxFilesystemPathAlreadyExistsError):
        fs.rename(f"{d}/a", f"{d}/moved", overwrite=False)
    fs.remove(f"{d}/moved")
    fs.remove(f"{d}/a", recursive=True)
    assert sh(sb, f"ls -A {d}") == ""
    with pytest.raises(SandboxFilesystemNotFoundError):
        fs.remove(f"{d}/a")
    with pytest.raises(SandboxFilesystemNotFoundError):
        fs.rename(f"{d}/a", f"{d}/b")


def test_filesystem_error_types(sb):
    fs = sb.filesystem
    d = uniq()
    sh(sb, f"mkdir {d} && echo x > {d}/file")
    with pytest.raises(SandboxFilesystemNotFoundError):
        fs.read_bytes(f"{d}/missing")
    with pytest.raises(SandboxFilesystemIsADirectoryError):
        fs.read_bytes(d)
    with pytest.raises(SandboxFilesystemIsADirectoryError):
        fs.write_bytes(b"x", d)
    with pytest.raises(SandboxFilesystemNotADirectoryError):
        fs.read_text(f"{d}/file/x")
    with pytest.raises(SandboxFilesystemNotADirectoryError):
        fs.write_text("x", f"{d}/file/x")
    with pytest.raises(SandboxFilesystemPathAlreadyExistsError):
        fs.make_directory(f"{d}/file", create_parents=False)
    with pytest.raises(SandboxFilesystemPathAlreadyExistsError):
        fs.make_directory(f"{d}/file")  # a file is in the way, even with create_parents
    with pytest.raises(SandboxFilesystemNotADirectoryError):
        fs.make_directory(f"{d}/file/sub/dir")
    with pytest.raises(NotADirectoryError):
        sb.mkdir(f"{d}/file/sub", parents=True)
    # all of them are SandboxFilesystemError, not the built-ins
    with pytest.raises(SandboxFilesystemError) as ei:
        fs.read_bytes(f"{d}/missing")
    assert not isinstance(ei.value, OSError)
    assert sh(sb, f"cat {d}/file") == "x\n"


def test_copy_from_and_to_local(sb, tmp_path):
    fs = sb.filesystem
    data = os.urandom(9 * MiB + 3)  # more than one 4 MiB chunk, not a multiple of it
    src = tmp_path / "up.bin"
    src.write_bytes(data)
    remote = uniq() + "/nested/up.bin"
    fs.copy_from_local(src, remote)
    assert sh(sb, f"sha256sum {remote}").split()[0] == hashlib.sha256(data).hexdigest()
    out = tmp_path / "down.bin"
    fs.copy_to_local(remote, out)
    assert out.read_bytes() == data
    fs.copy_to_local(remote, str(out))  # replaces an existing local file
    assert out.read_bytes() == data
    with pytest.raises(FileNotFoundError):
        fs.copy_from_local(tmp_path / "nope", remote)
    with pytest.raises(SandboxFilesystemNotFoundError):
        fs.copy_to_local(remote + ".missing", tmp_path / "never")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["down.bin", "up.bin"]  # no temp left


def test_read_bytes_over_the_limit_is_refused(sb):
    path = uniq()
    sh(sb, f"truncate -s 600M {path}")  # sparse
    with pytest.raises(SandboxFilesystemFileTooLargeError):
        sb.filesystem.read_bytes(path)
    with pytest.raises(SandboxFilesystemFileTooLargeError):
        sb.filesystem.read_text(path)
    sh(sb, f"truncate -s 512M {path}")  # exactly the limit is allowed
    st = sb.filesystem.stat(path)
    assert st.size == 512 * MiB
    sb.filesystem.remove(path)


# ======================================================== paths resolve inside the sandbox only

@pytest.fixture
def host_marker(tmp_path):
    """Host files the sandbox must never reach; the sandbox gets a copy of the same path with
    different content where noted."""
    marker = tmp_path / "marker.txt"
    marker.write_text("HOST SECRET " + secrets.token_hex(8))
    only = tmp_path / "host-only.txt"
    only.write_text("HOST ONLY " + secrets.token_hex(8))
    return tmp_path, marker, only


def _host_files(tmp_path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(tmp_path)): p.read_bytes() for p in tmp_path.rglob("*")
            if p.is_file()}


def test_symlinks_resolve_inside_the_sandbox_for_reads(sb, host_marker):
    tmp, marker, only = host_marker
    tag = secrets.token_hex(4)
    # The same path as the host's marker exists in the sandbox, with the sandbox's content.
    sh(sb, f"mkdir -p {tmp} && printf 'SANDBOX COPY' > {marker} && "
           f"ln -s {marker} /tmp/evil-{tag} && ln -s {only} /tmp/evil2-{tag} && "
           f"ln -s / /tmp/root-{tag} && ln -s ../../../../.. /tmp/up-{tag} && "
           f"ln -s {tmp} /tmp/hostdir-{tag}")
    fs = sb.filesystem
    for path in (f"/tmp/evil-{tag}", f"/tmp/root-{tag}{marker}", f"/tmp/up-{tag}{marker}",
                 f"/tmp/hostdir-{tag}/marker.txt", f"/tmp/root-{tag}/tmp/up-{tag}{marker}"):
        assert fs.read_text(path) == "SANDBOX COPY", path
        assert fs.read_bytes(path) == b"SANDBOX COPY", path
        with sb.open(path) as f:
            assert f.read() == "SANDBOX COPY", path
    # A path that exists only on the host is not found.
    for path in (f"/tmp/evil2-{tag}", f"/tmp/root-{tag}{only}", f"/tmp/up-{tag}{only}",
                 f"/tmp/hostdir-{tag}/host-only.txt"):
        with pytest.raises(FileNotFoundError):
            sb.open(path)
        with pytest.raises(SandboxFilesystemNotFoundError):
            fs.read_bytes(path)
        with pytest.raises(SandboxFilesystemNotFoundError):
            fs.copy_to_local(path, tmp / "leak")
        if path != f"/tmp/evil2-{tag}":  # stat describes that one, the link itself
            with pytest.raises(SandboxFilesystemNotFoundError):
                fs.stat(path)
    link = fs.stat(f"/tmp/evil2-{tag}")
    assert (link.type, link.symlink_target) == (FileType.SYMLINK, str(only))
    assert not (tmp / "leak").exists()
    # Listing a host directory through a link lists the sandbox's directory of that name.
    assert sorted(sb.ls(f"/tmp/hostdir-{tag}")) == ["marker.txt"]
    assert sorted(e.name for e in fs.list_files(f"/tmp/root-{tag}{tmp}")) == ["marker.txt"]
    assert fs.stat(f"/tmp/up-{tag}{marker}").size == len("SANDBOX COPY")


def test_symlinks_resolve_inside_the_sandbox_for_writes(sb, host_marker):
    tmp, marker, only = host_marker
    before = _host_files(tmp)
    tag = secrets.token_hex(4)
    sh(sb, f"mkdir -p {tmp} && printf 'SANDBOX COPY' > {marker} && "
           f"ln -s {marker} /tmp/evil-{tag} && ln -s {tmp}/created.txt /tmp/dangling-{tag} && "
           f"ln -s / /tmp/root-{tag} && ln -s ../../../../.. /tmp/up-{tag} && "
           f"ln -s {tmp} /tmp/hostdir-{tag} && touch /tmp/mvsrc-{tag}")
    fs = sb.filesystem
    fs.write_text("W1", f"/tmp/root-{tag}{tmp}/w1.txt")
    fs.write_bytes(b"W2", f"/tmp/up-{tag}{tmp}/w2.txt")
    fs.write_text("W3", f"/tmp/hostdir-{tag}/sub/w3.txt")
    with sb.open(f"/tmp/up-{tag}{tmp}/w4.txt", "w") as f:
        f.write("W4")
    with sb.open(f"/tmp/evil-{tag}", "a") as f:
        f.write(" APPENDED")
    fs.write_text("OVERWRITTEN", f"/tmp/evil-{tag}")
    try:
        with sb.open(f"/tmp/dangling-{tag}", "w") as f:
            f.write("W5")
    except OSError:
        pass  # refusing to create through a dangling link is fine too
    fs.copy_from_local(marker, f"/tmp/hostdir-{tag}/w6.txt")
    fs.make_directory(f"/tmp/root-{tag}{tmp}/newdir")
    sb.mkdir(f"/tmp/up-{tag}{tmp}/newdir2")
    sb.mv(f"/tmp/mvsrc-{tag}", f"/tmp/hostdir-{tag}/moved-in")
    fs.remove(f"/tmp/root-{tag}{marker}")
    with pytest.raises(FileNotFoundError):
        sb.rm(f"/tmp/up-{tag}{only}")
    with pytest.raises(SandboxFilesystemNotFoundError):
        fs.rename(f"/tmp/hostdir-{tag}/host-only.txt", f"/tmp/stolen-{tag}")
    # The host directory is exactly as it was.
    assert _host_files(tmp) == before
    assert sorted(p.name for p in tmp.iterdir()) == ["host-only.txt", "marker.txt"]
    # ... and the sandbox got the files at the paths it sees.
    listing = sh(sb, f"cd {tmp} && find . | sort").split()
    for name in ("./w1.txt", "./w2.txt", "./sub/w3.txt", "./w4.txt", "./w6.txt", "./newdir",
                 "./newdir2", "./moved-in"):
        assert name in listing
    assert "./marker.txt" not in listing  # removed through /tmp/root-…: the sandbox's copy
    assert sh(sb, f"cat {tmp}/w1.txt {tmp}/w2.txt {tmp}/sub/w3.txt {tmp}/w4.txt") == "W1W2W3W4"


def test_proc_magic_links_do_not_reach_the_host_or_the_server(sb, host_marker):
    tmp, marker, only = host_marker
    tag = secrets.token_hex(4)
    sh(sb, f"ln -s /proc/1/root /tmp/p1-{tag} && ln -s /proc/self /tmp/ps-{tag}")
    sandbox_hostname = sh(sb, "cat /etc/hostname")
    sandbox_passwd = sh(sb, "cat /etc/passwd")
    fs = sb.filesystem

    def read_or_error(path: str) -> bytes | None:
        try:
            got = fs.read_bytes(path)
        except (SandboxFilesystemNotFoundError, SandboxFilesystemPermissionError):
            got = None
        try:
            with sb.open(path, "rb") as f:
                via_open = f.read()
        except (FileNotFoundError, PermissionError):
            via_open = None
        assert got == via_open, path
        return got

    for path in (f"/tmp/p1-{tag}/etc/hostname", "/proc/1/root/etc/hostname",
                 "/proc/self/root/etc/hostname"):
        got = read_or_error(path)
        assert got is None or got.decode() == sandbox_hostname, path
    got = read_or_error("/proc/1/root/etc/passwd")
    assert got is None or got.decode() == sandbox_passwd
    for path in (f"/tmp/p1-{tag}{marker}", f"/proc/1/root{marker}", f"/proc/self/root{marker}",
                 f"/tmp/ps-{tag}/root{marker}", f"/proc/1/cwd{marker}"):
        assert read_or_error(path) is None, path
    for path in ("/proc/self/environ", f"/tmp/ps-{tag}/environ", "/proc/thread-self/environ",
                 "/proc/self/cmdline"):
        got = read_or_error(path)
        if TEST_RUNTIME == "gvisor" and got and path.endswith("cmdline"):
            # Under gVisor files are read by the agent, so /proc/self is the agent (the sandbox's
            # PID 1), never a host process: its command line is its own.
            assert got.startswith(b"/.shoal/agent\0"), got
            continue
        assert got is None or (b"SHOAL_HOME" not in got and b"shoal" not in got), path
    # Writes through the same links create nothing on the host.
    for path in (f"/tmp/p1-{tag}{tmp}/pw.txt", f"/proc/1/root{tmp}/pw.txt",
                 f"/proc/self/root{tmp}/pw.txt", f"/tmp/ps-{tag}/root{tmp}/pw.txt"):
        try:
            fs.write_text("PWNED", path)
        except SandboxFilesystemError:
            pass
        try:
            with sb.open(path, "w") as f:
                f.write("PWNED")
        except OSError:
            pass
    assert sorted(p.name for p in tmp.iterdir()) == ["host-only.txt", "marker.txt"]


@pytest.mark.timeout(30)
def test_device_nodes_and_fifos_are_never_opened(sb, tmp_path):
    d = uniq()
    if run(sb, f"mkdir {d} && mknod {d}/zero c 1 5")[0] != 0:
        # In a user namespace (SHOAL_USERNS) the kernel refuses device nodes to the sandbox; one
        # could still come from an image layer, so the host makes it to probe the file API.
        os.mknod(f"/proc/{sandbox_host_pid(sb)}/root{d}/zero", 0o20666, os.makedev(1, 5))
    sh(sb, f"mkfifo {d}/fifo && ln -s {d}/zero {d}/zlink && ln -s /dev/zero {d}/devzero")
    fs = sb.filesystem
    for name in ("zero", "fifo", "zlink", "devzero"):
        path = f"{d}/{name}"
        for mode in ("r", "rb", "w", "a", "r+", "x"):
            with pytest.raises((PermissionError, FileExistsError)) as ei:
                sb.open(path, mode)
            if mode != "x":
                assert isinstance(ei.value, PermissionError), (path, mode)
        with pytest.raises(SandboxFilesystemPermissionError):
            fs.read_bytes(path)
        with pytest.raises(SandboxFilesystemPermissionError):
            fs.copy_to_local(path, tmp_path / "never")
        assert list(tmp_path.iterdir()) == []
    for path in ("/dev/zero", "/dev/null", "/dev/urandom"):
        with pytest.raises(PermissionError):
            sb.open(path, "rb")
        with pytest.raises(SandboxFilesystemPermissionError):
            fs.read_bytes(path)
    # still a fifo and a device: nothing replaced them
    assert sh(sb, f"stat -c %F {d}/fifo {d}/zero") == "fifo\ncharacter special file\n"


# ============================================================================ ownership and mode

def test_new_files_are_root_0644_as_seen_inside(sb):
    d = uniq()
    sb.filesystem.write_text("a", f"{d}/deep/a")
    with sb.open(f"{d}/b", "w") as f:
        f.write("b")
    sb.filesystem.make_directory(f"{d}/dir")
    sb.mkdir(f"{d}/dir2")
    out = sh(sb, f"stat -c '%n %U %G %a' {d}/deep/a {d}/b {d}/deep {d}/dir {d}/dir2")
    assert out.splitlines() == [f"{d}/deep/a root root 644", f"{d}/b root root 644",
                                f"{d}/deep root root 755", f"{d}/dir root root 755",
                                f"{d}/dir2 root root 755"]
    st = sb.filesystem.stat(f"{d}/deep/a")
    assert (st.owner, st.group, st.mode) == ("root", "root", 0o644)


def test_overwrite_keeps_owner_and_mode(sb, tmp_path):
    d = uniq()
    sh(sb, f"mkdir {d} && for f in a b c d; do echo old > {d}/$f; done && "
           f"chmod 755 {d}/a {d}/b {d}/c {d}/d && chown 1000:1000 {d}/a {d}/b {d}/c {d}/d && "
           f"echo x > {d}/e && chmod 600 {d}/e && chown 1234:4321 {d}/e")
    local = tmp_path / "l"
    local.write_text("from local")
    sb.filesystem.write_text("new a", f"{d}/a")
    sb.filesystem.write_bytes(b"new b", f"{d}/b")
    sb.filesystem.copy_from_local(local, f"{d}/c")
    with sb.open(f"{d}/d", "w") as f:
        f.write("new d")
    sb.filesystem.write_text("new e", f"{d}/e")
    out = sh(sb, f"stat -c '%n %u %g %a' {d}/a {d}/b {d}/c {d}/d {d}/e")
    assert out.splitlines() == [f"{d}/a 1000 1000 755", f"{d}/b 1000 1000 755",
                                f"{d}/c 1000 1000 755", f"{d}/d 1000 1000 755",
                                f"{d}/e 1234 4321 600"]
    assert sh(sb, f"cat {d}/a {d}/b {d}/c {d}/d {d}/e") == "new anew bfrom localnew dnew e"
    st = sb.filesystem.stat(f"{d}/a")
    assert (st.owner, st.group, st.mode) == ("1000", "1000", 0o755)


# =================================================================================== volumes

@pytest.fixture(scope="module")
def vol_sb(app):
    with shoal.Volume.ephemeral() as vol:
        s = shoal.Sandbox.create(app=app, timeout=300, volumes={"/data": vol})
        try:
            yield s, vol
        finally:
            s.terminate()


def test_write_into_a_mounted_volume(vol_sb, tmp_path):
    sb, vol = vol_sb
    sb.filesystem.write_text("via filesystem", "/data/sub/a.txt")
    sb.filesystem.write_bytes(b"\x00bytes", "/data/b.bin")
    local = tmp_path / "l"
    local.write_bytes(b"from local")
    sb.filesystem.copy_from_local(local, "/data/up/c.txt")
    sb.mkdir("/data/dir")
    sb.filesystem.make_directory("/data/dir2/x")
    assert sh(sb, "cat /data/sub/a.txt /data/up/c.txt") == "via filesystemfrom local"
    assert sh(sb, "test -d /data/dir && test -d /data/dir2/x && echo ok") == "ok\n"
    # the volume itself has the files (the write went to the mount, not the overlay under it)
    assert b"".join(vol.read_file("sub/a.txt")) == b"via filesystem"
    assert b"".join(vol.read_file("b.bin")) == b"\x00bytes"
    assert b"".join(vol.read_file("up/c.txt")) == b"from local"
    assert sb.filesystem.stat("/data/sub/a.txt").size == len("via filesystem")
    assert sh(sb, "stat -c '%U %G %a' /data/sub/a.txt") == "root root 644\n"
    sb.filesystem.rename("/data/b.bin", "/data/b2.bin")
    sb.rm("/data/up", recursive=True)
    names = {e.path.strip("/") for e in vol.listdir("/", recursive=True)}
    assert "b2.bin" in names and "sub/a.txt" in names
    assert not {"b.bin", "up", "up/c.txt"} & names
    assert sh(sb, "ls -A /data | sort").split() == ["b2.bin", "dir", "dir2", "sub"]


def test_read_open_and_list_a_mounted_volume(vol_sb, tmp_path):
    sb, vol = vol_sb
    sh(sb, "mkdir -p /data/r && printf 'from inside' > /data/r/in.txt")
    assert sb.filesystem.read_text("/data/r/in.txt") == "from inside"
    with sb.open("/data/r/in.txt") as f:
        assert f.read() == "from inside"
    assert sb.ls("/data/r") == ["in.txt"]
    assert [e.name for e in sb.filesystem.list_files("/data/r")] == ["in.txt"]
    sb.filesystem.copy_to_local("/data/r/in.txt", tmp_path / "in.txt")
    assert (tmp_path / "in.txt").read_text() == "from inside"
    with sb.open("/data/r/in.txt", "a") as f:
        f.write("!")
    with sb.open("/data/r/new.txt", "w") as f:
        f.write("new")
    assert b"".join(vol.read_file("r/in.txt")) == b"from inside!"
    assert b"".join(vol.read_file("r/new.txt")) == b"new"


def test_read_on_another_in_sandbox_mount(sb):
    path = uniq("/dev/shm/t")
    sh(sb, f"printf shm > {path}")
    assert sb.filesystem.read_text(path) == "shm"


# ================================================================================= bad input

def _ops(sb, tmp_path):
    fs = sb.filesystem
    local = tmp_path / "local"
    local.write_bytes(b"x")
    return {
        "open": lambda p: sb.open(p, "w"),
        "open_r": lambda p: sb.open(p),
        "ls": lambda p: sb.ls(p),
        "mkdir": lambda p: sb.mkdir(p, parents=True),
        "rm": lambda p: sb.rm(p, recursive=True),
        "mv_src": lambda p: sb.mv(p, "/tmp/mv-dst"),
        "mv_dst": lambda p: sb.mv("/tmp/bad-path-src", p),
        "watch": lambda p: next(iter(sb.watch(p, timeout=1))),
        "read_bytes": lambda p: fs.read_bytes(p),
        "write_bytes": lambda p: fs.write_bytes(b"x", p),
        "write_text": lambda p: fs.write_text("x", p),
        "copy_from_local": lambda p: fs.copy_from_local(local, p),
        "copy_to_local": lambda p: fs.copy_to_local(p, tmp_path / "out"),
        "list_files": lambda p: fs.list_files(p),
        "stat": lambda p: fs.stat(p),
        "make_directory": lambda p: fs.make_directory(p),
        "remove": lambda p: fs.remove(p, recursive=True),
        "rename_src": lambda p: fs.rename(p, "/tmp/mv-dst"),
        "rename_dst": lambda p: fs.rename("/tmp/bad-path-src", p),
        "fs_watch": lambda p: next(iter(fs.watch(p, timeout=1))),
    }


BAD_PATHS = ["tmp/x", "", "etc", "/tmp/../etc/hostname", "/tmp/x/..", "/..", "/tmp/a\x00b"]


def test_bad_paths_are_invalid(sb, tmp_path):
    sh(sb, "echo src > /tmp/bad-path-src")
    for name, op in _ops(sb, tmp_path).items():
        for path in BAD_PATHS:
            with pytest.raises(InvalidError):
                op(path)
                pytest.fail(f"{name}({path!r}) did not raise")
    # nothing happened: the source is still in place, nothing written
    assert sh(sb, "cat /tmp/bad-path-src") == "src\n" and not exists_inside(sb, "/tmp/mv-dst")
    assert not (tmp_path / "out").exists()


# ===================================================================================== watch

def _watch_in_thread(make_iter, stop=None):
    state = {"events": [], "error": None}

    def run_():
        try:
            for ev in make_iter():
                state["events"].append(ev)
                if stop is not None and stop(ev):
                    break
        except BaseException as e:  # noqa: BLE001 - reported by the test
            state["error"] = e

    t = threading.Thread(target=run_, daemon=True)
    t.start()
    return t, state


def _until_watching(sb, d: str, state, t) -> None:
    """Touch probe files until the watch has reported one (the watch is set up server-side when
    the request arrives, which the thread does not tell us)."""
    deadline = time.monotonic() + 5
    i = 0
    while time.monotonic() < deadline:
        sh(sb, f"touch {d}/.probe{i}")
        i += 1
        time.sleep(0.1)
        if any(".probe" in p for e in state["events"] for p in e.paths) or not t.is_alive():
            return
    pytest.fail("the watch reported nothing")


def _is_end(ev: FileWatchEvent) -> bool:
    return any(p.endswith("/end") for p in ev.paths)


@pytest.mark.timeout(30)
def test_watch_create_modify_remove(sb):
    d = uniq("/tmp/w")
    sh(sb, f"mkdir {d}")
    t, state = _watch_in_thread(lambda: sb.watch(d, timeout=5), stop=_is_end)
    _until_watching(sb, d, state, t)
    sh(sb, f"echo a > {d}/f && echo b >> {d}/f && rm {d}/f && touch {d}/end")
    t.join(10)
    assert not t.is_alive() and state["error"] is None, state["error"]
    for ev in state["events"]:
        assert isinstance(ev, FileWatchEvent) and isinstance(ev.type, FileWatchEventType)
    types = {ev.type for ev in state["events"] if ev.paths == [f"{d}/f"]}
    assert {FileWatchEventType.Create, FileWatchEventType.Modify,
            FileWatchEventType.Remove} <= types, state["events"]
    # in order: created first, removed last
    f_events = [ev.type for ev in state["events"] if ev.paths == [f"{d}/f"]]
    assert f_events[0] == FileWatchEventType.Create and f_events[-1] == FileWatchEventType.Remove


@pytest.mark.timeout(30)
def test_watch_filter_only_create(sb):
    d = uniq("/tmp/w")
    sh(sb, f"mkdir {d}")
    t, state = _watch_in_thread(
        lambda: sb.watch(d, filter=[FileWatchEventType.Create], timeout=5), stop=_is_end)
    _until_watching(sb, d, state, t)
    sh(sb, f"echo a > {d}/f && echo b >> {d}/f && rm {d}/f && touch {d}/end")
    t.join(10)
    assert not t.is_alive() and state["error"] is None, state["error"]
    assert {ev.type for ev in state["events"]} == {FileWatchEventType.Create}
    assert [f"{d}/f"] in [ev.paths for ev in state["events"]]


@pytest.mark.timeout(30)
def test_watch_recursive(sb):
    d = uniq("/tmp/w")
    sh(sb, f"mkdir -p {d}/sub/subsub")
    t, state = _watch_in_thread(lambda: sb.filesystem.watch(d, recursive=True, timeout=5),
                                stop=_is_end)
    _until_watching(sb, d, state, t)
    sh(sb, f"echo a > {d}/sub/subsub/deep && echo b > {d}/sub/mid && touch {d}/end")
    t.join(10)
    assert not t.is_alive() and state["error"] is None, state["error"]
    created = [ev.paths for ev in state["events"] if ev.type == FileWatchEventType.Create]
    assert [f"{d}/sub/subsub/deep"] in created and [f"{d}/sub/mid"] in created

    # without recursive, events below a subdirectory are not reported
    t, state = _watch_in_thread(lambda: sb.watch(d, timeout=5), stop=_is_end)
    _until_watching(sb, d, state, t)
    sh(sb, f"echo a > {d}/sub/other && rm {d}/end && touch {d}/end")
    t.join(10)
    assert not t.is_alive() and state["error"] is None, state["error"]
    assert not [ev for ev in state["events"] if f"{d}/sub/other" in ev.paths]


@pytest.mark.timeout(30)
def test_watch_ends_after_timeout(sb):
    d = uniq("/tmp/w")
    sh(sb, f"mkdir {d}")
    started = time.monotonic()
    events = list(sb.watch(d, timeout=1))
    assert events == []
    assert 0.8 < time.monotonic() - started < 6


def test_watch_missing_path(sb):
    with pytest.raises(FileNotFoundError):
        next(iter(sb.watch("/tmp/definitely/not/here", timeout=1)))
    with pytest.raises(SandboxFilesystemNotFoundError):
        next(iter(sb.filesystem.watch("/tmp/definitely/not/here", timeout=1)))


# ======================================================================== sandbox ends / races

def test_file_calls_after_terminate(own_sb, tmp_path):
    sb = own_sb
    sb.filesystem.write_text("alive", "/tmp/f")
    assert sb.filesystem.read_text("/tmp/f") == "alive"
    handle = sb.open("/tmp/f", "r")
    sb.terminate()
    fs = sb.filesystem
    for op in (lambda: fs.read_bytes("/tmp/f"), lambda: fs.read_text("/tmp/f"),
               lambda: fs.write_text("x", "/tmp/f"), lambda: fs.stat("/tmp/f"),
               lambda: fs.list_files("/tmp"), lambda: fs.make_directory("/tmp/d"),
               lambda: fs.remove("/tmp/f"), lambda: fs.copy_to_local("/tmp/f", tmp_path / "f"),
               lambda: sb.open("/tmp/f"), lambda: sb.ls("/tmp"), lambda: sb.rm("/tmp/f"),
               lambda: handle.read(), lambda: next(iter(sb.watch("/tmp", timeout=1)))):
        with pytest.raises(SandboxTerminatedError):
            op()
    assert not (tmp_path / "f").exists()


@pytest.mark.timeout(30)
def test_watch_ends_when_the_sandbox_ends(own_sb):
    sb = own_sb
    sh(sb, "mkdir /tmp/w")
    t, state = _watch_in_thread(lambda: sb.watch("/tmp/w", timeout=20))
    _until_watching(sb, "/tmp/w", state, t)
    started = time.monotonic()
    sb.terminate()
    t.join(10)
    assert not t.is_alive()
    assert time.monotonic() - started < 10


def test_concurrent_writers_leave_one_whole_payload(sb):
    path = uniq()
    a, b = os.urandom(4 * MiB) + b"A", os.urandom(4 * MiB) + b"B"
    errors = []

    def writer(payload):
        try:
            for _ in range(4):
                sb.filesystem.write_bytes(payload, path)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(p,)) for p in (a, b)]
    for t in threads:
        t.start()
    writer(a if secrets.randbits(1) else b)  # and the main thread too
    for t in threads:
        t.join(60)
    assert not errors
    got = sb.filesystem.read_bytes(path)
    assert got in (a, b)
    digest = sh(sb, f"sha256sum {path}").split()[0]
    assert digest in (hashlib.sha256(a).hexdigest(), hashlib.sha256(b).hexdigest())
    d, name = path.rsplit("/", 1)
    assert [n for n in sh(sb, f"ls -A {d}").split() if n.startswith(".shoal-")] == []


@pytest.mark.timeout(120)
def test_terminate_during_copy_to_local(app, tmp_path):
    sb = shoal.Sandbox.create(app=app, timeout=120)
    size = 300 * MiB
    log_at = server_log_size()
    try:
        sh(sb, "head -c 300M /dev/urandom > /tmp/big")
        digest = sh(sb, "sha256sum /tmp/big").split()[0]
        dest = tmp_path / "big.bin"
        result = {}

        def copy():
            try:
                sb.filesystem.copy_to_local("/tmp/big", dest)
                result["ok"] = True
            except BaseException as e:  # noqa: BLE001
                result["error"] = e

        t = threading.Thread(target=copy)
        t.start()
        # wait until bytes are arriving (the temp file next to dest grows), then terminate
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and t.is_alive():
            tmps = [p for p in tmp_path.iterdir() if p.name.startswith(".big.bin.")]
            if tmps and tmps[0].stat().st_size > 0:
                break
            time.sleep(0.005)
        sb.terminate()
        t.join(60)
        assert not t.is_alive()
        if "error" in result:
            # The sandbox ended, not the server: said so (under gVisor the server cuts the
            # answer it had begun, and the SDK asks why), never "lost the shoal server".
            assert isinstance(result["error"], SandboxTerminatedError), repr(result["error"])
            assert not dest.exists()
        else:  # the server still held the file open: then the copy must be whole and intact
            assert dest.stat().st_size == size
            h = hashlib.sha256()
            with open(dest, "rb") as f:
                while chunk := f.read(8 * MiB):
                    h.update(chunk)
            assert h.hexdigest() == digest
        assert [p.name for p in tmp_path.iterdir()] in ([], ["big.bin"])  # no temp left
        # One warning line for the cut answer, no traceback.
        log = server_log_since(log_at)
        assert not [c for c in LOG_CRASHES if c in log], log[-3000:]
        if "error" in result and TEST_RUNTIME == "gvisor":
            assert f"reading /tmp/big in sandbox {sb.object_id} stopped" in log, log[-3000:]
    finally:
        sb.terminate()
    # the server keeps serving
    sb2 = shoal.Sandbox.create(app=app, timeout=60)
    try:
        assert sh(sb2, "echo still-serving") == "still-serving\n"
        sb2.filesystem.write_text("ok", "/tmp/ok")
        assert sb2.filesystem.read_text("/tmp/ok") == "ok"
    finally:
        sb2.terminate()


# ================================================================================ large files

def _maxrss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_one_gib_streams_both_ways(sb, tmp_path):
    size = 1 << 30
    src = tmp_path / "big.bin"
    block = bytearray(os.urandom(MiB))
    h = hashlib.sha256()
    with open(src, "wb") as f:
        for i in range(size // MiB):
            block[:8] = i.to_bytes(8, "big")  # every MiB differs: a reordered chunk shows
            f.write(block)
            h.update(block)
    digest = h.hexdigest()
    del block
    rss0 = _maxrss_bytes()
    remote = uniq() + "/big.bin"
    sb.filesystem.copy_from_local(src, remote)
    assert sh(sb, f"sha256sum {remote}").split()[0] == digest
    assert sb.filesystem.stat(remote).size == size
    src.unlink()
    out = tmp_path / "back.bin"
    sb.filesystem.copy_to_local(remote, out)
    grown = _maxrss_bytes() - rss0
    assert out.stat().st_size == size
    h = hashlib.sha256()
    with open(out, "rb") as f:
        while chunk := f.read(8 * MiB):
            h.update(chunk)
    assert h.hexdigest() == digest
    assert grown < 200 * MiB, f"client RSS grew by {grown >> 20} MiB for a 1 GiB transfer"
    sb.filesystem.remove(remote)



def test_blocking_file_handles_run_in_the_callers_thread(sandbox):
    """`sb.open` and its file's calls (and `with`), `sb.ls`/`mkdir`/`rm`, from the blocking
    face: in the caller's thread, no trip to the SDK loop (run_blocking's task)."""
    import asyncio

    from shoal._sync import get_loop

    loop = get_loop()
    made: list[str] = []

    def factory(loop, coro, **kwargs):
        made.append(getattr(coro, "__qualname__", ""))
        return asyncio.Task(coro, loop=loop, **kwargs)

    sandbox.ls("/")  # (the SDK's client is ready)
    loop.set_task_factory(factory)
    try:
        sandbox.mkdir("/tmp/handles", parents=True)
        with sandbox.open("/tmp/handles/f.txt", "w") as f:
            f.write("one\ntwo\n")
            f.flush()
            assert f.tell() == 8
        with sandbox.open("/tmp/handles/f.txt") as f:
            assert f.readline() == "one\n"
            assert f.read() == "two\n"
            f.seek(0)
            assert f.readlines() == ["one\n", "two\n"]
        assert sandbox.ls("/tmp/handles") == ["f.txt"]
        with pytest.raises(FileNotFoundError):
            sandbox.open("/tmp/handles/missing")
        sandbox.rm("/tmp/handles", recursive=True)
        assert not any("runner" in m for m in made), made
    finally:
        loop.set_task_factory(None)
