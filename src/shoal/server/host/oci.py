"""The OCI runtime spec (config.json) for one sandbox.

Everything about isolation that is decided per sandbox is decided here, in one pure function, so it
can be read (and tested) without starting anything: namespaces, capabilities, seccomp, masked /proc
paths, cgroup limits and mounts.
"""

from __future__ import annotations

import os
import resource
from dataclasses import dataclass, field

from shoal.server.host import tools

# Docker's default capability set: enough for package managers and `chown`, nothing that touches the
# host kernel (no SYS_ADMIN, SYS_PTRACE, SYS_MODULE, NET_ADMIN, ...).
DEFAULT_CAPABILITIES = [
    "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FSETID", "CAP_FOWNER", "CAP_MKNOD", "CAP_NET_RAW",
    "CAP_SETGID", "CAP_SETUID", "CAP_SETFCAP", "CAP_SETPCAP", "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT", "CAP_KILL", "CAP_AUDIT_WRITE",
]

# A deny-list rather than Docker's allow-list: libseccomp compiles the filter on every create and exec,
# and a ~60-entry deny-list costs ~2 ms where the full allow-list costs ~23 ms (RUNTIME-NOTES.md).
# The list covers what Docker's profile denies to a container without CAP_SYS_ADMIN, plus io_uring.
DENIED_SYSCALLS = [
    # mounts and namespaces
    "mount", "umount", "umount2", "pivot_root", "setns", "unshare", "fsopen", "fsconfig", "fsmount",
    "fspick", "move_mount", "open_tree", "mount_setattr",
    # kernel, modules, tracing, keys
    "bpf", "perf_event_open", "ptrace", "process_vm_readv", "process_vm_writev", "kcmp",
    "keyctl", "add_key", "request_key", "kexec_load", "kexec_file_load",
    "init_module", "finit_module", "delete_module", "create_module", "get_kernel_syms",
    "query_module", "lookup_dcookie", "nfsservctl", "uselib", "userfaultfd",
    "open_by_handle_at", "name_to_handle_at",
    # the machine itself
    "reboot", "swapon", "swapoff", "acct", "syslog", "quotactl", "vhangup", "iopl", "ioperm",
    "settimeofday", "clock_settime", "clock_settime64", "clock_adjtime", "clock_adjtime64",
    "adjtimex", "stime", "pciconfig_read", "pciconfig_write", "pciconfig_iobase",
    "_sysctl", "sysfs", "ustat", "vm86", "vm86old",
    # io_uring bypasses seccomp for the operations it performs
    "io_uring_setup", "io_uring_enter", "io_uring_register",
]
EPERM, ENOSYS = 1, 38
CLONE_NEWUSER = 0x10000000
AF_VSOCK = 40

# Paths under /proc and /sys that leak host information or allow host-wide effects (Docker's lists).
MASKED_PATHS = [
    "/proc/asound", "/proc/acpi", "/proc/kcore", "/proc/keys", "/proc/latency_stats",
    "/proc/timer_list", "/proc/timer_stats", "/proc/sched_debug", "/proc/scsi",
    "/sys/firmware", "/sys/devices/virtual/powercap",
]
READONLY_PATHS = [
    "/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger",
]

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


@dataclass(frozen=True)
class Mount:
    source: str  # host path
    destination: str  # path inside the sandbox
    read_only: bool = False


@dataclass(frozen=True)
class Limits:
    # Hard memory cap. Modal's `memory=N` is a request, so a sandbox gets no cap of its own unless
    # it asks for one (`memory=(request, limit)`); this default only protects the host.
    memory_mib: int = field(default_factory=lambda: default_memory_mib())
    cpu: float | None = None  # cores; a hard quota (Modal's cpu limit); None = no quota
    cpu_request: float | None = None  # cores; a proportional share (cpu.shares); None = 1 core
    memory_request_mib: int | None = None  # a soft reservation (memory.soft_limit_in_bytes)
    pids: int = 4096
    # --- kernel-wide pools (issue 10; docs/security.md)
    # RLIMIT_NOFILE, soft = hard (the agent raises its soft limit to the hard one anyway). Every
    # open file is a `struct file` charged to the sandbox's memory cgroup, so a sandbox's memory
    # limit bounds its files too; see host.limits for the host-wide side.
    nofile: int = 8192
    ptys: int = 1024  # devpts `max=`: pseudo-terminals of this sandbox's own devpts instance
    tcp_mib: int | None = None  # TCP buffer memory (cgroup v1 kernelTCP); None: memory / 4
    disk_mib: int | None = None  # writable root + /tmp (host/disk.py); None: no disk limit


def default_memory_mib() -> int:
    """The memory cap of a sandbox that asked for none: SHOAL_SANDBOX_MEMORY_MAX (MiB), else 3/4
    of this machine's RAM, so one sandbox cannot take the host down (docs/modal-parity.md)."""
    env = os.environ.get("SHOAL_SANDBOX_MEMORY_MAX")
    if env:
        return int(env)
    return max(256, host_memory_mib() * 3 // 4)


def host_memory_mib() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") >> 20


@dataclass
class ContainerSpec:
    id: str
    rootfs: str  # the mounted overlay; the runtime never writes into the image itself
    args: list[str]
    env: dict[str, str] = field(default_factory=dict)
    cwd: str = "/"
    hostname: str = "sandbox"
    mounts: list[Mount] = field(default_factory=list)
    limits: Limits = field(default_factory=Limits)
    tools_dir: str = ""  # host dir with `init` (and `busybox`), mounted read-only at /.shoal
    # A network namespace to join (/run/netns/..., made by shoal.server.network); None: a fresh
    # one with only loopback.
    netns_path: str | None = None
    net_raw: bool = True  # CAP_NET_RAW (ping); image builds run without it
    user: tuple[int, int] = (0, 0)  # uid, gid of the process
    init: bool = True  # start `args` under the static tini; False: args[0] is its own init
    # A user namespace to join (host/idmap.py): (its path, first host uid, size); root inside is
    # that host uid. None: none (root is host root).
    userns: tuple[str, int, int] | None = None


# With a user namespace, runc mounts the rootfs from inside it, as the sandbox's root, which cannot
# walk a 0700 home (/root, or a test's mkdtemp) to it. So runc runs in a mount namespace of its own
# where the rootfs is also bound here (an empty directory on the host, mode 0755); nothing is ever
# mounted on it in the host's namespace, so nothing is left there after a crash.
USERNS_ROOTFS = "/run/shoal-rootfs"


def runc_netns(spec: ContainerSpec) -> str | None:
    """The network namespace runc must be started in (rather than join): see build_config."""
    return spec.netns_path if spec.userns is not None else None


def seccomp_profile() -> dict:
    arches = ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"]
    return {
        "defaultAction": "SCMP_ACT_ALLOW",
        "architectures": arches,
        "syscalls": [
            {"names": DENIED_SYSCALLS, "action": "SCMP_ACT_ERRNO", "errnoRet": EPERM},
            # vsock is not separated by network namespaces: it reaches the hypervisor and the
            # host's vsock listeners. Refused as in Docker's default profile.
            {"names": ["socket"], "action": "SCMP_ACT_ERRNO", "errnoRet": EPERM,
             "args": [{"index": 0, "value": AF_VSOCK, "op": "SCMP_CMP_EQ"}]},
            # New user namespaces would hand the sandbox a fresh set of capabilities to attack the
            # kernel with. clone3 passes its flags in memory that seccomp cannot read, so it gets
            # ENOSYS and libc falls back to clone, whose flags are checked.
            {"names": ["clone3"], "action": "SCMP_ACT_ERRNO", "errnoRet": ENOSYS},
            {
                "names": ["clone"],
                "action": "SCMP_ACT_ERRNO",
                "errnoRet": EPERM,
                "args": [{"index": 0, "value": CLONE_NEWUSER, "valueTwo": CLONE_NEWUSER,
                          "op": "SCMP_CMP_MASKED_EQ"}],
            },
        ],
    }


def host_nofile_cap(wanted: int) -> int:
    # runc cannot raise RLIMIT_NOFILE above the host's hard limit (RUNTIME-NOTES.md, trap 4).
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    return wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)


# cgroup v1 charges a cgroup's TCP buffers to it only once memory.kmem.tcp.limit_in_bytes is set,
# and only for sockets made after that. runc 1.1.5 ignores the OCI `kernelTCP` field ("Kernel
# memory settings are ignored"), so a createRuntime hook sets it: it runs on the host once the
# cgroups exist and before the container's first process does. Its state (JSON, on stdin) names the
# init pid, whose /proc/PID/cgroup names the memory cgroup (RUNTIME-NOTES.md, trap 6).
TCP_HOOK = (
    'pid=$(sed -n \'s/.*"pid":\\([0-9]*\\).*/\\1/p\'); '
    'cg=$(sed -n \'s/^[0-9]*:memory:\\(.*\\)$/\\1/p\' /proc/$pid/cgroup); '
    'f=/sys/fs/cgroup/memory$cg/memory.kmem.tcp.limit_in_bytes; '
    '[ ! -e $f ] || echo "$0" > $f')


def tcp_hook(limit: int) -> dict:
    return {"path": "/bin/sh", "args": ["sh", "-c", TCP_HOOK, str(limit)], "timeout": 10}


def process_env(env: dict[str, str]) -> list[str]:
    merged = {"PATH": DEFAULT_PATH, "HOME": "/root", "TERM": "xterm", "LANG": "C.UTF-8"}
    merged.update(env)
    return [f"{k}={v}" for k, v in merged.items()]


def build_config(spec: ContainerSpec, cgroups_path: str) -> dict:
    lim = spec.limits
    memory = lim.memory_mib * 1024 * 1024
    resources: dict = {
        "devices": [{"allow": False, "access": "rwm"}],
        # swap = limit: a sandbox over its memory is OOM-killed, it does not swap the host to death.
        "memory": {"limit": memory, "swap": memory},
        "pids": {"limit": lim.pids},
        "cpu": {"shares": max(2, int(1024 * (lim.cpu_request or 1)))},
    }
    if lim.memory_request_mib:
        resources["memory"]["reservation"] = min(memory, lim.memory_request_mib * 1024 * 1024)
    if lim.cpu is not None:
        period = 100_000
        resources["cpu"].update({"quota": max(1000, int(lim.cpu * period)), "period": period})

    nofile = host_nofile_cap(lim.nofile)
    mounts = [
        {"destination": "/proc", "type": "proc", "source": "proc"},
        {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
         "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
        {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
         "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5",
                     f"max={lim.ptys}"]},
        {"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
         "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]},
        {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue",
         "options": ["nosuid", "noexec", "nodev"]},
        {"destination": "/sys", "type": "sysfs", "source": "sysfs",
         "options": ["nosuid", "noexec", "nodev", "ro"]},
        {"destination": tools.MOUNT_POINT, "type": "bind", "source": spec.tools_dir,
         "options": ["bind", "ro", "nosuid", "nodev"]},
    ]
    if runc_netns(spec):
        # sysfs can only be mounted by a process with CAP_SYS_ADMIN over the network
        # namespace's owner (host root): the agent's host mode (agent/launch.c) mounts it
        # before runc starts.
        mounts = [m for m in mounts if m["type"] != "sysfs"]
    for m in spec.mounts:
        opts = ["rbind", "rprivate", "nosuid", "nodev"]
        if m.read_only:
            opts.append("ro")
        mounts.append({"destination": m.destination, "type": "bind", "source": m.source,
                       "options": opts})

    caps = [c for c in DEFAULT_CAPABILITIES if spec.net_raw or c != "CAP_NET_RAW"]
    namespaces = [{"type": t} for t in ("pid", "ipc", "uts", "mount")]
    if spec.netns_path and spec.userns is not None:
        pass  # runc runs inside it (joins_netns_itself): see below
    else:
        namespaces.append({"type": "network", "path": spec.netns_path} if spec.netns_path
                          else {"type": "network"})
    ids = {}
    if spec.userns is not None:
        # Joined by path, so its owner is the sandbox's own uid (idmap.py says why); runc 1.1.5
        # still wants the mappings written out, and uses them for what it makes (/dev). runc
        # joins the user namespace before any other, and a process in it can no longer enter a
        # network namespace that host root made: so runc itself is started inside that network
        # namespace (runc_netns) and the container inherits it.
        path, base, size = spec.userns
        namespaces.insert(0, {"type": "user", "path": path})
        ids = {"uidMappings": [{"containerID": 0, "hostID": base, "size": size}],
               "gidMappings": [{"containerID": 0, "hostID": base, "size": size}]}
    return {
        "ociVersion": "1.0.2",
        "process": {
            "terminal": False,
            "user": {"uid": spec.user[0], "gid": spec.user[1]},
            "args": [tools.INIT, "--", *spec.args] if spec.init else list(spec.args),
            "env": process_env(spec.env),
            "cwd": spec.cwd,
            "capabilities": {"bounding": caps, "effective": caps, "permitted": caps,
                             "inheritable": [], "ambient": []},
            # With a user namespace runc (here without CAP_SYS_RESOURCE) may not prlimit a process
            # of another uid: runc.py sets the limit on runc itself, and the sandbox inherits it.
            "rlimits": [] if spec.userns is not None else
            [{"type": "RLIMIT_NOFILE", "hard": nofile, "soft": nofile}],
            "noNewPrivileges": True,
            "oomScoreAdj": 500,  # under memory pressure the host kills a sandbox before the server
        },
        "root": {"path": USERNS_ROOTFS if spec.userns is not None else spec.rootfs,
                 "readonly": False},
        "hostname": spec.hostname,
        "mounts": mounts,
        "hooks": {"createRuntime": [
            tcp_hook((lim.tcp_mib << 20) if lim.tcp_mib else memory // 4)]},
        "linux": {
            "namespaces": namespaces,
            "cgroupsPath": cgroups_path,
            "resources": resources,
            "seccomp": seccomp_profile(),
            "maskedPaths": MASKED_PATHS,
            "readonlyPaths": READONLY_PATHS,
            "rootfsPropagation": "private",
            **ids,
        },
    }
