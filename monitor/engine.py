"""The per-record processing of SPEC §6: apply one decoded input, re-evaluate exactly the
accounts it can move, and return the state-change events it causes.

The engine is synchronous and knows nothing of Kafka: `liqmon replay` and `liqmon run` feed it
the same records in the same order and therefore get the same events.

State lives in a columnar book (`monitor.book`). A fill or ledger entry re-values its one
account from scratch. A tick re-values, among the accounts it can move, those whose *safe band*
for the ticked symbol it leaves: the band is the price range inside which the account's state
provably cannot change (see `monitor.book`), so skipping the others changes no event. Events
are built from `margin.value_account`, exactly as before; `monitor.reference.ReferenceEngine`
is the straightforward engine this one must agree with, event for event.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Hashable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from monitor.account import Account
from monitor.book import Book
from monitor.config import RiskConfig
from monitor.events import Event, Source, build_event
from monitor.margin import Valuation, value_account
from monitor.records import Fill, InputRecord, LedgerEntry, PriceTick
from monitor.snapshot import Offsets, Snapshots
from monitor.state import AccountState, next_state

DEFAULT_DEDUPE_WINDOW = 10_000


@dataclass(slots=True)
class EngineStats:
    applied_ticks: int = 0
    applied_fills: int = 0
    applied_ledger: int = 0
    stale_ticks: int = 0
    unused_ticks: int = 0  # well-formed ticks for symbols no asset or instrument is priced by
    duplicates: int = 0
    unevaluated: int = 0  # evaluations skipped because a settle asset has no price yet


class DedupeWindow:
    """The ids applied most recently on one input partition, bounded so memory cannot grow."""

    __slots__ = ("_order", "_seen", "capacity")

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._seen: set[Hashable] = set()
        self._order: deque[Hashable] = deque()

    def __len__(self) -> int:
        return len(self._order)

    def ids(self) -> list[Hashable]:
        """Oldest first, so that reloading them rebuilds the same window."""
        return list(self._order)

    def add(self, key: Hashable) -> bool:
        """Record key; False if it is already in the window (a duplicate)."""
        if key in self._seen:
            return False
        if len(self._order) >= self.capacity:
            self._seen.discard(self._order.popleft())
        self._order.append(key)
        self._seen.add(key)
        return True


# Above this many accounts to re-value, a tick screens them in numpy first and re-values in
# Python only those that are not provably stable.
VECTOR_MIN = 48
INDEX_CHUNK = 262_144  # rows indexed per numpy pass after a restore (bounds peak memory)
_STATES = tuple(AccountState)
_HEALTHY = AccountState.HEALTHY


class AccountsView(Mapping[str, Account]):
    """`engine.accounts`: account id → an `Account` built from the book.

    A read view: changing the returned object changes nothing in the engine (install state
    with `Engine.load_account`). Lookups are cached until the engine applies its next record
    (a checkpoint reads each changed account more than once). A deep copy is a plain dict.
    """

    __slots__ = ("_book", "_cache")

    def __init__(self, book: Book) -> None:
        self._book = book
        self._cache: dict[str, Account] = {}

    def changed(self) -> None:
        if self._cache:
            self._cache = {}

    def __getitem__(self, account_id: str) -> Account:
        account = self._cache.get(account_id)
        if account is None:
            book = self._book
            account = self._cache[account_id] = book.account(book.index[account_id])
        return account

    def __contains__(self, account_id: object) -> bool:
        return account_id in self._book.index

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._book.index))

    def __len__(self) -> int:
        return len(self._book.index)

    def __deepcopy__(self, memo: dict[int, Any]) -> dict[str, Account]:
        return {account_id: self._book.account(row)
                for account_id, row in self._book.index.items()}

    def __repr__(self) -> str:
        return f"<{len(self)} accounts>"


class InputLedger:
    """What every engine keeps besides its accounts and prices: the per-partition duplicate
    windows, the last applied tick time per symbol, the input counters, and the set of accounts
    changed since the last checkpoint (SPEC §2, §6)."""

    def __init__(self, config: RiskConfig, dedupe_window: int) -> None:
        self.stats = EngineStats()
        self.price_ts: dict[str, int] = {}
        self._price_symbols = config.price_symbols()
        self._dedupe_window = dedupe_window
        self._dedupe: dict[tuple[str, int | None], DedupeWindow] = {}
        self._dirty: set[str] = set()  # accounts changed since the last take_dirty()
        # After a restore, accounts whose snapshot is newer than the inputs being re-read:
        # account -> {(topic, partition): first offset not yet reflected in the snapshot}.
        self._caught_up_from: dict[str, dict[tuple[str, int | None], int]] = {}

    def _already_reflected(self, account_id: str, source: Source) -> bool:
        marks = self._caught_up_from.get(account_id)
        if marks is None:
            return False
        first_new = marks.get((source.topic, source.partition))
        return first_new is not None and source.offset is not None and source.offset < first_new

    def release_caught_up(self, positions: dict[tuple[str, int | None], int]) -> None:
        """Drop marks the inputs have passed (positions: next offset to read)."""
        for account_id, marks in list(self._caught_up_from.items()):
            if all(positions.get(key, 0) >= offset for key, offset in marks.items()):
                del self._caught_up_from[account_id]

    def _fresh_tick(self, tick: PriceTick) -> bool:
        """Count and drop ticks for symbols nothing is priced by and stale ticks (an older
        ts than the last applied one); otherwise record the tick's time."""
        if tick.symbol not in self._price_symbols:
            self.stats.unused_ticks += 1
            return False
        last_ts = self.price_ts.get(tick.symbol)
        if last_ts is not None and tick.ts < last_ts:
            self.stats.stale_ticks += 1
            return False
        self.price_ts[tick.symbol] = tick.ts
        self.stats.applied_ticks += 1
        return True

    def _first_time(self, source: Source, account: str, record_id: str) -> bool:
        key = (source.topic, source.partition)
        window = self._dedupe.get(key)
        if window is None:
            window = self._dedupe[key] = DedupeWindow(self._dedupe_window)
        return window.add((account, record_id))

    def take_dirty(self) -> set[str]:
        """Accounts changed since the last call (a missing one was forgotten: tombstone it)."""
        dirty, self._dirty = self._dirty, set()
        return dirty

    def mark_dirty(self, account_ids: set[str]) -> None:
        """Put back accounts whose checkpoint could not be written."""
        self._dirty |= account_ids

    def dedupe_ids(self, topic: str, partition: int | None) -> list[Hashable]:
        window = self._dedupe.get((topic, partition))
        return window.ids() if window is not None else []

    def load_dedupe_ids(self, topic: str, partition: int | None, ids: list[Hashable]) -> None:
        window = self._dedupe[(topic, partition)] = DedupeWindow(self._dedupe_window)
        for key in ids:
            window.add(key)


class Engine(InputLedger):
    def __init__(self, config: RiskConfig, dedupe_window: int = DEFAULT_DEDUPE_WINDOW) -> None:
        super().__init__(config, dedupe_window)
        self.config = config
        self.book = Book(config)
        self._t = self.book.t
        self._prices: dict[str, float] = {}
        self.accounts = AccountsView(self.book)
        self.accounts_in_state: dict[AccountState, int] = dict.fromkeys(AccountState, 0)
        self._unindexed: list[int] = []  # rows installed by load_account, not yet banded
        self._reindex_all = False  # prices were replaced under the bands

    def partition_of(self, account_id: str) -> int | None:
        """The input partition owning an account held here (None: not held, or replay)."""
        book = self.book
        row = book.index.get(account_id)
        if row is None:
            return None
        partition = int(book.part_m[row])
        return None if partition < 0 else partition

    @property
    def prices(self) -> dict[str, float]:
        return self._prices

    @prices.setter
    def prices(self, table: dict[str, float]) -> None:
        self._prices = table
        self.book.load_prices(table)
        self._reindex_all = True

    @property
    def positions_held(self) -> int:
        return self.book.positions

    # -- input -------------------------------------------------------------------------------

    def apply(self, record: InputRecord, source: Source) -> list[Event]:
        """Apply one valid record; events come back in ascending account-id order."""
        if self._unindexed or self._reindex_all:
            self.index_restored()
        self.accounts.changed()
        if isinstance(record, PriceTick):
            return self._apply_tick(record, source)
        if isinstance(record, Fill):
            return self._apply_fill(record, source)
        return self._apply_ledger(record, source)

    def apply_many(self, records: Iterable[tuple[InputRecord, Source]]) -> list[Event]:
        """Apply records in order, each exactly as `apply` would; their events, in order."""
        events: list[Event] = []
        extend = events.extend
        apply = self.apply
        for record, source in records:
            extend(apply(record, source))
        return events

    def _apply_tick(self, tick: PriceTick, source: Source) -> list[Event]:
        if not self._fresh_tick(tick):
            return []
        symbol = tick.symbol
        self._prices[symbol] = tick.price
        sym = self._t.sym_index[symbol]
        book = self.book
        book.sym_px_m[sym] = tick.price
        rows = book.candidates(sym, tick.price)
        if rows is None:
            return []
        return self._reevaluate(rows, tick.ts, symbol, source)

    def _reevaluate(self, rows: np.ndarray, ts: int, symbol: str,
                    source: Source) -> list[Event]:
        """Re-value the accounts whose band a tick left; events in account-id order."""
        book = self.book
        if len(rows) >= VECTOR_MIN:
            v = book.assess_many(rows)
            eps = book.safe_eps_many(book.state[rows], v)
            stable = eps > 0
            if stable.any():
                keep = np.flatnonzero(stable)
                remap = np.full(len(rows), -1, np.int64)
                remap[keep] = np.arange(len(keep))
                pairs = stable[v["pair_rows"]]
                book.anchor_many(rows[keep], eps[keep], remap[v["pair_rows"][pairs]],
                                 v["pair_syms"][pairs])
                rows = rows[~stable]
        events = []
        guarded = self._caught_up_from
        ids = book.ids
        for row in rows.tolist():
            if guarded and self._already_reflected(ids[row], source):  # type: ignore[arg-type]
                book.anchor(row, 0.0, list(book.watched_of(row)))
                continue
            event = self._evaluate(row, ts, "price", symbol, source)
            if event is not None:
                events.append(event)
        if len(events) > 1:
            events.sort(key=lambda event: event.account)
        return events

    def _apply_fill(self, fill: Fill, source: Source) -> list[Event]:
        if not self._first_time(source, fill.account, fill.fill_id):
            self.stats.duplicates += 1
            return []
        if self._caught_up_from and self._already_reflected(fill.account, source):
            return []
        book = self.book
        row = book.index.get(fill.account)
        if row is None:
            row = book.new_row(fill.account, source.partition)
            self.accounts_in_state[_HEALTHY] += 1
        signed = fill.qty if fill.side == "buy" else -fill.qty
        book.apply_fill(row, self._t.instr_index[fill.symbol], signed, fill.price, fill.fee)
        self.stats.applied_fills += 1
        return self._after_account_change(row, fill.account, fill.ts, "fill", fill.fill_id,
                                          source)

    def _apply_ledger(self, entry: LedgerEntry, source: Source) -> list[Event]:
        if not self._first_time(source, entry.account, entry.entry_id):
            self.stats.duplicates += 1
            return []
        if self._caught_up_from and self._already_reflected(entry.account, source):
            return []
        book = self.book
        row = book.index.get(entry.account)
        if row is None:
            row = book.new_row(entry.account, source.partition)
            self.accounts_in_state[_HEALTHY] += 1
        book.add_balance(row, self._t.asset_index[entry.asset], entry.amount)
        self.stats.applied_ledger += 1
        return self._after_account_change(row, entry.account, entry.ts, "ledger",
                                          entry.entry_id, source)

    def accounts_moved_by(self, symbol: str) -> frozenset[str]:
        """Accounts a tick on this symbol can move (SPEC §6): a position marked by it or
        settling in an asset priced by it, or a non-zero balance in an asset priced by it."""
        sym = self._t.sym_index.get(symbol)
        if sym is None:
            return frozenset()
        if self._unindexed or self._reindex_all:
            self.index_restored()
        ids = self.book.ids
        return frozenset(ids[row] for row in self.book.holders(sym).tolist())  # type: ignore[misc]

    def valuation(self, account_id: str) -> Valuation | None:
        """The account's figures at the current prices, from scratch (SPEC §4)."""
        account = self.accounts[account_id]
        return value_account(account.balances, account.positions, self.config, self._prices)

    # -- bookkeeping -------------------------------------------------------------------------

    def _after_account_change(self, row: int, account_id: str, ts: int, kind: str, ref: str,
                              source: Source) -> list[Event]:
        self._dirty.add(account_id)
        event = self._evaluate(row, ts, kind, ref, source)
        if self.book.is_blank(row):  # nothing to remember (SPEC §5 tombstone rule)
            self.book.free_row(row)
            self.accounts_in_state[_HEALTHY] -= 1  # blank implies never left it
        return [event] if event is not None else []

    # -- evaluation --------------------------------------------------------------------------

    def _evaluate(self, row: int, ts: int, kind: str, ref: str,
                  source: Source) -> Event | None:
        """Re-value one account from scratch, move its state, and file its new band."""
        book = self.book
        a = book.assess(row, self._prices)
        if not a[0]:  # a settle asset has no price yet
            self.stats.unevaluated += 1
            book.anchor(row, 0.0, a[10])
            return None
        t = self._t
        state = book.state_m[row]
        ratio = a[1]
        if ratio >= t.liq:
            new = 2
        elif ratio >= t.mc:
            new = 1
        else:
            new = 0
        if new <= state:
            if ratio >= t.liq_h:
                new = 2
            elif ratio >= t.mc_h:
                new = 1
            else:
                new = 0
            if new > state:
                new = state
        event = None
        if new != state:
            event, new = self._transition(row, state, ts, kind, ref, source)
        book.anchor(row, book.safe_eps(new, a), a[10])
        return event

    def _transition(self, row: int, state: int, ts: int, kind: str, ref: str,
                    source: Source) -> tuple[Event | None, int]:
        """Build the event from a from-scratch valuation and move the account's state."""
        book = self.book
        balances, positions = book.balances_of(row), book.positions_of(row)
        valuation = value_account(balances, positions, self.config, self._prices)
        previous = _STATES[state]
        if valuation is None:  # pragma: no cover - assess() said every settle price is there
            return None, state
        new_state = next_state(previous, valuation.ratio, self.config.thresholds)
        if new_state == previous:  # pragma: no cover - both valuations sum identically
            return None, state
        account_id: str = book.ids[row]  # type: ignore[assignment]
        transitions = book.trans_m[row] + 1
        book.trans_m[row] = transitions
        self._dirty.add(account_id)
        event = build_event(
            account=account_id,
            transition=transitions,
            previous=previous,
            state=new_state,
            valuation=valuation,
            balances=balances,
            positions=positions,
            config=self.config,
            prices=self._prices,
            price_ts=self.price_ts,
            ts=ts,
            trigger_kind=kind,
            trigger_ref=ref,
            source=source,
        )
        self.accounts_in_state[previous] -= 1
        self.accounts_in_state[new_state] += 1
        book.state_m[row] = int(new_state)
        return event, int(new_state)

    def index_restored(self) -> int:
        """File accounts installed by `load_account` (or all, after `load_prices`) in the
        band index. `apply` does it before the next record; call it to pay the cost at
        restore time instead. Nothing is evaluated: no event, no counter moves."""
        book = self.book
        if self._reindex_all:
            rows = book.rows_in_use()
        else:
            ids = book.ids
            rows = np.unique(np.array([r for r in self._unindexed if ids[r] is not None],
                                      dtype=np.int64))
        self._unindexed = []
        self._reindex_all = False
        for start in range(0, len(rows), INDEX_CHUNK):
            chunk = rows[start:start + INDEX_CHUNK]
            v = book.assess_many(chunk)
            eps = book.safe_eps_many(book.state[chunk], v)
            book.anchor_many(chunk, eps, v["pair_rows"], v["pair_syms"])
        book.fold()
        return len(rows)

    def expire_bands(self, symbol: str | None = None) -> int:
        """Forget the safe bands of every account a tick on ``symbol`` can move (or of every
        account), so that the next tick on any of their symbols re-values them all. For
        benchmarks and tests: it changes which accounts are re-valued, never an event."""
        if self._unindexed or self._reindex_all:
            self.index_restored()
        book = self.book
        if symbol is None:
            rows = book.rows_in_use()
        else:
            sym = self._t.sym_index.get(symbol)
            if sym is None:
                return 0
            rows = book.holders(sym).astype(np.int64)
        for start in range(0, len(rows), INDEX_CHUNK):
            chunk = rows[start:start + INDEX_CHUNK]
            v = book.assess_many(chunk)
            book.anchor_many(chunk, np.zeros(len(chunk)), v["pair_rows"], v["pair_syms"])
        book.fold()
        return len(rows)

    # -- durability: what a checkpoint saves and a restore loads --------------------------------

    def price_table(self) -> dict[str, tuple[float, int]]:
        return {symbol: (price, self.price_ts[symbol]) for symbol, price in self._prices.items()}

    def load_prices(self, table: dict[str, tuple[float, int]]) -> None:
        self._prices = {symbol: price for symbol, (price, _) in table.items()}
        self.price_ts = {symbol: ts for symbol, (_, ts) in table.items()}
        self.book.load_prices(self._prices)
        if self.book.index:
            self._reindex_all = True  # every band was drawn around the old prices

    def load_account(self, account_id: str, account: Account,
                     caught_up_from: dict[tuple[str, int | None], int] | None = None) -> None:
        """Install a restored account. ``caught_up_from`` marks a snapshot that already
        reflects inputs about to be re-read: records before those offsets skip it."""
        self.accounts.changed()
        book = self.book
        previous = book.index.get(account_id)
        if previous is not None:
            self._forget(previous)
        row = book.load(account_id, {a: b for a, b in account.balances.items() if b != 0},
                        account.positions, int(account.state), account.transitions,
                        account.partition)
        self.accounts_in_state[account.state] += 1
        self._unindexed.append(row)
        if caught_up_from:
            self._caught_up_from[account_id] = caught_up_from
        else:
            self._caught_up_from.pop(account_id, None)

    def load_accounts(self, snapshots: Snapshots,
                      caught_up_from: Mapping[str, Offsets] | None = None) -> None:
        """Install restored accounts in bulk: `load_account` for a whole changelog partition,
        column by column. ``caught_up_from``, by account id: the marks of snapshots that
        already reflect inputs about to be re-read (see `load_account`)."""
        self.accounts.changed()
        book = self.book
        if not book.index.keys().isdisjoint(snapshots.ids):
            for account_id in snapshots.ids:
                row = book.index.get(account_id)
                if row is not None:
                    self._forget(row)
        rows = book.install_many(snapshots)
        counts = np.bincount(snapshots.state, minlength=len(_STATES)).tolist()
        for state in _STATES:
            self.accounts_in_state[state] += counts[state]
        self._unindexed.extend(rows.tolist())
        if caught_up_from:
            self._caught_up_from.update(caught_up_from)

    def snapshots(self, account_ids: Sequence[str]) -> Snapshots:
        """Held accounts as checkpoint columns, read from the book's."""
        index = self.book.index
        return self.book.snapshots(np.array([index[a] for a in account_ids], np.int64))

    def drop_partition(self, partition: int | None) -> int:
        """Forget every account of an input partition (it was handed to another instance)."""
        self.accounts.changed()
        book = self.book
        code = -1 if partition is None else partition
        ids = book.ids
        rows = [row for row in np.flatnonzero(book.part[:len(ids)] == code).tolist()
                if ids[row] is not None]
        for row in rows:
            account_id = ids[row]
            self._forget(row)
            self._dirty.discard(account_id)  # type: ignore[arg-type]
        return len(rows)

    def _forget(self, row: int) -> None:
        book = self.book
        self.accounts_in_state[_STATES[book.state_m[row]]] -= 1
        self._caught_up_from.pop(book.ids[row], None)  # type: ignore[arg-type]
        book.free_row(row)

