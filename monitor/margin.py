"""Cross-margin mathematics (SPEC §4). Pure functions over plain values: no I/O, no Kafka.

All amounts are float64 in the quote currency unless named "settle units". The formulas are
written in the same order as the SPEC so that a reader can check them line by line. The
engine computes the same numbers in compiled code over its columns (`monitor.book.kernels` for
the valuation, `monitor.book.figures` for what an event reports), term for term in the same
order, so they are bit-identical to these; the reference engine and the liquidation plan use
these.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from monitor.config import Asset, Instrument, RiskConfig, Tier


@dataclass(slots=True)
class Position:
    qty: float  # signed contracts, long > 0
    entry_price: float


# Quantities are decimal lots, summed in binary floating point: fills of 0.1 and 0.2 make a
# position of 0.30000000000000004, and the fill that closes it carries 0.3. What a reducing
# fill leaves within this fraction of the larger of |q| and the fill's qty is that rounding,
# not a position (a real remainder that small is below any exchange's lot size: a billionth of
# a 1,000-contract trade is 1e-6 contracts). Left in place, such dust keeps a maintenance
# requirement of ~1e-14 alive, so a bankrupt, closed-out account counts as insolvent
# (SPEC §4: r = +inf) instead of flat (r = 0) and is liquidated again at every move.
DUST = 1e-9


def is_dust(remaining: float, position_qty: float, fill_qty: float) -> bool:
    """True when a reducing fill leaves only float rounding of the position (see DUST)."""
    return abs(remaining) <= DUST * max(abs(position_qty), fill_qty)


def apply_fill_to_position(
    position: Position | None, signed_qty: float, price: float, contract_size: float
) -> tuple[Position | None, float]:
    """Apply one fill to a position. Returns (new position or None when flat, realized PnL).

    Realized PnL is in settle units; the fee is the caller's business (it always settles).
    A fill against the position that leaves at most DUST of the larger of |q| and its qty, on
    either side of zero, closes the position: SPEC §4's ``q == 0``, read up to float rounding.
    """
    if position is None or position.qty == 0:
        return Position(qty=signed_qty, entry_price=price), 0.0
    q, e = position.qty, position.entry_price
    qty = abs(signed_qty)
    if (q > 0) == (signed_qty > 0):
        e = (abs(q) * e + qty * price) / (abs(q) + qty)
        return Position(qty=q + signed_qty, entry_price=e), 0.0
    closed = min(abs(q), qty)
    realized = closed * contract_size * (price - e) * math.copysign(1.0, q)
    new_q = q + signed_qty
    if is_dust(new_q, q, qty):
        return None, realized
    if (new_q > 0) != (q > 0):  # flipped through zero: the remainder opens at the fill price
        e = price
    return Position(qty=new_q, entry_price=e), realized


def asset_price(asset: Asset, prices: Mapping[str, float]) -> float | None:
    """px(a): the fixed price, or the last tick of the asset's price symbol, or None."""
    if asset.fixed_price is not None:
        return asset.fixed_price
    return prices.get(asset.price_symbol)  # type: ignore[arg-type]


def margin_ratio(maintenance: float, equity: float) -> float:
    """r = MM / equity; 0 with no requirement; +inf when equity cannot cover a requirement."""
    if equity > 0:
        return maintenance / equity
    if maintenance == 0:
        return 0.0
    return math.inf


@dataclass(slots=True)
class Valuation:
    """One account's margin figures at the current prices (quote currency)."""

    collateral_value: float
    unrealized_pnl: float
    equity: float
    maintenance_margin: float
    initial_margin: float
    ratio: float
    unpriced: bool

    @property
    def insolvent(self) -> bool:
        return math.isinf(self.ratio)


def value_account(
    balances: Mapping[str, float],
    positions: Mapping[str, Position],
    config: RiskConfig,
    prices: Mapping[str, float],
    *,
    isolated: bool = False,
    figures: dict[str, PositionFigures] | None = None,
    known: Mapping[str, PositionFigures] | None = None,
) -> Valuation | None:
    """Value an account from scratch, or None when a position's settle asset has no price yet
    (SPEC §4: such an account is not evaluated until that price arrives).

    ``isolated``: the balances are an isolated position's wallet, which counts at full value
    (SPEC §4.1: equity = ib·spx + uPnL, no collateral weight). ``figures``, if given, receives
    each position's `position_figures` (an event reports them: no need to compute them twice).
    ``known``: the figures of positions that have not changed since they were computed at
    these prices, taken as they are (summed in the same order, the result is the same)."""
    collateral = 0.0
    unpriced = False
    for asset_name, balance in balances.items():
        px = asset_price(config.assets[asset_name], prices)
        if px is None:
            unpriced = unpriced or balance != 0
            continue
        weight = (config.assets[asset_name].collateral_weight
                  if balance > 0 and not isolated else 1.0)
        collateral += balance * px * weight
    upnl = mm = im = 0.0
    for symbol, position in positions.items():
        one = known.get(symbol) if known is not None else None
        if one is None:
            one = position_figures(symbol, position, config, prices)
        if one is None:
            return None
        upnl += one.unrealized_pnl
        mm += one.maintenance_margin
        im += one.initial_margin
        if figures is not None:
            figures[symbol] = one
    equity = collateral + upnl
    return Valuation(
        collateral_value=collateral,
        unrealized_pnl=upnl,
        equity=equity,
        maintenance_margin=mm,
        initial_margin=im,
        ratio=margin_ratio(mm, equity),
        unpriced=unpriced,
    )


@dataclass(slots=True)
class PositionFigures:
    """One position's contribution, quote currency except mark_price (settle units)."""

    mark_price: float
    settle_price: float
    tier: Tier
    notional: float
    unrealized_pnl: float
    maintenance_margin: float
    initial_margin: float


def position_figures(
    symbol: str, position: Position, config: RiskConfig, prices: Mapping[str, float]
) -> PositionFigures | None:
    instrument = config.instruments[symbol]
    spx = asset_price(config.assets[instrument.settle], prices)
    if spx is None:
        return None
    mark = prices.get(instrument.mark_symbol, position.entry_price)
    cs = instrument.contract_size
    notional = abs(position.qty) * cs * mark  # settle units
    tier = instrument.tier_for(notional)
    return PositionFigures(
        mark_price=mark,
        settle_price=spx,
        tier=tier,
        notional=notional * spx,
        unrealized_pnl=position.qty * cs * (mark - position.entry_price) * spx,
        maintenance_margin=(notional * tier.mmr - tier.maintenance_amount) * spx,
        initial_margin=notional * tier.imr * spx,
    )


def liquidation_price(
    position: Position,
    instrument: Instrument,
    figures: PositionFigures,
    account_equity: float,
    account_maintenance: float,
    liquidation_threshold: float,
) -> float | None:
    """Estimated mark price at which the account's ratio reaches the liquidation threshold,
    holding every other price and this position's tier fixed (SPEC §4).

    Solves E0 + q·k·(p − m) = (MMo + |q|·k·mmr·p − cum·spx) / L for p, with k = cs·spx.
    With one position, stable collateral and L = 1 this is Binance's cross-margin formula; for
    an isolated position (SPEC §4.1: MMo = 0, E0 = wallet + uPnL) it is Binance's isolated one,
    p = (wallet + cum − q·e) / (|q|·mmr − q) for a stable settle asset.
    """
    q = position.qty
    k = instrument.contract_size * figures.settle_price
    tier = figures.tier
    other_maintenance = account_maintenance - figures.maintenance_margin
    big_l = liquidation_threshold
    denominator = q * k - abs(q) * k * tier.mmr / big_l
    if denominator == 0:
        return None
    numerator = (
        other_maintenance / big_l
        - tier.maintenance_amount * figures.settle_price / big_l
        - account_equity
        + q * k * figures.mark_price
    )
    price = numerator / denominator
    if not price > 0 or not math.isfinite(price):
        return None
    return price


def bankruptcy_price(
    position: Position, instrument: Instrument, figures: PositionFigures, account_equity: float
) -> float | None:
    """The mark of this position at which the account's equity is 0, every other price fixed
    (SPEC §5): equity moves by q·cs·spx per unit of mark, so p = mark − equity / (q·cs·spx).
    None when that is not a positive finite price (e.g. a long with more equity than notional).
    """
    price = figures.mark_price - account_equity / (
        position.qty * instrument.contract_size * figures.settle_price
    )
    if not price > 0 or not math.isfinite(price):
        return None
    return price
