"""The operations artefacts: alert rules pass `promtool check rules`; alert
rules and the Grafana dashboard reference only metrics the daemon exports;
docs/operations.md lists every metric."""
import json
import re
import shutil
import subprocess

from conftest import REPO_ROOT, require

from agent.daemon.metrics import Metrics

DOCS = REPO_ROOT / "docs"


def exported_series() -> set[str]:
    """Every series name /metrics can carry (families plus their suffixes)."""
    from agent.daemon.pipeline import Pipeline
    from agent.events.violation import Violation

    metrics = Metrics(5)
    metrics.skills.admit("x")
    Pipeline(metrics, log_fd=None).publish(Violation("x", 1, "seccomp", "ptrace", "denied", "r"))
    names = set()
    for family in metrics.registry.collect():
        names.add(family.name)
        suffixes = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_sum", "_count", "_created"),
                    "info": ("_info",), "gauge": ("",)}.get(family.type, ("",))
        names.update(family.name + s for s in suffixes)
    return names


def referenced(text: str) -> set[str]:
    return set(re.findall(r"\bskillguard_[a-z0-9_]+", text))


def test_alert_rules_pass_promtool():
    require(shutil.which("promtool") is not None, "promtool (Debian prometheus) not installed")
    proc = subprocess.run(["promtool", "check", "rules", str(DOCS / "alerts.yml")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS" in proc.stdout


def test_alerts_and_dashboard_use_only_exported_metrics():
    series = exported_series()
    alerts = referenced((DOCS / "alerts.yml").read_text())
    assert alerts and alerts <= series, alerts - series
    dashboard = json.loads((DOCS / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    exprs += [v.get("query", "") for v in dashboard["templating"]["list"] if isinstance(v.get("query"), str)]
    used = set().union(*(referenced(e) for e in exprs))
    assert used and used <= series, used - series
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))


def test_operations_doc_lists_every_metric():
    text = (DOCS / "operations.md").read_text()
    families = {f.name for f in Metrics(1).registry.collect()}
    missing = [f for f in families if f not in text]
    assert not missing, missing
