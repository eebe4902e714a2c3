"""Prometheus metrics of the HAProxy sink.

The default collectors are module-level (prometheus_client refuses to register
a name twice in one registry, and the agent builds one sink per process);
tests pass their own registry through :func:`new_metrics` to count exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import REGISTRY, CollectorRegistry, Counter


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


_default: SinkMetrics | None = None


def default_metrics() -> SinkMetrics:
    """The process-wide metrics in prometheus_client's default registry (created once)."""
    global _default
    if _default is None:
        _default = new_metrics(REGISTRY)
    return _default
