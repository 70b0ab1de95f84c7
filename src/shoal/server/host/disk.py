"""A sandbox's disk limit: a sparse ext4 image on a loop device, holding its overlay upper and work.

This kernel has no quota support (RUNTIME-NOTES.md), so a per-sandbox limit needs a file system of
its own. A sparse image costs nothing on the host until written (0.6 MiB empty), gives the sandbox
a real ENOSPC and a real `df` for bytes and for inodes (`-N`), and `discard` returns freed blocks
to the host. The loop device is set up with LO_FLAGS_AUTOCLEAR: the kernel releases it when the
file system is unmounted, so a crashed server leaves at most a mount (which `reconcile` unmounts),
never a loop device bound to nothing.

Formatting (mkfs, ~25 ms) is kept off the create path by `DiskPool`, which keeps a few formatted
images of the default size aside; a create only renames one into the sandbox directory and mounts it.

Cost on the host's disk: images are sparse, so the sum of the limits may exceed the host's free
space (overcommit, as with memory). `DiskPool.check_room` refuses a new sandbox when the host's
free space is below its limit, so one sandbox alone can never fill the host.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import subprocess
import threading
from pathlib import Path

from shoal.server import linux as _linux

log = logging.getLogger("shoal.host.disk")

DEFAULT_MIB = 10240  # SHOAL_EPHEMERAL_DISK overrides
MIN_MIB = 64
MAX_MIB = 1 << 20
BYTES_PER_INODE = 32 << 10  # ext4's default is 16 KiB; agents make fewer, larger files
MIN_INODES = 4096
IMAGE = "disk.img"
MOUNT = "disk"  # the image's mount point in the sandbox directory; upper/ and work/ inside
SPARES = 2  # formatted default-size images kept aside

_libc = ctypes.CDLL(None, use_errno=True)
LOOP_CTL_GET_FREE = 0x4C82
LOOP_CONFIGURE = 0x4C0A
LO_FLAGS_AUTOCLEAR = 4
MS_NOATIME = 1024


class _LoopInfo64(ctypes.Structure):
    _fields_ = [("lo_device", ctypes.c_uint64), ("lo_inode", ctypes.c_uint64),
                ("lo_rdevice", ctypes.c_uint64), ("lo_offset", ctypes.c_uint64),
                ("lo_sizelimit", ctypes.c_uint64), ("lo_number", ctypes.c_uint32),
                ("lo_encrypt_type", ctypes.c_uint32), ("lo_encrypt_key_size", ctypes.c_uint32),
                ("lo_flags", ctypes.c_uint32), ("lo_file_name", ctypes.c_uint8 * 64),
                ("lo_crypt_name", ctypes.c_uint8 * 64), ("lo_encrypt_key", ctypes.c_uint8 * 32),
                ("lo_init", ctypes.c_uint64 * 2)]


class _LoopConfig(ctypes.Structure):
    _fields_ = [("fd", ctypes.c_uint32), ("block_size", ctypes.c_uint32),
                ("info", _LoopInfo64), ("reserved", ctypes.c_uint64 * 8)]


def default_mib() -> int:
    return int(os.environ.get("SHOAL_EPHEMERAL_DISK") or DEFAULT_MIB)


def inodes_for(mib: int) -> int:
    return max(MIN_INODES, (mib << 20) // BYTES_PER_INODE)


def format_image(path: Path, mib: int) -> None:
    """A sparse ext4 image of `mib` MiB: lazy init (nothing written but the metadata), no
    reserved blocks, no journal (the data dies with the sandbox), a fixed inode count."""
    with open(path, "wb") as f:
        f.truncate(mib << 20)
    try:
        subprocess.run(["mkfs.ext4", "-q", "-F", "-m", "0", "-N", str(inodes_for(mib)),
                        "-O", "^has_journal", "-E",
                        "lazy_itable_init=1,lazy_journal_init=1,nodiscard", str(path)],
                       check=True, capture_output=True, timeout=60)
    except subprocess.CalledProcessError as e:
        path.unlink(missing_ok=True)
        raise OSError(errno.EIO, f"mkfs.ext4 failed: {e.stderr.decode(errors='replace')}") \
            from None


def _loop_attach(image: Path) -> tuple[str, int]:
    """Bind a free loop device to `image` (autoclear): its path and an open descriptor, which the
    caller closes once the device is mounted (the mount then holds it)."""
    ctl = os.open("/dev/loop-control", os.O_RDWR | os.O_CLOEXEC)
    backing = os.open(image, os.O_RDWR | os.O_CLOEXEC)
    try:
        for _ in range(16):  # another process may take the free device first
            n = _libc.ioctl(ctl, LOOP_CTL_GET_FREE)
            if n < 0:
                raise OSError(ctypes.get_errno(), "LOOP_CTL_GET_FREE failed")
            dev = f"/dev/loop{n}"
            fd = os.open(dev, os.O_RDWR | os.O_CLOEXEC)
            try:
                cfg = _LoopConfig(fd=backing)
                cfg.info.lo_flags = LO_FLAGS_AUTOCLEAR
                name = str(image).encode()[:63]
                ctypes.memmove(cfg.info.lo_file_name, name, len(name))
                if _libc.ioctl(fd, LOOP_CONFIGURE, ctypes.byref(cfg)) == 0:
                    return dev, fd
                err = ctypes.get_errno()
            except BaseException:
                os.close(fd)
                raise
            os.close(fd)
            if err != errno.EBUSY:
                raise OSError(err, f"LOOP_CONFIGURE {dev}: {os.strerror(err)}")
        raise OSError(errno.EBUSY, "no free loop device")
    finally:
        os.close(backing)
        os.close(ctl)


def mount_image(image: Path, target: Path) -> str:
    """Mount `image` at `target`; the loop device it is on (held until the unmount: host/idmap.py
    derives the sandbox's uid range from it)."""
    target.mkdir(exist_ok=True)
    dev, fd = _loop_attach(image)
    try:
        _linux.mount(dev, str(target), "ext4", MS_NOATIME, "discard")
    finally:
        os.close(fd)  # autoclear: the device goes with the last unmount (or now, on failure)
    return dev


def loop_devices_of(prefix: str) -> list[str]:
    """Loop devices whose backing file is under `prefix` (for leak checks)."""
    found = []
    for dev in Path("/sys/block").glob("loop*"):
        try:
            backing = (dev / "loop" / "backing_file").read_text().strip()
        except OSError:
            continue
        if backing.startswith(prefix.rstrip("/") + "/"):
            found.append(f"/dev/{dev.name} ({backing})")
    return found


class DiskPool:
    """Formatted images of the default size, kept aside so a create does not run mkfs.

    Preconditions: `take` and `refill` may run in different threads; `mu` guards the spare files'
    names (a spare is taken by renaming it, so two takers never get the same file).
    """

    def __init__(self, spare_dir: Path, spares: int = SPARES):
        self.dir = spare_dir
        self.spares = spares
        self.mu = threading.Lock()
        self.dir.mkdir(parents=True, exist_ok=True)
        self._refilling = False  # guarded by mu

    def check_room(self, mib: int) -> None:
        st = os.statvfs(self.dir)
        free = st.f_bavail * st.f_frsize
        if free < (mib << 20):
            raise OSError(errno.ENOSPC, f"the host has {free >> 20} MiB free, less than the "
                          f"sandbox's disk limit ({mib} MiB); ask for a smaller ephemeral_disk")

    def take(self, mib: int, dest: Path) -> None:
        """Put a formatted image of `mib` MiB at `dest` (a spare if one fits, else a new one)."""
        if mib == default_mib():
            with self.mu:
                spares = sorted(self.dir.glob(f"{mib}-*.img"))
                for spare in spares:
                    try:
                        os.rename(spare, dest)
                        return
                    except FileNotFoundError:
                        continue
        format_image(dest, mib)

    def refill(self) -> None:
        """Blocking: format spares of the default size up to `spares`."""
        mib = default_mib()
        with self.mu:
            if self._refilling:
                return
            self._refilling = True
        try:
            while len(list(self.dir.glob(f"{mib}-*.img"))) < self.spares:
                tmp = self.dir / f".{os.urandom(6).hex()}.tmp"
                format_image(tmp, mib)
                os.rename(tmp, self.dir / f"{mib}-{os.urandom(6).hex()}.img")
        except OSError as e:
            log.warning("formatting a spare disk image: %s", e)
        finally:
            with self.mu:
                self._refilling = False

    def clear(self) -> None:
        for f in self.dir.iterdir():
            f.unlink(missing_ok=True)
