"""Named secrets (`/secrets/...`): values go in, only key names come out."""

from __future__ import annotations

from fastapi import APIRouter, Query, Request

from shoal.server.models import SecretCreate, SecretInfo, SecretLookup
from shoal.server.storage.state import SecretRecord

router = APIRouter(tags=["secrets"])


def _info(rec: SecretRecord) -> SecretInfo:
    return SecretInfo(secret_id=rec.id, name=rec.name, created_at=rec.created_at,
                      updated_at=rec.updated_at, keys=sorted(rec.env))


@router.post("/secrets", response_model=SecretInfo, operation_id="secret_create")
def secret_create(body: SecretCreate, request: Request) -> SecretInfo:
    return _info(request.app.state.svc.secrets.create(body.name, body.env, body.force))


@router.post("/secrets/lookup", response_model=SecretInfo, operation_id="secret_lookup")
def secret_lookup(body: SecretLookup, request: Request) -> SecretInfo:
    return _info(request.app.state.svc.secrets.lookup(body.name, body.required_keys))


@router.get("/secrets", response_model=list[SecretInfo], operation_id="secret_list")
def secret_list(request: Request) -> list[SecretInfo]:
    return [_info(r) for r in request.app.state.svc.secrets.list()]


@router.delete("/secrets/{name}", operation_id="secret_delete")
def secret_delete(name: str, request: Request, allow_missing: bool = Query(False)) -> dict:
    request.app.state.svc.secrets.delete(name, allow_missing)
    return {"deleted": name}
