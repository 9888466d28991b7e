"""The liquidation plan (SPEC §5.1), each example worked by hand, and the property that executing
a plan's steps as fills leaves LIQUIDATING at exactly the planned ratio, and no less does.

Config: tests/support/risk.py's RISK, liquidation_target 0.9 (default 1.0 − 2·0.05). BTC-PERP tiers
mmr 0.004 up to 50,000, then 0.005 (cum 50); ETH-PERP (cs 0.1) mmr 0.01 up to 10,000, then 0.02
(cum 100); ETHBTC-PERP settles in BTC (weight 0.95), mmr 0.01 up to 5 BTC.
"""

from __future__ import annotations

import copy
import math
from typing import Any
from unittest import mock

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from monitor import liquidation as liquidation_module
from monitor.account import Account
from monitor.config import RiskConfig, parse_config
from monitor.engine import Engine
from monitor.events import Source
from monitor.liquidation import LiquidationPlan, liquidation_plan
from monitor.margin import Position, value_account
from monitor.records import Fill, PriceTick
from monitor.reference import ReferenceEngine
from monitor.state import AccountState
from tests.support.risk import RISK


def config_with_fees(**fees: float) -> RiskConfig:
    raw = copy.deepcopy(RISK)
    for symbol, fee in fees.items():
        raw["instruments"][symbol]["liquidation_fee"] = fee
    return parse_config(raw)


def plan(config: RiskConfig, balances: dict[str, float], positions: dict[str, Position],
         prices: dict[str, float]) -> LiquidationPlan:
    return liquidation_plan(balances, positions, config, prices)


# -- worked examples ------------------------------------------------------------------------------


def test_one_position_is_reduced_to_the_target_paying_its_fee() -> None:
    # 1 BTC long from 50,000 at mark 49,890 on 300 USDT, fee 0.001: equity 300 − 110 = 190,
    # MM 49,890 · 0.004 = 199.56 (ratio 1.05). Selling Δ at the mark moves −110·Δ from uPnL to
    # the balance (equity unchanged) and pays 49.89·Δ: f(Δ) = 199.56·(1 − Δ) − 0.9·(190 −
    # 49.89·Δ) = 28.56 − 154.659·Δ, so Δ = 28.56 / 154.659.
    p = plan(config_with_fees(**{"BTC-PERP": 0.001}), {"USDT": 300.0},
             {"BTC-PERP": Position(1.0, 50_000.0)}, {"BTC-PERP": 49_890.0})
    (step,) = p.steps
    assert (step.symbol, step.side, step.price, step.close) == ("BTC-PERP", "sell", 49_890.0,
                                                                 False)
    assert step.qty == pytest.approx(28.56 / 154.659, rel=1e-12)
    assert step.fee == pytest.approx(49.89 * 28.56 / 154.659, rel=1e-12)
    assert step.margin_ratio_after == pytest.approx(0.9, rel=1e-12)
    assert p.margin_ratio_after == pytest.approx(0.9, rel=1e-12)
    assert p.target_ratio == 0.9
    assert p.deposit_to_target == pytest.approx(199.56 / 0.9 - 190, rel=1e-12)  # 31.73
    assert p.bad_debt == 0.0


def test_positions_are_reduced_largest_maintenance_first_closing_until_one_suffices(
    risk,
) -> None:
    # ETH-PERP −40 (cs 0.1) at 2,500: notional 10,000, MM 100; BTC-PERP 0.25 at 50,000: MM 50.
    # On 50 USDT the ratio is 150 / 50 = 3. ETH first (larger MM, though "BTC" sorts first):
    # even flat it leaves 50 / 50 = 1.0 > 0.9, so it is closed. Then BTC: 50 − 200·Δ ≤ 0.9·50
    # gives Δ = 0.025.
    p = plan(risk, {"USDT": 50.0},
             {"BTC-PERP": Position(0.25, 50_000.0), "ETH-PERP": Position(-40.0, 2_500.0)},
             {"BTC-PERP": 50_000.0, "ETH-PERP": 2_500.0})
    first, second = p.steps
    assert (first.symbol, first.side, first.qty, first.close) == ("ETH-PERP", "buy", 40.0, True)
    assert first.margin_ratio_after == pytest.approx(1.0, rel=1e-12)
    assert (second.symbol, second.side, second.close) == ("BTC-PERP", "sell", False)
    assert second.qty == pytest.approx(0.025, rel=1e-12)
    assert p.margin_ratio_after == pytest.approx(0.9, rel=1e-12)


def test_a_reduction_across_a_tier_boundary_is_solved_in_the_lower_tier(risk) -> None:
    # 1.2 BTC at 50,000: notional 60,000 in tier 2, MM 300 − 50 = 250; 200 USDT: ratio 1.25.
    # Tier 2's line would give 250·(1 − Δ/1.2)... = 180 at Δ = 0.28, but below notional 50,000
    # (Δ > 0.2) tier 1 applies: 200·(1.2 − Δ) = 180 at Δ = 0.3.
    p = plan(risk, {"USDT": 200.0}, {"BTC-PERP": Position(1.2, 50_000.0)},
             {"BTC-PERP": 50_000.0})
    (step,) = p.steps
    assert step.qty == pytest.approx(0.3, rel=1e-12)
    assert step.margin_ratio_after == pytest.approx(0.9, rel=1e-12)


def test_a_fee_above_the_maintenance_rate_closes_the_position_and_goes_on() -> None:
    # BTC-PERP 1 at 50,000 (MM 200) with fee 0.005 > 0.004 / 0.9: each BTC sold frees 200 of
    # MM but costs 0.9·250 of target equity, so f(Δ) = 48 + 25·Δ never reaches 0: close it,
    # paying 250. ETH-PERP −58 at 2,500: notional 14,500, MM 290 − 100 = 190. On 380 USDT the
    # ratio is 390 / 380; after the close 190 / 130. Then ETH (tier 2 throughout):
    # 0.02·N − 100 = 0.9·130 gives N = 10,850, i.e. 43.4 contracts left: Δ = 14.6.
    p = plan(config_with_fees(**{"BTC-PERP": 0.005}), {"USDT": 380.0},
             {"BTC-PERP": Position(1.0, 50_000.0), "ETH-PERP": Position(-58.0, 2_500.0)},
             {"BTC-PERP": 50_000.0, "ETH-PERP": 2_500.0})
    first, second = p.steps
    assert (first.symbol, first.qty, first.close) == ("BTC-PERP", 1.0, True)
    assert first.fee == pytest.approx(250.0, rel=1e-12)
    assert first.margin_ratio_after == pytest.approx(190 / 130, rel=1e-12)
    assert (second.symbol, second.fee, second.close) == ("ETH-PERP", 0.0, False)
    assert second.qty == pytest.approx(14.6, rel=1e-12)
    assert p.margin_ratio_after == pytest.approx(0.9, rel=1e-12)


def test_a_settle_balance_crossing_zero_loses_its_haircut_mid_reduction(risk) -> None:
    # ETHBTC-PERP 100 from 0.05 at mark 0.045, BTC at 50,000: uPnL −25,000, notional 4.5 BTC,
    # MM 4.5 · 0.01 · 50,000 = 2,250. Balances 16,000 USDT and 0.2 BTC (worth 0.95 · 10,000):
    # equity 500, ratio 4.5. Selling Δ realizes −0.005·Δ BTC, so the BTC balance crosses 0 at
    # Δ = 40. Before: equity 500 + 12.5·Δ (a realized loss costs only 95 % of collateral but
    # removes all of its uPnL), f = 1,800 − 33.75·Δ, which would reach 0 at 53.3 — past 40.
    # After: equity stays 1,000, f = 1,350 − 22.5·Δ: Δ = 60 (MM 900, equity 1,000).
    p = plan(risk, {"USDT": 16_000.0, "BTC": 0.2}, {"ETHBTC-PERP": Position(100.0, 0.05)},
             {"ETHBTC-PERP": 0.045, "BTC": 50_000.0})
    (step,) = p.steps
    assert step.qty == pytest.approx(60.0, rel=1e-12)
    assert step.margin_ratio_after == pytest.approx(0.9, rel=1e-12)


def test_an_insolvent_account_is_closed_out_and_reports_its_bad_debt(risk) -> None:
    # BTC-PERP 1 from 50,000 at 49,600 on 300 USDT: equity −100, MM 198.4; ETH-PERP −10 at
    # 2,500: MM 25. No reduction brings equity above 0 (no fee, the mark is the price), so each
    # position is closed: insolvent (null) after BTC, flat (ratio 0) after ETH. The insurance
    # fund owes 100; a deposit of 223.4 / 0.9 + 100 would have restored the target instead.
    p = plan(risk, {"USDT": 300.0},
             {"BTC-PERP": Position(1.0, 50_000.0), "ETH-PERP": Position(-10.0, 2_500.0)},
             {"BTC-PERP": 49_600.0, "ETH-PERP": 2_500.0})
    assert [(s.symbol, s.qty, s.close) for s in p.steps] == [("BTC-PERP", 1.0, True),
                                                            ("ETH-PERP", 10.0, True)]
    assert math.isinf(p.steps[0].margin_ratio_after)
    assert p.steps[1].margin_ratio_after == 0.0
    assert p.bad_debt == pytest.approx(100.0, rel=1e-12)
    assert p.deposit_to_target == pytest.approx(223.4 / 0.9 + 100, rel=1e-12)
    plain = p.to_json()
    assert plain["steps"][0]["margin_ratio_after"] is None
    assert plain["margin_ratio_after"] == 0.0


def test_a_target_reached_before_any_reduction_plans_no_step(risk) -> None:
    # Ratio 200 / 1,000 = 0.2 ≤ 0.9: nothing to sell, nothing to deposit.
    p = plan(risk, {"USDT": 1_000.0}, {"BTC-PERP": Position(1.0, 50_000.0)},
             {"BTC-PERP": 50_000.0})
    assert (p.steps, p.deposit_to_target, p.bad_debt) == ((), 0.0, 0.0)
    assert p.margin_ratio_after == pytest.approx(0.2)


# -- in events ----------------------------------------------------------------------------------


def run_both(config: RiskConfig) -> list[list[dict[str, Any]]]:
    """1 BTC long on 300 USDT, then the mark falls to 49,890 (liquidation) and recovers."""
    out = []
    for engine in (Engine(config), ReferenceEngine(config)):
        engine.load_account("a", Account(balances={"USDT": 300.0},
                                         positions={"BTC-PERP": Position(1.0, 50_000.0)}))
        events = []
        for index, price in enumerate([49_890.0, 50_500.0]):
            events += engine.apply(PriceTick("BTC-PERP", price, 1_000 + index),
                                   Source(topic="prices", index=index))
        out.append([event.payload for event in events])
    return out


def test_a_liquidation_event_carries_the_plan_and_other_events_do_not(risk) -> None:
    columnar, reference = run_both(risk)
    assert [e["type"] for e in columnar] == ["liquidation", "recovered"]
    # No fee: Δ = 1 − 0.9·190 / 199.56.
    plan_json = columnar[0]["liquidation_plan"]
    assert plan_json["steps"][0]["qty"] == pytest.approx(1 - 171 / 199.56, rel=1e-12)
    assert "liquidation_plan" not in columnar[1]
    assert columnar == reference


# -- property: executing the plan ----------------------------------------------------------------

SYMBOLS = ["BTC-PERP", "ETH-PERP", "ETHBTC-PERP"]
MARKS = {"BTC-PERP": 50_000.0, "ETH-PERP": 2_500.0, "ETHBTC-PERP": 0.05}
SCALE = {"BTC-PERP": 1.0, "ETH-PERP": 100.0, "ETHBTC-PERP": 100.0}  # ~50,000 / 25,000 / 5 BTC


@st.composite
def liquidating_accounts(draw: st.DrawFn) -> tuple[RiskConfig, Account, dict[str, float]]:
    fees = {s: draw(st.sampled_from([0.0, 0.0, 0.001, 0.004, 0.02])) for s in SYMBOLS}
    config = config_with_fees(**fees)
    prices = {"BTC": draw(st.floats(20_000, 80_000))}
    positions = {}
    for symbol in draw(st.lists(st.sampled_from(SYMBOLS), min_size=1, max_size=3, unique=True)):
        qty = draw(st.floats(0.05, 3.0)) * SCALE[symbol] * draw(st.sampled_from([1, -1]))
        entry = MARKS[symbol] * draw(st.floats(0.8, 1.2))
        prices[symbol] = MARKS[symbol] * draw(st.floats(0.8, 1.2))
        positions[symbol] = Position(qty, entry)
    # The USDT balance puts the ratio at a drawn level ≥ the liquidation threshold (or the
    # account at a drawn negative equity), whatever the BTC balance and the positions make.
    balances = {"BTC": draw(st.floats(-0.5, 1.0))}
    base = value_account(balances, positions, config, prices)
    assert base is not None
    if draw(st.integers(0, 3)):
        equity = base.maintenance_margin / draw(st.floats(1.0, 5.0))
    else:
        equity = -draw(st.floats(0.0, 2.0)) * base.maintenance_margin
    balances["USDT"] = equity - base.equity
    balances = {asset: amount for asset, amount in balances.items() if amount != 0}
    account = Account(balances=balances, positions=positions,
                      state=AccountState.LIQUIDATING, transitions=1)
    return config, account, prices


def execute(config: RiskConfig, account: Account, prices: dict[str, float],
            fills: list[tuple[str, str, float, float, float]]) -> ReferenceEngine:
    """An engine holding the account at these prices, after the given fills (§4)."""
    engine = ReferenceEngine(config)
    engine.load_prices({symbol: (price, 0) for symbol, price in prices.items()})
    engine.load_account("a", copy.deepcopy(account))
    for n, (symbol, side, qty, price, fee) in enumerate(fills):
        engine.apply(Fill(fill_id=f"liq-{n}", account="a", symbol=symbol, side=side, qty=qty,
                          price=price, fee=fee, ts=1),
                     Source(topic="fills", index=n))
    return engine


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])
@given(liquidating_accounts())
def test_executing_the_plan_leaves_liquidation_at_the_planned_ratio_and_no_less_does(
    case: tuple[RiskConfig, Account, dict[str, float]],
) -> None:
    config, account, prices = case
    valuation = value_account(account.balances, account.positions, config, prices)
    assert valuation is not None
    assume(valuation.ratio >= config.thresholds.liquidation)  # rounding can put it just below
    p = liquidation_plan(account.balances, account.positions, config, prices)
    fills = [(s.symbol, s.side, s.qty, s.price, s.fee) for s in p.steps]
    after = execute(config, account, prices, fills)
    assert after.accounts["a"].state != AccountState.LIQUIDATING
    ratio = value_account(after.accounts["a"].balances, after.accounts["a"].positions, config,
                          prices).ratio
    if math.isinf(p.margin_ratio_after):
        assert math.isinf(ratio)
    else:
        assert ratio == pytest.approx(p.margin_ratio_after, rel=1e-9, abs=1e-12)
        assert ratio <= config.thresholds.liquidation_target * (1 + 1e-9)
    symbol, side, qty, price, fee = fills[-1]
    less = qty * (1 - 1e-6)
    short = execute(config, account, prices,
                    [*fills[:-1], (symbol, side, less, price, fee * (1 - 1e-6))])
    held = short.accounts["a"]
    assert value_account(held.balances, held.positions, config, prices).ratio > \
        config.thresholds.liquidation_target


@settings(max_examples=200, deadline=None)
@given(liquidating_accounts())
def test_a_step_revalues_only_the_position_it_reduces_and_plans_what_from_scratch_does(
    case: tuple[RiskConfig, Account, dict[str, float]],
) -> None:
    """Each breakpoint reuses the other positions' figures (`value_account`'s ``known``);
    valued entirely from scratch, every step and figure of the plan comes out bit for bit
    the same."""
    config, account, prices = case

    def from_scratch(*args: Any, known: Any = None, **kwargs: Any) -> Any:
        return value_account(*args, **kwargs)

    reused = liquidation_plan(account.balances, account.positions, config, prices)
    with mock.patch.object(liquidation_module, "value_account", from_scratch):
        scratch = liquidation_plan(account.balances, account.positions, config, prices)
    assert reused == scratch
