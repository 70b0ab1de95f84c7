"""The in-sandbox agent: its C sources, its protocol, and the build of its static binary.

`ensure_built()` gives the path of an up-to-date `shoal-agent` (built with musl-gcc when the
sources changed); `load_protocol()` gives the parsed `protocol.json`, the contract that the agent
(through the generated `protocol.h`) and `shoal.server.host.agent_client` share.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

SOURCE_DIR = Path(__file__).resolve().parent
BINARY = SOURCE_DIR / "shoal-agent"
_C_FILES = ("agent.c", "exec.c", "files.c", "launch.c")
_SOURCES = (*_C_FILES, "agent.h", "protocol.h")


@functools.cache
def load_protocol() -> dict:
    """The parsed protocol.json (cached; treat it as read-only)."""
    return json.loads((SOURCE_DIR / "protocol.json").read_text())


def _sources_digest() -> str:
    h = hashlib.sha256()
    for name in _SOURCES:
        h.update(name.encode() + b"\0")
        h.update((SOURCE_DIR / name).read_bytes())
        h.update(b"\0")
    return h.hexdigest()


def _built_from(digest: str) -> bool:
    try:
        return f"src-sha256={digest}".encode() in BINARY.read_bytes()
    except FileNotFoundError:
        return False


def ensure_built() -> Path:
    """Return the path of a static shoal-agent built from the current sources.

    The binary carries the sha256 of the sources it was built from (in its AGENT string), so a
    rebuild happens exactly when the sources differ, whatever the mtimes say. Two processes
    building at once are safe: each builds in its own temporary directory and renames the result
    into place. Raises RuntimeError when musl-gcc is missing or the build fails.
    """
    digest = _sources_digest()
    if _built_from(digest):
        return BINARY
    if shutil.which("musl-gcc") is None:
        raise RuntimeError(
            "building the shoal agent needs musl-gcc: run `apt-get install musl-tools`")
    with tempfile.TemporaryDirectory(prefix=".shoal-agent-build.", dir=SOURCE_DIR) as tmp:
        out = Path(tmp) / "shoal-agent"
        cmd = ["musl-gcc", "-static", "-O2", "-Wall", "-Wextra",
               f'-DSOURCE_DIGEST="{digest}"', "-o", str(out),
               *(str(SOURCE_DIR / name) for name in _C_FILES)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"building the shoal agent failed: {' '.join(cmd)}\n"
                               f"{proc.stdout}{proc.stderr}")
        os.chmod(out, 0o755)
        os.replace(out, BINARY)
    return BINARY
