"""The synthetic market (demo, examples, synth): isolated positions beside cross ones
(SPEC §4.1)."""

from __future__ import annotations

import io
from pathlib import Path

import orjson

from monitor.config import load_config
from monitor.engine import Engine
from monitor.market import SyntheticMarket, simulate
from monitor.replay import replay

CONFIG = load_config(Path(__file__).resolve().parents[1] / "examples" / "risk.toml")


def opened(market: SyntheticMarket) -> list[dict]:
    return [r.value for r in market.opening() if isinstance(r.value, dict)]


def test_isolated_positions_are_funded_before_they_open() -> None:
    funded: set[tuple[str, str]] = set()
    opened_isolated = 0
    for v in opened(SyntheticMarket(CONFIG, accounts=200, seed=4)):
        if v.get("kind") == "isolated_margin":
            # a wallet holds its instrument's settle asset, taken from the cross pool
            assert v["asset"] == CONFIG.instruments[v["symbol"]].settle and v["amount"] > 0
            funded.add((v["account"], v["symbol"]))
        elif v.get("margin_mode") == "isolated":
            assert (v["account"], v["symbol"]) in funded
            opened_isolated += 1
    assert opened_isolated == len(funded) > 10


def test_close_out_keeps_cross_and_isolated_positions_apart() -> None:
    market = SyntheticMarket(CONFIG, accounts=300, seed=4)
    values = opened(market)
    isolated = {(v["account"], v["symbol"]) for v in values if v.get("margin_mode") == "isolated"}
    cross = {(v["account"], v["symbol"]) for v in values
             if "fill_id" in v and "margin_mode" not in v}
    account = next(a for a, _ in isolated if any(c == a for c, _ in cross))
    # A cross liquidation closes the cross positions only: no isolated mode on its fills.
    closing = [r.value for r in market.close_out(account)]
    assert {(v["account"], v["symbol"]) for v in closing} == {
        key for key in cross if key[0] == account}
    assert all("margin_mode" not in v for v in closing)
    # An isolated liquidation closes that one position, in isolated mode.
    symbol = next(s for a, s in sorted(isolated) if a == account)
    (only,) = [r.value for r in market.close_out(account, symbol)]
    assert (only["symbol"], only["margin_mode"]) == (symbol, "isolated")
    assert market.close_out(account, symbol) == []  # nothing left to close


def test_simulated_crash_liquidates_isolated_positions_and_sends_no_mode_conflict() -> None:
    lines = [r.replay_line() for r in simulate(CONFIG, accounts=150, steps=400, seed=2)]
    out = io.BytesIO()
    summary = replay(lines, Engine(CONFIG), out, lambda index, rejection: None)
    assert summary.rejected == {}  # the market keeps each position in its mode
    isolated = [e for e in map(orjson.loads, out.getvalue().splitlines())
                if e["margin_mode"] == "isolated"]
    assert {e["type"] for e in isolated} == {"margin_call", "liquidation", "recovered"}
