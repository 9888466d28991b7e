"""The workload of `liqmon bench` (SPEC §9): a 50-instrument config with Binance-style tiers,
a population of accounts with about three positions each, and a mixed input stream
(20 % ticks, 70 % fills, 10 % ledger entries). Deterministic for a seed.

Accounts are generated in numpy and handed over as `Account` objects, the way a restore hands
them to the engine; the stream is generated as decoded records (for engine-only runs) and can be
encoded as Kafka messages (for end-to-end runs).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson

from monitor.account import Account
from monitor.config import RiskConfig, parse_config
from monitor.events import Source
from monitor.margin import Position
from monitor.records import Fill, InputRecord, LedgerEntry, PriceTick
from monitor.snapshot import Offsets, Snapshots
from monitor.state import AccountState, next_state

MAJORS = ["BTC", "ETH"]
NAMED = ["SOL", "XRP", "DOGE", "BNB", "ADA", "AVAX", "LINK", "DOT", "TRX", "TON", "LTC",
         "BCH", "NEAR", "APT", "ARB", "OP", "SUI", "INJ", "ATOM", "FIL", "ETC", "XLM", "HBAR",
         "ICP", "RNDR", "IMX", "STX", "SEI", "TIA", "WIF", "PEPE", "SHIB", "BONK", "JUP", "AAVE",
         "UNI", "MKR", "LDO", "CRV", "SNX", "GMX", "DYDX", "ENS", "ORDI", "FET", "GRT"]
START_PRICES = {"BTC": 65_000.0, "ETH": 3_500.0, "SOL": 150.0, "XRP": 0.6, "DOGE": 0.15,
                "BNB": 580.0, "USDC": 1.0}

# Binance USDⓈ-M style leverage brackets: (max notional, mmr, imr).
MAJOR_TIERS = [(50_000, 0.004, 0.008), (500_000, 0.005, 0.01), (8_000_000, 0.01, 0.02),
               (50_000_000, 0.025, 0.05), (80_000_000, 0.05, 0.1), (100_000_000, 0.1, 0.2),
               (200_000_000, 0.125, 0.25), (400_000_000, 0.15, 0.3), ("inf", 0.25, 0.5)]
MID_TIERS = [(10_000, 0.0065, 0.0133), (50_000, 0.01, 0.02), (250_000, 0.02, 0.04),
             (1_000_000, 0.05, 0.1), (5_000_000, 0.1, 0.2), (20_000_000, 0.125, 0.25),
             ("inf", 0.5, 1.0)]
SMALL_TIERS = [(5_000, 0.01, 0.02), (25_000, 0.025, 0.05), (100_000, 0.05, 0.1),
               (250_000, 0.1, 0.2), (1_000_000, 0.125, 0.25), ("inf", 0.5, 1.0)]

START_TS = 1_764_000_000_000


def instrument_names(count: int) -> list[str]:
    """`count` perpetuals: majors and named coins first, two USDC-settled majors last."""
    usdc = ["BTC-USDC-PERP", "ETH-USDC-PERP"] if count >= 4 else []
    coins = MAJORS + NAMED + [f"ALT{n:03d}" for n in range(max(0, count))]
    return [f"{c}-PERP" for c in coins[: count - len(usdc)]] + usdc


def bench_risk(instruments: int = 50) -> dict[str, Any]:
    """The risk config (as parsed TOML) of the workload."""
    tiers_of = {}
    for n, name in enumerate(instrument_names(instruments)):
        major = name.split("-")[0] in MAJORS
        tiers = MAJOR_TIERS if major else MID_TIERS if n < 12 else SMALL_TIERS
        tiers_of[name] = {
            "settle": "USDC" if "USDC" in name else "USDT",
            "contract_size": 1.0,
            "tiers": [{"max_notional": m, "mmr": mmr, "imr": imr} for m, mmr, imr in tiers],
        }
    return {
        "thresholds": {"margin_call": 0.8, "liquidation": 1.0, "hysteresis": 0.05},
        "assets": {
            "USDT": {"collateral_weight": 1.0, "price": 1.0},
            "USDC": {"collateral_weight": 0.98, "price_symbol": "USDC"},
            "BTC": {"collateral_weight": 0.95, "price_symbol": "BTC"},
            "ETH": {"collateral_weight": 0.9, "price_symbol": "ETH"},
        },
        "instruments": tiers_of,
    }


def bench_config(instruments: int = 50) -> RiskConfig:
    return parse_config(bench_risk(instruments))


def start_prices(config: RiskConfig, seed: int) -> dict[str, float]:
    rng = np.random.default_rng(seed + 17)
    out = {}
    for symbol in sorted(config.price_symbols()):
        base = symbol.split("-")[0]
        if base in START_PRICES:
            out[symbol] = START_PRICES[base]
        else:
            out[symbol] = float(np.round(math.exp(rng.uniform(math.log(0.05), math.log(500))),
                                         6))
    return out


def account_id(n: int) -> str:
    return f"acct-{n:07d}"


@dataclass
class Population:
    """Every account of the workload, column by column (positions sorted by owner)."""

    config: RiskConfig
    prices: dict[str, float]
    count: int
    starts: np.ndarray  # first position index of each account (len count + 1)
    instr: np.ndarray  # instrument index per position
    qty: np.ndarray
    entry: np.ndarray
    usdt: np.ndarray
    btc: np.ndarray
    eth: np.ndarray
    usdc: np.ndarray
    state: np.ndarray
    instruments: list[str] = field(default_factory=list)

    def account(self, n: int) -> Account:
        balances = {}
        for name, column in (("USDT", self.usdt), ("USDC", self.usdc), ("BTC", self.btc),
                             ("ETH", self.eth)):
            value = float(column[n])
            if value != 0.0:
                balances[name] = value
        names, instr, qty, entry = self.instruments, self.instr, self.qty, self.entry
        positions = {names[instr[k]]: Position(float(qty[k]), float(entry[k]))
                     for k in range(self.starts[n], self.starts[n + 1])}
        state = AccountState(int(self.state[n]))
        return Account(balances=balances, positions=positions, state=state,
                       transitions=0 if state == AccountState.HEALTHY else 1, partition=0)

    def snapshots(self, seq: int, as_of: Offsets) -> Snapshots:
        """Every account as checkpoint columns (what `account` gives, in bulk)."""
        balances = np.column_stack((self.usdt, self.usdc, self.btc, self.eth))
        owner, asset = np.nonzero(balances)
        n = self.count
        return Snapshots(
            ids=[account_id(k) for k in range(n)], state=self.state.astype(np.int8),
            transitions=(self.state != 0).astype(np.int64), partition=np.zeros(n, np.int32),
            seq=np.zeros(n, np.int64), names=["USDT", "USDC", "BTC", "ETH", *self.instruments],
            bal_count=np.bincount(owner, minlength=n), bal_name=asset.astype(np.int64),
            bal_amount=balances[owner, asset], pos_count=np.diff(self.starts),
            pos_name=4 + self.instr, pos_qty=self.qty, pos_entry=self.entry,
            as_of_count=np.zeros(n, np.int64), as_of_topic=np.empty(0, np.int64),
            as_of_partition=np.empty(0, np.int32), as_of_offset=np.empty(0, np.int64),
        ).stamped(seq, [as_of] * n)

    def accounts(self, start: int = 0, stop: int | None = None) -> Iterator[tuple[str, Account]]:
        for n in range(start, self.count if stop is None else stop):
            yield account_id(n), self.account(n)

    def holders(self, instrument: str) -> int:
        return int((self.instr == self.instruments.index(instrument)).sum())

    @property
    def positions(self) -> int:
        return len(self.qty)

    def price_table(self) -> dict[str, tuple[float, int]]:
        return {symbol: (price, START_TS - 1) for symbol, price in self.prices.items()}


def populate(config: RiskConfig, count: int, seed: int = 7) -> Population:
    """Accounts with 1–5 positions (3 on average), BTC-PERP held by one account in ten, the
    rest spread over the other instruments with a mild skew; collateral sized so that margin
    ratios spread from very safe to already liquidating (about 1 % in margin call or worse)."""
    rng = np.random.default_rng(seed)
    names = list(config.instruments)
    n_instr = len(names)
    prices = start_prices(config, seed)
    k = rng.choice(np.arange(1, 6), size=count, p=[0.15, 0.2, 0.3, 0.2, 0.15])
    has_btc = rng.random(count) < 0.1 if "BTC-PERP" in names else np.zeros(count, bool)
    btc = names.index("BTC-PERP") if "BTC-PERP" in names else -1
    others = np.array([i for i in range(n_instr) if i != btc], np.int64)
    width = min(5, len(others))  # other instruments an account may hold
    if width == 0:  # BTC-PERP alone is configured: everyone holds it
        has_btc[:] = True
    k = np.minimum(k, np.where(has_btc, 1 + width, width))
    weights = 1.0 / (np.arange(len(others)) + 3.0) ** 0.8
    log_w = np.log(weights / weights.sum())
    chunks: list[np.ndarray] = []
    for start in range(0, count, 100_000):
        stop = min(count, start + 100_000)
        keys = log_w - np.log(-np.log(rng.random((stop - start, len(others)))))
        # five columns, those beyond ``width`` never picked (k stays within them)
        picks = np.full((stop - start, 5), -1, np.int64)
        picks[:, :width] = others[np.argsort(-keys, axis=1)[:, :width]]
        lead = np.where(has_btc[start:stop], btc, picks[:, 0])
        rest = np.where(has_btc[start:stop, None], picks[:, :4], picks[:, 1:5])
        table = np.column_stack((lead, rest))  # BTC-PERP first when held
        chunks.append(table[np.arange(5) < k[start:stop, None]])  # row-major: by account
    counts = k.astype(np.int64)
    starts = np.concatenate(([0], np.cumsum(counts)))
    instr = np.concatenate(chunks).astype(np.int64) if chunks else np.empty(0, np.int64)
    owner = np.repeat(np.arange(count), counts)
    mark = np.array([prices[config.instruments[n].mark_symbol] for n in names])[instr]
    notional = np.exp(rng.normal(math.log(4_000), 1.1, len(instr)))
    direction = np.where(rng.random(len(instr)) < 0.6, 1.0, -1.0)
    qty = np.round(direction * notional / mark, 6)
    qty[qty == 0] = 1e-6
    entry = np.round(mark * np.exp(rng.normal(0, 0.03, len(instr))), 8)
    settle_px = np.array([prices.get(config.assets[config.instruments[n].settle].price_symbol
                                     or "", 1.0) for n in names])[instr]
    # maintenance per position at today's marks (SPEC §4)
    n_abs = np.abs(qty) * mark
    mm = np.zeros(len(instr))
    for i, name in enumerate(names):
        sel = instr == i
        tiers = config.instruments[name].tiers
        bounds = np.array([t.max_notional for t in tiers])
        t = np.minimum(np.searchsorted(bounds, n_abs[sel], side="left"), len(tiers) - 1)
        mmr = np.array([x.mmr for x in tiers])[t]
        cum = np.array([x.maintenance_amount for x in tiers])[t]
        mm[sel] = (n_abs[sel] * mmr - cum) * settle_px[sel]
    upnl = qty * (mark - entry) * settle_px
    mm_acct = np.bincount(owner, mm, count)
    upnl_acct = np.bincount(owner, upnl, count)
    # Margin ratios: most accounts run moderate leverage; a thin tail sits near or past the
    # thresholds (1 % at 0.7 or more, 0.2 % already liquidating), as on an exchange whose
    # liquidation engine keeps closing the worst accounts.
    band = rng.random(count)
    target = np.where(band < 0.92, np.exp(rng.uniform(math.log(0.01), math.log(0.35), count)),
                      np.where(band < 0.99, rng.uniform(0.35, 0.7, count),
                               np.where(band < 0.998, rng.uniform(0.7, 0.97, count),
                                        rng.uniform(0.97, 1.15, count))))
    collateral = mm_acct / target - upnl_acct
    w = rng.random(count)
    btc_share = np.where(w < 0.2, rng.uniform(0.1, 0.5, count), 0.0)
    eth_share = np.where((w >= 0.2) & (w < 0.25), rng.uniform(0.1, 0.5, count), 0.0)
    usdc_share = np.where((w >= 0.25) & (w < 0.28), rng.uniform(0.2, 0.8, count), 0.0)
    positive = collateral > 0
    btc_bal = np.where(positive, np.round(collateral * btc_share / (prices["BTC"] * 0.95), 8),
                       0.0)
    eth_bal = np.where(positive, np.round(collateral * eth_share / (prices["ETH"] * 0.9), 8),
                       0.0)
    usdc_bal = np.where(positive, np.round(collateral * usdc_share / 0.98, 2), 0.0)
    usdt = np.round(collateral - btc_bal * prices["BTC"] * 0.95 - eth_bal * prices["ETH"] * 0.9
                    - usdc_bal * 0.98, 2)
    th = config.thresholds
    ratio = target
    state = np.array([int(next_state(AccountState.HEALTHY, r, th)) for r in ratio.tolist()],
                     dtype=np.int8) if count < 50_000 else np.select(
        [ratio >= th.liquidation, ratio >= th.margin_call], [2, 1], 0).astype(np.int8)
    return Population(config=config, prices=prices, count=count, starts=starts, instr=instr,
                      qty=qty, entry=entry, usdt=usdt, btc=btc_bal, eth=eth_bal,
                      usdc=usdc_bal, state=state, instruments=names)


@dataclass(slots=True)
class StreamRecord:
    topic: str  # prices / fills / ledger
    key: str
    record: InputRecord


class MixedStream:
    """20 % ticks (a random walk per symbol), 70 % fills (random accounts trading what they
    hold: adds, partial and exact closes, flips, new positions), 10 % ledger entries; other
    ``shares`` of (ticks, fills, ledger) when given."""

    def __init__(self, population: Population, seed: int = 7, volatility: float = 1e-4,
                 start_ts: int = START_TS,
                 shares: tuple[float, float, float] = (0.2, 0.7, 0.1)) -> None:
        self.pop = population
        total = math.fsum(shares)
        self.ticks_below = shares[0] / total  # a record is a tick below this draw,
        self.fills_below = 1.0 - shares[2] / total  # a fill below this one
        self.config = population.config
        self.rng = np.random.default_rng(seed + 1)
        self.volatility = volatility
        self.prices = dict(population.prices)
        self.symbols = sorted(self.prices)
        self.marks = {name: self.config.instruments[name].mark_symbol
                      for name in population.instruments}
        self.ts = start_ts
        self.ids = 0
        self.held: dict[tuple[int, int], float] = {}  # (account, instrument) → qty, touched ones

    def _qty(self, account: int, instr: int) -> float:
        key = (account, instr)
        if key in self.held:
            return self.held[key]
        pop = self.pop
        for k in range(pop.starts[account], pop.starts[account + 1]):
            if pop.instr[k] == instr:
                return float(pop.qty[k])
        return 0.0

    def records(self, count: int, wall_clock_ts: bool = False) -> list[StreamRecord]:
        rng = self.rng
        pop = self.pop
        kinds = rng.random(count).tolist()
        normals = rng.normal(0.0, 1.0, count).tolist()
        uniforms = rng.random((count, 4)).tolist()
        accounts = rng.integers(0, pop.count, count).tolist()
        symbols = rng.integers(0, len(self.symbols), count).tolist()
        out: list[StreamRecord] = []
        instruments = pop.instruments
        for n in range(count):
            self.ts += 1
            kind = kinds[n]
            u = uniforms[n]
            if kind < self.ticks_below:
                symbol = self.symbols[symbols[n]]
                price = self.prices[symbol] * math.exp(self.volatility * normals[n])
                self.prices[symbol] = price
                out.append(StreamRecord("prices", symbol, PriceTick(symbol, price, self.ts)))
                continue
            account = accounts[n]
            name = account_id(account)
            self.ids += 1
            if kind < self.fills_below:
                starts = pop.starts
                owned = pop.instr[starts[account]:starts[account + 1]].tolist()
                if len(owned) and u[0] < 0.9:
                    instr = owned[int(u[1] * len(owned))]
                else:
                    instr = int(u[1] * len(instruments))
                held = self._qty(account, instr)
                mark = self.prices[self.marks[instruments[instr]]]
                if held != 0.0 and u[2] < 0.08:
                    signed = -held  # an exact close
                elif held != 0.0 and u[2] < 0.12:
                    signed = -2 * held  # a flip
                elif held != 0.0:
                    signed = held * (-0.5 if u[2] < 0.55 else 0.25)
                else:
                    signed = round(1_000.0 * (1 + 9 * u[3]) / mark, 6) or 1e-6
                    signed = signed if u[2] < 0.6 else -signed
                qty = abs(signed)
                price = round(mark * (1 + (u[3] - 0.5) * 0.001), 8)
                self.held[(account, instr)] = held + signed
                fee = round(qty * price * 0.0004, 8)
                out.append(StreamRecord("fills", name, Fill(
                    fill_id=f"f{self.ids}", account=name, symbol=instruments[instr],
                    side="buy" if signed > 0 else "sell", qty=qty, price=price, fee=fee,
                    ts=self.ts)))
            else:
                amount = round((u[1] - 0.45) * 200.0, 2) or 1.0
                kind_name = "funding" if u[2] < 0.7 else "deposit" if amount > 0 else "withdrawal"
                out.append(StreamRecord("ledger", name, LedgerEntry(
                    f"l{self.ids}", name, "USDT", amount, kind_name, self.ts)))
        return out


def with_sources(records: list[StreamRecord],
                 offsets: dict[str, int] | None = None) -> list[tuple[InputRecord, Source]]:
    """Attach Kafka-like sources (partition 0, consecutive offsets per topic)."""
    offsets = offsets if offsets is not None else {"prices": 0, "fills": 0, "ledger": 0}
    out = []
    for r in records:
        offset = offsets[r.topic]
        offsets[r.topic] = offset + 1
        out.append((r.record, Source(r.topic, 0, offset)))
    return out


def encode(record: StreamRecord) -> bytes:
    """The Kafka message value of a record (SPEC §2)."""
    r = record.record
    if isinstance(r, PriceTick):
        return orjson.dumps({"symbol": r.symbol, "price": r.price, "ts": r.ts})
    if isinstance(r, Fill):
        return orjson.dumps({"fill_id": r.fill_id, "account": r.account, "symbol": r.symbol,
                             "side": r.side, "qty": r.qty, "price": r.price, "fee": r.fee,
                             "ts": r.ts})
    return orjson.dumps({"entry_id": r.entry_id, "account": r.account, "asset": r.asset,
                         "amount": r.amount, "kind": r.kind, "ts": r.ts})


def risk_toml(risk: dict[str, Any]) -> str:
    """The bench's risk config as a TOML file, for `liqmon run` processes."""
    def value(v: Any) -> str:
        if isinstance(v, str):
            return json.dumps(v)
        if isinstance(v, dict):
            return "{ " + ", ".join(f"{k} = {value(x)}" for k, x in v.items()) + " }"
        if isinstance(v, list):
            return "[" + ", ".join(value(x) for x in v) + "]"
        return repr(v)

    lines = ["[thresholds]", *(f"{k} = {value(v)}" for k, v in risk["thresholds"].items())]
    for section in ("assets", "instruments"):
        for name, table in risk[section].items():
            lines += ["", f"[{section}.{json.dumps(name)}]",
                      *(f"{k} = {value(v)}" for k, v in table.items())]
    return "\n".join(lines) + "\n"
