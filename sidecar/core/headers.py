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


def _connection_named(headers: list[tuple[bytes, bytes]]) -> frozenset[bytes]:
    named: set[bytes] = set()
    for name, value in headers:
        if name.lower() == b"connection":
            named.update(t.strip().lower() for t in value.split(b",") if t.strip())
    return frozenset(named)


def end_to_end(headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """The headers without hop-by-hop fields and without those named in Connection."""
    named = _connection_named(headers)
    if named:
        drop = HOP_BY_HOP | named
        return [(n, v) for n, v in headers if n.lower() not in drop]
    return [(n, v) for n, v in headers if n.lower() not in HOP_BY_HOP]


def forward_request_headers(
    headers: list[tuple[bytes, bytes]], peer_ip: bytes, proto: bytes = b"http"
) -> list[tuple[bytes, bytes]]:
    """End-to-end headers plus XFF (peer appended), X-Forwarded-Proto and Via."""
    out: list[tuple[bytes, bytes]] = []
    xff = None
    via = None
    have_proto = False
    named = _connection_named(headers)
    drop = HOP_BY_HOP | named if named else HOP_BY_HOP
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


def forward_response_headers(headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """End-to-end response headers with our Via appended."""
    out = end_to_end(headers)
    # The last Via line: its value is the end of the combined list (RFC 9110 §5.3).
    for i in range(len(out) - 1, -1, -1):
        name, value = out[i]
        if name.lower() == b"via":
            out[i] = (name, value + b", " + VIA_VALUE)
            return out
    out.append((b"via", VIA_VALUE))
    return out
