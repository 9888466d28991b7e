"""Comparison helpers: nested values equal within float tolerance, and the state an engine
holds after a stream, in a form two engines can be compared by."""

from __future__ import annotations

import math
from typing import Any

from monitor.account import Account
from monitor.engine import Engine
from monitor.replay import replay


def close(a: Any, b: Any, path: str = "") -> None:
    if isinstance(a, float) or isinstance(b, float):
        assert a is not None and b is not None, path
        assert math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-6), f"{path}: {a} != {b}"
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), f"{path}: {sorted(a)} != {sorted(b)}"
        for key in a:
            close(a[key], b[key], f"{path}.{key}")
    elif isinstance(a, list):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            close(x, y, f"{path}[{i}]")
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


def account_state(account: Account) -> tuple:
    """An account's (or isolated position's) balances, positions, state and event counter."""
    return (dict(account.balances),
            {symbol: (p.qty, p.entry_price) for symbol, p in account.positions.items()},
            account.state, account.transitions)


def state_of(engine: Engine) -> dict:
    """`account_state` of every account and isolated position, and the price table."""
    held = [*engine.accounts.items(), *engine.units.items()]
    return {
        "accounts": {a: account_state(x) for a, x in held},
        "prices": engine.price_table(),
    }


def final_engine(records, config) -> Engine:
    engine = Engine(config)
    lines = [b'{"topic": "%s", "value": %s}' % (kind.encode(), value)
             for kind, _, value in records]
    import io

    replay(lines, engine, io.BytesIO(), lambda index, rejection: None)
    return engine
