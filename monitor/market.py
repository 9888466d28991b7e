"""A synthetic market for demos, examples and tests: deposits, leveraged portfolios, prices on a
correlated random walk, then a crash and a rebound.

Some positions are opened in isolated margin (SPEC §4.1), each on a wallet funded by an
`isolated_margin` ledger entry, with leverage of its own.

It also plays the exchange's liquidation engine: `close_out(account)` returns the fills that
flatten a liquidated account's cross positions, `close_out(account, symbol)` those of one
liquidated isolated position (whose wallet stays, as an exchange's does); that is what brings
them back to HEALTHY. Everything is seeded, so a run can be reproduced exactly.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import orjson

from monitor.config import RiskConfig
from monitor.errors import LiqmonError
from monitor.records import FILLS, LEDGER, PRICES

# Start price and market beta per symbol; symbols not listed start at 100 with beta 1.
_SYMBOL_DEFAULTS: dict[str, tuple[float, float]] = {
    "BTC": (65_000.0, 1.0),
    "BTC-PERP": (65_010.0, 1.0),
    "ETH": (3_500.0, 1.2),
    "ETH-PERP": (3_501.0, 1.2),
    "SOL": (150.0, 1.6),
    "SOL-PERP": (150.05, 1.6),
    "ETHBTC-PERP": (0.0538, 0.2),
    "USDC": (1.0, 0.0),
}
START_TS = 1_764_000_000_000
STEP_MS = 100


class MarketError(LiqmonError):
    """A risk config no synthetic market can be made for."""


@dataclass(slots=True)
class MarketRecord:
    topic: str  # prices / fills / ledger
    key: str
    value: dict[str, Any] | bytes  # bytes: a deliberately malformed message

    def value_bytes(self) -> bytes:
        return self.value if isinstance(self.value, bytes) else orjson.dumps(self.value)

    def replay_line(self) -> bytes:
        if isinstance(self.value, bytes):
            return self.value
        return orjson.dumps({"topic": self.topic, "value": self.value})


@dataclass
class Phase:
    name: str
    steps: int
    drift: float  # log-return of the market factor per step


@dataclass
class SyntheticMarket:
    config: RiskConfig
    accounts: int = 1_000
    seed: int = 0
    bad_record_rate: float = 0.0  # malformed records mixed into the flow, per record
    fills_per_step: int = 3
    isolated_share: float = 0.2  # share of opening positions held in isolated margin
    _rng: random.Random = field(init=False)
    _prices: dict[str, float] = field(init=False)
    _betas: dict[str, float] = field(init=False)
    _book: dict[str, dict[str, float]] = field(init=False)  # account -> symbol -> qty
    _isolated: set[tuple[str, str]] = field(init=False, default_factory=set)  # (account,
    #                                                  symbol) of positions held isolated
    _ts: int = field(init=False, default=START_TS)
    _ids: int = field(init=False, default=0)
    _plans: list[tuple[list[MarketRecord], Callable[[], list[MarketRecord]]]] = field(
        init=False, default_factory=list)

    def __post_init__(self) -> None:
        config = self.config
        if not config.instruments:
            raise MarketError("the risk config has no instruments: a synthetic market needs "
                              "at least one to trade")
        self._rng = random.Random(self.seed)
        symbols = sorted(config.price_symbols())
        self._prices = {s: _SYMBOL_DEFAULTS.get(s, (100.0, 1.0))[0] for s in symbols}
        self._betas = {s: _SYMBOL_DEFAULTS.get(s, (100.0, 1.0))[1] for s in symbols}
        self._book = {}
        # Accounts deposit the asset most instruments settle in (USDT in the example), and
        # some also the first other asset with a moving price (BTC there) as collateral.
        settles = Counter(instrument.settle for instrument in config.instruments.values())
        self._cash = min(settles, key=lambda asset: (-settles[asset], asset))
        self._collateral = next((name for name, asset in sorted(config.assets.items())
                                 if name != self._cash and asset.price_symbol is not None), None)

    # -- scenario ------------------------------------------------------------------------------

    @staticmethod
    def crash_scenario(steps: int) -> list[Phase]:
        """Calm random walk, a crash of about 30 %, then a rebound of most of it."""
        calm, crash = int(steps * 0.35), int(steps * 0.2)
        rebound = steps - calm - crash
        return [
            Phase("random walk", calm, 0.0),
            Phase("crash", crash, math.log(0.70) / max(crash, 1)),
            Phase("rebound", rebound, math.log(1 / 0.70 * 0.95) / max(rebound, 1)),
        ]

    def account_id(self, index: int) -> str:
        return f"acct-{index:06d}"

    def opening(self) -> Iterator[MarketRecord]:
        """First prices and every account's deposits, then every account's opening fills.
        (Deposits come first so that, read from two topics, no fill lands on an empty pool.)"""
        yield from self.opening_deposits()
        yield from self.opening_positions()

    def opening_deposits(self) -> Iterator[MarketRecord]:
        yield from self.ticks(0.0, noise=False)
        self._plans = [self._plan_account(self.account_id(i)) for i in range(self.accounts)]
        for deposits, _ in self._plans:
            yield from deposits

    def opening_positions(self) -> Iterator[MarketRecord]:
        for _, fills in self._plans:
            yield from fills()
        self._plans = []

    def step(self, drift: float) -> list[MarketRecord]:
        """One time step: a tick per symbol, some trading, occasional funding, maybe junk."""
        self._ts += STEP_MS
        records = list(self.ticks(drift))
        for _ in range(self.fills_per_step):
            records.extend(self._random_trade())
        if self._rng.random() < 0.2:
            records.append(self._ledger(self._random_account(), self._cash,
                                        round(self._rng.uniform(-5, 5), 2), "funding"))
        if self.bad_record_rate:
            # bad_record_rate malformed records per record on average: the whole part always,
            # the fraction by chance
            whole, part = divmod(self.bad_record_rate * len(records), 1.0)
            bad = int(whole) + (self._rng.random() < part)
            if bad:
                records.extend(self._malformed() for _ in range(bad))
                records.extend(self._upstream_noise(records))
        return records

    def ticks(self, drift: float, noise: bool = True) -> Iterator[MarketRecord]:
        market = drift + (self._rng.gauss(0.0, 0.002) if noise else 0.0)
        for symbol, price in self._prices.items():
            beta = self._betas[symbol]
            if beta == 0.0:
                move = self._rng.gauss(0.0, 0.0001) if noise else 0.0
            else:
                move = beta * market + (self._rng.gauss(0.0, 0.0005) if noise else 0.0)
            self._prices[symbol] = price * math.exp(move)
            yield MarketRecord(PRICES, symbol, {
                "symbol": symbol, "price": _round_price(self._prices[symbol]), "ts": self._ts,
            })

    def close_out(self, account: str, symbol: str | None = None) -> list[MarketRecord]:
        """Fills that flatten the account's cross positions, or with ``symbol`` its isolated
        position in that instrument (the liquidation engine's job; SPEC §4.1 keeps the two
        apart)."""
        book = self._book.get(account, {})
        isolated = self._isolated
        records = []
        for held, qty in sorted(book.items()):
            if ((held == symbol) if symbol is not None
                    else (account, held) not in isolated) and qty != 0:
                records.append(self._fill(account, held, -qty, fee_rate=0.0005))
        # What is liquidated trades no more: no dust re-opened on a bankrupt pool or wallet.
        if symbol is None:
            self._book[account] = {s: q for s, q in book.items() if (account, s) in isolated}
        else:
            book.pop(symbol, None)
        return records

    # -- building blocks -------------------------------------------------------------------------

    def _plan_account(self, account: str) -> tuple[list[MarketRecord],
                                                   Callable[[], list[MarketRecord]]]:
        """An account's deposits now, and a way to make its opening fills later."""
        rng = self._rng
        equity = rng.choice([1_000.0, 5_000.0, 20_000.0, 100_000.0]) * rng.uniform(0.5, 1.5)
        deposits = [self._ledger(account, self._cash,
                                 round(equity / self._asset_price(self._cash), 2), "deposit")]
        if self._collateral is not None and rng.random() < 0.3:
            deposits.append(self._ledger(
                account, self._collateral,
                round(equity * 0.2 / self._asset_price(self._collateral), 6), "deposit"))
        leverage = math.exp(rng.uniform(math.log(1.5), math.log(18.0)))
        instruments = sorted(self.config.instruments)
        held = rng.sample(instruments, k=min(len(instruments), rng.choice([1, 2, 3, 3, 4])))
        hedged = rng.random() < 0.15
        directions: list[float] = []
        for n in range(len(held)):
            direction = 1.0 if rng.random() < 0.7 else -1.0
            if hedged and n == 1:
                direction = -directions[0]  # offsetting legs: cross margin nets them
            directions.append(direction)

        # Some positions isolated: a wallet of their own, funded from the cross balance, at a
        # leverage of their own (so some are liquidated in the crash while the account is not).
        isolated = {symbol: math.exp(rng.uniform(math.log(3.0), math.log(25.0)))
                    for symbol in held if rng.random() < self.isolated_share}
        notional_quote = equity * leverage / len(held)
        for symbol, isolated_leverage in isolated.items():
            settle = self.config.instruments[symbol].settle
            wallet = round(notional_quote / isolated_leverage / self._settle_price(symbol), 8)
            if settle != self._cash:  # the account deposited cash: bring the settle asset
                deposits.append(self._ledger(account, settle, wallet, "deposit"))
            deposits.append(self._ledger(account, settle, wallet, "isolated_margin", symbol))
            self._isolated.add((account, symbol))

        def fills() -> list[MarketRecord]:
            return [self._fill(account, symbol, direction * self._qty_for(symbol, notional_quote))
                    for symbol, direction in zip(held, directions, strict=True)]

        return deposits, fills

    def _random_trade(self) -> list[MarketRecord]:
        account = self._random_account()
        book = self._book.get(account)
        if not book:
            return []
        symbol = self._rng.choice(sorted(book))
        qty = book[symbol]
        if qty == 0:
            return []
        fraction = self._rng.choice([-0.5, -0.25, 0.1, 0.25])  # reduce or add
        return [self._fill(account, symbol, qty * fraction)]

    def _random_account(self) -> str:
        return self.account_id(self._rng.randrange(self.accounts))

    def _qty_for(self, symbol: str, notional_quote: float) -> float:
        instrument = self.config.instruments[symbol]
        settle_px = self._settle_price(symbol)
        mark = self._prices[instrument.mark_symbol]
        return max(round(notional_quote / (mark * instrument.contract_size * settle_px), 4),
                   0.0001)

    def _settle_price(self, symbol: str) -> float:
        return self._asset_price(self.config.instruments[symbol].settle)

    def _asset_price(self, name: str) -> float:
        asset = self.config.assets[name]
        if asset.fixed_price is not None:
            return asset.fixed_price
        return self._prices[asset.price_symbol]  # type: ignore[index]

    def _next_id(self, prefix: str) -> str:
        self._ids += 1
        return f"{prefix}-{self.seed}-{self._ids}"

    def _fill(self, account: str, symbol: str, signed_qty: float,
              fee_rate: float = 0.0004) -> MarketRecord:
        qty = abs(round(signed_qty, 4)) or 0.0001
        side = "buy" if signed_qty > 0 else "sell"
        mark = self._prices[self.config.instruments[symbol].mark_symbol]
        price = _round_price(mark * (1 + self._rng.uniform(-0.0005, 0.0005)))
        book = self._book.setdefault(account, {})
        book[symbol] = round(book.get(symbol, 0.0) + (qty if side == "buy" else -qty), 8)
        fee = round(qty * price * self.config.instruments[symbol].contract_size * fee_rate, 8)
        value: dict[str, Any] = {
            "fill_id": self._next_id("f"), "account": account, "symbol": symbol, "side": side,
            "qty": qty, "price": price, "fee": fee, "ts": self._ts,
        }
        if (account, symbol) in self._isolated:
            value["margin_mode"] = "isolated"
        return MarketRecord(FILLS, account, value)

    def _ledger(self, account: str, asset: str, amount: float, kind: str,
                symbol: str | None = None) -> MarketRecord:
        value: dict[str, Any] = {
            "entry_id": self._next_id("l"), "account": account, "asset": asset,
            "amount": amount, "kind": kind, "ts": self._ts,
        }
        if symbol is not None:  # isolated_margin: the wallet of (account, symbol)
            value["symbol"] = symbol
        return MarketRecord(LEDGER, account, value)

    def _upstream_noise(self, records: list[MarketRecord]) -> list[MarketRecord]:
        """What real feeds do: a producer retry re-sends a fill, a late tick arrives stale."""
        noise = []
        fills = [r for r in records if r.topic == FILLS and isinstance(r.value, dict)]
        if fills:
            noise.append(fills[-1])
        late = records[0]
        if late.topic == PRICES and isinstance(late.value, dict):
            noise.append(MarketRecord(PRICES, late.key, {**late.value, "ts": self._ts - 250}))
        return noise

    def _malformed(self) -> MarketRecord:
        account = self._random_account()
        choice = self._rng.randrange(4)
        if choice == 0:
            return MarketRecord(FILLS, account, b'{"fill_id": "broken", "account": ')
        if choice == 1:
            return MarketRecord(FILLS, account, {
                "fill_id": self._next_id("bad"), "account": account, "symbol": "DOGE-PERP",
                "side": "buy", "qty": 1, "price": 0.1, "ts": self._ts,
            })
        if choice == 2:
            symbol = next(iter(self._prices))
            return MarketRecord(PRICES, symbol, {"symbol": symbol, "price": -1, "ts": self._ts})
        return MarketRecord(LEDGER, account, {
            "entry_id": self._next_id("bad"), "account": account, "asset": self._cash,
            "amount": 10, "kind": "gift", "ts": self._ts,
        })


def _round_price(price: float) -> float:
    """Round to 6 significant digits, like an exchange's tick size would."""
    if price <= 0:
        return price
    digits = 5 - math.floor(math.log10(price))
    return round(price, max(digits, 0))


def simulate(config: RiskConfig, accounts: int, steps: int, seed: int = 0,
             bad_record_rate: float = 0.0) -> Iterator[MarketRecord]:
    """The whole crash scenario as a finite stream, with the liquidation engine in the loop:
    an engine watches the stream and liquidated accounts are closed out at the next step."""
    from monitor.engine import Engine
    from monitor.events import Source
    from monitor.records import Rejected, decode

    market = SyntheticMarket(config, accounts=accounts, seed=seed,
                             bad_record_rate=bad_record_rate)
    engine = Engine(config)
    to_close: list[tuple[str, str | None]] = []  # (account, isolated symbol or None)

    def observe(record: MarketRecord) -> MarketRecord:
        try:
            decoded = decode(record.topic, record.value_bytes(), config)
            events = engine.apply(decoded, Source(topic=record.topic, index=0))
        except Rejected:
            return record
        for event in events:
            if event.type == "liquidation":
                to_close.append((event.account, event.symbol))
        return record

    for record in market.opening():
        yield observe(record)
    for phase in market.crash_scenario(steps):
        for _ in range(phase.steps):
            batch = market.step(phase.drift)
            while to_close:
                batch.extend(market.close_out(*to_close.pop()))
            for record in batch:
                yield observe(record)
