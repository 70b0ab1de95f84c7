"""Images for sandboxes: building recipes, resolving them to overlay layers, snapshots, blobs,
listing and pruning. The building itself is images/build.py; registry pulls images/registry.py."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
import secrets
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict
from pathlib import Path

from shoal.exception import ExecutionError, InvalidError, NotFoundError
from shoal.server.images import base as base_image
from shoal.server.images.build import BUILD_PREFIX, Builder, BuildError, RecipeError
from shoal.server.images.registry import RegistryError, RegistryPuller
from shoal.server.images.store import ImageConfig, ImageStore, Manifest, MAX_MOUNT_LAYERS, digest
from shoal.server.images.unpack import UnsafeLayerError
from shoal.server.tasks import TaskSet

log = logging.getLogger("shoal.server.images")
IMAGE_ID = re.compile(r"^im-[0-9a-f]{22}$")
SHA256 = re.compile(r"^[0-9a-f]{64}$")
DEFAULT_RECIPE = {"base": {"kind": "debian_slim"}, "steps": []}


class ImageService:
    def __init__(self, store_root: Path, runtime, tools_dir: Path, network=None):
        self.store = ImageStore(store_root)
        self.runtime = runtime
        self.builder = Builder(self.store, runtime, tools_dir, store_root, network)
        self.registry = RegistryPuller(self.store)
        self.base_mu = asyncio.Lock()
        self.tasks = TaskSet()  # builds (they finish even if their client leaves)

    async def start(self) -> None:
        """After a crash: end the build containers the dead server left running (one server per
        home, so every `bd-` container of this home's runtime is an orphan), then sweep the
        store's scratch (`ImageStore.clean_scratch`: only what dead processes left)."""
        for c in await self.runtime.list():
            if c.id.startswith(BUILD_PREFIX):
                log.info("ending build container %s of an earlier server", c.id,
                         extra={"event": "image.orphan_build"})
                await self.runtime.kill(c.id, 9)
                await self.runtime.delete(c.id)
        removed = await asyncio.to_thread(self.store.clean_scratch)
        if removed:
            log.info("swept what stopped processes left in the image store: %s",
                     " ".join(sorted(removed)), extra={"event": "image.swept"})

    # --- building
    secrets = None  # a SecretService, set by the app: resolves named secrets of a recipe

    def _resolve_secrets(self, recipe: dict) -> dict:
        """Named secrets become the values they name, before the cache key is computed (which
        sees only a digest of them): `secret_ids` of a step merge under its `secret_env`, a
        registry base's `secret_id` gives its username and password."""
        if self.secrets is None:
            return recipe
        steps = []
        for step in recipe.get("steps") or []:
            if step.get("secret_ids"):
                step = {**step, "secret_env": {**self.secrets.resolve(step["secret_ids"]),
                                               **(step.get("secret_env") or {})}}
            step = {k: v for k, v in step.items() if k != "secret_ids"}
            steps.append(step)
        base = dict(recipe.get("base") or {})
        if base.get("secret_id"):
            env = self.secrets.resolve([base.pop("secret_id")])
            base["username"] = env.get("REGISTRY_USERNAME")
            base["password"] = env.get("REGISTRY_PASSWORD")
        base.pop("secret_id", None)
        return {**recipe, "base": base, "steps": steps}

    async def build(self, recipe: dict, log_line: Callable[[str], None]) -> Manifest:
        recipe = self._resolve_secrets(recipe)
        started = time.monotonic()
        try:
            m = await self.builder.build(recipe, log_line, self._resolve_base)
        except (RecipeError, UnsafeLayerError) as e:
            raise InvalidError(str(e)) from None
        except (BuildError, RegistryError) as e:
            log.warning("image build failed: %s", e, extra={"event": "image.build_failed"})
            raise ExecutionError(str(e)) from None
        log.info("image %s ready in %.1f s", m.id, time.monotonic() - started,
                 extra={"event": "image.built", "image_id": m.id,
                        "seconds": round(time.monotonic() - started, 3)})
        return m

    async def _resolve_base(self, base: dict, log_line) -> tuple[list[str], ImageConfig, str]:
        kind = base.get("kind")
        if kind == "debian_slim":
            pv = base.get("python_version")
            if pv not in (None, *base_image.SUPPORTED_PYTHON_VERSIONS):
                raise RecipeError(
                    f"python_version {pv!r} is not available: this machine's Debian "
                    f"{base_image.DEFAULT_RECIPE.suite} provides "
                    f"{', '.join(base_image.SUPPORTED_PYTHON_VERSIONS)}")
            if base_image.rootfs_if_built(self.store.root) is None:
                async with self.base_mu:
                    log_line("building the default image (Debian bookworm + Python; once)")
                    await asyncio.to_thread(base_image.ensure_base_image, self.store.root,
                                            base_image.DEFAULT_RECIPE, log_line)
            layer = "base/" + base_image.image_dir(self.store.root).name
            return [layer], ImageConfig(), layer
        if kind == "image":
            m = self.manifest(base.get("image_id") or "")
            return list(m.layers), m.config, m.id
        if kind == "registry":
            layers, config, key = await self.registry.pull(
                base.get("tag") or "", base.get("username"), base.get("password"), log_line)
            return layers, config, key
        raise RecipeError(f"unknown image base {kind!r}")

    async def build_stream(self, recipe: dict) -> AsyncIterator[dict]:
        """Build in the background; yield {"log": line} as it goes, then {"image_id": ...} or
        {"error": {...}}. The build finishes (and is cached) even if the client leaves."""
        queue: asyncio.Queue = asyncio.Queue()

        async def run():
            try:
                m = await self.build(recipe, lambda line: queue.put_nowait({"log": line}))
                queue.put_nowait({"image_id": m.id})
            except Exception as e:  # reported to the client, typed
                if not isinstance(e, (InvalidError, ExecutionError, NotFoundError)):
                    log.exception("image build failed")
                queue.put_nowait({"error": {"type": type(e).__name__, "message": str(e)}})

        task = self.tasks.spawn(run(), "image-build")  # owned: it outlives a leaving client
        while True:
            item = await queue.get()
            yield item
            if "image_id" in item or "error" in item:
                await task
                return

    # --- using
    def manifest(self, image_id: str) -> Manifest:
        if not IMAGE_ID.match(image_id or ""):
            raise InvalidError(f"invalid image id {image_id!r}")
        m = self.store.manifest(image_id)
        if m is None:
            raise NotFoundError(f"image {image_id} not found (removed, or never built here)")
        missing = [i for i in m.layers if not self.store.has_layer(i)]
        if missing:
            raise NotFoundError(f"image {image_id} lost layer(s) {missing}; build it again")
        return m

    async def default(self) -> Manifest:
        return await self.build(DEFAULT_RECIPE, log.info)

    async def mount_layers(self, m: Manifest) -> list[Path]:
        return await asyncio.to_thread(self.store.mount_layers, m.layers)

    # --- snapshots
    async def snapshot(self, parent: Manifest, export) -> str:
        """A new image: `parent`'s layers plus one layer that `export(dir)` fills with a
        sandbox's changes (an overlay upper directory: whiteouts and opaque-directory xattrs carry
        deletions). The image appears under its id only when complete; a crash at any point
        leaves no image, or the whole one (`ImageStore.commit_image`)."""
        work = await asyncio.to_thread(self.store.scratch, "snap")
        try:
            (work / "rootfs").mkdir(exist_ok=True)
            await export(work / "rootfs")
            layer_id = f"layers/snap-{secrets.token_hex(13)}"

            def manifest_of(layer: str) -> Manifest:
                layers = [*parent.layers, layer]
                return Manifest(Manifest.image_id(layers, parent.config), layers, parent.config,
                                time.time(), f"snapshot of a sandbox from {parent.id}")

            m = await asyncio.to_thread(self.store.commit_image, work, layer_id,
                                        {"snapshot_of": parent.id}, manifest_of)
        finally:
            await asyncio.to_thread(self.store.discard, work)
        return m.id

    # --- uploaded files (add_local_*)
    def missing_blobs(self, digests: list[str]) -> list[str]:
        for d in digests:
            if not SHA256.match(d):
                raise InvalidError(f"invalid sha256 digest {d!r}")
        return [d for d in digests if not (self.store.root / "blobs" / "sha256" / d).exists()]

    async def put_blob(self, sha: str, body: AsyncIterator[bytes]) -> int:
        if not SHA256.match(sha):
            raise InvalidError(f"invalid sha256 digest {sha!r}")
        final = self.store.root / "blobs" / "sha256" / sha
        h, n = hashlib.sha256(), 0
        with self.store.staged_file(final) as f:  # visible only whole and checked
            async for chunk in body:
                h.update(chunk)
                f.write(chunk)
                n += len(chunk)
            if h.hexdigest() != sha:
                raise InvalidError(f"uploaded data does not match its digest {sha[:12]}")
        return n

    # --- listing and pruning
    def list(self) -> list[dict]:
        return [{"image_id": m.id, "layers": len(m.layers), "created_at": m.created_at,
                 "description": m.description, "config": asdict(m.config)}
                for m in self.store.manifests()]

    def remove(self, image_id: str, in_use: set[str]) -> None:
        self.manifest(image_id)
        if image_id in in_use:
            raise InvalidError(f"image {image_id} is used by a running sandbox")
        self.store.remove_manifest(image_id)

    def prune(self, running_layers: set[str]) -> dict:
        """Remove layers that no image and no running sandbox uses."""
        keep = set(running_layers)
        for m in self.store.manifests():
            keep.update(m.layers)
            if len(m.layers) > MAX_MOUNT_LAYERS:
                keep.add(f"flat/{digest(m.layers[:len(m.layers) - MAX_MOUNT_LAYERS + 1])[:32]}")
        removed, freed = [], 0
        for layer in self.store.all_layers():
            if layer not in keep:
                freed += self.store.size_of(layer)
                self.store.remove_layer(layer)
                removed.append(layer)
        return {"removed_layers": removed, "freed_bytes": freed}
