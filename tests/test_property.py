"""Property: on long random streams the engine equals a naive from-scratch recomputation,
event for event and in every account's final state (within 1e-9 relative)."""

from __future__ import annotations

import io
import math
import random
from typing import Any

import orjson
import pytest

from monitor.account import UnitKey
from monitor.config import parse_config
from monitor.engine import Engine
from monitor.replay import replay
from tests.conftest import RISK
from tests.naive_model import ModeConflict, NaiveMonitor, parse_line

ACCOUNTS = [f"u{i:02d}" for i in range(12)]
START = {"BTC-PERP": 50_000.0, "ETH-PERP": 2_500.0, "ETHBTC-PERP": 0.05, "BTC": 50_000.0,
         "ETH": 2_500.0}
SETTLE = {"BTC-PERP": "USDT", "ETH-PERP": "USDT", "ETHBTC-PERP": "BTC"}
WALLET = {"USDT": 150.0, "BTC": 0.004}  # a typical isolated_margin transfer, per settle asset


def random_stream(seed: int, length: int, mean_run: float = 1.0,
                  isolated: float = 0.0) -> list[bytes]:
    """Replay lines: leveraged trading on a jumpy random walk, with exact closes, flips,
    stale ticks, duplicates, unpriced assets, unused symbols and malformed lines mixed in.

    With mean_run > 1 the kind of record changes only every mean_run records on average
    (runs of ticks, of fills, …), which lets a Kafka test feed it topic run by topic run.

    With ``isolated`` > 0 (SPEC §4.1) that fraction of the positions opened from flat is
    isolated, ledger entries move margin into and out of isolated wallets (sometimes before
    any fill), and one fill in 25 is sent in the other mode than its open position's (a
    margin_mode_conflict). With 0 the stream is exactly the cross-only one."""
    rng = random.Random(seed)
    modes = random.Random(seed + 1)  # draws of its own: isolated=0 leaves the stream as it was
    mode_held: dict[tuple[str, str], str] = {}
    prices = dict(START)
    ts = 1_000
    lines: list[bytes] = []
    sent: list[dict[str, Any]] = []
    qty_held: dict[tuple[str, str], float] = {}

    def emit(topic: str, value: Any) -> None:
        lines.append(orjson.dumps({"topic": topic, "value": value}))

    roll = rng.random()
    for n in range(length):
        ts += rng.choice([0, 1, 5])
        if rng.random() < 1 / mean_run:
            roll = rng.random()
        if roll < 0.35:
            symbol = rng.choice([*START, "XRP"])
            if symbol == "XRP" or (symbol == "BTC" and n < length // 10):
                emit("prices", {"symbol": symbol, "price": 0.5, "ts": ts})
                continue
            shock = rng.choice([0.0, 0.0, 0.0, rng.gauss(0, 0.05)])
            prices[symbol] *= math.exp(rng.gauss(0, 0.004) + shock)
            stale = rng.random() < 0.05
            emit("prices", {"symbol": symbol, "price": prices[symbol],
                            "ts": ts - 50 if stale else ts})
        elif roll < 0.75:
            account = rng.choice(ACCOUNTS)
            symbol = rng.choice(["BTC-PERP", "ETH-PERP", "ETHBTC-PERP"])
            held = qty_held.get((account, symbol), 0.0)
            if held and rng.random() < 0.25:
                # An exact close, in the decimal quantity an exchange would send: the float
                # sum the engine holds may differ from it by rounding (dust).
                qty, side = round(abs(held), 4), "sell" if held > 0 else "buy"
            else:
                scale = {"BTC-PERP": 0.05, "ETH-PERP": 10.0, "ETHBTC-PERP": 20.0}[symbol]
                qty = round(rng.uniform(0.1, 3.0) * scale, 4)
                side = rng.choice(["buy", "sell"])
            value = {"fill_id": f"f{n}", "account": account, "symbol": symbol, "side": side,
                     "qty": qty, "price": prices[symbol] * rng.uniform(0.995, 1.005),
                     "fee": rng.choice([0, 0.5, -0.1]), "ts": ts}
            mode = "cross"
            if isolated:
                if not held:
                    mode_held[(account, symbol)] = (
                        "isolated" if modes.random() < isolated else "cross")
                mode = mode_held.get((account, symbol), "cross")
                conflict = bool(held) and modes.random() < 0.04
                if conflict:
                    mode = "isolated" if mode == "cross" else "cross"
                if mode == "isolated" or modes.random() < 0.3:
                    value["margin_mode"] = mode  # cross is also the default: spelt out or not
            if sent and rng.random() < 0.05:
                value = rng.choice(sent)  # an upstream retry: a duplicate
            else:
                sent.append(value)
                if not (isolated and conflict):
                    signed = qty if side == "buy" else -qty
                    qty_held[(account, symbol)] = round(held + signed, 4)
            emit("fills", value)
        elif isolated and roll < 0.93 and modes.random() < 0.3:
            account, symbol = modes.choice(ACCOUNTS), modes.choice(list(SETTLE))
            asset = SETTLE[symbol]
            amount = WALLET[asset] * modes.uniform(-0.7, 2)  # negative: back to cross
            emit("ledger", {"entry_id": f"i{n}", "account": account, "asset": asset,
                            "amount": amount, "kind": "isolated_margin", "symbol": symbol,
                            "ts": ts})
        elif roll < 0.93:
            account = rng.choice(ACCOUNTS)
            asset = rng.choice(["USDT", "USDT", "BTC", "ETH"])
            amount = {"USDT": 300.0, "BTC": 0.01, "ETH": 0.2}[asset] * rng.uniform(-1, 3)
            entry_id = f"e{n}" if rng.random() > 0.05 else "e-repeat"
            emit("ledger", {"entry_id": entry_id, "account": account, "asset": asset,
                            "amount": amount,
                            "kind": rng.choice(["deposit" if amount > 0 else "withdrawal",
                                                "funding"]),
                            "ts": ts})
        else:
            lines.append(rng.choice([
                b"not json",
                b'{"topic": "fills", "value": {"fill_id": "x", "account": "u01"}}',
                b'{"topic": "prices", "value": {"symbol": "BTC", "price": -5, "ts": 1}}',
                b'{"topic": "ledger", "value": {"entry_id": "y", "account": "u02",'
                b' "asset": "DOGE", "amount": 1, "kind": "deposit", "ts": 1}}',
            ]))
    return lines


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


@pytest.mark.parametrize(("seed", "isolated"), [*((s, 0.0) for s in range(6)),
                                                *((s, 0.3) for s in range(6, 12))])
def test_engine_equals_naive_recomputation_on_long_random_streams(seed: int,
                                                                  isolated: float) -> None:
    lines = random_stream(seed, 4_000, isolated=isolated)
    config = parse_config(RISK)
    engine = Engine(config)
    out = io.BytesIO()
    summary = replay(lines, engine, out, lambda index, rejection: None)
    got = [orjson.loads(line) for line in out.getvalue().splitlines()]
    for event in got:
        del event["emitted_at"]

    naive = NaiveMonitor(RISK)
    expected = []
    bad = conflicts = 0
    for index, line in enumerate(lines):
        good = parse_line(line, RISK)  # the model's own reading of SPEC §2, not the product's
        if good is None:
            bad += 1
            continue
        try:
            expected.extend(naive.feed(*good, index))
        except ModeConflict:
            conflicts += 1

    assert sum(summary.rejected.values()) == bad + conflicts and bad > 0
    assert summary.rejected["margin_mode_conflict"] == conflicts
    assert (conflicts > 0) == (isolated > 0)
    assert len({e["type"] for e in expected}) == 3, "the stream should exercise every event type"
    if isolated:
        isolated_types = {e["type"] for e in expected if e["margin_mode"] == "isolated"}
        assert isolated_types == {"margin_call", "liquidation", "recovered"}
    assert sum(summary.events.values()) == len(expected)
    for i, (g, e) in enumerate(zip(got, expected, strict=True)):
        close(g, e, f"event[{i}]")

    held: list[tuple[Any, Any, Any]] = [(name, acct, engine.accounts.get(name))
                                        for name, acct in naive.accounts.items()]
    held += [(key, acct, engine.units.get(UnitKey(*key))) for key, acct in naive.units.items()]
    for name, acct, mine in held:
        if mine is None:  # forgotten as blank: the naive model keeps it with zero balances
            assert acct["n"] == 0 and not acct["pos"]
            assert all(b == 0 for b in acct["b"].values())
            continue
        assert mine.state.value == acct["state"] and mine.transitions == acct["n"]
        close({k: v for k, v in acct["b"].items() if v != 0}, dict(mine.balances), name)
        close({s: list(p) for s, p in acct["pos"].items()},
              {s: [p.qty, p.entry_price] for s, p in mine.positions.items()}, name)
