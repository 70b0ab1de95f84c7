from __future__ import annotations

import functools
import json
import re
import struct

from fastapi import APIRouter, Query, Request
from fastapi.responses import StreamingResponse
from pydantic import ValidationError

from shoal.exception import Error, InvalidError
from shoal.server import http_layer
from shoal.server.control.sandboxes import KEEP_NAME
from shoal.server.models import (CreateSandbox, ExecRequest, SandboxInfo, TagsBody,
                                 WaitResult)
from shoal.server.models import TunnelModel, TunnelsInfo
from shoal.server.models import MemorySnapshotInfo, RestoreMemorySnapshot
from shoal.server.storage.state import SandboxRecord

router = APIRouter(tags=["sandboxes"])
MAX_WAIT = 60.0  # long-poll bound; clients loop


def _svc(request: Request):
    return request.app.state.svc.sandboxes


def _info(rec: SandboxRecord) -> SandboxInfo:
    return SandboxInfo(sandbox_id=rec.id, app_id=rec.app_id, name=rec.name, tags=rec.tags,
                       state=rec.state, created_at=rec.created_at, returncode=rec.returncode,
                       end_reason=rec.end_reason, runtime=rec.spec.get("runtime") or "runc")


def _stream(gen) -> StreamingResponse:
    return StreamingResponse(gen, media_type="application/octet-stream")


def _idempotency_key(request: Request) -> str | None:
    key = request.headers.get("idempotency-key")
    if key is not None and not 0 < len(key) <= 200:
        raise InvalidError("Idempotency-Key must be 1-200 characters")
    return key


@router.post("/sandboxes", response_model=SandboxInfo)
async def sandbox_create(body: CreateSandbox, request: Request) -> SandboxInfo:
    """Create a sandbox. With an `Idempotency-Key` header, a repeat of the request returns the
    sandbox the first one created."""
    return _info(await _svc(request).create(body, _idempotency_key(request)))


@router.get("/sandboxes", response_model=list[SandboxInfo])
def sandbox_list(request: Request, app_id: str | None = None,
                 tags: str | None = Query(None, description='a JSON object of strings, e.g. '
                                          '{"role": "worker"}'),
                 include_finished: bool = False) -> list[SandboxInfo]:
    try:
        want = json.loads(tags) if tags else {}
    except ValueError:
        want = None
    if not isinstance(want, dict) or not all(isinstance(v, str) for v in want.values()):
        raise InvalidError(f"tags must be a JSON object of strings, got {tags!r}")
    recs = _svc(request).store.sandbox_list(app_id, None if include_finished else "running")
    return [_info(r) for r in recs if all(r.tags.get(k) == v for k, v in want.items())]


@router.get("/sandboxes/{sandbox_id}", response_model=SandboxInfo)
def sandbox_get(sandbox_id: str, request: Request) -> SandboxInfo:
    return _info(_svc(request).get(sandbox_id))


@router.post("/sandboxes/{sandbox_id}/terminate", response_model=SandboxInfo)
async def sandbox_terminate(sandbox_id: str, request: Request) -> SandboxInfo:
    return _info(await _svc(request).terminate(sandbox_id))


@router.get("/sandboxes/{sandbox_id}/wait", response_model=WaitResult)
async def sandbox_wait(sandbox_id: str, request: Request,
                       timeout: float = Query(MAX_WAIT, ge=0)) -> WaitResult:
    rec = await _svc(request).wait(sandbox_id, min(timeout, MAX_WAIT))
    return WaitResult(done=rec.state != "running", returncode=rec.returncode)


@router.get("/sandboxes/{sandbox_id}/output/{stream}", response_class=StreamingResponse)
def sandbox_output(sandbox_id: str, stream: str, request: Request, offset: int = Query(0, ge=0)):
    return _stream(_svc(request).output(sandbox_id, stream, offset))


@router.post("/sandboxes/{sandbox_id}/stdin")
async def sandbox_stdin(sandbox_id: str, request: Request, eof: bool = False) -> dict:
    await _svc(request).write_stdin(sandbox_id, await request.body(), eof)
    return {}


def _timed_out(svc, exec_id: str) -> bool:
    """Whether the exec was killed at its `timeout` (its returncode is then 124)."""
    rec = svc.execs.get(exec_id)
    return bool(rec is not None and rec.timed_out)


def _frame(kind: int, payload: bytes) -> bytes:
    return struct.pack(">BI", kind, len(payload)) + payload


async def _exec_frames(svc, exec_id: str, offsets: dict[str, int], start: dict | None):
    """The exec stream's body: frames of (u8 kind, u32 big-endian length, payload) — kind 0 the
    start ({"exec_id"}), 1 stdout bytes, 2 stderr bytes, 3 the exit ({"returncode"}), 4 an error
    ({"error": {"type", "message"}}) that ends the stream, 5 the end of one stream before the
    exit (b"stdout" or b"stderr"; readers ignore kinds they do not know). Frames that are ready
    together share a piece of the body (a reader parses the bytes, not the pieces)."""
    if start is not None:
        yield _frame(FRAME_START, json.dumps(start).encode())
    try:
        async for batch in svc.exec_output_batches(exec_id, offsets):
            # The events that were ready together, in one piece of the body (one write); the
            # exit's is the last, sent with the end of the body.
            piece = http_layer.FinalPiece if batch[-1][0] == "exit" else bytes
            yield piece(b"".join(
                _frame(FRAME_EXIT, json.dumps({"returncode": data, "timed_out":
                                               _timed_out(svc, exec_id)}).encode())
                if stream == "exit" else
                _frame(FRAME_END, data.encode()) if stream == "end" else
                _frame(FRAME_STDOUT if stream == "stdout" else FRAME_STDERR, data)
                for stream, data in batch))
    except Error as e:
        yield _frame(FRAME_ERROR, json.dumps({"error": {"type": type(e).__name__,
                                                        "message": str(e)}}).encode())


FRAME_START, FRAME_STDOUT, FRAME_STDERR, FRAME_EXIT, FRAME_ERROR, FRAME_END = range(6)


@router.post("/sandboxes/{sandbox_id}/exec", response_class=StreamingResponse,
             responses={200: {"content": {"application/x-shoal-exec": {}},
                              "description": "the exec stream (see _exec_frames)",
                              "headers": {"X-Shoal-Exec-Id": {
                                  "description": "the started command's id (as in the start "
                                                 "frame)", "schema": {"type": "string"}}}}})
async def sandbox_exec(sandbox_id: str, body: ExecRequest, request: Request):
    """Start a command and stream its output and exit code in the same response: one round trip
    for a command that needs no stdin."""
    svc = _svc(request)
    rec = await svc.exec(sandbox_id, body, _idempotency_key(request),
                         request.headers.get("x-shoal-attempt") == "1")
    return StreamingResponse(_exec_frames(svc, rec.id, {}, {"exec_id": rec.id,
                                                             "sandbox_id": sandbox_id}),
                             media_type="application/x-shoal-exec",
                             headers={EXEC_ID_HEADER: rec.id})


async def sandbox_exec_asgi(app, scope, receive, send, sandbox_id: str) -> None:
    """`sandbox_exec` as a plain ASGI handler, called by the request layer (http_layer.py) for
    `POST /sandboxes/{sandbox_id}/exec` before Starlette's middleware, router and FastAPI's
    request handling, which cost ~0.6 ms of every exec here. Same contract (the route above
    stays registered and documents it): a request that is not plain valid JSON of an
    ExecRequest is handed to `app` (the framework) with its body, so that it gets the same
    error; errors of the exec itself go through the app's own exception handlers."""
    body = bytearray()
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return  # gone before its body was whole: nothing was done, nobody reads an answer
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    headers = dict(scope["headers"])
    req = None
    if headers.get(b"content-type", b"").split(b";")[0].strip() == b"application/json":
        try:  # as FastAPI does: json.loads, then validation in Python mode
            req = ExecRequest.model_validate(json.loads(body))
        except (ValueError, ValidationError):
            pass
    if req is None:
        sent = False

        async def replay():
            nonlocal sent
            if sent:
                return await receive()
            sent = True
            return {"type": "http.request", "body": bytes(body), "more_body": False}
        return await app(scope, replay, send)
    starlette_app = scope["app"]
    scope["route"] = _exec_route()  # what metrics label the request by
    svc = starlette_app.state.svc.sandboxes
    try:
        key = headers.get(b"idempotency-key")
        key = key.decode("latin-1") if key is not None else None
        if key is not None and not 0 < len(key) <= 200:
            raise InvalidError("Idempotency-Key must be 1-200 characters")
        rec = await svc.exec(sandbox_id, req, key, headers.get(b"x-shoal-attempt") == b"1")
    except Exception as e:
        return await http_layer.answer_error(scope, receive, send, e)
    await http_layer.stream_answer(
        receive, send, [(b"content-type", b"application/x-shoal-exec"),
                        (EXEC_ID_HEADER.encode(), rec.id.encode())],
        _exec_frames(svc, rec.id, {}, {"exec_id": rec.id, "sandbox_id": sandbox_id}))


# The started command's id, also in the answer's head: a client has all it needs to return the
# process once the head is in, without waiting for the start frame's own write.
EXEC_ID_HEADER = "x-shoal-exec-id"


@functools.cache
def _exec_route():
    return next(r for r in router.routes
                if getattr(r, "path", None) == "/sandboxes/{sandbox_id}/exec")


# (method, path pattern, handler): served by the request layer ahead of the framework.
FAST_ROUTES = (("POST", re.compile(r"/sandboxes/([^/]+)/exec"), sandbox_exec_asgi),)


@router.get("/execs/{exec_id}/stream", response_class=StreamingResponse)
async def exec_stream(exec_id: str, request: Request, stdout: int = Query(0, ge=0),
                      stderr: int = Query(0, ge=0)):
    """The exec stream again, from byte offsets of stdout and stderr (after a lost connection or
    a server restart)."""
    svc = _svc(request)
    svc.get_exec(exec_id)
    return StreamingResponse(_exec_frames(svc, exec_id, {"stdout": stdout, "stderr": stderr},
                                          None), media_type="application/x-shoal-exec")


@router.post("/execs/{exec_id}/stdin")
async def exec_stdin(exec_id: str, request: Request, eof: bool = False,
                     offset: int | None = Query(None, ge=0)) -> dict:
    """Write to the command's stdin. With `offset` (its position in the stdin stream), bytes the
    process already got are skipped, so a retried write is not written twice."""
    accepted = await _svc(request).exec_stdin(exec_id, await request.body(), eof, offset)
    return {"offset": accepted}


@router.get("/execs/{exec_id}/wait", response_model=WaitResult)
async def exec_wait(exec_id: str, request: Request,
                    timeout: float = Query(MAX_WAIT, ge=0)) -> WaitResult:
    svc = _svc(request)
    rc = await svc.exec_wait(exec_id, min(timeout, MAX_WAIT))
    return WaitResult(done=rc is not None, returncode=rc,
                      timed_out=rc is not None and _timed_out(svc, exec_id))


@router.post("/admin/terminate-all")
async def terminate_all(request: Request) -> dict:
    return {"terminated": await _svc(request).terminate_all()}


@router.put("/sandboxes/{sandbox_id}/tags", response_model=SandboxInfo)
def sandbox_set_tags(sandbox_id: str, body: TagsBody, request: Request) -> SandboxInfo:
    return _info(_svc(request).set_tags(sandbox_id, body.tags))


@router.get("/apps/{app_id}/sandboxes/{name}", response_model=SandboxInfo)
def sandbox_by_name(app_id: str, name: str, request: Request,
                    include_terminated: bool = False) -> SandboxInfo:
    return _info(_svc(request).by_name(app_id, name, include_terminated))


@router.get("/sandboxes/{sandbox_id}/ready", response_model=WaitResult)
async def sandbox_ready(sandbox_id: str, request: Request,
                        timeout: float = Query(MAX_WAIT, ge=0)) -> WaitResult:
    ready = await _svc(request).wait_ready(sandbox_id, min(timeout, MAX_WAIT))
    return WaitResult(done=ready, returncode=None)


@router.post("/sandboxes/{sandbox_id}/snapshot")
async def sandbox_snapshot(sandbox_id: str, request: Request) -> dict:
    return {"image_id": await _svc(request).snapshot(sandbox_id)}


@router.get("/sandboxes/{sandbox_id}/tunnels", response_model=TunnelsInfo)
async def sandbox_tunnels(sandbox_id: str, request: Request) -> TunnelsInfo:
    found = await _svc(request).tunnels(sandbox_id)
    return TunnelsInfo(tunnels={p: TunnelModel(**vars(t)) for p, t in found.items()})


# --- memory snapshots (Modal's Sandbox._experimental_snapshot / _experimental_from_snapshot)
def _snapshot_info(snap) -> MemorySnapshotInfo:
    return MemorySnapshotInfo(snapshot_id=snap.id, sandbox_id=snap.sandbox_id,
                              created_at=snap.created_at, expires_at=snap.expires_at)


@router.post("/sandboxes/{sandbox_id}/memory-snapshot", response_model=MemorySnapshotInfo)
async def sandbox_memory_snapshot(sandbox_id: str, request: Request) -> MemorySnapshotInfo:
    """Save the running sandbox's processes, memory and files; it keeps running. gVisor
    sandboxes with block_network only (else InvalidError)."""
    return _snapshot_info(await _svc(request).snapshot_memory(sandbox_id))


@router.get("/memory-snapshots/{snapshot_id}", response_model=MemorySnapshotInfo)
async def memory_snapshot_get(snapshot_id: str, request: Request) -> MemorySnapshotInfo:
    return _snapshot_info(await _svc(request).memory_snapshot(snapshot_id))


@router.post("/memory-snapshots/{snapshot_id}/restore", response_model=SandboxInfo)
async def memory_snapshot_restore(snapshot_id: str, body: RestoreMemorySnapshot,
                                  request: Request) -> SandboxInfo:
    """A new sandbox whose processes, memory and files continue from the snapshot."""
    name = KEEP_NAME if body.keep_name else body.name
    return _info(await _svc(request).restore_memory_snapshot(snapshot_id, name))
