"""Volumes (`/volumes/...`) and network file systems (`/nfs/...`): one set of routes, two kinds."""

from __future__ import annotations

import asyncio
import os

from fastapi import APIRouter, Query, Request
from fastapi.responses import StreamingResponse

from shoal.exception import InvalidError
from shoal.server.models import (BatchCreate, BatchInfo, CopyRequest, FileEntryModel, RenameRequest,
                                 VolumeCreate, VolumeInfo, VolumeLookup)
from shoal.server.storage.state import VolumeRecord
from shoal.server.storage.volumes import iter_fd

router = APIRouter(tags=["volumes"])
KINDS = {"volumes": "volume", "nfs": "nfs"}


def _info(rec: VolumeRecord, ttl: float | None = None) -> VolumeInfo:
    return VolumeInfo(volume_id=rec.id, kind=rec.kind, name=rec.name,
                      ephemeral=rec.lease_expires is not None, created_at=rec.created_at,
                      lease_ttl=ttl if rec.lease_expires is not None else None)


def _mode(mode: str | None) -> int | None:
    if mode is None:
        return None
    try:
        value = int(mode, 8)
    except ValueError:
        raise InvalidError(f"mode must be octal like '644', got {mode!r}") from None
    if not 0 <= value <= 0o7777:
        raise InvalidError(f"mode {mode!r} is out of range")
    return value


def _register(prefix: str, kind: str) -> None:
    def svc(request: Request, volume_id: str | None = None):
        service = request.app.state.svc.volumes
        if volume_id is not None:
            service.get(volume_id, kind)
        return service

    async def asvc(request: Request, volume_id: str):
        """`svc` for async routes: the volume's row is read in a worker thread, not on the loop."""
        return await asyncio.to_thread(svc, request, volume_id)

    def op(name: str) -> str:
        return f"{kind}_{name}"

    @router.post(f"/{prefix}/lookup", response_model=VolumeInfo, operation_id=op("lookup"))
    def lookup(body: VolumeLookup, request: Request) -> VolumeInfo:
        return _info(svc(request).lookup(kind, body.name, body.create_if_missing))

    @router.post(f"/{prefix}", response_model=VolumeInfo, operation_id=op("create"))
    def create(body: VolumeCreate, request: Request) -> VolumeInfo:
        return _info(svc(request).create(kind, body.name, body.allow_existing))

    @router.post(f"/{prefix}/ephemeral", response_model=VolumeInfo, operation_id=op("ephemeral"))
    def ephemeral(request: Request) -> VolumeInfo:
        service = svc(request)
        return _info(service.ephemeral(kind), service.lease_ttl)

    @router.post(f"/{prefix}/rename", response_model=VolumeInfo, operation_id=op("rename"))
    def rename(body: RenameRequest, request: Request) -> VolumeInfo:
        return _info(svc(request).rename(kind, body.old_name, body.new_name))

    @router.get(f"/{prefix}", response_model=list[VolumeInfo], operation_id=op("list"))
    def list_(request: Request) -> list[VolumeInfo]:
        return [_info(r) for r in svc(request).store.volume_list(kind)
                if r.state == "ready" and r.name is not None]

    @router.get(f"/{prefix}/{{volume_id}}", response_model=VolumeInfo, operation_id=op("get"))
    def get(volume_id: str, request: Request) -> VolumeInfo:
        return _info(svc(request).get(volume_id, kind))

    @router.post(f"/{prefix}/{{volume_id}}/heartbeat", response_model=VolumeInfo,
                 operation_id=op("heartbeat"))
    def heartbeat(volume_id: str, request: Request) -> VolumeInfo:
        service = svc(request, volume_id)
        return _info(service.heartbeat(volume_id), service.lease_ttl)

    @router.delete(f"/{prefix}/{{volume_id}}", operation_id=op("delete"))
    def delete(volume_id: str, request: Request) -> dict:
        svc(request, volume_id).delete(volume_id)
        return {}

    @router.get(f"/{prefix}/{{volume_id}}/file", operation_id=op("read_file"),
                response_class=StreamingResponse)
    def read_file(volume_id: str, request: Request, path: str = Query(...)):
        fd = svc(request, volume_id).storage.open_read(volume_id, path)
        size = os.fstat(fd).st_size
        return StreamingResponse(iter_fd(fd), media_type="application/octet-stream",
                                 headers={"content-length": str(size)})

    @router.put(f"/{prefix}/{{volume_id}}/file", operation_id=op("write_file"))
    async def write_file(volume_id: str, request: Request, path: str = Query(...)) -> dict:
        n = await (await asvc(request, volume_id)).write_file(volume_id, path, request.stream())
        return {"bytes": n}

    @router.delete(f"/{prefix}/{{volume_id}}/file", operation_id=op("remove_file"))
    def remove_file(volume_id: str, request: Request, path: str = Query(...),
                    recursive: bool = False) -> dict:
        svc(request, volume_id).storage.remove(volume_id, path, recursive)
        return {}

    @router.post(f"/{prefix}/{{volume_id}}/copy", operation_id=op("copy_files"))
    def copy_files(volume_id: str, body: CopyRequest, request: Request) -> dict:
        svc(request, volume_id).storage.copy(volume_id, body.src_paths, body.dst, body.recursive)
        return {}

    @router.get(f"/{prefix}/{{volume_id}}/listdir", response_model=list[FileEntryModel],
                operation_id=op("listdir"))
    def listdir(volume_id: str, request: Request, path: str = "/",
                recursive: bool = False) -> list[FileEntryModel]:
        storage = svc(request, volume_id).storage
        return [FileEntryModel(**e.__dict__) for e in storage.listdir(volume_id, path, recursive)]

    @router.post(f"/{prefix}/{{volume_id}}/batches", response_model=BatchInfo,
                 operation_id=op("batch_create"))
    def batch_create(volume_id: str, request: Request,
                     body: BatchCreate | None = None) -> BatchInfo:
        body = body or BatchCreate()
        batch = svc(request, volume_id).batch_create(volume_id, body.paths, body.force)
        return BatchInfo(batch_id=batch.id)

    @router.put(f"/{prefix}/{{volume_id}}/batches/{{batch_id}}/file", operation_id=op("batch_put"))
    async def batch_put(volume_id: str, batch_id: str, request: Request, path: str = Query(...),
                        mode: str | None = None) -> dict:
        n = await (await asvc(request, volume_id)).batch_put(volume_id, batch_id, path,
                                                             _mode(mode), request.stream())
        return {"bytes": n}

    @router.post(f"/{prefix}/{{volume_id}}/batches/{{batch_id}}/commit",
                 operation_id=op("batch_commit"))
    async def batch_commit(volume_id: str, batch_id: str, request: Request,
                           force: bool = False) -> dict:
        service = await asvc(request, volume_id)
        return {"files": await service.batch_commit(volume_id, batch_id, force)}

    @router.delete(f"/{prefix}/{{volume_id}}/batches/{{batch_id}}", operation_id=op("batch_abort"))
    def batch_abort(volume_id: str, batch_id: str, request: Request) -> dict:
        svc(request).batch_abort(volume_id, batch_id)
        return {}


for _prefix, _kind in KINDS.items():
    _register(_prefix, _kind)
