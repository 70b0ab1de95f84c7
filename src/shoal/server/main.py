"""`shoal serve`: one server per SHOAL_HOME, on a Unix socket (mode 0600) and optionally on TCP
with a bearer token."""

from __future__ import annotations

import fcntl
import hmac
import logging
import os
import secrets
import socket
from pathlib import Path

import uvicorn

from shoal.server import linux as _linux
from shoal.config import Paths
from shoal.server import logs
from shoal.server.app import create_app

log = logging.getLogger("shoal.server")


class ServerAlreadyRunning(Exception):
    pass


class TokenAuth:
    """ASGI middleware: TCP clients must send `Authorization: Bearer <token>` — on HTTP requests
    and on websocket handshakes (where a browser, which cannot set headers there, may pass
    `?token=` instead). The Unix socket is protected by its file mode instead. The dashboard's
    static files are public: they hold no data, and the page asks for the token."""

    def __init__(self, app, token: str):
        self.app = app
        self.token = token.encode()
        self.expected = b"Bearer " + self.token

    def _allowed(self, scope) -> bool:
        got = dict(scope["headers"]).get(b"authorization", b"")
        if hmac.compare_digest(got, self.expected):
            return True
        if scope["type"] == "websocket":
            from urllib.parse import parse_qs

            qs = parse_qs(scope.get("query_string", b"").decode(errors="replace"))
            given = (qs.get("token") or [""])[0].encode()
            return hmac.compare_digest(given, self.token)
        return scope.get("method") in ("GET", "HEAD") and (
            scope["path"] == "/" or scope["path"] == "/dashboard"
            or scope["path"].startswith("/dashboard/"))

    async def __call__(self, scope, receive, send):
        if scope["type"] in ("http", "websocket") and scope.get("client") \
                and not self._allowed(scope):  # client is None on a Unix socket
            if scope["type"] == "websocket":
                await send({"type": "websocket.close", "code": 4401,
                            "reason": "missing or wrong token"})
                return
            body = b'{"error": {"type": "AuthError", "message": "missing or wrong token"}}'
            await send({"type": "http.response.start", "status": 401,
                        "headers": [(b"content-type", b"application/json")]})
            await send({"type": "http.response.body", "body": body})
            return
        await self.app(scope, receive, send)


def _unix_socket(path: Path) -> socket.socket:
    if path.exists() or path.is_symlink():
        path.unlink()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        sock.bind(str(path))
    finally:
        os.umask(old)
    os.chmod(path, 0o600)
    return sock


def _http_protocol():
    """uvicorn's httptools protocol with an answer's head and body in one write
    (http_protocol.py), or uvicorn's choice when httptools is not installed."""
    try:
        from shoal.server.http_protocol import HttpProtocol
    except ImportError:
        return "auto"
    return HttpProtocol


def _tcp_socket(addr: str) -> socket.socket:
    host, _, port = addr.rpartition(":")
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host.strip("[]") or "127.0.0.1", int(port)))
    return sock


def serve(paths: Paths, tcp: str | None = None, token: str | None = None,
          log_level: str = "info", log_format: str = "text", access_log: bool = False) -> None:
    """Serve until SIGTERM or SIGINT (Ctrl-C). Either way the shutdown is graceful: requests in
    flight get 5 s, the warm pool is removed, and running sandboxes keep running for the next
    server, which adopts them (`shoal stop` terminates them instead)."""
    paths.home.mkdir(parents=True, exist_ok=True)
    os.chmod(paths.home, 0o700)
    paths.logs.mkdir(exist_ok=True)
    log_path = logs.setup(log_format, log_level, access_log)
    lock = open(paths.server_lock, "a+")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        pid = paths.server_pid.read_text().strip() if paths.server_pid.exists() else "?"
        raise ServerAlreadyRunning(f"a shoal server (pid {pid}) already serves {paths.home}")
    # Sandbox inits re-parent to us when runc exits, so we can reap them and read their status.
    _linux.set_child_subreaper()
    # `shoal stop` signals this pid only while it holds server.lock (checked in /proc/locks).
    paths.server_pid.write_text(str(os.getpid()))

    def remove_traces() -> None:
        # Run at the end of the lifespan: uvicorn re-raises SIGTERM after a graceful shutdown, so
        # code after `run()` may never execute.
        paths.socket.unlink(missing_ok=True)
        paths.server_pid.unlink(missing_ok=True)

    sockets = [_unix_socket(paths.socket)]
    fastapi_app = create_app(paths, on_shutdown=remove_traces, freeze_startup=True)
    fastapi_app.state.log_path = log_path
    app = fastapi_app
    if tcp:
        if not token:
            token_file = paths.home / "token"
            if token_file.exists():
                token = token_file.read_text().strip()
            else:
                token = secrets.token_urlsafe(32)
                fd = os.open(token_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                os.write(fd, token.encode())
                os.close(fd)
        sockets.append(_tcp_socket(tcp))
        log.info("serving TCP on %s (token in %s or SHOAL_TOKEN); dashboard at http://%s/",
                 tcp, paths.home / "token", tcp)
        app = TokenAuth(app, token)
    # The standard asyncio loop: uvloop's child handling races the server's own reaping (it is a
    # child subreaper), which left `runsc delete` waiting forever. httptools parses HTTP when
    # installed (the server extra has it). SHOAL_LOOP=uvloop to experiment.
    # No proxy headers: shoal is not served behind a proxy, and they cost every request a layer.
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on",
                            proxy_headers=False, http=_http_protocol(),
                            loop=os.environ.get("SHOAL_LOOP", "asyncio"),
                            timeout_graceful_shutdown=5, log_config=None)
    try:
        uvicorn.Server(config).run(sockets=sockets)
    finally:
        remove_traces()
        lock.close()
