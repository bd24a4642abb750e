"""A typed client for the control plane's HTTP API (control_plane/api/), shared by every
`meshlet` command and the demo; and the one call made to a sidecar's admin listener.

Every way a call can fail raises :class:`ApiError`: with the HTTP status and what the answer
said (its JSON ``problems``), or with no status when no answer came (refused, timed out).
What to print is the command's business; nothing here prints.
"""

from __future__ import annotations

import ssl
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

if TYPE_CHECKING:
    # Imported where a client is made: every command module imports this one, and so does
    # `meshlet sidecar` (meshlet/cli/__init__.py builds one parser), which never calls an API.
    import httpx

JSON = dict[str, Any]  # a JSON object, free-form here: each command reads the fields it shows
Trace = list[JSON]  # Zipkin v2 spans of one trace

READ_TIMEOUT = 5.0  # seconds: a read of state the control plane holds in memory
QUERY_TIMEOUT = 10.0  # explain and a trace by id compute their answer
WRITE_TIMEOUT = 30.0  # an apply validates, runs the route tests and writes the store before answering


class ApiError(Exception):
    """A call that failed. ``status``: the HTTP status of the answer, or None when none came
    (could not connect, timed out); ``problems``: what the answer said (its JSON "problems",
    else its text), or why no answer came."""

    def __init__(self, status: int | None, problems: list[str]) -> None:
        super().__init__(status, problems)
        self.status = status
        self.problems = problems

    def __str__(self) -> str:
        said = "; ".join(self.problems)
        return said if self.status is None else f"answered {self.status}: {said}"


def api_url(api: str) -> str:
    """``HOST:PORT`` (http), or an ``http://`` or ``https://`` URL, as the client's base URL."""
    return api.rstrip("/") if api.startswith(("http://", "https://")) else f"http://{api}"


def api_trust(ca: Path | None) -> ssl.SSLContext | bool:
    """What an https API's certificate is verified with: httpx's default CAs, or the system's
    and ``ca``'s (--api-ca). OSError or ssl.SSLError if the file cannot be read."""
    if ca is None:
        return True
    context = ssl.create_default_context()
    context.load_verify_locations(cafile=ca)
    return context


class ApiClient:
    """The control plane's API at ``api`` (HOST:PORT, or an http:// or https:// URL).
    ``token``: sent as ``Authorization: Bearer`` with every call: the write token lets it
    apply and roll back and shows the policy unredacted, a read token lets it read when the
    control plane asks for one; None sends none (the control plane's 401 says where to find
    it). ``ca``: a PEM file trusted for an https API. Use as a context manager, or
    :meth:`close` it."""

    def __init__(
        self,
        api: str,
        token: str | None = None,
        *,
        ca: Path | None = None,
        timeout: float = READ_TIMEOUT,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.api = api
        self._url = api_url(api)
        self._token = token
        self._timeout = timeout
        self._ca = ca
        headers = {"authorization": f"Bearer {token}"} if token else {}
        import httpx

        self._http = httpx.Client(base_url=self._url, transport=transport, verify=api_trust(ca), headers=headers)

    def __enter__(self) -> ApiClient:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def __repr__(self) -> str:
        return f"<ApiClient {self._url}{' (with token)' if self._token else ''}>"

    # registry and sidecars ---------------------------------------------------------------

    def services(self) -> list[JSON]:
        """Each service: name, instances, ready, version."""
        services: list[JSON] = self._json("GET", "/v1/services")["services"]
        return services

    def endpoints(self, service: str | None = None) -> dict[str, list[JSON]]:
        """Service → its instances, ready or not (one service, or all)."""
        params = {"service": service} if service else None
        endpoints: dict[str, list[JSON]] = self._json("GET", "/v1/endpoints", params=params)["endpoints"]
        return endpoints

    def status(self) -> JSON:
        """``sidecars`` (each one's versions, ACKs, last NACK), ``registry`` counts, push totals;
        with replicas, ``cluster``: the replicas, the leader, etcd's members."""
        return self._json("GET", "/v1/status")

    def sibling(self, api: str) -> ApiClient:
        """A client for another replica's API (HOST:PORT from its card), with this one's scheme,
        token and trust."""
        scheme = self._url.split("://", 1)[0]
        return ApiClient(f"{scheme}://{api}", self._token, ca=self._ca, timeout=self._timeout)

    def ca(self) -> JSON:
        """The certificate authority: ``trust_domain``, ``root`` and the ``bundle``'s roots (each
        ``fingerprint_sha256``, ``subject``, ``not_before``, ``not_after``), the control plane's
        clock (``now``), and a rotation's state (``current``, ``next``, ``retired``,
        ``bundle_roots``, ``certificate_lifetime``, ``operator_root``)."""
        return self._json("GET", "/v1/ca")

    # policy ------------------------------------------------------------------------------

    def policies(self) -> JSON:
        """The running policy: ``version``, ``push_version`` (what sidecars ACK), ``documents``."""
        return self._json("GET", "/v1/policies")

    def history(self) -> list[JSON]:
        """Every policy version kept, newest first."""
        history: list[JSON] = self._json("GET", "/v1/policies/history")["history"]
        return history

    def apply(self, files: Sequence[tuple[str, str]], *, source: str, dry_run: bool = False) -> JSON:
        """Make ``files`` (name, text) the whole policy, or with ``dry_run`` only say what would
        change. The result: ``version``, ``previous``, ``changes``, ``applied``."""
        body = {"files": [list(f) for f in files], "dry_run": dry_run, "source": source}
        return self._json("PUT", "/v1/policies", json=body, timeout=WRITE_TIMEOUT)

    def rollback(self, version: str) -> JSON:
        """Apply an earlier version (or a prefix of one, 4+ characters) again; as :meth:`apply`."""
        body = {"version": version}
        return self._json("POST", "/v1/policies/rollback", json=body, timeout=WRITE_TIMEOUT)

    def create_join_token(self, *, service: str | None, ttl: float) -> JSON:
        """Mint a join token: ``token`` (its only copy), ``id``, ``service``, ``expires``."""
        body = {"service": service, "ttl": ttl}
        return self._json("POST", "/v1/tokens", json=body, timeout=WRITE_TIMEOUT)

    def rotate_ca(self, *, overlap: float | None, propagation: float) -> JSON:
        """Start a root rotation; the CA's status after it. ``overlap`` None: the control plane's default."""
        body = {"overlap": overlap, "propagation": propagation}
        return self._json("POST", "/v1/ca/rotate", json=body, timeout=WRITE_TIMEOUT)

    def explain(self, url: str, *, method: str = "GET", headers: Sequence[str] = (), source: str | None = None) -> JSON:
        """What the mesh would do with a request; ``headers``: NAME:VALUE each. A 400 says
        what is wrong with the question."""
        params = [("url", url), ("method", method), *(("header", h) for h in headers)]
        if source:
            params.append(("from", source))
        return self._json("GET", "/v1/explain", params=params, timeout=QUERY_TIMEOUT)

    # telemetry ---------------------------------------------------------------------------

    def stat(self, by: str, window: float) -> JSON:
        """Golden metrics per ``by`` (service, edge, route, caller) over ``window`` seconds;
        ``warming_up`` until the control plane has scraped every sidecar twice."""
        return self._json("GET", "/v1/stat", params={"by": by, "window": f"{window:g}"})

    def trace(self, trace_id: str) -> Trace | None:
        """One trace's spans; None if the store has no such trace."""
        try:
            trace: Trace = self._json("GET", f"/api/v2/trace/{quote(trace_id, safe='')}", timeout=QUERY_TIMEOUT)
        except ApiError as exc:
            if exc.status == 404:
                return None
            raise
        return trace

    def traces(self, *, limit: int, service: str | None = None) -> list[Trace]:
        """The most recent traces (through ``service``), newest first."""
        params: dict[str, str | int] = {"limit": limit}
        if service:
            params["serviceName"] = service
        traces: list[Trace] = self._json("GET", "/api/v2/traces", params=params)
        return traces

    # ---------------------------------------------------------------------------------------

    def _json(self, method: str, path: str, *, timeout: float | None = None, **kwargs: Any) -> Any:
        return _answer(lambda: self._http.request(method, path, timeout=timeout or self._timeout, **kwargs))


class AdminClient:
    """A sidecar's admin listener at ``admin`` (HOST:PORT): what it recorded about the
    requests it made (sidecar/layers/explain.py)."""

    def __init__(self, admin: str, *, transport: httpx.BaseTransport | None = None) -> None:
        self.admin = admin
        import httpx

        self._http = httpx.Client(base_url=f"http://{admin}", timeout=QUERY_TIMEOUT, transport=transport)

    def __enter__(self) -> AdminClient:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self._http.close()

    def explained(self, request_id: str) -> JSON:
        """One request's explanation; ApiError 404 once the sidecar no longer keeps it."""
        explained: JSON = _answer(lambda: self._http.get("/explain", params={"request_id": request_id}))
        return explained

    def recent(self) -> list[JSON]:
        """The requests explained most recently: request_id, at, service, result."""
        recent: list[JSON] = _answer(lambda: self._http.get("/explain"))
        return recent


def _answer(send: Callable[[], httpx.Response]) -> Any:
    """The JSON document ``send()`` got back, or ApiError: no answer, an error status, or an
    answer that is not JSON (something else listens at that address)."""
    import httpx

    try:
        response = send()
    except httpx.HTTPError as exc:
        raise ApiError(None, [str(exc)]) from exc
    if not response.is_success:
        raise ApiError(response.status_code, problems(response))
    try:
        return response.json()
    except ValueError:
        raise ApiError(response.status_code, [f"not a JSON answer: {_text(response)}"]) from None


def problems(response: httpx.Response) -> list[str]:
    """What an error answer says: the control plane's JSON "problems" (a sidecar's admin
    listener says "error"), else its text."""
    try:
        body = response.json()
        said = body.get("problems") or body.get("error")
    except (ValueError, AttributeError):
        said = None
    if isinstance(said, list) and said:
        return [str(p) for p in said]
    if isinstance(said, str) and said:
        return [said]
    return [_text(response)]


def _text(response: httpx.Response) -> str:
    return response.text.strip()[:500] or response.reason_phrase


__all__ = ["JSON", "AdminClient", "ApiClient", "ApiError", "Trace"]
