"""Margin-call, liquidation and recovery events (SPEC §5): identity, payload and encoding."""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from typing import Any

import msgspec
import orjson

from monitor.config import RiskConfig
from monitor.liquidation import finite_or_none, liquidation_plan
from monitor.margin import (
    Position,
    Valuation,
    bankruptcy_price,
    liquidation_price,
    position_figures,
)
from monitor.records import CROSS, ISOLATED
from monitor.state import EVENT_TYPE, AccountState


# One is built per record applied: a msgspec Struct builds in C, a third of a slots
# dataclass's cost (60 against 160 ns), and holds nothing the collector need track.
class Source(msgspec.Struct, gc=False):
    """Where an input record came from: a Kafka partition/offset, or a replay line index."""

    topic: str
    partition: int | None = None
    offset: int | None = None
    index: int | None = None

    def trigger(self, kind: str, ref: str) -> dict[str, Any]:
        """An event's ``trigger`` (SPEC §5): the record's kind and id, and where it came from."""
        if self.index is not None:
            return {"kind": kind, "ref": ref, "topic": self.topic, "index": self.index}
        return {"kind": kind, "ref": ref, "topic": self.topic, "partition": self.partition,
                "offset": self.offset}


# One is built per state change: as a Struct it builds in C (~60 against ~300 ns).
class Event(msgspec.Struct):
    event_id: str
    type: str
    account: str
    payload: dict[str, Any]  # everything but emitted_at, which is stamped at publication
    symbol: str | None = None  # the instrument of an isolated position's event (SPEC §4.1)

    def order(self) -> tuple[str, bool, str]:
        """Where the event goes among those of one record: by account, the cross account's
        first, then its isolated positions' by symbol (SPEC §4.1)."""
        return self.account, self.symbol is not None, self.symbol or ""

    def encode(self, emitted_at_ms: int | None = None) -> bytes:
        stamp = int(time.time() * 1000) if emitted_at_ms is None else emitted_at_ms
        return orjson.dumps({**self.payload, "emitted_at": stamp})


_STATE_NAMES = tuple(state.name for state in AccountState)  # by value: `.name` is a property


def event_id(account: str, transition: int, event_type: str, symbol: str | None = None) -> str:
    """Deterministic: the risk unit's transition counter survives restarts, so a re-emitted
    event keeps its id; the type in the id keeps distinct events from colliding. An isolated
    position's unit is named `account/symbol` (SPEC §4.1)."""
    unit = account if symbol is None else f"{account}/{symbol}"
    return f"{unit}:{transition}:{event_type}"


def _wallet(balances: Mapping[str, float], settle: str) -> dict[str, float]:
    """An isolated unit's `balances` (SPEC §4.1: `{settle: ib}`): its wallet, 0 included,
    where a cross account lists its non-zero balances only."""
    return {settle: balances.get(settle, 0.0)}


def build_event(
    *,
    account: str,
    transition: int,
    previous: AccountState,
    state: AccountState,
    valuation: Valuation,
    balances: Mapping[str, float],
    config: RiskConfig,
    price_ts: Mapping[str, int],
    ts: int,
    trigger_kind: str,
    trigger_ref: str,
    source: Source,
    isolated: str | None = None,
    positions: Mapping[str, Position] | None = None,
    prices: Mapping[str, float] | None = None,
    details: list[dict[str, Any]] | None = None,
    plan: dict[str, Any] | None = None,
) -> Event:
    """The event of a state change. ``isolated``: the instrument, when the risk unit is an
    isolated position (its balances are its wallet, its positions that one position).

    ``details`` (its positions, `position_detail` of each, by symbol) and, for a liquidating
    unit, ``plan`` (its `liquidation_plan` as JSON, `liquidation.plan_json`) are the caller's
    when it has them (the columnar engine computes them compiled, term for term); whichever is
    not given is computed here from ``positions`` and ``prices`` with margin.py and
    liquidation.py."""
    liquidating = state == AccountState.LIQUIDATING
    if details is None or (liquidating and plan is None):
        if positions is None or prices is None:
            raise TypeError("build_event: positions and prices are needed for the position "
                            "details or plan not given")
        if details is None:
            details = _position_details(positions, valuation, config, prices)
        if liquidating and plan is None:
            # From the account as this builder sees it, so every engine emits the same plan.
            plan = liquidation_plan(balances, positions, config, prices,
                                    isolated=isolated is not None).to_json()
    event_type = EVENT_TYPE[state]
    eid = event_id(account, transition, event_type, isolated)
    payload: dict[str, Any] = {  # one display, rather than a dict and an update
        "event_id": eid,
        "type": event_type,
        "account": account,
        "margin_mode": CROSS if isolated is None else ISOLATED,
        **({} if isolated is None else {"symbol": isolated}),
        "state": _STATE_NAMES[state],
        "previous_state": _STATE_NAMES[previous],
        "ts": ts,
        "trigger": source.trigger(trigger_kind, trigger_ref),
        "margin_ratio": finite_or_none(valuation.ratio),
        "insolvent": valuation.insolvent,
        "unpriced": valuation.unpriced,
        "equity": valuation.equity,
        "maintenance_margin": valuation.maintenance_margin,
        "initial_margin": valuation.initial_margin,
        "collateral_value": valuation.collateral_value,
        "unrealized_pnl": valuation.unrealized_pnl,
        "balances": (
            {asset: balances[asset] for asset in sorted(balances)} if isolated is None
            else _wallet(balances, config.instruments[isolated].settle)),
        "positions": details,
    }
    max_age = config.prices.max_age_ms
    if max_age is not None:
        payload["stale_prices"] = stale_prices(
            balances, [detail["symbol"] for detail in details], config, price_ts, ts - max_age)
    if liquidating:
        payload["liquidation_plan"] = plan
    return Event(event_id=eid, type=event_type, account=account, payload=payload,
                 symbol=isolated)


def stale_prices(
    balances: Mapping[str, float],
    positions: Iterable[str],
    config: RiskConfig,
    price_ts: Mapping[str, int],
    oldest_fresh_ts: int,
) -> list[str]:
    """The sorted price symbols the account depends on whose last applied tick is older than
    oldest_fresh_ts (event time, so replay and the service agree) or that never ticked
    (SPEC §5.2): marks of its positions (``positions``: their instruments), their settle
    assets and assets it holds, unless fixed."""
    assets, instruments = config.assets, config.instruments
    held = list(positions)
    candidates: list[str | None] = [instruments[symbol].mark_symbol for symbol in held]
    candidates += [assets[instruments[symbol].settle].price_symbol for symbol in held]
    candidates += [assets[asset].price_symbol for asset, amount in balances.items() if amount]
    stale = set()
    for symbol in candidates:
        if symbol is None:  # a fixed price never ages
            continue
        last = price_ts.get(symbol)
        if last is None or last < oldest_fresh_ts:
            stale.add(symbol)
    return sorted(stale)


def _position_details(
    positions: Mapping[str, Position],
    valuation: Valuation,
    config: RiskConfig,
    prices: Mapping[str, float],
) -> list[dict[str, Any]]:
    details = []
    for symbol in sorted(positions):
        position = positions[symbol]
        figures = position_figures(symbol, position, config, prices)
        assert figures is not None, "an evaluated account has every settle asset priced"
        instrument = config.instruments[symbol]
        details.append(position_detail(
            symbol, position.qty, position.entry_price, figures.mark_price, figures.notional,
            figures.unrealized_pnl, figures.maintenance_margin, figures.initial_margin,
            liquidation_price(position, instrument, figures, valuation.equity,
                              valuation.maintenance_margin, config.thresholds.liquidation),
            bankruptcy_price(position, instrument, figures, valuation.equity)))
    return details


def position_detail(symbol: str, qty: float, entry_price: float, mark_price: float,
                    notional: float, unrealized_pnl: float, maintenance_margin: float,
                    initial_margin: float, liquidation: float | None,
                    bankruptcy: float | None) -> dict[str, Any]:
    """One position as an event reports it (SPEC §5)."""
    return {
        "symbol": symbol,
        "qty": qty,
        "entry_price": entry_price,
        "mark_price": mark_price,
        "notional": notional,
        "unrealized_pnl": unrealized_pnl,
        "maintenance_margin": maintenance_margin,
        "initial_margin": initial_margin,
        "liquidation_price": liquidation,
        "bankruptcy_price": bankruptcy,
    }
