"""The sandbox file API: `/sandboxes/{id}/fs/...` (whole files, directories, watches) and
`/sandboxes/{id}/fs/handles/...` (open files, for `Sandbox.open`)."""

from __future__ import annotations

import functools
import json
import re
from urllib.parse import parse_qs

from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import StreamingResponse

from shoal.server import http_layer
from shoal.server.host.base import HostError, SandboxGone
from shoal.server.host.runc_files import LIST_PAGE, READ_LIMIT
from shoal.server.models import FileInfoModel, MkdirBody, OpenBody, RenameFileBody, SeekBody

router = APIRouter(tags=["sandbox files"])
INLINE_READ = 256 << 10


def _files(request: Request):
    return request.app.state.svc.sandboxes.files


@router.get("/sandboxes/{sandbox_id}/fs/stat", response_model=FileInfoModel)
async def fs_stat(sandbox_id: str, request: Request, path: str = Query(...)) -> dict:
    return await _files(request)(sandbox_id, "stat", path)


@router.get("/sandboxes/{sandbox_id}/fs/list", response_model=list[FileInfoModel])
async def fs_list(sandbox_id: str, request: Request, path: str = Query(...),
                  offset: int = Query(0, ge=0),
                  limit: int = Query(LIST_PAGE, ge=1, le=LIST_PAGE)) -> list[dict]:
    """Entries in name order from `offset`, at most `limit` (≤ 10,000): page through large
    directories until a page comes back short."""
    return await _files(request)(sandbox_id, "listdir", path, offset, limit)


@router.get("/sandboxes/{sandbox_id}/fs/file", response_class=StreamingResponse)
async def fs_read(sandbox_id: str, request: Request, path: str = Query(...), whole: bool = False):
    """The file's bytes, streamed. `whole=true` (read_bytes/read_text) refuses files over the
    whole-file limit with SandboxFilesystemFileTooLargeError."""
    return await _read_answer(_files(request), sandbox_id, path, whole)


_BOOL = {"true": True, "1": True, "yes": True, "on": True,
         "false": False, "0": False, "no": False, "off": False}


async def fs_read_asgi(app, scope, receive, send, sandbox_id: str) -> None:
    """`fs_read` as a plain ASGI handler, called by the request layer (http_layer.py) ahead of
    Starlette's middleware, router and FastAPI's request handling (most of a small read's server
    time). A query it does not parse plainly (a missing or repeated parameter, an unusual
    boolean) goes to `app`, the framework, for the same answer."""
    query = parse_qs(scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True)
    path, whole = query.get("path"), query.get("whole", ["false"])
    if not path or len(path) != 1 or len(whole) != 1 or whole[0].lower() not in _BOOL \
            or set(query) - {"path", "whole"}:
        return await app(scope, receive, send)
    starlette_app = scope["app"]
    scope["route"] = _read_route()  # what metrics label the request by
    try:
        response = await _read_answer(starlette_app.state.svc.sandboxes.files, sandbox_id,
                                      path[0], _BOOL[whole[0].lower()])
    except Exception as e:
        return await http_layer.answer_error(scope, receive, send, e)
    await response(scope, receive, send)


@functools.cache
def _read_route():
    return next(r for r in router.routes if getattr(r, "path", None) ==
                "/sandboxes/{sandbox_id}/fs/file" and "GET" in r.methods)


# (method, path pattern, handler): served by the request layer ahead of the framework.
FAST_ROUTES = (("GET", re.compile(r"/sandboxes/([^/]+)/fs/file"), fs_read_asgi),)


async def _read_answer(files, sandbox_id: str, path: str, whole: bool) -> Response:
    size, chunks = await files(sandbox_id, "read_file", path, READ_LIMIT if whole else None)
    if size <= INLINE_READ:
        # Small files, the common case for agents: answered in one write, not streamed, and
        # read up to the size the file had when opened (no second read to find its end: each
        # read is a trip to a worker thread).
        parts, got = [], 0
        try:
            async for chunk in chunks:
                parts.append(chunk)
                got += len(chunk)
                if got >= size:
                    break
        finally:
            await chunks.aclose()
        return Response(b"".join(parts), media_type="application/octet-stream")
    return StreamingResponse(_cut_if_lost(chunks, sandbox_id, path),
                             media_type="application/octet-stream",
                             headers={"content-length": str(size)})


async def _cut_if_lost(chunks, sandbox_id: str, path: str):
    """`chunks`, but a sandbox that ends (or whose agent is lost) during a streamed read ends
    its answer with a warning line and a cut connection (http_layer.AnswerCut), not a
    traceback: the client sees a short body and asks why (sandbox_fs.py)."""
    try:
        async for chunk in chunks:
            yield chunk
    except (SandboxGone, HostError, OSError) as e:
        raise http_layer.AnswerCut(f"reading {path} in sandbox {sandbox_id} stopped: "
                                   f"{e}") from None
    finally:
        await chunks.aclose()


@router.put("/sandboxes/{sandbox_id}/fs/file")
async def fs_write(sandbox_id: str, request: Request, path: str = Query(...),
                   parents: bool = True) -> dict:
    """Replace (or create) the file with the request body, atomically."""
    n = await _files(request)(sandbox_id, "write_file", path, request.stream(), parents)
    return {"bytes": n}


@router.post("/sandboxes/{sandbox_id}/fs/mkdir")
async def fs_mkdir(sandbox_id: str, body: MkdirBody, request: Request) -> dict:
    await _files(request)(sandbox_id, "mkdir", body.path, body.parents, body.exist_ok)
    return {}


@router.delete("/sandboxes/{sandbox_id}/fs/file")
async def fs_remove(sandbox_id: str, request: Request, path: str = Query(...),
                    recursive: bool = False) -> dict:
    await _files(request)(sandbox_id, "remove", path, recursive)
    return {}


@router.post("/sandboxes/{sandbox_id}/fs/rename")
async def fs_rename(sandbox_id: str, body: RenameFileBody, request: Request) -> dict:
    await _files(request)(sandbox_id, "rename", body.src, body.dst, body.overwrite)
    return {}


@router.get("/sandboxes/{sandbox_id}/fs/watch", response_class=StreamingResponse)
async def fs_watch(sandbox_id: str, request: Request, path: str = Query(...),
                   recursive: bool = False, timeout: float | None = None):
    """Newline-delimited JSON events `{"paths": [...], "type": ...}` until `timeout` seconds pass,
    the sandbox ends, or the client disconnects."""
    ended = request.app.state.svc.sandboxes.ended_event(sandbox_id)
    events = await _files(request)(sandbox_id, "watch", path, recursive, timeout, ended)

    async def lines():
        async for event in events:
            yield (json.dumps(event) + "\n").encode()
    return StreamingResponse(lines(), media_type="application/x-ndjson")


@router.post("/sandboxes/{sandbox_id}/fs/handles")
async def fh_open(sandbox_id: str, body: OpenBody, request: Request) -> dict:
    return {"handle": await _files(request)(sandbox_id, "handle_open", body.path, body.mode)}


@router.post("/sandboxes/{sandbox_id}/fs/handles/{handle}/read")
async def fh_read(sandbox_id: str, handle: str, request: Request, n: int = -1,
                  line: bool = False) -> Response:
    data = await _files(request)(sandbox_id, "handle_read", handle, n, line)
    return Response(data, media_type="application/octet-stream")


@router.post("/sandboxes/{sandbox_id}/fs/handles/{handle}/write")
async def fh_write(sandbox_id: str, handle: str, request: Request) -> dict:
    n = 0
    async for chunk in request.stream():
        if chunk:
            n += await _files(request)(sandbox_id, "handle_write", handle, chunk)
    return {"written": n}


@router.post("/sandboxes/{sandbox_id}/fs/handles/{handle}/seek")
async def fh_seek(sandbox_id: str, handle: str, body: SeekBody, request: Request) -> dict:
    return {"position": await _files(request)(sandbox_id, "handle_seek", handle, body.offset,
                                              body.whence)}


@router.post("/sandboxes/{sandbox_id}/fs/handles/{handle}/flush")
async def fh_flush(sandbox_id: str, handle: str, request: Request) -> dict:
    return {"position": await _files(request)(sandbox_id, "handle_flush", handle)}


@router.delete("/sandboxes/{sandbox_id}/fs/handles/{handle}")
async def fh_close(sandbox_id: str, handle: str, request: Request) -> dict:
    await _files(request)(sandbox_id, "handle_close", handle)
    return {}
