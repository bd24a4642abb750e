"""No secret anywhere a reader without the write token looks: a control plane and two sidecars
(debug logs), a policy whose route adds `Authorization: Bearer s3cret-...`, traffic that carries
its own Authorization header (and a token in its query), a write refused for a wrong token;
then every log, every admin page (/config_dump, /metrics, /clusters, /explain), the control
plane's /metrics, reads, traces and `meshlet get policies -o json` are searched for the
secrets, the API token and the join token (when there is one)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import httpx
import trio

from ..mesh import Mesh

ROUTE_SECRET = "s3cret-route-7f3a9c"
RESPONSE_SECRET = "s3cret-response-51be"
MATCH_SECRET = "s3cret-match-0d44"
APP_SECRET = "s3cret-app-a81c"
QUERY_SECRET = "s3cret-query-66e2"
PRESENTED = "s3cret-presented-9b1d"

POLICY = f"""\
kind: Route
name: item
host: item
rules:
  - name: partner
    match: {{headers: {{x-partner-key: {{exact: "{MATCH_SECRET}"}}}}}}
    destinations: [{{service: item}}]
  - name: all
    headers:
      request:
        add: {{authorization: "Bearer {ROUTE_SECRET}"}}
      response:
        add: {{x-upstream-session: "{RESPONSE_SECRET}"}}
    destinations: [{{service: item}}]
"""


async def test_no_secret_in_logs_dumps_metrics_traces_or_reads(mesh: Mesh, tmp_path: Path) -> None:
    debug = ["--log-level", "debug"]
    await mesh.control_plane(extra=debug)
    item = await mesh.origin()
    item_sidecar = await mesh.sidecar("item", app=item, extra=debug)
    user = await mesh.sidecar("user", extra=debug)
    await mesh.apply(POLICY)
    api = f"http://{mesh.api}"
    async with httpx.AsyncClient(timeout=10) as client:
        call = {"host": "item", "authorization": f"Bearer {APP_SECRET}", "x-meshlet-explain": "1"}
        first = f"http://{user.outbound}/hello?token={QUERY_SECRET}"
        with trio.fail_after(20):
            while (await client.get(first, headers=call)).status_code != 200:  # noqa: ASYNC110 - another process
                await trio.sleep(0.1)
        answer = await client.get(f"http://{user.outbound}/hello", headers=call)
        assert answer.status_code == 200 and answer.headers["x-upstream-session"] == RESPONSE_SECRET  # the policy runs
        partner = await client.get(f"http://{user.outbound}/hello", headers={**call, "x-partner-key": MATCH_SECRET})
        assert partner.status_code == 200
        failed = await client.get(f"http://{user.outbound}/x?token={QUERY_SECRET}", headers={**call, "host": "nowhere"})
        assert failed.status_code >= 400
        wrong = await client.put(
            f"{api}/v1/policies", json={"files": []}, headers={"authorization": f"Bearer {PRESENTED}"}
        )
        assert wrong.status_code == 401
        traces: list[object] = []
        with trio.fail_after(20):  # spans are sent in batches, every second
            while not traces:
                await trio.sleep(0.5)
                traces = (await client.get(f"{api}/api/v2/traces", params={"limit": 50})).json()
        pages = {"traces": json.dumps(traces)}
        for path in ("/v1/policies", "/v1/policies/history", "/v1/status", "/v1/dashboard", "/metrics"):
            pages[f"cp {path}"] = (await client.get(f"{api}{path}")).text
        pages["cp /v1/explain"] = (
            await client.get(f"{api}/v1/explain", params={"url": "http://item/hello", "from": "user"})
        ).text
        for sidecar in (item_sidecar, user):
            for path in ("/config_dump", "/metrics", "/clusters", "/explain"):
                pages[f"{sidecar.admin} {path}"] = (await client.get(f"http://{sidecar.admin}{path}")).text
            recent = (await client.get(f"http://{sidecar.admin}/explain")).json()
            for entry in recent:
                explained = await client.get(
                    f"http://{sidecar.admin}/explain", params={"request_id": entry["request_id"]}
                )
                pages[f"{sidecar.admin} /explain {entry['request_id']}"] = explained.text
    assert any("/explain " in name for name in pages), "no request was explained: the test would see nothing"
    # Run where ./.meshlet-cp/api-token is the write token, as beside the control plane: a read
    # does not send it unless told to (--token, MESHLET_TOKEN, --token-file).
    beside = tmp_path / "beside"
    (beside / ".meshlet-cp").mkdir(parents=True)
    (beside / ".meshlet-cp" / "api-token").write_text(mesh.token_file.read_text())
    environment = {k: v for k, v in os.environ.items() if k != "MESHLET_TOKEN"}
    cli = await trio.run_process(
        [sys.executable, "-m", "meshlet", "get", "policies", "-o", "json", "--api", mesh.api],
        capture_stdout=True,
        capture_stderr=True,
        cwd=beside,
        env=environment,
    )
    pages["meshlet get policies -o json"] = cli.stdout.decode() + cli.stderr.decode()
    assert "<redacted>" in pages["cp /v1/policies"] and "<redacted>" in pages["meshlet get policies -o json"]
    for process in (mesh.cp, item_sidecar, user):
        assert process is not None
        pages[f"log {process.stderr_path.name}"] = process.log()

    secrets = {
        "route": ROUTE_SECRET,
        "response": RESPONSE_SECRET,
        "match": MATCH_SECRET,
        "app": APP_SECRET,
        "query": QUERY_SECRET,
        "presented": PRESENTED,
        "api token": mesh.token_file.read_text().strip(),
    }
    secrets["join token"] = (mesh.token_file.parent / "join-token").read_text().strip()
    # Private keys: the CA's and each sidecar's (a line of each key's base64 body is enough).
    keys = [mesh.token_file.parent / "ca" / "ca.key", *mesh.tmp_path.glob("data-*/*.key")]
    assert len(keys) == 3, keys  # the CA's, item's and user's
    for key in keys:
        secrets[f"key {key.name}"] = key.read_text().splitlines()[1]
    found = [f"{what} in {page}" for page, text in pages.items() for what, secret in secrets.items() if secret in text]
    assert found == []
