"""User namespaces for runc sandboxes: a host uid range per sandbox, and idmapped mounts that
show the image and volumes to it with their own owners.

Root in a sandbox is host uid `base` (and uid N is `base + N`), so what the kernel counts per user
— processes (RLIMIT_NPROC), inotify instances and watches, keyrings — is the sandbox's own, and a
process that escapes is nobody on the host. The range comes from the sandbox's disk: every runc
sandbox has its own loop device for its whole life (host/disk.py), and device numbers are unique on
the host while bound, so `range_of(loop)` needs no allocator, no lock between servers and leaves
nothing to clean up (RANGE_BASE is systemd's container range, 0x80000).

runc 1.1.5 ignores per-mount idmaps (that is runc 1.2), so the host makes them
(RUNTIME-NOTES.md, "User namespaces"): each read-only image layer is an idmapped bind mount below
the overlay (`idmapped_bind`, open_tree → mount_setattr(MOUNT_ATTR_IDMAP) → move_mount); idmapping
the overlay itself fails (EINVAL). Volume and network-file-system directories are idmapped bind
mounts too, so root inside writes uid 0 on disk and a volume means the same in every sandbox.

The user namespace is made by a helper process running as the sandbox's `base` uid (`Userns`), and
runc joins it by path: a namespace runc created would be owned by host root, and inotify charges
instances to the namespace's owner — so a runc-made namespace would still share host root's 128.
"""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
import threading
import time
from pathlib import Path

from shoal.server import linux as _linux

RANGE_BASE = 0x80000  # 524288: systemd's range for container uids
RANGE_SIZE = 65536  # uids (and gids) 0..65535 inside
MAX_SLOTS = (0x6FFFFFFF - RANGE_BASE) // RANGE_SIZE
HELPER_TIMEOUT = 5.0  # seconds for the helper to make its namespace


def range_of(loop_device: str) -> int:
    """The first host uid of the range of the sandbox whose disk is on `loop_device`."""
    n = int(loop_device.rsplit("loop", 1)[1])
    if n >= MAX_SLOTS:
        raise OSError(errno.ENOSPC, f"no uid range for {loop_device}")
    return RANGE_BASE + n * RANGE_SIZE


def enabled() -> bool:
    """SHOAL_USERNS: 1 (default) maps runc sandboxes' root to a host uid range; 0 leaves it host
    root (docs/security.md)."""
    return os.environ.get("SHOAL_USERNS", "1") != "0"


class Userns:
    """A user namespace mapping 0..size-1 inside to base..base+size-1 on the host, kept alive by a
    helper process until `close`; `path` is for runc to join, `fd` for idmapped mounts.

    `inverse=True` maps the other way (base+N inside is N outside): an idmapped mount with it shows
    files owned by the range as their unmapped ids (snapshots). The helper runs as `base`, so the
    namespace is owned by that uid (not root) — the owner the kernel charges inotify to.

    Blocking (a process, /proc polling): call from a worker thread."""

    def __init__(self, base: int, size: int = RANGE_SIZE, inverse: bool = False):
        self.base, self.size = base, size
        self.fd = -1
        # A small helper (not a fork of the server: that costs ~7 ms to make and as much to end
        # here): setpriv drops to `base`, unshare makes the namespace and becomes `cat`, which
        # reads a pipe only this process holds: if the server dies, cat reads EOF and exits (a
        # parent-death signal would not do: changing uid clears it).
        argv = ["unshare", "--user", "--", "cat"]
        if not inverse:
            argv = ["setpriv", f"--reuid={base}", f"--regid={base}", "--clear-groups", "--",
                    *argv]
        self.proc: subprocess.Popen | None = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.pid = self.proc.pid
        try:
            self._wait_unshared()
            line = (f"{base} 0 {size}\n" if inverse else f"0 {base} {size}\n").encode()
            for name in ("uid_map", "gid_map"):
                fd = os.open(f"/proc/{self.pid}/{name}", os.O_WRONLY | os.O_CLOEXEC)
                try:
                    os.write(fd, line)
                finally:
                    os.close(fd)
            self.fd = os.open(f"/proc/{self.pid}/ns/user", os.O_RDONLY | os.O_CLOEXEC)
        except BaseException:
            self.close()
            raise

    def _wait_unshared(self) -> None:
        """Until the helper is `cat` (so unshare has made the namespace)."""
        deadline = time.monotonic() + HELPER_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise OSError(errno.ECHILD, "the user-namespace helper exited "
                              f"({self.proc.returncode})")
            try:
                with open(f"/proc/{self.pid}/comm") as f:
                    if f.read().strip() == "cat":
                        return
            except OSError:
                pass
            time.sleep(0.0002)
        raise OSError(errno.ETIMEDOUT, "the user-namespace helper did not start")

    @property
    def path(self) -> str:
        return f"/proc/{self.pid}/ns/user"

    def close(self) -> None:
        """End the helper (the namespace lives on in the mounts and processes that use it)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
            self.proc.wait()
            self.proc.stdin.close()
            self.proc = None


def idmapped_bind(source: str, target: Path, userns_fd: int, read_only: bool = False) -> None:
    """Bind `source` at `target` (made if missing), idmapped through the namespace `userns_fd`.
    OSError EINVAL when its file system cannot be idmapped (FUSE, overlayfs)."""
    if not target.exists():
        if os.path.isdir(source):
            target.mkdir(parents=True)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.touch()
    fd = _linux.open_tree(source, _linux.OPEN_TREE_CLONE)
    try:
        _linux.mount_setattr(fd, _linux.MOUNT_ATTR_IDMAP |
                             (_linux.MOUNT_ATTR_RDONLY if read_only else 0), userns_fd)
        _linux.move_mount(fd, str(target))
    finally:
        os.close(fd)


def unmount_under(top: Path) -> list[str]:
    """Detach every mount at or below `top`; the mount points still mounted afterwards (none,
    unless the kernel refused)."""
    for point in _linux.mounts_under(str(top)):
        try:
            _linux.umount(point, _linux.MNT_DETACH)
        except OSError:
            pass
    return _linux.mounts_under(str(top))


# In a network namespace that host root made (shoal's network manager), the sandbox's root has no
# capabilities: binding ports below 1024 and ICMP ping sockets need these, as Docker sets them.
NETNS_SYSCTLS = {"net/ipv4/ip_unprivileged_port_start": "0",
                 "net/ipv4/ping_group_range": "0 2147483647"}


def set_netns_sysctls(netns_path: str) -> None:
    """Set NETNS_SYSCTLS inside the network namespace at `netns_path`, from a throwaway thread
    (setns of a network namespace affects only the calling thread). Blocking."""
    errors: list[BaseException] = []

    def run() -> None:
        try:
            fd = os.open(netns_path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                _linux.setns(fd, _linux.CLONE_NEWNET)
            finally:
                os.close(fd)
            for key, value in NETNS_SYSCTLS.items():
                with open(f"/proc/sys/{key}", "w") as f:
                    f.write(value)
        except BaseException as e:
            errors.append(e)

    t = threading.Thread(target=run, name="shoal-netns-sysctl")
    t.start()
    t.join()
    if errors:
        raise errors[0]
