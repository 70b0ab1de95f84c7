"""The HTTP contract around the routes: API versions, idempotency keys, and one error shape.

- Versions: a client names the API version it speaks in `X-Shoal-Api-Version`; the server answers
  every request with the versions it accepts (`X-Shoal-Api-Versions`) and refuses a version it
  does not speak with a 400 that says so. Requests without the header (curl, generated clients)
  are served.
- Idempotency: a `POST`/`PUT`/`DELETE` with an `Idempotency-Key` header is answered once; a
  repeat of it (the client retrying after a lost connection or a server crash) gets the stored
  response instead of a second effect. Keys are kept `IDEMPOTENCY_TTL` (pruned by upkeep).
  Routes whose effect must be atomic with the key store it themselves, in the same transaction
  (`POST /sandboxes` in the sandbox's row; exec with the exec id, which is derived from the
  key, so a repeat that finds no key names the session its first attempt started); `answer_once`
  covers the rest, storing JSON answers under 1 MiB after the route has run. Streaming answers
  (exec streams, file reads) are not stored.
- Errors: every error body is `{"error": {"type", "message", "errno"?}}` (`ErrorResponse`), the
  framework's own (unknown route, wrong method, unparsable body) included; see app.py.

`server/http_layer.RequestLayer` applies the first two to every request (`version_error`,
`keyed`, `answer_once`), in the one ASGI layer that also gives request ids and measures metrics.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

API_VERSION = "1"
ACCEPTED_VERSIONS = ("1",)
VERSION_HEADER = b"x-shoal-api-version"
VERSIONS_HEADER = b"x-shoal-api-versions"
IDEMPOTENCY_HEADER = b"idempotency-key"
IDEMPOTENCY_TTL = 24 * 3600.0
MAX_KEY = 200
MAX_STORED = 1 << 20
# Routes that store their key with their effect (see the module docstring).
SELF_KEYED_SUFFIX = ("/exec",)
SELF_KEYED = ("/sandboxes",)
VERSIONS_VALUE = ",".join(ACCEPTED_VERSIONS).encode()


def _error_body(type_name: str, message: str) -> bytes:
    return json.dumps({"error": {"type": type_name, "message": message}}).encode()


async def _answer(send, status: int, body: bytes, content_type: bytes = b"application/json",
                  extra: list | None = None) -> None:
    """A whole answer from the contract itself (`send` adds the versions header)."""
    headers = [(b"content-type", content_type), (b"content-length", str(len(body)).encode()),
               *(extra or [])]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def version_error(version: bytes | None) -> bytes | None:
    """The 400 body for a client that speaks an API version this server does not, else None."""
    if version is None or version.decode(errors="replace") in ACCEPTED_VERSIONS:
        return None
    said = version.decode(errors="replace")
    return _error_body(
        "InvalidError", f"this client speaks shoal API version {said!r}; this server accepts "
        f"{', '.join(ACCEPTED_VERSIONS)}: install the shoal version that matches the server (or "
        f"upgrade the server)")


def keyed(scope, key: bytes | None) -> bool:
    """Whether this request's answer is stored under its Idempotency-Key by `answer_once`
    (not the routes that store their key with their effect)."""
    return (key is not None and scope["method"] in ("POST", "PUT", "DELETE")
            and not scope["path"].endswith(SELF_KEYED_SUFFIX) and scope["path"] not in SELF_KEYED)


async def answer_once(app, scope, receive, send, key: bytes) -> None:
    """Run the request under its Idempotency-Key: a repeat gets the stored answer."""
    if not key or len(key) > MAX_KEY:
        return await _answer(send, 400, _error_body(
            "InvalidError", f"Idempotency-Key must be 1-{MAX_KEY} bytes"))
    store = scope["app"].state.svc.store
    skey = key.decode(errors="replace")
    stored = await asyncio.to_thread(store.idempotent_get, skey)
    if stored is not None:
        method, path, status, body, ctype = stored
        if (method, path) != (scope["method"], scope["path"]):
            return await _answer(send, 400, _error_body(
                "InvalidError", "this Idempotency-Key was used for another request"))
        return await _answer(send, status, body, ctype.encode(),
                             [(b"idempotent-replayed", b"true")])
    captured: dict[str, Any] = {"status": 0, "ctype": b"", "body": bytearray(), "ok": True}

    async def send_capturing(message):
        if message["type"] == "http.response.start":
            captured["status"] = message["status"]
            captured["ctype"] = dict(message.get("headers", [])).get(b"content-type", b"")
        elif message["type"] == "http.response.body":
            captured["body"] += message.get("body", b"")
            if len(captured["body"]) > MAX_STORED:
                captured["ok"] = False
                captured["body"] = bytearray()
        await send(message)

    await app(scope, receive, send_capturing)
    # Server errors are not stored: the retry should run again.
    if (captured["ok"] and 0 < captured["status"] < 500
            and captured["ctype"].startswith(b"application/json")):
        await asyncio.to_thread(store.idempotent_put, skey, scope["method"], scope["path"],
                                captured["status"], bytes(captured["body"]),
                                captured["ctype"].decode(), time.time())
