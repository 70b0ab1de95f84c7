"""How the SDK reaches the server: one transport seam, and zero set-up.

`SHOAL_SERVER` names the server (a socket path, `unix:PATH`, or `http://HOST:PORT` with
`SHOAL_TOKEN`). Unset, the SDK uses the socket under SHOAL_HOME and, if nothing answers there,
starts `shoal serve` in the background (detached, logging to SHOAL_HOME/logs/server.log) and waits
for it. A lock file makes concurrent first calls start one server, not several.

Tests and embedders can pass any httpx transport (for example `httpx.ASGITransport(app)`) through
`Client(transport=...)`.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json as _json
import os
import re
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx

from shoal import config
from shoal import exception as exc
from shoal._transport import BLOCKING, AsyncSocketTransport

START_TIMEOUT = float(os.environ.get("SHOAL_START_TIMEOUT", "60"))

# httpcore (the transport for https:// servers; _transport.py serves the others) reads 64 KiB per
# socket read by default; 1 MiB reads cut its per-chunk overhead (+20-35% read throughput).
try:
    from httpcore._async.http11 import AsyncHTTP11Connection

    AsyncHTTP11Connection.READ_NUM_BYTES = 1 << 20
except (ImportError, AttributeError):  # a future httpcore: keep its default
    pass
_NO_SERVER = (httpx.ConnectError, httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError)

# Riding through a server restart: a call that finds the server gone waits for it (and, for the
# local server, starts it again after AUTOSTART_AFTER seconds unless something else did) for at
# most RECONNECT_FOR seconds, then raises ConnectionError. A call is repeated only when that
# cannot repeat its effect: GET/PUT/DELETE, and POSTs, which carry an Idempotency-Key the server
# answers once (server/contract.py). A streamed body is sent again only when it is `Replayable`.
API_VERSION = "1"  # the HTTP API this SDK speaks (X-Shoal-Api-Version)
RECONNECT_FOR = float(os.environ.get("SHOAL_RECONNECT_TIMEOUT", "30"))
AUTOSTART_AFTER = float(os.environ.get("SHOAL_AUTOSTART_AFTER", "5"))
_IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE"})
_CHEAP_ARGS = frozenset({"headers", "params", "content", "json"})  # Client._request builds these


_OBJECT_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,199}")


def checked_id(value: Any, what: str, prefix: str = "") -> str:
    """`value`, if it can be the id of a `what`: `prefix`, then letters, digits, '-' and '_'.
    Ids go into URL paths, so anything else ('/', '..', '?') is refused here (InvalidError)
    instead of reaching another path of the API."""
    if not isinstance(value, str) or not value.startswith(prefix) or \
            len(value) == len(prefix) or not _OBJECT_ID.fullmatch(value):
        raise exc.InvalidError(f"invalid {what} id {value!r}" +
                               (f" (they start with {prefix!r})" if prefix else ""))
    return value


class Replayable:
    """A streamed request body that can be produced again from its start (a local file by path, a
    seekable file object), so that an upload cut by a server restart is sent again whole: a PUT
    lands its file atomically, so sending it twice writes the same file."""

    def __init__(self, make: Callable[[], AsyncIterator[bytes]]):
        self.make = make


def _with_key(method: str, kwargs: dict[str, Any]) -> tuple[dict[str, Any], bool, bool]:
    """kwargs with an Idempotency-Key on a POST, whether the request may be sent again, and
    whether the key is new (made here, so no earlier request carried it)."""
    headers = dict(kwargs.get("headers") or {})
    fresh = False
    if method == "POST" and not any(k.lower() == "idempotency-key" for k in headers):
        headers["Idempotency-Key"] = uuid.uuid4().hex
        fresh = True
    body = kwargs.get("content")
    replayable = body is None or isinstance(body, (bytes, str, Replayable))
    return {**kwargs, "headers": headers}, replayable and (
        method in _IDEMPOTENT or method == "POST"), fresh


class _RawHeaders:
    __slots__ = ("raw",)

    def __init__(self, raw: list[tuple[bytes, bytes]]):
        self.raw = raw


class _LeanRequest:
    """What shoal's transport (_transport.py) reads of an httpx.Request, made without httpx's
    parsing: the method, the URL, the headers as bytes, a body in memory, the timeouts."""

    __slots__ = ("method", "url", "headers", "stream", "extensions")

    def __init__(self, method: str, url: httpx.URL, raw: list[tuple[bytes, bytes]],
                 stream: httpx.ByteStream, extensions: dict):
        self.method, self.url, self.headers = method, url, _RawHeaders(raw)
        self.stream, self.extensions = stream, extensions


class Client:
    def __init__(self, base_url: str, transport: httpx.AsyncBaseTransport, token: str | None = None,
                 autostart: config.Paths | None = None):
        headers = {"x-shoal-api-version": API_VERSION}
        if token:
            headers["authorization"] = f"Bearer {token}"
        self.autostart = autostart  # the local server's paths, to start it again; None: remote
        self.http = httpx.AsyncClient(
            base_url=base_url, transport=transport, headers=headers,
            timeout=httpx.Timeout(connect=10, read=None, write=None, pool=None))
        self.transport = transport
        # Every request's own headers: httpx's defaults (user agent, ...) and the client's.
        self._headers = dict(self.http.headers.items())
        self._raw_headers = list(self.http.headers.raw)
        self._timeout = {"timeout": self.http.timeout.as_dict()}
        self._urls: dict[tuple, httpx.URL] = {}  # (path, params) -> the request's URL

    def _request(self, method: str, path: str, kwargs: dict[str, Any]) -> Any:
        """`self.http.build_request(method, path, **kwargs)` for the arguments the SDK passes
        (headers, params, content, json), cheaper: httpx parses and quotes every URL character
        by character in Python and builds its header objects twice (~0.5 ms of each call's CPU
        here, a third of an exec's client time). The URL is parsed once per path and query;
        for shoal's own transport, with a body in memory, the request is a `_LeanRequest`."""
        params = kwargs.get("params")
        try:
            key = (path, tuple((k, type(v), v) for k, v in params.items()) if params else ())
            url = self._urls.get(key)
        except (TypeError, AttributeError):  # unhashable values, a list of pairs: no cache
            key = url = None
        if url is None:
            url = self.http.build_request("GET", path, params=params).url
            if key is not None:
                if len(self._urls) >= 512:
                    self._urls.clear()
                self._urls[key] = url
        headers = kwargs.get("headers")
        content, body = kwargs.get("content"), kwargs.get("json")
        if not isinstance(self.transport, AsyncSocketTransport) or \
                not (content is None or isinstance(content, bytes)):
            return httpx.Request(method, url, headers={**self._headers, **headers} if headers
                                 else self._headers, content=content, json=body,
                                 extensions=self._timeout)
        raw = [(b"Host", url.netloc), *self._raw_headers]
        if headers:
            raw += ((k.encode(), v.encode()) for k, v in headers.items())
        if content is None and body is not None:  # (as httpx: content wins over json)
            content = _json.dumps(body, ensure_ascii=False, separators=(",", ":"),
                                  allow_nan=False).encode()
            raw.append((b"Content-Type", b"application/json"))
        if content or method in ("POST", "PUT", "PATCH"):
            raw.append((b"Content-Length", str(len(content or b"")).encode()))
        return _LeanRequest(method, url, raw, httpx.ByteStream(content or b""), self._timeout)

    async def reconnect(self, deadline: float, why: BaseException) -> None:
        """Wait until the server answers again (starting the local one if need be), or raise
        ConnectionError at `deadline` (time.monotonic())."""
        began = time.monotonic()
        while True:
            if await _healthy(self):
                return
            now = time.monotonic()
            if now >= deadline:
                where = (f"; see {self.autostart.server_log}" if self.autostart
                         else f" at {self.http.base_url}")
                raise exc.ConnectionError(
                    f"lost the shoal server ({why}) and it did not come back within "
                    f"{RECONNECT_FOR:.0f} s{where}")
            if (self.autostart is not None and now - began >= AUTOSTART_AFTER
                    and not self.autostart.stopped_marker.exists()):
                with contextlib.suppress(exc.ConnectionError):
                    await _autostart(self, self.autostart, timeout=max(1.0, deadline - now))
                    return
            await asyncio.sleep(0.2)

    async def send(self, method: str, path: str, stream: bool = False, **kwargs: Any
                   ) -> httpx.Response:
        """One request, repeated across a server restart when that is safe (above)."""
        kwargs, retry, fresh = _with_key(method, kwargs)
        body = kwargs.get("content")
        deadline = None
        tries = 0
        while True:
            tries += 1
            attempt = {**kwargs, "content": body.make()} if isinstance(body, Replayable) \
                else kwargs
            if fresh:
                # The attempt number of a key made here: on the first, the server knows no
                # earlier request carried the key and skips looking it up (exec).
                attempt = {**attempt, "headers": {**attempt["headers"],
                                                  "X-Shoal-Attempt": str(tries)}}
            req = self._build(method, path, attempt)
            try:
                return await self._send_once(req, stream)
            except _NO_SERVER as e:
                if not retry:
                    raise exc.ConnectionError(f"lost the shoal server ({e}); see "
                                              f"{config.paths().server_log}") from None
                deadline = deadline or time.monotonic() + RECONNECT_FOR
                if BLOCKING.get():  # in a caller's thread (_sync.run_direct): wait there
                    from shoal._sync import run_blocking

                    run_blocking(self.reconnect(deadline, e))
                else:
                    await self.reconnect(deadline, e)

    async def send_unkeyed(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """One request as it is: no Idempotency-Key and never repeated (a read through an open
        file handle: its answer is not worth storing, and the handle dies with the server)."""
        return await self._send_once(self._build(method, path, kwargs), False)

    def _build(self, method: str, path: str, kwargs: dict[str, Any]) -> Any:
        """The request: the lean way for the arguments it knows, else httpx's."""
        if kwargs.keys() <= _CHEAP_ARGS:
            return self._request(method, path, kwargs)
        return self.http.build_request(method, path, **kwargs)

    async def _send_once(self, req: httpx.Request, stream: bool) -> httpx.Response:
        """`self.http.send(req)` without what shoal's API never uses (auth flows, redirects,
        cookies, event hooks): straight to the transport (~0.2 ms of CPU less per call)."""
        resp = await self.transport.handle_async_request(req)
        resp.request = req
        if not stream:
            try:
                await resp.aread()
            finally:
                await resp.aclose()
        return resp

    async def call(self, method: str, path: str, **kwargs: Any) -> Any:
        resp = await self.send(method, path, **kwargs)
        if resp.status_code >= 400:
            raise _error_from(resp.status_code, resp.content)
        return resp.json() if resp.content else None

    @contextlib.asynccontextmanager
    async def stream(self, method: str, path: str, **kwargs: Any) -> AsyncIterator[httpx.Response]:
        resp = await self.send(method, path, stream=True, **kwargs)
        try:
            if resp.status_code >= 400:
                raise _error_from(resp.status_code, await resp.aread())
            yield resp
        except _NO_SERVER as e:
            raise exc.ConnectionError(f"lost the shoal server ({e})") from None
        finally:
            await resp.aclose()

    async def aclose(self) -> None:
        await self.http.aclose()


def _error_from(status: int, body: bytes) -> BaseException:
    import json

    try:
        err = json.loads(body)["error"]
        return exc.from_wire(err["type"], err["message"], err.get("errno"))
    except (ValueError, KeyError, TypeError):
        if status == 401:
            return exc.AuthError("the server refused the token (set SHOAL_TOKEN)")
        return exc.RemoteError(f"HTTP {status}: {body[:200].decode(errors='replace')}")


def _transport_for(server: str) -> tuple[str, httpx.AsyncBaseTransport]:
    if server.startswith("https://"):
        return server, httpx.AsyncHTTPTransport(retries=0)
    if server.startswith("http://"):
        return server, AsyncSocketTransport()
    path = server.removeprefix("unix:")
    return "http://shoal", AsyncSocketTransport(uds=path)


async def _healthy(client: Client) -> bool:
    try:
        resp = await client.http.get("/health", timeout=5)
    except (*_NO_SERVER, httpx.TimeoutException):
        return False
    if resp.status_code == 401:
        raise exc.AuthError("the shoal server refused the token: set SHOAL_TOKEN to the token "
                            "the server was started with ($SHOAL_HOME/token on its machine)")
    return resp.status_code == 200


def _start_server(paths: config.Paths) -> subprocess.Popen:
    paths.logs.mkdir(parents=True, exist_ok=True)
    log = open(paths.server_log, "ab")
    proc = subprocess.Popen(
        [sys.executable, "-m", "shoal", "serve"], stdin=subprocess.DEVNULL, stdout=log,
        stderr=log, start_new_session=True, close_fds=True, env=dict(os.environ))
    log.close()
    # The server outlives this process, but while this process lives the server is its child:
    # reap it when it exits, so a stopped server does not linger as our zombie.
    threading.Thread(target=proc.wait, name="shoal-server-reaper", daemon=True).start()
    return proc


async def _autostart(client: Client, paths: config.Paths, timeout: float = START_TIMEOUT) -> None:
    if os.geteuid() != 0:
        raise exc.ConnectionError(f"no shoal server answers at {paths.socket}, and this process "
                                  f"cannot start one: {config.NOT_ROOT}")
    paths.home.mkdir(parents=True, exist_ok=True, mode=0o700)
    lock = open(paths.start_lock, "w")
    try:
        await asyncio.to_thread(fcntl.flock, lock, fcntl.LOCK_EX)
        if await _healthy(client):
            return  # another client started it while we waited for the lock
        proc = _start_server(paths)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if await _healthy(client):
                return
            if proc.poll() is not None:
                tail = _log_tail(paths)
                raise exc.ConnectionError(
                    f"shoal serve exited with code {proc.returncode} while starting:\n{tail}")
            await asyncio.sleep(0.05)
        raise exc.ConnectionError(f"shoal serve did not answer within {timeout:.0f} s; "
                                  f"see {paths.server_log}")
    finally:
        lock.close()


def _log_tail(paths: config.Paths, lines: int = 15) -> str:
    try:
        return "\n".join(paths.server_log.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


_clients: dict[int, Client] = {}  # one per SDK loop (there is one loop per process)


def ready_client(loop: asyncio.AbstractEventLoop) -> Client | None:
    """The SDK loop's client if it is made and speaks through shoal's own transport (what a
    call in a caller's thread needs: _sync.in_callers_thread)."""
    client = _clients.get(id(loop))
    return client if client is not None and isinstance(client.transport,
                                                       AsyncSocketTransport) else None


async def get_client() -> Client:
    if BLOCKING.get():  # a call in a caller's thread, made only once the client is ready
        from shoal._sync import get_loop

        return _clients[id(get_loop())]
    key = id(asyncio.get_running_loop())
    client = _clients.get(key)
    if client is not None:
        return client
    server = os.environ.get("SHOAL_SERVER")
    paths = config.paths()
    base, transport = _transport_for(server or str(paths.socket))
    client = Client(base, transport, os.environ.get("SHOAL_TOKEN"),
                    autostart=None if server else paths)
    if not await _healthy(client):
        if server:
            raise exc.ConnectionError(f"no shoal server answers at SHOAL_SERVER={server}")
        paths.stopped_marker.unlink(missing_ok=True)  # a new program may start it again
        await _autostart(client, paths)
    _clients[key] = client
    return client
