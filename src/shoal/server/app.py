"""The HTTP application: wiring of services, error mapping, and background upkeep.

Route modules (routes/*) call one service method each; services (sandboxes.py, volumes.py,
images.py) hold the logic; storage/ and runtime/ do the I/O. Nothing here knows about sockets: see
main.py for how it is served.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from shoal import exception as exc
from shoal.config import Paths
from shoal.server.host import tools
from shoal.server.host.runc_host import RuncHost
from shoal.server.host.runc import RuncRuntime, remove_cgroup_parent
from shoal.server.control.images import ImageService
from shoal.server.routes import apps, files, images, sandboxes, volumes
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

log = logging.getLogger("shoal.server")
API_VERSION = "1"

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
    sbx = SandboxService(store, host, vols, images, pool.parse_sizes(None))
    # Named secrets and bucket mounts: attached, so the constructors stay as they are.
    secrets_svc = SecretService(store, paths.db)
    buckets = BucketMounts(paths.home / "buckets")
    sbx.secrets = images.secrets = secrets_svc
    sbx.buckets = buckets
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


def create_app(paths: Paths, upkeep_interval: float = 1.0,
               on_shutdown: Callable[[], None] | None = None) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        svc = build_services(paths)
        app.state.svc = svc
        if svc.network:
            await svc.network.start()
        await svc.sandboxes.start()
        svc.volumes.reap()
        task = asyncio.ensure_future(_upkeep(svc, upkeep_interval))
        log.info("shoal server ready (home %s)", paths.home)
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await svc.sandboxes.close()
            if svc.network:
                await svc.network.shutdown()
            if not svc.sandboxes.live:
                remove_cgroup_parent()
            svc.store.close()
            svc.kv.store.close()
            if on_shutdown:
                on_shutdown()

    app = FastAPI(title="shoal", version=API_VERSION, lifespan=lifespan,
                  description="Control plane of shoal: sandboxes, volumes, network file systems.")
    for router in (apps.router, sandboxes.router, files.router, volumes.router, images.router,
                   kv.router, secret_routes.router):
        app.include_router(router)

    @app.get("/health", tags=["server"])
    def health(request: Request) -> dict:
        pool = request.app.state.svc.sandboxes.pool
        return {"ok": True, "version": API_VERSION, "pid": os.getpid(),
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
        log.exception("unhandled error in %s %s", request.method, request.url.path)
        return _error(500, "InternalError", f"{type(err).__name__}: {err}")

    # Typed errors are answered by the exception middleware and not logged as crashes;
    # `Exception` is the last resort, logged with its traceback.
    for cls in (exc.Error, OSError, ValueError, TypeError, Exception):
        app.add_exception_handler(cls, on_error)

    @app.exception_handler(RequestValidationError)
    async def on_validation(request: Request, err: RequestValidationError):
        parts = []
        for e in err.errors():
            where = ".".join(str(x) for x in e.get("loc", ()) if x != "body")
            parts.append(f"{where}: {e.get('msg')}")
        return _error(400, "InvalidError", "; ".join(parts) or "invalid request")

    return app


async def _upkeep(svc: Services, interval: float) -> None:
    ticks = 0
    while True:
        await asyncio.sleep(interval)
        try:
            svc.volumes.reap()
            svc.kv.reap()
            svc.sandboxes.stop_idle()
            ticks += 1
            if ticks % 10 == 0:
                await svc.sandboxes.host.upkeep()
            if ticks % 60 == 0:
                await svc.sandboxes.collect_logs()
        except Exception:
            log.exception("upkeep")
