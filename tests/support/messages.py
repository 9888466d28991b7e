"""Message builders for tests that feed the service through Kafka: each returns the (topic,
key, value) of one input message, for `tests.support.kafka.produce`."""

from __future__ import annotations

import orjson


def tick(topics, symbol: str, price: float, ts: int = 1):
    return (topics.prices, symbol.encode(),
            orjson.dumps({"symbol": symbol, "price": price, "ts": ts}))


def deposit(topics, account: str, amount: float, entry_id: str | None = None):
    return (topics.ledger, account.encode(), orjson.dumps({
        "entry_id": entry_id or f"dep-{account}", "account": account, "asset": "USDT",
        "amount": amount, "kind": "deposit", "ts": 1}))


def withdrawal(topics, account: str, amount: float, entry_id: str):
    """``amount`` < 0, as SPEC §2 has it."""
    return (topics.ledger, account.encode(), orjson.dumps({
        "entry_id": entry_id, "account": account, "asset": "USDT", "amount": amount,
        "kind": "withdrawal", "ts": 1}))


def fill(topics, fill_id: str, account: str, symbol: str, qty: float, price: float):
    return (topics.fills, account.encode(), orjson.dumps({
        "fill_id": fill_id, "account": account, "symbol": symbol,
        "side": "buy" if qty > 0 else "sell", "qty": abs(qty), "price": price, "ts": 1}))
