"""Owned background work and the state store's worker thread (the concurrency model of
docs/architecture.md).

- `TaskSet`: every background task of the server belongs to one; a task's failure is logged with
  its name, and `drain()` (at shutdown) cancels what is left and waits for it. No bare
  `asyncio.ensure_future`/`create_task` in the server.
- `AsyncStore`: wraps a synchronous state store; each method of the wrapped store is available
  with the same name as a coroutine that runs it in one dedicated worker thread ("shoal-state"),
  so async code never runs SQLite on the event loop and store calls from the loop are serialised
  in submission order.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Coroutine
from concurrent.futures import ThreadPoolExecutor
from typing import Any

log = logging.getLogger("shoal.server")


class TaskSet:
    """Named, logged, drainable background tasks."""

    def __init__(self) -> None:
        self.tasks: set[asyncio.Task] = set()

    def spawn(self, coro: Coroutine, name: str) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self.tasks.add(task)

        def done(t: asyncio.Task) -> None:
            self.tasks.discard(t)
            if not t.cancelled() and t.exception() is not None:
                log.error("background task %s failed", name, exc_info=t.exception())
        task.add_done_callback(done)
        return task

    def __len__(self) -> int:
        return len(self.tasks)

    async def drain(self) -> None:
        """Cancel every task still running and wait for all of them (errors already logged)."""
        for t in list(self.tasks):
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


class AsyncStore:
    """`await astore.sandbox_get(id)` runs `store.sandbox_get(id)` in the store's worker thread."""

    def __init__(self, store: Any) -> None:
        self.sync = store
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="shoal-state")

    def __getattr__(self, name: str):
        fn = getattr(self.sync, name)
        if not callable(fn) or name.startswith("_"):
            raise AttributeError(name)

        async def call(*args, **kwargs):
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(self._pool, functools.partial(fn, *args, **kwargs))
        call.__name__ = name
        setattr(self, name, call)  # cached: later lookups skip __getattr__
        return call

    async def run(self, fn, *args, **kwargs):
        """Run `fn` (a short function made of store calls, e.g. a service's lookup) in the
        store's worker thread. Never for slow work (file-tree removal): it would hold up every
        other store call from the loop."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, functools.partial(fn, *args, **kwargs))

    def submit(self, fn, *args, **kwargs) -> None:
        """Queue `fn` (as for `run`) now, without waiting for it: calls made later run after it.
        A failure is logged."""
        fut = self._pool.submit(functools.partial(fn, *args, **kwargs))
        fut.add_done_callback(_log_failure)

    def close(self) -> None:
        self._pool.shutdown(wait=True)


def _log_failure(fut) -> None:
    if not fut.cancelled() and fut.exception() is not None:
        log.warning("a store call queued without waiting failed: %s", fut.exception(),
                    exc_info=fut.exception())
