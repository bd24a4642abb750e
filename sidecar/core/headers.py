"""Header rules for a forwarding proxy (RFC 9110 §7.6): hop-by-hop removal and the
forwarding fields (Via, X-Forwarded-For, X-Forwarded-Proto)."""

from __future__ import annotations

# Fields that describe one connection, never the message (RFC 9110 §7.6.1), plus the
# framing fields we always recompute (Content-Length, Transfer-Encoding) and Expect,
# which we answer ourselves (we send the 100 Continue, never forward a second one).
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"content-length",
        b"expect",
    }
)

VIA_VALUE = b"1.1 meshlet"


# Drop sets by Connection options: most messages carry one of a handful of option
# sets ("keep-alive", "close"), so the union is computed once. Bounded, because the
# options are chosen by peers.
_DROP_SETS: dict[frozenset[bytes], frozenset[bytes]] = {frozenset(): HOP_BY_HOP}
_DROP_SETS_MAX = 64


def connection_named(headers: list[tuple[bytes, bytes]]) -> frozenset[bytes]:
    """Every option listed in Connection headers (lower-cased)."""
    named: set[bytes] = set()
    for name, value in headers:
        if name.lower() == b"connection":
            named.update(t.strip().lower() for t in value.split(b",") if t.strip())
    return frozenset(named)


def _drop_set(connection: frozenset[bytes]) -> frozenset[bytes]:
    drop = _DROP_SETS.get(connection)
    if drop is None:
        drop = HOP_BY_HOP | connection
        if len(_DROP_SETS) < _DROP_SETS_MAX:
            _DROP_SETS[connection] = drop
    return drop


def end_to_end(
    headers: list[tuple[bytes, bytes]], connection: frozenset[bytes] | None = None
) -> list[tuple[bytes, bytes]]:
    """The headers without hop-by-hop fields and without those named in Connection.
    ``connection``: the Connection options, when the reader already collected them."""
    drop = _drop_set(connection_named(headers) if connection is None else connection)
    return [(n, v) for n, v in headers if n.lower() not in drop]


def forward_request_headers(
    headers: list[tuple[bytes, bytes]],
    peer_ip: bytes,
    proto: bytes = b"http",
    connection: frozenset[bytes] | None = None,
) -> list[tuple[bytes, bytes]]:
    """End-to-end headers plus XFF (peer appended), X-Forwarded-Proto and Via."""
    out: list[tuple[bytes, bytes]] = []
    xff = None
    via = None
    have_proto = False
    drop = _drop_set(connection_named(headers) if connection is None else connection)
    for name, value in headers:
        lname = name.lower()
        if lname in drop:
            continue
        if lname == b"x-forwarded-for":
            xff = value if xff is None else xff + b", " + value
            continue
        if lname == b"via":
            via = value if via is None else via + b", " + value
            continue
        if lname == b"x-forwarded-proto":
            have_proto = True
        out.append((name, value))
    out.append((b"x-forwarded-for", peer_ip if xff is None else xff + b", " + peer_ip))
    if not have_proto:
        out.append((b"x-forwarded-proto", proto))
    out.append((b"via", VIA_VALUE if via is None else via + b", " + VIA_VALUE))
    return out


def forward_response_headers(
    headers: list[tuple[bytes, bytes]], connection: frozenset[bytes] | None = None
) -> list[tuple[bytes, bytes]]:
    """End-to-end response headers with our Via appended (to the last Via line: its
    value is the end of the combined list, RFC 9110 §5.3)."""
    drop = _drop_set(connection_named(headers) if connection is None else connection)
    out: list[tuple[bytes, bytes]] = []
    last_via = -1
    for name, value in headers:
        lname = name.lower()
        if lname in drop:
            continue
        if lname == b"via":
            last_via = len(out)
        out.append((name, value))
    if last_via < 0:
        out.append((b"via", VIA_VALUE))
    else:
        name, value = out[last_via]
        out[last_via] = (name, value + b", " + VIA_VALUE)
    return out
