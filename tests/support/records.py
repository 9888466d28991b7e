"""Record builders for tests that drive an Engine directly: each builds one input record,
applies it and returns the events it emitted."""

from __future__ import annotations

from monitor.engine import Engine
from monitor.events import Source
from monitor.records import Fill, LedgerEntry, PriceTick


def tick(engine: Engine, symbol: str, price: float, ts: int = 1):
    return engine.apply(PriceTick(symbol, price, ts), Source("prices", index=7))


def fill(engine: Engine, account: str, symbol: str, qty: float, price: float,
         fill_id: str = "", fee: float = 0.0):
    side = "buy" if qty > 0 else "sell"
    fid = fill_id or f"{account}/{symbol}/{qty}@{price}"
    return engine.apply(Fill(fill_id=fid, account=account, symbol=symbol, side=side, qty=abs(qty),
                             price=price, fee=fee, ts=1),
                        Source("fills", index=3))


def ledger(engine: Engine, account: str, asset: str, amount: float, entry_id: str = ""):
    eid = entry_id or f"{account}/{asset}/{amount}"
    return engine.apply(LedgerEntry(eid, account, asset, amount, "deposit", 1),
                        Source("ledger", index=5))


def types(events) -> list[str]:
    return [e.type for e in events]
