"""A deliberately naive model of SPEC §4–§6, written from the SPEC and sharing no code with
`monitor`: plain dicts, and after every record every account is recomputed from scratch.

It is slow on purpose. The engine must agree with it event for event.
"""

from __future__ import annotations

import json
import math
from collections import deque
from typing import Any

STATES = ["HEALTHY", "MARGIN_CALL", "LIQUIDATING"]
TYPES = ["recovered", "margin_call", "liquidation"]
# Input limits the SPEC leaves to the product and the README states: identifiers of at most
# 256 characters, price/qty/fee/amount within ±1e15, prices and quantities at least 1e-15.
MAX_ID = 256
MAX_MAGNITUDE = 1e15
MIN_MAGNITUDE = 1e-15  # prices and quantities: their products must not underflow to 0
IDS = {"prices": ["symbol"], "fills": ["fill_id", "account", "symbol"],
       "ledger": ["entry_id", "account", "asset"]}
LEDGER_KINDS = {"deposit", "withdrawal", "funding", "transfer", "adjustment", "isolated_margin"}


class ModeConflict(Exception):
    """SPEC §4.1: a fill in the other margin mode than its open position's. Bad input: the
    model changes nothing and does not record the fill's id."""


def _number(v: dict[str, Any], name: str) -> float | None:
    """A JSON number (never a boolean) that is finite and within ±MAX_MAGNITUDE, else None."""
    x = v.get(name)
    if isinstance(x, bool) or not isinstance(x, int | float):
        return None
    try:
        x = float(x)
    except OverflowError:
        return None
    return x if math.isfinite(x) and abs(x) <= MAX_MAGNITUDE else None


def parse_line(line: bytes, risk: dict[str, Any]) -> tuple[str, dict[str, Any]] | None:
    """A replay line as (topic, value) when SPEC §2 calls it good input, else None (bad input:
    it never changes state). Written from the SPEC, not from monitor.records."""
    try:
        doc = json.loads(line)
    except ValueError:
        return None
    if not isinstance(doc, dict) or not isinstance(doc.get("value"), dict):
        return None
    topic, v = doc.get("topic"), doc["value"]
    if topic not in IDS:
        return None
    for name in IDS[topic]:
        if not isinstance(v.get(name), str) or not 0 < len(v[name]) <= MAX_ID:
            return None
    ts = v.get("ts")
    if isinstance(ts, bool) or not isinstance(ts, int | float):
        return None
    if isinstance(ts, float) and not (math.isfinite(ts) and ts.is_integer()):
        return None
    if not 0 <= ts < 2**63:
        return None
    if topic == "prices":
        price = _number(v, "price")
        return (topic, v) if price is not None and price >= MIN_MAGNITUDE else None
    if topic == "fills":
        qty, price = _number(v, "qty"), _number(v, "price")
        if qty is None or price is None or qty < MIN_MAGNITUDE or price < MIN_MAGNITUDE:
            return None
        if "fee" in v and _number(v, "fee") is None:
            return None
        if v.get("margin_mode", "cross") not in ("cross", "isolated"):
            return None
        ok = v["symbol"] in risk["instruments"] and v.get("side") in ("buy", "sell")
        return (topic, v) if ok else None
    amount = _number(v, "amount")
    kind = v.get("kind")
    if amount is None or v["asset"] not in risk["assets"] or kind not in LEDGER_KINDS:
        return None
    if (kind == "deposit" and amount <= 0) or (kind == "withdrawal" and amount >= 0):
        return None
    if kind == "isolated_margin":  # names an instrument whose settle asset is `asset`
        sym = v.get("symbol")
        if not isinstance(sym, str) or sym not in risk["instruments"]:
            return None
        if risk["instruments"][sym]["settle"] != v["asset"]:
            return None
    return topic, v


class NaiveMonitor:
    def __init__(self, risk: dict[str, Any], window: int = 10_000) -> None:
        th = risk["thresholds"]
        self.mc, self.liq, self.h = th["margin_call"], th["liquidation"], th["hysteresis"]
        default_target = self.liq - 2 * self.h if self.h > 0 else 0.95 * self.liq
        self.target = th.get("liquidation_target", default_target)
        self.assets = risk["assets"]
        self.instruments = risk["instruments"]
        self.prices: dict[str, float] = {}
        self.price_ts: dict[str, int] = {}
        self.accounts: dict[str, dict[str, Any]] = {}
        # SPEC §4.1: isolated positions, (account, symbol) -> a one-position "account" whose
        # balance is the wallet; "iso" marks that it takes no collateral weight.
        self.units: dict[tuple[str, str], dict[str, Any]] = {}
        self.window = window
        self.seen: dict[str, deque[tuple[str, str]]] = {}

    # -- prices -------------------------------------------------------------------------------

    def px(self, asset: str) -> float | None:
        spec = self.assets[asset]
        if "price" in spec:
            return float(spec["price"])
        return self.prices.get(spec.get("price_symbol", asset))

    def tiers(self, symbol: str) -> list[tuple[float, float, float, float]]:
        """(max_notional, mmr, imr, cum) per tier."""
        out = []
        cum = 0.0
        prev_max = prev_mmr = None
        for t in self.instruments[symbol]["tiers"]:
            mx = math.inf if t["max_notional"] == "inf" else float(t["max_notional"])
            if prev_max is not None:
                cum = cum + prev_max * (t["mmr"] - prev_mmr)
            out.append((mx, t["mmr"], t["imr"], cum))
            prev_max, prev_mmr = mx, t["mmr"]
        return out

    # -- input --------------------------------------------------------------------------------

    def feed(self, topic: str, v: dict[str, Any], index: int) -> list[dict[str, Any]]:
        if topic == "prices":
            last = self.price_ts.get(v["symbol"])
            if last is not None and v["ts"] < last:
                return []
            self.prices[v["symbol"]] = float(v["price"])
            self.price_ts[v["symbol"]] = int(v["ts"])
            kind, ref = "price", v["symbol"]
        else:
            name = v["account"]
            rid = v["fill_id"] if topic == "fills" else v["entry_id"]
            seen = self.seen.setdefault(topic, deque(maxlen=self.window))
            if (name, rid) in seen:
                return []
            if topic == "fills":
                sym = v["symbol"]
                isolated = v.get("margin_mode", "cross") == "isolated"
                # the position in sym is held in the mode that opened it, until it closes
                other = self.accounts.get(name) if isolated else self.units.get((name, sym))
                if other is not None and sym in other["pos"]:
                    raise ModeConflict(f"{name} holds {sym} in the other margin mode")
                seen.append((name, rid))
                self.fill(self.unit(name, sym) if isolated else self.account(name), v)
                kind = "fill"
            else:
                seen.append((name, rid))
                asset, amount = v["asset"], float(v["amount"])
                if v["kind"] == "isolated_margin":  # from the cross balance to the wallet
                    cross, wallet = self.account(name), self.unit(name, v["symbol"])
                    cross["b"][asset] = cross["b"].get(asset, 0.0) - amount
                    wallet["b"][asset] = wallet["b"].get(asset, 0.0) + amount
                else:
                    acct = self.account(name)
                    acct["b"][asset] = acct["b"].get(asset, 0.0) + amount
                kind = "ledger"
            ref = rid
        events = []
        # By account; an account's cross margin first, then its isolated positions by symbol.
        order = sorted([(name, "") for name in self.accounts] + list(self.units))
        for name, sym in order:
            acct = self.units[(name, sym)] if sym else self.accounts[name]
            event = self.evaluate(name, int(v["ts"]), kind, ref, topic, index, sym or None)
            if event and event["type"] == "liquidation":
                event["liquidation_plan"] = self.plan(acct)
            if event:
                events.append(event)
        return events

    def account(self, name: str) -> dict[str, Any]:
        return self.accounts.setdefault(name, {"b": {}, "pos": {}, "state": 0, "n": 0})

    def unit(self, name: str, sym: str) -> dict[str, Any]:
        return self.units.setdefault((name, sym), {"b": {}, "pos": {}, "state": 0, "n": 0,
                                                   "iso": True})

    def weight(self, acct: dict[str, Any], asset: str, bal: float) -> float:
        """Collateral weight: positive cross balances only; an isolated wallet counts in full."""
        if bal > 0 and not acct.get("iso"):
            return self.assets[asset]["collateral_weight"]
        return 1.0

    def fill(self, acct: dict[str, Any], v: dict[str, Any]) -> None:
        """SPEC §4 Fill. A reducing fill that leaves at most 1e-9 of the larger of |q| and its
        qty closes the position: quantities are decimal lots summed in binary floating point,
        and such a remainder is their rounding (0.1 + 0.2 − 0.3), not a position."""
        sym, qty, price = v["symbol"], float(v["qty"]), float(v["price"])
        cs = self.instruments[sym].get("contract_size", 1.0)
        settle = self.instruments[sym]["settle"]
        s = qty if v["side"] == "buy" else -qty
        q, e = acct["pos"].get(sym, (0.0, 0.0))
        if q == 0 or (q > 0) == (s > 0):
            e = (abs(q) * e + qty * price) / (abs(q) + qty) if q != 0 else price
            q += s
        else:
            closed = min(abs(q), qty)
            realized = closed * cs * (price - e) * (1 if q > 0 else -1)
            acct["b"][settle] = acct["b"].get(settle, 0.0) + realized
            old_q = q
            q += s
            if abs(q) <= 1e-9 * max(abs(old_q), qty):
                q = 0.0  # what is left is float rounding of decimal lots, not a position
            elif (q > 0) != (old_q > 0):
                e = price
        if q == 0:
            acct["pos"].pop(sym, None)
        else:
            acct["pos"][sym] = (q, e)
        acct["b"][settle] = acct["b"].get(settle, 0.0) - float(v.get("fee", 0.0))

    # -- evaluation ---------------------------------------------------------------------------

    def figures(self, sym: str, q: float, e: float) -> dict[str, Any] | None:
        inst = self.instruments[sym]
        spx = self.px(inst["settle"])
        if spx is None:
            return None
        cs = inst.get("contract_size", 1.0)
        mark = self.prices.get(inst.get("mark_symbol", sym), e)
        n = abs(q) * cs * mark
        tier = next((t for t in self.tiers(sym) if n <= t[0]), self.tiers(sym)[-1])
        return {"mark": mark, "spx": spx, "n": n, "tier": tier,
                "mm": (n * tier[1] - tier[3]) * spx, "im": n * tier[2] * spx,
                "upnl": q * cs * (mark - e) * spx}

    def evaluate(self, name: str, ts: int, kind: str, ref: str, topic: str,
                 index: int, isolated: str | None = None) -> dict[str, Any] | None:
        acct = self.accounts[name] if isolated is None else self.units[(name, isolated)]
        cv, unpriced = 0.0, False
        for asset, bal in acct["b"].items():
            p = self.px(asset)
            if p is None:
                unpriced = unpriced or bal != 0
                continue
            cv += bal * p * self.weight(acct, asset, bal)
        figs = {}
        for sym, (q, e) in acct["pos"].items():
            f = self.figures(sym, q, e)
            if f is None:
                return None
            figs[sym] = f
        upnl = sum(f["upnl"] for f in figs.values())
        mm = sum(f["mm"] for f in figs.values())
        im = sum(f["im"] for f in figs.values())
        equity = cv + upnl
        r = mm / equity if equity > 0 else (0.0 if mm == 0 else math.inf)
        state = acct["state"]
        up = 2 if r >= self.liq else 1 if r >= self.mc else 0
        if up > state:
            new = up
        else:
            down = 2 if r >= self.liq - self.h else 1 if r >= self.mc - self.h else 0
            new = down if down < state else state
        if new == state:
            return None
        acct["n"] += 1
        acct["state"] = new
        positions = []
        for sym in sorted(figs):
            q, e = acct["pos"][sym]
            f = figs[sym]
            cs = self.instruments[sym].get("contract_size", 1.0)
            k = cs * f["spx"]
            _, mmr, _, cum = f["tier"]
            # E0 + q·k·(p − m) = (MMo + |q|·k·mmr·p − cum·spx) / L, solved for p by hand.
            denom = q * k - abs(q) * k * mmr / self.liq
            lp = None
            if denom != 0:
                lp = ((mm - f["mm"]) / self.liq - cum * f["spx"] / self.liq - equity
                      + q * k * f["mark"]) / denom
                if not lp > 0:
                    lp = None
            # Equity is 0 where q·k·(p − m) = −E0.
            bp = f["mark"] - equity / (q * k)
            bp = bp if bp > 0 and math.isfinite(bp) else None
            positions.append({"symbol": sym, "qty": q, "entry_price": e, "mark_price": f["mark"],
                              "notional": f["n"] * f["spx"], "unrealized_pnl": f["upnl"],
                              "maintenance_margin": f["mm"], "initial_margin": f["im"],
                              "liquidation_price": lp, "bankruptcy_price": bp})
        etype = TYPES[new]
        unit = name if isolated is None else f"{name}/{isolated}"
        mode = {"margin_mode": "cross"} if isolated is None else {
            "margin_mode": "isolated", "symbol": isolated}
        settle = None if isolated is None else self.instruments[isolated]["settle"]
        return {
            "event_id": f"{unit}:{acct['n']}:{etype}", "type": etype, "account": name, **mode,
            "state": STATES[new], "previous_state": STATES[state], "ts": ts,
            "trigger": {"kind": kind, "ref": ref, "topic": topic, "index": index},
            "margin_ratio": None if math.isinf(r) else r, "insolvent": math.isinf(r),
            "unpriced": unpriced, "equity": equity, "maintenance_margin": mm,
            "initial_margin": im, "collateral_value": cv, "unrealized_pnl": upnl,
            # SPEC §4.1: a unit's `balances` = {settle: ib}, 0 included
            "balances": ({a: b for a, b in sorted(acct["b"].items()) if b != 0}
                         if isolated is None else {settle: acct["b"].get(settle, 0.0)}),
            "positions": positions,
        }

    # -- liquidation plan (SPEC §5.1) ------------------------------------------------------------

    def value(self, acct: dict[str, Any]) -> tuple[float, float]:
        """(equity, MM) of an account whose settle assets are all priced."""
        cv = 0.0
        for asset, bal in acct["b"].items():
            p = self.px(asset)
            if p is not None:
                cv += bal * p * self.weight(acct, asset, bal)
        equity, mm = cv, 0.0
        for sym, (q, e) in acct["pos"].items():
            f = self.figures(sym, q, e)
            assert f is not None
            equity += f["upnl"]
            mm += f["mm"]
        return equity, mm

    def ratio(self, acct: dict[str, Any]) -> float:
        equity, mm = self.value(acct)
        return mm / equity if equity > 0 else (0.0 if mm == 0 else math.inf)

    def closed_by(self, acct: dict[str, Any], sym: str, delta: float) -> dict[str, Any]:
        """A copy of the account after a fill closing delta contracts at the mark, with fee."""
        after = {"b": dict(acct["b"]), "pos": dict(acct["pos"]), "iso": acct.get("iso")}
        q, e = acct["pos"][sym]
        inst = self.instruments[sym]
        mark = self.prices.get(inst.get("mark_symbol", sym), e)
        fee = inst.get("liquidation_fee", 0.0) * delta * inst.get("contract_size", 1.0) * mark
        self.fill(after, {"symbol": sym, "qty": delta, "price": mark, "fee": fee,
                          "side": "sell" if q > 0 else "buy"})
        return after

    def plan(self, acct: dict[str, Any]) -> dict[str, Any]:
        rt = self.target
        equity, mm = self.value(acct)
        deposit = max(0.0, mm / rt - equity)
        mms = {sym: self.figures(sym, q, e)["mm"] for sym, (q, e) in acct["pos"].items()}
        cur = {"b": dict(acct["b"]), "pos": dict(acct["pos"]), "iso": acct.get("iso")}
        steps = []
        for sym in sorted(mms, key=lambda s: (-mms[s], s)):
            if self.ratio(cur) <= rt:
                break
            q, e = cur["pos"][sym]
            inst = self.instruments[sym]
            cs = inst.get("contract_size", 1.0)
            mark = self.prices.get(inst.get("mark_symbol", sym), e)
            fee_rate = inst.get("liquidation_fee", 0.0)
            # MM − rt·equity is linear in delta between tier boundaries and the settle
            # balance's zero: evaluate it at each and interpolate on the first piece that
            # reaches the target.
            cuts = {abs(q)} | {abs(q) - t[0] / (cs * mark) for t in self.tiers(sym)[:-1]}
            per = cs * (mark - e) * (1 if q > 0 else -1) - fee_rate * cs * mark
            if per:
                cuts.add(-cur["b"].get(inst["settle"], 0.0) / per)
            lo, lo_acct, delta, nxt = 0.0, cur, abs(q), None
            for cut in sorted(c for c in cuts if 0 < c <= abs(q)):
                hi_acct = self.closed_by(cur, sym, cut)
                if self.ratio(hi_acct) <= rt:
                    e_lo, m_lo = self.value(lo_acct)
                    e_hi, m_hi = self.value(hi_acct)
                    f_lo, f_hi = m_lo - rt * e_lo, m_hi - rt * e_hi
                    delta = lo + (cut - lo) * f_lo / (f_lo - f_hi) if f_hi <= 0 else cut
                    nxt = self.closed_by(cur, sym, delta)
                    if sym not in nxt["pos"]:
                        delta, nxt = abs(q), self.closed_by(cur, sym, abs(q))
                    break
                lo, lo_acct = cut, hi_acct
            reached = nxt is not None
            if nxt is None:
                nxt = lo_acct
            r = self.ratio(nxt)
            steps.append({"symbol": sym, "side": "sell" if q > 0 else "buy", "qty": delta,
                          "price": mark, "fee": fee_rate * delta * cs * mark,
                          "close": delta == abs(q),
                          "margin_ratio_after": None if math.isinf(r) else r})
            cur = nxt
            if reached:
                break
        r = self.ratio(cur)
        return {"target_ratio": rt, "deposit_to_target": deposit, "steps": steps,
                "margin_ratio_after": None if math.isinf(r) else r,
                "bad_debt": max(0.0, -self.value(cur)[0])}
