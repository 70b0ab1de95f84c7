"""The HTTP contract around the routes: API versions, idempotency keys, and one error shape.

- Versions: a client names the API version it speaks in `X-Shoal-Api-Version`; the server answers
  every request with the versions it accepts (`X-Shoal-Api-Versions`) and refuses a version it
  does not speak with a 400 that says so. Requests without the header (curl, generated clients)
  are served.
- Idempotency: a `POST`/`PUT`/`DELETE` with an `Idempotency-Key` header is answered once; a
  repeat of it (the client retrying after a lost connection or a server crash) gets the stored
  response instead of a second effect. Keys are kept `IDEMPOTENCY_TTL` (pruned by upkeep).
  Routes whose effect must be atomic with the key store it themselves, in the same transaction
  (`POST /sandboxes` in the sandbox's row, exec before the command starts); this middleware
  covers the rest, storing JSON answers under 1 MiB after the route has run. Streaming answers
  (exec streams, file reads) are not stored.
- Errors: every error body is `{"error": {"type", "message", "errno"?}}` (`ErrorResponse`), the
  framework's own (unknown route, wrong method, unparsable body) included; see app.py.
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


def _error_body(type_name: str, message: str) -> bytes:
    return json.dumps({"error": {"type": type_name, "message": message}}).encode()


async def _answer(send, status: int, body: bytes, content_type: bytes = b"application/json",
                  extra: list | None = None) -> None:
    headers = [(b"content-type", content_type), (b"content-length", str(len(body)).encode()),
               (VERSIONS_HEADER, ",".join(ACCEPTED_VERSIONS).encode()), *(extra or [])]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class ContractMiddleware:
    """ASGI middleware for versions and idempotency keys (the module docstring)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        version = headers.get(VERSION_HEADER)
        if version is not None and version.decode(errors="replace") not in ACCEPTED_VERSIONS:
            return await _answer(send, 400, _error_body(
                "InvalidError", f"this client speaks shoal API version "
                f"{version.decode(errors='replace')!r}; this server accepts "
                f"{', '.join(ACCEPTED_VERSIONS)}: install the shoal version that matches the "
                f"server (or upgrade the server)"))

        async def send_versioned(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []),
                                                  (VERSIONS_HEADER,
                                                   ",".join(ACCEPTED_VERSIONS).encode())]}
            await send(message)

        key = headers.get(IDEMPOTENCY_HEADER)
        if (key is None or scope["method"] not in ("POST", "PUT", "DELETE")
                or scope["path"].endswith(SELF_KEYED_SUFFIX) or scope["path"] in SELF_KEYED):
            return await self.app(scope, receive, send_versioned)
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
            await send_versioned(message)

        await self.app(scope, receive, send_capturing)
        # Server errors are not stored: the retry should run again.
        if (captured["ok"] and 0 < captured["status"] < 500
                and captured["ctype"].startswith(b"application/json")):
            await asyncio.to_thread(store.idempotent_put, skey, scope["method"], scope["path"],
                                    captured["status"], bytes(captured["body"]),
                                    captured["ctype"].decode(), time.time())
