"""The wire format of the socket API: newline-delimited JSON-RPC 2.0 (pure).

One request per line, one response per line; `events` notifications are
lines too. Nothing here touches a socket, so every malformed input can be
unit-tested: each becomes a `RpcError` with a JSON-RPC code.
"""
from __future__ import annotations

import json
from typing import Any, NamedTuple, Optional

API_VERSION = 1

# JSON-RPC 2.0 section 5.1.
PARSE_ERROR = -32700
INVALID_REQUEST = -32600
METHOD_NOT_FOUND = -32601
INVALID_PARAMS = -32602
INTERNAL_ERROR = -32603
# Application errors (-32000 .. -32099 are "server errors" in the spec).
UNAUTHORIZED = -32001
NOT_FOUND = -32002
LAYER_UNAVAILABLE = -32003  # fail closed: a layer the manifest or caller needs cannot be applied
POLICY_INVALID = -32004
LAUNCH_FAILED = -32005
REQUEST_TOO_LARGE = -32006
REQUEST_TIMEOUT = -32007
BUSY = -32008
PACKAGE_REFUSED = -32009
CONFLICT = -32010


class RpcError(Exception):
    def __init__(self, code: int, message: str, data: Any = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.data = data

    def to_dict(self) -> dict:
        error = {"code": self.code, "message": self.message}
        if self.data is not None:
            error["data"] = self.data
        return error


class Request(NamedTuple):  # immutable; a tuple is cheaper to make than a frozen dataclass
    method: str
    params: dict
    id: Any  # None for a notification (no "id" member): no response is sent
    is_notification: bool


def parse_request(line: bytes) -> Request:
    """One line (without its newline) -> Request, or RpcError.

    The error carries the request id when one could be read, so the caller can
    answer it (JSON-RPC 2.0 section 5: id null when it could not be read).
    """
    try:
        message = json.loads(line)
    except (ValueError, UnicodeDecodeError) as exc:
        raise RpcError(PARSE_ERROR, f"parse error: {exc}") from None
    if not isinstance(message, dict):
        raise RpcError(INVALID_REQUEST, "a request must be a JSON object (batches are not supported)")
    request_id = message.get("id")
    if request_id is not None and (isinstance(request_id, bool)
                                   or not isinstance(request_id, (str, int, float))):
        raise _with_id(RpcError(INVALID_REQUEST, "id must be a string, a number or null"), None)
    if message.get("jsonrpc") != "2.0":
        raise _with_id(RpcError(INVALID_REQUEST, 'jsonrpc must be "2.0"'), request_id)
    method = message.get("method")
    if not isinstance(method, str) or not method:
        raise _with_id(RpcError(INVALID_REQUEST, "method must be a non-empty string"), request_id)
    params = message.get("params", {})
    if params is None:
        params = {}
    if not isinstance(params, dict):
        raise _with_id(RpcError(INVALID_PARAMS, "params must be an object (by-name parameters)"),
                       request_id)
    unknown = set(message) - {"jsonrpc", "method", "params", "id"}
    if unknown:
        raise _with_id(RpcError(INVALID_REQUEST, f"unknown member(s): {', '.join(sorted(unknown))}"),
                       request_id)
    return Request(method, params, request_id, "id" not in message)


def _with_id(error: RpcError, request_id) -> RpcError:
    error.request_id = request_id
    return error


def request_id_of(error: RpcError):
    return getattr(error, "request_id", None)


# Built once (json.dumps would build one per call). Members in the order
# given: JSON objects are unordered (RFC 8259 section 4), and sorting costs.
# Messages are trees of dicts and lists with no cycles, so no cycle check.
_ENCODER = json.JSONEncoder(separators=(",", ":"), check_circular=False)


def encode(message: dict) -> bytes:
    return _ENCODER.encode(message).encode() + b"\n"


def result_line(request_id, result) -> bytes:
    return encode({"jsonrpc": "2.0", "id": request_id, "result": result})


def error_line(request_id, error: RpcError) -> bytes:
    return encode({"jsonrpc": "2.0", "id": request_id, "error": error.to_dict()})


def notification_line(method: str, params: dict) -> bytes:
    return encode({"jsonrpc": "2.0", "method": method, "params": params})


# ---- parameter checks: each names the parameter and what it must be -----------

_MISSING = object()


def param(params: dict, name: str, kind, *, default=_MISSING, check=None, what: str = ""):
    """params[name] if it has type `kind` (and passes `check`), else INVALID_PARAMS."""
    value = params.get(name, _MISSING)
    if value is _MISSING or value is None:
        if default is _MISSING:
            raise RpcError(INVALID_PARAMS, f"params.{name}: required")
        return default
    if isinstance(value, bool) and kind is not bool:
        ok = False
    else:
        ok = isinstance(value, kind)
    if ok and check is not None:
        ok = check(value)
    if not ok:
        raise RpcError(INVALID_PARAMS, f"params.{name}: must be {what or _kind_name(kind)}")
    return value


def _kind_name(kind) -> str:
    names = {str: "a string", int: "an integer", bool: "true or false", list: "a list",
             dict: "an object", float: "a number"}
    if isinstance(kind, tuple):
        return " or ".join(names.get(k, k.__name__) for k in kind)
    return names.get(kind, kind.__name__)


def check_known(params: dict, allowed: set[str]) -> None:
    unknown = set(params) - allowed
    if unknown:
        raise RpcError(INVALID_PARAMS, f"unknown parameter(s): {', '.join(sorted(unknown))} "
                                       f"(known: {', '.join(sorted(allowed)) or 'none'})")


def string_list(value) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) and v for v in value)


def pid_list(value) -> bool:
    return (isinstance(value, list) and 0 < len(value) <= 4096
            and all(isinstance(v, int) and not isinstance(v, bool) and 0 < v < 1 << 22 for v in value))


class LineBuffer:
    """Splits a byte stream into lines no longer than `limit` bytes (newline included).

    feed() returns (complete lines, error): error is an RpcError
    (REQUEST_TOO_LARGE) when a line grew past the limit; the lines before it
    are still returned and the buffer is emptied (the server then closes).
    """

    def __init__(self, limit: int):
        self.limit = limit
        self._parts: list[bytes] = []
        self._size = 0

    @property
    def pending(self) -> int:
        """Bytes of a line that has begun but not ended."""
        return self._size

    def feed(self, data: bytes) -> tuple[list[bytes], Optional[RpcError]]:
        lines: list[bytes] = []
        start = 0
        while True:
            end = data.find(b"\n", start)
            piece = data[start:] if end < 0 else data[start:end]
            if self._size + len(piece) + (end >= 0) > self.limit or \
                    (end < 0 and self._size + len(piece) >= self.limit):
                self._parts, self._size = [], 0
                return lines, RpcError(REQUEST_TOO_LARGE,
                                       f"request line longer than {self.limit} bytes")
            if end < 0:
                if piece:
                    self._parts.append(piece)
                    self._size += len(piece)
                return lines, None
            if self._parts:
                self._parts.append(piece)
                piece = b"".join(self._parts)
                self._parts, self._size = [], 0
            lines.append(piece)
            start = end + 1
