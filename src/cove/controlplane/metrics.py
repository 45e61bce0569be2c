"""Prometheus metrics: sandboxes by state (read from the store at scrape time) and create latency."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from cove.store.base import Store

STATES = ("starting", "running", "paused", "hibernated", "killed", "error", "lost")


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.sandboxes = Gauge("cove_sandboxes", "Sandboxes by state", ["state"], registry=self.registry)
        self.create_seconds = Histogram(
            "cove_sandbox_create_seconds",
            "Time from create request to a running sandbox",
            buckets=(0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=self.registry,
        )
        self.exec_seconds = Histogram(
            "cove_exec_seconds",
            "Duration of commands run through the API",
            buckets=(0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1, 3, 10, 30, 100),
            registry=self.registry,
        )

        self.egress = Counter(
            "cove_egress_connections",
            "Connections through the sandboxes' egress proxies, by result (allowed, denied, failed)",
            ["result"],
            registry=self.registry,
        )

    async def render(self, store: Store) -> bytes:
        counts = await store.count_by_state()
        for state in STATES:
            self.sandboxes.labels(state).set(counts.get(state, 0))
        return generate_latest(self.registry)
