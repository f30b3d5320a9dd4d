"""The Violation record and its JSON-lines sink (pure, no root)."""
import io
import json

import pytest

from agent.events.violation import JsonLinesSink, Violation, read_json_lines


def make(**overrides):
    fields = dict(skill="s", pid=42, layer="seccomp", operation="socket(AF_INET)",
                  decision="denied", rule="no tcp/http grant", time=1_700_000_000.25)
    fields.update(overrides)
    return Violation(**fields)


def test_json_has_every_field_and_a_utc_timestamp():
    record = json.loads(make().to_json())
    assert record == {"skill": "s", "pid": 42, "layer": "seccomp",
                      "operation": "socket(AF_INET)", "decision": "denied",
                      "rule": "no tcp/http grant", "time": "2023-11-14T22:13:20.250000Z"}


def test_detail_appears_only_when_set():
    assert "detail" not in make().to_dict()
    assert make(detail="x").to_dict()["detail"] == "x"


@pytest.mark.parametrize("field,value", [("layer", "selinux"), ("decision", "maybe")])
def test_unknown_layer_or_decision_is_rejected(field, value):
    with pytest.raises(ValueError, match=field):
        make(**{field: value})


def test_stream_sink_writes_one_line_per_event():
    stream = io.StringIO()
    sink = JsonLinesSink(stream)
    sink.emit(make())
    sink.emit(make(layer="timeout", decision="killed", pid=None))
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2 and sink.count == 2
    assert [r["layer"] for r in read_json_lines(stream.getvalue())] == ["seccomp", "timeout"]


def test_file_sink_appends(tmp_path):
    path = tmp_path / "events.jsonl"
    path.write_text('{"old": 1}\n')
    sink = JsonLinesSink(path=str(path))
    sink.emit(make())
    sink.close()
    records = read_json_lines(path.read_text())
    assert records[0] == {"old": 1} and records[1]["operation"] == "socket(AF_INET)"


def test_sink_needs_exactly_one_target():
    with pytest.raises(ValueError):
        JsonLinesSink()
    with pytest.raises(ValueError):
        JsonLinesSink(io.StringIO(), path="/x")


def test_reader_skips_noise():
    assert read_json_lines('skillguard: note: x\n{"a": 1}\n{broken\n') == [{"a": 1}]


@pytest.mark.parametrize("operation", ["plain", 'quo"te \\ back', "tab\there\nnew", "ünïcödé ☃", "\x00\x1f"])
def test_json_is_what_json_dumps_writes(operation):
    violation = make(operation=operation, pid=None, detail="d")
    assert violation.to_json() == json.dumps(violation.to_dict(), sort_keys=True, separators=(",", ":"))


def test_violation_is_immutable_and_round_trips_its_fields():
    violation = make()
    with pytest.raises(AttributeError):
        violation.layer = "env"
    assert Violation(**violation.fields()) == violation and hash(Violation(**violation.fields())) == hash(violation)
