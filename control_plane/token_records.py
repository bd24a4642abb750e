"""The join-token records the control plane checks a hello against: the bootstrap token's
(rebuilt from ``<data dir>/join-token`` at start) and those ``meshlet token create`` minted,
kept in the store (``tokens/<id>``, the record as JSON: the secret's hash, never the secret),
so they survive a restart. :meth:`TokenBook.records` is the one lookup the push server uses."""

from __future__ import annotations

import json
import logging
import secrets
from collections.abc import Mapping

from .store import Store
from .tokens import TokenBytes, TokenRecord, mint

log = logging.getLogger("meshlet.cp.tokens")

PREFIX = "tokens/"


class TokenBook:
    def __init__(self, store: Store, bootstrap: TokenRecord | None = None) -> None:
        self.store = store
        self._records: dict[str, TokenRecord] = {}
        if bootstrap is not None:
            self._records[bootstrap.id] = bootstrap

    async def load(self) -> None:
        """The minted records from the store. A damaged one is skipped (logged): it must
        never become a token that lets anyone in, nor stop the control plane."""
        for key, value in await self.store.items(PREFIX):
            try:
                record = TokenRecord.from_dict(json.loads(value))
            except (ValueError, TypeError, AttributeError) as exc:
                log.error("ignoring the damaged join-token record %s: %s", key, exc)
                continue
            self._records.setdefault(record.id, record)

    def records(self) -> Mapping[str, TokenRecord]:
        return self._records

    async def mint(
        self, service: str | None, ttl: float, now: float, token_bytes: TokenBytes = secrets.token_bytes
    ) -> tuple[str, TokenRecord]:
        """A new token, scoped to ``service`` (None: any) and valid ``ttl`` seconds; its record
        is in the store before the text is returned (shown once, never kept)."""
        text, record = mint(service, ttl, now, token_bytes)
        await self.store.put(PREFIX + record.id, json.dumps(record.to_dict()).encode())
        self._records[record.id] = record
        return text, record
