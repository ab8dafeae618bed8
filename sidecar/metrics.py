"""Prometheus metrics. Labels never carry tokens, cookies, users or raw paths.

With several workers, prometheus-client's multi-process mode is switched on by
``__main__`` (``PROMETHEUS_MULTIPROC_DIR``) before this module is imported.
"""

from __future__ import annotations

import os
from bisect import bisect_left
from importlib import metadata
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, multiprocess

_LATENCY = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)

REQUESTS = Counter("sidecar_requests_total", "Requests by route and status", ["route", "status"])
AUTH_DECISIONS = Counter("sidecar_auth_decisions_total", "Auth decisions (202/401/403)", ["decision"])
SESSIONS_CREATED = Counter("sidecar_sessions_created_total", "Sessions created at sign-in")
SESSIONS_DELETED = Counter("sidecar_sessions_deleted_total", "Sessions deleted", ["reason"])
DECISION_CACHE_LOOKUPS = Counter(
    "sidecar_auth_decision_cache_total", "decision cache lookups (hit, miss), /oauth2/auth and proxy", ["result"]
)
REFRESHES = Counter("sidecar_refreshes_total", "Token refreshes by outcome", ["outcome"])
REFRESH_JOINED = Counter("sidecar_refresh_joined_total", "Requests that joined an in-flight refresh")
LOCK_WAITS = Counter("sidecar_refresh_lock_waits_total", "Waits for another replica's refresh lock")
LOCK_WAIT_SECONDS = Histogram(
    "sidecar_refresh_lock_wait_seconds", "Time spent waiting for another replica's refresh", buckets=_LATENCY
)
REFRESH_SECONDS = Histogram("sidecar_refresh_seconds", "Latency of a token refresh at the provider", buckets=_LATENCY)
PROVIDER_SECONDS = Histogram("sidecar_provider_call_seconds", "Provider call latency", ["call"], buckets=_LATENCY)
REDIS_SECONDS = Histogram("sidecar_store_call_seconds", "Session store call latency", ["call"], buckets=_LATENCY)
UPSTREAM_SECONDS = Histogram("sidecar_upstream_seconds", "Upstream response latency (to headers)", buckets=_LATENCY)
REQUEST_SECONDS = Histogram(
    "sidecar_request_seconds",
    "The sidecar's own time per request, to the response headers (route fixed per endpoint, never from the client)",
    ["route"],
    buckets=_LATENCY,
)
# In multi-process mode every worker writes 1; "max" shows it once instead of summing the workers.
BUILD_INFO = Gauge(
    "sidecar_build_info", "Always 1; the version label says which sidecar runs", ["version"], multiprocess_mode="max"
)


def version() -> str:
    """The installed package's version; a source checkout that was never installed says so."""
    try:
        return metadata.version("sidecar")
    except metadata.PackageNotFoundError:
        return "unknown"


BUILD_INFO.labels(version=version()).set(1)


class LocalHistogram:
    """Per-process tallies for a hot histogram (one label set), pushed into Prometheus at most a second late.

    ``Histogram.observe`` takes a lock and, in multi-process mode, writes two mapped-file values per call
    (about 2 us, twice on a proxied request); here an observation is a bisect and two additions, and
    ``flush`` adds the bucket counts and the sum to the histogram's own values: the exposition is the same
    as if every value had been observed there."""

    def __init__(self, child: Histogram) -> None:
        self._child = child
        self._bounds = tuple(child._upper_bounds)  # ends with +Inf: every value has a bucket
        self._counts = [0] * len(self._bounds)
        self._sum = 0.0
        _local_histograms.append(self)

    def observe(self, seconds: float) -> None:
        self._counts[bisect_left(self._bounds, seconds)] += 1  # the first bucket with value <= bound
        self._sum += seconds

    def flush(self) -> None:
        counts, total = self._counts, self._sum
        if not any(counts):
            return
        self._counts, self._sum = [0] * len(self._bounds), 0.0
        self._child._sum.inc(total)
        for bucket, count in zip(self._child._buckets, counts, strict=True):
            if count:
                bucket.inc(count)


_local_histograms: list[LocalHistogram] = []
_store_children: dict[str, Any] = {}
_request_children: dict[str, LocalHistogram] = {}
UPSTREAM = LocalHistogram(UPSTREAM_SECONDS)


def request_seconds(route: str, seconds: float) -> None:
    """``route`` is one of the app's fixed route names, so the label set stays small."""
    child = _request_children.get(route)
    if child is None:
        child = _request_children[route] = LocalHistogram(REQUEST_SECONDS.labels(route=route))
    child.observe(seconds)


def store_call(name: str, seconds: float) -> None:
    child = _store_children.get(name)
    if child is None:
        child = _store_children[name] = REDIS_SECONDS.labels(call=name)
    child.observe(seconds)


class LocalCounts:
    """Per-process tallies for the hottest counters, pushed into Prometheus at most a second late.

    A prometheus-client ``inc`` takes a lock (and in multi-process mode writes a mapped file);
    on the hot path a dict increment is enough, and ``flush`` moves the totals over."""

    def __init__(self, counter: Counter) -> None:
        self._counter = counter
        self._pending: dict[Any, int] = {}

    def add(self, labels: Any) -> None:
        self._pending[labels] = self._pending.get(labels, 0) + 1

    def flush(self) -> None:
        pending, self._pending = self._pending, {}
        for labels, count in pending.items():
            values = labels if isinstance(labels, tuple) else (labels,)
            self._counter.labels(*(str(v) for v in values)).inc(count)


REQUEST_COUNTS = LocalCounts(REQUESTS)
DECISIONS = LocalCounts(AUTH_DECISIONS)
DECISION_CACHE = LocalCounts(DECISION_CACHE_LOOKUPS)


def flush() -> None:
    REQUEST_COUNTS.flush()
    DECISIONS.flush()
    DECISION_CACHE.flush()
    for histogram in _local_histograms:
        histogram.flush()


def render() -> bytes:
    """The exposition text; merges every worker's file in multi-process mode."""
    flush()
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return generate_latest(registry)
    return generate_latest()
