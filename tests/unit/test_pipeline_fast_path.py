"""Pipeline.publish's fast path: the same bytes as the json encoder, the log
flush policy, exact loss accounting and the skill labels it reads directly."""
import fcntl
import json
import os

import pytest

from agent.daemon.metrics import OTHER, Metrics
from agent.daemon.pipeline import LOG_BUFFER_BYTES, Pipeline, _Clock, encode_line
from agent.events.violation import Violation

F_SETPIPE_SZ = 1031  # fcntl(2); Python 3.11's fcntl module does not name it


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


class MyInt(int):
    pass


def reference(violation, skill_id):
    record = violation.to_dict()
    if skill_id is not None:
        record["skill_id"] = skill_id
    return (json.dumps(record, sort_keys=True, separators=(",", ":")) + "\n").encode()


def published(violation, skill_id):
    pipe = Pipeline(None, log_fd=None)
    sub = pipe.subscribe(None, 10, lambda: None)
    pipe.publish(violation, skill_id)
    return sub.take()[0]


CASES = [
    dict(),
    dict(pid=None),
    dict(pid=0),
    dict(pid=-5),
    dict(pid=True),            # a bool is not an int to JSON: true
    dict(pid=MyInt(7)),
    dict(pid=3.5),
    dict(detail="more"),
    dict(detail='quote " back \\ tab \t nl \n'),
    dict(detail=5),            # not a str: the json encoder decides
    dict(operation="/tmp/caf\u00e9 \U0001F600 \x00\x1f"),
    dict(rule='no "grant"', skill="sk\u00efll"),
    dict(layer="landlock", decision="killed"),
    dict(layer="fs", decision="audited", detail="d"),
    dict(time=1795308666),                     # an int time
    dict(time=1795308666.999_9996),            # rounds up into the next second
    dict(time=1795308666.000_0004),
    dict(time=0.5e-6),                         # half a microsecond: round half to even
    dict(time=1.5e-6),
]


@pytest.mark.parametrize("fields", CASES)
@pytest.mark.parametrize("skill_id", [None, "l-1", 'l-"odd"\u00e9'])
def test_line_is_the_json_encoders(fields, skill_id):
    values = dict(skill="demo", pid=1234, layer="seccomp", operation="socket(AF_INET)",
                  decision="denied", rule="no grant", time=1795308666.123456)
    values.update(fields)
    violation = Violation(**values)
    line = published(violation, skill_id)
    assert line == reference(violation, skill_id)
    assert line == encode_line(violation, skill_id, _Clock())


def test_second_cache_follows_time_both_ways():
    pipe = Pipeline(None, log_fd=None)
    sub = pipe.subscribe(None, 10, lambda: None)
    times = [100.25, 100.75, 101.0, 99.5, 101.999_999_7, 3e9]
    events = [Violation("s", 1, "seccomp", "o", "denied", "r", time=t) for t in times]
    for event in events:
        pipe.publish(event)
    assert sub.take() == [reference(event, None) for event in events]


def test_scheduled_log_is_written_once_per_turn(tmp_path):
    path = tmp_path / "log"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    turn = []
    pipe = Pipeline(None, log_fd=fd, schedule=turn.append)
    try:
        for i in range(3):
            pipe.publish(Violation("s", i, "seccomp", "o", "denied", "r"))
        assert path.read_bytes() == b"" and len(turn) == 1  # one flush scheduled for the turn
        turn.pop()()
        assert [json.loads(line)["pid"] for line in path.read_text().splitlines()] == [0, 1, 2]
        # A turn that buffers 64 KiB writes at once, without waiting for its end.
        big = "x" * 1000
        count = LOG_BUFFER_BYTES // 1000 + 1
        for i in range(count):
            pipe.publish(Violation("s", i, "seccomp", big, "denied", "r"))
        written = path.read_bytes()
        assert written.endswith(b"\n") and len(written) >= LOG_BUFFER_BYTES
        while turn:  # the turn ends: the lines buffered since are written
            turn.pop()()
        assert len(path.read_text().splitlines()) == 3 + count
    finally:
        os.close(fd)


def test_short_write_counts_every_line_not_written_whole():
    r, w = os.pipe()
    try:
        fcntl.fcntl(w, F_SETPIPE_SZ, 4096)
        os.set_blocking(w, False)
        turn = []
        pipe = Pipeline(None, log_fd=w, schedule=turn.append)
        sent = 200  # ~100 bytes each: more than the pipe holds, so write(2) is short, then EAGAIN
        for i in range(sent):
            pipe.publish(Violation("s", i, "seccomp", "o" * 20, "denied", "r"))
        pipe.flush()
        # Written at once (no schedule) into the full pipe: the refused line is counted.
        at_once = Pipeline(None, log_fd=w)
        at_once.publish(Violation("s", 1, "seccomp", "o", "denied", "r"))
        assert at_once.lost == {"log_write_failed": 1}
        data = os.read(r, 1 << 20)
        whole_lines = data.count(b"\n")
        assert 0 < whole_lines < sent
        assert whole_lines + pipe.lost["log_write_failed"] == sent
        assert pipe.log_errors == pipe.lost["log_write_failed"]
    finally:
        os.close(r)
        os.close(w)


def test_label_follows_later_admission_without_moving_old_counts():
    metrics = Metrics(5)
    pipe = Pipeline(metrics, log_fd=None)
    pipe.publish(Violation("late", 1, "seccomp", "o", "denied", "r"))
    metrics.skills.admit("late")
    pipe.publish(Violation("late", 1, "seccomp", "o", "denied", "r"))
    assert pipe.violation_counts == {(OTHER, "seccomp", "denied"): 1, ("late", "seccomp", "denied"): 1}
    full = Metrics(1)
    full.skills.admit("a")
    pipe = Pipeline(full, log_fd=None)
    for name in ("a", "b", "c"):
        full.skills.admit(name)  # no room for b and c
        pipe.publish(Violation(name, 1, "env", "o", "denied", "r"))
    assert pipe.violation_counts == {("a", "env", "denied"): 1, (OTHER, "env", "denied"): 2}


def test_subscriber_filters_by_name_or_id():
    pipe = Pipeline(None, log_fd=None)
    by_name = pipe.subscribe("web", 10, lambda: None)
    by_id = pipe.subscribe("l-7", 10, lambda: None)
    pipe.publish(Violation("web", 1, "seccomp", "o", "denied", "r"), None)
    pipe.publish(Violation("db", 1, "seccomp", "o", "denied", "r"), "l-7")
    pipe.publish(Violation("db", 1, "seccomp", "o", "denied", "r"), None)
    assert [json.loads(x)["skill"] for x in by_name.take()] == ["web"]
    assert [json.loads(x)["skill"] for x in by_id.take()] == ["db"]


def test_every_event_is_logged_suppressed_streamed_or_counted_lost(tmp_path):
    path = tmp_path / "log"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    clock = Clock()
    turn = []
    metrics = Metrics(3)
    pipe = Pipeline(metrics, log_fd=fd, rate_limit=40, clock=clock, schedule=turn.append)
    small = pipe.subscribe(None, 5, lambda: None)
    streamed = 0
    one = pipe.subscribe("s1", 1000, lambda: None)
    try:
        for i in range(1000):
            if i % 300 == 299:
                clock.now += 1
            name = f"s{i % 4}"
            pipe.publish(Violation(name, i, "seccomp", "o", "denied", "r"), f"l-{i % 4}")
            if i % 10 == 9:
                while turn:
                    turn.pop()()
                streamed += len(small.take())
    finally:
        pipe.flush()
        os.close(fd)
    logged = len(path.read_bytes().splitlines())
    streamed += len(small.take())
    assert pipe.ingested == 1000 and pipe.suppressed > 0 and small.lost_total > 0
    assert logged + pipe.suppressed == pipe.ingested
    assert streamed + small.lost_total + pipe.suppressed == pipe.ingested
    assert pipe.lost == {"subscriber_queue_full": small.lost_total}
    assert sum(pipe.violation_counts.values()) == pipe.ingested
    assert len(one.queue) == sum(1 for line in path.read_text().splitlines() if json.loads(line)["skill"] == "s1")
