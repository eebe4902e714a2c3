"""Prometheus metrics of the discoverer: its loop's and its HAProxy sink's.

Each is built in the registry it is given: the agent's own (serve() makes
one per agent, with the process metrics), or a private one in tests.
"""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


@dataclass(frozen=True, slots=True)
class SinkMetrics:
    runtime_commands: Counter  # label: verb ("add server", "show stat", ...)
    reloads: Counter
    changes_applied: Counter
    restarts: Counter


def new_metrics(registry: CollectorRegistry) -> SinkMetrics:
    return SinkMetrics(
        runtime_commands=Counter(
            "pilotfish_discoverer_runtime_commands",
            "HAProxy runtime API commands sent, by verb",
            ["verb"],
            registry=registry,
        ),
        reloads=Counter(
            "pilotfish_discoverer_reloads", "HAProxy reloads (listeners changed)", registry=registry
        ),
        changes_applied=Counter(
            "pilotfish_discoverer_changes_applied",
            "server changes applied through the runtime API",
            registry=registry,
        ),
        restarts=Counter(
            "pilotfish_discoverer_haproxy_restarts",
            "HAProxy master (re)started because it was not running",
            registry=registry,
        ),
    )


_LATENCY_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


@dataclass(frozen=True, slots=True)
class AgentMetrics:
    apply_latency: Histogram
    registration_latency: Histogram
    batches: Counter
    apply_errors: Counter
    empty_prefix_alarm: Gauge
    instances: Gauge
    services: Gauge
    conflicts: Gauge
    quarantined: Gauge


def agent_metrics(registry: CollectorRegistry) -> AgentMetrics:
    ns = "pilotfish_discoverer"
    return AgentMetrics(
        apply_latency=Histogram(
            f"{ns}_apply_latency_seconds",
            "etcd event arrival → HAProxy updated (sink.apply done)",
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        ),
        registration_latency=Histogram(
            f"{ns}_registration_latency_seconds",
            "instance registered_at (registrar clock) → HAProxy updated, for new puts",
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        ),
        batches=Counter(f"{ns}_batches", "snapshots applied to HAProxy", registry=registry),
        apply_errors=Counter(f"{ns}_apply_errors", "failed applies (retried)", registry=registry),
        empty_prefix_alarm=Gauge(
            f"{ns}_empty_prefix_alarm",
            "1 while most instances vanished at once and the last known servers are held",
            registry=registry,
        ),
        instances=Gauge(f"{ns}_instances", "instances served (after the guard)", registry=registry),
        services=Gauge(f"{ns}_services", "services (frontends) in the catalog", registry=registry),
        conflicts=Gauge(
            f"{ns}_conflicts",
            "instances that do not fit the catalog (routed or not)",
            registry=registry,
        ),
        quarantined=Gauge(
            f"{ns}_quarantined",
            "etcd keys left out of routing, each with a reason (listed in /healthz)",
            registry=registry,
        ),
    )
