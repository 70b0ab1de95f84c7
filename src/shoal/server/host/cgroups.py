"""Resource use of a sandbox, read from its cgroups on the host: cgroup v1 (one hierarchy per
controller: cpuacct, memory, pids) or v2 (one unified hierarchy). The cgroup is found from the
sandbox's init pid (`/proc/PID/cgroup`), so a server that itself runs in a nested cgroup reads the
right directories."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
UNLIMITED = 1 << 60  # v1 reports "no limit" as a huge page-aligned number


def cgroup_dirs(pid: int, root: Path = CGROUP_ROOT) -> dict[str, Path]:
    """Controller name -> cgroup directory of `pid`; "unified" for v2."""
    dirs: dict[str, Path] = {}
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        rel = path.lstrip("/")
        if controllers == "":
            if (root / "cgroup.controllers").exists():
                dirs["unified"] = root / rel
            continue
        for c in controllers.split(","):
            for mount in (c, controllers):
                if (root / mount).is_dir():
                    dirs[c] = root / mount / rel
                    break
    return dirs


def _int(path: Path) -> int | None:
    with contextlib.suppress(OSError, ValueError):
        text = path.read_text().strip()
        return None if text == "max" else int(text)
    return None


def _keyed(path: Path) -> dict[str, int]:
    out = {}
    with contextlib.suppress(OSError):
        for line in path.read_text().splitlines():
            k, _, v = line.partition(" ")
            with contextlib.suppress(ValueError):
                out[k] = int(v)
    return out


def read_stats(dirs: dict[str, Path]) -> tuple[int, int, int | None, int]:
    """(cpu µs, memory bytes, memory limit or None, pids) from cgroup directories."""
    if "unified" in dirs and "memory" not in dirs:
        d = dirs["unified"]
        cpu = _keyed(d / "cpu.stat").get("usage_usec", 0)
        mem = _int(d / "memory.current") or 0
        limit = _int(d / "memory.max")
        pids = _int(d / "pids.current") or 0
        return cpu, mem, limit, pids
    cpu_ns = _int(dirs["cpuacct"] / "cpuacct.usage") if "cpuacct" in dirs else None
    mem = _int(dirs["memory"] / "memory.usage_in_bytes") if "memory" in dirs else None
    limit = _int(dirs["memory"] / "memory.limit_in_bytes") if "memory" in dirs else None
    pids = _int(dirs["pids"] / "pids.current") if "pids" in dirs else None
    if limit is not None and limit >= UNLIMITED:
        limit = None
    return (cpu_ns or 0) // 1000, mem or 0, limit, pids or 0


def tree_size(path: Path, cap: int = 200_000) -> int:
    """Bytes allocated under `path` (hard links once), stopping after `cap` entries."""
    total, seen, n = 0, set(), 0
    for dirpath, dirnames, filenames in os.walk(path):
        for name in filenames + dirnames:
            n += 1
            if n > cap:
                return total
            with contextlib.suppress(OSError):
                st = os.lstat(os.path.join(dirpath, name))
                if (st.st_dev, st.st_ino) in seen:
                    continue
                seen.add((st.st_dev, st.st_ino))
                total += st.st_blocks * 512
    return total
