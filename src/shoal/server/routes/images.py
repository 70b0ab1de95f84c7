from __future__ import annotations

import json

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from shoal.server.models import BlobList, ImageRecipe

router = APIRouter(tags=["images"])


def _svc(request: Request):
    return request.app.state.svc.images


@router.post("/images", response_class=StreamingResponse)
async def image_build(body: ImageRecipe, request: Request):
    """Build the recipe (cached layers are reused). Streams newline-delimited JSON: `{"log": ...}`
    lines, then `{"image_id": ...}` or `{"error": {"type", "message"}}`."""
    recipe = body.model_dump(exclude_none=True)

    async def stream():
        async for item in _svc(request).build_stream(recipe):
            yield (json.dumps(item) + "\n").encode()

    return StreamingResponse(stream(), media_type="application/x-ndjson")


@router.get("/images")
def image_list(request: Request) -> list[dict]:
    return _svc(request).list()


@router.get("/images/{image_id}")
def image_get(image_id: str, request: Request) -> dict:
    m = _svc(request).manifest(image_id)
    return {"image_id": m.id, "layers": m.layers, "created_at": m.created_at,
            "description": m.description}


@router.delete("/images/{image_id}")
def image_remove(image_id: str, request: Request) -> dict:
    _, images_in_use = request.app.state.svc.sandboxes.layers_in_use()
    _svc(request).remove(image_id, images_in_use)
    return {}


@router.post("/images/prune")
def image_prune(request: Request) -> dict:
    layers_in_use, _ = request.app.state.svc.sandboxes.layers_in_use()
    return _svc(request).prune(layers_in_use)


@router.post("/images/blobs/missing")
def blobs_missing(body: BlobList, request: Request) -> dict:
    return {"missing": _svc(request).missing_blobs(body.digests)}


@router.put("/images/blobs/{sha}")
async def blob_put(sha: str, request: Request) -> dict:
    return {"bytes": await _svc(request).put_blob(sha, request.stream())}
