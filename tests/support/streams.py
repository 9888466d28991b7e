"""Random input streams: leveraged trading on a jumpy random walk, as replay lines, for the
tests that compare the engine (or the service) with a model or with itself."""

from __future__ import annotations

import math
import random
from typing import Any

import orjson

ACCOUNTS = [f"u{i:02d}" for i in range(12)]
START = {"BTC-PERP": 50_000.0, "ETH-PERP": 2_500.0, "ETHBTC-PERP": 0.05, "BTC": 50_000.0,
         "ETH": 2_500.0}
SETTLE = {"BTC-PERP": "USDT", "ETH-PERP": "USDT", "ETHBTC-PERP": "BTC"}
WALLET = {"USDT": 150.0, "BTC": 0.004}  # a typical isolated_margin transfer, per settle asset


def random_stream(seed: int, length: int, mean_run: float = 1.0,
                  isolated: float = 0.0) -> list[bytes]:
    """Replay lines: leveraged trading on a jumpy random walk, with exact closes, flips,
    stale ticks, duplicates, unpriced assets, unused symbols and malformed lines mixed in.

    With mean_run > 1 the kind of record changes only every mean_run records on average
    (runs of ticks, of fills, …), which lets a Kafka test feed it topic run by topic run.

    With ``isolated`` > 0 (SPEC §4.1) that fraction of the positions opened from flat is
    isolated, ledger entries move margin into and out of isolated wallets (sometimes before
    any fill), and one fill in 25 is sent in the other mode than its open position's (a
    margin_mode_conflict). With 0 the stream is exactly the cross-only one."""
    rng = random.Random(seed)
    modes = random.Random(seed + 1)  # draws of its own: isolated=0 leaves the stream as it was
    mode_held: dict[tuple[str, str], str] = {}
    prices = dict(START)
    ts = 1_000
    lines: list[bytes] = []
    sent: list[dict[str, Any]] = []
    qty_held: dict[tuple[str, str], float] = {}

    def emit(topic: str, value: Any) -> None:
        lines.append(orjson.dumps({"topic": topic, "value": value}))

    roll = rng.random()
    for n in range(length):
        ts += rng.choice([0, 1, 5])
        if rng.random() < 1 / mean_run:
            roll = rng.random()
        if roll < 0.35:
            symbol = rng.choice([*START, "XRP"])
            if symbol == "XRP" or (symbol == "BTC" and n < length // 10):
                emit("prices", {"symbol": symbol, "price": 0.5, "ts": ts})
                continue
            shock = rng.choice([0.0, 0.0, 0.0, rng.gauss(0, 0.05)])
            prices[symbol] *= math.exp(rng.gauss(0, 0.004) + shock)
            stale = rng.random() < 0.05
            emit("prices", {"symbol": symbol, "price": prices[symbol],
                            "ts": ts - 50 if stale else ts})
        elif roll < 0.75:
            account = rng.choice(ACCOUNTS)
            symbol = rng.choice(["BTC-PERP", "ETH-PERP", "ETHBTC-PERP"])
            held = qty_held.get((account, symbol), 0.0)
            if held and rng.random() < 0.25:
                # An exact close, in the decimal quantity an exchange would send: the float
                # sum the engine holds may differ from it by rounding (dust).
                qty, side = round(abs(held), 4), "sell" if held > 0 else "buy"
            else:
                scale = {"BTC-PERP": 0.05, "ETH-PERP": 10.0, "ETHBTC-PERP": 20.0}[symbol]
                qty = round(rng.uniform(0.1, 3.0) * scale, 4)
                side = rng.choice(["buy", "sell"])
            value = {"fill_id": f"f{n}", "account": account, "symbol": symbol, "side": side,
                     "qty": qty, "price": prices[symbol] * rng.uniform(0.995, 1.005),
                     "fee": rng.choice([0, 0.5, -0.1]), "ts": ts}
            mode = "cross"
            if isolated:
                if not held:
                    mode_held[(account, symbol)] = (
                        "isolated" if modes.random() < isolated else "cross")
                mode = mode_held.get((account, symbol), "cross")
                conflict = bool(held) and modes.random() < 0.04
                if conflict:
                    mode = "isolated" if mode == "cross" else "cross"
                if mode == "isolated" or modes.random() < 0.3:
                    value["margin_mode"] = mode  # cross is also the default: spelt out or not
            if sent and rng.random() < 0.05:
                value = rng.choice(sent)  # an upstream retry: a duplicate
            else:
                sent.append(value)
                if not (isolated and conflict):
                    signed = qty if side == "buy" else -qty
                    qty_held[(account, symbol)] = round(held + signed, 4)
            emit("fills", value)
        elif isolated and roll < 0.93 and modes.random() < 0.3:
            account, symbol = modes.choice(ACCOUNTS), modes.choice(list(SETTLE))
            asset = SETTLE[symbol]
            amount = WALLET[asset] * modes.uniform(-0.7, 2)  # negative: back to cross
            emit("ledger", {"entry_id": f"i{n}", "account": account, "asset": asset,
                            "amount": amount, "kind": "isolated_margin", "symbol": symbol,
                            "ts": ts})
        elif roll < 0.93:
            account = rng.choice(ACCOUNTS)
            asset = rng.choice(["USDT", "USDT", "BTC", "ETH"])
            amount = {"USDT": 300.0, "BTC": 0.01, "ETH": 0.2}[asset] * rng.uniform(-1, 3)
            entry_id = f"e{n}" if rng.random() > 0.05 else "e-repeat"
            emit("ledger", {"entry_id": entry_id, "account": account, "asset": asset,
                            "amount": amount,
                            "kind": rng.choice(["deposit" if amount > 0 else "withdrawal",
                                                "funding"]),
                            "ts": ts})
        else:
            lines.append(rng.choice([
                b"not json",
                b'{"topic": "fills", "value": {"fill_id": "x", "account": "u01"}}',
                b'{"topic": "prices", "value": {"symbol": "BTC", "price": -5, "ts": 1}}',
                b'{"topic": "ledger", "value": {"entry_id": "y", "account": "u02",'
                b' "asset": "DOGE", "amount": 1, "kind": "deposit", "ts": 1}}',
            ]))
    return lines
