"""Prometheus metrics on an injected registry.

Labels are bounded: model, protocol, verdict, status code, stage, action, error
kind. A client name, key or input never becomes a label (unbounded cardinality,
and a leak).

One process (``guard serve``, tests, ``guard demo``): the metrics count in memory on
the injected registry, and ``/metrics`` exposes that registry.

Several workers (``guard serve --workers N``): prometheus_client's multiprocess files.
The master makes a private directory (:func:`guard.workers.metrics_directory`); each
worker calls :func:`guard.workerfiles.use_worker_files` before building its
:class:`GuardMetrics`, so its values, still counted in memory, are written to the
worker's own files there (``counter_<pid>.db``...) every second, before a scrape and
when it stops. The worker that serves ``/metrics`` exposes
:meth:`GuardMetrics.aggregate`'s registry, which sums those files over every worker,
live or dead: a counter keeps what a worker that exited or was restarted had counted
(a worker killed by SIGKILL loses its last second). ``guard_requests_in_flight`` is
summed over live workers only (``livesum``; the master removes a dead worker's gauge
file). ``guard_build_info`` is served once, from the serving worker (the same build in
every worker; prometheus_client's Info has no multiprocess form), and so are the HELP
and TYPE lines of metrics whose labels no worker has used yet. The names, label sets
and values are those one process would show for the same traffic, less the
``*_created`` samples of counters and histograms (multiprocess mode keeps no creation
time).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client.metrics_core import Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from guard.pipeline import RequestContext

# Loopback proxy latencies sit well under a millisecond; upstream models can take seconds.
_LATENCY_BUCKETS = (
    0.0002,
    0.0005,
    0.001,
    0.002,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)


class GuardMetrics:
    """Every metric the guard exports, built once per application."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}
        self.info = Info("guard_build", "Guard version", registry=r)
        self.audit_dropped = Counter(
            "guard_audit_dropped_total",
            "Audit records dropped because the writer could not keep up",
            registry=r,
        )
        self.requests = Counter(
            "guard_requests_total",
            "Inference requests by model, protocol, verdict and HTTP status",
            ["model", "protocol", "verdict", "code"],
            registry=r,
        )
        self.request_seconds = Histogram(
            "guard_request_duration_seconds",
            "Time from request decoded to response encoded, upstream included",
            ["model"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.upstream_seconds = Histogram(
            "guard_upstream_duration_seconds",
            "Time spent in the backend (upstream or embedded model)",
            ["model"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.stage_seconds = Histogram(
            "guard_stage_duration_seconds",
            "Time spent in each stage",
            ["model", "stage"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.findings = Counter(
            "guard_findings_total",
            "Findings by stage and the action taken (shadow: would have acted)",
            ["model", "stage", "action"],
            registry=r,
        )
        self.errors = Counter(
            "guard_errors_total", "Errors answered, by kind", ["kind"], registry=r
        )
        self.reloads = Counter(
            "guard_policy_reloads_total", "Policy reloads by result", ["result"], registry=r
        )
        self.privacy_answers = Counter(
            "guard_privacy_answers_total",
            "Answer rows released by the privacy stage, by the mechanism applied",
            ["model", "mechanism"],
            registry=r,
        )
        self.privacy_spent = Counter(
            "guard_privacy_budget_spent_total",
            "Privacy loss charged to client budgets (epsilon for laplace, rho for gaussian)",
            ["model", "mechanism"],
            registry=r,
        )
        self.state_errors = Counter(
            "guard_state_errors_total",
            "State store operations that failed (the stage's on_error then applied)",
            ["backend", "op"],
            registry=r,
        )
        self.certifications = Counter(
            "guard_certifications_total",
            "Rows certified by the certify stage, by outcome (certified, abstained, overloaded)",
            ["model", "outcome"],
            registry=r,
        )
        self.certified_radius = Histogram(
            "guard_certified_radius",
            "Certified L2 radius of rows that were not abstained (input units)",
            ["model"],
            buckets=(0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0),
            registry=r,
        )
        self.certification_samples = Histogram(
            "guard_certification_samples",
            "Noisy samples one row's certification used (selection included)",
            ["model"],
            buckets=(100, 200, 500, 1e3, 2e3, 5e3, 1e4, 2e4, 5e4, 1e5, 2e5, 1e6),
            registry=r,
        )
        self.in_flight = Gauge(
            "guard_requests_in_flight",
            "Inference requests being served",
            registry=r,
            multiprocess_mode="livesum",  # workers: the sum over live ones
        )

    def aggregate(
        self, directory: str | Path, flush: Callable[[], None] | None = None
    ) -> CollectorRegistry:
        """A registry that exposes the sum over every worker writing to ``directory``
        (multiprocess files), with what only this process has (``guard_build_info``);
        ``flush`` writes this process's own values first."""
        registry = CollectorRegistry(auto_describe=False)
        registry.register(_Workers(directory, self.registry, flush))
        return registry

    def observe(self, ctx: RequestContext, *, protocol: str, code: int, seconds: float) -> None:
        model = ctx.model
        verdict = ctx.verdict
        if code != 200 and verdict != "deny":
            verdict = "rejected" if code < 500 else "error"
        self._child(self.requests, model, protocol, verdict, str(code)).inc()
        self._child(self.request_seconds, model).observe(seconds)
        if ctx.upstream_seconds is not None:
            self._child(self.upstream_seconds, model).observe(ctx.upstream_seconds)
        for stage, spent in ctx.stage_seconds.items():
            self._child(self.stage_seconds, model, stage).observe(spent)
        for finding in ctx.findings:
            self._child(self.findings, model, finding.stage, finding.action.value).inc()

    def count_certifications(self, model: str, outcome: str, rows: int) -> None:
        self._child(self.certifications, model, outcome).inc(rows)

    def record_certification_samples(self, model: str, samples: Sequence[int]) -> None:
        for count in samples:
            self._child(self.certification_samples, model).observe(count)

    def record_certificates(self, model: str, certificates: Sequence[Any]) -> None:
        for certificate in certificates:
            if certificate.abstained:
                self.count_certifications(model, "abstained", 1)
            else:
                self.count_certifications(model, "certified", 1)
                self._child(self.certified_radius, model).observe(certificate.radius)

    def _child(self, metric: Any, *labels: str) -> Any:
        """``metric.labels(*labels)``, remembered: ``labels()`` takes a lock per call,
        and the label sets are bounded, so the cache is too."""
        key = (id(metric), labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child


class _Workers(Collector):
    """Every worker's metrics, summed from their files, then the families of this
    worker's registry that no file holds: ``guard_build_info``, and metrics with labels
    that no worker has used yet (HELP and TYPE alone, as one process shows them)."""

    def __init__(
        self, directory: str | Path, own: CollectorRegistry, flush: Callable[[], None] | None
    ) -> None:
        self.files = MultiProcessCollector(None, path=str(directory))
        self.own = own
        self.flush = flush

    def collect(self) -> Iterable[Metric]:
        if self.flush is not None:
            self.flush()
        merged = list(self.files.collect())
        names = {family.name for family in merged}
        yield from merged
        for family in self.own.collect():
            if family.name not in names:
                yield family
