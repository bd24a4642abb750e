"""The request path as routing, the access check and the upstream all see it. Pure.

A check on one spelling of a path and an app that resolves another is an access bypass
(``/items/..;/admin`` passes ``/items`` and is ``/admin`` to Tomcat). So the sidecar
normalises the path once, the way Envoy's path normalisation does, compares the result,
and forwards exactly that (with the query as it came):

* percent-encodings of unreserved characters (``A-Z a-z 0-9 - . _ ~``) are decoded, the
  others kept with upper-case hex (RFC 3986 §6.2.2);
* ``.`` and ``..`` segments are removed (RFC 3986 §5.2.4), and empty ones (``//``) merged.

What cannot be normalised safely is refused (:class:`BadPath`, a 400 ``bad-request``),
because apps disagree on it: a backslash, an encoded ``/`` or ``\\`` (``%2F``, ``%5C``),
an encoded control character (``%00``, ``%0D``), path parameters on a dot segment
(``..;``), a segment that becomes a dot segment or a separator when decoded once more
(``%252e%252e``, ``%252f``), a ``%`` without two hex digits, and any byte that is not
visible ASCII.
"""

from __future__ import annotations

import re
from urllib.parse import unquote_to_bytes


class BadPath(ValueError):
    """The path cannot be normalised safely; the message says why."""


# Clean already: no "%", "\", empty or dot-led segment, only visible ASCII. Most paths are,
# and pass with this one match.
_CLEAN = re.compile(rb"(?:/[!$&-\-0-;=@-\[\]-~][!$&-.0-;=@-\[\]-~]*)*/?")
_UNRESERVED = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_HEX = frozenset(b"0123456789ABCDEFabcdef")
_DOTS = (b".", b"..")


def normalise_target(target: bytes) -> bytes:
    """A request target with its path normalised and its query untouched; ``*`` and the
    scheme and authority of an absolute-form target are kept as they are."""
    path, mark, query = target.partition(b"?")
    if _CLEAN.fullmatch(path) and path:
        return target
    if path == b"*":
        return target
    prefix = b""
    if path[:7].lower() == b"http://" or path[:8].lower() == b"https://":
        start = path.find(b"/", path.find(b"//") + 2)
        prefix, path = (path, b"/") if start < 0 else (path[:start], path[start:])
    return prefix + normalise_path(path) + mark + query


def normalise_path(path: bytes) -> bytes:
    """The normal form of a path (no query); :class:`BadPath` if there is none."""
    if not path.startswith(b"/"):
        raise BadPath("it does not start with '/'")
    segments: list[bytes] = []
    trailing = False  # "/a/b/.." is "/a/": the last segment resolved leaves a directory
    for segment in _decoded(path).split(b"/")[1:]:
        trailing = segment in (b"", b".", b"..")
        if trailing:
            if segment == b".." and segments:
                segments.pop()
            continue
        if b"%" in segment or b";" in segment:
            _refuse_hidden(segment)
        segments.append(segment)
    return b"/" + b"/".join(segments) + (b"/" if trailing and segments else b"")


def path_of(target: bytes) -> bytes:
    """The path of a normalised target (origin or absolute form), without the query."""
    path = target.partition(b"?")[0]
    if path[:1] != b"/" and b"//" in path:  # absolute-form: after the authority
        start = path.find(b"/", path.find(b"//") + 2)
        path = b"/" if start < 0 else path[start:]
    return path


def _decoded(path: bytes) -> bytes:
    """Unreserved characters decoded, other percent-encodings in upper case; BadPath for
    what must not be in a path."""
    out = bytearray()
    i, n = 0, len(path)
    while i < n:
        byte = path[i]
        if byte == 0x25:  # "%"
            pair = path[i + 1 : i + 3]
            if len(pair) != 2 or pair[0] not in _HEX or pair[1] not in _HEX:
                raise BadPath("a '%' not followed by two hex digits")
            value = int(pair, 16)
            if value in _UNRESERVED:
                out.append(value)
            elif value in (0x2F, 0x5C):
                raise BadPath("an encoded '/' or '\\' (%2F, %5C), which apps split on or not")
            elif value < 0x20 or value == 0x7F:
                raise BadPath("an encoded control character")
            else:
                out += b"%" + pair.upper()
            i += 3
            continue
        if byte == 0x5C:
            raise BadPath("a backslash, which some apps read as '/'")
        if byte <= 0x20 or byte >= 0x7F:
            raise BadPath("a control character, space or non-ASCII byte")
        out.append(byte)
        i += 1
    return bytes(out)


def _refuse_hidden(segment: bytes) -> None:
    """A segment an app may still resolve as ``.``/``..`` or split: ``..;x`` (Tomcat drops
    path parameters), ``%252e%252e`` and ``%252f`` (an app that decodes once more)."""
    if segment.partition(b";")[0] in _DOTS:
        raise BadPath("path parameters on a dot segment ('..;')")
    decoded = segment
    for _ in range(3):  # an app that decodes twice, and a margin
        if b"%" not in decoded:
            break
        decoded = unquote_to_bytes(decoded)
        if decoded.partition(b";")[0] in _DOTS or any(b in decoded for b in (b"/", b"\\", b"\x00")):
            raise BadPath("a segment that decodes to a dot segment or a separator when decoded again")


__all__ = ["BadPath", "normalise_path", "normalise_target", "path_of"]
