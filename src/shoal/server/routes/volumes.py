"""Volumes (`/volumes/...`) and network file systems (`/nfs/...`): one set of routes, two kinds."""

from __future__ import annotations

import os

from fastapi import APIRouter, Query, Request
from fastapi.responses import StreamingResponse

from shoal.server.models import FileEntryModel, VolumeCreate, VolumeInfo, VolumeLookup
from shoal.storage.state import VolumeRecord
from shoal.storage.volumes import iter_fd

router = APIRouter(tags=["volumes"])
KIND = {"volumes": "volume", "nfs": "nfs"}


def _info(rec: VolumeRecord, ttl: float | None = None) -> VolumeInfo:
    return VolumeInfo(volume_id=rec.id, kind=rec.kind, name=rec.name,
                      ephemeral=rec.lease_expires is not None, created_at=rec.created_at,
                      lease_ttl=ttl if rec.lease_expires is not None else None)


def _svc(request: Request):
    return request.app.state.svc.volumes


for prefix, kind in KIND.items():
    def _routes(prefix: str = prefix, kind: str = kind) -> None:
        @router.post(f"/{prefix}/lookup", response_model=VolumeInfo,
                     operation_id=f"{kind}_lookup")
        def lookup(body: VolumeLookup, request: Request) -> VolumeInfo:
            return _info(_svc(request).lookup(kind, body.name, body.create_if_missing))

        @router.post(f"/{prefix}", response_model=VolumeInfo, operation_id=f"{kind}_create")
        def create(body: VolumeCreate, request: Request) -> VolumeInfo:
            return _info(_svc(request).create(kind, body.name, body.allow_existing))

        @router.post(f"/{prefix}/ephemeral", response_model=VolumeInfo,
                     operation_id=f"{kind}_ephemeral")
        def ephemeral(request: Request) -> VolumeInfo:
            svc = _svc(request)
            return _info(svc.ephemeral(kind), svc.lease_ttl)

        @router.get(f"/{prefix}", response_model=list[VolumeInfo], operation_id=f"{kind}_list")
        def list_(request: Request) -> list[VolumeInfo]:
            return [_info(r) for r in _svc(request).store.volume_list(kind)
                    if r.state == "ready" and r.name is not None]

        @router.get(f"/{prefix}/{{volume_id}}", response_model=VolumeInfo,
                    operation_id=f"{kind}_get")
        def get(volume_id: str, request: Request) -> VolumeInfo:
            return _info(_svc(request).get(volume_id, kind))

        @router.post(f"/{prefix}/{{volume_id}}/heartbeat", response_model=VolumeInfo,
                     operation_id=f"{kind}_heartbeat")
        def heartbeat(volume_id: str, request: Request) -> VolumeInfo:
            svc = _svc(request)
            svc.get(volume_id, kind)
            return _info(svc.heartbeat(volume_id), svc.lease_ttl)

        @router.delete(f"/{prefix}/{{volume_id}}", operation_id=f"{kind}_delete")
        def delete(volume_id: str, request: Request) -> dict:
            svc = _svc(request)
            svc.get(volume_id, kind)
            svc.delete(volume_id)
            return {}

        @router.get(f"/{prefix}/{{volume_id}}/file", operation_id=f"{kind}_read_file",
                    response_class=StreamingResponse)
        def read_file(volume_id: str, request: Request, path: str = Query(...)):
            svc = _svc(request)
            svc.get(volume_id, kind)
            fd = svc.storage.open_read(volume_id, path)
            size = os.fstat(fd).st_size
            return StreamingResponse(iter_fd(fd), media_type="application/octet-stream",
                                     headers={"content-length": str(size)})

        @router.put(f"/{prefix}/{{volume_id}}/file", operation_id=f"{kind}_write_file")
        async def write_file(volume_id: str, request: Request, path: str = Query(...)) -> dict:
            svc = _svc(request)
            svc.get(volume_id, kind)
            n = await request.app.state.svc.write_from_request(volume_id, path, request)
            return {"bytes": n}

        @router.get(f"/{prefix}/{{volume_id}}/listdir", response_model=list[FileEntryModel],
                    operation_id=f"{kind}_listdir")
        def listdir(volume_id: str, request: Request, path: str = "/",
                    recursive: bool = False) -> list[FileEntryModel]:
            svc = _svc(request)
            svc.get(volume_id, kind)
            return [FileEntryModel(**e.__dict__)
                    for e in svc.storage.listdir(volume_id, path, recursive)]

    _routes()
