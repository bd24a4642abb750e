"""Run the public HTTP/1.1 conformance suites against a sidecar's listeners, HAProxy beside.

    python benchmarks/conformance/run.py --suites DIR [--only llhttp,http-garden,...]

What runs (all on 127.0.0.1, port 0):

* three *recording origins* (raw sockets, h11 as an independent parser): each records
  exactly the bytes its upstream connections received and the requests h11 read from
  them; it closes a keep-alive connection idle for ``--origin-keepalive`` seconds (as app
  servers do, so the proxies' pooled connections go stale) and answers every request with
  200, an ``X-Origin-Marker`` header and a body ``It Works marker=<origin>-<n>`` (HEAD: the
  header alone), so each response is matched to the request it answers;
* one sidecar in static mode: its inbound listener's app is origin ``inbound``; its
  outbound listener routes the services ``localhost``, ``a``, ``whatever`` and ``fanout``
  (the Host values the suites send) to origin ``outbound`` (a Host naming none of them is
  sent as ``localhost``, to that listener only);
* HAProxy (Debian's), ``mode http``, in front of origin ``haproxy``.

Each vector is sent on its own connection to all three listeners at once and read until
the listener closes or stays silent for ``--idle`` seconds. Then it is classified from
the client's and the origin's side:

* ``rejected``: nothing reached the origin (the client saw a status, or a close);
* ``accepted``: the origin read whole requests (``accepted×2``: two of them);
* ``streamed``: a head reached the origin but not a whole body (the listener began
  streaming, then gave up on the body);
* ``origin-400``: the origin's own parser refused what the listener forwarded;
* ``DESYNC``: the origin finished more requests than the client received origin answers
  for: a request the proxy never answered, i.e. smuggling or a response left for the
  next caller.

The suites' own expectations decide pass or fail where they have them: llhttp fixtures
(valid / invalid, how many messages), Http11Probe's expected status, HTTPWookiee's
Critical/Warning levels, smuggler's detection. The http-garden payloads are known parser
bugs; a payload fails when it desynchronises or the origin refuses what was forwarded.
The results go to benchmarks/conformance/RESULTS.md (``--out``).

The suites are third-party code and are not in this repository. Get them with:

    mkdir -p DIR && cd DIR
    git clone https://github.com/regilero/HTTPWookiee
    git clone https://github.com/defparam/smuggler
    git clone https://github.com/narfindustries/http-garden
    git clone https://github.com/nodejs/llhttp
    git clone https://github.com/MDA2AV/Http11Probe
    python3 -m venv .venv && .venv/bin/pip install colorama termcolor six   # smuggler, HTTPWookiee

``--tool-python`` (default DIR/.venv/bin/python) runs HTTPWookiee and smuggler.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import h11  # noqa: TID251 (the origin, not the data path: an independent parser)

from meshlet import processes

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
LISTENERS = ("inbound", "outbound", "haproxy")
SERVICES = ("localhost", "a", "whatever", "fanout")  # the Host values the suites use, as outbound services
HEALTH_PATH = "/__conformance_health"
SUITE_REPOS = {
    "llhttp": "nodejs/llhttp",
    "http-garden": "narfindustries/http-garden",
    "http11probe": "MDA2AV/Http11Probe",
    "httpwookiee": "regilero/HTTPWookiee",
    "smuggler": "defparam/smuggler",
}
SUITE_DIRS = {
    "llhttp": "llhttp",
    "http-garden": "http-garden",
    "http11probe": "Http11Probe",
    "httpwookiee": "HTTPWookiee",
    "smuggler": "smuggler",
}

HAPROXY_CONF = """\
global
    nbthread 1
    maxconn 4096
defaults
    mode http
    option http-keep-alive
    timeout connect 5s
    timeout client 10s
    timeout server 10s
    timeout http-request 5s
frontend conformance
    bind 127.0.0.1:{port}
    default_backend origin
backend origin
    server origin 127.0.0.1:{origin_port}
"""


# ---------------------------------------------------------------------------- the recording origin


@dataclass
class SeenRequest:
    method: str
    target: str
    headers: list[tuple[str, str]]
    body: bytes = b""
    complete: bool = False


@dataclass
class Seen:
    """What one origin received while one vector was current."""

    raw: bytearray = field(default_factory=bytearray)
    requests: list[SeenRequest] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    connections: set[int] = field(default_factory=set)


class RecordingOrigin:
    """Raw sockets; h11 reads the requests. Everything received is filed under the vector
    that is current when it arrives (vectors run one at a time per origin)."""

    def __init__(self, name: str, keepalive: float) -> None:
        self.name = name
        self.keepalive = keepalive  # an idle keep-alive connection is closed after this, as app servers do
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.current = "-"
        self.seen: dict[str, Seen] = {}
        self.answered = 0
        self.lock = threading.Lock()
        self.connections = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _now(self) -> Seen:
        return self.seen.setdefault(self.current, Seen())

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self.listener.accept()
            except OSError:
                return
            with self.lock:
                self.connections += 1
                number = self.connections
            threading.Thread(target=self._serve, args=(sock, number), daemon=True).start()

    def _serve(self, sock: socket.socket, number: int) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=1 << 20)
        request: SeenRequest | None = None
        try:
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    idle = conn.their_state is h11.IDLE and not conn.trailing_data[0]
                    sock.settimeout(self.keepalive if idle else None)
                    data = sock.recv(65536)
                    with self.lock:
                        seen = self._now()
                        seen.raw += data
                        seen.connections.add(number)
                    conn.receive_data(data)
                    if not data:
                        return
                elif isinstance(event, h11.Request):
                    request = SeenRequest(
                        event.method.decode("latin-1"),
                        event.target.decode("latin-1"),
                        [(n.decode("latin-1"), v.decode("latin-1")) for n, v in event.headers],
                    )
                    if request.target != HEALTH_PATH:
                        with self.lock:
                            self._now().requests.append(request)
                elif isinstance(event, h11.Data) and request is not None:
                    request.body += event.data
                elif isinstance(event, h11.EndOfMessage) and request is not None:
                    request.complete = True
                    with self.lock:
                        self.answered += 1
                        marker = f"{self.name}-{self.answered}"
                    body = b"" if request.method == "HEAD" else f"It Works marker={marker}\n".encode()
                    head = [("x-origin-marker", marker), ("content-length", str(len(body)))]
                    out = conn.send(h11.Response(status_code=200, headers=head))
                    sock.sendall(out + conn.send(h11.Data(data=body)) + conn.send(h11.EndOfMessage()))
                    if conn.our_state is h11.MUST_CLOSE:
                        return
                    conn.start_next_cycle()
                    request = None
                else:  # ConnectionClosed, PAUSED after a protocol switch we never grant
                    return
        except h11.RemoteProtocolError as error:
            with self.lock:
                self._now().errors.append(str(error))
            with contextlib.suppress(OSError):
                sock.sendall(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
        except (OSError, h11.LocalProtocolError):  # the keep-alive timeout too
            pass
        finally:
            sock.close()


# ---------------------------------------------------------------------------- the proxies


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def run_sidecar(workdir: Path, app_port: int, service_port: int) -> Iterator[dict[str, int]]:
    static = workdir / "static.yaml"
    services = ", ".join(f'{name}: ["127.0.0.1:{service_port}"]' for name in SERVICES)
    static.write_text(f"services: {{{services}}}\n")
    argv = processes.meshlet_command(
        "sidecar",
        "--service",
        "conformance",
        "--app",
        f"127.0.0.1:{app_port}",
        "--static",
        str(static),
        "--health-path",
        HEALTH_PATH,
        "--inbound",
        "127.0.0.1:0",
        "--outbound",
        "127.0.0.1:0",
        "--admin",
        "127.0.0.1:0",
    )
    log = workdir / "sidecar.log"
    with processes.started(
        "sidecar", argv, log, ready="meshlet sidecar ready", cwd=REPO, check_traceback=False
    ) as child:
        assert child.ready is not None
        yield child.ready.ports


@contextlib.contextmanager
def run_haproxy(workdir: Path, origin_port: int) -> Iterator[int]:
    if shutil.which("haproxy") is None:
        raise SystemExit("haproxy is not installed (Debian: apt-get install -y haproxy)")
    port = free_port()
    conf = workdir / "haproxy.cfg"
    conf.write_text(HAPROXY_CONF.format(port=port, origin_port=origin_port))
    log = workdir / "haproxy.log"
    with processes.started(
        "haproxy", ["haproxy", "-db", "-f", str(conf)], log, cwd=REPO, check_traceback=False
    ) as child:
        processes.wait_for_port(child, port)
        yield port


# ---------------------------------------------------------------------------- one vector


@dataclass(frozen=True)
class Vector:
    suite: str
    id: str
    data: bytes
    expect: str  # "valid" | "invalid" | "lenient" | "status:<allowed>" | "bug"
    messages: int = 1  # llhttp: messages the parser completes (before an error, if invalid)
    note: str = ""


@dataclass
class Outcome:
    statuses: list[int]
    closed: bool
    answers: int  # origin answers the client received
    heads: int  # request heads the origin read
    complete: int  # whole requests the origin read
    origin_errors: list[str]
    forwarded: bytes

    @property
    def kind(self) -> str:
        if self.complete > self.answers:
            return "DESYNC"
        if self.origin_errors:
            return "origin-400"
        if self.heads == 0:
            return "rejected"
        if self.complete < self.heads:
            return "streamed"
        return "accepted" if self.complete == 1 else f"accepted×{self.complete}"

    def summary(self) -> str:
        client = ",".join(map(str, self.statuses)) or "no response"
        if self.closed:
            client += " +close"
        origin = f"origin {self.complete}/{self.heads}"
        if self.origin_errors:
            origin += f" ({self.origin_errors[0][:40]})"
        return f"{self.kind}: {client}; {origin}"


STATUS_LINE = re.compile(rb"(?:^|\n)HTTP/1\.[01] (\d{3})")
MARKER = re.compile(rb"(?im)^x-origin-marker:")


def exchange(port: int, data: bytes, idle: float, total: float) -> tuple[bytes, bool]:
    """Send ``data`` on a new connection; read until close, or ``idle`` s of silence."""
    received = bytearray()
    closed = False
    with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
        with contextlib.suppress(OSError):
            sock.sendall(data)
        deadline = time.monotonic() + total
        sock.settimeout(idle)
        while time.monotonic() < deadline:
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                break
            except OSError:
                closed = True
                break
            if not chunk:
                closed = True
                break
            received += chunk
    return bytes(received), closed


HOST_FIELD = re.compile(rb"(?im)^(host[ \t]*:[ \t]*)([^\r\n]*)")


# A well-formed host[:port]: only such a Host is rewritten, so a malformed one (a path,
# userinfo, a list, spaces) reaches the outbound listener as the suite wrote it.
AUTHORITY = re.compile(rb"(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9\-._~!$&'()*+;=%]+)(?::[0-9]*)?")


def routable(data: bytes) -> bytes:
    """For the outbound listener, which routes by Host: a well-formed Host value that names
    no service (``example.com``) becomes ``localhost``; an empty, malformed or
    service-naming one stays."""

    def replace(match: re.Match[bytes]) -> bytes:
        value = match.group(2).strip()
        service = value.rpartition(b":")[0] if b":" in value else value
        if not AUTHORITY.fullmatch(value) or service.lower().decode("latin-1") in SERVICES:
            return match.group(0)
        return match.group(1) + b"localhost"

    return HOST_FIELD.sub(replace, data)


def run_vector(vector: Vector, port: int, origin: RecordingOrigin, idle: float, total: float) -> Outcome:
    key = f"{vector.suite}/{vector.id}#{id(vector)}"  # some suites repeat a title
    with origin.lock:
        origin.current = key
    data = routable(vector.data) if origin.name == "outbound" else vector.data
    received, closed = exchange(port, data, idle, total)
    time.sleep(0.05)  # what the proxy still forwards after our close lands here too
    with origin.lock:
        seen = origin.seen.get(key, Seen())
        origin.current = "-"
    return Outcome(
        statuses=[int(s) for s in STATUS_LINE.findall(received)],
        closed=closed,
        answers=len(MARKER.findall(received)),
        heads=len(seen.requests),
        complete=sum(r.complete for r in seen.requests),
        origin_errors=list(seen.errors),
        forwarded=bytes(seen.raw),
    )


# What a proxy answers itself; an expectation without one of these is about the origin.
PROXY_STATUSES = {"close", "4xx", "400", "408", "411", "413", "414", "431", "501", "505"}


def verdict(vector: Vector, outcome: Outcome) -> tuple[str, str]:
    """(severity, why): severity "" passes; "critical", "warning" fail; "note" is a
    strictness difference worth listing."""
    kind = outcome.kind
    if kind == "DESYNC":
        return "critical", "the origin served a request the client got no answer for"
    if kind == "origin-400":
        return "warning", "forwarded bytes the origin's parser refused"
    if kind == "rejected" and outcome.statuses[:1] in ([502], [503], [504]):
        return "warning", "an upstream error though the origin is healthy: the request was lost"
    if vector.expect == "valid":
        if outcome.complete == vector.messages and outcome.answers == vector.messages:
            return "", ""
        if kind == "streamed" and outcome.complete < vector.messages:
            return "warning", "a valid body never reached the origin (it waits for it)"
        return "note", f"valid ({vector.messages} message(s)) but {kind}"
    if vector.expect in ("invalid", "lenient"):
        if outcome.complete > vector.messages:
            if vector.expect == "lenient":
                return "note", "accepted what llhttp accepts only in a lenient mode"
            return "warning", "accepted-invalid"
        if kind == "streamed":
            return "note", "streamed the head, then refused the body"
        return "", ""
    if vector.expect.startswith("status:"):
        allowed = vector.expect[len("status:") :].split("|")
        first = next((s for s in outcome.statuses if s >= 200), None)  # past a 100 Continue
        ok = any(
            (a == "close" and outcome.closed and first is None)
            or (a.endswith("xx") and first is not None and str(first)[0] == a[0])
            or (a.isdigit() and first == int(a))
            for a in allowed
        )
        if ok:
            return "", ""
        if kind == "accepted" and not PROXY_STATUSES.intersection(allowed):
            return "n/a", "the expected status is the origin server's to give (a 405, a 101...)"
        scored = "unscored" not in vector.note
        if kind.startswith("accepted") and all(a != "2xx" for a in allowed):
            return ("warning" if scored else "note"), f"expected {'/'.join(allowed)}, accepted"
        return "note", f"expected {'/'.join(allowed)}"
    return "", ""  # "bug": a known parser bug; only DESYNC and origin-400 fail it


# ---------------------------------------------------------------------------- suites as vectors


def unescape(text: str) -> bytes:
    return text.encode("latin-1", "backslashreplace").decode("unicode_escape").encode("latin-1")


def add_host(data: bytes) -> bytes:
    """llhttp's fixtures test the parser, most without Host; a proxy rightly refuses those,
    so every request head that has none gets ``Host: localhost`` after its request line."""
    out, pos = bytearray(), 0
    for line in re.finditer(rb"(?m)^[A-Z]+ \S+ HTTP/\d\.\d\r\n", data):
        end = data.find(b"\r\n\r\n", line.end() - 2)
        head = data[line.start() : end if end != -1 else len(data)]
        out += data[pos : line.end()]
        if not re.search(rb"(?im)^host[ \t]*:", head):
            out += b"Host: localhost\r\n"
        pos = line.end()
    return bytes(out + data[pos:])


def llhttp_vectors(root: Path) -> list[Vector]:
    """llhttp's request fixtures, turned into bytes as its test/md-test.ts does."""
    vectors = []
    for md in sorted((root / "test" / "request").glob("*.md")):
        for title, meta, raw, log in _fixtures(md.read_text()):
            meta = json.loads(meta)
            kind = meta.get("type", "request")
            if meta.get("skipBody"):
                continue  # the test application tells llhttp to skip the body: not on the wire
            raw = raw.removesuffix("\n")
            raw = re.sub(r"\\(\r\n|\r|\n)", "", raw)
            raw = re.sub(r"\r\n|\r|\n", "\r\n", raw)
            raw = raw.replace("\\r", "\r").replace("\\n", "\n").replace("\\t", "\t").replace("\\f", "\f")
            raw = re.sub(r"\\x([0-9a-fA-F]+)", lambda m: chr(int(m.group(1), 16)), raw)
            raw = re.sub(r"\\([0-7]{1,3})", lambda m: chr(int(m.group(1), 8)), raw)
            if "${" in raw:
                continue  # inline JavaScript: not evaluated here
            # llhttp pauses at an upgrade (code 22): a valid request, not an error
            invalid = " error code=" in log and " error code=22 " not in log
            if invalid:
                log = log[: log.find(" error code=")]
            expect = "invalid" if invalid else "valid"
            if kind.startswith("request-lenient"):
                expect = "lenient"
            elif kind != "request":
                continue  # "request-finish": what the parser does at EOF, not a request
            data = add_host(raw.encode("utf-8"))  # as md-test.ts's Buffer.from(input)
            vectors.append(Vector("llhttp", f"{md.stem}: {title}", data, expect, log.count("message complete")))
    return vectors


def _fixtures(text: str) -> Iterator[tuple[str, str, str, str]]:
    """(title, meta, http block, log block) of each fixture of an llhttp markdown file."""
    title = ""
    blocks = re.split(r"(^#+ [^\n]*$|^<!-- meta=[^\n]*-->$|^```\w*\n.*?^```$)", text, flags=re.M | re.S)
    pending: list[str] = []
    for block in blocks:
        if block.startswith("#"):
            title, pending = block.lstrip("# ").strip(), []
        elif block.startswith("<!-- meta="):
            pending = [block[len("<!-- meta=") : -len("-->")].strip()]
        elif block.startswith("```") and pending:
            pending.append(block[block.index("\n") + 1 : -3])
            if len(pending) == 3:
                yield title, pending[0], pending[1], pending[2]
                pending = []


def garden_vectors(root: Path) -> list[Vector]:
    vectors = []
    section = "bug"
    number = 0
    for line in (root / "TROPHIES.md").read_text().splitlines():
        if line.startswith("### "):
            section = line[4:].split()[0].lower()  # "server" | "transducer" | ...
        elif m := re.match(r"(\d+)\. ", line):
            number = int(m.group(1))
        elif m := re.match(r"\s+- Payload: `(.*)`\s*$", line):
            try:
                data = unescape(m.group(1))
            except (UnicodeDecodeError, ValueError):
                continue
            vectors.append(Vector("http-garden", f"{section} bug {number}", data, "bug"))
    return vectors


def probe_vectors(root: Path) -> list[Vector]:
    vectors = []
    for md in sorted((root / "docs" / "content" / "docs").rglob("*.md")):
        text = md.read_text()
        test_id = re.search(r"\*\*Test ID\*\* \| `([^`]+)`", text)
        expected = re.search(r"\*\*Expected\*\* \| (.+?) \|", text)
        block = re.search(r"## What it sends.*?```http\n(.*?)```", text, re.S)
        if not (test_id and expected and block):
            continue
        if "SEQ" in test_id.group(1) or "..." in block.group(1):
            continue  # multi-step sequences and elided payloads are not raw vectors
        requirement = re.search(r"\*\*Requirement\*\* \| (.+?) \|", text)
        allowed = []
        for token in re.findall(r"`([^`]+)`|(close)", expected.group(1)):
            word = (token[0] or token[1]).strip().lower()
            if re.fullmatch(r"\d{3}|\dxx|close", word):
                allowed.append(word)
        if not allowed:
            continue
        raw = "".join(line for line in block.group(1).split("\n"))
        try:
            data = unescape(raw)
        except (UnicodeDecodeError, ValueError):
            continue
        note = (requirement.group(1).strip().lower() if requirement else "") + f" ({md.parent.name})"
        vectors.append(Vector("http11probe", test_id.group(1), data, "status:" + "|".join(allowed), note=note))
    return vectors


VECTOR_SUITES: dict[str, Callable[[Path], list[Vector]]] = {
    "llhttp": llhttp_vectors,
    "http-garden": garden_vectors,
    "http11probe": probe_vectors,
}


# ---------------------------------------------------------------------------- the suites' own tools


WOOKIEE_CONF = """\
[main]
DEBUG: false
SERVER_HOST: localhost
SERVER_IP: 127.0.0.1
SERVER_PORT: {port}
SERVER_SSL: false
OUTPUT_MAX_MSG_SIZE: 400
SERVER_DEFAULT_LOCATION: /
SERVER_DEFAULT_LOCATION_CONTENT: It Works
CLIENT_SOCKET_READ_TIMEOUT_MS: 600
BACKEND_PORT: {backend_port}
BACKEND_LOCATION: /
I_HAVE_READ_AND_UNDERSTAND_THE_FAQ_AND_I_AM_RESPONSIBLE_OF_MY_ACTS: true
"""


def run_wookiee(root: Path, python: str, port: int, workdir: Path, label: str) -> dict[str, object]:
    """HTTPWookiee's client tests against one listener; its own levels (Critical, Warning,
    Minor) from its summary."""
    conf = workdir / f"wookiee-{label}.ini"
    conf.write_text(WOOKIEE_CONF.format(port=port, backend_port=free_port()))  # its idle server thread
    env = {**os.environ, "HTTPWOOKIEE_CONF": str(conf), "PYTHONPATH": str(root)}
    result = subprocess.run(
        [python, "httpwookiee.py", "-m", "client", "-n", "-V"],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    output = result.stdout + result.stderr
    (workdir / f"wookiee-{label}.out").write_text(output)
    failures = []  # (test number, gravity, test name), from its closing "FAIL gravity: X" blocks
    gravity = ""
    for line in output.splitlines():
        if line.startswith(("FAIL", "ERROR")):
            gravity = line.partition("gravity: ")[2].strip() or line.rstrip(":")
        elif m := re.match(r" \[test_(\d{4})_(\w+)\] \((.+?)\)", line):
            if gravity:
                failures.append((m.group(1), gravity, f"{m.group(1)} {m.group(2)} ({m.group(3).rpartition('.')[2]})"))
            gravity = ""
    tests = len(re.findall(r"\[(?:ok|FAIL|ERROR)\]$", output, re.M))
    return {"tests": tests, "failures": failures, "levels": Counter(level for _, level, _ in failures)}


def run_smuggler(root: Path, python: str, port: int, workdir: Path, label: str) -> dict[str, tuple[int, list[str]]]:
    """smuggler with its three configs against one listener: per config, the mutations it
    completed and every verdict but OK (its "Potential ... Issue Found", errors)."""
    found: dict[str, tuple[int, list[str]]] = {}
    for config in ("default", "exhaustive", "doubles"):
        log = workdir / f"smuggler-{label}-{config}.log"
        result = subprocess.run(
            [python, "smuggler.py", "-u", f"http://localhost:{port}/", "-c", f"{config}.py"]
            + ["--no-color", "-t", "2", "-l", str(log)],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=1800,
        )
        output = result.stdout + result.stderr
        (workdir / f"smuggler-{label}-{config}.out").write_text(output)
        verdicts = re.findall(r"^\[([^\]]+)\]\s*: (?!Checking)(.*)$", output, re.M)
        others = [f"{name}: {text.strip()}" for name, text in verdicts if not text.startswith("OK")]
        others += [line.strip() for line in output.splitlines() if "Error" in line]
        found[config] = (len(verdicts), others)
    return found


# ---------------------------------------------------------------------------- report


def escape(data: bytes, limit: int = 200) -> str:
    text = repr(data[:limit])[2:-1]
    if len(data) > limit:
        text += f"…(+{len(data) - limit} B)"
    return text.replace("|", "\\|").replace("`", "'")


def vector_report(suite: str, rows: list[tuple[Vector, dict[str, Outcome]]]) -> list[str]:
    lines = [f"### {suite}", ""]
    counts = {name: Counter() for name in LISTENERS}
    failing = []
    for vector, outcomes in rows:
        severities = {}
        for name in LISTENERS:
            severity, why = verdict(vector, outcomes[name])
            severities[name] = (severity, why)
            counts[name][severity or "pass"] += 1
            counts[name]["kind:" + outcomes[name].kind.split("×")[0]] += 1
        if any(severities[name][0] not in ("", "n/a") for name in ("inbound", "outbound")):
            failing.append((vector, outcomes, severities))
    lines.append(f"{len(rows)} vectors.")
    lines.append("")
    lines.append(
        "| listener | pass | critical | warning | note | rejected | accepted | streamed | origin-400 | DESYNC |"
    )
    lines.append("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name in LISTENERS:
        c = counts[name]
        lines.append(
            f"| {name} | {c['pass']} | {c['critical']} | {c['warning']} | {c['note']} | {c['n/a']} | {c['kind:rejected']} | "
            f"{c['kind:accepted']} | {c['kind:streamed']} | {c['kind:origin-400']} | {c['kind:DESYNC']} |"
        )
    lines.append("")
    if not failing:
        return lines
    lines.append("Not passing on a sidecar listener (severity: critical, warning, note), HAProxy beside:")
    lines.append("")
    lines.append("| vector | expect | inbound | outbound | HAProxy | bytes sent |")
    lines.append("| --- | --- | --- | --- | --- | --- |")
    order = {"critical": 0, "warning": 1, "note": 2, "n/a": 3, "": 3}
    failing.sort(key=lambda f: min(order[f[2][n][0]] for n in ("inbound", "outbound")))
    for vector, outcomes, severities in failing:
        cells = []
        for name in LISTENERS:
            severity, why = severities[name]
            cell = outcomes[name].summary()
            if severity:
                cell = f"**{severity}**: {cell} — {why}"
            cells.append(cell.replace("|", "\\|"))
        expect = vector.expect + (f" ({vector.messages})" if vector.expect in ("valid", "invalid") else "")
        lines.append(f"| {vector.id} | {expect} | {' | '.join(cells)} | `{escape(vector.data)}` |")
    lines.append("")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--suites", default=os.environ.get("CONFORMANCE_SUITES"), help="where the suites are cloned")
    parser.add_argument("--only", default="", help="comma-separated: " + ",".join(SUITE_REPOS))
    parser.add_argument("--tool-python", help="python for HTTPWookiee and smuggler (default SUITES/.venv/bin/python)")
    parser.add_argument("--idle", type=float, default=0.6, help="seconds of silence that end a vector's exchange")
    parser.add_argument("--total", type=float, default=4.0, help="seconds one vector may take at most")
    parser.add_argument(
        "--origin-keepalive",
        type=float,
        default=0.3,
        help="the origins close a keep-alive connection idle this long (default 0.3 s): the proxies' pools go stale",
    )
    parser.add_argument("--out", default=str(HERE / "RESULTS.md"))
    parser.add_argument("--workdir", help="keep logs and the tools' output here (default: a temp dir, removed)")
    args = parser.parse_args()
    if not args.suites:
        print(__doc__.split("The suites are third-party")[1], file=sys.stderr)
        return 2
    suites_dir = Path(args.suites)
    chosen = [s for s in (args.only.split(",") if args.only else SUITE_REPOS) if s]
    missing = [s for s in chosen if not (suites_dir / SUITE_DIRS[s]).is_dir()]
    if missing:
        for s in missing:
            print(
                f"missing: git clone https://github.com/{SUITE_REPOS[s]} {suites_dir / SUITE_DIRS[s]}", file=sys.stderr
            )
        return 2
    tool_python = args.tool_python or str(suites_dir / ".venv" / "bin" / "python")

    origins = {name: RecordingOrigin(name, args.origin_keepalive) for name in LISTENERS}
    report = ["# HTTP/1.1 conformance: the sidecar's listeners against the public suites", ""]
    started_at = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    with contextlib.ExitStack() as stack:
        if args.workdir:
            workdir = Path(args.workdir)
            workdir.mkdir(parents=True, exist_ok=True)
        else:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="conformance-")))
        sidecar = stack.enter_context(run_sidecar(workdir, origins["inbound"].port, origins["outbound"].port))
        haproxy = stack.enter_context(run_haproxy(workdir, origins["haproxy"].port))
        ports = {"inbound": sidecar["inbound"], "outbound": sidecar["outbound"], "haproxy": haproxy}
        haproxy_version = subprocess.run(["haproxy", "-v"], capture_output=True, text=True).stdout.split("\n")[0]
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
        report += [
            f"Run {started_at} on commit {commit.stdout.strip()} by `make conformance` "
            f"(benchmarks/conformance/run.py). {haproxy_version}. How to read it, and the findings: README.md.",
            "",
        ]
        for suite in chosen:
            root = suites_dir / SUITE_DIRS[suite]
            suite_commit = subprocess.run(
                ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True
            )
            print(f"{suite} ({suite_commit.stdout.strip()}) ...", file=sys.stderr, flush=True)
            header = f"## {suite} ({SUITE_REPOS[suite]} @ {suite_commit.stdout.strip()})"
            if suite in VECTOR_SUITES:
                vectors = VECTOR_SUITES[suite](root)
                rows = run_vectors(vectors, ports, origins, args.idle, args.total)
                report += [header, "", *vector_report(suite, rows)]
            elif suite == "httpwookiee":
                report += [header, "", *wookiee_report(root, tool_python, ports, workdir)]
            elif suite == "smuggler":
                report += [header, "", *smuggler_report(root, tool_python, ports, workdir)]
            Path(args.out).write_text("\n".join(report) + "\n")
        sidecar_log = (workdir / "sidecar.log").read_text(errors="replace")
        if "Traceback" in sidecar_log:
            report += ["## The sidecar logged a traceback", "", "```", sidecar_log[-3000:], "```", ""]
    Path(args.out).write_text("\n".join(report) + "\n")
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


def run_vectors(
    vectors: list[Vector], ports: dict[str, int], origins: dict[str, RecordingOrigin], idle: float, total: float
) -> list[tuple[Vector, dict[str, Outcome]]]:
    """Each vector at the three listeners at once (one origin each); vectors one by one."""
    rows = []
    with ThreadPoolExecutor(len(LISTENERS)) as pool:
        for vector in vectors:
            futures = {
                name: pool.submit(run_vector, vector, ports[name], origins[name], idle, total) for name in LISTENERS
            }
            rows.append((vector, {name: future.result() for name, future in futures.items()}))
    return rows


def wookiee_report(root: Path, python: str, ports: dict[str, int], workdir: Path) -> list[str]:
    with ThreadPoolExecutor(len(LISTENERS)) as pool:
        futures = {name: pool.submit(run_wookiee, root, python, ports[name], workdir, name) for name in LISTENERS}
        results = {name: future.result() for name, future in futures.items()}
    lines = [
        "HTTPWookiee's client tests (`-m client`), its own gravity levels.",
        "",
        "| listener | tests | failures | by level |",
        "| --- | ---: | ---: | --- |",
    ]
    for name in LISTENERS:
        r = results[name]
        levels = ", ".join(f"{k} {v}" for k, v in sorted(r["levels"].items())) or "-"
        lines.append(f"| {name} | {r['tests']} | {len(r['failures'])} | {levels} |")
    lines.append("")
    ids = sorted({f[2] for name in ("inbound", "outbound") for f in results[name]["failures"]})
    if ids:
        lines += ["| test | inbound | outbound | HAProxy |", "| --- | --- | --- | --- |"]
        for test in ids:
            cells = []
            for name in LISTENERS:
                hit = [f for f in results[name]["failures"] if f[2] == test]
                cells.append(f"**FAIL {hit[0][1]}**" if hit else "pass")
            lines.append(f"| {test} | {' | '.join(cells)} |")
        lines.append("")
    return lines


def smuggler_report(root: Path, python: str, ports: dict[str, int], workdir: Path) -> list[str]:
    with ThreadPoolExecutor(len(LISTENERS)) as pool:
        futures = {name: pool.submit(run_smuggler, root, python, ports[name], workdir, name) for name in LISTENERS}
        results = {name: future.result() for name, future in futures.items()}
    lines = [
        "smuggler's timing-based CL.TE / TE.CL detection, three configs, `-t 2`.",
        "",
        "Cells: findings (anything but OK) / mutations run.",
        "",
        "| listener | default | exhaustive | doubles |",
        "| --- | ---: | ---: | ---: |",
    ]
    configs = ("default", "exhaustive", "doubles")
    for name in LISTENERS:
        cells = [f"{len(results[name][c][1])} / {results[name][c][0]}" for c in configs]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines.append("")
    for name in LISTENERS:
        for config, (_, findings) in results[name].items():
            lines += [f"- {name} / {config}: {finding}" for finding in findings]
    lines.append("")
    return lines


if __name__ == "__main__":
    sys.exit(main())
