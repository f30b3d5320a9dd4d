"""The violation pipeline: log, metrics, subscribers; nothing lost silently."""
import json
import os

from agent.daemon.metrics import OTHER, Metrics, SkillLabels
from agent.daemon.pipeline import Pipeline
from agent.events.violation import Violation


def violation(skill="demo", layer="seccomp", decision="denied", op="ptrace"):
    return Violation(skill=skill, pid=1, layer=layer, operation=op, decision=decision, rule="r")


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def sample(metrics, name, **labels):
    value = metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


def test_log_metrics_and_subscribers(tmp_path):
    log = os.open(tmp_path / "log", os.O_WRONLY | os.O_CREAT)
    metrics = Metrics(10)
    metrics.skills.admit("demo")
    pipe = Pipeline(metrics, log_fd=log)
    woken = []
    everyone = pipe.subscribe(None, 10, lambda: woken.append("all"))
    only_other = pipe.subscribe("other", 10, lambda: woken.append("other"))
    by_id = pipe.subscribe("l-1", 10, lambda: woken.append("id"))
    pipe.publish(violation(), "l-1")
    pipe.publish(violation(layer="landlock", op="/etc/shadow"), "l-1")
    pipe.flush()
    lines = [json.loads(line) for line in open(tmp_path / "log")]
    assert [line["layer"] for line in lines] == ["seccomp", "landlock"]
    assert lines[0]["skill_id"] == "l-1" and lines[0]["skill"] == "demo"
    assert len(everyone.queue) == 2 and len(by_id.queue) == 2 and not only_other.queue
    assert woken == ["all", "id"]  # woken when the queue becomes non-empty, not per event
    assert sample(metrics, "skillguard_violations_total", skill="demo", layer="seccomp", decision="denied") == 1
    assert sample(metrics, "skillguard_events_ingested_total") == 2


def test_full_subscriber_loses_and_it_is_counted():
    metrics = Metrics(10)
    pipe = Pipeline(metrics, log_fd=None)
    slow = pipe.subscribe(None, 3, lambda: None)
    for _ in range(10):
        pipe.publish(violation())
    assert len(slow.queue) == 3 and slow.lost == 7
    assert pipe.lost == {"subscriber_queue_full": 7}
    assert sample(metrics, "skillguard_events_lost_total", reason="subscriber_queue_full") == 7
    assert pipe.ingested == 10


def test_rate_limit_suppresses_but_counts():
    clock = Clock()
    metrics = Metrics(10)
    metrics.skills.admit("noisy")
    pipe = Pipeline(metrics, log_fd=None, rate_limit=5, clock=clock)
    sub = pipe.subscribe(None, 100, lambda: None)
    for _ in range(8):
        pipe.publish(violation("noisy"))
    pipe.publish(violation("quiet"))  # another skill has its own budget
    assert len(sub.queue) == 6 and pipe.suppressed == 3
    clock.now += 1.0
    pipe.publish(violation("noisy"))
    assert len(sub.queue) == 7
    assert sample(metrics, "skillguard_events_suppressed_total") == 3
    # Suppressed events still count as violations.
    assert sample(metrics, "skillguard_violations_total", skill="noisy", layer="seccomp", decision="denied") == 9
    assert pipe.ingested == len(sub.queue) + pipe.suppressed


def test_failed_log_write_is_counted():
    r, w = os.pipe()
    os.close(r)
    import signal
    old = signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    try:
        pipe = Pipeline(Metrics(1), log_fd=w)
        pipe.publish(violation())
        pipe.publish(violation())
        pipe.flush()
    finally:
        signal.signal(signal.SIGPIPE, old)
        os.close(w)
    assert pipe.lost.get("log_write_failed", 0) >= 1


def test_skill_label_cardinality_is_bounded():
    labels = SkillLabels(2)
    assert labels.admit("a") == "a" and labels.admit("b") == "b" and labels.admit("c") == OTHER
    assert labels.label("c") == OTHER and labels.label("a") == "a"
    metrics = Metrics(1)
    metrics.skills.admit("known")
    pipe = Pipeline(metrics, log_fd=None)
    for name in ("known", "x1", "x2", "x3"):
        pipe.publish(violation(name))
    assert sample(metrics, "skillguard_violations_total", skill=OTHER, layer="seccomp", decision="denied") == 3
    text = metrics.render()[0].decode()
    assert 'skill="x1"' not in text and 'skill="_other"' in text


def test_network_counts_are_read_at_scrape_time():
    metrics = Metrics(5)
    metrics.skills.admit("web")
    calls = []

    def source():
        calls.append(1)
        yield ("web", "accepted", 3)
        yield ("web", "dropped", 2)
        yield ("unknown-skill", "dropped", 4)

    metrics.set_network_source(source)
    text = metrics.render()[0].decode()
    assert 'skillguard_network_connections_total{skill="web",verdict="accepted"} 3.0' in text
    assert 'skillguard_network_connections_total{skill="_other",verdict="dropped"} 4.0' in text
    assert calls
    assert 'skillguard_build_info{' in text


def test_log_line_is_the_violation_record_plus_skill_id(tmp_path):
    log = os.open(tmp_path / "log", os.O_WRONLY | os.O_CREAT)
    pipe = Pipeline(None, log_fd=log)
    plain = Violation(skill="s", pid=None, layer="env", operation="env X", decision="denied", rule="r",
                      time=1795308666.999_9996)
    detailed = Violation(skill="s", pid=3, layer="seccomp", operation="o", decision="audited", rule="r",
                         detail="more")
    pipe.publish(plain, "l-1")
    pipe.publish(detailed, None)
    pipe.flush()
    lines = open(tmp_path / "log").read().splitlines()
    assert json.loads(lines[0]) == dict(plain.to_dict(), skill_id="l-1")
    assert lines[1] == detailed.to_json()  # same bytes as the record's own JSON
