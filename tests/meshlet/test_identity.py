"""meshlet.identity: the one shape of a mesh SPIFFE ID is accepted, every other is refused
with a reason."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshlet.identity import (
    MAX_SPIFFE_ID,
    MAX_TRUST_DOMAIN,
    UNAUTHENTICATED,
    IdentityError,
    check_trust_domain,
    parse_spiffe_id,
    spiffe_id,
)
from meshlet.names import SERVICE_NAME, is_service_name

TD = "meshlet.local"

GOOD_TRUST_DOMAINS = ["meshlet.local", "a", "prod_1-eu.example.org", "0", "a" * MAX_TRUST_DOMAIN, "."]
BAD_TRUST_DOMAINS = [
    ("", "empty"),
    ("Meshlet.local", "not a trust domain"),
    ("mesh let", "not a trust domain"),
    ("meshlet.local\n", "not a trust domain"),
    ("meshlet.local:443", "not a trust domain"),
    ("ex%41mple", "not a trust domain"),
    ("ünicode", "not a trust domain"),
    ("a" * (MAX_TRUST_DOMAIN + 1), "longer than 255"),
    (None, "must be a string"),
    (b"meshlet.local", "must be a string"),
]


@pytest.mark.parametrize("text", GOOD_TRUST_DOMAINS)
def test_trust_domains(text: str) -> None:
    assert check_trust_domain(text) == text


@pytest.mark.parametrize(("text", "reason"), BAD_TRUST_DOMAINS)
def test_not_trust_domains(text: object, reason: str) -> None:
    with pytest.raises(IdentityError, match=reason):
        check_trust_domain(text)


def test_spiffe_id_is_the_documented_shape() -> None:
    assert spiffe_id(TD, "item") == "spiffe://meshlet.local/service/item"
    assert parse_spiffe_id("spiffe://meshlet.local/service/item", TD) == "item"


@pytest.mark.parametrize(
    ("trust_domain", "service", "reason"),
    [
        (TD, "Item", "not a service name"),
        (TD, "", "not a service name"),
        (TD, "a/b", "not a service name"),
        (TD, "a" * 64, "not a service name"),
        (TD, UNAUTHENTICATED, "plaintext callers"),
        ("", "item", "empty"),
        ("Meshlet", "item", "not a trust domain"),
    ],
)
def test_spiffe_id_refuses(trust_domain: str, service: str, reason: str) -> None:
    with pytest.raises(IdentityError, match=reason):
        spiffe_id(trust_domain, service)


BAD_IDS = [
    (None, "must be a string"),
    (b"spiffe://meshlet.local/service/item", "must be a string"),
    ("", "must start with"),
    ("SPIFFE://meshlet.local/service/item", "must start with"),
    ("Spiffe://meshlet.local/service/item", "must start with"),
    ("spiffe:/meshlet.local/service/item", "must start with"),
    ("spiffe:meshlet.local/service/item", "must start with"),
    ("https://meshlet.local/service/item", "must start with"),
    (" spiffe://meshlet.local/service/item", "must start with"),
    ("spiffe://other.local/service/item", "trust domain 'other.local', not 'meshlet.local'"),
    ("spiffe://meshlet.local.evil/service/item", "trust domain"),
    ("spiffe://MESHLET.LOCAL/service/item", "not a trust domain"),
    ("spiffe:///service/item", "empty"),
    ("spiffe://meshlet.local", "empty path segment"),
    ("spiffe://meshlet.local/", "empty path segment"),
    ("spiffe://meshlet.local/service/", "empty path segment"),
    ("spiffe://meshlet.local/service//item", "empty path segment"),
    ("spiffe://meshlet.local//service/item", "empty path segment"),
    ("spiffe://meshlet.local/service/item/", "empty path segment"),
    ("spiffe://meshlet.local/service/./item", "'.' or '..'"),
    ("spiffe://meshlet.local/service/../item", "'.' or '..'"),
    ("spiffe://meshlet.local/service/item/..", "'.' or '..'"),
    ("spiffe://meshlet.local/service/.", "'.' or '..'"),
    ("spiffe://meshlet.local/service/%69tem", "percent-encoding"),
    ("spiffe://meshlet.local/service%2Fitem", "percent-encoding"),
    ("spiffe://meshlet%2elocal/service/item", "percent-encoding"),
    ("spiffe://meshlet.local/service/item?x=1", "a query"),
    ("spiffe://meshlet.local/service/item?", "a query"),
    ("spiffe://meshlet.local/service/item#frag", "a fragment"),
    ("spiffe://user@meshlet.local/service/item", "userinfo"),
    ("spiffe://user:pw@meshlet.local/service/item", "userinfo"),
    ("spiffe://meshlet.local:8443/service/item", "a port"),
    ("spiffe://meshlet.local/services/item", "/service/<name>"),
    ("spiffe://meshlet.local/SERVICE/item", "/service/<name>"),
    ("spiffe://meshlet.local/item", "/service/<name>"),
    ("spiffe://meshlet.local/service/item/extra", "/service/<name>"),
    ("spiffe://meshlet.local/ns/default/sa/item", "/service/<name>"),
    ("spiffe://meshlet.local/service/Item", "not a service name"),
    ("spiffe://meshlet.local/service/it_em", "not a service name"),
    ("spiffe://meshlet.local/service/-item", "not a service name"),
    ("spiffe://meshlet.local/service/" + "a" * 64, "not a service name"),
    ("spiffe://meshlet.local/service/item\n", "not a service name"),
    ("spiffe://meshlet.local/service/it em", "not a service name"),
    ("spiffe://meshlet.local/service/ítem", "not ASCII"),
    ("spiffe://meshlet.local/service/item\u200b", "not ASCII"),
    (f"spiffe://meshlet.local/service/{UNAUTHENTICATED}", "plaintext callers"),
    ("spiffe://meshlet.local/service/" + "a" * MAX_SPIFFE_ID, "longer than 2048"),
]


@pytest.mark.parametrize(("uri", "reason"), BAD_IDS)
def test_parse_refuses(uri: object, reason: str) -> None:
    with pytest.raises(IdentityError, match=reason.replace("?", r"\?").replace(".", r"\.")):
        parse_spiffe_id(uri, TD)


def test_parse_refuses_an_invalid_expected_trust_domain() -> None:
    with pytest.raises(IdentityError, match="not a trust domain"):
        parse_spiffe_id("spiffe://Meshlet/service/item", "Meshlet")


def test_a_reason_shows_a_long_value_cut_short() -> None:
    with pytest.raises(IdentityError) as raised:
        parse_spiffe_id("spiffe://meshlet.local/service/" + "x" * 5000, TD)
    assert len(str(raised.value)) < 200


def test_a_trust_domain_of_255_fits_in_an_id() -> None:
    td = "a" * MAX_TRUST_DOMAIN
    uri = spiffe_id(td, "a" * 63)
    assert len(uri.encode()) <= MAX_SPIFFE_ID
    assert parse_spiffe_id(uri, td) == "a" * 63


services = st.from_regex(SERVICE_NAME, fullmatch=True).filter(lambda s: s != UNAUTHENTICATED)
trust_domains = st.from_regex(r"[a-z0-9._-]{1,40}", fullmatch=True)


@given(trust_domains, services)
def test_round_trip(trust_domain: str, service: str) -> None:
    assert parse_spiffe_id(spiffe_id(trust_domain, service), trust_domain) == service


@given(st.text(max_size=120))
def test_any_text_is_refused_or_is_exactly_a_service_id(text: str) -> None:
    try:
        service = parse_spiffe_id(text, TD)
    except IdentityError:
        return
    assert is_service_name(service)
    assert text == spiffe_id(TD, service)


@given(services, st.text(min_size=1, max_size=5))
def test_anything_added_to_a_valid_id_is_refused(service: str, extra: str) -> None:
    uri = spiffe_id(TD, service)
    for mutated in (uri + extra, extra + uri, uri.replace(service, service + extra, 1)):
        try:
            parsed = parse_spiffe_id(mutated, TD)
        except IdentityError:
            continue
        # Only appending characters that still make a service name is accepted, and then the
        # parse names exactly the text's service.
        assert mutated == spiffe_id(TD, parsed)


@given(trust_domains.filter(lambda td: td != TD), services)
def test_another_trust_domain_is_refused(trust_domain: str, service: str) -> None:
    with pytest.raises(IdentityError):
        parse_spiffe_id(spiffe_id(trust_domain, service), TD)
