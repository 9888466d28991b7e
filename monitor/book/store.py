"""`Book`: every account's balances, positions, state and transition counter in columns, with
the valuation and band filing that decide which accounts a tick re-values."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from monitor.account import Account
from monitor.book.bands import SymbolBands
from monitor.book.tables import CAP, CAP1, INF, NAN, SAFETY, TOL, Tables, grown
from monitor.config import RiskConfig
from monitor.errors import LiqmonError
from monitor.margin import Position, is_dust
from monitor.snapshot import Snapshots
from monitor.state import AccountState

_AID_MASK = 0xFFFFFFFF
_STATE_ENUM = tuple(AccountState)

# An assessment (see Book.assess) is a plain tuple, indexed by these names.
EVALUABLE, RATIO, EQUITY, MM, SCALE, AE, BE, AM, BM, HAS_POS, SYMS = range(11)
Assessment = tuple


class NotInConfig(LiqmonError):
    """A restored account holds an asset or instrument the risk config does not define."""

    def __init__(self, account_id: str, names: list[str]) -> None:
        super().__init__(f"account {account_id!r} holds {', '.join(names)}, which the risk "
                         "config does not define: run with the config its state was "
                         "checkpointed under")
        self.account_id, self.names = account_id, names


class Book:
    """Every account's balances, positions, state and transition counter, in columns."""

    def __init__(self, config: RiskConfig) -> None:
        self.config = config
        self.t = Tables(config)
        self.ids: list[str | None] = []
        self.index: dict[str, int] = {}
        self.free_rows: list[int] = []
        self.free_pos: list[int] = []
        self.n_pos = 0  # position rows in use, free ones included
        self.positions = 0  # open positions
        self._alloc_rows(0, 1024)
        self._alloc_pos(0, 4096)
        self.bands = [SymbolBands() for _ in self.t.symbols]
        self.sym_px = np.full(len(self.t.symbols), NAN)  # current price per symbol id
        self.sym_px_m = memoryview(self.sym_px)

    # -- storage -------------------------------------------------------------------------------

    def _alloc_rows(self, old: int, size: int) -> None:
        na = self.t.n_assets
        if old == 0:
            self.state = np.zeros(size, np.int8)
            self.trans = np.zeros(size, np.int64)
            self.part = np.full(size, -1, np.int32)
            self.first = np.full(size, -1, np.int32)
            self.aid = np.zeros(size, np.uint32)
            self.bal = np.zeros(size * na, np.float64)
        else:
            self.state = grown(self.state, size)
            self.trans = grown(self.trans, size)
            part = np.full(size, -1, np.int32)
            part[:old] = self.part
            self.part = part
            first = np.full(size, -1, np.int32)
            first[:old] = self.first
            self.first = first
            self.aid = grown(self.aid, size)
            self.bal = grown(self.bal, size * na)
        self.cap = size
        self.state_m, self.trans_m = memoryview(self.state), memoryview(self.trans)
        self.part_m, self.first_m = memoryview(self.part), memoryview(self.first)
        self.aid_m, self.bal_m = memoryview(self.aid), memoryview(self.bal)

    def _alloc_pos(self, old: int, size: int) -> None:
        if old == 0:
            self.p_acct = np.zeros(size, np.int32)
            self.p_instr = np.zeros(size, np.int32)
            self.p_qty = np.zeros(size, np.float64)
            self.p_entry = np.zeros(size, np.float64)
            self.p_next = np.full(size, -1, np.int32)
        else:
            self.p_acct = grown(self.p_acct, size)
            self.p_instr = grown(self.p_instr, size)
            self.p_qty = grown(self.p_qty, size)
            self.p_entry = grown(self.p_entry, size)
            nxt = np.full(size, -1, np.int32)
            nxt[:old] = self.p_next
            self.p_next = nxt
        self.pcap = size
        self.acct_m, self.instr_m = memoryview(self.p_acct), memoryview(self.p_instr)
        self.qty_m, self.entry_m = memoryview(self.p_qty), memoryview(self.p_entry)
        self.next_m = memoryview(self.p_next)

    def reserve(self, accounts: int, positions: int) -> None:
        """Grow the columns once for a bulk load."""
        if accounts > self.cap:
            self._alloc_rows(self.cap, accounts)
        if positions > self.pcap:
            self._alloc_pos(self.pcap, positions)

    def new_row(self, account_id: str, partition: int | None) -> int:
        if self.free_rows:
            row = self.free_rows.pop()
            self.ids[row] = account_id
        else:
            row = len(self.ids)
            if row == self.cap:
                self._alloc_rows(self.cap, self.cap + (self.cap >> 1))
            self.ids.append(account_id)
        self.index[account_id] = row
        self.part_m[row] = -1 if partition is None else partition
        return row

    def free_row(self, row: int) -> None:
        """Forget an account: its bands go stale with its anchor id."""
        p = self.first_m[row]
        while p >= 0:
            nxt = self.next_m[p]
            self.free_pos.append(p)
            self.next_m[p] = -1
            self.positions -= 1
            p = nxt
        self.first_m[row] = -1
        na = self.t.n_assets
        self.bal[row * na:(row + 1) * na] = 0.0
        self.state_m[row] = 0
        self.trans_m[row] = 0
        self.part_m[row] = -1
        self.aid_m[row] = (self.aid_m[row] + 1) & _AID_MASK
        account_id = self.ids[row]
        self.ids[row] = None
        del self.index[account_id]  # type: ignore[arg-type]
        self.free_rows.append(row)

    def _new_pos(self, row: int, instr: int, qty: float, entry: float) -> int:
        if self.free_pos:
            p = self.free_pos.pop()
        else:
            p = self.n_pos
            if p == self.pcap:
                self._alloc_pos(self.pcap, self.pcap + (self.pcap >> 1))
            self.n_pos = p + 1
        self.acct_m[p] = row
        self.instr_m[p] = instr
        self.qty_m[p] = qty
        self.entry_m[p] = entry
        self.next_m[p] = -1
        tail = self.first_m[row]
        if tail < 0:
            self.first_m[row] = p
        else:  # append: positions keep the order in which they were opened
            nxt = self.next_m
            while nxt[tail] >= 0:
                tail = nxt[tail]
            nxt[tail] = p
        self.positions += 1
        return p

    def _unlink(self, row: int, p: int) -> None:
        nxt = self.next_m
        q = self.first_m[row]
        if q == p:
            self.first_m[row] = nxt[p]
        else:
            while nxt[q] != p:
                q = nxt[q]
            nxt[q] = nxt[p]
        nxt[p] = -1
        self.free_pos.append(p)
        self.positions -= 1

    def is_blank(self, row: int) -> bool:
        if self.first_m[row] >= 0 or self.trans_m[row]:
            return False
        na = self.t.n_assets
        bal = self.bal_m
        return all(bal[k] == 0.0 for k in range(row * na, row * na + na))

    def position_count(self, row: int) -> int:
        n, p, nxt = 0, self.first_m[row], self.next_m
        while p >= 0:
            n += 1
            p = nxt[p]
        return n

    # -- inputs ---------------------------------------------------------------------------------

    def apply_fill(self, row: int, instr: int, signed_qty: float, price: float,
                   fee: float) -> None:
        """SPEC §4 Fill, with the arithmetic of `margin.apply_fill_to_position` (including
        its rule that a close leaving only float rounding is flat)."""
        t = self.t
        p = self.first_m[row]
        nxt, instr_m = self.next_m, self.instr_m
        while p >= 0 and instr_m[p] != instr:
            p = nxt[p]
        realized = 0.0
        if p < 0:
            self._new_pos(row, instr, signed_qty, price)
        else:
            qty_m = self.qty_m
            q = qty_m[p]
            if q == 0:
                qty_m[p] = signed_qty
                self.entry_m[p] = price
            else:
                e = self.entry_m[p]
                qty = abs(signed_qty)
                if (q > 0) == (signed_qty > 0):
                    self.entry_m[p] = (abs(q) * e + qty * price) / (abs(q) + qty)
                    qty_m[p] = q + signed_qty
                else:
                    closed = min(abs(q), qty)
                    realized = closed * t.i_cs[instr] * (price - e) * math.copysign(1.0, q)
                    new_q = q + signed_qty
                    if is_dust(new_q, q, qty):
                        self._unlink(row, p)
                    else:
                        if (new_q > 0) != (q > 0):
                            self.entry_m[p] = price
                        qty_m[p] = new_q
        k = row * t.n_assets + t.i_settle[instr]
        balance = self.bal_m[k]
        balance += realized
        balance -= fee
        self.bal_m[k] = balance

    def add_balance(self, row: int, asset: int, amount: float) -> None:
        k = row * self.t.n_assets + asset
        self.bal_m[k] = self.bal_m[k] + amount

    def load(self, account_id: str, balances: Mapping[str, float],
             positions: Mapping[str, Position], state: int, transitions: int,
             partition: int | None) -> int:
        """Install an account as given (restore)."""
        t = self.t
        row = self.new_row(account_id, partition)
        base = row * t.n_assets
        bal_m = self.bal_m
        for asset, amount in balances.items():
            bal_m[base + t.asset_index[asset]] = amount
        instr_index = t.instr_index
        for symbol, position in positions.items():
            self._new_pos(row, instr_index[symbol], position.qty, position.entry_price)
        self.state_m[row] = state
        self.trans_m[row] = transitions
        return row

    def install_many(self, snapshots: Snapshots) -> np.ndarray:
        """Install accounts as their snapshots hold them (restore), all at once: account and
        position rows are taken together and every column is filled by one numpy operation.
        None of the accounts may be held already. Returns their rows."""
        s = snapshots
        t = self.t
        n = len(s)
        asset_of = np.array([t.asset_index.get(name, -1) for name in s.names], np.int64)
        instr_of = np.array([t.instr_index.get(name, -1) for name in s.names], np.int64)
        bal_asset, pos_instr = asset_of[s.bal_name], instr_of[s.pos_name]
        bal_owner = np.repeat(np.arange(n), s.bal_count)
        pos_owner = np.repeat(np.arange(n), s.pos_count)
        if (bal_asset < 0).any() or (pos_instr < 0).any():
            k = min(bal_owner[bal_asset < 0].min(initial=n),
                    pos_owner[pos_instr < 0].min(initial=n))
            unknown = {*s.bal_name[(bal_owner == k) & (bal_asset < 0)].tolist(),
                       *s.pos_name[(pos_owner == k) & (pos_instr < 0)].tolist()}
            raise NotInConfig(s.ids[k], sorted(s.names[name] for name in unknown))
        reused = self.free_rows[len(self.free_rows) - min(n, len(self.free_rows)):]
        del self.free_rows[len(self.free_rows) - len(reused):]
        first = len(self.ids)
        end = first + n - len(reused)
        if end > self.cap:
            self._alloc_rows(self.cap, max(end, self.cap + (self.cap >> 1)))
        rows = np.concatenate([np.array(reused, np.int64), np.arange(first, end)])
        for row, account_id in zip(reused, s.ids, strict=False):
            self.ids[row] = account_id
        self.ids.extend(s.ids[len(reused):])
        self.index.update(zip(s.ids, rows.tolist(), strict=True))
        self.state[rows] = s.state
        self.trans[rows] = s.transitions
        self.part[rows] = s.partition
        self.bal[rows[bal_owner] * t.n_assets + bal_asset] = s.bal_amount
        count = len(pos_instr)
        reused = self.free_pos[len(self.free_pos) - min(count, len(self.free_pos)):]
        del self.free_pos[len(self.free_pos) - len(reused):]
        first = self.n_pos
        end = first + count - len(reused)
        if end > self.pcap:
            self._alloc_pos(self.pcap, max(end, self.pcap + (self.pcap >> 1)))
        self.n_pos = end
        pos = np.concatenate([np.array(reused, np.int64), np.arange(first, end)])
        owner = rows[pos_owner]
        self.p_acct[pos] = owner
        self.p_instr[pos] = pos_instr
        self.p_qty[pos] = s.pos_qty
        self.p_entry[pos] = s.pos_entry
        # each account's positions are a run, in opening order: link each to the next
        nxt = np.full(count, -1, np.int64)
        same = np.flatnonzero(owner[1:] == owner[:-1])
        nxt[same] = pos[same + 1]
        self.p_next[pos] = nxt
        self.first[rows] = -1
        holding = s.pos_count > 0
        starts = np.cumsum(s.pos_count) - s.pos_count
        self.first[rows[holding]] = pos[starts[holding]]
        self.positions += count
        return rows

    def snapshots(self, rows: np.ndarray) -> Snapshots:
        """The accounts of these rows as snapshot columns (the checkpoint stamps seq and
        as_of); names: the config's assets, then its instruments."""
        t = self.t
        na = t.n_assets
        n = len(rows)
        bal = self.bal.reshape(-1, na)[rows]
        owner, asset = np.nonzero(bal)  # row by row: each account's, in config order
        pos, own = self.positions_of_rows(rows)
        order = np.argsort(own, kind="stable")  # walked a step at a time: back to accounts
        pos = pos[order]
        none = np.zeros(n, np.int64)
        return Snapshots(
            ids=[self.ids[row] for row in rows.tolist()],  # type: ignore[misc]
            state=self.state[rows], transitions=self.trans[rows], partition=self.part[rows],
            seq=none, names=[*t.assets, *t.instruments],
            bal_count=np.bincount(owner, minlength=n), bal_name=asset.astype(np.int64),
            bal_amount=bal[owner, asset], pos_count=np.bincount(own, minlength=n),
            pos_name=na + self.p_instr[pos].astype(np.int64), pos_qty=self.p_qty[pos],
            pos_entry=self.p_entry[pos], as_of_count=none,
            as_of_topic=np.empty(0, np.int64), as_of_partition=np.empty(0, np.int32),
            as_of_offset=np.empty(0, np.int64))

    # -- reading --------------------------------------------------------------------------------

    def balances_of(self, row: int) -> dict[str, float]:
        """Non-zero balances, in config order (the order valuations sum them in)."""
        t = self.t
        base = row * t.n_assets
        bal = self.bal_m
        return {t.assets[a]: bal[base + a] for a in range(t.n_assets) if bal[base + a] != 0.0}

    def positions_of(self, row: int) -> dict[str, Position]:
        """Open positions, in the order they were opened."""
        names = self.t.instruments
        out = {}
        p, nxt = self.first_m[row], self.next_m
        while p >= 0:
            out[names[self.instr_m[p]]] = Position(qty=self.qty_m[p], entry_price=self.entry_m[p])
            p = nxt[p]
        return out

    def account(self, row: int) -> Account:
        """The account as an `Account` (balances, positions in order, state, …)."""
        t = self.t
        base = row * t.n_assets
        bal = self.bal_m
        balances = {}
        watched = set()
        for a, _, _, sym, _ in t.asset_rows:
            value = bal[base + a]
            if value != 0.0:
                balances[t.assets[a]] = value
                if sym >= 0:
                    watched.add(sym)
        names, instr_rows = t.instruments, t.instr_rows
        positions = {}
        p, nxt, instr_m, qty_m, entry_m = (self.first_m[row], self.next_m, self.instr_m,
                                           self.qty_m, self.entry_m)
        while p >= 0:
            i = instr_m[p]
            positions[names[i]] = Position(qty_m[p], entry_m[p])
            row_i = instr_rows[i]
            watched.add(row_i[5])
            if row_i[3] >= 0:
                watched.add(row_i[3])
            p = nxt[p]
        partition = self.part_m[row]
        symbols = t.symbols
        return Account(balances, positions, _STATE_ENUM[self.state_m[row]],
                       self.trans_m[row], None if partition < 0 else partition,
                       frozenset([symbols[s] for s in watched]))

    def watched_of(self, row: int) -> set[int]:
        """Symbol ids whose ticks can move the account (SPEC §6)."""
        t = self.t
        out: set[int] = set()
        base = row * t.n_assets
        bal = self.bal_m
        for a in range(t.n_assets):
            if bal[base + a] != 0.0 and t.a_sym_id[a] >= 0:
                out.add(t.a_sym_id[a])
        p, nxt = self.first_m[row], self.next_m
        while p >= 0:
            i = self.instr_m[p]
            out.add(t.i_mark_id[i])
            if t.i_settle_id[i] >= 0:
                out.add(t.i_settle_id[i])
            p = nxt[p]
        return out

    # -- evaluation -----------------------------------------------------------------------------

    def assess(self, row: int, prices: Mapping[str, float]) -> Assessment:
        """Value the account from scratch — the same arithmetic, in the same order, as
        `margin.value_account` over `balances_of` and `positions_of` — and gather the
        sensitivities its band needs. Returns the tuple
        (evaluable, ratio, equity, mm, scale, ae, be, am, bm, has_pos, syms):
        ae/be are the first/second-order sensitivities of equity to a relative move ε of every
        moving price, am/bm those of MM, scale the magnitude of equity's terms, syms the
        symbols the account watches."""
        get = prices.get
        base = row * self.t.n_assets
        bal = self.bal_m
        collateral = scale = ae = be = am = bm = 0.0
        syms: list[int] = []
        for a, fixed, weight, sym, symbol in self.t.asset_rows:
            balance = bal[base + a]
            if balance == 0.0:
                continue
            if fixed is None:
                syms.append(sym)
                px = get(symbol)
                if px is None:
                    continue
                term = balance * px * (weight if balance > 0 else 1.0)
                collateral += term
                term = abs(term)
                scale += term
                ae += term
            else:
                term = balance * fixed * (weight if balance > 0 else 1.0)
                collateral += term
                scale += abs(term)
        upnl = mm = 0.0
        evaluable = True
        p = self.first_m[row]
        has_pos = p >= 0
        if has_pos:
            nxt, instr_m, qty_m, entry_m = self.next_m, self.instr_m, self.qty_m, self.entry_m
            instr_rows = self.t.instr_rows
            while p >= 0:
                cs, spx, settle_symbol, settle_sym, mark_symbol, mark_sym, tiers = \
                    instr_rows[instr_m[p]]
                syms.append(mark_sym)
                if spx is None:
                    syms.append(settle_sym)
                    spx = get(settle_symbol)
                    if spx is None:
                        evaluable = False
                        p = nxt[p]
                        continue
                    moving = True
                else:
                    moving = False
                q = qty_m[p]
                e = entry_m[p]
                mark = get(mark_symbol, e)
                notional = abs(q) * cs * mark
                for tier in tiers:
                    if notional <= tier[0]:
                        break
                u = q * cs * (mark - e) * spx
                m = (notional * tier[1] - tier[3]) * spx
                upnl += u
                mm += m
                grown = notional * CAP1
                if grown <= tier[0]:
                    slope = tier[1]
                else:
                    for reach in tiers:
                        if grown <= reach[0]:
                            break
                    slope = reach[1]
                nq = notional * spx
                slope *= nq
                u = abs(u)
                scale += u
                ae += nq
                am += slope
                if moving:
                    ae += u
                    be += nq
                    am += m + slope
                    bm += slope
                p = nxt[p]
        if not evaluable:
            return (False, NAN, NAN, NAN, 0.0, 0.0, 0.0, 0.0, 0.0, True, syms)
        equity = collateral + upnl
        if equity > 0:
            ratio = mm / equity
        elif mm == 0:
            ratio = 0.0
        else:
            ratio = INF
        return (True, ratio, equity, mm, scale, ae, be, am, bm, has_pos, syms)

    def safe_eps(self, state: int, a: Assessment) -> float:
        """Largest relative move of every watched price (times SAFETY) that provably keeps
        the state; 0 when the account sits on a boundary or cannot be valued."""
        evaluable, _, equity, mm, scale, ae, be, am, bm, has_pos, _ = a
        if not evaluable:
            return 0.0
        if not has_pos:  # no requirement: the ratio is 0 at any price
            return INF if state == 0 else 0.0
        t = self.t
        eps = CAP
        if state < 2:
            up = t.mc if state == 0 else t.liq
            room = up * equity - mm - TOL * (up * scale + mm)
            if not room > 0:
                return 0.0
            lin, quad = up * ae + am, up * be + bm
            if lin > 0 or quad > 0:
                bound = 2 * room / (lin + math.sqrt(lin * lin + 4 * quad * room))
                if bound < eps:
                    eps = bound
        if state > 0:
            down = t.mc_h if state == 1 else t.liq_h
            room = mm - down * equity - TOL * (down * scale + mm)
            if not room > 0:
                return 0.0
            lin, quad = down * ae + am, down * be + bm
            if lin > 0 or quad > 0:
                bound = 2 * room / (lin + math.sqrt(lin * lin + 4 * quad * room))
                if bound < eps:
                    eps = bound
        return eps * SAFETY

    def anchor(self, row: int, eps: float, syms: list[int]) -> None:
        """File the account under a band of ±eps around the current price of every symbol it
        watches (an empty band for a symbol without a price: its first tick re-evaluates)."""
        aid = (self.aid_m[row] + 1) & _AID_MASK
        self.aid_m[row] = aid
        if not syms:
            return
        sym_px = self.sym_px_m
        bands = self.bands
        down, up = 1.0 - eps, 1.0 + eps
        for s in (set(syms) if len(syms) > 1 else syms):
            price = sym_px[s]
            if price == price:
                lo, hi = price * down, price * up
            else:  # NaN: no price yet
                lo, hi = INF, -INF
            b = bands[s]
            n = b.np
            if n == b.pcap:
                b._grow_pending(n + 1)
            b.mlo[n] = lo
            b.mhi[n] = hi
            b.mrow[n] = row
            b.maid[n] = aid
            if hi < b.pfloor:
                b.pfloor = hi
            if lo > b.pceil:
                b.pceil = lo
            n += 1
            b.np = n
            if n >= b.limit:
                b.merge(self.aid)

    def set_price(self, sym: int, price: float) -> None:
        self.sym_px_m[sym] = price

    def load_prices(self, prices: Mapping[str, float]) -> None:
        self.sym_px[:] = self.t.symbol_prices(prices)

    def fold(self) -> None:
        """Fold every symbol's waiting bulk re-filing into its sorted runs now."""
        for bands in self.bands:
            if bands.np > bands.limit:
                bands.merge(self.aid)

    def candidates(self, sym: int, price: float) -> np.ndarray | None:
        """Rows whose band for this symbol the price touches or leaves (unique, current)."""
        bands = self.bands[sym]
        if bands.np > bands.limit:  # a bulk re-filing is waiting to be folded in
            bands.merge(self.aid)
        taken = bands.take(price)
        if taken is None:
            return None
        rows, aids = taken
        rows = rows[self.aid[rows] == aids]
        if len(rows) == 0:
            return None
        if len(rows) > 1:
            rows = np.unique(rows)
        return rows

    def holders(self, sym: int) -> np.ndarray:
        return self.bands[sym].live_rows(self.aid)

    # -- vector paths ---------------------------------------------------------------------------

    def assess_many(self, rows: np.ndarray) -> dict[str, Any]:
        """`assess` for many accounts at once, in numpy. Per-account sums run in the same
        order as `assess` (np.bincount adds sequentially), so equity and MM are identical."""
        t = self.t
        n = len(rows)
        na = t.n_assets
        sym_px = self.sym_px
        zeros = np.zeros
        collateral, scale, ae = zeros(n), zeros(n), zeros(n)
        pair_rows: list[np.ndarray] = []
        pair_syms: list[np.ndarray] = []
        bal = self.bal.reshape(-1, na)[rows]
        with np.errstate(invalid="ignore"):
            for a, fixed, weight, sym, _ in t.asset_rows:
                b = bal[:, a]
                nonzero = b != 0.0
                if not nonzero.any():
                    continue
                if fixed is None:
                    local = np.flatnonzero(nonzero)
                    pair_rows.append(local)
                    pair_syms.append(np.full(len(local), sym))
                    px = sym_px[sym]
                    if px != px:
                        continue
                    term = b * px * np.where(b > 0, weight, 1.0)
                    collateral += term
                    term = np.abs(term)
                    scale += term
                    ae += term
                else:
                    term = b * fixed * np.where(b > 0, weight, 1.0)
                    collateral += term
                    scale += np.abs(term)
            pos, own = self.positions_of_rows(rows)
            if len(pos):
                instr = self.p_instr[pos]
                q = self.p_qty[pos]
                e = self.p_entry[pos]
                mark_sym = t.v_mark_id[instr]
                pair_rows.append(own)
                pair_syms.append(mark_sym)
                moving = t.v_settle_moves[instr]
                any_moving = bool(moving.any())
                if any_moving:
                    settle_px = np.where(t.v_settle_moves, sym_px[t.v_settle_id],
                                         t.v_settle_fixed)
                    spx = settle_px[instr]
                    pair_rows.append(own[moving])
                    pair_syms.append(t.v_settle_id[instr[moving]])
                else:
                    spx = t.v_settle_fixed[instr]
                cs = t.v_cs[instr]
                mark = sym_px[mark_sym]
                mark = np.where(mark == mark, mark, e)
                notional = np.abs(q) * cs * mark
                tier = self._tiers(instr, notional)
                reach = self._tiers(instr, notional * CAP1)
                u = q * cs * (mark - e) * spx
                m = (notional * t.t_mmr[instr, tier] - t.t_cum[instr, tier]) * spx
                upnl = np.bincount(own, u, n)
                mm = np.bincount(own, m, n)
                nq = notional * spx
                slope = t.t_mmr[instr, reach] * nq
                u = np.abs(u)
                scale += np.bincount(own, u, n)
                if any_moving:
                    ae += np.bincount(own, nq + np.where(moving, u, 0.0), n)
                    be = np.bincount(own, np.where(moving, nq, 0.0), n)
                    am = np.bincount(own, slope + np.where(moving, m + slope, 0.0), n)
                    bm = np.bincount(own, np.where(moving, slope, 0.0), n)
                    evaluable = np.bincount(own, spx != spx, n) == 0
                else:
                    ae += np.bincount(own, nq, n)
                    am = np.bincount(own, slope, n)
                    be, bm = zeros(n), zeros(n)
                    evaluable = np.ones(n, bool)
            else:
                upnl, mm, am, be, bm = zeros(n), zeros(n), zeros(n), zeros(n), zeros(n)
                evaluable = np.ones(n, bool)
        has_pos = self.first[rows] >= 0
        equity = collateral + upnl
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = np.where(equity > 0, mm / equity, np.where(mm == 0, 0.0, INF))
        return {"evaluable": evaluable, "ratio": ratio, "equity": equity, "mm": mm,
                "scale": scale, "ae": ae, "be": be, "am": am, "bm": bm, "has_pos": has_pos,
                "collateral": collateral, "upnl": upnl,
                "pair_rows": (np.concatenate(pair_rows) if pair_rows
                              else np.empty(0, np.int64)),
                "pair_syms": (np.concatenate(pair_syms) if pair_syms
                              else np.empty(0, np.int64))}

    def _tiers(self, instr: np.ndarray, notional: np.ndarray) -> np.ndarray:
        """Tier index per position (as Instrument.tier_for), first tier decided cheaply."""
        t_max = self.t.t_max
        tier = (notional > t_max[instr, 0]).astype(np.int64)
        beyond = np.flatnonzero(tier)
        if len(beyond) and self.t.tier_width > 2:
            tier[beyond] = (notional[beyond, None] > t_max[instr[beyond], :-1]).sum(1)
        return tier

    def safe_eps_many(self, states: np.ndarray, v: dict[str, Any]) -> np.ndarray:
        """`safe_eps` in numpy (0 where an account is not provably stable)."""
        t = self.t
        n = len(states)
        equity, mm, scale = v["equity"], v["mm"], v["scale"]
        eps = np.full(n, CAP)
        ok = v["evaluable"].copy()
        with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
            up = np.where(states == 0, t.mc, np.where(states == 1, t.liq, NAN))
            down = np.where(states == 1, t.mc_h, np.where(states == 2, t.liq_h, NAN))
            for limit, sign in ((up, 1.0), (down, -1.0)):
                applies = limit == limit
                if not applies.any():
                    continue
                room = sign * (limit * equity - mm) - TOL * (limit * scale + mm)
                ok &= ~applies | (room > 0)
                lin = limit * v["ae"] + v["am"]
                quad = limit * v["be"] + v["bm"]
                bound = 2 * room / (lin + np.sqrt(lin * lin + 4 * quad * room))
                bound = np.where((lin > 0) | (quad > 0), bound, INF)
                eps = np.where(applies, np.minimum(eps, bound), eps)
        eps = np.where(ok, eps * SAFETY, 0.0)
        no_pos = ~v["has_pos"] & v["evaluable"]
        if no_pos.any():
            eps[no_pos] = np.where(states[no_pos] == 0, INF, 0.0)
        return eps

    def anchor_many(self, rows: np.ndarray, eps: np.ndarray, pair_rows: np.ndarray,
                    pair_syms: np.ndarray) -> None:
        """`anchor` for many accounts; pair_rows index into rows (duplicates are harmless)."""
        self.aid[rows] += np.uint32(1)
        if len(pair_rows) == 0:
            return
        price = self.sym_px[pair_syms]
        e = eps[pair_rows]
        with np.errstate(invalid="ignore"):
            lo = price * (1.0 - e)
            hi = price * (1.0 + e)
        unpriced = price != price
        if unpriced.any():
            lo[unpriced], hi[unpriced] = INF, -INF
        account_rows = rows[pair_rows].astype(np.int32)
        aids = self.aid[account_rows]
        order = np.argsort(pair_syms, kind="stable")
        syms = pair_syms[order]
        cuts = np.flatnonzero(syms[1:] != syms[:-1]) + 1
        starts = [0, *cuts.tolist()]
        ends = [*cuts.tolist(), len(syms)]
        account_rows, aids, lo, hi = account_rows[order], aids[order], lo[order], hi[order]
        for s, a, b in zip(syms[starts].tolist(), starts, ends, strict=True):
            # no merge here: a bulk re-filing is folded in by the symbol's next tick
            self.bands[s].push_many(account_rows[a:b], aids[a:b], lo[a:b], hi[a:b])

    def positions_of_rows(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Every position of these accounts, as (position ids, index into ``rows`` of each
        one's owner); one account's positions come in list order. The linked lists are walked
        a step at a time for all accounts at once."""
        cur = self.first[rows]
        owner = np.flatnonzero(cur >= 0)
        cur = cur[owner]
        chunks_p, chunks_o = [], []
        while len(cur):
            chunks_p.append(cur)
            chunks_o.append(owner)
            cur = self.p_next[cur]
            more = cur >= 0
            owner, cur = owner[more], cur[more]
        if not chunks_p:
            return np.empty(0, np.int64), np.empty(0, np.int64)
        return np.concatenate(chunks_p), np.concatenate(chunks_o)

    def rows_in_use(self) -> np.ndarray:
        """Every row that holds an account."""
        used = np.ones(len(self.ids), bool)
        if self.free_rows:
            used[np.array(self.free_rows, dtype=np.int64)] = False
        return np.flatnonzero(used)

    def memory_bytes(self) -> int:
        """Bytes held by the numpy columns and band index (not the id strings and dict)."""
        total = sum(a.nbytes for a in (self.state, self.trans, self.part, self.first, self.aid,
                                       self.bal, self.p_acct, self.p_instr, self.p_qty,
                                       self.p_entry, self.p_next))
        for b in self.bands:
            total += sum(a.nbytes for a in (b.hi, b.hlo, b.hrow, b.haid, b.lneg, b.lrow, b.laid,
                                            b.plo, b.phi, b.prow, b.paid))
        return total
