"""Dicts and Queues over HTTP. Keys and values travel base64-encoded (they are pickles the
server never opens). A blocking queue get is a long poll of at most `MAX_WAIT` seconds."""

from __future__ import annotations

import base64

from fastapi import APIRouter, Query, Request
from pydantic import BaseModel, Field

from shoal.server.models import Name

from shoal.server.control.kv import MAX_WAIT

router = APIRouter(tags=["dicts and queues"])


class KvLookup(BaseModel):
    name: Name
    create_if_missing: bool = False


class KvDelete(BaseModel):
    name: Name
    allow_missing: bool = False


class DictPut(BaseModel):
    items: list[tuple[str, str]] = Field(description="[key, value] pairs, base64 pickles")
    skip_if_exists: bool = False


class DictKey(BaseModel):
    key: str = Field(description="base64 pickle")


class QueuePut(BaseModel):
    values: list[str] = Field(description="base64 pickles")
    partition: str | None = None
    partition_ttl: float = 24 * 3600
    timeout: float | None = Field(None, description="wait this long for room when full")


class QueueGet(BaseModel):
    n: int = 1
    partition: str | None = None
    timeout: float = Field(0, ge=0, description=f"long poll, at most {MAX_WAIT:.0f} s")


class QueueClear(BaseModel):
    partition: str | None = None
    all: bool = False


def _svc(request: Request):
    return request.app.state.svc.kv


def _b(data: str) -> bytes:
    return base64.b64decode(data, validate=True)


def _s(data: bytes | None) -> str | None:
    return None if data is None else base64.b64encode(data).decode()


def _obj(rec) -> dict:
    return {"id": rec.id, "name": rec.name, "created_at": rec.created_at}


for kind in ("dict", "queue"):
    def _routes(kind: str = kind) -> None:
        @router.post(f"/{kind}s/lookup", name=f"{kind}_lookup")
        def lookup(body: KvLookup, request: Request) -> dict:
            return _obj(_svc(request).lookup(kind, body.name, body.create_if_missing))

        @router.post(f"/{kind}s/ephemeral", name=f"{kind}_ephemeral")
        def ephemeral(request: Request) -> dict:
            svc = _svc(request)
            return {**_obj(svc.ephemeral(kind)), "lease_ttl": svc.lease_ttl}

        @router.get(f"/{kind}s", name=f"{kind}_list")
        def listing(request: Request) -> list[dict]:
            return [_obj(r) for r in _svc(request).list(kind)]

        @router.post(f"/{kind}s/delete", name=f"{kind}_delete_named")
        def delete_named(body: KvDelete, request: Request) -> dict:
            _svc(request).delete_named(kind, body.name, body.allow_missing)
            return {}

        @router.get(f"/{kind}s/{{obj_id}}", name=f"{kind}_get")
        def info(obj_id: str, request: Request) -> dict:
            return _obj(_svc(request).get(kind, obj_id))

        @router.post(f"/{kind}s/{{obj_id}}/heartbeat", name=f"{kind}_heartbeat")
        def heartbeat(obj_id: str, request: Request) -> dict:
            _svc(request).heartbeat(kind, obj_id)
            return {}

        @router.delete(f"/{kind}s/{{obj_id}}", name=f"{kind}_delete")
        def delete(obj_id: str, request: Request) -> dict:
            _svc(request).delete(kind, obj_id)
            return {}

    _routes()


@router.post("/dicts/{dict_id}/get")
def dict_get(dict_id: str, body: DictKey, request: Request) -> dict:
    value = _svc(request).dict_get(dict_id, _b(body.key))
    return {"found": value is not None, "value": _s(value)}


@router.post("/dicts/{dict_id}/put")
def dict_put(dict_id: str, body: DictPut, request: Request) -> dict:
    n = _svc(request).dict_put(dict_id, [(_b(k), _b(v)) for k, v in body.items],
                               body.skip_if_exists)
    return {"written": n}


@router.post("/dicts/{dict_id}/pop")
def dict_pop(dict_id: str, body: DictKey, request: Request) -> dict:
    value = _svc(request).dict_pop(dict_id, _b(body.key))
    return {"found": value is not None, "value": _s(value)}


@router.get("/dicts/{dict_id}/len")
def dict_len(dict_id: str, request: Request) -> dict:
    return {"len": _svc(request).dict_len(dict_id)}


@router.get("/dicts/{dict_id}/items")
def dict_items(dict_id: str, request: Request) -> list[tuple[str, str]]:
    return [(_s(k), _s(v)) for k, v in _svc(request).dict_items(dict_id)]


@router.post("/dicts/{dict_id}/clear")
def dict_clear(dict_id: str, request: Request) -> dict:
    _svc(request).dict_clear(dict_id)
    return {}


@router.post("/queues/{queue_id}/put")
async def queue_put(queue_id: str, body: QueuePut, request: Request) -> dict:
    await _svc(request).queue_put(queue_id, [_b(v) for v in body.values], body.partition,
                                  body.partition_ttl, body.timeout)
    return {}


@router.post("/queues/{queue_id}/get")
async def queue_get(queue_id: str, body: QueueGet, request: Request) -> dict:
    values = await _svc(request).queue_get(queue_id, body.n, body.partition, body.timeout)
    return {"values": [_s(v) for v in values]}


@router.get("/queues/{queue_id}/items")
def queue_items(queue_id: str, request: Request, partition: str | None = None) -> list[str]:
    return [_s(v) for v in _svc(request).queue_peek(queue_id, partition)]


@router.get("/queues/{queue_id}/len")
def queue_len(queue_id: str, request: Request, partition: str | None = None,
              total: bool = Query(False)) -> dict:
    return {"len": _svc(request).queue_len(queue_id, partition, total)}


@router.post("/queues/{queue_id}/clear")
def queue_clear(queue_id: str, body: QueueClear, request: Request) -> dict:
    _svc(request).queue_clear(queue_id, body.partition, body.all)
    return {}
