from __future__ import annotations

import secrets
import time

from fastapi import APIRouter, Request

from shoal.exception import NotFoundError
from shoal.server.models import AppInfo, AppLookup
from shoal.server.control.volumes import check_name
from shoal.server.storage.state import AppRecord

router = APIRouter(tags=["apps"])


def _info(rec: AppRecord) -> AppInfo:
    return AppInfo(app_id=rec.id, name=rec.name, created_at=rec.created_at)


@router.post("/apps/lookup", response_model=AppInfo)
def app_lookup(body: AppLookup, request: Request) -> AppInfo:
    store = request.app.state.svc.store
    check_name(body.name, "app")
    rec = store.app_lookup(body.name)
    if rec is None:
        if not body.create_if_missing:
            raise NotFoundError(f"app {body.name!r} not found; use create_if_missing=True")
        rec = store.app_create(AppRecord(f"ap-{secrets.token_hex(11)}", body.name, time.time()))
    return _info(rec)
