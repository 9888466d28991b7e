"""Margin mathematics (SPEC §4), each with its numbers worked by hand."""

from __future__ import annotations

import math

import pytest

from monitor.margin import (
    Position,
    apply_fill_to_position,
    bankruptcy_price,
    liquidation_price,
    margin_ratio,
    position_figures,
    value_account,
)

# -- tiers --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("notional", "mmr", "cum"),
    [
        (50_000.0, 0.004, 0.0),  # exactly at the first boundary: still tier 1
        (50_000.01, 0.005, 50.0),  # just beyond it: tier 2
        (250_000.0, 0.005, 50.0),
        (1_000_000.0, 0.01, 1300.0),
        (5_000_000.0, 0.025, 16300.0),  # beyond the last finite tier
    ],
)
def test_tier_selection_at_boundaries(risk, notional: float, mmr: float, cum: float) -> None:
    tier = risk.instruments["BTC-PERP"].tier_for(notional)
    assert tier.mmr == mmr
    assert tier.maintenance_amount == pytest.approx(cum)


def test_maintenance_margin_is_continuous_across_a_tier_boundary(risk) -> None:
    # 1 BTC at 50,000 is tier 1: 50,000 · 0.004 = 200.
    at = position_figures("BTC-PERP", Position(1.0, 50_000.0), risk, {"BTC-PERP": 50_000.0})
    assert at.maintenance_margin == pytest.approx(200.0)
    # A hair above, tier 2 with its maintenance amount: 50,000.01 · 0.005 − 50 = 200.00005.
    above = position_figures("BTC-PERP", Position(1.0, 50_000.0), risk, {"BTC-PERP": 50_000.01})
    assert above.maintenance_margin == pytest.approx(200.00005)
    assert above.initial_margin == pytest.approx(500.0001)  # imr 0.01, no maintenance amount


def test_tier_three_uses_its_maintenance_amount(risk) -> None:
    # 10 BTC at 60,000: N = 600,000 → tier 3 (mmr 0.01, cum 1300): MM = 6000 − 1300 = 4700.
    fig = position_figures("BTC-PERP", Position(-10.0, 61_000.0), risk, {"BTC-PERP": 60_000.0})
    assert fig.maintenance_margin == pytest.approx(4700.0)
    assert fig.initial_margin == pytest.approx(12_000.0)
    assert fig.unrealized_pnl == pytest.approx(-10 * (60_000 - 61_000))  # short gains 10,000


# -- positions ----------------------------------------------------------------------------------


def test_long_open_add_partial_close_flip_and_full_close() -> None:
    pos, realized = apply_fill_to_position(None, +2.0, 100.0, 1.0)
    assert (pos.qty, pos.entry_price, realized) == (2.0, 100.0, 0.0)

    pos, realized = apply_fill_to_position(pos, +1.0, 130.0, 1.0)  # add: (2·100 + 1·130) / 3
    assert (pos.qty, pos.entry_price, realized) == (3.0, 110.0, 0.0)

    pos, realized = apply_fill_to_position(pos, -1.0, 120.0, 1.0)  # close 1: 1·(120 − 110)
    assert (pos.qty, pos.entry_price, realized) == (2.0, 110.0, 10.0)

    pos, realized = apply_fill_to_position(pos, -5.0, 90.0, 1.0)  # close 2 at a loss, flip short
    assert (pos.qty, pos.entry_price, realized) == (-3.0, 90.0, 2 * (90.0 - 110.0))

    pos, realized = apply_fill_to_position(pos, +3.0, 80.0, 1.0)  # short closed: 3·(80 − 90)·−1
    assert pos is None
    assert realized == 30.0


def test_short_open_add_and_partial_close_with_contract_size() -> None:
    pos, _ = apply_fill_to_position(None, -4.0, 2000.0, 0.1)
    pos, _ = apply_fill_to_position(pos, -4.0, 2100.0, 0.1)  # (4·2000 + 4·2100) / 8 = 2050
    assert (pos.qty, pos.entry_price) == (-8.0, 2050.0)
    pos, realized = apply_fill_to_position(pos, +2.0, 2000.0, 0.1)
    # 2 contracts · 0.1 ETH · (2000 − 2050) · sign(−8) = +10
    assert realized == pytest.approx(10.0)
    assert (pos.qty, pos.entry_price) == (-6.0, 2050.0)


def test_close_of_a_position_built_from_decimal_lots_leaves_no_dust() -> None:
    pos, _ = apply_fill_to_position(None, +0.1, 50_000.0, 1.0)
    pos, _ = apply_fill_to_position(pos, +0.2, 50_000.0, 1.0)
    assert pos.qty == 0.30000000000000004  # 0.1 + 0.2 in binary floating point
    pos, realized = apply_fill_to_position(pos, -0.3, 49_600.0, 1.0)  # leaves 5.6e-17
    assert pos is None
    assert realized == pytest.approx(0.3 * (49_600.0 - 50_000.0))  # −120


def test_close_slightly_larger_than_the_position_opens_no_dust_short() -> None:
    pos, realized = apply_fill_to_position(Position(0.3, 50_000.0), -0.30000000000000004,
                                           49_600.0, 1.0)  # leaves −5.6e-17
    assert pos is None
    assert realized == pytest.approx(-120.0)


def test_remainder_above_a_billionth_of_the_trade_stays_a_position() -> None:
    # 1,000 contracts less 2e-6: 2e-9 of the trade, twice the dust bound.
    pos, _ = apply_fill_to_position(Position(1_000.0, 100.0), -999.999998, 101.0, 1.0)
    assert pos.qty == pytest.approx(2e-6)
    assert pos.entry_price == 100.0


def test_fees_and_realized_pnl_settle_into_the_balance(risk) -> None:
    from monitor.engine import Engine
    from monitor.events import Source
    from monitor.records import Fill

    engine = Engine(risk)
    src = Source("fills", index=0)
    engine.apply(Fill(fill_id="f1", account="a", symbol="BTC-PERP", side="buy", qty=1.0,
                      price=60_000.0, fee=24.0, ts=1), src)
    engine.apply(Fill(fill_id="f2", account="a", symbol="BTC-PERP", side="sell", qty=1.0,
                      price=61_000.0, fee=24.4, ts=2), src)
    # −24 fee, +1000 realized, −24.4 fee; a rebate (negative fee) would add.
    assert engine.accounts["a"].balances == {"USDT": pytest.approx(-24.0 + 1000.0 - 24.4)}
    assert engine.accounts["a"].positions == {}


# -- valuation ----------------------------------------------------------------------------------


def test_collateral_in_two_assets_with_haircuts(risk) -> None:
    val = value_account({"USDT": 1000.0, "BTC": 0.5}, {}, risk, {"BTC": 60_000.0})
    assert val.collateral_value == pytest.approx(1000 + 0.5 * 60_000 * 0.95)  # 29,500


def test_negative_balances_take_no_haircut(risk) -> None:
    val = value_account({"USDT": 5000.0, "ETH": -1.0}, {}, risk, {"ETH": 3000.0})
    assert val.collateral_value == pytest.approx(5000 - 3000)  # weight 1 on a debt


def test_unpriced_asset_counts_zero_and_is_flagged(risk) -> None:
    val = value_account({"USDT": 1000.0, "ETH": 2.0}, {}, risk, {})
    assert val.collateral_value == 1000.0
    assert val.unpriced is True


def test_mark_defaults_to_entry_price_before_any_tick(risk) -> None:
    val = value_account({"USDT": 1000.0}, {"BTC-PERP": Position(0.5, 40_000.0)}, risk, {})
    assert val.unrealized_pnl == 0.0
    assert val.maintenance_margin == pytest.approx(20_000 * 0.004)


def test_account_whose_settle_asset_is_unpriced_is_not_evaluated(risk) -> None:
    assert value_account({"BTC": 1.0}, {"ETHBTC-PERP": Position(1.0, 0.05)}, risk, {}) is None


def test_instrument_settling_in_btc(risk) -> None:
    prices = {"BTC": 60_000.0, "ETHBTC-PERP": 0.055}
    pos = Position(10.0, 0.05)
    fig = position_figures("ETHBTC-PERP", pos, risk, prices)
    # N = 10 · 1 · 0.055 = 0.55 BTC → tier 1; everything is valued at 60,000 USDT per BTC.
    assert fig.notional == pytest.approx(0.55 * 60_000)  # 33,000
    assert fig.maintenance_margin == pytest.approx(0.55 * 0.01 * 60_000)  # 330
    assert fig.initial_margin == pytest.approx(0.55 * 0.02 * 60_000)  # 660
    assert fig.unrealized_pnl == pytest.approx(10 * (0.055 - 0.05) * 60_000)  # 3000
    val = value_account({"BTC": 0.1}, {"ETHBTC-PERP": pos}, risk, prices)
    assert val.equity == pytest.approx(0.1 * 60_000 * 0.95 + 3000)  # 8700
    assert val.ratio == pytest.approx(330 / 8700)


def test_hedged_legs_offset_in_one_pool(risk) -> None:
    # Long 1 BTC-PERP at 60k and short 1 at 60k: a 10 % fall costs the long what the short gains.
    positions = {"BTC-PERP": Position(1.0, 60_000.0), "ETH-PERP": Position(-200.0, 3000.0)}
    val = value_account({"USDT": 2000.0}, positions, risk,
                        {"BTC-PERP": 54_000.0, "ETH-PERP": 2700.0})
    # BTC leg: −6000; ETH leg: −200 · 0.1 · (2700 − 3000) = +6000.
    assert val.unrealized_pnl == pytest.approx(0.0)
    assert val.equity == pytest.approx(2000.0)


# -- margin ratio -------------------------------------------------------------------------------


def test_margin_ratio_cases() -> None:
    assert margin_ratio(200.0, 250.0) == 0.8
    assert margin_ratio(0.0, -100.0) == 0.0  # nothing to maintain, even when equity is negative
    assert margin_ratio(200.0, 0.0) == math.inf  # insolvent
    assert margin_ratio(200.0, -5.0) == math.inf


@pytest.mark.parametrize(("usdt", "ratio"), [(250.0, 0.8), (200.0, 1.0)])
def test_ratio_exactly_at_each_threshold(risk, usdt: float, ratio: float) -> None:
    # 1 BTC-PERP at its entry 50,000: MM = 200, uPnL = 0, equity = the deposit.
    val = value_account({"USDT": usdt}, {"BTC-PERP": Position(1.0, 50_000.0)}, risk,
                        {"BTC-PERP": 50_000.0})
    assert val.ratio == ratio


# -- liquidation price --------------------------------------------------------------------------


def _lp(risk, pos: Position, balance: float, mark: float) -> float | None:
    prices = {"BTC-PERP": mark}
    val = value_account({"USDT": balance}, {"BTC-PERP": pos}, risk, prices)
    fig = position_figures("BTC-PERP", pos, risk, prices)
    return liquidation_price(pos, risk.instruments["BTC-PERP"], fig, val.equity,
                             val.maintenance_margin, risk.thresholds.liquidation)


def test_binance_liquidation_price_long_in_tier_two(risk) -> None:
    # LP = (WB − TMM1 + UPNL1 + cumB − side·pos·EP) / (pos·MMR − side·pos), one position:
    wb, pos, ep, mmr, cum = 20_000.0, 2.0, 60_000.0, 0.005, 50.0
    expected = (wb - 0 + 0 + cum - 1 * pos * ep) / (pos * mmr - 1 * pos)  # ≈ 50,226.13
    assert _lp(risk, Position(2.0, 60_000.0), wb, 60_000.0) == pytest.approx(expected, rel=1e-12)
    # The estimate does not depend on where the mark is now (same tier).
    assert _lp(risk, Position(2.0, 60_000.0), wb, 58_000.0) == pytest.approx(expected, rel=1e-12)


def test_binance_liquidation_price_short_in_tier_two(risk) -> None:
    wb, pos, ep, mmr, cum = 20_000.0, 2.0, 60_000.0, 0.005, 50.0
    expected = (wb + cum - (-1) * pos * ep) / (pos * mmr - (-1) * pos)  # ≈ 69,676.62
    assert _lp(risk, Position(-2.0, 60_000.0), wb, 60_000.0) == pytest.approx(expected, rel=1e-12)


def test_liquidation_price_at_that_price_the_ratio_is_the_threshold(risk) -> None:
    lp = _lp(risk, Position(2.0, 60_000.0), 20_000.0, 60_000.0)
    val = value_account({"USDT": 20_000.0}, {"BTC-PERP": Position(2.0, 60_000.0)}, risk,
                        {"BTC-PERP": lp})
    assert val.ratio == pytest.approx(1.0, rel=1e-12)


def test_liquidation_price_is_none_when_not_positive(risk) -> None:
    # A long so over-collateralised that only a negative price would liquidate it.
    assert _lp(risk, Position(0.01, 60_000.0), 1_000_000.0, 60_000.0) is None


# -- bankruptcy price (SPEC §5) -----------------------------------------------------------------


def _bp(risk, balances: dict[str, float], positions: dict[str, Position],
        prices: dict[str, float], symbol: str) -> float | None:
    val = value_account(balances, positions, risk, prices)
    fig = position_figures(symbol, positions[symbol], risk, prices)
    return bankruptcy_price(positions[symbol], risk.instruments[symbol], fig, val.equity)


def test_bankruptcy_price_of_a_long_is_where_equity_reaches_zero(risk) -> None:
    # 1 BTC long from 50,000 on 300 USDT, mark 49,890: equity 300 − 110 = 190,
    # so equity is 0 at 49,890 − 190 / 1 = 49,700 (300 + (49,700 − 50,000) = 0).
    bp = _bp(risk, {"USDT": 300.0}, {"BTC-PERP": Position(1.0, 50_000.0)},
             {"BTC-PERP": 49_890.0}, "BTC-PERP")
    assert bp == pytest.approx(49_700.0, rel=1e-12)


def test_bankruptcy_price_of_a_short_lies_above_the_mark(risk) -> None:
    # 2 BTC short at 60,000 on 20,000 USDT: 60,000 − 20,000 / (−2) = 70,000.
    bp = _bp(risk, {"USDT": 20_000.0}, {"BTC-PERP": Position(-2.0, 60_000.0)},
             {"BTC-PERP": 60_000.0}, "BTC-PERP")
    assert bp == pytest.approx(70_000.0, rel=1e-12)


def test_bankruptcy_price_counts_the_whole_account_and_the_settle_price(risk) -> None:
    # 10 ETHBTC long at 0.05 (settles in BTC at 50,000: k = 1 · 50,000) beside a 1 BTC-PERP
    # long 1,000 in profit, on 1,000 USDT: equity 2,000 quote, so ETHBTC's mark can fall by
    # 2,000 / (10 · 50,000) = 0.004 to 0.046.
    positions = {"ETHBTC-PERP": Position(10.0, 0.05), "BTC-PERP": Position(1.0, 50_000.0)}
    prices = {"ETHBTC-PERP": 0.05, "BTC": 50_000.0, "BTC-PERP": 51_000.0}
    bp = _bp(risk, {"USDT": 1_000.0}, positions, prices, "ETHBTC-PERP")
    assert bp == pytest.approx(0.046, rel=1e-12)


def test_bankruptcy_price_is_none_when_not_positive(risk) -> None:
    # 0.01 BTC on 1,000,000 USDT: 60,000 − 1,000,000 / 0.01 < 0.
    bp = _bp(risk, {"USDT": 1_000_000.0}, {"BTC-PERP": Position(0.01, 60_000.0)},
             {"BTC-PERP": 60_000.0}, "BTC-PERP")
    assert bp is None


# -- isolated positions (SPEC §4.1) ---------------------------------------------------------------


def _isolated_lp(risk, pos: Position, wallet: float, mark: float) -> float | None:
    """The liquidation price of an isolated BTC-PERP position: the unit holds the wallet and
    that one position, valued without collateral weight, so MMo = 0."""
    prices = {"BTC-PERP": mark}
    val = value_account({"USDT": wallet}, {"BTC-PERP": pos}, risk, prices, isolated=True)
    fig = position_figures("BTC-PERP", pos, risk, prices)
    return liquidation_price(pos, risk.instruments["BTC-PERP"], fig, val.equity,
                             val.maintenance_margin, risk.thresholds.liquidation)


def test_binance_isolated_liquidation_price_of_a_long(risk) -> None:
    # Binance, isolated, one position: LP = (WB + cum − side·|q|·EP) / (|q|·MMR − side·|q|).
    # 1 BTC long at 50,000 on a 5,000 USDT wallet, tier 1 (mmr 0.004, cum 0):
    # (5,000 + 0 − 50,000) / (0.004 − 1) = −45,000 / −0.996 = 45,180.7228915…
    assert _isolated_lp(risk, Position(1.0, 50_000.0), 5_000.0, 48_000.0) == pytest.approx(
        45_180.722891566265, rel=1e-12)
    # There equity = 5,000 + (45,180.72 − 50,000) = 180.72 and MM = 0.004 · 45,180.72 = 180.72.
    val = value_account({"USDT": 5_000.0}, {"BTC-PERP": Position(1.0, 50_000.0)}, risk,
                        {"BTC-PERP": 45_180.722891566265}, isolated=True)
    assert val.ratio == pytest.approx(1.0, rel=1e-12)


def test_binance_isolated_liquidation_price_of_a_short(risk) -> None:
    # 1 BTC short at 50,000 on a 5,000 USDT wallet, marked at 49,500 (tier 1, held fixed):
    # (5,000 + 0 + 50,000) / (0.004 + 1) = 55,000 / 1.004 = 54,780.8764940…
    assert _isolated_lp(risk, Position(-1.0, 50_000.0), 5_000.0, 49_500.0) == pytest.approx(
        54_780.87649402390, rel=1e-12)


def test_isolated_wallet_counts_without_collateral_weight(risk) -> None:
    # An ETHBTC-PERP wallet of 0.1 BTC (weight 0.95 in the cross pool) at 50,000: 5,000 in
    # an isolated unit, 0.1 · 50,000 · 0.95 = 4,750 as cross collateral.
    prices = {"BTC": 50_000.0, "ETHBTC-PERP": 0.05}
    positions = {"ETHBTC-PERP": Position(10.0, 0.05)}
    unit = value_account({"BTC": 0.1}, positions, risk, prices, isolated=True)
    cross = value_account({"BTC": 0.1}, positions, risk, prices)
    assert unit.collateral_value == pytest.approx(5_000.0)
    assert cross.collateral_value == pytest.approx(4_750.0)
    # MM = 10 · 0.05 · 0.01 · 50,000 = 250 either way; ratio 250 / 5,000 = 0.05.
    assert unit.ratio == pytest.approx(0.05)
