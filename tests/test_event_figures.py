"""What an event reports, computed from the book's columns (`Book.event_figures`), with worked
numbers from tests.support.risk: BTC-PERP's first tier ends at a notional of 50,000 (MMR 0.4 %,
IMR 0.8 %), the second at 250,000 (0.5 %, 1 %, maintenance amount 50). Bit-identity with
margin.py and the liquidation plan on long streams is tested in test_engine_scale; here, what
those streams seldom reach."""

from __future__ import annotations

from typing import Any

import pytest

from monitor.book import figures
from monitor.config import parse_config
from monitor.engine import Engine
from monitor.events import Event, Source, build_event
from monitor.liquidation import liquidation_plan
from monitor.margin import Position, Valuation
from monitor.state import AccountState
from tests.support.records import fill, ledger, tick


def reported(engine: Engine, account: str) -> tuple[int, list[float], list[list[float]]]:
    book = engine.book
    count = book.event_figures(book.row_of(account))
    return count, book.account_figures.tolist(), book.position_figures[:count].tolist()


@pytest.fixture
def engine(risk) -> Engine:
    engine = Engine(risk)
    tick(engine, "BTC-PERP", 50_000.0)
    return engine


def test_a_notional_exactly_at_a_tier_bound_is_in_that_tier(engine) -> None:
    ledger(engine, "a", "USDT", 10_000.0)
    fill(engine, "a", "BTC-PERP", 1.0, 50_000.0)  # notional 50,000: the first tier's bound
    count, account, (position,) = reported(engine, "a")
    assert count == 1 and position[figures.P_TIER] == 0
    assert (position[figures.P_MM], position[figures.P_IM]) == (200.0, 400.0)
    assert (account[figures.MM], account[figures.IM], account[figures.EQUITY]) == (
        200.0, 400.0, 10_000.0)
    assert account[figures.RATIO] == 0.02


def test_a_notional_past_a_tier_bound_is_in_the_next_tier(engine) -> None:
    ledger(engine, "a", "USDT", 10_000.0)
    fill(engine, "a", "BTC-PERP", 2.0, 50_000.0)  # 100,000: second tier, 0.5 % − 50
    _, _, (position,) = reported(engine, "a")
    assert position[figures.P_TIER] == 1
    assert (position[figures.P_MM], position[figures.P_IM]) == (450.0, 1_000.0)


def test_liquidation_and_bankruptcy_prices_of_a_single_long(engine) -> None:
    ledger(engine, "a", "USDT", 10_000.0)
    fill(engine, "a", "BTC-PERP", 1.0, 50_000.0)
    _, _, (position,) = reported(engine, "a")
    # equity 10,000 + (p − 50,000) = MM 0.004·p at p = 40,000 / 0.996
    assert position[figures.P_LIQUIDATION] == pytest.approx(40_160.642570281, rel=1e-12)
    assert position[figures.P_BANKRUPTCY] == 40_000.0  # equity 0


def test_a_price_python_reports_as_none_is_nan(engine) -> None:
    ledger(engine, "a", "USDT", 100_000.0)
    fill(engine, "a", "BTC-PERP", 1.0, 50_000.0)  # equity covers the notional twice
    _, _, (position,) = reported(engine, "a")
    assert position[figures.P_LIQUIDATION] != position[figures.P_LIQUIDATION]
    assert position[figures.P_BANKRUPTCY] != position[figures.P_BANKRUPTCY]


def test_a_balance_without_a_price_counts_nothing_and_is_reported_unpriced(engine) -> None:
    ledger(engine, "a", "USDT", 1_000.0)
    ledger(engine, "a", "BTC", 1.0)  # no BTC tick yet
    count, account, _ = reported(engine, "a")
    assert count == 0
    assert (account[figures.COLLATERAL], account[figures.UNPRICED]) == (1_000.0, 1.0)


def test_a_position_whose_settle_asset_has_no_price_cannot_be_valued(engine) -> None:
    ledger(engine, "a", "USDT", 1_000.0)
    fill(engine, "a", "ETHBTC-PERP", 1.0, 0.05)  # settles in BTC, never ticked
    assert reported(engine, "a")[0] == -1


# -- the liquidation plan (`Book.liquidation_plan`) ------------------------------------------------

def plan_of_event(engine: Engine, events: list) -> dict:
    """The one event's plan, checked against `liquidation.liquidation_plan` from scratch."""
    (event,) = events
    account = engine.accounts[event.account]
    assert event.payload["liquidation_plan"] == liquidation_plan(
        account.balances, account.positions, engine.config, engine.prices).to_json()
    return event.payload["liquidation_plan"]


def test_positions_with_equal_maintenance_are_reduced_in_symbol_order() -> None:
    # Two instruments alike but for their names, B-PERP first in the config: long 1 of each
    # at 100 on 3.5 USDT. B-PERP marked 99: 1.99 / 2.5, healthy; then A-PERP: MM 0.99 each,
    # equity 1.5, ratio 1.32. Selling Δ of A-PERP, the first by symbol, keeps equity at 1.5
    # (the loss moves from PnL to balance) and leaves MM 0.99·(2 − Δ): 0.9 at Δ = 1 − 0.36/0.99.
    tiers = [{"max_notional": "inf", "mmr": 0.01, "imr": 0.02}]
    engine = Engine(parse_config({
        "thresholds": {"margin_call": 0.8, "liquidation": 1.0, "hysteresis": 0.05},
        "assets": {"USDT": {"collateral_weight": 1.0, "price": 1.0}},
        "instruments": {name: {"settle": "USDT", "contract_size": 1.0, "tiers": tiers}
                        for name in ("B-PERP", "A-PERP")}}))
    ledger(engine, "a", "USDT", 3.5)
    for symbol in ("B-PERP", "A-PERP"):
        tick(engine, symbol, 100.0)
        fill(engine, "a", symbol, 1.0, 100.0)
    tick(engine, "B-PERP", 99.0)
    (step,) = plan_of_event(engine, tick(engine, "A-PERP", 99.0))["steps"]
    assert (step["symbol"], step["side"], step["close"]) == ("A-PERP", "sell", False)
    assert step["qty"] == pytest.approx(1 - 0.36 / 0.99, rel=1e-9)


def test_a_reduction_leaving_only_float_rounding_closes_the_whole_position(engine) -> None:
    # Long 1 BTC-PERP from 50,000 on 1,000.0000001 USDT, marked 49,000: MM 196, equity 1e-7.
    # Closing it all leaves 1e-7: f = −0.9e-7 at Δ = 1, so the root is 1 − 4.6e-10, whose
    # remainder is within DUST of the position: a fill would close it, so the step does.
    ledger(engine, "a", "USDT", 1_000.0000001)
    fill(engine, "a", "BTC-PERP", 1.0, 50_000.0)
    (step,) = plan_of_event(engine, tick(engine, "BTC-PERP", 49_000.0))["steps"]
    assert (step["qty"], step["close"], step["margin_ratio_after"]) == (1.0, True, 0.0)


# -- build_event: what it computes, and what it cannot ------------------------------------------

def event_of(risk, state: AccountState, **figures_given: Any) -> Event:
    """The event of an account holding 1 BTC-PERP long at 50,000 on 10,000 USDT, moving to
    ``state``: MM 200, equity 10,000."""
    valuation = Valuation(10_000.0, 0.0, 10_000.0, 200.0, 400.0, 0.02, False)
    return build_event(account="a", transition=1, previous=AccountState.HEALTHY, state=state,
                       valuation=valuation, balances={"USDT": 10_000.0}, config=risk,
                       price_ts={}, ts=1, trigger_kind="tick", trigger_ref="BTC-PERP",
                       source=Source("prices", 0, 0), **figures_given)


def test_an_event_computes_its_positions_from_the_positions_given(risk) -> None:
    event = event_of(risk, AccountState.MARGIN_CALL,
                     positions={"BTC-PERP": Position(1.0, 50_000.0)},
                     prices={"BTC-PERP": 50_000.0, "USDT": 1.0})
    (position,) = event.payload["positions"]
    assert (position["symbol"], position["notional"], position["maintenance_margin"]) == (
        "BTC-PERP", 50_000.0, 200.0)


def test_an_event_given_its_figures_needs_no_positions(risk) -> None:
    details = [{"symbol": "BTC-PERP"}]  # what the caller computed: taken as it is
    plan = {"steps": []}
    event = event_of(risk, AccountState.LIQUIDATING, details=details, plan=plan)
    assert (event.payload["positions"], event.payload["liquidation_plan"]) == (details, plan)


def test_a_liquidation_without_its_plan_or_positions_is_refused(risk) -> None:
    with pytest.raises(TypeError, match="positions and prices are needed"):
        event_of(risk, AccountState.LIQUIDATING, details=[])
