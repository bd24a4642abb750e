"""sidecar.core.routing: the destination service from the target or the Host header."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.core.http1 import RequestHead, RequestReader
from sidecar.core.routing import NotRoutable, destination, split_authority


def head(target: bytes, host: bytes | None) -> RequestHead:
    headers = [] if host is None else [(b"Host", host)]
    return RequestHead(b"GET", target, headers, "1.1" if host is not None else "1.0", host=host)


@pytest.mark.parametrize(
    ("authority", "service"),
    [
        (b"item", b"item"),
        (b"item:8080", b"item"),
        (b"ITEM:8080", b"item"),
        (b"Item.Default.svc:80", b"item.default.svc"),
        (b"  item:1  ", b"item"),
        (b"127.0.0.1:9001", b"127.0.0.1"),
        (b"[::1]:80", b"::1"),
        (b"[::1]", b"::1"),
        (b"[2001:DB8::1]:443", b"2001:db8::1"),
        (b"item:", b"item"),
    ],
)
def test_split_authority(authority: bytes, service: bytes) -> None:
    assert split_authority(authority) == service


@pytest.mark.parametrize(
    ("target", "host", "expected"),
    [
        pytest.param(b"/x?y=1", b"item", ("item", b"/x?y=1", b"item"), id="host"),
        pytest.param(b"/x", b"item:8080", ("item", b"/x", b"item:8080"), id="host-with-port"),
        pytest.param(b"/x", b"ITEM:8080", ("item", b"/x", b"ITEM:8080"), id="host-upper-case"),
        pytest.param(b"/x", b"[::1]:8080", ("::1", b"/x", b"[::1]:8080"), id="host-ipv6"),
        pytest.param(b"/x", b"[fe80::1]", ("fe80::1", b"/x", b"[fe80::1]"), id="host-ipv6-no-port"),
        pytest.param(b"*", b"item", ("item", b"*", b"item"), id="asterisk-form"),
        pytest.param(
            b"http://item:8080/x?y", b"other", ("item", b"/x?y", b"item:8080"), id="absolute-form-wins-over-host"
        ),
        pytest.param(b"http://item:8080/x?y", None, ("item", b"/x?y", b"item:8080"), id="absolute-form-no-host"),
        pytest.param(b"http://item", b"item", ("item", b"/", b"item"), id="absolute-form-without-path"),
        pytest.param(b"http://item:81", b"item", ("item", b"/", b"item:81"), id="absolute-form-port-without-path"),
        pytest.param(b"http://item?q=1", b"item", ("item", b"/?q=1", b"item"), id="absolute-form-query-without-path"),
        pytest.param(b"HTTP://Item/A", b"x", ("item", b"/A", b"Item"), id="absolute-form-scheme-case"),
        pytest.param(b"http://[::1]:8080/p", b"x", ("::1", b"/p", b"[::1]:8080"), id="absolute-form-ipv6"),
        pytest.param(b"http://item/a/b?c=d&e", b"x", ("item", b"/a/b?c=d&e", b"item"), id="absolute-form-long-path"),
    ],
)
def test_destination(target: bytes, host: bytes | None, expected: tuple[str, bytes, bytes]) -> None:
    assert destination(head(target, host)) == expected


@pytest.mark.parametrize(
    ("target", "host", "why"),
    [
        pytest.param(b"https://item/x", b"item", "https://", id="https"),
        pytest.param(b"HTTPS://item/x", b"item", "https://", id="https-upper"),
        pytest.param(b"/x", None, "no Host", id="missing-host"),
        pytest.param(b"http:///x", b"item", "without a host", id="absolute-form-empty-authority"),
        pytest.param(b"http://", b"item", "without a host", id="absolute-form-nothing"),
    ],
)
def test_not_routable(target: bytes, host: bytes | None, why: str) -> None:
    with pytest.raises(NotRoutable, match=why):
        destination(head(target, host))


def test_destination_from_a_parsed_request() -> None:
    reader = RequestReader()
    reader.feed(b"GET http://item:8080/x?y HTTP/1.1\r\nHost: item:8080\r\n\r\nGET /z HTTP/1.1\r\nHost: Cart\r\n\r\n")
    heads = [e for e in reader.events if isinstance(e, RequestHead)]
    assert [destination(h) for h in heads] == [("item", b"/x?y", b"item:8080"), ("cart", b"/z", b"Cart")]


_label = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-", min_size=1, max_size=20)


@settings(max_examples=300, deadline=None)
@given(
    name=st.lists(_label, min_size=1, max_size=3).map(".".join),
    port=st.none() | st.integers(min_value=1, max_value=65535),
    path=st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789/?=&%.-", max_size=20),
    upper=st.booleans(),
)
def test_absolute_form_and_host_agree(name: str, port: int | None, path: str, upper: bool) -> None:
    authority = (name.upper() if upper else name).encode() + (b"" if port is None else b":%d" % port)
    origin = b"/" + path.encode()
    by_host = destination(head(origin, authority))
    by_target = destination(head(b"http://" + authority + origin, b"ignored"))
    assert by_host == by_target == (name, origin, authority)
