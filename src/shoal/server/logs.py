"""The server's log: human-readable lines by default, one JSON object per line with
`shoal serve --log-format json`.

Events are ordinary log records with an `event` name and fields passed as `extra=` (for example
`log.info("sandbox %s created", sid, extra={"event": "sandbox.created", "sandbox_id": sid})`);
both formats show the fields. Every record made while serving a request carries its request id
(also sent back as the `X-Request-Id` header), so an error line can be matched to its request.

Size cap: when the server's stderr is a regular file (an autostarted server logs to
$SHOAL_HOME/logs/server.log), it is rotated once it passes `max_bytes`: renamed to
server.log.1 (one old file kept) and a fresh file put in place of stderr and stdout, so
tracebacks written straight to stderr are capped too.
"""

from __future__ import annotations

import collections
import contextvars
import json
import logging
import os
import stat
import sys
from pathlib import Path

request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id",
                                                                        default=None)
_STD = set(vars(logging.makeLogRecord({})).keys()) | {"message", "asctime", "request_id"}
DEFAULT_MAX_BYTES = 20 << 20

access = logging.getLogger("shoal.access")


def _fields(record: logging.LogRecord) -> dict:
    return {k: v for k, v in vars(record).items() if k not in _STD and not k.startswith("_")}


class _RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id"):
            record.request_id = request_id.get()
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {"time": round(record.created, 3), "level": record.levelname.lower(),
               "logger": record.name, "message": record.getMessage()}
        if record.request_id:
            out["request_id"] = record.request_id
        out.update(_fields(record))
        if record.exc_info and record.exc_info[0] is not None:
            out["traceback"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


class HumanFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        extra = _fields(record)
        if record.request_id:
            extra["request_id"] = record.request_id
        if extra:
            tail = " ".join(f"{k}={v}" for k, v in extra.items() if k != "event")
            first, nl, rest = line.partition("\n")
            line = f"{first}  [{extra.get('event', '')}{' ' if tail else ''}{tail}]".replace(
                "[ ", "[") + nl + rest
        return line


class RecentErrors(logging.Handler):
    """The last warnings and errors, for the dashboard (GET /errors)."""

    def __init__(self, size: int = 200):
        super().__init__(logging.WARNING)
        self.records: collections.deque[dict] = collections.deque(maxlen=size)

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append({"time": record.created, "level": record.levelname.lower(),
                             "logger": record.name, "message": record.getMessage(),
                             "request_id": getattr(record, "request_id", None),
                             **{k: str(v) for k, v in _fields(record).items()}})


recent_errors = RecentErrors()


class _CappedStderr(logging.StreamHandler):
    """Writes to stderr; when stderr is the regular file `path`, rotates it past `max_bytes`."""

    def __init__(self, path: Path | None, max_bytes: int):
        super().__init__(sys.stderr)
        self.path, self.max_bytes, self.count = path, max_bytes, 0

    def emit(self, record: logging.LogRecord) -> None:
        super().emit(record)
        self.count += 1
        if self.path is not None and self.count % 50 == 0:
            try:
                self._maybe_rotate()
            except OSError:
                pass

    def _maybe_rotate(self) -> None:
        st = os.fstat(2)
        if st.st_size < self.max_bytes:
            return
        os.replace(self.path, self.path.with_name(self.path.name + ".1"))
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        sys.stderr.flush()
        sys.stdout.flush()
        os.dup2(fd, 2)
        os.dup2(fd, 1)
        os.close(fd)


def stderr_log_file() -> Path | None:
    """The regular file stderr writes to, if it is one (by /proc/self/fd/2)."""
    try:
        if not stat.S_ISREG(os.fstat(2).st_mode):
            return None
        return Path(os.readlink("/proc/self/fd/2"))
    except OSError:
        return None


def setup(fmt: str = "text", level: str = "info", access_log: bool = False,
          max_bytes: int = DEFAULT_MAX_BYTES) -> Path | None:
    """Configure the root logger for `shoal serve`; returns the log file (None: a terminal)."""
    if fmt not in ("text", "json"):
        raise ValueError(f"--log-format must be text or json, got {fmt!r}")
    path = stderr_log_file()
    handler = _CappedStderr(path, max_bytes)
    handler.setFormatter(JsonFormatter() if fmt == "json" else HumanFormatter())
    handler.addFilter(_RequestIdFilter())
    recent_errors.addFilter(_RequestIdFilter())
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.addHandler(recent_errors)
    root.setLevel(level.upper())
    access.disabled = not access_log
    return path


# Exceptions that mean the client went away mid-response (one log line, not a traceback).
DISCONNECTS = ("ClientDisconnect", "ClosedResourceError", "BrokenResourceError",
               "BrokenPipeError", "ConnectionResetError", "CancelledError")
