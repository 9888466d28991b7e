"""Checkpoint snapshots as an older liqmon wrote them, for the tests that an upgrade still
restores them."""

from __future__ import annotations

import math

import orjson

from monitor.account import Account


def json_snapshot(account: Account, seq: int, as_of: dict) -> bytes:
    """An account snapshot as liqmon wrote it before format 2 (JSON, format 1)."""
    def number(x: float) -> float | str:
        return x if math.isfinite(x) else repr(x)

    return orjson.dumps({
        "v": 1, "seq": seq,
        "as_of": [[topic, partition, offset] for (topic, partition), offset in as_of.items()],
        "balances": {a: number(b) for a, b in account.balances.items()},
        "positions": {s: [number(p.qty), number(p.entry_price)]
                      for s, p in account.positions.items()},
        "state": int(account.state), "transitions": account.transitions,
        "partition": account.partition})
