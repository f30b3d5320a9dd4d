"""The socket API's wire format and parameter checks (agent/daemon/protocol.py)."""
import json

import pytest

from agent.daemon import protocol
from agent.daemon.protocol import LineBuffer, RpcError, parse_request


def test_valid_request():
    r = parse_request(b'{"jsonrpc":"2.0","id":7,"method":"status"}')
    assert (r.method, r.params, r.id, r.is_notification) == ("status", {}, 7, False)


def test_notification_has_no_id():
    assert parse_request(b'{"jsonrpc":"2.0","method":"status"}').is_notification


@pytest.mark.parametrize("line,code", [
    (b"not json", protocol.PARSE_ERROR),
    (b"\xff\xfe", protocol.PARSE_ERROR),
    (b"[1,2]", protocol.INVALID_REQUEST),
    (b'{"id":1,"method":"x"}', protocol.INVALID_REQUEST),
    (b'{"jsonrpc":"1.0","id":1,"method":"x"}', protocol.INVALID_REQUEST),
    (b'{"jsonrpc":"2.0","id":1,"method":5}', protocol.INVALID_REQUEST),
    (b'{"jsonrpc":"2.0","id":{},"method":"x"}', protocol.INVALID_REQUEST),
    (b'{"jsonrpc":"2.0","id":1,"method":"x","params":[1]}', protocol.INVALID_PARAMS),
    (b'{"jsonrpc":"2.0","id":1,"method":"x","extra":1}', protocol.INVALID_REQUEST),
])
def test_malformed_requests(line, code):
    with pytest.raises(RpcError) as info:
        parse_request(line)
    assert info.value.code == code


def test_error_keeps_the_request_id():
    with pytest.raises(RpcError) as info:
        parse_request(b'{"jsonrpc":"2.0","id":"abc","method":"x","params":3}')
    assert protocol.request_id_of(info.value) == "abc"
    line = json.loads(protocol.error_line("abc", info.value))
    assert line["id"] == "abc" and line["error"]["code"] == protocol.INVALID_PARAMS


def test_param_checks_name_the_parameter():
    assert protocol.param({"a": 1}, "a", int) == 1
    assert protocol.param({}, "a", int, default=5) == 5
    with pytest.raises(RpcError, match=r"params.a: required"):
        protocol.param({}, "a", int)
    with pytest.raises(RpcError, match=r"params.a: must be an integer"):
        protocol.param({"a": "1"}, "a", int)
    with pytest.raises(RpcError, match=r"params.a: must be an integer"):
        protocol.param({"a": True}, "a", int)  # bool is not an int here
    with pytest.raises(RpcError, match="unknown parameter"):
        protocol.check_known({"a": 1, "zz": 2}, {"a"})
    assert protocol.pid_list([1, 2]) and not protocol.pid_list([]) and not protocol.pid_list([0])
    assert not protocol.pid_list([True]) and not protocol.pid_list(["1"])


def test_line_buffer_splits_and_joins():
    buf = LineBuffer(100)
    assert buf.feed(b'{"a":') == ([], None)
    assert buf.pending == 5
    assert buf.feed(b'1}\n{"b":2}\n{"c"') == ([b'{"a":1}', b'{"b":2}'], None)
    assert buf.feed(b":3}\n") == ([b'{"c":3}'], None)
    assert buf.pending == 0


def test_line_buffer_limit():
    buf = LineBuffer(10)
    lines, error = buf.feed(b"short\n" + b"x" * 20)
    assert lines == [b"short"] and error.code == protocol.REQUEST_TOO_LARGE
    buf = LineBuffer(10)
    assert buf.feed(b"123456789") == ([], None)  # 9 bytes + newline still fit
    assert buf.feed(b"0")[1].code == protocol.REQUEST_TOO_LARGE  # a 10th byte cannot end in time
    lines, error = LineBuffer(10).feed(b"1234567890\n")
    assert error is not None and lines == []
    lines, error = LineBuffer(10).feed(b"123456789\n")
    assert error is None and lines == [b"123456789"]
