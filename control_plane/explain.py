"""`meshlet explain URL`: what the mesh would do with a request, and why. Pure.

Built from the applied policy and the registry, with the sidecar's own route matcher
(meshlet/routes.py), so the answer is what a sidecar decides: the Route and the rule
that match (or why none does), the action (destinations with their shares and the
endpoints each subset selects, a redirect, a direct response), the changes the rule makes,
the DestinationPolicy that would govern each destination, and, given the calling service,
what its AccessPolicy says.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from meshlet.access import AccessTable, normalise_path
from meshlet.paths import BadPath, normalise_target
from meshlet.routes import RouteTable
from meshlet.schema import AccessPolicy, DestinationPolicy, Document, Route, Service


def explain(
    url: str,
    documents: list[Document],
    endpoints: dict[str, list[dict[str, Any]]],
    *,
    method: str = "GET",
    headers: list[tuple[str, str]] = (),  # type: ignore[assignment]
    source: str | None = None,
) -> dict[str, Any]:
    """``endpoints``: service → its ready endpoints ({id, address, labels})."""
    parts = urlsplit(url if "://" in url else f"http://{url}")
    host = (parts.hostname or "").lower()
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    out: dict[str, Any] = {"host": host, "method": method, "target": target, "source": source}
    try:  # what a sidecar routes, checks and forwards: the normalised path
        target = normalise_target(target.encode("latin-1")).decode("latin-1")
    except (BadPath, UnicodeEncodeError) as exc:
        out["decision"] = {"status": 400, "why": f"the sidecar refuses this path ({exc}): 400 bad-request"}
        out["route"] = None
        out["destinations"] = []
        return out
    out["target"] = target
    routes = [d for d in documents if isinstance(d, Route) and d.host == host]
    statics = {d.name: d for d in documents if isinstance(d, Service)}
    raw_headers = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers]
    services: list[tuple[str, dict[str, str], int]] = []
    upstream_target = target  # what the destination's sidecar sees (after a rewrite)
    if routes:
        route = routes[0]
        table = RouteTable(route)
        rule = table.match(method.encode(), target.encode("latin-1"), raw_headers)
        out["route"] = {"name": route.name, "mode": route.mode, "rules": [r.name for r in table.rules]}
        if rule is None:
            out["decision"] = {"status": 404, "why": f"no rule of route {route.name!r} matches"}
        else:
            spec = rule.rule
            out["rule"] = {
                "name": rule.name,
                "priority": rule.priority,
                "match": spec.match.model_dump(exclude_defaults=True),
            }
            if spec.redirect is not None:
                out["decision"] = {"redirect": spec.redirect.model_dump()}
            elif spec.direct_response is not None:
                out["decision"] = {"direct_response": spec.direct_response.model_dump()}
            else:
                total = sum(t.weight for t in rule.targets)
                services = [(t.service, dict(t.subset), t.weight) for t in rule.targets]
                out["decision"] = {
                    "destinations": [
                        {"service": s, "subset": subset, "weight": w, "share": round(100 * w / total, 2)}
                        for s, subset, w in services
                    ]
                }
                if spec.rewrite is not None:
                    upstream_target = rule.rewrite(target.encode("latin-1")).decode("latin-1")
                    out["decision"]["rewritten_target"] = upstream_target
            changes = spec.headers.model_dump(exclude_defaults=True)
            if changes:
                out["decision"]["headers"] = changes
            for key in ("fault", "mirror"):
                value = getattr(spec, key)
                if value is not None:
                    out["decision"][key] = value.model_dump()
            if spec.timeout is not None:
                out["decision"]["timeout"] = spec.timeout
    else:
        out["route"] = None
        services = [(host, {}, 1)]
        out["decision"] = {"destinations": [{"service": host, "subset": {}, "weight": 1, "share": 100.0}]}
    out["destinations"] = [
        _destination(name, subset, documents, endpoints, statics, out.get("route"), out.get("rule"))
        for name, subset, _ in services
    ]
    if source is not None:
        names = dict.fromkeys(name for name, _, _ in services)
        out["access"] = [_access(source, name, upstream_target, method, documents) for name in names]
    return out


def _destination(
    name: str,
    subset: dict[str, str],
    documents: list[Document],
    endpoints: dict[str, list[dict[str, Any]]],
    statics: dict[str, Service],
    route: dict[str, Any] | None,
    rule: dict[str, Any] | None,
) -> dict[str, Any]:
    if name in endpoints:
        candidates, where = endpoints[name], "registry"
    elif name in statics:
        candidates = [{"id": e.address, "address": e.address, "labels": e.labels} for e in statics[name].endpoints]
        where = f"Service/{name}"
    else:
        candidates, where = [], "unknown: no registered instance and no Service document"
    chosen = [e for e in candidates if all(e["labels"].get(k) == v for k, v in subset.items())]
    rule_ref = f"{route['name']}/{rule['name']}" if route and rule else None
    policies = [d for d in documents if isinstance(d, DestinationPolicy) and d.service == name]
    specific = [d for d in policies if d.rule is not None and d.rule == rule_ref]
    general = [d for d in policies if d.rule is None]
    policy = next(iter(specific or general), None)
    return {
        "service": name,
        "subset": subset,
        "endpoints_from": where,
        "endpoints": [e["address"] for e in chosen],
        "endpoints_outside_subset": len(candidates) - len(chosen),
        "destination_policy": None if policy is None else {"name": policy.name, "mode": policy.mode},
    }


def _access(source: str, service: str, target: str, method: str, documents: list[Document]) -> dict[str, Any]:
    """What the inbound sidecar of ``service`` does with this caller (its own check)."""
    policies = [d for d in documents if isinstance(d, AccessPolicy) and d.service == service]
    if not policies:
        return {"service": service, "allowed": True, "why": "no AccessPolicy for this service"}
    (policy,) = policies  # one per service (meshlet/schema.py)
    verdict = AccessTable(policy).check(source, method.encode("ascii"), target.encode("latin-1"))
    if verdict.rule == "default":
        path = normalise_path(target.partition("?")[0])
        why = f"AccessPolicy/{policy.name}: no rule lets {source} {method} {path}; default {policy.default}"
    else:
        why = f"AccessPolicy/{policy.name} {verdict.rule}"
    out = {"service": service, "allowed": verdict.allowed, "why": why, "mode": policy.mode}
    if policy.mode == "shadow":
        out["enforced"] = False  # counted in meshlet_shadow_access_decisions_total only
    return out


__all__ = ["explain"]
