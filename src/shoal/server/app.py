"""The HTTP application: wiring of services, error mapping, and background upkeep.

Route modules (routes/*) call one service method each; services (sandboxes.py, volumes.py,
images.py) hold the logic; storage/ and runtime/ do the I/O. Nothing here knows about sockets: see
main.py for how it is served.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from shoal import exception as exc
from shoal.config import Paths
from shoal.server import names
from shoal.server.host import tools
from shoal.server.host.base import HostError
from shoal.server.host.runc_host import RuncHost
from shoal.server.host.runc import RuncRuntime, remove_cgroup_parent
from shoal.server.control.images import ImageService
from shoal.server.routes import apps, files, images, ops, sandboxes, volumes
from shoal.server.control import pool
# --- Dicts and Queues (parity branch)
from shoal.server.control.kv import KvService
from shoal.server.routes import kv
from shoal.server.storage.state import KvStore
from shoal.server.routes import secrets as secret_routes
from shoal.server.control.secrets import SecretService
from shoal.server.storage.buckets import BucketMounts
from shoal.server.control.sandboxes import SandboxService
from shoal.server.control.volumes import VolumeService
from shoal.server.network import NetworkConfig, NetworkManager
from shoal.server.storage.state import SqliteStore
from shoal.server.storage.volumes import LocalVolumeStorage
from shoal.server.tasks import TaskSet

# --- the HTTP contract (issue 9): versions, idempotency keys, one error shape
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from shoal.server.contract import ACCEPTED_VERSIONS, API_VERSION
from shoal.server.contract import IDEMPOTENCY_TTL
from shoal.server.http_layer import RequestLayer
from shoal.server.models import ErrorResponse
# --- end the HTTP contract

log = logging.getLogger("shoal.server")

STATUS = {
    exc.NotFoundError: 404, FileNotFoundError: 404, exc.InvalidError: 400, ValueError: 400,
    TypeError: 400, exc.AlreadyExistsError: 409, FileExistsError: 409, exc.ConflictError: 409,
    IsADirectoryError: 400, NotADirectoryError: 400, PermissionError: 403,
    exc.SandboxFilesystemError: 400, exc.SandboxFilesystemFileTooLargeError: 413,
    exc.SandboxTerminatedError: 409, exc.ExecutionError: 500,
    exc.RequestSizeError: 413, exc.ResourceExhaustedError: 429,
}


@dataclass
class Services:
    store: SqliteStore
    volumes: VolumeService
    sandboxes: SandboxService
    images: ImageService
    kv: KvService | None = None  # Dicts and Queues
    network: NetworkManager | None = None
    secrets: SecretService | None = None
    buckets: BucketMounts | None = None


def build_services(paths: Paths) -> Services:
    paths.home.mkdir(parents=True, exist_ok=True)
    store = SqliteStore(paths.db)
    storage = LocalVolumeStorage(paths.volumes)
    storage.remove_leftovers()
    vols = VolumeService(store, storage)
    tools_dir, _ = tools.prepare(paths.home / "tools")
    # SHOAL_NET=off: no sandbox networking (only block_network=True sandboxes can be created).
    network = (None if os.environ.get("SHOAL_NET", "on") == "off"
               else NetworkManager(NetworkConfig.from_env(paths.home)))
    images = ImageService(paths.images, RuncRuntime(paths.runc_root), tools_dir, network)
    host = _sandbox_host(paths, tools_dir, network)
    sbx = SandboxService(store, host, vols, images, pool.parse_sizes(None), pool.refill_delay())
    # Named secrets and bucket mounts: attached, so the constructors stay as they are.
    secrets_svc = SecretService(store, paths.db)
    buckets = BucketMounts(paths.home / "buckets")
    sbx.secrets = images.secrets = secrets_svc
    sbx.buckets = buckets
    sbx.memory_snapshots = paths.home / "memory-snapshots"  # Modal's SandboxSnapshot
    return Services(store, vols, sbx, images, KvService(KvStore(paths.db)), network,
                    secrets_svc, buckets)


# --- runtimes (issue 10): runc and gVisor side by side, the default from SHOAL_RUNTIME
def _sandbox_host(paths: Paths, tools_dir, network):
    from shoal.server.host import runsc
    from shoal.server.host.gvisor_host import GvisorHost
    from shoal.server.host.multi import MultiHost, check_runtime

    default = check_runtime(os.environ.get("SHOAL_RUNTIME") or "runc")
    runc_host = RuncHost(paths.sandboxes, paths.runc_root, tools_dir, network)
    gvisor = GvisorHost(paths.sandboxes, paths.home / "runsc", tools_dir, network)
    missing = runsc.installed()
    if missing and default == "gvisor":
        raise RuntimeError(f"SHOAL_RUNTIME=gvisor: {missing}")
    return MultiHost({"runc": runc_host, "gvisor": gvisor}, default, paths.sandboxes,
                     {"gvisor": missing} if missing else None)
# --- end runtimes


def _error(status: int, type_name: str, message: str, errno: int | None = None) -> JSONResponse:
    body = {"type": type_name, "message": message}
    if errno is not None:
        body["errno"] = errno
    return JSONResponse({"error": body}, status_code=status)


class ShoalApp(FastAPI):
    """FastAPI with shoal's one request layer (http_layer.py) outside Starlette's middleware."""

    def build_middleware_stack(self):
        return RequestLayer(super().build_middleware_stack(), getattr(self.state, "metrics", None),
                            sandboxes.FAST_ROUTES + files.FAST_ROUTES)

    async def __call__(self, scope, receive, send):
        # HTTP and websockets straight to the stack, as Starlette does. FastAPI's own __call__
        # first asks whether OpenTelemetry is configured, on every request (~40 µs here); shoal
        # does not use that bridge (it has its own metrics and request ids, http_layer.py).
        if scope["type"] in ("http", "websocket") and self.middleware_stack is not None \
                and not self.root_path:
            scope["app"] = self
            return await self.middleware_stack(scope, receive, send)
        return await super().__call__(scope, receive, send)


def create_app(paths: Paths, upkeep_interval: float = 1.0,
               on_shutdown: Callable[[], None] | None = None,
               freeze_startup: bool = False) -> FastAPI:
    """The server's ASGI app. `freeze_startup` (the server process's own app): once started,
    what the process holds so far (modules, routes, services) is moved out of the cyclic
    garbage collector's reach; it lives as long as the process, and each full collection of it
    held the event loop for ~120 ms here (bench/README Round 6)."""
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        svc = build_services(paths)
        app.state.svc = svc
        if svc.network:
            await svc.network.start()
        await svc.images.start()  # before reconcile: a dead server's builds are not sandboxes
        await svc.sandboxes.start()
        await asyncio.to_thread(svc.volumes.reap)
        background = TaskSet()  # the app's own: upkeep
        background.spawn(_upkeep(svc, upkeep_interval), "upkeep")
        if freeze_startup:
            gc.collect()
            gc.freeze()
        log.info("shoal server ready (home %s)", paths.home,
                 extra={"event": "server.ready", "gc_frozen": gc.get_freeze_count()})
        try:
            yield
        finally:
            await background.drain()
            await svc.images.tasks.drain()
            await svc.kv.tasks.drain()
            await svc.sandboxes.close()
            if svc.network:
                await svc.network.shutdown()
            if not svc.sandboxes.live:
                remove_cgroup_parent()
            svc.store.close()
            svc.kv.store.close()
            if on_shutdown:
                on_shutdown()

    app = ShoalApp(title="shoal", version=API_VERSION, lifespan=lifespan,
                  description="Control plane of shoal: sandboxes, volumes, network file systems.")
    for router in (apps.router, sandboxes.router, files.router, volumes.router, images.router,
                   kv.router, secret_routes.router):
        app.include_router(router)
    ops.install(app, paths.home)  # status, stats, metrics, terminal, dashboard

    @app.get("/health", tags=["server"])
    async def health(request: Request) -> dict:
        pool = request.app.state.svc.sandboxes.pool
        return {"ok": True, "version": API_VERSION, "versions": list(ACCEPTED_VERSIONS),
                "pid": os.getpid(),
                "pool_idle": pool.total() if pool is not None else 0}

    async def on_error(request: Request, err: Exception):
        errno = message = None
        if isinstance(err, OSError) and err.strerror:
            errno, message = err.errno, err.strerror
        for cls in type(err).__mro__:
            if cls in STATUS:
                return _error(STATUS[cls], cls.__name__ if cls.__module__ == "builtins"
                              else type(err).__name__, message or str(err), errno)
        if isinstance(err, exc.Error):
            return _error(400, type(err).__name__, str(err))
        if isinstance(err, OSError):
            return _error(500, "ExecutionError", f"{err.strerror or err}")
        if isinstance(err, ClientDisconnect):
            # The client went away mid-body (killed, cancelled): nothing was done, nobody reads
            # the answer.
            log.info("%s %s: the client disconnected before sending its whole body",
                     request.method, request.url.path)
            return _error(400, "InvalidError", "the client disconnected mid-request")
        if isinstance(err, HostError):
            # The runtime failed under a route, typically mid-stream (a file download whose
            # sandbox ended): the stream is cut, so the client sees an incomplete body.
            log.warning("%s %s: %s", request.method, request.url.path, err)
            return _error(500, "ExecutionError", str(err))
        log.exception("unhandled error in %s %s", request.method, request.url.path)
        return _error(500, "InternalError", f"{type(err).__name__}: {err}")

    # Typed errors are answered by the exception middleware and not logged as crashes;
    # `Exception` is the last resort, logged with its traceback.
    for cls in (exc.Error, OSError, ValueError, TypeError, Exception):
        app.add_exception_handler(cls, on_error)

    # --- the HTTP contract (issue 9)
    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, err: StarletteHTTPException):
        # The framework's own errors (unknown route, wrong method) in shoal's error shape.
        kind = {404: "NotFoundError", 405: "InvalidError"}.get(err.status_code, "Error")
        detail = err.detail if isinstance(err.detail, str) else json.dumps(err.detail)
        if err.status_code == 404 and detail == "Not Found":
            detail = f"no route {request.method} {request.url.path}"
        resp = _error(err.status_code, kind, detail)
        for k, v in (err.headers or {}).items():
            resp.headers[k] = v
        return resp

    app.openapi = lambda: _openapi(app)
    # --- end the HTTP contract

    @app.exception_handler(RequestValidationError)
    async def on_validation(request: Request, err: RequestValidationError):
        parts = []
        for e in err.errors():
            where = ".".join(str(x) for x in e.get("loc", ()) if x != "body")
            if (e.get("ctx") or {}).get("pattern") == names.NAME_PATTERN:  # the rule, in words
                parts.append(f"{where}: invalid name {e.get('input')!r}: {names.RULE}")
            else:
                parts.append(f"{where}: {e.get('msg')}")
        return _error(400, "InvalidError", "; ".join(parts) or "invalid request")

    return app


async def _upkeep(svc: Services, interval: float) -> None:
    ticks = 0
    while True:
        await asyncio.sleep(interval)
        try:
            # Both are store calls plus file removal (a deleted volume's tree): worker threads.
            await asyncio.to_thread(svc.volumes.reap)
            await asyncio.to_thread(svc.kv.reap)
            svc.sandboxes.stop_idle()
            svc.sandboxes.prune_ended()
            ticks += 1
            if ticks % 10 == 0:
                await svc.sandboxes.host.upkeep()
            if ticks % 60 == 0:
                await svc.sandboxes.collect_logs()
            if ticks % PRUNE_EVERY == 0:
                now = time.time()
                await asyncio.to_thread(svc.store.prune, now - IDEMPOTENCY_TTL,
                                        now - TERMINATED_RETENTION)
        except Exception:
            log.exception("upkeep")


# --- the HTTP contract (issue 9) ----------------------------------------------------------------
# Pruning schedule (upkeep ticks are `upkeep_interval`, 1 s by default): every PRUNE_EVERY ticks,
# idempotency keys older than IDEMPOTENCY_TTL and terminated sandboxes' rows older than
# TERMINATED_RETENTION are deleted.
PRUNE_EVERY = 300
TERMINATED_RETENTION = float(os.environ.get("SHOAL_TERMINATED_RETENTION", 7 * 24 * 3600))

# Every route may answer these (shoal's typed errors, mapped by STATUS above; 400 also for a body
# or parameters the schema refuses). FastAPI's 422 is never sent: validation errors are 400.
ERROR_STATUSES = {
    400: "invalid request: a parameter or body the server refuses (InvalidError, ...)",
    401: "missing or wrong token (TCP only)",
    403: "permission denied inside the sandbox or volume",
    404: "the sandbox, volume, exec, image, app, secret, file ... does not exist",
    409: "already exists, or conflicts with the object's state (e.g. the sandbox has finished)",
    413: "too large (a file or a request body)",
    429: "a resource limit of the server is exhausted",
    500: "the sandbox host failed (ExecutionError)",
}


def _openapi(app: FastAPI) -> dict:
    """FastAPI's document with shoal's error statuses: one ErrorResponse body for all."""
    if app.openapi_schema:
        return app.openapi_schema
    from fastapi.openapi.utils import get_openapi

    doc = get_openapi(title=app.title, version=app.version, description=app.description,
                      routes=app.routes)
    schemas = doc.setdefault("components", {}).setdefault("schemas", {})
    schemas.pop("HTTPValidationError", None)
    schemas.pop("ValidationError", None)
    for name, model in (("ErrorResponse", ErrorResponse),):
        sub = model.model_json_schema(ref_template="#/components/schemas/{model}")
        for dname, d in sub.pop("$defs", {}).items():
            schemas.setdefault(dname, d)
        schemas[name] = sub
    ref = {"content": {"application/json": {"schema": {
        "$ref": "#/components/schemas/ErrorResponse"}}}}
    for path_item in doc.get("paths", {}).values():
        for op in path_item.values():
            responses = op.setdefault("responses", {})
            responses.pop("422", None)
            for status, text in ERROR_STATUSES.items():
                responses.setdefault(str(status), {"description": text, **ref})
    app.openapi_schema = doc
    return doc
# --- end the HTTP contract
