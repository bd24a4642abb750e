"""sidecar.core.http2 and sidecar.core.http2_server: an HTTP/2 stream's request as a
RequestHead, a response's fields, and the server connection's bounds, fed frames written
with hyperframe and hpack (a client that obeys no limit), time passed in."""

from __future__ import annotations

import h2.config
import h2.connection
import pytest
from h2.errors import ErrorCodes
from hpack import Decoder, Encoder
from hyperframe.frame import (
    ContinuationFrame,
    DataFrame,
    Frame,
    GoAwayFrame,
    HeadersFrame,
    PingFrame,
    RstStreamFrame,
    SettingsFrame,
)

from sidecar.core import errors, http2
from sidecar.core.errors import error_response
from sidecar.core.http1 import ProtocolError
from sidecar.core.http2 import Budget, Http2Counters, raw_parts, request_head, response_fields, trailer_fields
from sidecar.core.http2_server import (
    BodyEnded,
    BodyReceived,
    ConnectionFault,
    ServerConnection,
    StreamCancelled,
    StreamOpened,
)

GET = [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/a?b"), (b":authority", b"item:80")]


# request_head ------------------------------------------------------------------------


def test_a_get_becomes_a_request_head_of_version_2() -> None:
    head = request_head([*GET, (b"accept", b"*/*")], end_stream=True)
    assert (head.method, head.target, head.host, head.http_version) == (b"GET", b"/a?b", b"item:80", "2")
    assert head.headers == [(b"host", b"item:80"), (b"accept", b"*/*")]  # no pseudo-header; host for HTTP/1.1
    assert not head.has_body and head.keep_alive


def test_a_body_of_unknown_length_is_chunked_and_a_known_one_keeps_its_length() -> None:
    post = [(b":method", b"POST"), *GET[1:]]
    assert request_head(post, end_stream=False).chunked
    head = request_head([*post, (b"content-length", b"12")], end_stream=False)
    assert (head.chunked, head.content_length) == (False, 12)


def test_cookie_crumbs_are_joined() -> None:
    head = request_head([*GET, (b"cookie", b"a=1"), (b"x", b"y"), (b"cookie", b"b=2")], end_stream=True)
    assert (b"cookie", b"a=1; b=2") in head.headers
    assert [n for n, _ in head.headers].count(b"cookie") == 1


def test_host_is_used_without_authority_and_a_matching_one_is_kept() -> None:
    head = request_head([*GET[:3], (b"host", b"item")], end_stream=True)
    assert head.host == b"item" and head.headers == [(b"host", b"item")]
    head = request_head([*GET, (b"host", b"item:80")], end_stream=True)
    assert head.headers == [(b"host", b"item:80")]


@pytest.mark.parametrize(
    ("fields", "status", "words"),
    [
        ([(b":method", b"CONNECT"), (b":authority", b"db:5432")], 400, "CONNECT"),
        ([(b":method", b"CONNECT"), (b":protocol", b"websocket"), *GET[1:]], 400, "CONNECT"),
        ([(b":method", b"GET"), (b":scheme", b"ftp"), *GET[2:]], 400, ":scheme"),
        (GET[:3], 400, ":authority"),
        ([*GET[:3], (b":authority", b"a/b")], 400, "host[:port]"),
        ([*GET[:3], (b":authority", b"u@a")], 400, "host[:port]"),
        ([*GET, (b"host", b"other")], 400, "disagrees"),
        ([*GET, (b"host", b"a"), (b"host", b"b")], 400, "more than one"),
        ([*GET, (b"content-length", b"x1")], 400, "content-length"),
        ([*GET, (b"content-length", b"3")], 400, "no body"),
        ([*GET, *[(b"x-%d" % i, b"v") for i in range(102)]], 431, "too many"),
    ],
)
def test_requests_the_path_cannot_take(fields: list[tuple[bytes, bytes]], status: int, words: str) -> None:
    with pytest.raises(ProtocolError) as caught:
        request_head(fields, end_stream=True)
    assert caught.value.status == status and words in caught.value.detail


# responses -----------------------------------------------------------------------------


def test_response_fields_drop_what_http2_forbids_and_lower_case_the_rest() -> None:
    fields = response_fields(
        200,
        [(b"Content-Type", b"text/plain"), (b"Connection", b"close"), (b"Keep-Alive", b"5"), (b"upgrade", b"x")],
    )
    assert fields == [(b":status", b"200"), (b"content-type", b"text/plain")]
    trailers = trailer_fields([(b"Grpc-Status", b"0"), (b":status", b"200"), (b"transfer-encoding", b"x")])
    assert trailers == [(b"grpc-status", b"0")]


def test_a_mesh_error_keeps_its_status_fields_and_body_for_an_http2_stream() -> None:
    status, headers, body = raw_parts(error_response(errors.NO_ROUTE, "no service named 'x'", close=True))
    assert status == 404 and body == b"no-route: no service named 'x'\n"
    assert (b"x-meshlet-error", b"no-route") in headers
    assert response_fields(status, headers)[-1] == (b"x-meshlet-error", b"no-route")  # connection: close dropped


def test_a_budget_counts_per_window() -> None:
    budget = Budget(3, window=10.0)
    assert all(budget.spend(0.0) for _ in range(3))
    assert not budget.spend(9.9)
    assert budget.spend(10.0)  # a new window


# the server connection, fed raw frames ---------------------------------------------------


class RawClient:
    """Frames as bytes, obeying no limit of ours; what the server answers, parsed."""

    def __init__(self) -> None:
        self.encoder = Encoder()
        self.decoder = Decoder()
        self.server = ServerConnection(Http2Counters())
        self.now = 0.0
        self.feed(http2.PREFACE + SettingsFrame(0).serialize())

    def feed(self, data: bytes) -> list[object]:
        return self.server.receive(data, self.now)

    def headers(self, stream_id: int, fields: list[tuple[bytes, bytes]] = GET, *, end: bool = True) -> bytes:
        frame = HeadersFrame(stream_id)
        frame.data = self.encoder.encode(fields)
        frame.flags.add("END_HEADERS")
        if end:
            frame.flags.add("END_STREAM")
        return frame.serialize()

    def answered(self) -> list[Frame]:
        data = self.server.output()
        frames = []
        while data:
            frame, length = Frame.parse_frame_header(memoryview(data[:9]))
            frame.parse_body(memoryview(data[9 : 9 + length]))
            frames.append(frame)
            data = data[9 + length :]
        return frames


def rst(stream_id: int, code: int = ErrorCodes.CANCEL) -> bytes:
    frame = RstStreamFrame(stream_id)
    frame.error_code = code
    return frame.serialize()


def goaway(frames: list[Frame]) -> GoAwayFrame:
    (frame,) = [f for f in frames if isinstance(f, GoAwayFrame)]
    return frame


def test_our_settings_are_advertised() -> None:
    client = RawClient()
    settings = [f for f in client.answered() if isinstance(f, SettingsFrame) and "ACK" not in f.flags][0]
    assert settings.settings[SettingsFrame.MAX_CONCURRENT_STREAMS] == http2.MAX_CONCURRENT_STREAMS
    assert settings.settings[SettingsFrame.MAX_HEADER_LIST_SIZE] == http2.MAX_HEADER_LIST_SIZE
    assert settings.settings[SettingsFrame.HEADER_TABLE_SIZE] == http2.HEADER_TABLE_SIZE
    assert settings.settings[SettingsFrame.INITIAL_WINDOW_SIZE] == http2.STREAM_WINDOW


def test_a_stream_opens_takes_body_and_ends() -> None:
    client = RawClient()
    post = [(b":method", b"POST"), *GET[1:]]
    data = DataFrame(1)
    data.data = b"hello"
    data.flags.add("END_STREAM")
    events = client.feed(client.headers(1, post, end=False) + data.serialize())
    opened, body, ended = events
    assert isinstance(opened, StreamOpened) and not opened.end_stream
    assert isinstance(body, BodyReceived) and body.data == b"hello" and body.flow_length == 5
    assert isinstance(ended, BodyEnded)


def test_a_malformed_request_is_a_stream_to_answer_not_a_connection_error() -> None:
    client = RawClient()
    opened, ended = client.feed(client.headers(1, [(b":method", b"GET"), (b":scheme", b"gopher"), *GET[2:]]))
    assert isinstance(opened, StreamOpened) and isinstance(opened.head, ProtocolError)


def test_streams_past_the_limit_are_refused_not_the_connection() -> None:
    client = RawClient()
    client.answered()
    opened = client.feed(b"".join(client.headers(1 + 2 * i) for i in range(http2.MAX_CONCURRENT_STREAMS + 1)))
    assert sum(isinstance(event, StreamOpened) for event in opened) == http2.MAX_CONCURRENT_STREAMS
    (refused,) = [f for f in client.answered() if isinstance(f, RstStreamFrame)]
    assert refused.stream_id == 1 + 2 * http2.MAX_CONCURRENT_STREAMS
    assert refused.error_code == ErrorCodes.REFUSED_STREAM
    assert client.server.counters.resets["refused"] == 1
    client.server.finished(1)
    again, _ = client.feed(client.headers(1 + 2 * (http2.MAX_CONCURRENT_STREAMS + 1)))
    assert isinstance(again, StreamOpened)  # a stream finished: room for one more


def test_rapid_reset_spends_the_budget_then_goaway_enhance_your_calm() -> None:
    client = RawClient()
    client.answered()
    for i in range(http2.RESET_BUDGET):
        events = client.feed(client.headers(1 + 2 * i) + rst(1 + 2 * i))
        assert isinstance(events[-1], StreamCancelled)
        client.server.finished(1 + 2 * i)
    with pytest.raises(ConnectionFault) as caught:
        client.feed(client.headers(1 + 2 * http2.RESET_BUDGET) + rst(1 + 2 * http2.RESET_BUDGET))
    assert caught.value.reason == "rapid-reset"
    assert goaway(client.answered()).error_code == ErrorCodes.ENHANCE_YOUR_CALM
    assert client.server.counters.resets["client"] == http2.RESET_BUDGET + 1


def test_resets_spread_over_windows_are_within_budget() -> None:
    client = RawClient()
    for i in range(2 * http2.RESET_BUDGET):
        client.now = i * (http2.BUDGET_WINDOW / http2.RESET_BUDGET) * 0.99 * 2
        client.feed(client.headers(1 + 2 * i) + rst(1 + 2 * i))
        client.server.finished(1 + 2 * i)


@pytest.mark.parametrize(
    "frame",
    [
        PingFrame(0, opaque_data=b"12345678"),
        SettingsFrame(0, settings={SettingsFrame.MAX_FRAME_SIZE: 16384}),
        DataFrame(1),  # empty DATA on an open stream
    ],
    ids=["ping", "settings", "empty-data"],
)
def test_control_frame_floods_spend_the_budget(frame: Frame) -> None:
    client = RawClient()
    client.feed(client.headers(1, [(b":method", b"POST"), *GET[1:]], end=False))
    client.answered()
    with pytest.raises(ConnectionFault) as caught:
        client.feed(frame.serialize() * (http2.CONTROL_BUDGET + 1))
    assert caught.value.reason == "control-flood"
    assert goaway(client.answered()).error_code == ErrorCodes.ENHANCE_YOUR_CALM


def test_a_header_block_that_keeps_growing_is_cut_at_the_limit() -> None:
    client = RawClient()
    start = HeadersFrame(1)
    start.data = client.encoder.encode(GET)
    flood = b""
    for _ in range(http2.MAX_HEADER_BLOCK // 16384 + 1):
        more = ContinuationFrame(1)
        more.data = b"\x00" * 16384  # never END_HEADERS
        flood += more.serialize()
    with pytest.raises(ConnectionFault) as caught:
        client.feed(start.serialize() + flood)
    assert caught.value.reason == "header-too-large"


def test_many_small_continuations_close_the_connection() -> None:
    client = RawClient()
    start = HeadersFrame(1)
    start.data = client.encoder.encode(GET)
    more = ContinuationFrame(1)
    more.data = b"\x00"
    with pytest.raises(ConnectionFault) as caught:
        client.feed(start.serialize() + more.serialize() * 100)
    assert caught.value.reason == "header-too-large"


def test_a_header_list_past_the_limit_closes_the_connection() -> None:
    client = RawClient()
    fields = [*GET, (b"x-big", b"v" * (http2.MAX_HEADER_LIST_SIZE + 1))]
    block = client.encoder.encode(fields)
    frames = HeadersFrame(1)
    frames.data = block[:16384]
    data = frames.serialize()
    rest = block[16384:]
    while rest:
        more = ContinuationFrame(1)
        more.data = rest[:16384]
        rest = rest[16384:]
        if not rest:
            more.flags.add("END_HEADERS")
        data += more.serialize()
    with pytest.raises(ConnectionFault) as caught:
        client.feed(data)
    assert caught.value.reason == "header-too-large"


def test_h2_refuses_what_rfc_9113_calls_malformed_as_a_protocol_error() -> None:
    client = RawClient()
    with pytest.raises(ConnectionFault) as caught:
        client.feed(client.headers(1, [*GET, (b"te", b"gzip")]))
    assert caught.value.reason == "protocol-error"
    client = RawClient()
    with pytest.raises(ConnectionFault):
        client.feed(client.headers(1, [*GET, (b"connection", b"close")]))


def test_request_body_window_reopens_only_as_the_body_is_acknowledged() -> None:
    server = ServerConnection(Http2Counters())
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
    client.initiate_connection()
    server.receive(client.data_to_send(), 0.0)
    client.receive_data(server.output())
    server.receive(client.data_to_send(), 0.0)  # the client's SETTINGS ACK
    client.send_headers(1, [(b":method", b"POST"), *GET[1:]])
    window = client.local_flow_control_window(1)
    assert window == min(http2.STREAM_WINDOW, http2.CONNECTION_WINDOW)
    for _ in range(window // 16384):
        client.send_data(1, b"x" * 16384)
    server.receive(client.data_to_send(), 0.0)
    client.receive_data(server.output())
    assert client.local_flow_control_window(1) == 0  # nothing acknowledged: no more may come
    server.acknowledge(1, window)
    client.receive_data(server.output())
    assert client.local_flow_control_window(1) == window


def test_goaway_for_draining_names_the_last_stream_and_answers_go_on() -> None:
    client = RawClient()
    client.feed(client.headers(1) + client.headers(3))
    client.answered()
    frame, _ = Frame.parse_frame_header(memoryview(client.server.goaway()[:9]))
    frame.parse_body(memoryview(client.server.goaway()[9:]))
    assert isinstance(frame, GoAwayFrame) and frame.last_stream_id == 3 and frame.error_code == 0
    client.server.h2.send_headers(1, [(b":status", b"200")], end_stream=True)  # still allowed
    assert client.feed(client.headers(5)) == []  # a new stream after GOAWAY: refused
    assert [f.error_code for f in client.answered() if isinstance(f, RstStreamFrame)] == [ErrorCodes.REFUSED_STREAM]


@pytest.mark.parametrize(("declared", "sent"), [(3, [b"hello"]), (5, [b"hi"]), (4, [b"ab", b"cde"])])
def test_a_body_other_than_its_content_length_resets_the_stream_not_the_connection(
    declared: int, sent: list[bytes]
) -> None:
    client = RawClient()
    client.answered()
    post = [(b":method", b"POST"), *GET[1:], (b"content-length", b"%d" % declared)]
    data = b""
    for i, piece in enumerate(sent):
        frame = DataFrame(1)
        frame.data = piece
        if i == len(sent) - 1:
            frame.flags.add("END_STREAM")
        data += frame.serialize()
    events = client.feed(client.headers(1, post, end=False) + data)
    assert any(isinstance(event, StreamCancelled) for event in events)
    (reset,) = [f for f in client.answered() if isinstance(f, RstStreamFrame)]
    assert reset.error_code == ErrorCodes.PROTOCOL_ERROR
    assert client.server.counters.resets["malformed"] == 1
    client.server.finished(1)
    assert isinstance(client.feed(client.headers(3))[0], StreamOpened)  # the connection goes on


def test_a_body_of_its_content_length_passes() -> None:
    client = RawClient()
    post = [(b":method", b"POST"), *GET[1:], (b"content-length", b"5")]
    frame = DataFrame(1)
    frame.data = b"hello"
    frame.flags.add("END_STREAM")
    events = client.feed(client.headers(1, post, end=False) + frame.serialize())
    assert [type(e) for e in events] == [StreamOpened, BodyReceived, BodyEnded]
