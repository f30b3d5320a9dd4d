"""The one violation pipeline: every source publishes here; the JSON-lines
log, Prometheus and `events` subscribers are fed from here.

Nothing is dropped silently. Every event that enters is counted
(skillguard_events_ingested_total and, by skill/layer/decision,
skillguard_violations_total); beyond `rate_limit` events per skill per
second it is counted as suppressed instead of being logged and streamed; a
subscriber whose bounded queue is full loses the event and the loss is
counted, for it (it sees a `lost` count in its next notification) and in
skillguard_events_lost_total{reason="subscriber_queue_full"}.

Log flush policy: with a `schedule` (the daemon passes its event loop's
call_soon) the lines published in one turn of the loop are written together
by one write(2) when the turn ends, or as soon as 64 KiB are buffered;
without one, each line is written at once. A line that a write(2) error
keeps out of the log is counted in skillguard_events_lost_total
{reason="log_write_failed"}. A crash of the daemon loses at most the lines
of the turn in which it crashed (the pipeline's counters go with it).

Per event this is the daemon's hottest path (bench/daemon: >= 100,000
events/s): the JSON line is built once with one %-format from pre-escaped
pieces (same bytes as the json encoder, keys sorted) and shared by the log
and every subscriber; the skill label is one set lookup.
"""
from __future__ import annotations

import json
import os
import time
from collections import deque
from json.encoder import encode_basestring_ascii as _escape
from typing import Callable, Optional

from agent.daemon.metrics import OTHER
from agent.events.violation import DECISIONS, LAYERS, Violation

_ENCODE = json.JSONEncoder(separators=(",", ":")).encode

LOG_BUFFER_BYTES = 1 << 16

# '{"decision":...,"layer":...,"operation":' for every closed-set pair (no detail).
_HEADS = {(decision, layer): f'{{"decision":{_escape(decision)},"layer":{_escape(layer)},"operation":'
          for decision in DECISIONS for layer in LAYERS}
_LINE = '%s%s,"pid":%s,"rule":%s,"skill":%s,"time":"%s.%06dZ"}\n'
_LINE_WITH_ID = '%s%s,"pid":%s,"rule":%s,"skill":%s,"skill_id":%s,"time":"%s.%06dZ"}\n'


class _Clock:
    """ISO 8601 times as Violation.to_dict writes them, the date part cached per second."""

    def __init__(self):
        self._second = None
        self._prefix = ""

    def split(self, seconds: float) -> tuple[str, int]:
        """("YYYY-MM-DDTHH:MM:SS", microseconds) of `seconds`."""
        whole = int(seconds)
        micros = round((seconds - whole) * 1_000_000)
        if micros == 1_000_000:
            whole, micros = whole + 1, 0
        if whole != self._second:
            self._second = whole
            self._prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole))
        return self._prefix, micros

    def iso(self, seconds: float) -> str:
        prefix, micros = self.split(seconds)
        return f"{prefix}.{micros:06d}Z"


def encode_line(violation: Violation, skill_id: Optional[str], clock: _Clock) -> bytes:
    """Violation.to_dict() plus skill_id as one JSON line, keys in sorted order,
    through the json encoder (any field type it takes). Pipeline.publish
    builds the same bytes faster when the fields are str and the pid an int or None."""
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
        self.schedule = schedule  # runs a callable soon (the event loop's call_soon); None: write at once
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
        # Names with a label of their own (SkillLabels.names, the same set); None: every name is its label.
        self._labelled: Optional[set[str]] = metrics.skills.names if metrics is not None else None
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
        name = violation.skill
        labelled = self._labelled
        key = (name if labelled is None or name in labelled else OTHER, violation.layer, violation.decision)
        counts = self.violation_counts
        try:
            counts[key] += 1
        except KeyError:
            counts[key] = 1
        window = int(self.clock())
        window_counts = self._window_counts
        if window != self._window:
            self._window = window
            window_counts.clear()
        try:
            seen = window_counts[name] + 1
        except KeyError:
            seen = 1
        window_counts[name] = seen
        if seen > self.rate_limit:
            self.suppressed += 1
            return
        # The line, built once for the log and every subscriber: encode_line's
        # bytes from pre-escaped pieces when the fields have their usual types.
        seconds = violation.time
        whole = int(seconds)
        micros = round((seconds - whole) * 1_000_000)
        clock = self._clock
        if whole == clock._second and micros != 1_000_000:
            prefix = clock._prefix
        else:
            prefix, micros = clock.split(seconds)
        pid = violation.pid
        detail = violation.detail
        try:
            if detail:
                head = (f'{{"decision":{_escape(violation.decision)},"detail":{_escape(detail)},'
                        f'"layer":{_escape(violation.layer)},"operation":')
            else:
                head = _HEADS[violation.decision, violation.layer]
            if pid is not None and pid.__class__ is not int:
                raise TypeError
            if skill_id is None:
                line = (_LINE % (head, _escape(violation.operation), "null" if pid is None else pid,
                                 _escape(violation.rule), _escape(name), prefix, micros)).encode()
            else:
                line = (_LINE_WITH_ID % (head, _escape(violation.operation), "null" if pid is None else pid,
                                         _escape(violation.rule), _escape(name), _escape(skill_id),
                                         prefix, micros)).encode()
        except (TypeError, KeyError):  # a field of another type: the json encoder decides
            line = encode_line(violation, skill_id, clock)
        fd = self.log_fd
        if fd is not None:
            if self.schedule is None:
                try:
                    written = os.write(fd, line)
                except OSError:
                    written = -1
                if written != len(line):
                    self._write_remainder(line, written)
            else:
                self._log.append(line)
                self._log_size += len(line)
                if self._log_size >= LOG_BUFFER_BYTES:
                    self.flush()
                elif not self._flush_scheduled:
                    self._flush_scheduled = True
                    self.schedule(self.flush)
        for subscriber in self.subscribers:
            wanted = subscriber.skill
            if wanted is not None and wanted != name and (skill_id is None or wanted != skill_id):
                continue
            queue = subscriber.queue
            if len(queue) >= subscriber.limit:
                subscriber.lost += 1
                subscriber.lost_total += 1
                self.count_lost("subscriber_queue_full", 1)
                continue
            queue.append(line)
            if len(queue) == 1:
                subscriber.wake()

    def flush(self) -> None:
        """Write the buffered log lines: one write(2) per batch of whole lines."""
        self._flush_scheduled = False
        if not self._log:
            return
        data = b"".join(self._log)
        self._log.clear()
        self._log_size = 0
        self._write(data)

    def _write(self, data: bytes) -> None:
        try:
            written = os.write(self.log_fd, data)
        except OSError:
            written = -1
        if written != len(data):
            self._write_remainder(data, written)

    def _write_remainder(self, data: bytes, written: int) -> None:
        """After a short write(2) of `written` bytes (-1: it failed), write the
        rest; the lines an error keeps out of the log (a line written in part
        included) are counted lost."""
        view = memoryview(data)[max(written, 0):]
        try:
            if written < 0:
                raise OSError
            while view:
                view = view[os.write(self.log_fd, view):]
        except OSError:
            lines = view.tobytes().count(b"\n")
            self.log_errors += lines
            self.count_lost("log_write_failed", lines)
