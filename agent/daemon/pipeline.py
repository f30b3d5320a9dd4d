"""The one violation pipeline: every source publishes here; the JSON-lines
log, Prometheus and `events` subscribers are fed from here.

Nothing is dropped silently. Every event that enters is counted
(skillguard_events_ingested_total and, by skill/layer/decision,
skillguard_violations_total); beyond `rate_limit` events per skill per
second it is counted as suppressed instead of being logged and streamed; a
subscriber whose bounded queue is full loses the event and the loss is
counted, for it (it sees a `lost` count in its next notification) and in
skillguard_events_lost_total{reason="subscriber_queue_full"}.
"""
from __future__ import annotations

import json
import os
import time
from collections import deque
from typing import Callable, Optional

from agent.events.violation import Violation

_ENCODE = json.JSONEncoder(separators=(",", ":")).encode


class _Clock:
    """ISO 8601 times as Violation.to_dict writes them, the date part cached per second."""

    def __init__(self):
        self._second = None
        self._prefix = ""

    def iso(self, seconds: float) -> str:
        whole = int(seconds)
        micros = int(round((seconds - whole) * 1_000_000))
        if micros == 1_000_000:
            whole, micros = whole + 1, 0
        if whole != self._second:
            self._second = whole
            self._prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole))
        return f"{self._prefix}.{micros:06d}Z"


def encode_line(violation: Violation, skill_id: Optional[str], clock: _Clock) -> bytes:
    """Violation.to_dict() plus skill_id as one JSON line, keys in sorted order
    (built in that order, so the encoder need not sort)."""
    record = {"decision": violation.decision}
    if violation.detail:
        record["detail"] = violation.detail
    record["layer"] = violation.layer
    record["operation"] = violation.operation
    record["pid"] = violation.pid
    record["rule"] = violation.rule
    record["skill"] = violation.skill
    if skill_id is not None:
        record["skill_id"] = skill_id
    record["time"] = clock.iso(violation.time)
    return (_ENCODE(record) + "\n").encode()


class Subscriber:
    """One `events` stream: a bounded queue of encoded lines and a wake-up."""

    def __init__(self, skill: Optional[str], limit: int, wake: Callable[[], None]):
        self.skill = skill  # a skill name or skill id; None: every skill
        self.limit = limit
        self.queue: deque[bytes] = deque()
        self.lost = 0  # lost since the last delivered event (reported in it)
        self.lost_total = 0
        self.wake = wake

    def wants(self, name: str, skill_id: Optional[str]) -> bool:
        return self.skill is None or self.skill == name or (skill_id is not None and self.skill == skill_id)

    def take(self) -> list[bytes]:
        items = list(self.queue)
        self.queue.clear()
        return items


class Pipeline:
    def __init__(self, metrics=None, *, log_fd: Optional[int] = 1, rate_limit: int = 1000,
                 clock: Callable[[], float] = time.monotonic,
                 schedule: Optional[Callable[[Callable[[], None]], None]] = None):
        self.metrics = metrics
        self.log_fd = log_fd
        self.rate_limit = rate_limit
        self.clock = clock
        self.schedule = schedule  # runs a callable soon (the event loop's call_soon); None: flush at once
        self.subscribers: list[Subscriber] = []
        self._log: list[bytes] = []
        self._log_size = 0
        self._flush_scheduled = False
        self._window = -1
        self._window_counts: dict[str, int] = {}
        self.ingested = 0
        self.suppressed = 0
        self.lost: dict[str, int] = {}
        self.log_errors = 0
        # (skill label, layer, decision) -> count; exported by the metrics collector at scrape time.
        self.violation_counts: dict[tuple[str, str, str], int] = {}
        self._clock = _Clock()
        if metrics is not None:
            metrics.attach_pipeline(self)

    # -- subscribers --

    def subscribe(self, skill: Optional[str], limit: int, wake: Callable[[], None]) -> Subscriber:
        subscriber = Subscriber(skill, limit, wake)
        self.subscribers.append(subscriber)
        return subscriber

    def unsubscribe(self, subscriber: Subscriber) -> None:
        try:
            self.subscribers.remove(subscriber)
        except ValueError:
            pass

    # -- losses reported by sources (supervisor buffers, kernel ring buffers) --

    def count_lost(self, reason: str, count: int) -> None:
        if count <= 0:
            return
        self.lost[reason] = self.lost.get(reason, 0) + count

    # -- publishing --

    def publish(self, violation: Violation, skill_id: Optional[str] = None) -> None:
        self.ingested += 1
        metrics = self.metrics
        label = metrics.skills.label(violation.skill) if metrics is not None else violation.skill
        key = (label, violation.layer, violation.decision)
        counts = self.violation_counts
        counts[key] = counts.get(key, 0) + 1
        window = int(self.clock())
        if window != self._window:
            self._window = window
            self._window_counts.clear()
        seen = self._window_counts.get(violation.skill, 0) + 1
        self._window_counts[violation.skill] = seen
        if seen > self.rate_limit:
            self.suppressed += 1
            return
        line = encode_line(violation, skill_id, self._clock)
        if self.log_fd is not None:
            self._log.append(line)
            self._log_size += len(line)
            if self._log_size >= 1 << 16:
                self.flush()
            elif not self._flush_scheduled:
                if self.schedule is None:
                    self.flush()
                else:
                    self._flush_scheduled = True
                    self.schedule(self.flush)
        for subscriber in self.subscribers:
            if not subscriber.wants(violation.skill, skill_id):
                continue
            if len(subscriber.queue) >= subscriber.limit:
                subscriber.lost += 1
                subscriber.lost_total += 1
                self.count_lost("subscriber_queue_full", 1)
                continue
            was_empty = not subscriber.queue
            subscriber.queue.append(line)
            if was_empty:
                subscriber.wake()

    def flush(self) -> None:
        """Write the buffered log lines: one write(2) per batch of whole lines."""
        self._flush_scheduled = False
        if not self._log:
            return
        data = b"".join(self._log)
        self._log.clear()
        self._log_size = 0
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(self.log_fd, view):]
        except OSError:
            lines = data.count(b"\n")
            self.log_errors += lines
            self.count_lost("log_write_failed", lines)
