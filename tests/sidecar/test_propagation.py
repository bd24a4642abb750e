"""sidecar.propagation: what a Python app passes on from the request it serves to its calls."""

from __future__ import annotations

import contextvars

import httpx

from sidecar.propagation import add_trace_headers, incoming, outgoing, passed_on


def test_the_trace_and_deadline_headers_are_passed_on_and_nothing_else() -> None:
    def handle() -> dict[str, str]:
        incoming(
            {
                "Traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                "X-B3-Sampled": "1",
                "x-meshlet-deadline-ms": "900",
                "Authorization": "secret",
                "Host": "user",
            }
        )
        return outgoing()

    sent = contextvars.copy_context().run(handle)
    assert sent == {
        "traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        "x-b3-sampled": "1",
        "x-meshlet-deadline-ms": "900",
    }
    assert contextvars.copy_context().run(outgoing) == {}  # another request (thread, task): its own


def test_the_httpx_hook_adds_them_to_every_request() -> None:
    def handle() -> httpx.Request:
        incoming([("b3", "80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-1")])
        request = httpx.Request("GET", "http://item/items/1")
        add_trace_headers(request)
        return request

    request = contextvars.copy_context().run(handle)
    assert request.headers["b3"] == "80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-1"
    assert passed_on("X-B3-ParentSpanId") and not passed_on("x-b3") and not passed_on("cookie")
