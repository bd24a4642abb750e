"""etcd's v3 HTTP/JSON gateway on the wire: request bodies out, checked values in. Pure: no I/O.

The gateway speaks protobuf's JSON mapping: keys and values are base64, int64 fields are JSON
strings, and fields at their default value are left out (a PUT event has no ``type``, a failed
transaction no ``succeeded``, a keepalive of a lease that is gone no ``TTL``). Every response is
untrusted: one that is not the shape expected raises :class:`EtcdError` naming the field.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import orjson

from .types import (
    Compare,
    EtcdError,
    Event,
    KeyValue,
    Lease,
    LeaseNotFound,
    MemberStatus,
    Op,
    OpResponse,
    TxnResult,
)

Json = dict[str, Any]

_INTEGER = re.compile(r"-?[0-9]{1,20}")  # int64 and uint64 (member ids) as the gateway writes them


def prefix_end(prefix: bytes) -> bytes:
    """The range end that covers every key starting with ``prefix``: its last byte + 1, after
    dropping trailing 0xff bytes; ``b"\\0"`` (every key) for an empty or all-0xff prefix."""
    stripped = prefix.rstrip(b"\xff")
    if not stripped:
        return b"\0"
    return stripped[:-1] + bytes([stripped[-1] + 1])


def b64encode(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def b64decode(text: object, field: str) -> bytes:
    if not isinstance(text, str):
        raise _bad(field, f"a {type(text).__name__}, not a base64 string")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise _bad(field, f"{_short(text)} is not base64") from None


def loads(data: bytes, what: str) -> Json:
    """A JSON object, or EtcdError."""
    try:
        value = orjson.loads(data)
    except orjson.JSONDecodeError as e:
        raise EtcdError(f"etcd's answer to {what} is not JSON ({e}): {_short(data)}") from None
    return _object(value, what)


# requests -------------------------------------------------------------------------------------


def range_request(
    key: bytes,
    range_end: bytes | None = None,
    *,
    revision: int = 0,
    serializable: bool = False,
    keys_only: bool = False,
    limit: int = 0,
) -> Json:
    body: Json = {"key": b64encode(key)}
    if range_end is not None:
        body["range_end"] = b64encode(range_end)
    if revision:
        body["revision"] = str(revision)
    if serializable:
        body["serializable"] = True
    if keys_only:
        body["keys_only"] = True
    if limit:
        body["limit"] = str(limit)
    return body


def put_request(key: bytes, value: bytes, lease: int = 0) -> Json:
    body: Json = {"key": b64encode(key), "value": b64encode(value)}
    if lease:
        body["lease"] = str(lease)
    return body


def delete_request(key: bytes, range_end: bytes | None = None) -> Json:
    body: Json = {"key": b64encode(key)}
    if range_end is not None:
        body["range_end"] = b64encode(range_end)
    return body


_COMPARE_FIELD = {
    "VALUE": "value",
    "VERSION": "version",
    "CREATE": "create_revision",
    "MOD": "mod_revision",
    "LEASE": "lease",
}


def compare_json(compare: Compare) -> Json:
    operand = compare.operand
    encoded = b64encode(operand) if isinstance(operand, bytes) else str(operand)
    return {
        "key": b64encode(compare.key),
        "target": compare.target,
        "result": "EQUAL",
        _COMPARE_FIELD[compare.target]: encoded,
    }


def op_json(op: Op) -> Json:
    if op.kind == "put":
        return {"request_put": put_request(op.key, op.value, op.lease)}
    if op.kind == "delete":
        return {"request_delete_range": delete_request(op.key, op.range_end)}
    return {"request_range": range_request(op.key, op.range_end)}


def txn_request(compare: Sequence[Compare], success: Sequence[Op], failure: Sequence[Op] = ()) -> Json:
    return {
        "compare": [compare_json(c) for c in compare],
        "success": [op_json(op) for op in success],
        "failure": [op_json(op) for op in failure],
    }


def grant_request(ttl: int) -> Json:
    return {"TTL": str(ttl)}  # "TTL", not "ttl": a misspelt field is ignored (a minimum-TTL lease)


def lease_request(lease_id: int) -> Json:
    return {"ID": str(lease_id)}


def compact_request(revision: int) -> Json:
    return {"revision": str(revision), "physical": True}  # physical: done when it returns


def watch_request(key: bytes, range_end: bytes, start_revision: int, *, prev_kv: bool = True) -> Json:
    create: Json = {
        "key": b64encode(key),
        "range_end": b64encode(range_end),
        "start_revision": str(start_revision),
        "progress_notify": True,
    }
    if prev_kv:
        create["prev_kv"] = True
    return {"create_request": create}


# responses ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class GatewayError:
    """An error the gateway answered with instead of a result."""

    code: int | None  # gRPC code (14: unavailable, 11: out of range, 5: not found)
    message: str


def gateway_error(body: Json) -> GatewayError | None:
    """The error in a response, if it is one: ``{"error": "...", "message": "...", "code": N}``
    from a unary call, ``{"error": {"grpc_code": N, "message": "..."}}`` on a stream."""
    error = body.get("error")
    if error is None or error == "":
        return None
    if isinstance(error, dict):
        code, message = error.get("grpc_code"), error.get("message") or error.get("http_status")
    else:
        code, message = body.get("code"), body.get("message") or error
    if isinstance(code, bool) or not isinstance(code, int):
        code = None
    return GatewayError(code, message if isinstance(message, str) else _short(repr(message)))


def header_revision(body: Json, field: str = "header") -> int:
    header = _object(body.get("header"), field)
    revision = _int(header, "revision", field)
    if revision <= 0:
        raise _bad(f"{field}.revision", "missing")
    return revision


def parse_range(body: Json) -> tuple[int, list[KeyValue]]:
    kvs = [parse_kv(kv, f"kvs[{i}]") for i, kv in enumerate(_list(body, "kvs", ""))]
    return header_revision(body), kvs


def parse_put(body: Json) -> int:
    return header_revision(body)


def parse_delete(body: Json) -> tuple[int, int]:
    return header_revision(body), _int(body, "deleted", "")


def parse_txn(body: Json) -> TxnResult:
    succeeded = body.get("succeeded", False)
    if not isinstance(succeeded, bool):
        raise _bad("succeeded", f"{succeeded!r} is not a boolean")
    responses = tuple(_op_response(r, f"responses[{i}]") for i, r in enumerate(_list(body, "responses", "")))
    return TxnResult(succeeded, header_revision(body), responses)


def parse_grant(body: Json) -> Lease:
    error = body.get("error")
    if error:  # LeaseGrantResponse's own error field
        raise EtcdError(f"etcd refused the lease: {_short(str(error))}")
    lease = Lease(_int(body, "ID", ""), _int(body, "TTL", ""))
    if lease.id <= 0:
        raise _bad("ID", "missing")
    return lease


def parse_keepalive(body: Json, lease_id: int) -> int:
    """The lease's remaining TTL; LeaseNotFound when the answer has none (the lease is gone)."""
    result = _object(body.get("result"), "result")
    ttl = _int(result, "TTL", "result")
    if ttl <= 0:
        raise LeaseNotFound(f"lease {lease_id:x} not found (expired or revoked)", code=5)
    return ttl


def parse_status(body: Json, endpoint: str) -> MemberStatus:
    header = _object(body.get("header"), "header")
    version = body.get("version", "")
    if not isinstance(version, str):
        raise _bad("version", f"{_short(repr(version))} is not a string")
    return MemberStatus(
        endpoint=endpoint,
        member_id=f"{_int(header, 'member_id', 'header'):x}",
        leader=f"{_int(body, 'leader', ''):x}",
        raft_term=_int(header, "raft_term", "header"),
        revision=_int(header, "revision", "header"),
        db_size=_int(body, "dbSize", ""),
        version=_short(version),
    )


def parse_kv(value: object, field: str) -> KeyValue:
    kv = _object(value, field)
    return KeyValue(
        key=b64decode(kv.get("key"), f"{field}.key"),
        value=b64decode(kv.get("value", ""), f"{field}.value"),
        create_revision=_int(kv, "create_revision", field),
        mod_revision=_int(kv, "mod_revision", field),
        version=_int(kv, "version", field),
        lease=_int(kv, "lease", field),
    )


def parse_event(value: object, field: str) -> Event:
    event = _object(value, field)
    kind = event.get("type", "PUT")
    if kind not in ("PUT", "DELETE"):
        raise _bad(f"{field}.type", f"{_short(repr(kind))} is not PUT or DELETE")
    kv = parse_kv(event.get("kv"), f"{field}.kv")
    if kv.mod_revision <= 0:
        raise _bad(f"{field}.kv.mod_revision", "missing")
    prev = event.get("prev_kv")
    return Event("put" if kind == "PUT" else "delete", kv, None if prev is None else parse_kv(prev, f"{field}.prev_kv"))


# watch ----------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class WatchMessage:
    """One line of a watch stream, classified.

    - ``created``: the watch is open (``revision``: the store's then).
    - ``events``: ``events`` in revision order.
    - ``progress``: no events; everything up to ``revision`` was sent.
    - ``canceled``: etcd ended the watch; ``compact_revision`` > 0 when the start was compacted.
    - ``error``: the stream failed (``reason``, ``code``), e.g. the member has no leader.
    """

    kind: Literal["created", "events", "progress", "canceled", "error"]
    revision: int = 0
    events: tuple[Event, ...] = ()
    compact_revision: int = 0
    reason: str = ""
    code: int | None = None


def parse_watch_message(line: bytes) -> WatchMessage:
    body = loads(line, "a watch")
    error = gateway_error(body)
    if error is not None:
        return WatchMessage("error", reason=error.message, code=error.code)
    result = _object(body.get("result"), "result")
    if result.get("canceled"):
        reason = result.get("cancel_reason", "")
        return WatchMessage(
            "canceled",
            compact_revision=_int(result, "compact_revision", "result"),
            reason=_short(reason) if isinstance(reason, str) else "",
        )
    revision = header_revision(result, "result.header")
    if result.get("created"):
        return WatchMessage("created", revision)
    events = tuple(parse_event(e, f"result.events[{i}]") for i, e in enumerate(_list(result, "events", "result")))
    if not events:
        return WatchMessage("progress", revision)
    for before, after in zip(events, events[1:], strict=False):
        if after.kv.mod_revision < before.kv.mod_revision:
            raise EtcdError(
                f"etcd sent watch events out of order: revision {after.kv.mod_revision} after {before.kv.mod_revision}"
            )
    return WatchMessage("events", events[-1].kv.mod_revision, events)


# field checks ---------------------------------------------------------------------------------


def _op_response(value: object, field: str) -> OpResponse:
    response = _object(value, field)
    if "response_range" in response:
        body = _object(response["response_range"], f"{field}.response_range")
        kvs = tuple(parse_kv(kv, f"{field}.kvs[{i}]") for i, kv in enumerate(_list(body, "kvs", field)))
        return OpResponse("range", kvs, count=_int(body, "count", field))
    if "response_put" in response:
        _object(response["response_put"], f"{field}.response_put")
        return OpResponse("put")
    if "response_delete_range" in response:
        body = _object(response["response_delete_range"], f"{field}.response_delete_range")
        return OpResponse("delete", deleted=_int(body, "deleted", field))
    raise _bad(field, f"none of response_range, response_put, response_delete_range in {sorted(response)[:5]}")


def _object(value: object, field: str) -> Json:
    if not isinstance(value, dict):
        raise _bad(field, "missing" if value is None else f"a {type(value).__name__}, not an object")
    return value


def _list(body: Json, name: str, parent: str) -> list[Any]:
    value = body.get(name, [])
    if not isinstance(value, list):
        raise _bad(_join(parent, name), f"a {type(value).__name__}, not a list")
    return value


def _int(body: Json, name: str, parent: str) -> int:
    """An int64 field: a string of digits (as the gateway writes them) or a JSON integer; 0 when
    left out (its default)."""
    value = body.get(name, 0)
    if isinstance(value, str) and _INTEGER.fullmatch(value):
        return int(value)
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    raise _bad(_join(parent, name), f"{_short(repr(value))} is not an integer")


def _join(parent: str, name: str) -> str:
    return f"{parent}.{name}" if parent else name


def _bad(field: str, what: str) -> EtcdError:
    return EtcdError(f"unexpected answer from etcd: {field}: {what}")


def _short(text: str | bytes, limit: int = 200) -> str:
    """Untrusted text for a message: bounded, and bytes shown as they are."""
    shown = text if isinstance(text, str) else repr(text)
    return shown if len(shown) <= limit else shown[:limit] + "…"
