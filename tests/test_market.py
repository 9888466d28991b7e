"""The synthetic market (demo, examples, synth): isolated positions beside cross ones
(SPEC §4.1)."""

from __future__ import annotations

import io
import tomllib
from pathlib import Path

import orjson
import pytest

from monitor.config import RiskConfig, load_config, parse_config
from monitor.engine import Engine
from monitor.market import MarketError, SyntheticMarket, simulate
from monitor.replay import ReplaySummary, replay

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


# A config unlike the example's: cash is USD, BTC is priced by an index symbol, and one
# instrument settles in BTC.
OTHER_NAMES = parse_config(tomllib.loads("""
[thresholds]
margin_call = 0.8
liquidation = 1.0
hysteresis = 0.05

[assets.USD]
collateral_weight = 1.0
price = 1.0
[assets.BTC]
collateral_weight = 0.9
price_symbol = "BTC.idx"

[instruments.BTC-MINI]
settle = "USD"
contract_size = 0.001
mark_symbol = "BTC.idx"
tiers = [{ max_notional = "inf", mmr = 0.01, imr = 0.02 }]
[instruments.ALT-BTC]
settle = "BTC"
contract_size = 1
mark_symbol = "ALTBTC"
tiers = [{ max_notional = "inf", mmr = 0.02, imr = 0.04 }]
[instruments.ALT-USD]
settle = "USD"
contract_size = 1
mark_symbol = "ALT"
tiers = [{ max_notional = "inf", mmr = 0.02, imr = 0.04 }]
"""))


def replayed(config: RiskConfig, lines: list[bytes]) -> tuple[ReplaySummary, list[dict]]:
    out = io.BytesIO()
    summary = replay(lines, Engine(config), out, lambda index, rejection: None)
    return summary, [orjson.loads(line) for line in out.getvalue().splitlines()]


def test_accounts_deposit_what_most_instruments_settle_in_and_collateral_at_its_own_price(
        ) -> None:
    """It deposited USDT and valued BTC at the "BTC" symbol whatever the config said: a
    KeyError, or every deposit rejected as an unknown asset."""
    ledger = [v for v in opened(SyntheticMarket(OTHER_NAMES, accounts=100, seed=4))
              if "kind" in v]
    deposits = [v for v in ledger if v["kind"] == "deposit"]
    assert {v["asset"] for v in deposits} == {"USD", "BTC"}
    # BTC comes as collateral, 20 % of the account's cash equity at BTC.idx's start price
    # (100: a symbol the market does not know), or as the wallet of an ALT-BTC position
    cash = {v["account"]: v["amount"] for v in deposits if v["asset"] == "USD"}
    wallets = {(v["account"], v["amount"]) for v in ledger if v["kind"] == "isolated_margin"}
    btc = [v for v in deposits if v["asset"] == "BTC"]
    collateral = [v for v in btc  # of the cash before it was rounded to the cent
                  if v["amount"] == pytest.approx(cash[v["account"]] * 0.2 / 100, rel=1e-5)]
    assert collateral
    assert all((v["account"], v["amount"]) in wallets for v in btc if v not in collateral)


def test_a_market_of_other_names_replays_without_a_rejection_and_crashes() -> None:
    lines = [r.replay_line() for r in simulate(OTHER_NAMES, accounts=100, steps=100, seed=2)]
    summary, events = replayed(OTHER_NAMES, lines)
    assert summary.rejected == {}
    assert {e["type"] for e in events} >= {"margin_call", "liquidation"}


def test_a_config_without_instruments_is_refused_saying_why() -> None:
    assets_only = parse_config({"thresholds": {"margin_call": 0.8, "liquidation": 1.0,
                                               "hysteresis": 0.05},
                                "assets": {"USD": {"collateral_weight": 1.0, "price": 1.0}}})
    with pytest.raises(MarketError, match="the risk config has no instruments"):
        SyntheticMarket(assets_only)


def test_the_bad_rate_is_malformed_records_per_market_record() -> None:
    """It was a chance of one a step, so any rate past ~8 % gave the same file."""
    for rate, least, most in ((0.5, 0.3, 0.7), (1.0, 0.8, 1.2)):
        market = SyntheticMarket(CONFIG, accounts=50, seed=3, bad_record_rate=rate)
        list(market.opening())
        good = bad = 0
        for _ in range(200):
            for record in market.step(0.0):
                value = record.value
                malformed = isinstance(value, bytes) or value.get("price") == -1 or (
                    value.get("symbol") == "DOGE-PERP" or value.get("kind") == "gift")
                bad += malformed
                good += not malformed
        assert least < bad / good < most, (rate, bad, good)
