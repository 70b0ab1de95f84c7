"""What a sandbox cannot see or do: real runc sandboxes, probed from the inside.

Each test states one protection and compares what the sandbox observes with what the host observes
(or with what the kernel would answer without the protection), so that removing the protection makes
the test fail rather than pass vacuously. Syscall numbers are x86_64 (and i386 for the int 0x80
checks): this project only runs on x86_64.
"""

from __future__ import annotations

import json
import os
import socket
import tempfile
import uuid
from pathlib import Path

import pytest
from conftest import TEST_RUNTIME, TEST_USERNS, runc_only

import shoal

CGROUP_ROOT = Path("/sys/fs/cgroup")

# Docker's default capability set, as the kernel prints it in /proc/PID/status: CHOWN(0),
# DAC_OVERRIDE(1), FOWNER(3), FSETID(4), KILL(5), SETGID(6), SETUID(7), SETPCAP(8),
# NET_BIND_SERVICE(10), NET_RAW(13), SYS_CHROOT(18), MKNOD(27), AUDIT_WRITE(29), SETFCAP(31).
DOCKER_DEFAULT_CAPS = sum(1 << b for b in (0, 1, 3, 4, 5, 6, 7, 8, 10, 13, 18, 27, 29, 31))
assert DOCKER_DEFAULT_CAPS == 0xA80425FB
CAP_NET_ADMIN, CAP_SYS_MODULE, CAP_SYS_PTRACE, CAP_SYS_ADMIN = 12, 16, 19, 21


# --- helpers --------------------------------------------------------------------------------------

def run(sb, script: str) -> tuple[int, str, str]:
    """`bash -c script` in the sandbox: (returncode, stdout, stderr)."""
    p = sb.exec("bash", "-c", script)
    out = p.stdout.read()
    err = p.stderr.read()
    return p.wait(), out, err


def py(sb, code: str) -> tuple[int, str, str]:
    p = sb.exec("python3", "-c", code)
    out = p.stdout.read()
    err = p.stderr.read()
    return p.wait(), out, err


def py_json(sb, code: str):
    rc, out, err = py(sb, code)
    assert rc == 0, f"rc={rc}\nstdout={out}\nstderr={err}"
    return json.loads(out.strip().splitlines()[-1])


def status_fields(text: str) -> dict[str, str]:
    return {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in text.splitlines())}


def key_values(text: str) -> dict[str, str]:
    """`key value` lines (cgroup v1 stat files)."""
    return dict(line.split(None, 1) for line in text.splitlines() if line.strip())


def host_cgroup(controller: str, sid: str) -> Path:
    """The sandbox's cgroup directory for one v1 controller, seen from the host."""
    direct = CGROUP_ROOT / controller / "shoal" / sid
    if direct.is_dir():
        return direct
    found = list((CGROUP_ROOT / controller).glob(f"**/shoal/{sid}"))
    assert found, f"no {controller} cgroup for {sid} on the host"
    return found[0]


def host_server_pid() -> int:
    return int((Path(os.environ["SHOAL_HOME"]) / "server.pid").read_text())


@pytest.fixture(scope="module")
def shared(app):
    """One sandbox for the read-only probes (each of them leaves it as it found it). Without a
    network (block_network=True): the network probes below check that it has only loopback;
    sandboxes with a network are tested in test_network.py."""
    sb = shoal.Sandbox.create(app=app, timeout=300, block_network=True)
    yield sb
    sb.terminate()


# --- filesystem -----------------------------------------------------------------------------------

def test_host_file_is_unreachable_from_sandbox(shared):
    marker = f"shoal-isolation-{uuid.uuid4().hex}"
    with tempfile.TemporaryDirectory(prefix="shoal-iso-") as d:
        host_file = Path(d) / marker
        host_file.write_text("host secret " + marker)
        assert host_file.read_text().endswith(marker)  # it is there, on the host
        # Control: a file of the same name made inside the sandbox is what `find` reports, so an
        # empty answer below is not `find` failing.
        rc, out, err = run(shared, f"""
            cat {host_file}; echo "cat=$?"
            test -e {d}; echo "dir=$?"
            mkdir -p /var/tmp/ctl && echo inside > /var/tmp/ctl/{marker}-ctl
            find / -xdev -name '{marker}*' 2>/dev/null
            grep -rl --exclude-dir=proc --exclude-dir=sys 'host secret {marker}' / 2>/dev/null \
                | sed 's/^/grep-hit /'
            rm -rf /var/tmp/ctl
        """)
    assert "host secret" not in out
    assert "cat=1" in out and "No such file or directory" in err
    assert "dir=1" in out
    assert "grep-hit" not in out, out
    found = [line for line in out.splitlines() if marker in line]
    assert found == [f"/var/tmp/ctl/{marker}-ctl"], out


def test_sandbox_root_is_not_host_root(shared):
    host_root = os.stat("/")
    rc, out, err = run(shared, f"""
        stat -c '%d %i' /
        cat /etc/hostname; hostname
        for p in {Path(__file__).resolve().parent} {os.environ['SHOAL_HOME']} \
                 {os.environ['SHOAL_IMAGES']} /work; do test -e "$p" && echo "visible $p"; done
        true
    """)
    assert rc == 0, err
    lines = out.splitlines()
    dev, ino = map(int, lines[0].split())
    assert (dev, ino) != (host_root.st_dev, host_root.st_ino)
    assert dev != host_root.st_dev  # not even the same filesystem
    assert lines[1] != Path("/etc/hostname").read_text().strip()
    # UTS namespace: the sandbox has its own hostname, and the host's is untouched.
    assert lines[2] == "sandbox" != socket.gethostname()
    assert not [line for line in lines if line.startswith("visible")], out


def test_workdir_creation_does_not_follow_image_symlinks_onto_host(app):
    name = f"shoal-iso-{uuid.uuid4().hex}"
    host_path = Path("/run") / name
    assert not host_path.exists()
    sb = None
    try:
        sb = shoal.Sandbox.create(app=app, timeout=60, workdir=f"/var/run/{name}")
        rc, out, _ = run(sb, "pwd")
        assert (rc, out.strip()) == (0, f"/run/{name}")  # inside, the workdir is where it should be
        assert not host_path.exists(), f"creating the sandbox made {host_path} on the host"
    finally:
        if sb is not None:
            sb.terminate()
        if host_path.is_dir():
            host_path.rmdir()  # undo the escape


def test_workdir_cannot_reach_host_through_leaked_runc_fds(app, shared, tmp_path):
    """CVE-2024-21626 (runc < 1.1.12 unpatched): a cwd of /proc/self/fd/N could be a host directory
    that runc leaked into the container; `..` from there walks the host's tree."""
    marker = tmp_path / f"host-marker-{uuid.uuid4().hex}"
    marker.write_text("HOST-ONLY")
    climb = "../" * 12 + str(marker).lstrip("/")
    # Control: from a host directory (runc leaked /sys/fs/cgroup), the climb reaches the marker.
    assert Path("/sys/fs/cgroup", climb).read_text() == "HOST-ONLY"
    for n in range(3, 10):
        try:
            p = shared.exec("cat", climb, workdir=f"/proc/self/fd/{n}")
            out = p.stdout.read()
            p.stderr.read()
            p.wait()
        except shoal.exception.Error:
            continue
        assert "HOST-ONLY" not in out, f"exec workdir /proc/self/fd/{n} reached the host"
    for n in range(5, 10):
        try:
            sb = shoal.Sandbox.create("cat", climb, app=app, timeout=30,
                                      workdir=f"/proc/self/fd/{n}")
        except shoal.exception.Error:
            continue
        try:
            sb.wait(raise_on_termination=False)
            assert "HOST-ONLY" not in sb.stdout.read(), f"workdir /proc/self/fd/{n} reached host"
        finally:
            sb.terminate()


def test_sandbox_has_own_pid_net_ipc_uts_mount_namespaces(shared):
    kinds = ["pid", "net", "ipc", "uts", "mnt"]
    inside = py_json(shared, f"import json, os; print(json.dumps("
                             f"{{k: os.readlink('/proc/self/ns/' + k) for k in {kinds!r}}}))")
    for kind in kinds:
        assert inside[kind] != os.readlink(f"/proc/self/ns/{kind}"), kind


def test_sandboxes_cannot_see_each_other(shared, sandbox):
    marker = f"shoal-peer-{uuid.uuid4().hex}"
    rc, out, err = run(sandbox, f"echo {marker} > /tmp/{marker}; "
                                f"(exec -a {marker} sleep 60) >/dev/null 2>&1 & sleep 0.2; "
                                f"grep -l {marker} /proc/[0-9]*/cmdline | wc -l")
    assert rc == 0 and int(out.strip()) >= 1, (out, err)  # visible in its own sandbox
    rc, out, err = run(shared, f"cat /tmp/{marker}; grep -l {marker} /proc/[0-9]*/cmdline; "
                               f"find / -xdev -name '{marker}' 2>/dev/null; true")
    assert marker not in out, out


# --- processes ------------------------------------------------------------------------------------

def test_host_processes_are_invisible(shared):
    procs = py_json(shared, """
import json, os
procs = {}
for pid in os.listdir('/proc'):
    if pid.isdigit():
        try:
            procs[pid] = open(f'/proc/{pid}/cmdline', 'rb').read().replace(b'\\0', b' ').decode()
        except OSError:
            pass
try:
    exe1 = os.readlink('/proc/1/exe')
except PermissionError:
    exe1 = 'denied'
print(json.dumps({'procs': procs, 'exe1': exe1, 'self': os.getpid()}))
""")
    cmdlines = procs["procs"]
    # PID 1 is shoal's agent, which makes itself non-dumpable: the sandbox cannot read its
    # memory, environment or exe link.
    assert procs["exe1"] == "denied"
    assert cmdlines["1"].startswith("/.shoal/agent")
    # The init, the entrypoint, this exec (and perhaps a finishing earlier one): nothing else.
    assert len(cmdlines) <= 6, cmdlines
    assert str(procs["self"]) in cmdlines and procs["self"] < 1000  # a fresh PID numbering
    assert not any("pytest" in c or "shoal serve" in c or "-m shoal" in c or "runc" in c
                   for c in cmdlines.values()), cmdlines
    rc, out, err = run(shared, "ps -e --no-headers | wc -l")
    assert rc == 0 and int(out) <= 6, out


def test_sandbox_cannot_see_or_signal_shoal_server(shared):
    server_pid = host_server_pid()
    os.kill(server_pid, 0)  # control: the server is alive and signalable from the host
    sock = Path(os.environ["SHOAL_HOME"]) / "shoal.sock"
    assert sock.is_socket()
    rc, out, err = run(shared, f"""
        kill -0 {server_pid} 2>&1; echo "kill=$?"
        test -e /proc/{server_pid} && cat /proc/{server_pid}/cmdline | tr '\\0' ' '; echo
        test -e {sock}; echo "sock=$?"
        grep -c '{sock}' /proc/net/unix
        true
    """)
    lines = out.splitlines()
    assert "kill=1" in lines, out
    assert "shoal" not in out.replace(str(sock), ""), out
    assert "sock=1" in lines, out
    assert lines[-1] == "0", out  # the server's socket is not even listed in the sandbox's netns
    os.kill(server_pid, 0)  # and the server is still there


def test_init_reaps_orphaned_zombies(shared):
    res = py_json(shared, """
import json, os, time
r, w = os.pipe()
hold_r, hold_w = os.pipe()  # the grandchild lives until we close hold_w
child = os.fork()
if child == 0:
    grandchild = os.fork()
    if grandchild == 0:
        os.close(hold_w)
        os.read(hold_r, 1)
        os._exit(0)
    os.write(w, str(grandchild).encode())
    os._exit(0)
os.close(w)
os.close(hold_r)
os.waitpid(child, 0)
gc = int(os.read(r, 32))
# The orphan now belongs to the sandbox's PID 1, which must reap it when it exits.
ppid = [l.split()[1] for l in open(f'/proc/{gc}/status') if l.startswith('PPid:')][0]
os.close(hold_w)
deadline = time.monotonic() + 5
while os.path.exists(f'/proc/{gc}') and time.monotonic() < deadline:
    time.sleep(0.05)
state = None
if os.path.exists(f'/proc/{gc}'):
    state = [l for l in open(f'/proc/{gc}/status') if l.startswith('State:')][0].strip()
print(json.dumps({'ppid': ppid, 'left': state}))
""")
    assert res["ppid"] == "1"
    assert res["left"] is None, f"orphan not reaped by init: {res['left']}"
    rc, out, err = run(shared, "ps -eo stat= ")
    assert rc == 0 and not [s for s in out.split() if s.startswith("Z")], out


# --- privileges -----------------------------------------------------------------------------------

@pytest.mark.parametrize("who", ["entrypoint", "exec"])
def test_capabilities_are_docker_default_with_no_new_privs_and_seccomp(shared, who):
    path = "/proc/1/status" if who == "entrypoint" else "/proc/self/status"
    rc, out, err = run(shared, f"cat {path}")
    assert rc == 0, err
    st = status_fields(out)
    if who == "entrypoint":
        assert st["Name"] == "agent", st["Name"]
    for field in ("CapEff", "CapPrm", "CapBnd"):
        caps = int(st[field], 16)
        assert caps == DOCKER_DEFAULT_CAPS, f"{field}={st[field]}"
        for bit in (CAP_SYS_ADMIN, CAP_SYS_PTRACE, CAP_SYS_MODULE, CAP_NET_ADMIN):
            assert not caps & (1 << bit), f"{field} has capability {bit}"
    assert int(st["CapInh"], 16) == 0 and int(st.get("CapAmb", "0"), 16) == 0
    if TEST_RUNTIME == "gvisor":
        return  # gVisor's /proc/<pid>/status has no CapAmb, NoNewPrivs, Seccomp (docs/gvisor.md)
    assert st["NoNewPrivs"] == "1"
    assert st["Seccomp"] == "2"  # filter mode


SECCOMP_PROBE = r"""
import ctypes, errno, json, os, subprocess, threading
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
CLONE_NEWUSER, SIGCHLD = 0x10000000, 17

def result(r):
    return "ok" if r >= 0 else errno.errorcode[ctypes.get_errno()]

def sc(nr, *args):
    ctypes.set_errno(0)
    return result(libc.syscall(ctypes.c_long(nr), *[ctypes.c_long(a) for a in args]))

# Arguments are chosen so that, without the filter, the kernel answers something other than EPERM
# (or succeeds harmlessly): an EPERM here is the filter's.
res = {}
res["ptrace"] = sc(101, 16, 999999, 0, 0)           # PTRACE_ATTACH to no process: ESRCH
res["keyctl"] = sc(250, 0, -3, 0)                   # KEYCTL_GET_KEYRING_ID(session): succeeds
res["bpf"] = sc(321, 9999, 0, 0)                    # unknown command: EINVAL
res["perf_event_open"] = sc(298, 0, 0, -1, -1, 0)   # NULL attr: EFAULT
res["io_uring_setup"] = sc(425, 1, 0)               # NULL params: EFAULT
res["setns"] = sc(308, -1, 0)                       # bad fd: EBADF
res["userfaultfd"] = sc(323, 0)                     # succeeds
res["open_by_handle_at"] = sc(304, -1, 0, 0)        # EFAULT
ctypes.set_errno(0)
res["mount"] = result(libc.mount(b"none", b"/nonexistent-shoal-probe", b"tmpfs", 0, None))
res["clone3"] = sc(435, 0, 0)                       # NULL args: EINVAL; filtered: ENOSYS
r = libc.syscall(ctypes.c_long(56), ctypes.c_long(CLONE_NEWUSER | SIGCHLD), ctypes.c_long(0),
                 ctypes.c_long(0), ctypes.c_long(0), ctypes.c_long(0))
if r == 0:
    os._exit(0)
res["clone_newuser"] = result(r)
if r > 0:
    os.waitpid(r, 0)
# Normal programs still work: fork, threads (glibc tries clone3 first and falls back), spawn.
pid = os.fork()
if pid == 0:
    os._exit(7)
res["fork"] = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
box = []
t = threading.Thread(target=lambda: box.append(threading.get_native_id()))
t.start(); t.join()
res["thread"] = "ok" if box and box[0] != threading.get_native_id() else "failed"
res["subprocess"] = subprocess.run(["sh", "-c", "exit 5"]).returncode
ctypes.set_errno(0)
res["unshare_newuser"] = result(libc.unshare(CLONE_NEWUSER))   # last: on the host it succeeds
print(json.dumps(res))
"""

DENIED = ["ptrace", "keyctl", "bpf", "perf_event_open", "io_uring_setup", "setns", "userfaultfd",
          "open_by_handle_at", "mount", "clone_newuser", "unshare_newuser"]


def host_has_seccomp() -> bool:
    return status_fields(Path("/proc/self/status").read_text()).get("Seccomp", "0") != "0"


def run_on_host(code: str) -> dict:
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=30).stdout
    return json.loads(out.strip().splitlines()[-1])


@runc_only("under gVisor these system calls are served by gVisor's own kernel, never the host's; "
           "the OCI seccomp filter is not applied there (docs/gvisor.md)")
def test_seccomp_denies_namespace_mount_trace_key_bpf_syscalls_but_not_fork(shared):
    inside = py_json(shared, SECCOMP_PROBE)
    for name in DENIED:
        assert inside[name] == "EPERM", f"{name}: {inside[name]}"
    assert inside["clone3"] == "ENOSYS"
    assert inside["fork"] == 7 and inside["thread"] == "ok" and inside["subprocess"] == 5
    # Control: the same probe on the (unfiltered) host gets other answers, so the EPERMs above are
    # the sandbox's filter and not the probe's arguments.
    if not host_has_seccomp():
        host = run_on_host(SECCOMP_PROBE)
        for name in DENIED:
            assert host[name] != "EPERM", f"host {name}: {host[name]}"
        assert host["clone3"] != "ENOSYS"


ABI_PROBE = r"""
import ctypes, errno, json, mmap, os, struct
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
X32 = 0x40000000

def x32(nr, *args):
    ctypes.set_errno(0)
    r = libc.syscall(ctypes.c_long(X32 | nr), *[ctypes.c_long(a) for a in args])
    return "ok" if r >= 0 else errno.errorcode.get(ctypes.get_errno(), "?")

def int80(nr, a=0, b=0, c=0):
    # A 32-bit syscall from a 64-bit process (int 0x80), in a child in case the kernel lacks ia32:
    # push rbx; mov eax,nr; mov ebx,a; mov ecx,b; mov edx,c; int 0x80; pop rbx; movsxd rax,eax; ret
    code = (b"\x53\xb8" + struct.pack("<i", nr) + b"\xbb" + struct.pack("<i", a) + b"\xb9"
            + struct.pack("<i", b) + b"\xba" + struct.pack("<i", c)
            + b"\xcd\x80\x5b\x48\x63\xc0\xc3")
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        buf = mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
        buf.write(code)
        ret = ctypes.CFUNCTYPE(ctypes.c_long)(ctypes.addressof(ctypes.c_char.from_buffer(buf)))()
        os.write(w, str(ret).encode())
        os._exit(0)
    os.close(w)
    os.waitpid(pid, 0)
    out = os.read(r, 64)
    if not out:
        return "no-ia32"
    ret = int(out)
    return "ok" if ret >= 0 else errno.errorcode.get(-ret, "?")

print(json.dumps({
    "i386_getpid": int80(20),
    "i386_keyctl": int80(288, 0, -3, 0),
    "i386_ptrace": int80(26, 16, 999999, 0),
    "i386_unshare": int80(310, 0x10000000),
    "x32_keyctl": x32(250, 0, -3, 0),
    "x32_unshare": x32(272, 0x10000000),
}))
"""


@runc_only("gVisor serves every ABI itself; the OCI seccomp filter is not applied there")
def test_seccomp_also_filters_i386_and_x32_syscall_abis(shared):
    """A deny-list keyed on x86_64 numbers alone is bypassed by `int 0x80` (i386 numbering)."""
    inside = py_json(shared, ABI_PROBE)
    if inside["i386_getpid"] == "ok":
        for name in ("i386_keyctl", "i386_ptrace", "i386_unshare"):
            assert inside[name] == "EPERM", f"{name}: {inside[name]}"
    for name in ("x32_keyctl", "x32_unshare"):
        assert inside[name] in ("EPERM", "ENOSYS"), f"{name}: {inside[name]}"
    if not host_has_seccomp():
        host = run_on_host(ABI_PROBE)
        if host["i386_getpid"] == "ok":
            assert host["i386_keyctl"] == "ok" and host["i386_ptrace"] == "ESRCH"


def test_host_devices_unusable_even_with_mknod(shared):
    """CAP_MKNOD is in the default set; the devices cgroup must stop it reaching host disks."""
    disks = [line.split() for line in Path("/proc/partitions").read_text().splitlines()[2:] if line]
    assert disks, "no block device on the host to try"
    major, minor, _, name = disks[0]
    res = py_json(shared, f"""
import errno, json, os, stat
out = {{}}
for label, mode, dev in [('disk', stat.S_IFBLK, os.makedev({major}, {minor})),
                         ('mem', stat.S_IFCHR, os.makedev(1, 1)),
                         ('kmsg', stat.S_IFCHR, os.makedev(1, 11))]:
    path = '/dev/probe-' + label
    try:
        os.mknod(path, mode | 0o600, dev)
        fd = os.open(path, os.O_RDONLY)
        out[label] = 'read %d bytes' % len(os.read(fd, 512))
        os.close(fd)
    except OSError as e:
        out[label] = errno.errorcode[e.errno]
    finally:
        if os.path.lexists(path):
            os.unlink(path)
out['listing'] = sorted(os.listdir('/dev'))
print(json.dumps(out))
""")
    for label in ("disk", "mem", "kmsg"):
        # gVisor has no host devices at all: a node made inside opens nothing (ENXIO)
        allowed = ("EPERM",) if TEST_RUNTIME == "runc" else ("EPERM", "ENXIO")
        assert res[label] in allowed, f"{label}: {res[label]}"
    assert name not in res["listing"] and "mem" not in res["listing"], res["listing"]


# --- /proc and /sys -------------------------------------------------------------------------------

def test_sensitive_proc_files_are_masked(shared):
    # On the host these have content (kcore does not exist on this kernel: CONFIG_PROC_KCORE unset).
    candidates = ["/proc/kcore", "/proc/keys", "/proc/timer_list", "/proc/sched_debug",
                  "/proc/latency_stats", "/proc/timer_stats"]
    host_nonempty = [p for p in candidates if Path(p).exists()
                     and len(Path(p).read_bytes()[:4096]) > 0]
    assert "/proc/keys" in host_nonempty and "/proc/timer_list" in host_nonempty
    res = py_json(shared, f"""
import json, os
out = {{}}
for p in {candidates!r}:
    try:
        with open(p, 'rb') as f:
            out[p] = len(f.read(4096))
    except OSError as e:
        out[p] = e.strerror
acpi = os.listdir('/proc/acpi') if os.path.isdir('/proc/acpi') else []
print(json.dumps({{'read': out, 'acpi': acpi}}))
""")
    for p in candidates:
        got = res["read"][p]
        assert got == 0 or isinstance(got, str), f"{p} readable inside: {got} bytes"
    for p in host_nonempty:
        assert res["read"][p] in (0, "No such file or directory"), (p, res["read"][p])
    assert res["acpi"] == []


WRITE_PROBE = r"""
import errno, json, os
out = {}
def try_open(label, paths):
    # O_WRONLY is refused at open() on a read-only mount; if it were allowed, nothing is written.
    for p in paths:
        if os.path.exists(p):
            try:
                os.close(os.open(p, os.O_WRONLY))
                out[label] = "writable " + p
            except OSError as e:
                out[label] = errno.errorcode[e.errno]
            return
    out[label] = "absent"
try_open("proc_sys_hostname", ["/proc/sys/kernel/hostname"])
try_open("proc_sys_vm", ["/proc/sys/vm/drop_caches"])
try_open("sysrq_trigger", ["/proc/sysrq-trigger"])
try_open("sys_attr", ["/sys/kernel/mm/transparent_hugepage/enabled", "/sys/kernel/uevent_helper",
                      "/sys/power/state"])
try:
    os.mkdir("/sys/kernel/shoal-probe")
    os.rmdir("/sys/kernel/shoal-probe")
    out["sys_mkdir"] = "ok"
except OSError as e:
    out["sys_mkdir"] = errno.errorcode[e.errno]
out["firmware"] = os.listdir("/sys/firmware")
out["hostname"] = open("/proc/sys/kernel/hostname").read().strip()
print(json.dumps(out))
"""


def test_proc_sys_and_sys_are_read_only(shared):
    assert os.listdir("/sys/firmware"), "control: the host's /sys/firmware has entries"
    res = py_json(shared, WRITE_PROBE)
    for label in ("proc_sys_hostname", "proc_sys_vm", "sys_attr"):
        if TEST_RUNTIME == "gvisor":
            # gVisor's own /proc and /sys: its hostname is gVisor's UTS namespace's only, and
            # most kernel files do not exist at all
            if label != "proc_sys_hostname":
                assert res[label] in ("EROFS", "absent"), f"{label}: {res[label]}"
            continue
        # In a user namespace these files belong to host root, who is nobody inside: the write is
        # refused for that (EACCES) before the read-only mount is reached.
        assert res[label] in (("EROFS", "EACCES") if TEST_USERNS else ("EROFS",)), \
            f"{label}: {res[label]}"
    # /proc/sysrq-trigger only exists with CONFIG_MAGIC_SYSRQ (not on this kernel).
    expected = "EROFS" if Path("/proc/sysrq-trigger").exists() else "absent"
    if TEST_RUNTIME == "runc":  # gVisor has its own /proc/sysrq-trigger, which reaches no host
        assert res["sysrq_trigger"] == expected, res["sysrq_trigger"]
    assert res["sys_mkdir"] in ("EROFS", "EPERM", "ENOENT"), res["sys_mkdir"]
    assert res["firmware"] == []  # masked
    assert res["hostname"] == "sandbox"


# --- network --------------------------------------------------------------------------------------

def test_network_has_only_loopback_and_no_route_out(shared):
    res = py_json(shared, """
import errno, json, socket, time
ifaces = [l.split(':')[0].strip() for l in open('/proc/net/dev').read().splitlines()[2:]]
s = socket.socket()
s.settimeout(2)
t = time.monotonic()
try:
    s.connect(('1.1.1.1', 80))
    err = 'connected'
except OSError as e:
    err = errno.errorcode.get(e.errno, str(e)) if e.errno else type(e).__name__
print(json.dumps({'ifaces': ifaces, 'err': err, 'secs': time.monotonic() - t}))
""")
    assert res["ifaces"] == ["lo"]
    host_ifaces = {line.split(":")[0].strip()
                   for line in Path("/proc/net/dev").read_text().splitlines()[2:]}
    assert host_ifaces - {"lo"}, "control: the host has a non-loopback interface"
    # (gVisor's loopback-only stack says EHOSTUNREACH)
    assert res["err"] in (("ENETUNREACH",) if TEST_RUNTIME == "runc"
                          else ("ENETUNREACH", "EHOSTUNREACH")), res
    assert res["secs"] < 1.0, res  # refused at once, not a timeout


def test_loopback_works_inside_sandbox(shared):
    port = 18000 + uuid.uuid4().int % 2000
    server = shared.exec("python3", "-c", f"""
import socket
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(('127.0.0.1', {port}))
s.listen(1)
s.settimeout(15)
c, _ = s.accept()
c.sendall(b'echo:' + c.recv(64))
c.close()
""")
    rc, out, err = py(shared, f"""
import socket, time
deadline = time.monotonic() + 10
while True:
    try:
        c = socket.create_connection(('127.0.0.1', {port}), timeout=2)
        break
    except ConnectionRefusedError:
        if time.monotonic() > deadline:
            raise
        time.sleep(0.05)
c.sendall(b'ping')
print(c.recv(64).decode())
""")
    assert (rc, out.strip()) == (0, "echo:ping"), err
    assert server.wait() == 0, server.stderr.read()


# --- resource limits ------------------------------------------------------------------------------

@runc_only("over its memory limit a gVisor sandbox ends as a whole (tests/test_runtimes.py)")
def test_memory_limit_oom_kills_process_and_sandbox_survives(app):
    sb = shoal.Sandbox.create(app=app, timeout=60, memory=(64, 64))
    try:
        mem = host_cgroup("memory", sb.object_id)
        assert int((mem / "memory.limit_in_bytes").read_text()) == 64 << 20
        memsw = mem / "memory.memsw.limit_in_bytes"
        if memsw.exists():  # swap = limit: the sandbox cannot swap its way past the limit
            assert int(memsw.read_text()) == 64 << 20
        # Control: 20 MB is fine, so 137 below is the limit and not python failing.
        assert py(sb, "x = b'\\x01' * (20 << 20); print(len(x))")[:2] == (0, f"{20 << 20}\n")
        rc, out, err = py(sb, "x = b'\\x01' * (200 << 20); print('allocated', len(x))")
        assert rc == 137, (rc, out, err)
        assert "allocated" not in out
        assert sb.poll() is None  # the sandbox itself is still running
        assert run(sb, "echo alive")[:2] == (0, "alive\n")
        oom = key_values((mem / "memory.oom_control").read_text())
        if "oom_kill" in oom:  # the kernel counted the kill in this sandbox's cgroup
            assert int(oom["oom_kill"]) >= 1
    finally:
        sb.terminate()


@pytest.mark.slow
@runc_only("a host pids.max panics gVisor: its pids limit is RLIMIT_NPROC "
           "(tests/test_runtimes.py)")
def test_pids_limit_stops_task_explosion_and_sandbox_stays_usable(app):
    sb = shoal.Sandbox.create(app=app, timeout=60)
    sid = sb.object_id
    try:
        pids = host_cgroup("pids", sid)
        assert (pids / "pids.max").read_text().strip() == "4096"
        # Threads are tasks, which is what pids.max counts: they make the cheapest bomb. Bounded at
        # 6000 so that, were the limit missing, the test ends (and fails) instead of the host.
        res = py_json(sb, """
import errno, json, os, threading, time
threading.stack_size(64 * 1024)
stop = threading.Event()
n, thread_error = 0, None
t0 = time.monotonic()
for _ in range(6000):
    t = threading.Thread(target=stop.wait, daemon=True)
    try:
        t.start()
    except RuntimeError as e:
        thread_error = str(e)
        break
    n += 1
try:
    pid = os.fork()
except OSError as e:
    fork_error = errno.errorcode[e.errno]
else:
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
    fork_error = None
stop.set()
print(json.dumps({'threads': n, 'thread_error': thread_error, 'fork_error': fork_error,
                  'secs': time.monotonic() - t0}))
""")
        assert res["thread_error"] is not None, res
        assert 3900 < res["threads"] < 4096, res  # stopped by the 4096 cap, not by anything else
        assert res["fork_error"] == "EAGAIN", res
        events = (pids / "pids.events").read_text()
        assert int(events.split()[1]) >= 1, events  # the cgroup counted refusals
        # The sandbox recovers: its tasks are gone and it runs commands again.
        assert run(sb, "echo alive")[:2] == (0, "alive\n")
        assert int((pids / "pids.current").read_text()) < 20
    finally:
        sb.terminate()
    assert sb.poll() == 137
    assert not (CGROUP_ROOT / "pids" / "shoal" / sid).exists()


@pytest.mark.slow
def test_cpu_limit_sets_quota_and_throttles(app):
    sb = shoal.Sandbox.create(app=app, timeout=60, cpu=(0.5, 0.5))
    try:
        cpu = host_cgroup("cpu", sb.object_id)
        assert int((cpu / "cpu.cfs_period_us").read_text()) == 100_000
        assert int((cpu / "cpu.cfs_quota_us").read_text()) == 50_000
        before = key_values((cpu / "cpu.stat").read_text())
        # Two busy processes for 1.5 s of wall time on a 2-core host: ~3 s of CPU unthrottled,
        # at most ~0.75 s (+ one period of slack) under a 0.5 quota.
        res = py_json(sb, """
import json, os, resource, time
wall = 1.5
start = time.monotonic()
kids = []
for _ in range(2):
    pid = os.fork()
    if pid == 0:
        while time.monotonic() - start < wall:
            pass
        os._exit(0)
    kids.append(pid)
for pid in kids:
    os.waitpid(pid, 0)
ru = resource.getrusage(resource.RUSAGE_CHILDREN)
print(json.dumps({'cpu': ru.ru_utime + ru.ru_stime, 'wall': time.monotonic() - start}))
""")
        after = key_values((cpu / "cpu.stat").read_text())
        if TEST_RUNTIME == "runc":  # gVisor's rusage counts throttled time as run time
            assert res["cpu"] <= 0.5 * res["wall"] + 0.3, res
        assert int(after["nr_throttled"]) > int(before["nr_throttled"]), (before, after)
    finally:
        sb.terminate()
