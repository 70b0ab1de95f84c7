"""Open files, host-wide: all sandboxes together must not reach `fs.file-max`.

Per process, RLIMIT_NOFILE (oci.Limits.nofile, 8192) bounds descriptors; but descriptors are not
files: a sandbox of 300 processes may hold 2.4 million `struct file`s, this machine's whole
fs.file-max, and then no process on the host can open anything. What does bound a sandbox is its
memory cgroup: every `struct file` is charged to it (the kernel's `filp` cache is accounted), so a
sandbox holds at most `memory / FILE_COST` files. The host side of the bargain is `ensure()`: at
start the server raises fs.file-max to at least the host's RAM / FILE_COST, so the files that all
sandboxes together can pin run into memory limits (and, on an overcommitted host, the OOM killer,
which prefers sandboxes: oomScoreAdj 500) before they run into fs.file-max.
"""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger("shoal.host.filemax")

FILE_COST = 256  # bytes of memory-cgroup charge per open file (struct file, filp slab)
FILE_MAX = Path("/proc/sys/fs/file-max")


def needed() -> int:
    with open("/proc/meminfo") as f:
        total_kib = next(int(line.split()[1]) for line in f if line.startswith("MemTotal:"))
    return total_kib * 1024 // FILE_COST


def ensure() -> int:
    """Raise fs.file-max to `needed()` if it is lower (never lowers it); returns the value."""
    try:
        current = int(FILE_MAX.read_text())
        want = needed()
        if current < want:
            FILE_MAX.write_text(str(want))
            log.info("fs.file-max raised from %d to %d (RAM / %d B)", current, want, FILE_COST)
            return want
        return current
    except (OSError, ValueError, StopIteration) as e:
        log.warning("could not check fs.file-max: %s", e)
        return 0
