"""Prometheus metrics (`GET /metrics`, text format).

Request-shaped metrics (creation, exec and file-API latency, volume bytes, image build time, errors
by type) are measured from the route each request matched by the server's one ASGI layer
(`http_layer.RequestLayer`, which calls `record`), so no route or service carries metrics code. State-shaped ones (sandboxes by state and runtime, warm-pool hits and
misses) are read from the services when Prometheus scrapes. Each app has its own registry.
"""

from __future__ import annotations

import json

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

LATENCY = (.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60)
BUILD = (1, 5, 15, 30, 60, 120, 300, 600, 1800)


class Metrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry(auto_describe=True)
        self.creations = Counter("shoal_sandbox_creations_total",
                                 "Sandbox creations by result", ["result"], registry=r)
        self.create_seconds = Histogram("shoal_sandbox_create_seconds",
                                        "Time to create a sandbox", buckets=LATENCY, registry=r)
        self.exec_seconds = Histogram("shoal_exec_start_seconds",
                                      "Time until a command started (response headers sent)",
                                      buckets=LATENCY, registry=r)
        self.file_seconds = Histogram("shoal_file_api_seconds",
                                      "Latency of sandbox file API calls", ["op"],
                                      buckets=LATENCY, registry=r)
        self.volume_bytes = Counter("shoal_volume_bytes_total",
                                    "Bytes moved through the volume API", ["direction"],
                                    registry=r)
        self.build_seconds = Histogram("shoal_image_build_seconds",
                                       "Duration of image build requests by result", ["result"],
                                       buckets=BUILD, registry=r)
        self.errors = Counter("shoal_errors_total", "Error responses by error type", ["type"],
                              registry=r)
        self.app_state = None  # the app's state; its `svc` is read at scrape time
        r.register(_StateCollector(self))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _StateCollector:
    def __init__(self, metrics: Metrics):
        self.metrics = metrics

    def describe(self):
        return []

    def collect(self):
        svc = getattr(self.metrics.app_state, "svc", None)
        states = GaugeMetricFamily("shoal_sandboxes", "Sandboxes by state and runtime",
                                   labels=["state", "runtime"])
        hits = CounterMetricFamily("shoal_pool_hits", "Creations served by the warm pool")
        misses = CounterMetricFamily("shoal_pool_misses", "Creations the warm pool could not serve")
        idle = GaugeMetricFamily("shoal_pool_idle", "Warm sandboxes waiting")
        if svc is not None:
            counts = {("running", "runc"): 0, ("terminated", "runc"): 0,
                      **svc.store.sandbox_runtime_counts()}
            for (state, runtime), n in counts.items():
                states.add_metric([state, runtime], n)
            pool = svc.sandboxes.pool
            hits.add_metric([], pool.hits if pool else 0)
            misses.add_metric([], pool.misses if pool else 0)
            idle.add_metric([], pool.total() if pool else 0)
        yield from (states, hits, misses, idle)


VOLUME_PATHS = ("/volumes/", "/nfs/", "/network_file_systems/")


def volume_flow(scope) -> str | None:
    """"in" for an upload to a volume's file route (its request body is counted), "out" for a
    download from one (its response body), None for anything else: the JSON answer to an upload
    is not volume data."""
    if not getattr(scope.get("route"), "path", "").endswith("/file"):
        return None
    return {"PUT": "in", "GET": "out"}.get(scope.get("method"))


_WATCH = "/sandboxes/{sandbox_id}/fs/watch"  # a stream as long as the watch: not a latency


def _error_type(body: bytes) -> str:
    try:
        return json.loads(body)["error"]["type"]
    except (ValueError, KeyError, TypeError):
        return "HTTPError"


def record(m: Metrics, scope, status: int, first: float | None, total: float,
           error_body: bytes | None, build_tail: bytes | None = None) -> None:
    """Account one finished request by the route it matched (FastAPI puts it in
    scope["route"]): `first` is the time to the response's start, `error_body` the first bytes
    of an error answer (None for a success), `build_tail` the last bytes of a build's streamed
    answer, whose last line says how the build ended (a failed build still answers 200)."""
    route = getattr(scope.get("route"), "path", "")
    method = scope.get("method")
    ok = 200 <= status < 400
    if route == "/sandboxes" and method == "POST":
        m.creations.labels("ok" if ok else "error").inc()
        if ok:
            m.create_seconds.observe(total)
    elif route == "/sandboxes/{sandbox_id}/exec" and ok:
        m.exec_seconds.observe(first or total)
    elif route.startswith("/sandboxes/{sandbox_id}/fs/") and route != _WATCH:
        op = route.split("/fs/", 1)[1].replace("/{handle}", "")
        m.file_seconds.labels(f"{method.lower()} {op}").observe(total)
    elif route == "/images" and method == "POST" and ok:
        last = (build_tail or b"").rstrip(b"\n").rpartition(b"\n")[2]
        if last.startswith(b'{"error"'):
            m.build_seconds.labels("error").observe(total)
            m.errors.labels(_error_type(last)).inc()
        elif last.startswith(b'{"image_id"'):
            m.build_seconds.labels("ok").observe(total)
        # else: the client left before the end (the build goes on without it)
    if error_body is not None:
        m.errors.labels(_error_type(error_body)).inc()
