"""Request bodies the HTTP API reads: streamed, and never buffered past a limit.

Starlette's ``request.body()`` reads everything before the caller can look at the size, so a
300 MB POST costs 300 MB however small the limit. :func:`read_body` refuses a declared
``Content-Length`` over the limit before reading a byte, and counts while it reads a body of
unknown length (chunked), refusing it as soon as the count passes the limit: the client gets
413 while it is still sending, and the server has held at most the limit plus one chunk.
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse, Response


class _TooLarge(Exception):
    pass


async def read_body(request: Request, limit: int) -> bytes | Response:
    """The body, or a 413 response naming the limit."""
    declared = request.headers.get("content-length")
    if declared is not None:
        # h11 (under hypercorn) has already refused a malformed Content-Length.
        if declared.strip().isdigit() and int(declared) > limit:
            return too_large(limit)
    try:
        return await _read(request, limit)
    except _TooLarge:
        return too_large(limit)


async def _read(request: Request, limit: int) -> bytes:
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _TooLarge
        chunks.append(chunk)
    return b"".join(chunks)


def too_large(limit: int) -> Response:
    # Connection: close: the rest of the body is not read, so this connection cannot carry
    # another request.
    return JSONResponse(
        {"problems": [f"the body is over {limit} bytes ({limit // (1024 * 1024)} MiB): refused"]},
        status_code=413,
        headers={"connection": "close"},
    )
