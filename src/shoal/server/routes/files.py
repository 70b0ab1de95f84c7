"""The sandbox file API: `/sandboxes/{id}/fs/...` (whole files, directories, watches) and
`/sandboxes/{id}/fs/handles/...` (open files, for `Sandbox.open`)."""

from __future__ import annotations

import asyncio
import os

from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import StreamingResponse

from shoal.server.host.runc_files import READ_LIMIT
from shoal.server.models import FileInfoModel, MkdirBody, OpenBody, RenameFileBody, SeekBody
from shoal.server.storage.volumes import iter_fd

router = APIRouter(tags=["sandbox files"])
INLINE_READ = 256 << 10


def _svc(request: Request, sandbox_id: str):
    sandboxes = request.app.state.svc.sandboxes
    sandboxes.touch(sandbox_id)
    return sandboxes.files


@router.get("/sandboxes/{sandbox_id}/fs/stat", response_model=FileInfoModel)
def fs_stat(sandbox_id: str, request: Request, path: str = Query(...)) -> dict:
    return _svc(request, sandbox_id).stat(sandbox_id, path)


@router.get("/sandboxes/{sandbox_id}/fs/list", response_model=list[FileInfoModel])
def fs_list(sandbox_id: str, request: Request, path: str = Query(...)) -> list[dict]:
    return _svc(request, sandbox_id).list(sandbox_id, path)


@router.get("/sandboxes/{sandbox_id}/fs/file", response_class=StreamingResponse)
async def fs_read(sandbox_id: str, request: Request, path: str = Query(...), whole: bool = False):
    """The file's bytes, streamed. `whole=true` (read_bytes/read_text) refuses files over the
    whole-file limit with SandboxFilesystemFileTooLargeError."""
    fd = _svc(request, sandbox_id).open_read(sandbox_id, path, READ_LIMIT if whole else None)
    size = os.fstat(fd).st_size
    if size <= INLINE_READ:
        # Small files, the common case for agents: read here and answer in one write, without
        # the worker-thread hops of a stream (about a third of a small read's latency).
        try:
            return Response(os.read(fd, INLINE_READ + 1), media_type="application/octet-stream")
        finally:
            os.close(fd)
    return StreamingResponse(iter_fd(fd), media_type="application/octet-stream",
                             headers={"content-length": str(size)})


@router.put("/sandboxes/{sandbox_id}/fs/file")
async def fs_write(sandbox_id: str, request: Request, path: str = Query(...),
                   parents: bool = True) -> dict:
    """Replace (or create) the file with the request body, atomically."""
    files = _svc(request, sandbox_id)
    out = files.begin_write(sandbox_id, path, parents)
    try:
        async for chunk in request.stream():
            out.write(chunk)
        await asyncio.to_thread(out.commit)
    finally:
        out.close()
    return {"bytes": out.written}


@router.post("/sandboxes/{sandbox_id}/fs/mkdir")
def fs_mkdir(sandbox_id: str, body: MkdirBody, request: Request) -> dict:
    _svc(request, sandbox_id).mkdir(sandbox_id, body.path, body.parents, body.exist_ok)
    return {}


@router.delete("/sandboxes/{sandbox_id}/fs/file")
def fs_remove(sandbox_id: str, request: Request, path: str = Query(...),
              recursive: bool = False) -> dict:
    _svc(request, sandbox_id).remove(sandbox_id, path, recursive)
    return {}


@router.post("/sandboxes/{sandbox_id}/fs/rename")
def fs_rename(sandbox_id: str, body: RenameFileBody, request: Request) -> dict:
    _svc(request, sandbox_id).rename(sandbox_id, body.src, body.dst, body.overwrite)
    return {}


@router.get("/sandboxes/{sandbox_id}/fs/watch", response_class=StreamingResponse)
def fs_watch(sandbox_id: str, request: Request, path: str = Query(...),
             recursive: bool = False, timeout: float | None = None):
    """Newline-delimited JSON events `{"paths": [...], "type": ...}` until `timeout` seconds pass,
    the sandbox ends, or the client disconnects."""
    watch = _svc(request, sandbox_id).open_watch(sandbox_id, path, recursive)
    ended = request.app.state.svc.sandboxes.ended_event(sandbox_id)
    return StreamingResponse(watch.stream(timeout, ended), media_type="application/x-ndjson")


@router.post("/sandboxes/{sandbox_id}/fs/handles")
def fh_open(sandbox_id: str, body: OpenBody, request: Request) -> dict:
    return {"handle": _svc(request, sandbox_id).handle_open(sandbox_id, body.path, body.mode)}


@router.post("/sandboxes/{sandbox_id}/fs/handles/{handle}/read")
def fh_read(sandbox_id: str, handle: str, request: Request, n: int = -1,
            line: bool = False) -> Response:
    h = _svc(request, sandbox_id).handle(sandbox_id, handle)
    data = h.file.readline(n) if line else h.file.read(n if n >= 0 else None)
    return Response(data, media_type="application/octet-stream")


@router.post("/sandboxes/{sandbox_id}/fs/handles/{handle}/write")
async def fh_write(sandbox_id: str, handle: str, request: Request) -> dict:
    h = _svc(request, sandbox_id).handle(sandbox_id, handle)
    n = 0
    async for chunk in request.stream():
        n += h.file.write(chunk)
    return {"written": n}


@router.post("/sandboxes/{sandbox_id}/fs/handles/{handle}/seek")
def fh_seek(sandbox_id: str, handle: str, body: SeekBody, request: Request) -> dict:
    h = _svc(request, sandbox_id).handle(sandbox_id, handle)
    return {"position": h.file.seek(body.offset, body.whence)}


@router.post("/sandboxes/{sandbox_id}/fs/handles/{handle}/flush")
def fh_flush(sandbox_id: str, handle: str, request: Request) -> dict:
    h = _svc(request, sandbox_id).handle(sandbox_id, handle)
    h.file.flush()
    return {"position": h.file.tell()}


@router.delete("/sandboxes/{sandbox_id}/fs/handles/{handle}")
def fh_close(sandbox_id: str, handle: str, request: Request) -> dict:
    _svc(request, sandbox_id).handle_close(sandbox_id, handle)
    return {}
