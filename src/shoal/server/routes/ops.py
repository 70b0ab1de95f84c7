"""Operating the server: status, resource stats, apps, logs without following, terminal resize,
a websocket terminal, metrics, recent errors, and the dashboard's static files.

`install(app)` adds all of it to the application (routes, the metrics the request layer feeds,
the dashboard), so `app.py` wires it with one call.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import subprocess
import time
from importlib import metadata
from pathlib import Path

from fastapi import APIRouter, FastAPI, Query, Request, WebSocket, WebSocketDisconnect
from fastapi.responses import RedirectResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles

from shoal.exception import Error, InvalidError, NotFoundError
from shoal.server.host.base import HostError, SandboxGone
from shoal.server.logs import recent_errors
from shoal.server.metrics import Metrics
from shoal.server.models import (AppSummary, ExecRequest, ResizeBody, SandboxDetail,
                                 SandboxStatsModel, StatusInfo)

router = APIRouter(tags=["operations"])
log = logging.getLogger("shoal.server")
DASHBOARD = Path(__file__).resolve().parent.parent / "dashboard"
SHELL = ["/bin/sh", "-c", "if command -v bash >/dev/null 2>&1; then exec bash -l; fi; exec sh -l"]


def _svc(request):
    return request.app.state.svc


def install(app: FastAPI, home: Path) -> None:
    app.state.home = home
    app.state.started_at = time.time()
    app.state.cpu_samples = {}  # sandbox id -> (monotonic time, cpu µs) of the last stats read
    app.state.disk_cache = (0.0, 0)
    app.state.layer_sizes = {}
    app.state.log_path = getattr(app.state, "log_path", None)
    metrics = Metrics()
    metrics.app_state = app.state
    app.state.metrics = metrics
    app.include_router(router)
    app.mount("/dashboard", StaticFiles(directory=DASHBOARD, html=True), name="dashboard")


def _disk_used(request: Request) -> int:
    at, size = request.app.state.disk_cache
    if time.monotonic() - at < 10:
        return size
    home = request.app.state.home
    try:
        # -x: not into the sandboxes' mounted root filesystems (they are the image layers).
        out = subprocess.run(["du", "-sx", "--block-size=1", str(home)], capture_output=True,
                             text=True, timeout=20).stdout
        size = int(out.split()[0])
    except (OSError, ValueError, IndexError, subprocess.TimeoutExpired):
        size = 0
    request.app.state.disk_cache = (time.monotonic(), size)
    return size


@router.get("/status", response_model=StatusInfo)
async def status(request: Request) -> StatusInfo:
    """What `shoal status` shows: version, uptime, runtime, sandboxes, warm pool, disk, log."""
    from shoal.server.app import API_VERSION

    svc = _svc(request)
    pool = svc.sandboxes.pool
    started = request.app.state.started_at
    log_path = request.app.state.log_path
    return StatusInfo(
        version=metadata.version("shoal"), api_version=API_VERSION, pid=os.getpid(),
        started_at=started, uptime=time.time() - started, runtimes=sorted(getattr(svc.sandboxes.host, 'hosts', None) or [svc.sandboxes.host.name]),
        sandboxes_running=len(svc.sandboxes.live), pool_size=pool.total() if pool else 0,
        pool_hits=pool.hits if pool else 0, pool_misses=pool.misses if pool else 0,
        home=str(request.app.state.home), disk_used=await asyncio.to_thread(_disk_used, request),
        log_path=str(log_path) if log_path else None)


async def _stats(request: Request, sandbox_id: str) -> SandboxStatsModel | None:
    svc = _svc(request).sandboxes
    try:
        s = await svc.host.stats(sandbox_id)
    except (SandboxGone, HostError, OSError):
        return None
    now = time.monotonic()
    samples = request.app.state.cpu_samples
    prev = samples.get(sandbox_id)
    samples[sandbox_id] = (now, s.cpu_usec)
    percent = None
    if prev is not None and now > prev[0]:
        percent = round(100 * (s.cpu_usec - prev[1]) / 1e6 / (now - prev[0]), 1)
    return SandboxStatsModel(sandbox_id=sandbox_id, cpu_seconds=s.cpu_usec / 1e6,
                             cpu_percent=percent, memory_bytes=s.memory_bytes,
                             memory_limit=s.memory_limit, pids=s.pids, disk_bytes=s.disk_bytes)


@router.get("/stats", response_model=list[SandboxStatsModel])
async def stats_all(request: Request) -> list[SandboxStatsModel]:
    """Resource use of every running sandbox, read from the host (cgroups), like `docker stats`.
    `cpu_percent` is over the time since the previous call (null on the first)."""
    ids = list(_svc(request).sandboxes.live)
    samples = request.app.state.cpu_samples
    for sid in list(samples):
        if sid not in ids:
            samples.pop(sid)
    results = await asyncio.gather(*(_stats(request, i) for i in ids))
    return [r for r in results if r is not None]


@router.get("/sandboxes/{sandbox_id}/stats", response_model=SandboxStatsModel)
async def stats_one(sandbox_id: str, request: Request) -> SandboxStatsModel:
    _svc(request).sandboxes._running(sandbox_id)
    r = await _stats(request, sandbox_id)
    if r is None:
        raise NotFoundError(f"sandbox {sandbox_id} is not running")
    return r


def _detail(svc, rec, apps: dict[str, str]) -> SandboxDetail:
    spec = rec.spec
    return SandboxDetail(
        sandbox_id=rec.id, app_id=rec.app_id, app_name=apps.get(rec.app_id), name=rec.name,
        tags=rec.tags, state=rec.state, created_at=rec.created_at, ended_at=rec.ended_at,
        deadline=rec.deadline, returncode=rec.returncode, end_reason=rec.end_reason,
        image_id=spec.get("image_id"), runtime=spec.get("runtime") or "runc",
        args=spec.get("args") or [], workdir=spec.get("workdir"),
        resources=spec.get("resources") or {},
        mounts=[{"path": m.path, "volume_id": m.volume_id, "read_only": m.read_only}
                for m in svc.store.mounts_of(rec.id)],
        env_keys=sorted(spec.get("env") or {}))


@router.get("/ops/sandboxes", response_model=list[SandboxDetail])
def sandbox_details(request: Request, app_id: str | None = None, tags: str | None = None,
                    include_finished: bool = False) -> list[SandboxDetail]:
    """Sandboxes with what operators look at (app name, image, runtime, resources)."""
    svc = _svc(request)
    try:
        want = json.loads(tags) if tags else {}
    except ValueError:
        raise InvalidError("tags must be a JSON object of strings") from None
    apps = {a.id: a.name for a in svc.store.app_list()}
    recs = svc.store.sandbox_list(app_id, None if include_finished else "running")
    return [_detail(svc, r, apps) for r in recs
            if all(r.tags.get(k) == v for k, v in want.items())]


@router.get("/ops/sandboxes/{sandbox_id}", response_model=SandboxDetail)
def sandbox_detail(sandbox_id: str, request: Request) -> SandboxDetail:
    svc = _svc(request)
    apps = {a.id: a.name for a in svc.store.app_list()}
    return _detail(svc, svc.sandboxes.get(sandbox_id), apps)


@router.get("/sandboxes/{sandbox_id}/logs/{stream}", response_class=StreamingResponse)
async def sandbox_logs(sandbox_id: str, stream: str, request: Request,
                       follow: bool = False, offset: int = Query(0, ge=0)):
    """The entrypoint's output; with `follow`, until the sandbox ends (`docker logs -f`)."""
    svc = _svc(request).sandboxes
    if follow:
        return StreamingResponse(svc.output(sandbox_id, stream, offset),
                                 media_type="application/octet-stream")
    svc.get(sandbox_id)
    if stream not in ("stdout", "stderr"):
        raise InvalidError(f"stream must be stdout or stderr, got {stream!r}")
    done = asyncio.Event()
    done.set()
    return StreamingResponse(svc.host.read_log(sandbox_id, stream, offset, done),
                             media_type="application/octet-stream")


@router.post("/sandboxes/{sandbox_id}/resize")
async def sandbox_resize(sandbox_id: str, body: ResizeBody, request: Request) -> dict:
    """Change the size of the entrypoint's pty (a sandbox created with one; it gets SIGWINCH)."""
    await _svc(request).sandboxes.resize_pty(sandbox_id, body.rows, body.cols)
    return {}


@router.post("/execs/{exec_id}/resize")
async def exec_resize(exec_id: str, body: ResizeBody, request: Request) -> dict:
    """Change the size of a command's pty (it gets SIGWINCH)."""
    await _svc(request).sandboxes.exec_resize(exec_id, body.rows, body.cols)
    return {}


@router.get("/apps", response_model=list[AppSummary])
def app_list(request: Request) -> list[AppSummary]:
    svc = _svc(request)
    running: dict[str, int] = {}
    for rec in svc.store.sandbox_list(state="running"):
        running[rec.app_id] = running.get(rec.app_id, 0) + 1
    return [AppSummary(app_id=a.id, name=a.name, created_at=a.created_at,
                       sandboxes_running=running.get(a.id, 0)) for a in svc.store.app_list()]


@router.post("/apps/{app_id}/stop")
async def app_stop(app_id: str, request: Request) -> dict:
    """Terminate every running sandbox of the app."""
    svc = _svc(request)
    if svc.store.app_get(app_id) is None:
        raise NotFoundError(f"app {app_id} not found")
    ids = [r.id for r in svc.store.sandbox_list(app_id, "running")]
    await asyncio.gather(*(svc.sandboxes.terminate(i) for i in ids), return_exceptions=True)
    return {"terminated": len(ids)}


@router.get("/ops/images/{image_id}")
async def image_layers(image_id: str, request: Request) -> dict:
    """An image with the size of each layer (bytes on disk, shared between images)."""
    images = _svc(request).images
    m = images.manifest(image_id)
    sizes = request.app.state.layer_sizes  # layers are immutable: a size is computed once
    for layer in m.layers:
        if layer not in sizes:
            sizes[layer] = await asyncio.to_thread(images.store.size_of, layer)
    return {"image_id": m.id, "description": m.description, "created_at": m.created_at,
            "layers": [{"layer_id": layer, "size": sizes[layer]} for layer in m.layers],
            "size": sum(sizes[layer] for layer in m.layers)}


@router.get("/metrics", response_class=Response)
def metrics(request: Request) -> Response:
    """Prometheus text format."""
    return Response(request.app.state.metrics.render(),
                    media_type="text/plain; version=0.0.4; charset=utf-8")


@router.get("/errors")
def errors(request: Request, limit: int = Query(50, ge=1, le=200)) -> list[dict]:
    """The server's latest warnings and errors, newest first."""
    return list(reversed(recent_errors.records))[:limit]


@router.get("/", include_in_schema=False)
def root() -> RedirectResponse:
    return RedirectResponse("/dashboard/")


@router.websocket("/sandboxes/{sandbox_id}/terminal")
async def terminal(ws: WebSocket, sandbox_id: str, rows: int = 24, cols: int = 80):
    """A shell in a pty. Client -> server: binary frames are keystrokes; text frames are JSON
    {"type": "input", "data"} or {"type": "resize", "rows", "cols"}. Server -> client: binary
    frames are terminal output; a text frame {"type": "exit", "returncode"} or
    {"type": "error", "message"} ends it."""
    await ws.accept()
    svc = ws.app.state.svc.sandboxes
    try:
        rec = await svc.exec(sandbox_id, ExecRequest(
            args=SHELL, env={"TERM": "xterm-256color"},
            pty_rows=max(1, min(rows, 1000)), pty_cols=max(1, min(cols, 1000))))
    except Error as e:
        await ws.send_text(json.dumps({"type": "error", "message": str(e)}))
        await ws.close()
        return
    log.info("terminal opened on %s", sandbox_id,
             extra={"event": "terminal.opened", "sandbox_id": sandbox_id, "exec_id": rec.id})

    async def pump() -> None:
        async for stream, data in svc.exec_output(rec.id, {}):
            if stream == "exit":
                await ws.send_text(json.dumps({"type": "exit", "returncode": data}))
            elif stream != "end":  # (a pty has one stream; its end comes with the exit)
                await ws.send_bytes(data)
        await ws.close()

    out = asyncio.create_task(pump())
    offset = 0  # position in the stdin stream
    try:
        while not out.done():
            msg = await ws.receive()
            if msg["type"] == "websocket.disconnect":
                break
            data = msg.get("bytes")
            if msg.get("text"):
                m = json.loads(msg["text"])
                if m.get("type") == "resize":
                    await svc.exec_resize(rec.id, int(m["rows"]), int(m["cols"]))
                elif m.get("type") == "input":
                    data = str(m.get("data", "")).encode()
            if data:
                await svc.exec_stdin(rec.id, data, False, offset)
                offset += len(data)
    except WebSocketDisconnect:
        pass
    except (Error, ValueError, KeyError, RuntimeError) as e:
        log.warning("terminal on %s ended: %s: %s", sandbox_id, type(e).__name__, e,
                    extra={"event": "terminal.error", "sandbox_id": sandbox_id})
    finally:
        out.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await out
        if not svc.get_exec(rec.id).done.is_set():
            with contextlib.suppress(Exception):
                await svc.host.exec_signal(sandbox_id, rec.id, signal.SIGHUP)
