"""`shoal.enable_output()`: show progress (image builds, sandbox starts) on stderr, as Modal does."""

from __future__ import annotations

import contextlib
import sys
import threading

_enabled = 0
_mu = threading.Lock()  # guards _enabled


def is_enabled() -> bool:
    return _enabled > 0


def emit(message: str) -> None:
    if is_enabled():
        print(f"[shoal] {message}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def enable_output(show_progress: bool = True):
    """Within this block, shoal reports what it does: image builds, sandbox starts and ends."""
    global _enabled
    with _mu:
        _enabled += 1 if show_progress else 0
    try:
        yield
    finally:
        with _mu:
            _enabled -= 1 if show_progress else 0
