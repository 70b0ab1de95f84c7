"""Turning an image spec from a client into the read-only layers a sandbox's overlay stacks."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from shoal.exception import InvalidError
from shoal.images.base import (DEFAULT_RECIPE, SUPPORTED_PYTHON_VERSIONS, ensure_base_image,
                               rootfs_if_built)
from shoal.server.models import ImageSpec

log = logging.getLogger("shoal.images")


class ImageService:
    def __init__(self, store: Path):
        self.store = store
        self.build_mu = asyncio.Lock()  # one build at a time in this server

    @staticmethod
    def validate(spec: ImageSpec) -> None:
        if spec.kind != "debian_slim":
            raise InvalidError(f"unknown image kind {spec.kind!r}")
        if spec.python_version not in (None, *SUPPORTED_PYTHON_VERSIONS):
            raise InvalidError(
                f"python_version {spec.python_version!r} is not available: this machine's "
                f"Debian {DEFAULT_RECIPE.suite} provides {', '.join(SUPPORTED_PYTHON_VERSIONS)}")

    async def layers(self, spec: ImageSpec) -> list[Path]:
        """Lower dirs for the overlay, top first; builds the image if the store lacks it."""
        self.validate(spec)
        built = rootfs_if_built(self.store)
        if built:
            return [built]
        async with self.build_mu:
            rootfs = await asyncio.to_thread(ensure_base_image, self.store, DEFAULT_RECIPE,
                                             log.info)
        return [rootfs]
