"""`Book`: every account's balances, positions, state and transition counter in columns, with
the valuation and band filing that decide which accounts a tick re-values.

A row is a risk unit: an account's cross margin, or an isolated position (SPEC §4.1), which is
a row of its own holding one balance (its wallet, in the settle asset) and at most that one
position, flagged in the `isolated` column and keyed by a `UnitKey` in `units`. Valuation and
bands then treat both alike; only the collateral weight differs (an isolated wallet counts in
full)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import numba
import numpy as np

from monitor.account import Account, RiskKey, UnitKey
from monitor.book import compaction, figures, kernels
from monitor.book.bands import PendingBands, SymbolBands
from monitor.book.columns import BookColumns, Columns
from monitor.book.tables import INF, NAN, Tables, grown
from monitor.config import RiskConfig
from monitor.errors import LiqmonError
from monitor.liquidation import plan_json
from monitor.margin import Position
from monitor.snapshot import Snapshots
from monitor.state import AccountState

_AID_MASK = 0xFFFFFFFF


# `Book.evaluate_and_file` of an account: (evaluable, ratio, next state, band eps it was filed
# with)
Verdict = tuple[bool, float, int, float]


class AccountRun:
    """A reused table a chunk of records that change one account each is written into, for
    `Book.account_run`: one row each of ops, rows, codes, amounts, prices and fees (the
    integers held exactly as floats), written through the memoryviews of those names, up to
    ``SIZE`` records. One array, reused: each array a compiled call is passed costs ~65 ns,
    and fresh arrays per chunk would cost more than its few records."""

    SIZE = 256
    __slots__ = ("amounts", "codes", "fees", "ops", "prices", "rows", "table")

    def __init__(self) -> None:
        self.table = np.zeros((6, self.SIZE))
        (self.ops, self.rows, self.codes, self.amounts, self.prices,
         self.fees) = (_view(row) for row in self.table)


class Evaluation(NamedTuple):
    """`Book.evaluate` of some rows: per row whether it could be valued, its ratio, the state
    it moves to and its band's eps for that state; and the symbols each row watches (row k's
    are ``watch[watch_start[k]:watch_start[k + 1]]``)."""

    evaluable: np.ndarray
    ratio: np.ndarray
    new_state: np.ndarray
    eps: np.ndarray
    watch: np.ndarray
    watch_start: np.ndarray


_STATE_ENUM = tuple(AccountState)

# Above this many rows a tick's re-valuation and re-filing run on every core (numba threads,
# NUMBA_NUM_THREADS caps them): a shock that moves every holder of a symbol at once. Below
# it, starting the threads would cost more than it saves.
PARALLEL_ROWS = 4096
# Above this many rows, `Book.anchor_many` lays their bands out by symbol in one pass and
# files each symbol's at once; below, it files row after row into the symbols' segments.
ANCHOR_ONE_BY_ONE = 128
# Rows a step of the position compaction walks (`Book.compact_positions`): at 1,000,000
# accounts up to ~6 ms where every position moves (and 900,000 slots are free), ~0.1 ms
# where none does.
COMPACT_ROWS = 2048


def _spans() -> int:
    """Runs of rows a parallel kernel cuts its work into: a few per thread, to even out."""
    return 4 * numba.get_num_threads()


def _view(column: np.ndarray) -> Any:
    """A memoryview of a column, for scalar reads and writes (~25 ns, against ~100 for numpy
    indexing); typed Any, as typeshed's memoryview holds ints only."""
    return column.data


class NotInConfig(LiqmonError):
    """A restored account or isolated position holds an asset or instrument the risk config
    does not define."""

    def __init__(self, key: RiskKey, names: list[str]) -> None:
        held = (f"isolated position {key.label()!r}" if isinstance(key, UnitKey)
                else f"account {key!r}")
        super().__init__(f"{held} holds {', '.join(names)}, which the risk config does not "
                         "define: run with the config its state was checkpointed under, or, if "
                         "that is this one, the record is not liqmon's: start once with "
                         "--reset-state to rebuild the state from the input topics")
        self.key, self.names = key, names


class Book:
    """Every account's balances, positions, state and transition counter, in columns."""

    def __init__(self, config: RiskConfig) -> None:
        self.config = config
        self.t = Tables(config)
        self.ids: list[RiskKey | None] = []  # per row; None: a free row
        self.index: dict[str, int] = {}  # account id -> row of its cross margin
        self.units: dict[UnitKey, int] = {}  # isolated position -> its row
        self.free_rows: list[int] = []
        # Position slots: [freed slots stacked in `free_slots` (the last freed on top, taken
        # first), slots in use (freed ones included), open positions] (kernels.SLOTS_*).
        # Arrays, not Python numbers, so that the kernels take and free slots themselves.
        self.slots = np.zeros(3, np.int64)
        self.slots_m = _view(self.slots)
        self._alloc_rows(0, 1024)
        self._alloc_pos(0, 4096)
        self.pending = PendingBands(len(self.t.symbols), moved=self._bind_kernels)
        self.bands = [SymbolBands(self.pending, s) for s in range(len(self.t.symbols))]
        self.sym_px = np.full(len(self.t.symbols), NAN)  # current price per symbol id
        self.sym_px_m = _view(self.sym_px)
        self._watched = np.empty(len(self.t.symbols), np.int64)  # one row's watched symbols
        self._watched_m = _view(self._watched)
        # `event_figures`' outputs: an account's, and a row per position (at most one per
        # instrument)
        self.account_figures = np.empty(figures.ACCOUNT_FIGURES, np.float64)
        self.position_figures = np.empty((len(self.t.instruments), figures.POSITION_FIGURES),
                                         np.float64)
        self.position_figures_m = _view(self.position_figures)
        self._plan = np.empty(figures.PLAN_FIGURES, np.float64)  # `liquidation_plan`'s
        self._plan_steps = np.empty((len(self.t.instruments), figures.STEP_FIGURES), np.float64)
        self.bulk_filed = False  # `anchor_many` may have left symbols' merges overdue
        self._compaction: tuple[int, int] | None = None  # a pass's next row and slot
        # `reevaluate_crossed`'s (account row, new state) of each row a tick moves
        self._moved = np.empty((2, ANCHOR_ONE_BY_ONE), np.int64)
        self._bind_kernels()

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
            self.isolated = np.zeros(size, np.int8)
            # changed since the engine last handed its changes to a checkpoint (`take_dirty`)
            self.dirty = np.zeros(size, np.bool_)
            # the rows a tick takes (scratch): twice the rows, as an empty band (an unpriced
            # symbol's, or eps 0 at the price) is taken from both sorted runs
            self._taken = np.empty(2 * size, np.int64)
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
            self.isolated = grown(self.isolated, size)
            self.dirty = grown(self.dirty, size)
            self._taken = np.empty(2 * size, np.int64)
        self.cap = size
        self.state_m, self.trans_m = _view(self.state), _view(self.trans)
        self.part_m, self.first_m = _view(self.part), _view(self.first)
        self.aid_m, self.bal_m = _view(self.aid), _view(self.bal)
        self.isolated_m, self.dirty_m = _view(self.isolated), _view(self.dirty)
        self._bind_kernels()

    def _alloc_pos(self, old: int, size: int) -> None:
        if old == 0:
            self.free_slots = np.zeros(size, np.int32)  # never more freed than in use
            self.p_acct = np.zeros(size, np.int32)
            self.p_instr = np.zeros(size, np.int32)
            self.p_qty = np.zeros(size, np.float64)
            self.p_entry = np.zeros(size, np.float64)
            self.p_next = np.full(size, -1, np.int32)
        else:
            self.free_slots = grown(self.free_slots, size)
            self.p_acct = grown(self.p_acct, size)
            self.p_instr = grown(self.p_instr, size)
            self.p_qty = grown(self.p_qty, size)
            self.p_entry = grown(self.p_entry, size)
            nxt = np.full(size, -1, np.int32)
            nxt[:old] = self.p_next
            self.p_next = nxt
        self.pcap = size
        self.acct_m, self.instr_m = _view(self.p_acct), _view(self.p_instr)
        self.qty_m, self.entry_m = _view(self.p_qty), _view(self.p_entry)
        self.next_m = _view(self.p_next)
        self.free_slots_m = _view(self.free_slots)
        self._bind_kernels()

    @property
    def positions(self) -> int:
        """Open positions."""
        return int(self.slots_m[kernels.SLOTS_OPEN])

    def room_for_positions(self, count: int) -> None:
        """Grow the position columns, if need be, so that ``count`` more can open without
        reusing a freed slot (what a kernel that takes slots itself is handed)."""
        end = self.slots_m[kernels.SLOTS_USED] + count
        if end > self.pcap:
            self._alloc_pos(self.pcap, max(end, self.pcap + (self.pcap >> 1)))

    def reserve(self, accounts: int, positions: int) -> None:
        """Grow the columns once for a bulk load."""
        if accounts > self.cap:
            self._alloc_rows(self.cap, accounts)
        if positions > self.pcap:
            self._alloc_pos(self.pcap, positions)

    def new_row(self, key: RiskKey, partition: int | None) -> int:
        if self.free_rows:
            row = self.free_rows.pop()
            self.ids[row] = key
        else:
            row = len(self.ids)
            if row == self.cap:
                self._alloc_rows(self.cap, self.cap + (self.cap >> 1))
            self.ids.append(key)
        if isinstance(key, UnitKey):
            self.units[key] = row
            self.isolated_m[row] = 1
        else:
            self.index[key] = row
        self.part_m[row] = -1 if partition is None else partition
        return row

    def row_of(self, key: RiskKey) -> int | None:
        """The row of an account's cross margin or of an isolated position, if held."""
        return self.units.get(key) if isinstance(key, UnitKey) else self.index.get(key)

    def free_row(self, row: int) -> None:
        """Forget an account: its bands go stale with its anchor id."""
        p = self.first_m[row]
        while p >= 0:
            nxt = self.next_m[p]
            self._free_slot(p)
            self.next_m[p] = -1
            p = nxt
        self.first_m[row] = -1
        na = self.t.n_assets
        self.bal[row * na:(row + 1) * na] = 0.0
        self.state_m[row] = 0
        self.trans_m[row] = 0
        self.part_m[row] = -1
        self.aid_m[row] = (self.aid_m[row] + 1) & _AID_MASK
        self.dirty_m[row] = False
        key = self.ids[row]
        self.ids[row] = None
        if isinstance(key, UnitKey):
            del self.units[key]
            self.isolated_m[row] = 0
        else:
            del self.index[key]  # type: ignore[arg-type]
        self.free_rows.append(row)

    def free_many(self, rows: np.ndarray) -> list[RiskKey]:
        """`free_row` for many accounts at once (a partition handed over: a row at a time,
        a million took seconds of a rebalance); returns their keys, in ``rows``' order."""
        positions, _ = self.positions_of_rows(rows)
        stacked = self.slots[kernels.SLOTS_FREE]
        self.free_slots[stacked:stacked + len(positions)] = positions
        self.slots[kernels.SLOTS_FREE] += len(positions)
        self.slots[kernels.SLOTS_OPEN] -= len(positions)
        self.p_next[positions] = -1
        self.first[rows] = -1
        self.bal.reshape(-1, self.t.n_assets)[rows] = 0.0
        self.state[rows] = 0
        self.trans[rows] = 0
        self.part[rows] = -1
        self.aid[rows] = (self.aid[rows] + 1) & _AID_MASK
        self.isolated[rows] = 0
        self.dirty[rows] = False
        ids, index, units = self.ids, self.index, self.units
        keys: list[RiskKey] = []
        for row in rows.tolist():
            key = ids[row]
            ids[row] = None
            if isinstance(key, UnitKey):
                del units[key]
            else:
                del index[key]
            keys.append(key)
        self.free_rows.extend(rows.tolist())
        return keys

    def _take_slot(self) -> int:
        """A slot for a new position: the one freed last, else a fresh one (as the kernels
        take them: `kernels._apply_fill`)."""
        slots = self.slots_m
        free = slots[kernels.SLOTS_FREE]
        if free:
            p = self.free_slots_m[free - 1]
            slots[kernels.SLOTS_FREE] = free - 1
        else:
            self.room_for_positions(1)
            p = slots[kernels.SLOTS_USED]
            slots[kernels.SLOTS_USED] = p + 1
        slots[kernels.SLOTS_OPEN] += 1
        return int(p)

    def _free_slot(self, p: int) -> None:
        """A closed position's slot, on top of the free stack."""
        slots = self.slots_m
        free = slots[kernels.SLOTS_FREE]
        self.free_slots_m[free] = p
        slots[kernels.SLOTS_FREE] = free + 1
        slots[kernels.SLOTS_OPEN] -= 1

    def _new_pos(self, row: int, instr: int, qty: float, entry: float) -> int:
        p = self._take_slot()
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
        return p

    def is_blank(self, row: int) -> bool:
        if self.first_m[row] >= 0 or self.trans_m[row]:
            return False
        na = self.t.n_assets
        bal = self.bal_m
        return all(bal[k] == 0.0 for k in range(row * na, row * na + na))

    def holds(self, row: int, instr: int) -> bool:
        """Does the row hold an open position in this instrument?"""
        p, nxt, instr_m = self.first_m[row], self.next_m, self.instr_m
        while p >= 0 and instr_m[p] != instr:
            p = nxt[p]
        return p >= 0

    def position_count(self, row: int) -> int:
        n, p, nxt = 0, self.first_m[row], self.next_m
        while p >= 0:
            n += 1
            p = nxt[p]
        return n

    # -- inputs ---------------------------------------------------------------------------------

    def fill_and_evaluate(self, row: int, instr: int, signed_qty: float, price: float,
                          fee: float) -> Verdict:
        """SPEC §4 Fill (the arithmetic of `margin.apply_fill_to_position`, including its rule
        that a close leaving only float rounding is flat), then `evaluate_and_file` of the
        account: one compiled call."""
        self.room_for_positions(1)
        return self._filled(row, *kernels.fill_and_evaluate(self._cols, row, instr, signed_qty,
                                                            price, fee))

    def account_run(self, run: AccountRun, start: int, end: int) -> tuple[int, Verdict]:
        """The records ``start`` to ``end`` of ``run`` (fills and balance changes), in one
        compiled call (`kernels.account_run`), up to and including the first whose verdict may
        call for more than filing its bands: (its index, its verdict), or (``end``, a verdict
        of no change) when none did. Each account it changes is marked `dirty`."""
        self.room_for_positions(end - start)
        k, evaluable, ratio, new, eps, n, filed = kernels.account_run(self._cols, run.table,
                                                                      start, end)
        if k == end:
            return k, (evaluable, ratio, new, eps)
        return k, self._filled(int(run.rows[k]), evaluable, ratio, new, eps, n, filed)

    def _filled(self, row: int, evaluable: bool, ratio: float, new: int, eps: float, n: int,
                filed: bool) -> Verdict:
        """What a kernel that values a row and files its bands leaves to Python: the bands it
        could not file."""
        if not filed:
            self.anchor(row, eps, self._watched_m[:n].tolist())
        return evaluable, ratio, new, eps

    def add_balance(self, row: int, asset: int, amount: float) -> None:
        k = row * self.t.n_assets + asset
        self.bal_m[k] = self.bal_m[k] + amount

    def load(self, key: RiskKey, balances: Mapping[str, float],
             positions: Mapping[str, Position], state: int, transitions: int,
             partition: int | None) -> int:
        """Install an account or an isolated position as given (restore)."""
        t = self.t
        row = self.new_row(key, partition)
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
        """Install accounts and isolated positions (ids that are `UnitKey`s) as their snapshots
        hold them (restore), all at once: rows and position rows are taken together and every
        column is filled by one numpy operation. None of them may be held already. Returns
        their rows."""
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
        units = [(k, key) for k, key in enumerate(s.ids) if type(key) is UnitKey]
        for _, key in units:
            if key.symbol not in t.instr_index:
                raise NotInConfig(key, [key.symbol])
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
        self.isolated[rows] = 0
        if units:
            at = [k for k, _ in units]
            self.isolated[rows[at]] = 1
            self.units.update((key, int(rows[k])) for k, key in units)
            self.index.update((key, row) for key, row in zip(s.ids, rows.tolist(), strict=True)
                              if not isinstance(key, UnitKey))
        else:
            self.index.update(zip(s.ids, rows.tolist(), strict=True))  # type: ignore[arg-type]
        self.state[rows] = s.state
        self.trans[rows] = s.transitions
        self.part[rows] = s.partition
        self.bal[rows[bal_owner] * t.n_assets + bal_asset] = s.bal_amount
        count = len(pos_instr)
        stacked = int(self.slots[kernels.SLOTS_FREE])
        taken = min(count, stacked)  # the freed slots on top of the stack, bottom first
        freed = self.free_slots[stacked - taken:stacked].astype(np.int64)
        self.slots[kernels.SLOTS_FREE] = stacked - taken
        self.room_for_positions(count - taken)
        first = int(self.slots[kernels.SLOTS_USED])
        end = first + count - taken
        self.slots[kernels.SLOTS_USED] = end
        pos = np.concatenate([freed, np.arange(first, end)])
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
        self.slots[kernels.SLOTS_OPEN] += count
        return rows

    def snapshots(self, rows: np.ndarray, ids: list[RiskKey] | None = None) -> Snapshots:
        """The accounts of these rows as snapshot columns (the checkpoint stamps seq and
        as_of); names: the config's assets, then its instruments. ``ids``: the rows' keys,
        when the caller has them at hand."""
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
            ids=[self.ids[row] for row in rows.tolist()] if ids is None else ids,
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
        for a in range(t.n_assets):
            value = bal[base + a]
            if value != 0.0:
                balances[t.assets[a]] = value
        names = t.instruments
        positions = {}
        p, nxt, instr_m, qty_m, entry_m = (self.first_m[row], self.next_m, self.instr_m,
                                           self.qty_m, self.entry_m)
        while p >= 0:
            positions[names[instr_m[p]]] = Position(qty_m[p], entry_m[p])
            p = nxt[p]
        partition = self.part_m[row]
        symbols = t.symbols
        return Account(balances, positions, _STATE_ENUM[self.state_m[row]],
                       self.trans_m[row], None if partition < 0 else partition,
                       frozenset([symbols[s] for s in self.watched(row)]))

    # -- evaluation (compiled: monitor.book.kernels) ---------------------------------------------

    def _bind_kernels(self) -> None:
        """The argument tuples and the `Columns` table the kernels take; rebuilt whenever a
        column is reallocated (the pending bands' included: `PendingBands.moved`)."""
        if not hasattr(self, "_moved"):
            return  # still building: __init__ binds once every column exists
        t = self.t
        self._columns = Columns(self._column_arrays())
        self._cols = self._columns.table  # what the kernels that take `Columns` are passed
        self._value_args = (self.bal, self.isolated, self.first, self.p_next, self.p_instr,
                            self.p_qty, self.p_entry, self.sym_px, t.k_floats, t.k_ints)
        self._watch_args = (self.bal, self.first, self.p_next, self.p_instr, t.k_floats,
                            t.k_ints)

    def _column_arrays(self) -> BookColumns:
        """The columns the kernels' `Columns` table names, as they are now."""
        t = self.t
        return BookColumns(
            self.state, self.dirty, self.aid, self.bal, self.isolated, self.first, self.p_next,
            self.p_instr, self.p_qty, self.p_entry, self.p_acct, self.slots, self.free_slots,
            self.sym_px, t.k_floats, t.k_ints, self._watched, self._taken, self._moved,
            *self.pending.args, self.account_figures, self.position_figures, self._plan,
            self._plan_steps, t.t_imr, t.i_fee, t.i_rank)

    def evaluate_and_file(self, row: int) -> Verdict:
        """(evaluable, ratio, next state, band eps for that state) of one account, valued from
        scratch at the current prices (`margin.value_account`'s arithmetic), its band for
        that state filed (`anchor`): one compiled call unless a symbol's pending bands are
        full or due."""
        return self._filled(row, *kernels.evaluate_and_file(self._cols, row))

    def evaluate(self, rows: np.ndarray, decide: bool = True) -> Evaluation:
        """`evaluate_and_file`'s figures for many rows, as arrays (nothing filed). With
        ``decide`` off every row keeps its state and eps is sized for the state it is in."""
        if len(rows) < PARALLEL_ROWS:
            return Evaluation(*kernels.evaluate_rows(rows, decide, self.state,
                                                     *self._value_args))
        return Evaluation(*kernels.evaluate_rows_parallel(_spans(), rows, decide, self.state,
                                                          *self._value_args))

    def event_figures(self, row: int) -> int:
        """What an event reports of the row, from scratch at the current prices (the
        arithmetic of `margin.value_account` and the figures beside it, one compiled call),
        into `account_figures` and the first rows of `position_figures` (`book.figures` names
        the columns): how many positions, -1 when a settle asset has no price."""
        return figures.event_figures(self._cols, row)

    def liquidation_plan(self, row: int, count: int) -> dict[str, Any]:
        """The event's `liquidation_plan` (`liquidation.liquidation_plan` of the row, as
        JSON), in one compiled call; ``count``: what `event_figures` of the row returned just
        before (its figures are the plan's start)."""
        t = self.t
        steps = figures.liquidation_plan(self._cols, row, count, t.liquidation_target)
        _, deposit, ratio_after, bad_debt = self._plan.tolist()
        names = t.instruments
        return plan_json(t.liquidation_target, deposit,
                         ((names[int(instr)], "sell" if sell else "buy", qty, price, fee,
                           bool(close), ratio)
                          for instr, sell, qty, price, fee, close, ratio
                          in self._plan_steps[:steps].tolist()),
                         ratio_after, bad_debt)

    def watched(self, row: int) -> list[int]:
        """Symbol ids whose ticks can move the account (SPEC §6)."""
        return kernels.watched_symbols(row, len(self.t.symbols), *self._watch_args).tolist()

    def anchor(self, row: int, eps: float, syms: list[int]) -> None:
        """File one account under a band of ±eps around the current price of every symbol it
        watches (``syms``, as its evaluation listed them; an empty band for a symbol without a
        price: its first tick re-evaluates), making room and merging as needed (what
        `kernels.file_bands` leaves to Python)."""
        aid = (self.aid_m[row] + 1) & _AID_MASK
        self.aid_m[row] = aid
        sym_px, pending = self.sym_px_m, self.pending
        down, up = 1.0 - eps, 1.0 + eps
        for s in syms:
            price = sym_px[s]
            if price == price:
                lo, hi = price * down, price * up
            else:  # NaN: no price yet
                lo, hi = INF, -INF
            if pending.file(s, lo, hi, row, aid):
                self.bands[s].merge(self.aid)

    def anchor_many(self, rows: np.ndarray, eps: np.ndarray, evaluation: Evaluation) -> None:
        """`anchor` for many accounts (the symbols each watches as ``evaluation`` of the same
        rows listed them). A few are filed row after row by one compiled call; many straight
        into their symbols' segments, room made for all at once (`PendingBands.file_by_symbol`;
        merged in by each symbol's next tick)."""
        watch, watch_start = evaluation.watch, evaluation.watch_start
        if len(rows) <= ANCHOR_ONE_BY_ONE:
            done, n = 0, len(rows)
            while done < n:
                done += kernels.file_rows(rows[done:], eps[done:], watch, watch_start[done:],
                                          self.aid, self.sym_px, *self.pending.args)
                if done < n:  # a segment is full or due: `anchor` makes room and merges
                    a, b = watch_start[done], watch_start[done + 1]
                    self.anchor(int(rows[done]), float(eps[done]), watch[a:b].tolist())
                    done += 1
            return
        self.pending.file_by_symbol(rows, eps, watch, watch_start, self.aid, self.sym_px,
                                    None if len(rows) < PARALLEL_ROWS else _spans())
        self.bulk_filed = True

    def _lay_out(self, rows: np.ndarray, eps: np.ndarray, evaluation: Evaluation,
                 ) -> tuple[np.ndarray, ...]:
        """Re-anchor rows and lay their bands out by symbol (`kernels.bands_by_symbol`)."""
        layout = (rows, eps, evaluation.watch, evaluation.watch_start, self.aid, self.sym_px)
        if len(rows) < PARALLEL_ROWS:
            return kernels.bands_by_symbol(*layout)
        return kernels.bands_by_symbol_parallel(_spans(), *layout)

    def refile_all(self, rows: np.ndarray, chunk: int, width: float | None = None) -> None:
        """Re-anchor many rows (a restore's index, `Engine.expire_bands`), valued without
        deciding a state, under bands for the state each is in (or of ``width``), a
        ``chunk`` at a time (bounds the valuation's memory); each symbol's bands are merged
        into its runs once, at the end, straight from the layouts: staging millions of
        bands in the pending ones would copy them into fresh memory for nothing."""
        laid_out: list[list[tuple[np.ndarray, ...]]] = [[] for _ in self.bands]
        for start in range(0, len(rows), chunk):
            part = rows[start:start + chunk]
            evaluation = self.evaluate(part, decide=False)
            eps = evaluation.eps if width is None else np.full(len(part), width)
            starts, band_rows, aids, lo, hi, _, _ = self._lay_out(part, eps, evaluation)
            bounds = starts.tolist()
            for s in np.flatnonzero(starts[1:] > starts[:-1]).tolist():
                a, b = bounds[s], bounds[s + 1]
                laid_out[s].append((band_rows[a:b], aids[a:b], lo[a:b], hi[a:b]))
        for s, pieces in enumerate(laid_out):
            if pieces:
                rows_s, aids_s, lo_s, hi_s = (np.concatenate(column)
                                              for column in zip(*pieces, strict=True))
                self.bands[s].merge_laid_out(rows_s, aids_s, lo_s, hi_s, self.aid)
        self.pending.trim()

    def set_price(self, sym: int, price: float) -> None:
        self.sym_px_m[sym] = price

    def load_prices(self, prices: Mapping[str, float]) -> None:
        self.sym_px[:] = self.t.symbol_prices(prices)

    def candidates(self, sym: int, price: float) -> np.ndarray | None:
        """Rows whose band for this symbol the price touches or leaves (unique, current)."""
        bands = self.bands[sym]
        if bands.overdue():
            bands.merge(self.aid)
        return bands.take(price, self.aid)

    def reevaluate_crossed(self, sym: int, price: float,
                           ) -> tuple[list[int], list[int], int] | np.ndarray | None:
        """A tick (the symbol's price set already): the rows whose band for the symbol it
        touches or leaves taken (`candidates`) and, when there are few (`ANCHOR_ONE_BY_ONE`),
        valued and re-filed for the state each moves to (`evaluate`, `anchor_many`), all in
        one compiled call: the rows whose state moves, their new states (the moves and their
        events are the caller's) and how many rows could not be valued. More rows come back
        taken, sorted, for the caller to value and file; None when the tick takes none."""
        bands = self.bands[sym]
        if bands.overdue():
            bands.merge(self.aid)
        if not bands.touched(price):
            return None
        rows, moved = self._taken, self._moved
        taken, hs, ls, stop, eps, watching, n_moved, unevaluated = kernels.take_and_reevaluate(
            self._cols, price, ANCHOR_ONE_BY_ONE, *bands.runs(), sym)
        bands.taken(hs, ls)
        if stop < 0:
            return rows[:taken].copy()
        while stop < taken:  # a segment is full or due: `anchor` makes room and merges
            self.anchor(int(rows[stop]), eps, self._watched_m[:watching].tolist())
            stop, eps, watching, n_moved, unevaluated = kernels.evaluate_and_file_rows(
                self._cols, stop + 1, taken, n_moved, unevaluated)
        if not n_moved:
            return None if not unevaluated else ([], [], unevaluated)
        moved_rows, new_states = moved[:, :n_moved].tolist()
        return moved_rows, new_states, unevaluated

    def merge_overdue_bands(self) -> bool:
        """Merge the pending bands of one symbol that a bulk filing left overdue (the symbol
        with the most); True while others remain. Left alone, the symbol's next tick, or the
        next filing of one of its bands, merges them first. A tick that moves every holder of
        a symbol leaves overdue merges of that symbol and of every other symbol those accounts
        watch: at 1,000,000 accounts up to ~10 ms each, ~40 ms in all."""
        if not self.bulk_filed:
            return False
        pending = self.pending
        overdue = np.flatnonzero(pending.count > pending.limit)
        if len(overdue):
            self.bands[int(overdue[np.argmax(pending.count[overdue])])].merge(self.aid)
        self.bulk_filed = len(overdue) > 1
        return self.bulk_filed

    def start_compaction(self) -> None:
        """Begin a pass that moves every account's positions side by side, row after row
        (`monitor.book.compaction`), unless one is under way; `compact_positions` runs it."""
        if self._compaction is None:
            self._compaction = (0, 0)

    @property
    def compacting(self) -> bool:
        return self._compaction is not None

    def compact_positions(self, rows: int | None = None) -> bool:
        """A step of the compaction pass under way, over ``rows`` rows (`COMPACT_ROWS`); True
        while the pass goes on. Changes which slot holds a position, never what an account
        holds."""
        if self._compaction is None:
            return False
        row, slot = self._compaction
        n_rows = len(self.ids)
        end = min(n_rows, row + (COMPACT_ROWS if rows is None else rows))
        row, slot = compaction.compact_step(self._cols, row, end, slot)
        if row == compaction.INCONSISTENT:
            self._compaction = None
            raise RuntimeError(f"position slot {slot} is in use but in no account's list: the "
                               "book's columns are corrupt")
        going_on = row < n_rows and slot < self.slots_m[kernels.SLOTS_USED]
        self._compaction = (row, slot) if going_on else None
        return going_on

    def holders(self, sym: int) -> np.ndarray:
        return self.bands[sym].live_rows(self.aid)

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
        """Every row that holds an account or an isolated position."""
        used = np.ones(len(self.ids), bool)
        if self.free_rows:
            used[np.array(self.free_rows, dtype=np.int64)] = False
        return np.flatnonzero(used)

    def memory_bytes(self) -> int:
        """Bytes held by the numpy columns and band index (not the id strings and dict)."""
        total = sum(a.nbytes for a in (self.state, self.trans, self.part, self.first, self.aid,
                                       self.bal, self.isolated, self.dirty, self._taken,
                                       self.p_acct, self.p_instr, self.p_qty, self.p_entry,
                                       self.p_next, self.free_slots))
        return total + self.pending.nbytes() + sum(b.nbytes() for b in self.bands)
