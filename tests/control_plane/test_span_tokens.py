"""Span tokens (control_plane/span_tokens.py): one per session, naming its service, alive
until the session ends plus a grace; what a POST's Authorization header may write."""

from __future__ import annotations

import pytest

from control_plane.span_tokens import EVERY_SERVICE, GRACE, SpanTokens, new_token

API = "api-write-token"


def span(service: str | None) -> dict[str, object]:
    return {"traceId": "a" * 32, "id": "1" * 16, **({"localEndpoint": {"serviceName": service}} if service else {})}


def test_a_token_is_random_and_recognisable() -> None:
    tokens = {new_token() for _ in range(100)}
    assert len(tokens) == 100 and all(t.startswith("mst_") and len(t) == 47 for t in tokens)


def test_a_token_lives_with_its_session_and_a_grace_after() -> None:
    tokens, session, other = SpanTokens(), object(), object()
    token = new_token()
    tokens.grant(session, token, "item")
    tokens.grant(other, new_token(), "user")
    assert tokens.service(token, 1e6) == "item"  # no end while the session lives
    tokens.revoke(session, 100.0)
    tokens.revoke(session, 120.0)  # idempotent: the grace runs from the end
    assert tokens.service(token, 100.0 + GRACE - 0.001) == "item"
    assert tokens.service(token, 100.0 + GRACE) is None
    assert len(tokens) == 1  # forgotten, not only refused


def test_only_a_hash_is_held() -> None:
    tokens, token = SpanTokens(), new_token()
    tokens.grant(object(), token, "item")
    assert token not in repr(vars(tokens)) and token.encode() not in repr(vars(tokens)).encode()


@pytest.mark.parametrize(
    ("authorization", "writer", "reason"),
    [
        ("", None, "no-token"),
        ("Bearer", None, "no-token"),
        ("Token abc", None, "no-token"),
        ("Bearer mst_unknown", None, "unknown-token"),
        (f"Bearer {API}", EVERY_SERVICE, None),
        (f"bearer {API}", EVERY_SERVICE, None),
        ("Bearer SESSION", "item", None),
    ],
)
def test_who_a_post_writes_for(authorization: str, writer: str | None, reason: str | None) -> None:
    tokens, token = SpanTokens(), new_token()
    tokens.grant(object(), token, "item")
    assert tokens.writer(authorization.replace("SESSION", token), API, 0.0) == writer
    assert tokens.posts_refused == {"no-token": 0, "unknown-token": 0, **({reason: 1} if reason else {})}


def test_without_an_api_token_only_span_tokens_write() -> None:
    assert SpanTokens().writer("Bearer anything", None, 0.0) is None


def test_a_session_keeps_only_its_own_services_spans() -> None:
    tokens = SpanTokens()
    batch = [span("item"), span("ITEM"), span("user"), span(None)]
    assert tokens.keep(batch, "item", 0.0) == batch[:2]  # the store keeps service names lower-case
    assert tokens.spans_refused == {"other-service": 2}
    assert tokens.keep(batch, EVERY_SERVICE, 0.0) == batch
