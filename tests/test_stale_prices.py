"""Stale prices in events (SPEC §5.2): with `[prices] max_age_ms`, every event lists the price
symbols its account depends on whose last tick is older than the event's ts − max_age_ms, or
that never ticked. Event time, so the numbers below hold in replay and in the service alike."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from monitor.account import Account
from monitor.config import RiskConfig, parse_config
from monitor.engine import Engine
from monitor.events import Source
from monitor.margin import Position
from monitor.records import PriceTick
from monitor.reference import ReferenceEngine
from tests.support.risk import RISK


def config(max_age_ms: int | None) -> RiskConfig:
    raw = copy.deepcopy(RISK)
    if max_age_ms is not None:
        raw["prices"] = {"max_age_ms": max_age_ms}
    return parse_config(raw)


def events(cfg: RiskConfig, ticks: list[tuple[str, float, int]],
           positions: dict[str, Position], balances: dict[str, float],
           engine_type: type[Engine] | type[ReferenceEngine] = Engine) -> list[dict[str, Any]]:
    engine = engine_type(cfg)
    engine.load_account("a", Account(balances=balances, positions=positions))
    out = []
    for index, (symbol, price, ts) in enumerate(ticks):
        out += [e.payload for e in engine.apply(PriceTick(symbol, price, ts),
                                                Source(topic="prices", index=index))]
    return out


# 1 BTC-PERP long from 50,000 on 250 USDT (fixed price: never stale) and 0.001 BTC (priced by
# ticks on BTC, worth 47.5 after its haircut) and 0.001 ETH (never ticked). The BTC-PERP tick at
# ts 7,000 takes the ratio to 199.56 / (250 + 47.5 − 110) = 1.06: a liquidation event.
POSITIONS = {"BTC-PERP": Position(1.0, 50_000.0)}
BALANCES = {"USDT": 250.0, "BTC": 0.001, "ETH": 0.001}


@pytest.mark.parametrize(
    ("btc_ts", "stale"),
    [
        (1_999, ["BTC", "ETH"]),  # older than 7,000 − 5,000
        (2_000, ["ETH"]),  # exactly 5,000 ms old: not older than the limit
    ],
)
def test_an_event_lists_the_prices_older_than_the_limit_and_those_never_ticked(
    btc_ts: int, stale: list[str],
) -> None:
    (event,) = events(config(5_000), [("BTC", 50_000.0, btc_ts), ("BTC-PERP", 49_890.0, 7_000)],
                      POSITIONS, BALANCES)
    assert event["type"] == "liquidation"
    assert event["stale_prices"] == stale


def test_a_settle_asset_priced_by_ticks_is_a_dependency_of_its_positions() -> None:
    # ETHBTC-PERP 10 from 0.05 settles in BTC (last ticked at 1,000); no BTC balance. Equity
    # 2,600 USDT + 10 · (0.045 − 0.05) · 50,000 = 100; MM 10 · 0.045 · 0.01 · 50,000 = 225.
    (event,) = events(config(5_000),
                      [("BTC", 50_000.0, 1_000), ("ETHBTC-PERP", 0.045, 7_000)],
                      {"ETHBTC-PERP": Position(10.0, 0.05)}, {"USDT": 2_600.0})
    assert event["stale_prices"] == ["BTC"]


def test_every_fresh_price_gives_an_empty_list() -> None:
    (event,) = events(config(5_000), [("BTC", 50_000.0, 6_000), ("ETH", 2_500.0, 6_000),
                                      ("BTC-PERP", 49_890.0, 7_000)], POSITIONS, BALANCES)
    assert event["stale_prices"] == []


def test_without_a_limit_events_carry_no_stale_prices() -> None:
    (event,) = events(config(None), [("BTC-PERP", 49_890.0, 7_000)], POSITIONS, BALANCES)
    assert "stale_prices" not in event


def test_the_columnar_and_reference_engines_agree_on_stale_prices() -> None:
    ticks = [("BTC", 50_000.0, 1_000), ("BTC-PERP", 49_890.0, 7_000),
             ("BTC-PERP", 50_500.0, 7_001)]
    columnar = events(config(5_000), ticks, POSITIONS, BALANCES)
    reference = events(config(5_000), ticks, POSITIONS, BALANCES, ReferenceEngine)
    assert [e["type"] for e in columnar] == ["liquidation", "recovered"]
    assert columnar == reference
