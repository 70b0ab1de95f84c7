"""The one ASGI layer around the application: what every request gets besides its route.

- a request id (`X-Request-Id` in and out, in every log record made while serving it: logs.py)
  and, with `--access-log`, one access-log line;
- the HTTP contract (contract.py): API versions (`X-Shoal-Api-Versions` on every answer, a 400
  for a version this server does not speak) and answers stored under Idempotency-Keys;
- metrics by the route the request matched (metrics.py);
- one log line instead of a traceback when a client goes away mid-response.

It is one layer, not a middleware per concern, because each layer cost every request its own
header scan, wrapped `send` and copied response-start message (~0.2 ms a layer here; the server's
whole answer to `GET /health` is ~1 ms). It sits outside Starlette's own middleware, so it also
sees the 500s that Starlette's ServerErrorMiddleware writes.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time

from shoal.server import contract, logs, metrics as _metrics

_log = logging.getLogger("shoal.server")


class _Seen:
    """What the layer saw of one answer."""

    __slots__ = ("status", "first", "error_body", "done", "left", "tail")

    def __init__(self) -> None:
        self.status: int | None = None
        self.first: float | None = None
        self.error_body: bytes | None = None
        self.done = False  # the answer's last byte was handed to the server
        self.left = False  # the client disconnected before that
        self.tail: bytes | None = None  # the end of a streamed build's answer (its result line)


async def answer_error(scope, receive, send, err: Exception) -> None:
    """Answer `err` as the app's own exception handlers would (for the fast routes, which run
    outside the framework); re-raises an error no handler takes."""
    app = scope["app"]
    handler = next((app.exception_handlers[c] for c in type(err).__mro__
                    if c in app.exception_handlers), None)
    if handler is None:
        raise err
    from starlette.requests import Request

    response = await handler(Request(scope, receive), err)
    await response(scope, receive, send)


class AnswerCut(Exception):
    """Raised by a route whose answer has begun and cannot be finished (its sandbox ended
    mid-stream): the layer logs the message as a warning and cuts the connection, so the client
    sees a short answer, not a complete one, and the log has one line, not a traceback."""


# The scope extension (http_protocol.py) that closes the request's connection at once.
CUT_EXTENSION = "shoal.cut"


class FinalPiece(bytes):
    """A piece of a streamed answer that its producer knows to be the last: `stream_answer`
    sends it with the end of the body, in one write (the client is woken once, not twice)."""


async def stream_answer(receive, send, headers: list[tuple[bytes, bytes]], pieces) -> None:
    """Answer 200 with `headers` and a chunked body of the byte strings the async iterator
    `pieces` yields, as Starlette's StreamingResponse does, for the fast routes: without its
    anyio task group and second task (~0.3 ms of an exec's server CPU here). One waiter on
    `receive` notices a client that leaves and ends the stream (the iterator is closed), like
    StreamingResponse; the request's body must have been read whole before."""
    task = asyncio.current_task()
    state = {"finished": False, "gone": False}

    def left(waiter: asyncio.Future) -> None:
        if waiter.cancelled() or waiter.exception() is not None or state["finished"]:
            return
        if waiter.result().get("type") == "http.disconnect":
            state["gone"] = True
            task.cancel()

    waiter = asyncio.ensure_future(receive())
    waiter.add_done_callback(left)
    try:
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        last = b""
        async for piece in pieces:
            if isinstance(piece, FinalPiece):
                last = bytes(piece)
                break
            await send({"type": "http.response.body", "body": piece, "more_body": True})
        state["finished"] = True
        await send({"type": "http.response.body", "body": last, "more_body": False})
    except asyncio.CancelledError:
        if not state["gone"] or task.uncancel() > 0:
            raise  # (not the client leaving: shutdown, or a cancel from above as well)
    finally:
        state["finished"] = True
        waiter.cancel()
        aclose = getattr(pieces, "aclose", None)
        if aclose is not None:
            await aclose()


class RequestLayer:
    def __init__(self, app, metrics: _metrics.Metrics | None = None, fast_routes=()):
        self.app = app
        self.metrics = metrics
        # (method, compiled path pattern, handler(app, scope, receive, send, *groups)): hot
        # routes served without the framework's routing (routes/sandboxes.py FAST_ROUTES).
        self.fast_routes = tuple(fast_routes)

    async def __call__(self, scope, receive, send):
        kind = scope["type"]
        if kind != "http" and kind != "websocket":
            return await self.app(scope, receive, send)
        rid = version = key = None
        for name, value in scope.get("headers") or ():
            if name == b"x-request-id":
                rid = value
            elif name == contract.VERSION_HEADER:
                version = value
            elif name == contract.IDEMPOTENCY_HEADER:
                key = value
        rid = (rid.decode(errors="replace")[:64] if rid else "") or secrets.token_hex(6)
        token = logs.request_id.set(rid)
        started = time.monotonic()
        seen = _Seen()
        http = kind == "http"
        extra = ((contract.VERSIONS_HEADER, contract.VERSIONS_VALUE),
                 (b"x-request-id", rid.encode())) if http else ((b"x-request-id", rid.encode()),)
        m = self.metrics if http else None
        volume = m is not None and scope["path"].startswith(_metrics.VOLUME_PATHS)
        if m is not None and scope["path"] == "/images" and scope["method"] == "POST":
            seen.tail = b""

        async def send_(message):
            if message["type"] == "http.response.start":
                seen.status = message["status"]
                seen.first = time.monotonic() - started
                if seen.status >= 400:
                    seen.error_body = b""
                message = {**message, "headers": [*message.get("headers", ()), *extra]}
            elif message["type"] == "http.response.body":
                seen.done = not message.get("more_body", False)
                if seen.error_body is not None and len(seen.error_body) < 4096:
                    seen.error_body += message.get("body", b"")
                elif seen.tail is not None:
                    seen.tail = (seen.tail + message.get("body", b""))[-4096:]
                elif volume and 200 <= seen.status < 300 and _metrics.volume_flow(scope) == "out":
                    m.volume_bytes.labels("out").inc(len(message.get("body", b"")))
            await send(message)

        if http:
            inner_receive = receive

            async def receive():
                message = await inner_receive()
                if message["type"] == "http.disconnect":
                    seen.left = not seen.done  # e.g. Ctrl-C on `logs -f`: the stream just ends
                elif volume and message["type"] == "http.request" \
                        and _metrics.volume_flow(scope) == "in":
                    m.volume_bytes.labels("in").inc(len(message.get("body", b"")))
                return message

        try:
            if not http:
                await self.app(scope, receive, send_)
            elif (refused := contract.version_error(version)) is not None:
                await contract._answer(send_, 400, refused)
            elif contract.keyed(scope, key):
                await contract.answer_once(self.app, scope, receive, send_, key)
            else:
                for method, pattern, handler in self.fast_routes:
                    if scope["method"] == method and (match := pattern.fullmatch(scope["path"])):
                        await handler(self.app, scope, receive, send_, *match.groups())
                        break
                else:
                    await self.app(scope, receive, send_)
        except AnswerCut as e:
            cut = (scope.get("extensions") or {}).get(CUT_EXTENSION)
            if seen.status is None or cut is None:
                raise  # (nothing was answered yet: the framework's 500 is right)
            _log.warning("%s %s: %s; connection closed", scope.get("method"), scope["path"], e,
                         extra={"event": "http.cut"})
            cut()
            # One turn of the loop: the server sees the connection lost before this returns,
            # and does not report an answer left unfinished.
            await asyncio.sleep(0)
        except BaseException as e:
            if type(e).__name__ in logs.DISCONNECTS or isinstance(e, (ConnectionError, OSError)) \
                    and seen.status is not None:
                seen.left = True
                if type(e).__name__ == "CancelledError":
                    raise
                return
            raise
        finally:
            # (An app that still answered in full after the disconnect logged it itself.)
            if seen.left and not seen.done:
                _log.info("client went away during %s %s", scope.get("method", "WS"),
                          scope["path"], extra={"event": "client.abort"})
            total = time.monotonic() - started
            if m is not None:
                _metrics.record(m, scope, seen.status or 0, seen.first, total, seen.error_body,
                                seen.tail)
            if not logs.access.disabled:
                logs.access.info("%s %s %s %.1f ms", scope.get("method", "WS"), scope["path"],
                                 seen.status, total * 1000, extra={"event": "http.request"})
            logs.request_id.reset(token)
