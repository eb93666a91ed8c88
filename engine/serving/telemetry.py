"""What the service tells its operators: structured logs (JSON lines, each record with the id of the request
it belongs to) and Prometheus metrics (the scheduler's state, read at each scrape, and the HTTP answers)."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable
from contextvars import ContextVar
from datetime import datetime, timezone

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

log = logging.getLogger("wuerstchen.server")
REQUEST_ID: ContextVar[str | None] = ContextVar("wuerstchen_request_id", default=None)
LATENCY_BUCKETS = (0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128, 256)


def log_event(event: str, level: int = logging.INFO, exc_info: bool = False, **fields) -> None:
    """One structured record, with the id of the request it belongs to (when it belongs to one)."""
    request_id = REQUEST_ID.get()
    log.log(level, event, exc_info=exc_info,
            extra={"fields": ({"request_id": request_id} if request_id else {}) | fields})


class JsonLines(logging.Formatter):
    """A record as one JSON object: time, level, event, request id, and the record's fields."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {"time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
                 "level": record.levelname.lower(), "event": record.getMessage(), **getattr(record, "fields", {})}
        if record.exc_info:
            entry["traceback"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str, ensure_ascii=False)


def log_json_lines(stream=None) -> None:
    """Write the server's records as JSON lines to `stream` (stderr), once per process."""
    if not any(isinstance(handler.formatter, JsonLines) for handler in log.handlers):
        handler = logging.StreamHandler(stream or sys.stderr)
        handler.setFormatter(JsonLines())
        log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False


class _SchedulerCollector:
    """The scheduler's state as Prometheus metrics, read from its `stats()` at each scrape."""

    def __init__(self, stats: Callable[[], dict], ready: Callable[[], bool]):
        self.stats, self.ready = stats, ready

    def collect(self):
        stats = self.stats()
        gauges = {
            "queued_requests": ("requests waiting for a slot", stats["queued"]),
            "in_flight_requests": ("requests on the device", stats["in_flight"]),
            "queued_bytes": ("bytes of request state (noise, images) waiting in the queue", stats["queued_bytes"]),
            "in_flight_bytes": ("bytes of request state on the device", stats["in_flight_bytes"]),
            "oldest_wait_ticks": ("ticks the longest-waiting request in flight has waited", stats["oldest_wait_ticks"]),
            "batch_occupancy": ("mean rows per batched denoising step", stats["batch_occupancy"]),
            "padding_waste_ratio": ("share of batched rows that were padding", stats["padding_waste"]),
            "healthy": ("1 until a sticky device error stops the scheduler", float(stats["healthy"])),
            "ready": ("1 once the warm-up requests have run", float(self.ready())),
        }
        for name, (help_text, value) in gauges.items():
            yield GaugeMetricFamily(f"wuerstchen_{name}", help_text, value=value)
        steps = GaugeMetricFamily("wuerstchen_step_seconds", "measured seconds of one tick, by group and batch size",
                                  labels=["group", "batch"])
        for group, by_batch in stats["tick_ms"].items():
            for batch, milliseconds in by_batch.items():
                steps.add_metric([group, str(batch)], milliseconds / 1e3)
        yield steps
        for name, help_text in (("ticks", "ticks run"), ("batched_ticks", "batched denoising steps run"),
                                ("rows", "rows of batched steps that were requests"),
                                ("padding", "rows of batched steps that were padding")):
            yield CounterMetricFamily(f"wuerstchen_scheduler_{name}", help_text, value=stats[name])
        outcomes = CounterMetricFamily("wuerstchen_scheduler_requests", "requests the scheduler finished, by outcome",
                                       labels=["outcome"])
        for outcome in ("completed", "failed", "cancelled"):
            outcomes.add_metric([outcome], stats[outcome])
        yield outcomes
        refused = CounterMetricFamily("wuerstchen_refused_requests", "requests refused at submit, by reason",
                                      labels=["reason"])
        for reason in sorted({"queue_full", "deadline", "unhealthy", *stats["refused"]}):
            refused.add_metric([reason], stats["refused"].get(reason, 0))
        yield refused


class Metrics:
    """An app's Prometheus metrics, in a registry of its own (so that a process may hold several apps): the
    scheduler's state from `stats` (`WuerstchenPipeline.stats`) and `ready`, and what the app records."""

    def __init__(self, stats: Callable[[], dict], ready: Callable[[], bool]):
        self.registry = CollectorRegistry(auto_describe=False)
        self.responses = Counter("wuerstchen_http_responses", "HTTP responses by endpoint and status code (499: the "
                                 "client left first)", ["endpoint", "code"], registry=self.registry)
        self.latency = Histogram("wuerstchen_request_latency_seconds", "seconds from arrival to answer of the "
                                 "generation requests served", ["endpoint"], buckets=LATENCY_BUCKETS,
                                 registry=self.registry)
        self.queueing = Histogram("wuerstchen_request_queueing_seconds", "latency less the request's share of the "
                                  "device's time", ["endpoint"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.images = Counter("wuerstchen_images", "images served", registry=self.registry)
        self.registry.register(_SchedulerCollector(stats, ready))

    def served(self, endpoint: str, seconds: float, output, images: int) -> None:
        self.latency.labels(endpoint).observe(seconds)
        self.queueing.labels(endpoint).observe(max(0.0, seconds - output.compute_s))
        self.images.inc(images)

    def text(self) -> bytes:
        """The metrics in Prometheus' text format."""
        return generate_latest(self.registry)
