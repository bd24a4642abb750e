"""Request paths normalised as Envoy's path normalisation does (meshlet/paths.py): what
routing and the access check compare and what the upstream receives are the same bytes."""

from __future__ import annotations

from urllib.parse import unquote_to_bytes

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshlet.paths import _CLEAN, BadPath, normalise_path, normalise_target, path_of

NORMAL = [
    (b"/", b"/"),
    (b"/a/b", b"/a/b"),
    (b"/a/b/", b"/a/b/"),
    (b"/a/./b", b"/a/b"),
    (b"/a/../b", b"/b"),
    (b"/../../b", b"/b"),
    (b"/a/..", b"/"),
    (b"/a/b/..", b"/a/"),
    (b"/a/b/.", b"/a/b/"),
    (b"//a///b", b"/a/b"),
    (b"/items/%2e%2E/admin", b"/admin"),  # encoded dots are unreserved: decoded, then resolved
    (b"/it%65ms/%7e%5F", b"/items/~_"),  # unreserved percent-encodings decoded
    (b"/caf%e9", b"/caf%E9"),  # others kept, hex in upper case
    (b"/a%20b/%3f", b"/a%20b/%3F"),
    (b"/a;v=1/b", b"/a;v=1/b"),  # path parameters on a name are the app's
    (b"/.well-known/x", b"/.well-known/x"),
    (b"/a..b/..c", b"/a..b/..c"),
    (b"/a?x=/../%2f\\", b"/a?x=/../%2f\\"),  # the query is never touched
    (b"/a/../b?q", b"/b?q"),
    (b"*", b"*"),  # OPTIONS * HTTP/1.1
    (b"http://item/a/../b?q=1", b"http://item/b?q=1"),  # absolute-form: the path part
    (b"http://item", b"http://item/"),
    (b"http://item?q", b"http://item/?q"),
]


@pytest.mark.parametrize(("target", "normal"), NORMAL)
def test_a_target_is_normalised_as_the_app_would_resolve_it(target: bytes, normal: bytes) -> None:
    assert normalise_target(target) == normal


@pytest.mark.parametrize(
    ("target", "why"),
    [
        (b"/items/..;/admin", "path parameters on a dot segment"),
        (b"/items/.;x/admin", "path parameters on a dot segment"),
        (b"/items/..\\admin", "a backslash"),
        (b"/items/..%5cadmin", "an encoded '/' or '\\'"),
        (b"/items/..%5Cadmin", "an encoded '/' or '\\'"),
        (b"/items/..%2fadmin", "an encoded '/' or '\\'"),
        (b"/items%2F..%2Fadmin", "an encoded '/' or '\\'"),
        (b"/items/%252e%252e/admin", "decodes to a dot segment or a separator"),
        (b"/items/%252E./admin", "decodes to a dot segment or a separator"),
        (b"/items/%2e%2e%3b/admin", "decodes to a dot segment or a separator"),
        (b"/items/%252fadmin", "decodes to a dot segment or a separator"),
        (b"/items/%25%35%63admin", "decodes to a dot segment or a separator"),
        (b"/items/%00", "an encoded control character"),
        (b"/items/%0d%0a", "an encoded control character"),
        (b"/items/\x00", "a control character, space or non-ASCII byte"),
        (b"/caf\xc3\xa9", "a control character, space or non-ASCII byte"),
        (b"/items/%zz", "a '%' not followed by two hex digits"),
        (b"/items/%2", "a '%' not followed by two hex digits"),
        (b"items", "it does not start with '/'"),
        (b"", "it does not start with '/'"),
    ],
)
def test_what_cannot_be_normalised_safely_is_refused(target: bytes, why: str) -> None:
    with pytest.raises(BadPath) as info:
        normalise_target(target)
    assert why in str(info.value)


_SEGMENT = st.lists(
    st.sampled_from(["", ".", "..", "a", "b", "%2e", "%2E", "%25", "%41", "%e9", ";", ";x", "%3b", "%252e", "~", "-"]),
    max_size=4,
).map("".join)
_PATHS = st.lists(_SEGMENT, max_size=8).map(lambda s: ("/" + "/".join(s)).encode())


@given(_PATHS)
def test_a_normal_path_is_rooted_free_of_dot_segments_and_stable(path: bytes) -> None:
    try:
        normal = normalise_target(path)
    except BadPath:
        return
    assert normal.startswith(b"/") and b"//" not in normal
    segments = normal.split(b"/")
    assert b"." not in segments and b".." not in segments
    assert normalise_target(normal) == normal  # idempotent
    # An app that decodes the path once more still finds no dot segment and no new separator.
    again = [unquote_to_bytes(s).split(b";")[0] for s in segments]
    assert b"." not in again and b".." not in again
    assert len(unquote_to_bytes(normal).split(b"/")) == len(segments)


@given(st.binary(max_size=40))
def test_any_bytes_are_normalised_or_refused_never_crash(target: bytes) -> None:
    try:
        normal = normalise_target(target)
    except BadPath:
        return
    assert normalise_target(normal) == normal


@given(st.text(alphabet="/.:;=@[]~-_%!$&'()*+,aZ09", max_size=20).map(str.encode))
def test_the_fast_path_takes_only_what_is_already_normal(path: bytes) -> None:
    if path and _CLEAN.fullmatch(path):
        assert normalise_path(path) == path


@pytest.mark.parametrize(
    ("target", "path"),
    [(b"/a/b?c", b"/a/b"), (b"http://item/a?x", b"/a"), (b"http://item", b"/"), (b"*", b"*")],
)
def test_path_of_a_target(target: bytes, path: bytes) -> None:
    assert path_of(target) == path
