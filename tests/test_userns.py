"""User namespaces (issue 10, part 2): root in a runc sandbox is an unprivileged host uid range of
its own, while the image and volumes keep their owners inside.

The attack tests (marked "fails with SHOAL_USERNS=0") probe what root in a sandbox is to the host
kernel; run this module with the server's SHOAL_USERNS=0 and each of them fails, which is how they
were checked. The correctness tests (image owners, setuid, useradd, volume and snapshot owners) pass
either way: they prove the mapping costs the sandbox nothing.
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

import pytest
from conftest import runc_only, sandbox_host_pid

import shoal

pytestmark = runc_only("user namespaces are runc's; runsc isolates itself")

RANGE = 65536


host_pid = sandbox_host_pid


def host_uids(pid: int) -> list[int]:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return [int(x) for x in line.split()[1:]]
    raise AssertionError("no Uid line")


def sh(sb, script: str) -> str:
    p = sb.exec("bash", "-c", script)
    out, err = p.stdout.read(), p.stderr.read()
    assert p.wait() == 0, f"{script}\n{out}\n{err}"
    return out


def py(sb, code: str) -> str:
    p = sb.exec("python3", "-c", code)
    out, err = p.stdout.read(), p.stderr.read()
    assert p.wait() == 0, f"{out}\n{err}"
    return out.strip()


@pytest.fixture
def two(app):
    a = shoal.Sandbox.create(app=app, timeout=180)
    b = shoal.Sandbox.create(app=app, timeout=180)
    yield a, b
    a.terminate()
    b.terminate()


# --- attacks: each fails with SHOAL_USERNS=0 -------------------------------------------------------

def test_sandbox_root_is_an_unprivileged_host_uid(sandbox):
    """Root inside is uid 0 to itself, and a non-zero uid of its own range in the host's
    /proc/PID/status (real, effective, saved, fs). Fails with SHOAL_USERNS=0: host uid 0."""
    assert sh(sandbox, "id -u; id -g").split() == ["0", "0"]
    uids = host_uids(host_pid(sandbox))
    assert len(set(uids)) == 1 and uids[0] >= 0x80000, uids
    uid_map = Path(f"/proc/{host_pid(sandbox)}/uid_map").read_text().split()
    assert uid_map == ["0", str(uids[0]), str(RANGE)]


def test_two_sandboxes_have_disjoint_uid_ranges(two):
    """Fails with SHOAL_USERNS=0: both are host uid 0."""
    a, b = (host_uids(host_pid(s))[0] for s in two)
    assert abs(a - b) >= RANGE, (a, b)


NPROC_FORKS = """
import os, resource, time
resource.setrlimit(resource.RLIMIT_NPROC, (40, 40))
n = 0
for _ in range(80):
    try:
        pid = os.fork()
    except BlockingIOError:
        break
    if pid == 0:
        time.sleep(30)
        os._exit(0)
    n += 1
print(n)
"""


def test_process_count_limit_binds_root_and_is_not_shared(two):
    """RLIMIT_NPROC counts a uid's processes host-wide, and never binds host uid 0: a sandbox's
    root could not be limited, and its processes would count against host root's. With its own
    range the limit binds (sandbox A stops below 80) and B's budget is untouched by A's 40 live
    processes. Fails with SHOAL_USERNS=0: A forks all 80."""
    a, b = two
    n_a = int(py(a, NPROC_FORKS))  # its children sleep on while B forks
    n_b = int(py(b, NPROC_FORKS))
    assert n_a < 80, n_a
    assert n_b >= n_a - 2 and n_b > 20, (n_a, n_b)


INOTIFY_COUNT = """
import ctypes, os
libc = ctypes.CDLL(None, use_errno=True)
held = 0
for pid in filter(str.isdigit, os.listdir("/proc")):
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            if os.readlink(f"/proc/{pid}/fd/{fd}") == "anon_inode:inotify":
                held += 1
    except OSError:
        pass
made = []
while True:
    fd = libc.inotify_init1(0)
    if fd < 0:
        break
    made.append(fd)
print(held + len(made))
"""


def test_inotify_instances_are_the_sandboxes_own(sandbox):
    """inotify instances are counted per user (128 here) and charged to the owner of a user
    namespace: the namespace is made by the sandbox's own uid (not by runc, as host root), so the
    sandbox has the whole 128 and cannot use up host root's. This test holds one of host root's
    instances. Fails with SHOAL_USERNS=0: the sandbox shares host root's count (at most 127)."""
    limit = int(Path("/proc/sys/fs/inotify/max_user_instances").read_text())
    libc = ctypes.CDLL(None, use_errno=True)
    mine = libc.inotify_init1(0)
    assert mine >= 0
    try:
        assert int(py(sandbox, INOTIFY_COUNT)) == limit
    finally:
        os.close(mine)


def test_a_setuid_root_file_made_inside_is_not_host_root_owned(sandbox):
    """A setuid-root copy of a shell made inside the sandbox is, on the host (the overlay's upper
    dir, seen through the sandbox's root), owned by the sandbox's uid: reaching it from the host
    gives nobody's rights. Fails with SHOAL_USERNS=0: a setuid file owned by host uid 0."""
    sh(sandbox, "cp /bin/bash /tmp/rootshell && chmod 4755 /tmp/rootshell")
    assert sh(sandbox, "stat -c '%u %a' /tmp/rootshell").split() == ["0", "4755"]
    st = os.stat(f"/proc/{host_pid(sandbox)}/root/tmp/rootshell")
    assert st.st_mode & 0o4000
    assert st.st_uid != 0 and st.st_uid == host_uids(host_pid(sandbox))[0]


def test_host_root_files_bound_in_are_nobodys_inside(sandbox):
    """What the host binds in without an idmap (the tools at /.shoal, owned by host root) shows as
    the overflow id and cannot be changed by root inside. Fails with SHOAL_USERNS=0: 0:0, and
    chown works on it."""
    out = sh(sandbox, "stat -c '%u:%g' /.shoal/agent; chown 0:0 /.shoal/run 2>&1; "
                      "touch /.shoal/run/x && stat -c '%u' /.shoal/run/x")
    assert out.splitlines()[0] == "65534:65534", out


# --- the mapping costs the sandbox nothing (pass either way) ----------------------------------------

def test_image_owners_setuid_and_user_management_work(sandbox):
    out = sh(sandbox, """
        stat -c '%u:%g %a' / /etc/shadow /usr/bin/passwd /tmp
        useradd -m bob && su bob -c 'id -u; touch ~/f; stat -c %U ~/f'
        chown bob /tmp && stat -c %U /tmp && chown root /tmp
        apt-get --version >/dev/null && echo apt-ok
    """).split()
    root, shadow, passwd, tmp = out[0:2], out[2:4], out[4:6], out[6:8]
    assert root[0] == "0:0" and shadow[0] == "0:42" and passwd == ["0:0", "4755"], out
    assert tmp == ["0:0", "1777"], out
    assert out[8:12] == ["1000", "bob", "bob", "apt-ok"], out


def test_volume_files_keep_the_ids_the_sandbox_meant(app):
    """Root inside writes uid 0 on disk, uid 1000 writes 1000: a volume means the same in every
    sandbox, whatever their ranges, and the file API writes as root inside too."""
    with shoal.Volume.ephemeral() as vol:
        a = shoal.Sandbox.create(app=app, volumes={"/v": vol}, timeout=120)
        try:
            sh(a, "echo r > /v/root-file; mkdir /v/d; echo u > /v/d/user-file; "
                  "chown -R 1000:1000 /v/d")
            with a.open("/v/api-file", "w") as f:
                f.write("api")
            data = Path(os.environ["SHOAL_HOME"]) / "volumes" / vol.object_id / "data"
            owners = {p: (os.stat(data / p).st_uid, os.stat(data / p).st_gid)
                      for p in ("root-file", "d/user-file", "api-file")}
            assert owners == {"root-file": (0, 0), "d/user-file": (1000, 1000),
                              "api-file": (0, 0)}
            (data / "host-file").write_text("from the host")  # the raw path, as the server does
        finally:
            a.terminate()
        b = shoal.Sandbox.create(app=app, volumes={"/v": vol}, timeout=120)
        try:
            out = sh(b, "stat -c '%n %u:%g' /v/root-file /v/d/user-file /v/api-file "
                        "/v/host-file; echo x >> /v/d/user-file")
            assert out.split() == ["/v/root-file", "0:0", "/v/d/user-file", "1000:1000",
                                   "/v/api-file", "0:0", "/v/host-file", "0:0"], out
        finally:
            b.terminate()


def test_file_api_creates_files_as_root_inside(sandbox):
    """The server writes a sandbox's files as host root; in its upper dir they must be root's
    inside (the sandbox's uid on the host), not an unmapped host 0 that root inside cannot chown."""
    with sandbox.open("/tmp/made-by-handle", "w") as f:
        f.write("y")
    sandbox.mkdir("/tmp/made-dir")
    out = sh(sandbox, "stat -c '%u:%g' /tmp/made-by-handle /tmp/made-dir")
    assert out.split() == ["0:0", "0:0"], out
    sh(sandbox, "chown 1000:1000 /tmp/made-by-handle")
    assert {"made-by-handle", "made-dir"} <= set(sandbox.ls("/tmp"))


def test_snapshot_layers_are_portable(app):
    """A snapshot's layer holds the ids the sandbox meant (0, 1000), not the host ids of its range:
    a sandbox of the snapshot (another range) sees them as they were."""
    sb = shoal.Sandbox.create(app=app, timeout=120)
    try:
        sh(sb, "mkdir -p /srv/s && echo a > /srv/s/root-file && echo b > /srv/s/user-file && "
               "chown 1000:1000 /srv/s/user-file && cp /bin/true /srv/s/suid && "
               "chmod 4755 /srv/s/suid")
        image = sb.snapshot_filesystem()
    finally:
        sb.terminate()
    sb2 = shoal.Sandbox.create(app=app, image=image, timeout=120)
    try:
        out = sh(sb2, "stat -c '%n %u:%g %a' /srv/s/root-file /srv/s/user-file /srv/s/suid")
        assert out.split() == ["/srv/s/root-file", "0:0", "644", "/srv/s/user-file",
                               "1000:1000", "644", "/srv/s/suid", "0:0", "4755"], out
    finally:
        sb2.terminate()


def test_an_adopted_sandbox_keeps_its_range_and_file_owners(server, app):
    """After a kill -9 of the server, the next one adopts the sandbox with its range (recorded in
    its directory), and the file API still creates root's files inside."""
    sb = shoal.Sandbox.create(app=app, timeout=120)
    try:
        before = host_uids(host_pid(sb))[0]
        server.restart()
        with sb.open("/tmp/after-restart", "w") as f:
            f.write("x")
        assert sh(sb, "stat -c %u:%g /tmp/after-restart").strip() == "0:0"
        assert host_uids(host_pid(sb))[0] == before
    finally:
        sb.terminate()
