"""The default image: Debian bookworm with Python, built from Debian's packages with debootstrap.

An image is stored as a directory tree under the image store, named by the hash of its recipe, so a
changed recipe is a different image and an unchanged one is never rebuilt. A build happens in a
scratch directory and appears under its final name by one rename: a build that fails or is killed
leaves nothing that looks like an image.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

BUILDER_VERSION = 1  # bump when the build steps below change what ends up in the image


@dataclass(frozen=True)
class BaseRecipe:
    suite: str = "bookworm"
    variant: str = "minbase"
    packages: tuple[str, ...] = (
        "python3", "python-is-python3", "python3-pip", "python3-venv", "ca-certificates", "procps",
    )
    python_version: str = "3.11"  # what bookworm's python3 package provides
    mirror: str = field(default_factory=lambda: os.environ.get(
        "SHOAL_DEBIAN_MIRROR", "http://deb.debian.org/debian"))

    def key(self) -> str:
        # The mirror changes where packages come from, not what the image is: not part of the key.
        data = {k: v for k, v in asdict(self).items() if k != "mirror"}
        data["builder"] = BUILDER_VERSION
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


DEFAULT_RECIPE = BaseRecipe()
SUPPORTED_PYTHON_VERSIONS = (DEFAULT_RECIPE.python_version,)


class ImageBuildError(Exception):
    pass


def image_dir(store: Path, recipe: BaseRecipe = DEFAULT_RECIPE) -> Path:
    return store / "base" / recipe.key()[:32]


def rootfs_if_built(store: Path, recipe: BaseRecipe = DEFAULT_RECIPE) -> Path | None:
    rootfs = image_dir(store, recipe) / "rootfs"
    return rootfs if rootfs.is_dir() else None


def ensure_base_image(store: Path, recipe: BaseRecipe = DEFAULT_RECIPE,
                      log: Callable[[str], None] = print) -> Path:
    """Return the rootfs of `recipe`, building it first if the store lacks it. Concurrent callers
    (two servers, the set-up and a server) wait for one build instead of building twice."""
    final = image_dir(store, recipe)
    if (final / "rootfs").is_dir():
        return final / "rootfs"
    final.parent.mkdir(parents=True, exist_ok=True)
    with open(final.parent / f".{final.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (final / "rootfs").is_dir():
            return final / "rootfs"
        for stale in final.parent.glob(f".build-{final.name}-*"):
            shutil.rmtree(stale, ignore_errors=True)  # a killed build's scratch: never reused
        scratch = final.parent / f".build-{final.name}-{os.getpid()}"
        try:
            _build(recipe, scratch, log)
            os.rename(scratch, final)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    return final / "rootfs"


def _build(recipe: BaseRecipe, scratch: Path, log: Callable[[str], None]) -> None:
    if shutil.which("debootstrap") is None:
        raise ImageBuildError("debootstrap is not installed: run `bash scripts/setup.sh` "
                              "(or `apt-get install debootstrap`)")
    rootfs = scratch / "rootfs"
    scratch.mkdir(parents=True)
    started = time.monotonic()
    log(f"building base image {recipe.suite}/{recipe.variant} + {', '.join(recipe.packages)} "
        f"from {recipe.mirror}")
    cmd = ["debootstrap", f"--variant={recipe.variant}", f"--include={','.join(recipe.packages)}",
           recipe.suite, str(rootfs), recipe.mirror]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    tail: list[str] = []
    assert proc.stdout is not None
    for line in proc.stdout:
        line = line.rstrip()
        tail = (tail + [line])[-20:]
        log(line)
    if proc.wait() != 0:
        raise ImageBuildError(f"debootstrap failed with exit code {proc.returncode}:\n"
                              + "\n".join(tail))
    # What an image should not carry: package lists and caches (they go stale, and they are most
    # of the size), and the build machine's identity.
    for junk in ("var/lib/apt/lists", "var/cache/apt", "var/cache/debconf/templates.dat-old",
                 "var/log"):
        target = rootfs / junk
        if target.is_dir():
            for child in target.iterdir():
                if child.is_dir() and not child.is_symlink():
                    shutil.rmtree(child)
                else:
                    child.unlink()
    (rootfs / "etc/hostname").write_text("sandbox\n")
    (rootfs / "etc/hosts").write_text("127.0.0.1\tlocalhost sandbox\n::1\tlocalhost\n")
    (rootfs / "etc/resolv.conf").unlink(missing_ok=True)
    size = sum(f.stat().st_size for f in rootfs.rglob("*") if f.is_file() and not f.is_symlink())
    (scratch / "image.json").write_text(json.dumps({
        "recipe": asdict(recipe), "key": recipe.key(), "built_at": time.time(),
        "build_seconds": round(time.monotonic() - started, 1), "size_bytes": size,
    }, indent=1))
    log(f"base image built in {time.monotonic() - started:.0f} s ({size / 1e6:.0f} MB)")
