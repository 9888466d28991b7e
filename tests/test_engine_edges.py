"""The engine's own decision path (SPEC §4, §5), held at exactly its edges by hand-worked numbers.

The engine does not decide with `margin.py` and `state.py`: `book/kernels.py` repeats the
valuation and the transition rule, and a tick re-values an account only when it leaves its
safe band. Each scenario below puts a ratio exactly on a boundary (both sides, the near side
within 1e-6) so that an off-by-one comparison, a dropped term or a band drawn too wide changes
the events. Each docstring names the mutations of the product it was seen to kill.

Config (tests/conftest.py): margin_call 0.8, liquidation 1.0, hysteresis 0.05, so the four
boundaries are 1.0, 0.8, 0.95 and 0.75 (1.0 − 0.05 and 0.8 − 0.05 are exactly 0.95 and 0.75 in
float64). Every scenario runs on one account, re-valued alone, and on 60 identical accounts,
whose bands a tick files in one pass (`store.ANCHOR_ONE_BY_ONE`): two filing paths to hold.
"""

from __future__ import annotations

import pytest

from monitor.book.store import ANCHOR_ONE_BY_ONE
from monitor.config import RiskConfig
from monitor.engine import Engine
from tests.support.records import fill, ledger, tick, types


@pytest.fixture(params=[1, ANCHOR_ONE_BY_ONE + 12], ids=["one", "many"])
def accounts(request: pytest.FixtureRequest) -> int:
    return request.param


def open_books(engine: Engine, accounts: int, deposits: dict[str, float], symbol: str,
               qty: float, price: float) -> None:
    """Give each account the same collateral and the same long, opened at ``price``."""
    for n in range(accounts):
        name = f"acct-{n:02d}"
        for asset, amount in deposits.items():
            ledger(engine, name, asset, amount)
        assert fill(engine, name, symbol, qty, price) == []  # opens healthy


def test_margin_call_at_exactly_the_margin_call_ratio_not_just_below(
    risk: RiskConfig, accounts: int,
) -> None:
    """250 USDT, long 1 BTC-PERP from 50,000 (tier 1): MM = 0.004·p, equity = p − 49,750.

    kills: kernels.py `ratio >= mc` → `>`; state.py `>= margin_call` → `>`;
    kernels.py _safe_eps measures a HEALTHY band up to liquidation instead of margin_call."""
    engine = Engine(risk)
    tick(engine, "BTC-PERP", 50_100.0)  # 200.4 / 350 = 0.573 at the opening fill
    open_books(engine, accounts, {"USDT": 250.0}, "BTC-PERP", 1.0, 50_000.0)
    near = 0.004 * 50_000.0001 / (50_000.0001 - 49_750)  # 200.0000004 / 250.0001
    assert 0.8 - 1e-6 < near < 0.8
    assert tick(engine, "BTC-PERP", 50_000.0001) == []
    events = tick(engine, "BTC-PERP", 50_000.0)  # 200 / 250 = 0.8 exactly
    assert types(events) == ["margin_call"] * accounts
    assert {e.payload["margin_ratio"] for e in events} == {0.8}


def test_liquidation_at_exactly_the_liquidation_ratio_not_just_below(
    risk: RiskConfig, accounts: int,
) -> None:
    """200 USDT, long 1 BTC-PERP from 50,000 (tier 1): MM = 0.004·p, equity = p − 49,800.

    kills: kernels.py `ratio >= liq` → `>`; state.py `>= liquidation` → `>`;
    kernels.py _safe_eps measures a MARGIN_CALL band up to liquidation + hysteresis."""
    engine = Engine(risk)
    tick(engine, "BTC-PERP", 50_100.0)  # 200.4 / 300 = 0.668 at the opening fill
    open_books(engine, accounts, {"USDT": 200.0}, "BTC-PERP", 1.0, 50_000.0)
    assert types(tick(engine, "BTC-PERP", 50_020.0)) == ["margin_call"] * accounts  # 0.909
    near = 0.004 * 50_000.0001 / (50_000.0001 - 49_800)  # 200.0000004 / 200.0001
    assert 1.0 - 1e-6 < near < 1.0
    assert tick(engine, "BTC-PERP", 50_000.0001) == []
    events = tick(engine, "BTC-PERP", 50_000.0)  # 200 / 200 = 1.0 exactly
    assert types(events) == ["liquidation"] * accounts
    assert {e.payload["previous_state"] for e in events} == {"MARGIN_CALL"}
    assert {e.payload["margin_ratio"] for e in events} == {1.0}


def test_liquidating_account_stays_at_exactly_liquidation_minus_hysteresis_and_leaves_below(
    risk: RiskConfig, accounts: int,
) -> None:
    """200 USDT, long 1 BTC-PERP from 47,500 (tier 1): MM = 0.004·p, equity = p − 47,300.

    kills: hysteresis ignored when leaving LIQUIDATING, and `>= liq − h` → `>`, each made in
    both kernels.py and state.py (made in one alone, the other's rule still holds the state:
    a transition needs both); kernels.py or state.py holding LIQUIDATING down
    to liq − 2h; kernels.py _safe_eps measuring a LIQUIDATING
    band down to liq − 2h."""
    engine = Engine(risk)
    tick(engine, "BTC-PERP", 47_600.0)  # 190.4 / 300 = 0.635 at the opening fill
    open_books(engine, accounts, {"USDT": 200.0}, "BTC-PERP", 1.0, 47_500.0)
    assert types(tick(engine, "BTC-PERP", 47_480.0)) == ["liquidation"] * accounts  # 1.055
    assert tick(engine, "BTC-PERP", 47_500.0) == []  # 190 / 200 = 0.95 exactly: stays
    near = 0.004 * 47_500.0001 / (47_500.0001 - 47_300)  # 190.0000004 / 200.0001
    assert 0.95 - 1e-6 < near < 0.95
    events = tick(engine, "BTC-PERP", 47_500.0001)
    assert types(events) == ["margin_call"] * accounts  # one level down, not to HEALTHY
    assert {e.payload["previous_state"] for e in events} == {"LIQUIDATING"}


def test_margin_call_stays_at_exactly_margin_call_minus_hysteresis_and_recovers_below(
    risk: RiskConfig, accounts: int,
) -> None:
    """200 USDT, long 1 BTC-PERP from 37,500 (tier 1): MM = 0.004·p, equity = p − 37,300.

    kills: hysteresis ignored when leaving MARGIN_CALL, and `>= mc − h` → `>`, each made in
    both kernels.py and state.py; kernels.py or state.py holding MARGIN_CALL
    down to mc − 2h; kernels.py _safe_eps measuring a
    MARGIN_CALL band down to mc − 2h."""
    engine = Engine(risk)
    tick(engine, "BTC-PERP", 37_600.0)  # 150.4 / 300 = 0.501 at the opening fill
    open_books(engine, accounts, {"USDT": 200.0}, "BTC-PERP", 1.0, 37_500.0)
    assert types(tick(engine, "BTC-PERP", 37_480.0)) == ["margin_call"] * accounts  # 0.833
    assert tick(engine, "BTC-PERP", 37_500.0) == []  # 150 / 200 = 0.75 exactly: stays
    near = 0.004 * 37_500.0001 / (37_500.0001 - 37_300)  # 150.0000004 / 200.0001
    assert 0.75 - 1e-6 < near < 0.75
    events = tick(engine, "BTC-PERP", 37_500.0001)
    assert types(events) == ["recovered"] * accounts


def test_tier_three_account_leaves_liquidation_counting_the_cumulative_maintenance_amount(
    risk: RiskConfig, accounts: int,
) -> None:
    """4,000 USDT, long 10 BTC-PERP from 51,000: N = 10·p is in tier 3 (250,000 < N ≤ 1M,
    mmr 0.01, cum = 50,000·0.001 + 250,000·0.005 = 1,300), so MM = 0.1·p − 1,300 and
    equity = 10·p − 506,000. At 51,000.0001 the ratio is just below 0.95: the account steps
    down to MARGIN_CALL. Without cum it would read 5,100 / 4,000 = 1.275 and stay.

    kills: kernels.py _value drops cum_t;
    margin.py drops the maintenance amount."""
    engine = Engine(risk)
    tick(engine, "BTC-PERP", 51_100.0)  # (5,110 − 1,300) / 5,000 = 0.762 at the opening fill
    open_books(engine, accounts, {"USDT": 4_000.0}, "BTC-PERP", 10.0, 51_000.0)
    # (5,097 − 1,300) / 3,700 = 1.026
    assert types(tick(engine, "BTC-PERP", 50_970.0)) == ["liquidation"] * accounts
    assert tick(engine, "BTC-PERP", 51_000.0) == []  # 3,800 / 4,000 = 0.95 exactly: stays
    p = 51_000.0001
    near = (0.1 * p - 1_300) / (10 * p - 506_000)  # 3,800.00001 / 4,000.001
    assert 0.95 - 1e-6 < near < 0.95
    events = tick(engine, "BTC-PERP", p)
    assert types(events) == ["margin_call"] * accounts
    assert [e.payload["maintenance_margin"] for e in events] == [
        pytest.approx(3_800.00001, rel=1e-12)] * accounts


def test_fall_of_haircut_collateral_liquidates_at_exactly_the_weighted_value(
    risk: RiskConfig, accounts: int,
) -> None:
    """0.004 BTC (collateral_weight 0.95) and no USDT, long 0.95 BTC-PERP from 50,000 with the
    mark held there: MM = 0.004 · 47,500 = 190, uPnL = 0, CV = 0.004 · 0.95 · px(BTC). A BTC
    tick to 50,000 makes CV exactly 190: ratio 1.0. At full weight CV would be 200 (0.95).

    kills: kernels.py _value ignores collateral_weight;
    margin.py ignores collateral_weight."""
    engine = Engine(risk)
    tick(engine, "BTC-PERP", 50_000.0)
    tick(engine, "BTC", 70_000.0)  # CV 266: 190 / 266 = 0.714 at the opening fill
    open_books(engine, accounts, {"BTC": 0.004}, "BTC-PERP", 0.95, 50_000.0)
    near = 190 / (0.004 * 0.95 * 50_000.01)  # 190 / 190.000038
    assert 1.0 - 1e-6 < near < 1.0
    assert types(tick(engine, "BTC", 50_000.01)) == ["margin_call"] * accounts
    events = tick(engine, "BTC", 50_000.0)
    assert types(events) == ["liquidation"] * accounts
    assert {e.payload["collateral_value"] for e in events} == {190.0}


def test_rise_of_the_settle_asset_price_liquidates_a_position_settled_in_it(
    risk: RiskConfig, accounts: int,
) -> None:
    """6,250 USDT, long 200 ETHBTC-PERP (settles in BTC) from 0.05 with the mark held there:
    N = 10 BTC, tier 2 (mmr 0.015, cum 5 · 0.005 = 0.025 BTC), MM = 0.125 BTC · px(BTC) and
    uPnL = 0. A BTC tick to 50,000 makes MM exactly 6,250: ratio 1.0.

    kills: kernels.py drops the settle price from MM; margin.py drops the settle price from MM."""
    engine = Engine(risk)
    tick(engine, "ETHBTC-PERP", 0.05)
    tick(engine, "BTC", 30_000.0)  # MM 3,750: 0.6 at the opening fill
    open_books(engine, accounts, {"USDT": 6_250.0}, "ETHBTC-PERP", 200.0, 0.05)
    near = 0.125 * 49_999.99 / 6_250  # 6,249.99875 / 6,250
    assert 1.0 - 1e-6 < near < 1.0
    assert types(tick(engine, "BTC", 49_999.99)) == ["margin_call"] * accounts
    events = tick(engine, "BTC", 50_000.0)
    assert types(events) == ["liquidation"] * accounts
    assert {e.payload["maintenance_margin"] for e in events} == {6_250.0}
