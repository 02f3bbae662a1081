"""Prometheus metrics for workers and relays, served on ``--metrics-port``."""

from __future__ import annotations

import logging
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

log = logging.getLogger("pgqueue.metrics")

DURATION_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)


class Metrics:
    """One registry per process; series names start with ``pgqueue_``.

    Jobs: ``pgqueue_jobs_started_total``, ``pgqueue_jobs_succeeded_total``,
    ``pgqueue_jobs_retried_total``, ``pgqueue_jobs_dead_lettered_total`` (labels queue,
    task), ``pgqueue_job_duration_seconds`` (histogram; queue, task),
    ``pgqueue_lease_lost_total``. Queues (sampled by the heartbeat thread):
    ``pgqueue_queue_ready_jobs``, ``pgqueue_queue_lag_seconds``, ``pgqueue_queue_dead_jobs``.
    Outbox: ``pgqueue_outbox_delivered_total``, ``pgqueue_outbox_failed_total`` (label
    sink), ``pgqueue_outbox_lag_seconds``.
    """

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        job = ("queue", "task")
        self.started = Counter("pgqueue_jobs_started", "Jobs started", job, registry=self.registry)
        self.succeeded = Counter(
            "pgqueue_jobs_succeeded", "Jobs completed", job, registry=self.registry
        )
        self.retried = Counter(
            "pgqueue_jobs_retried",
            "Jobs scheduled for another attempt",
            job,
            registry=self.registry,
        )
        self.dead = Counter(
            "pgqueue_jobs_dead_lettered",
            "Jobs moved to the dead letters",
            job,
            registry=self.registry,
        )
        self.duration = Histogram(
            "pgqueue_job_duration_seconds",
            "Handler run time",
            job,
            buckets=DURATION_BUCKETS,
            registry=self.registry,
        )
        self.lease_lost = Counter(
            "pgqueue_lease_lost",
            "Results discarded because the lease was lost",
            registry=self.registry,
        )
        self.queue_ready = Gauge(
            "pgqueue_queue_ready_jobs", "Jobs ready to run", ("queue",), registry=self.registry
        )
        self.queue_lag = Gauge(
            "pgqueue_queue_lag_seconds",
            "Age of the oldest ready job",
            ("queue",),
            registry=self.registry,
        )
        self.queue_dead = Gauge(
            "pgqueue_queue_dead_jobs", "Dead letters", ("queue",), registry=self.registry
        )
        self.delivered = Counter(
            "pgqueue_outbox_delivered", "Messages delivered", ("sink",), registry=self.registry
        )
        self.delivery_failed = Counter(
            "pgqueue_outbox_failed", "Failed delivery attempts", ("sink",), registry=self.registry
        )
        self.outbox_lag = Gauge(
            "pgqueue_outbox_lag_seconds",
            "Age of the oldest undelivered message",
            registry=self.registry,
        )

    def serve(self, port: int, address: str = "0.0.0.0") -> None:
        """Serve ``/metrics`` on a background thread."""
        start_http_server(port, addr=address, registry=self.registry)
        log.info("metrics on http://%s:%d/metrics", address, port)

    def sample_queues(self, rows: list[dict[str, Any]]) -> None:
        for row in rows:
            queue = row["queue"]
            lag = row.get("lag")
            self.queue_ready.labels(queue).set(row["ready"])
            self.queue_lag.labels(queue).set(lag.total_seconds() if lag is not None else 0.0)
            self.queue_dead.labels(queue).set(row["dead"])
