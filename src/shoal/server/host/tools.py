"""Host binaries every sandbox gets, read-only, at /.shoal: the agent (`shoal-agent`, PID 1 of
every sandbox), a static init (tini) for image-build containers, and a static busybox so that a sandbox with no command can idle even in an image without `sleep`."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

INIT_SOURCE = os.environ.get("SHOAL_INIT", "/usr/bin/tini-static")
BUSYBOX_SOURCE = os.environ.get("SHOAL_BUSYBOX", "/bin/busybox")
MOUNT_POINT = "/.shoal"
INIT = f"{MOUNT_POINT}/init"
AGENT = f"{MOUNT_POINT}/agent"
BUSYBOX = f"{MOUNT_POINT}/busybox"


def _is_static(path: Path) -> bool:
    # A dynamically linked ELF names its interpreter in a PT_INTERP segment ("/lib64/ld-linux...").
    try:
        return b"/lib64/ld-linux" not in path.read_bytes()[:8192] and \
            b"/lib/ld-linux" not in path.read_bytes()[:8192]
    except OSError:
        return False


def prepare(dest: Path) -> tuple[Path, bool]:
    """Fill `dest` with `init` (and `busybox` when a static one is installed); returns the dir and
    whether busybox is there. Files are copied, not linked, so the sandbox never sees host paths."""
    dest.mkdir(parents=True, exist_ok=True)
    init_src = Path(INIT_SOURCE)
    if not init_src.exists():
        raise FileNotFoundError(f"{INIT_SOURCE} is missing: install Debian's tini package "
                                "(bash scripts/install.sh)")
    from shoal.server.agent import ensure_built

    pairs = [(init_src, dest / "init"), (ensure_built(), dest / "agent")]
    (dest / "run").mkdir(exist_ok=True)  # where each sandbox's own run/ dir is mounted
    busybox_src = Path(BUSYBOX_SOURCE)
    if busybox_src.exists() and _is_static(busybox_src):
        pairs.append((busybox_src, dest / "busybox"))
    for src, dst in pairs:
        if not dst.exists() or _digest(dst) != _digest(src):
            tmp = dst.with_suffix(".tmp")
            shutil.copy2(src, tmp)
            os.chmod(tmp, 0o755)
            os.rename(tmp, dst)
    return dest, (dest / "busybox").exists()


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def idle_args(has_busybox: bool) -> list[str]:
    """The command of a sandbox created without one: wait forever."""
    return [BUSYBOX, "sleep", "infinity"] if has_busybox else ["sleep", "infinity"]
