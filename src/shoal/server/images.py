"""Turning an image spec from a client into the read-only layers a sandbox's overlay stacks."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import secrets
import shutil
import time
from pathlib import Path

from shoal.exception import ExecutionError, InvalidError, NotFoundError
from shoal.images.base import (DEFAULT_RECIPE, SUPPORTED_PYTHON_VERSIONS, ensure_base_image,
                               rootfs_if_built)
from shoal.server.models import ImageSpec

log = logging.getLogger("shoal.images")
SNAPSHOT_ID = re.compile(r"^im-[0-9a-f]{22}$")
MAX_LAYERS = 32  # overlayfs takes its lowerdirs in one page of mount options


class ImageService:
    def __init__(self, store: Path):
        self.store = store
        self.build_mu = asyncio.Lock()  # one build at a time in this server

    @staticmethod
    def validate(spec: ImageSpec) -> None:
        if spec.kind == "snapshot":
            if not spec.image_id or not SNAPSHOT_ID.match(spec.image_id):
                raise InvalidError(f"invalid image id {spec.image_id!r}")
            return
        if spec.kind != "debian_slim":
            raise InvalidError(f"unknown image kind {spec.kind!r}")
        if spec.python_version not in (None, *SUPPORTED_PYTHON_VERSIONS):
            raise InvalidError(
                f"python_version {spec.python_version!r} is not available: this machine's "
                f"Debian {DEFAULT_RECIPE.suite} provides {', '.join(SUPPORTED_PYTHON_VERSIONS)}")

    async def layers(self, spec: ImageSpec) -> list[Path]:
        """Lower dirs for the overlay, top first; builds the image if the store lacks it."""
        self.validate(spec)
        if spec.kind == "snapshot":
            return self._snapshot_layers(spec.image_id)
        built = rootfs_if_built(self.store)
        if built:
            return [built]
        async with self.build_mu:
            rootfs = await asyncio.to_thread(ensure_base_image, self.store, DEFAULT_RECIPE,
                                             log.info)
        return [rootfs]

    # --- snapshots: a sandbox's writable layer, frozen into a read-only layer of a new image
    @property
    def snapshots(self) -> Path:
        return self.store / "snapshots"

    def _snapshot_layers(self, image_id: str) -> list[Path]:
        meta = self.snapshots / image_id / "image.json"
        try:
            parents = json.loads(meta.read_text())["parents"]
        except FileNotFoundError:
            raise NotFoundError(f"image {image_id} not found") from None
        return [self.snapshots / image_id / "rootfs", *(Path(p) for p in parents)]

    async def snapshot(self, upper: Path, parents: list[Path]) -> str:
        """Copy a (paused) sandbox's upper dir into a new layer on top of `parents`; the copy keeps
        overlayfs whiteouts (0/0 device nodes) and opaque-directory xattrs, so deletions carry
        over. The image appears under its id only when complete."""
        if len(parents) + 1 > MAX_LAYERS:
            raise InvalidError(f"a snapshot of a snapshot ... deeper than {MAX_LAYERS} layers is "
                               "not supported yet")
        image_id = f"im-{secrets.token_hex(11)}"
        self.snapshots.mkdir(parents=True, exist_ok=True)
        scratch = self.snapshots / f".tmp-{image_id}"
        scratch.mkdir()
        try:
            proc = await asyncio.create_subprocess_exec(
                "cp", "-a", "--reflink=auto", f"{upper}/.", str(scratch / "rootfs"),
                stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
            _, err = await proc.communicate()
            if proc.returncode != 0:
                raise ExecutionError(f"snapshot copy failed: {err.decode(errors='replace')}")
            # The init's bind-mount point is shoal's, not the sandbox's.
            shutil.rmtree(scratch / "rootfs" / ".shoal", ignore_errors=True)
            (scratch / "image.json").write_text(json.dumps(
                {"id": image_id, "parents": [str(p) for p in parents], "created_at": time.time()}))
            os.rename(scratch, self.snapshots / image_id)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        return image_id
