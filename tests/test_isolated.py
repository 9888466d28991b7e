"""Isolated margin (SPEC §4.1), worked by hand: each isolated position is a risk unit of its own,
with a wallet in its settle asset, its own state, counter and events.

Numbers use tests/support/risk.py's RISK: BTC-PERP tier 1 (notional ≤ 50,000) has mmr 0.004 and
maintenance amount 0; ETH-PERP (contract size 0.1) tier 1 (≤ 10,000) mmr 0.01. Thresholds:
margin call 0.8, liquidation 1.0, hysteresis 0.05, so the liquidation target is 0.9.
"""

from __future__ import annotations

import copy
import io
from typing import Any

import numpy as np
import orjson
import pytest

from monitor.account import UnitKey
from monitor.config import RiskConfig, parse_config
from monitor.engine import Engine
from monitor.events import Event, Source
from monitor.records import Fill, LedgerEntry, PriceTick, Reason, Rejected
from monitor.reference import ReferenceEngine
from monitor.replay import replay
from tests.support.risk import RISK
from tests.support.schemas import schema_errors

BTC_UNIT = UnitKey("a", "BTC-PERP")


def tick(engine: Engine, symbol: str, price: float) -> list[Event]:
    return engine.apply(PriceTick(symbol, price, 1), Source("prices", index=1))


def fill(engine: Engine, fill_id: str, symbol: str, qty: float, price: float, *,
         mode: str = "cross", fee: float = 0.0, account: str = "a") -> list[Event]:
    side = "buy" if qty > 0 else "sell"
    return engine.apply(Fill(fill_id=fill_id, account=account, symbol=symbol, side=side,
                             qty=abs(qty), price=price, fee=fee, ts=1, margin_mode=mode),
                        Source("fills", index=2))


def deposit(engine: Engine, entry_id: str, amount: float, account: str = "a") -> list[Event]:
    return engine.apply(LedgerEntry(entry_id, account, "USDT", amount, "deposit", 1),
                        Source("ledger", index=3))


def fund(engine: Engine, entry_id: str, symbol: str, amount: float,
         account: str = "a") -> list[Event]:
    """isolated_margin: amount from the cross USDT balance to the (account, symbol) wallet."""
    return engine.apply(LedgerEntry(entry_id, account, "USDT", amount, "isolated_margin", 1,
                                    symbol), Source("ledger", index=4))


@pytest.fixture
def engine(risk: RiskConfig) -> Engine:
    """Account "a": 10,000 USDT deposited, 1,000 of it moved to the BTC-PERP wallet, 1 BTC-PERP
    long from 50,000 in isolated margin, and 3 ETH (30 contracts) long from 2,500 in cross.

    Cross: 9,000 USDT, ETH-PERP MM 30 · 0.1 · 2,500 · 0.01 = 75: ratio 75 / 9,000, healthy.
    Isolated BTC-PERP: wallet 1,000; at mark p, equity = 1,000 + (p − 50,000), MM = 0.004·p."""
    engine = Engine(risk)
    tick(engine, "BTC-PERP", 50_000.0)
    tick(engine, "ETH-PERP", 2_500.0)
    assert deposit(engine, "d1", 10_000.0) == []
    assert fund(engine, "m1", "BTC-PERP", 1_000.0) == []
    assert fill(engine, "f1", "BTC-PERP", 1.0, 50_000.0, mode="isolated") == []
    assert fill(engine, "f2", "ETH-PERP", 30.0, 2_500.0) == []
    return engine


def test_isolated_long_is_liquidated_while_the_cross_account_stays_healthy(engine) -> None:
    # Mark 49,180: equity 1,000 − 820 = 180, MM 0.004 · 49,180 = 196.72, ratio 1.0929 ≥ 1.
    # The cross account's 9,000 USDT would cover it many times over, but cannot reach it.
    (event,) = tick(engine, "BTC-PERP", 49_180.0)
    p = event.payload
    assert (event.event_id, event.account, event.symbol) == (
        "a/BTC-PERP:1:liquidation", "a", "BTC-PERP")
    assert (p["margin_mode"], p["symbol"], p["state"], p["previous_state"]) == (
        "isolated", "BTC-PERP", "LIQUIDATING", "HEALTHY")
    assert p["balances"] == {"USDT": 1_000.0}  # the wallet, not the cross balance
    assert p["collateral_value"] == 1_000.0
    assert p["equity"] == pytest.approx(180.0)
    assert p["maintenance_margin"] == pytest.approx(196.72)
    assert p["margin_ratio"] == pytest.approx(196.72 / 180.0)
    (position,) = p["positions"]
    assert (position["symbol"], position["qty"]) == ("BTC-PERP", 1.0)
    # Binance's isolated liquidation price: (WB + cum − q·e) / (|q|·mmr − q)
    # = (1,000 + 0 − 50,000) / (0.004 − 1) = 49,196.7871…
    assert position["liquidation_price"] == pytest.approx(49_000 / 0.996, rel=1e-12)
    # Equity 0 at 49,180 − 180 / 1 = 49,000: the wallet is gone.
    assert position["bankruptcy_price"] == pytest.approx(49_000.0, rel=1e-12)
    # The plan, with the wallet as the balance: closing Δ at the mark books −820·Δ into the
    # wallet and removes −820·Δ of uPnL, so equity stays 180 while MM is (1 − Δ)·196.72; the
    # target 0.9 needs (1 − Δ)·196.72 ≤ 162, Δ = 1 − 162 / 196.72 = 0.17649…
    plan = p["liquidation_plan"]
    assert plan["deposit_to_target"] == pytest.approx(196.72 / 0.9 - 180.0)
    (step,) = plan["steps"]
    assert (step["symbol"], step["side"], step["close"]) == ("BTC-PERP", "sell", False)
    assert step["qty"] == pytest.approx(1 - 162 / 196.72, rel=1e-12)
    assert plan["margin_ratio_after"] == pytest.approx(0.9)
    # The cross account is untouched and healthy.
    cross = engine.accounts["a"]
    assert (cross.balances, cross.state, cross.transitions) == ({"USDT": 9_000.0},
                                                              cross.state.HEALTHY, 0)
    assert engine.units[BTC_UNIT].transitions == 1


def test_cross_loss_does_not_touch_the_isolated_wallet(engine) -> None:
    # With 9,000 USDT the cross account shrugs off any ETH move: thin it to 400 first.
    assert engine.apply(LedgerEntry("w1", "a", "USDT", -8_600.0, "withdrawal", 1),
                        Source("ledger", index=5)) == []
    # Cross: 400 USDT, 3 ETH long from 2,500. At 2,380: equity 400 − 360 = 40, MM 3 · 2,380
    # · 0.01 = 71.4, ratio 1.785: liquidation. Pooled with the wallet's 1,000 it would be
    # 71.4 / 1,040 = 0.07, healthy — isolation keeps the wallet out of the cross pool.
    (event,) = tick(engine, "ETH-PERP", 2_380.0)
    p = event.payload
    assert (event.event_id, p["margin_mode"], "symbol" in p) == (
        "a:1:liquidation", "cross", False)
    assert p["balances"] == {"USDT": 400.0}
    assert [position["symbol"] for position in p["positions"]] == ["ETH-PERP"]
    assert p["equity"] == pytest.approx(40.0)
    # The isolated position: same wallet, same state, no event.
    unit = engine.units[BTC_UNIT]
    assert (unit.balances, unit.state.name, unit.transitions) == ({"USDT": 1_000.0},
                                                                  "HEALTHY", 0)


def test_funding_before_the_opening_fill_and_fees_into_the_wallet(risk) -> None:
    engine = Engine(risk)
    tick(engine, "BTC-PERP", 50_000.0)
    deposit(engine, "d1", 2_000.0)
    # The wallet exists before any position: 500 USDT, nothing to value (ratio 0), no event.
    assert fund(engine, "m1", "BTC-PERP", 500.0) == []
    assert engine.accounts["a"].balances == {"USDT": 1_500.0}
    unit = engine.units[BTC_UNIT]
    assert (unit.balances, unit.positions) == ({"USDT": 500.0}, {})
    # 0.2 BTC isolated at 50,000 with a fee of 2: the fee comes out of the wallet (498).
    assert fill(engine, "f1", "BTC-PERP", 0.2, 50_000.0, mode="isolated", fee=2.0) == []
    assert engine.units[BTC_UNIT].balances == {"USDT": 498.0}
    assert engine.accounts["a"].balances == {"USDT": 1_500.0}
    # 48,000: equity 498 − 400 = 98, MM 0.2 · 48,000 · 0.004 = 38.4, ratio 0.392: healthy.
    assert tick(engine, "BTC-PERP", 48_000.0) == []
    # 47,600: equity 498 − 480 = 18, MM 38.08, ratio 2.116: liquidation.
    (event,) = tick(engine, "BTC-PERP", 47_600.0)
    assert event.event_id == "a/BTC-PERP:1:liquidation"
    assert event.payload["balances"] == {"USDT": 498.0}
    assert event.payload["equity"] == pytest.approx(18.0)


def test_wallet_is_kept_after_the_position_closes_until_the_ledger_moves_it_back(
    engine,
) -> None:
    # Close the isolated long at 51,000 with a fee of 1: realized +1,000 − 1 into the wallet.
    assert fill(engine, "f3", "BTC-PERP", -1.0, 51_000.0, mode="isolated", fee=1.0) == []
    unit = engine.units[BTC_UNIT]
    assert (unit.balances, unit.positions) == ({"USDT": 1_999.0}, {})
    assert engine.accounts["a"].balances == {"USDT": 9_000.0}
    # A tick changes nothing for a unit holding only its wallet.
    assert tick(engine, "BTC-PERP", 40_000.0) == []
    # Back to cross: the wallet is empty and the unit, which never had an event, is forgotten.
    assert fund(engine, "m2", "BTC-PERP", -1_999.0) == []
    assert BTC_UNIT not in engine.units
    assert engine.accounts["a"].balances == {"USDT": 10_999.0}
    # Flat, the position's mode is free again: a cross fill opens BTC-PERP in cross.
    assert fill(engine, "f4", "BTC-PERP", 0.1, 40_000.0) == []
    assert engine.accounts["a"].positions["BTC-PERP"].qty == 0.1


def test_a_unit_with_events_is_kept_with_its_counter_when_empty(engine) -> None:
    assert [e.event_id for e in tick(engine, "BTC-PERP", 49_180.0)] == [
        "a/BTC-PERP:1:liquidation"]
    # Closed at 49,180: wallet 1,000 − 820 = 180, no position: ratio 0, recovered.
    (event,) = fill(engine, "f3", "BTC-PERP", -1.0, 49_180.0, mode="isolated")
    assert (event.event_id, event.payload["positions"]) == ("a/BTC-PERP:2:recovered", [])
    assert event.payload["balances"] == {"USDT": pytest.approx(180.0)}
    fund(engine, "m2", "BTC-PERP", -engine.units[BTC_UNIT].balances["USDT"])
    # Nothing left in it, but its counter is 2: kept, so a later event is a/BTC-PERP:3:….
    unit = engine.units[BTC_UNIT]
    assert (unit.balances, unit.positions, unit.transitions) == ({}, {}, 2)


def test_binance_isolated_liquidation_price_of_a_short_in_its_event(risk) -> None:
    engine = Engine(risk)
    tick(engine, "BTC-PERP", 50_000.0)
    deposit(engine, "d1", 5_000.0)
    fund(engine, "m1", "BTC-PERP", 300.0)
    fill(engine, "f1", "BTC-PERP", -1.0, 50_000.0, mode="isolated")
    # Mark 50,120: equity 300 − 120 = 180; the notional is past tier 1 (50,000): tier 2,
    # mmr 0.005, cum 50, MM 250.6 − 50 = 200.6, ratio 1.114: liquidation.
    (event,) = tick(engine, "BTC-PERP", 50_120.0)
    (position,) = event.payload["positions"]
    # Binance: (WB + cum − side·|q|·e) / (|q|·mmr − side·|q|), side −1, tier 2 held fixed:
    # (300 + 50 + 50,000) / (0.005 + 1) = 50,350 / 1.005 = 50,099.50…
    assert position["liquidation_price"] == pytest.approx(50_350 / 1.005, rel=1e-12)
    assert position["bankruptcy_price"] == pytest.approx(50_300.0, rel=1e-12)


def test_fill_in_the_other_mode_is_rejected_and_changes_nothing(engine) -> None:
    before = copy.deepcopy((engine.accounts, engine.units, engine.stats))
    # BTC-PERP is open in isolated margin: a cross fill on it is bad input.
    with pytest.raises(Rejected) as rejected:
        fill(engine, "f3", "BTC-PERP", 0.5, 50_000.0)
    assert rejected.value.reason == Reason.MARGIN_MODE_CONFLICT
    assert "holds BTC-PERP in isolated margin" in str(rejected.value)
    # ETH-PERP is open in cross: an isolated fill on it is bad input too.
    with pytest.raises(Rejected, match="margin_mode_conflict"):
        fill(engine, "f4", "ETH-PERP", -10.0, 2_500.0, mode="isolated")
    assert copy.deepcopy((engine.accounts, engine.units, engine.stats)) == before
    # Its id was not recorded as applied: the same fill id, in the right mode, applies.
    assert fill(engine, "f3", "BTC-PERP", 0.5, 50_000.0, mode="isolated") == []
    assert engine.units[BTC_UNIT].positions["BTC-PERP"].qty == 1.5
    # A duplicate is recognised before the mode: a retry of f1 in cross mode is a duplicate.
    assert fill(engine, "f1", "BTC-PERP", 1.0, 50_000.0) == []
    assert engine.stats.duplicates == 1


def test_replay_dead_letters_a_mode_conflict_as_bad_input(risk) -> None:
    lines = [orjson.dumps({"topic": topic, "value": value}) for topic, value in [
        ("ledger", {"entry_id": "d1", "account": "a", "asset": "USDT", "amount": 1_000.0,
                    "kind": "deposit", "ts": 1}),
        ("fills", {"fill_id": "f1", "account": "a", "symbol": "BTC-PERP", "side": "buy",
                   "qty": 0.01, "price": 50_000.0, "ts": 2}),
        ("fills", {"fill_id": "f2", "account": "a", "symbol": "BTC-PERP", "side": "buy",
                   "qty": 0.01, "price": 50_000.0, "ts": 3, "margin_mode": "isolated"}),
    ]]
    rejections: list[tuple[int, Rejected]] = []
    summary = replay(lines, Engine(risk), io.BytesIO(),
                     lambda index, rejection: rejections.append((index, rejection)))
    assert [(index, r.reason) for index, r in rejections] == [(2, "margin_mode_conflict")]
    assert summary.rejected == {"margin_mode_conflict": 1}


def test_isolated_margin_evaluates_the_cross_account_first_then_the_unit(risk) -> None:
    engine = Engine(risk)
    tick(engine, "BTC-PERP", 50_000.0)
    deposit(engine, "d1", 400.0)
    fill(engine, "f1", "BTC-PERP", 1.0, 50_000.0)  # cross: 200 / 400, healthy
    fund(engine, "m1", "ETH-PERP", 50.0)  # cross: 200 / 350, healthy
    fill(engine, "f2", "ETH-PERP", 10.0, 2_000.0, mode="isolated")  # 1 ETH: 20 / 50
    # ETH at 1,950: the unit's equity is 50 − 50 = 0 with MM 19.5: insolvent.
    (liquidation,) = tick(engine, "ETH-PERP", 1_950.0)
    assert liquidation.event_id == "a/ETH-PERP:1:liquidation"
    # Moving 150 more to the ETH-PERP wallet: the cross account (200 left, MM 200, ratio 1.0)
    # is liquidated, then the unit (equity 150, MM 19.5, ratio 0.13) recovers.
    events = fund(engine, "m2", "ETH-PERP", 150.0)
    assert [e.event_id for e in events] == ["a:1:liquidation", "a/ETH-PERP:2:recovered"]


def order_config() -> dict[str, Any]:
    """RISK plus a BTC quarterly future marked by the BTC-PERP symbol, so that one tick moves
    an account's cross margin and its isolated positions in both instruments."""
    risk = copy.deepcopy(RISK)
    risk["instruments"]["BTC-Q"] = {**risk["instruments"]["BTC-PERP"],
                                    "mark_symbol": "BTC-PERP"}
    return risk


def test_events_of_one_tick_by_account_cross_first_then_units_by_symbol() -> None:
    engine = Engine(parse_config(order_config()))
    tick(engine, "BTC-PERP", 50_000.0)
    # "a" trades BTC-Q in cross on 300 USDT; "a-b" and "a" hold isolated positions on
    # 300-USDT wallets. Each is 1 BTC long from 50,000: 200 / 300 until the tick.
    for account in ("a", "a-b"):
        deposit(engine, f"d-{account}", 1_000.0, account=account)
    engine.apply(LedgerEntry("w", "a", "USDT", -400.0, "withdrawal", 1), Source("ledger", 0, 9))
    fill(engine, "c1", "BTC-Q", 1.0, 50_000.0)
    for account, symbol in (("a-b", "BTC-Q"), ("a", "BTC-PERP"), ("a-b", "BTC-PERP")):
        fund(engine, f"m-{account}-{symbol}", symbol, 300.0, account=account)
        fill(engine, f"i-{account}-{symbol}", symbol, 1.0, 50_000.0, mode="isolated",
             account=account)
    # 49,890: equity 190, MM 199.56: all four are liquidated. By account ("a" < "a-b"), the
    # cross margin first, then isolated positions by symbol — not by the text of the id,
    # which would put "a-b/…" before "a/…".
    events = tick(engine, "BTC-PERP", 49_890.0)
    assert [e.event_id for e in events] == [
        "a:1:liquidation", "a/BTC-PERP:1:liquidation", "a-b/BTC-PERP:1:liquidation",
        "a-b/BTC-Q:1:liquidation"]


@pytest.mark.parametrize("engine_class", [Engine, ReferenceEngine])
def test_an_unfunded_unit_lists_its_empty_wallet_in_its_events(risk, engine_class) -> None:
    """SPEC §4.1: an isolated event's `balances` is `{settle: ib}`, a wallet at 0 too; a
    consumer reading `balances["USDT"]` must find it."""
    engine = engine_class(risk)
    tick(engine, "BTC-PERP", 50_000.0)
    deposit(engine, "d1", 1_000.0)
    # 1 BTC-PERP short from 50,000, no wallet: equity 0, MM 0.004 · 50,000 = 200, insolvent.
    (event,) = fill(engine, "f1", "BTC-PERP", -1.0, 50_000.0, mode="isolated")
    p = event.payload
    assert (event.event_id, p["insolvent"], p["equity"]) == (
        "a/BTC-PERP:1:liquidation", True, 0.0)
    assert p["balances"] == {"USDT": 0.0}
    assert schema_errors("event", orjson.loads(event.encode())) == []


def test_isolated_and_cross_events_validate_against_the_event_schema(engine) -> None:
    engine.apply(LedgerEntry("w1", "a", "USDT", -8_600.0, "withdrawal", 1),
                 Source("ledger", index=5))
    (unit_event,) = tick(engine, "BTC-PERP", 49_180.0)
    (cross_event,) = tick(engine, "ETH-PERP", 2_380.0)
    unit, cross = (orjson.loads(event.encode()) for event in (unit_event, cross_event))
    assert schema_errors("event", unit) == [] and schema_errors("event", cross) == []
    # An isolated event names its symbol; a cross event does not.
    assert schema_errors("event", {k: v for k, v in unit.items() if k != "symbol"}) != []
    assert schema_errors("event", {**cross, "symbol": "ETH-PERP"}) != []


def test_a_tick_revalues_only_the_isolated_positions_whose_band_it_leaves(
    risk: RiskConfig,
) -> None:
    """Isolated positions are filed in the price-band index like accounts: 20 well-funded ones
    (0.1 BTC on a 4,000 wallet: ratio 20 / 4,000) and one thin (1 BTC on 300: 200 / 300).
    A 0.2 % fall to 49,900 cannot move the well-funded ones (their bands are wide) and is
    re-valued only for the thin one, which it takes to 199.6 / 200 = 0.998: margin call."""
    engine = Engine(risk)
    tick(engine, "BTC-PERP", 50_000.0)
    for n in range(20):
        deposit(engine, f"d{n}", 4_000.0, account=f"w{n:02d}")
        fund(engine, f"m{n}", "BTC-PERP", 4_000.0, account=f"w{n:02d}")
        fill(engine, f"f{n}", "BTC-PERP", 0.1, 50_000.0, mode="isolated", account=f"w{n:02d}")
    deposit(engine, "d-thin", 300.0, account="thin")
    fund(engine, "m-thin", "BTC-PERP", 300.0, account="thin")
    fill(engine, "f-thin", "BTC-PERP", 1.0, 50_000.0, mode="isolated", account="thin")
    anchors = engine.book.aid.copy()  # a row re-valued is re-filed under a new anchor id
    (event,) = tick(engine, "BTC-PERP", 49_900.0)
    assert event.event_id == "thin/BTC-PERP:1:margin_call"
    refiled = np.flatnonzero(engine.book.aid != anchors).tolist()
    assert [engine.book.ids[row] for row in refiled] == [UnitKey("thin", "BTC-PERP")]
