"""Warm pool: idle sandboxes started ahead of time, so `Sandbox.create` can hand one out at once.

A pooled sandbox is an ordinary host sandbox with no entrypoint, the image's environment and user,
default limits and no mounts. `claim` gives one out only to a request that it can serve exactly:
same image, no entrypoint, no volumes, default resources. Everything else a request sets (env,
workdir, timeout, probes, name, tags) belongs to the control plane and applies as for a fresh
sandbox. Pooled sandboxes are not in the database: a server that dies leaves them as orphans that
the next server's `reconcile` removes; a clean shutdown removes them itself.

Sizes: `SHOAL_POOL` ("default:2,im-…:1"; "0" or "" turns the pool off), default "default:2".
The pool refills in the background, one sandbox at a time, never past its size, starting
`SHOAL_POOL_REFILL_DELAY` seconds (default 0.5) after a sandbox left it: a refill is a runtime
start (~100 ms of CPU), and on a small machine it would compete with the first commands of the
sandbox just handed out (warm create -> first output took ~16 ms against ~12 without it here).
"""

from __future__ import annotations

import asyncio
import logging
import os

from shoal.server.control.volumes import new_id
from shoal.server.host.base import SandboxHost, SandboxSpec

log = logging.getLogger("shoal.pool")
DEFAULT = "default"
CREATE_SETTLE = 60.0  # seconds a pool start in flight may finish when the server stops


def refill_delay() -> float:
    """`SHOAL_POOL_REFILL_DELAY`'s value, in seconds (0-60)."""
    text = os.environ.get("SHOAL_POOL_REFILL_DELAY", "0.5")
    try:
        delay = float(text)
    except ValueError:
        raise ValueError(f"SHOAL_POOL_REFILL_DELAY: {text!r} is not a number of seconds") \
            from None
    if not 0 <= delay <= 60:
        raise ValueError(f"SHOAL_POOL_REFILL_DELAY: {delay} must be between 0 and 60 seconds")
    return delay


def parse_sizes(text: str | None) -> dict[str, int]:
    """`SHOAL_POOL`'s value as {image key: size}."""
    if text is None:
        text = os.environ.get("SHOAL_POOL", f"{DEFAULT}:2")
    sizes: dict[str, int] = {}
    for item in filter(None, (p.strip() for p in text.split(","))):
        key, _, n = item.rpartition(":")
        if not key:  # a bare number: the default image
            key, n = DEFAULT, item
        try:
            size = int(n)
        except ValueError:
            raise ValueError(f"SHOAL_POOL: {item!r} is not IMAGE:SIZE") from None
        if not 0 <= size <= 64:
            raise ValueError(f"SHOAL_POOL: size {size} must be between 0 and 64")
        if size:
            sizes[key] = size
    return sizes


class WarmPool:
    def __init__(self, host: SandboxHost, images, sizes: dict[str, int], network=None,
                 refill_delay: float = 0.0):
        self.host = host
        self.refill_delay = refill_delay  # seconds from a sandbox leaving to the refill
        self.network = network  # the network policy pooled sandboxes get (a default request's)
        self.images = images
        self.sizes = sizes
        self.idle: dict[str, list[str]] = {key: [] for key in sizes}  # image key -> sandbox ids
        self.image_ids: dict[str, str] = {}  # image key -> image id it was filled with
        self.members: set[str] = set()  # every pooled sandbox id, idle or being started
        self.wake = asyncio.Event()
        self.hits = self.misses = 0

    def total(self) -> int:
        return sum(len(v) for v in self.idle.values())

    async def run(self) -> None:
        """Keep every pool at its size (an owned background task)."""
        while True:
            for key, size in self.sizes.items():
                while len(self.idle[key]) < size:
                    try:
                        await self._add(key)
                    except asyncio.CancelledError:
                        raise
                    except Exception as e:
                        log.warning("warm pool %s: could not start a sandbox: %s", key, e)
                        await asyncio.sleep(5)
                        break
            self.wake.clear()
            await self.wake.wait()
            # Not at once: the sandbox just handed out gets the machine for its first commands.
            await asyncio.sleep(self.refill_delay)

    async def _add(self, key: str) -> None:
        image = await self.images.default() if key == DEFAULT else self.images.manifest(key)
        layers = await self.images.mount_layers(image)
        sid = new_id("sb")
        self.members.add(sid)
        create = asyncio.ensure_future(self.host.create(SandboxSpec(
            id=sid, layers=layers, args=[], env=dict(image.config.env),
            workdir=image.config.workdir or "/", user=image.config.user,
            network=self.network)))
        try:
            await asyncio.shield(create)
        except asyncio.CancelledError:
            # The server is stopping. A start cut short anywhere in the runtime's commands
            # leaves them half done (under gVisor, `runsc delete` then hung and the container
            # stayed): let it finish (bounded), then remove the sandbox as any idle one.
            try:
                await asyncio.wait_for(create, CREATE_SETTLE)
                await self.host.kill(sid)
                await self.host.destroy(sid)
            except Exception as e:
                log.warning("warm pool: removing %s, started while the server stopped: %s",
                            sid, e)
            self.members.discard(sid)
            raise
        except BaseException:
            self.members.discard(sid)
            raise
        self.image_ids[key] = image.id
        self.idle[key].append(sid)

    def claim(self, image_id: str, fits: bool) -> str | None:
        """An idle sandbox of `image_id` for a request it can serve (`fits`), or None."""
        for key, ids in self.idle.items():
            if self.image_ids.get(key) == image_id and ids and fits:
                sid = ids.pop(0)
                self.members.discard(sid)
                self.hits += 1
                self.wake.set()
                return sid
        self.misses += 1
        return None

    def owns(self, sandbox_id: str) -> bool:
        return sandbox_id in self.members

    async def lost(self, sandbox_id: str) -> None:
        """A pooled sandbox exited by itself: remove it; the pool refills."""
        for ids in self.idle.values():
            if sandbox_id in ids:
                ids.remove(sandbox_id)
        self.members.discard(sandbox_id)
        await self.host.destroy(sandbox_id)
        self.wake.set()

    async def close(self) -> None:
        ids = [sid for ids in self.idle.values() for sid in ids]
        for ids_ in self.idle.values():
            ids_.clear()
        for sid in ids:
            await self.host.kill(sid)
            await self.host.destroy(sid)
            self.members.discard(sid)
