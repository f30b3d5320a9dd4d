"""Prometheus metrics of the daemon, in a private CollectorRegistry.

Names follow the Prometheus conventions (base units, `_total` for counters,
`skillguard_` prefix). Label values come from closed sets (layer, decision,
method, reason) except `skill`, which is bounded by `SkillLabels`: names the
daemon knows (policy directory, registered and launched skills) up to a
limit, everything else "_other", so a caller cannot grow the series count
by inventing names.
"""
from __future__ import annotations

from typing import Callable, Iterable, Optional

OTHER = "_other"

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class SkillLabels:
    """Maps skill names to label values: known names up to `limit`, then "_other"."""

    def __init__(self, limit: int):
        self.limit = limit
        # The names with a label of their own; only ever added to, never
        # rebound, so the pipeline keeps a reference to it (one set lookup per event).
        self.names: set[str] = set()

    def admit(self, name: str) -> str:
        """Make `name` a label value if there is room; return its label."""
        if name in self.names:
            return name
        if len(self.names) < self.limit:
            self.names.add(name)
            return name
        return OTHER

    def label(self, name: str) -> str:
        return name if name in self.names else OTHER

    def __len__(self) -> int:
        return len(self.names)


class Metrics:
    def __init__(self, skill_label_limit: int = 200, version: str = "0"):
        import platform

        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

        self.registry = CollectorRegistry(auto_describe=True)
        self.skills = SkillLabels(skill_label_limit)
        r = self.registry
        self.skills_registered = Gauge("skillguard_skills_registered",
                                       "Skills registered through the API (running processes attached).",
                                       registry=r)
        self.skills_running = Gauge("skillguard_skills_running",
                                    "Skills with live processes, by how they were confined.",
                                    ["kind"], registry=r)
        self.attach_seconds = Histogram("skillguard_attach_duration_seconds",
                                        "Time from a register request to the skill being enforced.",
                                        buckets=LATENCY_BUCKETS, registry=r)
        self.launch_seconds = Histogram("skillguard_launch_duration_seconds",
                                        "Time from a launch request to the skill's process existing.",
                                        buckets=LATENCY_BUCKETS, registry=r)
        self.policy_errors = Counter("skillguard_policy_compile_errors",
                                     "Policies in the policy directory rejected at load or reload.",
                                     registry=r)
        self.policies_loaded = Gauge("skillguard_policies_loaded",
                                     "Valid policies currently loaded from the policy directory.", registry=r)
        self.api_requests = Counter("skillguard_api_requests", "API requests by method and outcome.",
                                    ["method", "outcome"], registry=r)
        self.api_refused = Counter("skillguard_api_unauthorized_requests",
                                   "API requests refused because of who the caller is.",
                                   ["method", "reason"], registry=r)
        self.api_clients = Gauge("skillguard_api_clients", "Open API connections.", registry=r)
        self.readoptions = Counter("skillguard_readoptions",
                                   "Skills found in the registry at start, by outcome.",
                                   ["outcome"], registry=r)
        self.registry_corrupt = Counter("skillguard_registry_corrupt_records",
                                        "Registry files that failed their checksum or did not parse.",
                                        registry=r)
        self.build = Info("skillguard_build", "Version of the running daemon.", registry=r)
        self.build.info({"version": version, "python": platform.python_version()})
        self._network: Optional[Callable[[], Iterable[tuple[str, str, float]]]] = None
        self._pipeline = None
        r.register(_PipelineCollector(self))
        r.register(_NetworkCollector(self))

    def attach_pipeline(self, pipeline) -> None:
        """The pipeline keeps plain counters (cheap per event); they are exported at scrape time."""
        self._pipeline = pipeline

    METHODS = ("register", "unregister", "list", "inspect", "launch", "events", "reload",
               "status", "wait", "signal", "invoke")

    def method_label(self, method: str) -> str:
        return method if method in self.METHODS else "_unknown"

    def set_network_source(self, source: Callable[[], Iterable[tuple[str, str, float]]]) -> None:
        """`source()` yields (skill name, "accepted"|"dropped", count) read at scrape time."""
        self._network = source

    def render(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class _PipelineCollector:
    """skillguard_violations_total and the skillguard_events_* counters, read
    from the pipeline's own counts (a prometheus_client Counter per event
    costs a lock and a label lookup; the pipeline must take 100,000/s)."""

    def __init__(self, metrics: Metrics):
        self.metrics = metrics

    def _families(self):
        from prometheus_client.core import CounterMetricFamily

        return (CounterMetricFamily("skillguard_violations", "Violations by skill, layer and decision.",
                                    labels=["skill", "layer", "decision"]),
                CounterMetricFamily("skillguard_events_ingested",
                                    "Violation events that entered the pipeline."),
                CounterMetricFamily("skillguard_events_suppressed",
                                    "Violation events counted but not logged or streamed "
                                    "(per-skill rate limit)."),
                CounterMetricFamily("skillguard_events_lost",
                                    "Violation events that were not delivered, by where they were lost.",
                                    labels=["reason"]))

    def describe(self):
        return self._families()

    def collect(self):
        violations, ingested, suppressed, lost = self._families()
        pipeline = self.metrics._pipeline
        if pipeline is not None:
            for (skill, layer, decision), count in sorted(pipeline.violation_counts.items()):
                violations.add_metric([skill, layer, decision], count)
            ingested.add_metric([], pipeline.ingested)
            suppressed.add_metric([], pipeline.suppressed)
            for reason, count in sorted(pipeline.lost.items()):
                lost.add_metric([reason], count)
        else:
            ingested.add_metric([], 0)
            suppressed.add_metric([], 0)
        return iter((violations, ingested, suppressed, lost))


class _NetworkCollector:
    """Per-skill network verdict counters read from the kernel at scrape time."""

    def __init__(self, metrics: Metrics):
        self.metrics = metrics

    def describe(self):
        from prometheus_client.core import CounterMetricFamily

        yield CounterMetricFamily("skillguard_network_connections",
                                  "Network connection attempts of confined skills, by verdict.",
                                  labels=["skill", "verdict"])

    def collect(self):
        from prometheus_client.core import CounterMetricFamily

        family = CounterMetricFamily("skillguard_network_connections",
                                     "Network connection attempts of confined skills, by verdict.",
                                     labels=["skill", "verdict"])
        totals: dict[tuple[str, str], float] = {}
        if self.metrics._network is not None:
            try:
                rows = list(self.metrics._network())
            except Exception:  # noqa: BLE001 - a scrape must not fail because one reader did
                rows = []
            for skill, verdict, count in rows:
                key = (self.metrics.skills.label(skill), verdict)
                totals[key] = totals.get(key, 0.0) + float(count)
        for (skill, verdict), count in sorted(totals.items()):
            family.add_metric([skill, verdict], count)
        yield family
