"""The liquidation plan of SPEC §5.1: what a liquidation engine would do to bring an account
back to `liquidation_target`, with the least reduction. A pure function of the account and the
prices, built on `monitor.margin`, so every engine that builds events gets the same plan (the
columnar engine runs it compiled, term for term: `monitor.book.figures.liquidation_plan`).

A step closes Δ contracts of one position at its mark, with the instrument's liquidation fee,
exactly as a §4 fill would (`margin.apply_fill_to_position`, realized PnL and fee into the settle
balance). After such a step the account's maintenance margin and equity are both piecewise linear
in Δ: the pieces meet where the remaining notional crosses a tier boundary and where the settle
balance crosses 0 (its collateral weight switches). So on each piece the excess

    f(Δ) = MM(Δ) − target · equity(Δ)

is linear, and the ratio is at or below the target exactly where f ≤ 0 (or where MM is 0: the
account is flat). The plan values the account from scratch at every breakpoint and solves the
first piece on which the target is reached in closed form.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from monitor.config import RiskConfig
from monitor.margin import (
    Position,
    PositionFigures,
    Valuation,
    apply_fill_to_position,
    value_account,
)


@dataclass(frozen=True, slots=True)
class PlanStep:
    symbol: str
    side: str  # the side of the closing fill: "sell" reduces a long, "buy" a short
    qty: float  # contracts closed, > 0
    price: float  # the mark, settle units
    fee: float  # settle units
    close: bool  # the step closes the whole position
    margin_ratio_after: float  # math.inf when insolvent after the step


@dataclass(frozen=True, slots=True)
class LiquidationPlan:
    target_ratio: float
    deposit_to_target: float
    steps: tuple[PlanStep, ...]
    margin_ratio_after: float
    bad_debt: float

    def to_json(self) -> dict[str, Any]:
        """The event's `liquidation_plan` (SPEC §5.1)."""
        return plan_json(self.target_ratio, self.deposit_to_target,
                         ((step.symbol, step.side, step.qty, step.price, step.fee, step.close,
                           step.margin_ratio_after) for step in self.steps),
                         self.margin_ratio_after, self.bad_debt)


PlanStepFigures = tuple[str, str, float, float, float, bool, float]
"""A step's symbol, side, qty, price, fee, close and margin_ratio_after, as `PlanStep`."""


def plan_json(target_ratio: float, deposit_to_target: float, steps: Iterable[PlanStepFigures],
              margin_ratio_after: float, bad_debt: float) -> dict[str, Any]:
    """An event's `liquidation_plan` (SPEC §5.1) of a plan's figures: an infinite ratio is
    null. One shape for both engines (the columnar one has no `LiquidationPlan` object)."""
    return {
        "target_ratio": target_ratio,
        "deposit_to_target": deposit_to_target,
        "steps": [
            {"symbol": symbol, "side": side, "qty": qty, "price": price, "fee": fee,
             "close": close, "margin_ratio_after": finite_or_none(ratio)}
            for symbol, side, qty, price, fee, close, ratio in steps
        ],
        "margin_ratio_after": finite_or_none(margin_ratio_after),
        "bad_debt": bad_debt,
    }


def finite_or_none(value: float) -> float | None:
    """JSON has no infinity: an infinite ratio (an insolvent account's) is null."""
    return None if math.isinf(value) else value


@dataclass(slots=True)
class _Account:
    """The account as it would be after the steps planned so far."""

    balances: dict[str, float]
    positions: dict[str, Position]
    valuation: Valuation
    figures: Mapping[str, PositionFigures]  # each position's, at the plan's prices
    isolated: bool  # an isolated position's wallet: full weight (SPEC §4.1)


def liquidation_plan(
    balances: Mapping[str, float],
    positions: Mapping[str, Position],
    config: RiskConfig,
    prices: Mapping[str, float],
    *,
    isolated: bool = False,
) -> LiquidationPlan:
    """Plan the least reduction that brings the account's ratio to the liquidation target.

    The account must be evaluable (every settle asset priced), as it is whenever it has an event.
    Positions are reduced in order of maintenance margin, largest first (ties: symbol), each
    by the least quantity that reaches the target, or closed when none does. ``isolated``: the
    account is an isolated position, its balance the wallet, valued without collateral weight
    (SPEC §4.1).
    """
    target = config.thresholds.liquidation_target
    known: dict[str, PositionFigures] = {}
    valuation = value_account(balances, positions, config, prices, isolated=isolated,
                              figures=known)
    if valuation is None:
        raise ValueError("a liquidation plan needs every settle asset priced")
    deposit = max(0.0, valuation.maintenance_margin / target - valuation.equity)
    maintenance = {symbol: known[symbol].maintenance_margin for symbol in positions}
    order = sorted(positions, key=lambda symbol: (-maintenance[symbol], symbol))
    account = _Account(dict(balances), dict(positions), valuation, known, isolated)
    steps: list[PlanStep] = []
    if valuation.ratio > target:
        for symbol in order:
            step, account, reached = _reduce(symbol, account, config, prices, target,
                                             known[symbol])
            steps.append(step)
            if reached:
                break
    after = account.valuation
    return LiquidationPlan(
        target_ratio=target,
        deposit_to_target=deposit,
        steps=tuple(steps),
        margin_ratio_after=after.ratio,
        bad_debt=max(0.0, -after.equity),
    )


def _reduce(
    symbol: str, account: _Account, config: RiskConfig, prices: Mapping[str, float],
    target: float, figures: PositionFigures,
) -> tuple[PlanStep, _Account, bool]:
    """The step on one position: the least Δ reaching the target, else the whole position.
    Returns the step, the account after it, and whether the target was reached. ``figures``:
    the position's at these prices (each step reduces another position, so no earlier step
    has touched this one)."""
    position = account.positions[symbol]
    instrument = config.instruments[symbol]
    mark, cs, fee_rate = figures.mark_price, instrument.contract_size, instrument.liquidation_fee
    size = abs(position.qty)
    settle_balance = account.balances.get(instrument.settle, 0.0)

    def after(delta: float) -> _Account:
        return _after_step(account, symbol, position, delta, mark, cs, fee_rate,
                           instrument.settle, config, prices)

    def excess(valuation: Valuation) -> float:
        return valuation.maintenance_margin - target * valuation.equity

    # Breakpoints in (0, size): the remaining notional (size − Δ)·cs·mark at a finite tier
    # boundary, and the settle balance b + Δ·(realized − fee per contract) at 0.
    points = {size}
    for tier in instrument.tiers[:-1]:
        points.add(size - tier.max_notional / (cs * mark))
    per_contract = cs * (mark - position.entry_price) * math.copysign(1.0, position.qty)
    per_contract -= fee_rate * cs * mark
    if per_contract != 0:
        points.add(-settle_balance / per_contract)
    low, at_low = 0.0, account
    for point in sorted(p for p in points if 0 < p <= size):
        at_point = after(point)
        if at_point.valuation.ratio <= target:
            f_low, f_point = excess(at_low.valuation), excess(at_point.valuation)
            delta, at_delta = point, at_point
            if f_point <= 0:  # f is linear on [low, point] and > 0 at low: its root
                delta = low + (point - low) * f_low / (f_low - f_point)
                at_delta = after(delta)
            # Else the target is reached only by going flat (MM 0 with equity ≤ 0).
            if symbol not in at_delta.positions:  # a remainder within DUST: a fill closes it
                delta, at_delta = size, after(size)
            step = _step(symbol, position, delta, size, mark, cs, fee_rate, at_delta)
            return step, at_delta, True
        low, at_low = point, at_point
    return _step(symbol, position, size, size, mark, cs, fee_rate, at_low), at_low, False


def _after_step(
    account: _Account, symbol: str, position: Position, delta: float, mark: float, cs: float,
    fee_rate: float, settle: str, config: RiskConfig, prices: Mapping[str, float],
) -> _Account:
    """The account after closing Δ contracts at the mark: a §4 fill, valued from scratch but
    for the other positions' figures, which the step does not change."""
    closing = -math.copysign(delta, position.qty)
    remaining, realized = apply_fill_to_position(position, closing, mark, cs)
    positions = dict(account.positions)
    if remaining is None:
        del positions[symbol]
    else:
        positions[symbol] = remaining
    balances = dict(account.balances)
    balance = balances.get(settle, 0.0) + realized - fee_rate * delta * cs * mark
    if balance == 0:  # as the engines keep balances: non-zero ones only
        balances.pop(settle, None)
    else:
        balances[settle] = balance
    unchanged = {other: figures for other, figures in account.figures.items() if other != symbol}
    figures: dict[str, PositionFigures] = {}
    valuation = value_account(balances, positions, config, prices, isolated=account.isolated,
                              figures=figures, known=unchanged)
    assert valuation is not None
    return _Account(balances, positions, valuation, figures, account.isolated)


def _step(symbol: str, position: Position, delta: float, size: float, mark: float, cs: float,
          fee_rate: float, after: _Account) -> PlanStep:
    return PlanStep(
        symbol=symbol,
        side="sell" if position.qty > 0 else "buy",
        qty=delta,
        price=mark,
        fee=fee_rate * delta * cs * mark,
        close=delta == size,
        margin_ratio_after=after.valuation.ratio,
    )
