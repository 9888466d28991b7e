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
from itertools import repeat
from operator import itemgetter
from typing import Any, Generic, TypeVar, cast

import numpy as np

from monitor.account import Account, RiskKey, UnitKey
from monitor.book import AccountRun, Book, Verdict
from monitor.book.kernels import BALANCE, FILL
from monitor.config import RiskConfig
from monitor.events import Event, Source, build_event, position_detail
from monitor.margin import Valuation, value_account
from monitor.records import (
    CROSS,
    ISOLATED_MARGIN,
    Fill,
    InputRecord,
    LedgerEntry,
    PriceTick,
    Reason,
    Rejected,
)
from monitor.snapshot import Offsets, Snapshots
from monitor.state import AccountState, next_state

DEFAULT_DEDUPE_WINDOW = 10_000
AccountRecord = Fill | LedgerEntry  # what changes one account
Outcome = list[Event] | Rejected  # of one record: its events, or why it was rejected


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

    def __contains__(self, key: object) -> bool:
        return key in self._seen

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


INDEX_CHUNK = 262_144  # rows indexed per numpy pass after a restore (bounds peak memory)
# Fills after which a position compaction may begin (`Engine.upkeep`), however few positions
# are open: on a small book a pass costs little, and scattered positions cost little too.
COMPACT_AFTER_FILLS = 65_536
_STATES = tuple(AccountState)
_HEALTHY = AccountState.HEALTHY
_by_symbol = itemgetter("symbol")  # an event lists its positions by symbol
_K = TypeVar("_K", str, UnitKey)


class AccountsView(Mapping[_K, Account], Generic[_K]):
    """`engine.accounts` (account id → its cross margin) and `engine.units` (`UnitKey` → an
    isolated position): an `Account` built from the book, over one of its row indexes.

    A read view: changing the returned object changes nothing in the engine (install state
    with `Engine.load_account`). Lookups are cached until the engine applies its next record
    (a checkpoint reads each changed account more than once). A deep copy is a plain dict.
    """

    __slots__ = ("_book", "_cache", "_index")

    def __init__(self, book: Book, index: dict[_K, int]) -> None:
        self._book = book
        self._index: dict[_K, int] = index
        self._cache: dict[_K, Account] = {}

    def changed(self) -> None:
        if self._cache:
            self._cache = {}

    def __getitem__(self, key: _K) -> Account:
        account = self._cache.get(key)
        if account is None:
            account = self._cache[key] = self._book.account(self._index[key])
        return account

    def __contains__(self, key: object) -> bool:
        return key in self._index

    def __iter__(self) -> Iterator[_K]:
        return iter(list(self._index))

    def __len__(self) -> int:
        return len(self._index)

    def __deepcopy__(self, memo: dict[int, Any]) -> dict[_K, Account]:
        return {key: self._book.account(row) for key, row in self._index.items()}

    def __repr__(self) -> str:
        return f"<{len(self)} accounts>"


def _by_input(mark: tuple[tuple[str, int | None], int]) -> tuple[str, int]:
    """Sort key of a mark's entries: by topic, then partition (None, in replay, first)."""
    (topic, partition), _ = mark
    return topic, -1 if partition is None else partition


_NO_ROWS = np.empty(0, np.int64)
_NO_MARKS: Offsets = {}  # never written: what an unmarked unit's marks read as


@dataclass(frozen=True, slots=True)
class DirtyUnits:
    """What `take_dirty` hands a checkpoint: the risk units changed since the last call;
    ``rows``, the book row each of the first ``len(rows)`` of them held then, in ascending
    order (the others held none: forgotten since they changed, or an engine without rows);
    ``partitions``, the input partition each lived in then (-1: not known)."""

    keys: list[RiskKey]
    rows: np.ndarray
    partitions: np.ndarray

    def __len__(self) -> int:
        return len(self.keys)

    def subset(self, chosen: np.ndarray) -> DirtyUnits:
        """Those at these indexes (ascending: those with a row stay first)."""
        keys = self.keys
        return DirtyUnits([keys[k] for k in chosen.tolist()],
                          self.rows[chosen[chosen < len(self.rows)]], self.partitions[chosen])

    def slice(self, start: int, stop: int) -> DirtyUnits:
        """Those from ``start`` to ``stop``."""
        return DirtyUnits(self.keys[start:stop], self.rows[start:stop],
                          self.partitions[start:stop])


class InputLedger:
    """What every engine keeps besides its accounts and prices: the per-partition duplicate
    windows, the last applied tick time per symbol, the input counters, and the set of risk
    units (accounts and isolated positions) changed since the last checkpoint (SPEC §2, §6)."""

    def __init__(self, config: RiskConfig, dedupe_window: int) -> None:
        self.stats = EngineStats()
        self.price_ts: dict[str, int] = {}
        self._price_symbols = config.price_symbols()
        self._dedupe_window = dedupe_window
        self._dedupe: dict[tuple[str, int | None], DedupeWindow] = {}
        self._dirty: set[RiskKey] = set()  # risk units changed since the last take_dirty()
        # Risk units forgotten blank, by the input partition they lived in: their tombstones
        # go there, whichever partition the record that emptied them came from (a record
        # keyed by something else than its account can come from another).
        self._blank_in: dict[RiskKey, int] = {}  # since the last take_dirty()
        self._tombstone_in: dict[RiskKey, int] = {}  # of the risk units it handed out
        # After a restore, risk units whose snapshot is newer than the inputs being re-read:
        # key -> {(topic, partition): first offset not yet reflected in the snapshot}.
        self._caught_up_from: dict[RiskKey, Offsets] = {}
        # The same marks by content, with the (key, marks) they were given to: a restore
        # gives a million accounts a few distinct marks, so releasing checks each once.
        self._mark_groups: dict[tuple[tuple[tuple[str, int | None], int], ...],
                                list[tuple[RiskKey, Offsets]]] = {}
        # Of those, the risk units without a row (restored as tombstones, or forgotten since),
        # by input partition: no row says which partition they belong to when it is handed
        # over.
        self._marked_forgotten: dict[int, set[RiskKey]] = {}

    def apply(self, record: InputRecord, source: Source) -> list[Event]:
        raise NotImplementedError  # each engine's own

    def apply_account_records(self, records: Sequence[AccountRecord], sources: Sequence[Source]
                              ) -> list[tuple[int, Outcome]]:
        """`apply` of each fill and ledger entry in turn: the records that had an outcome
        (their events, or the rejection `apply` raised), by index."""
        outcomes: list[tuple[int, Outcome]] = []
        for k, (record, source) in enumerate(zip(records, sources, strict=True)):
            self._apply_one(k, record, source, outcomes)
        return outcomes

    def apply_records(self, records: Sequence[InputRecord], sources: Sequence[Source]
                      ) -> list[Outcome]:
        """Each record's outcome, in order (no events: an empty list), as the service
        applies a fetched batch: fills and ledger entries a run at a time
        (`apply_account_records`), ticks one by one."""
        outcomes: list[Outcome] = []
        k, count = 0, len(records)
        while k < count:
            record = records[k]
            if isinstance(record, PriceTick):  # never rejected
                outcomes.append(self.apply(record, sources[k]))
                k += 1
                continue
            end = k + 1
            while end < count and not isinstance(records[end], PriceTick):
                end += 1
            found = dict(self.apply_account_records(
                cast(Sequence[AccountRecord], records[k:end]), sources[k:end]))
            outcomes += [found.get(j, []) for j in range(end - k)]
            k = end
        return outcomes

    def _apply_one(self, k: int, record: InputRecord, source: Source,
                   outcomes: list[tuple[int, Outcome]]) -> None:
        """`apply` of record ``k``, its outcome (if any) onto ``outcomes``."""
        try:
            events = self.apply(record, source)
        except Rejected as rejection:
            outcomes.append((k, rejection))
        else:
            if events:
                outcomes.append((k, events))

    def _already_reflected(self, key: RiskKey, source: Source) -> bool:
        marks = self._caught_up_from.get(key)
        if marks is None:
            return False
        first_new = marks.get((source.topic, source.partition))
        return first_new is not None and source.offset is not None and source.offset < first_new

    def _reflected_rows(self, ids: Sequence[Hashable], rows: np.ndarray,
                        source: Source) -> np.ndarray:
        """`_already_reflected` of each row's unit (``ids``: the book's), as a mask. While a
        catch-up's marks are held every tick takes each marked holder again (a skipped row's
        band is left empty), so this runs per holder per tick: read with C-level maps and
        decided once per marks dict (accounts restored alike share one), 0.17 µs a row
        against 0.37 for `_already_reflected` in a loop (10,000 holders)."""
        count = len(rows)
        if source.offset is None or not count:
            return np.zeros(count, dtype=bool)
        keys = itemgetter(*rows.tolist())(ids) if count > 1 else (ids[int(rows[0])],)
        marks = list(map(self._caught_up_from.get, keys, repeat(_NO_MARKS)))
        where, offset = (source.topic, source.partition), source.offset
        reflects = {identity: held.get(where, -1) > offset
                    for identity, held in dict(zip(map(id, marks), marks, strict=True)).items()}
        return np.fromiter(map(reflects.__getitem__, map(id, marks)), dtype=bool, count=count)

    def _mark(self, marks_by_key: Mapping[RiskKey, Offsets]) -> None:
        """Give restored risk units their marks (see `_already_reflected`)."""
        groups = self._mark_groups
        members: dict[int, list[tuple[RiskKey, Offsets]]] = {}  # by dict: shared ones once
        for key, marks in marks_by_key.items():
            self._caught_up_from[key] = marks
            group = members.get(id(marks))
            if group is None:
                group = members[id(marks)] = groups.setdefault(
                    tuple(sorted(marks.items(), key=_by_input)), [])
            group.append((key, marks))

    def mark_forgotten(self, partition: int, marks_by_key: Mapping[RiskKey, Offsets]) -> None:
        """After a restore, risk units of an input partition that its changelog holds as
        tombstones reflecting inputs about to be re-read (a crash mid-checkpoint after they
        were emptied): records before those offsets skip them, as a snapshot's marks do."""
        self._mark(marks_by_key)
        self._marked_forgotten.setdefault(partition, set()).update(marks_by_key)

    def _unmark_forgotten(self, partition: int | None) -> None:
        """The partition was handed over: its forgotten units' marks would never be passed."""
        for key in self._marked_forgotten.pop(-1 if partition is None else partition, ()):
            self._caught_up_from.pop(key, None)

    def release_caught_up(self, positions: Offsets) -> None:
        """Drop marks the inputs have passed (positions: next offset to read). Runs after
        every batch: its cost is per distinct marks, not per marked account."""
        for content, members in list(self._mark_groups.items()):
            if all(positions.get(key, 0) >= offset for key, offset in content):
                del self._mark_groups[content]
                held = self._caught_up_from
                for key, marks in members:
                    if held.get(key) is marks:  # not forgotten or marked anew since
                        del held[key]
        if not self._caught_up_from:  # marks of forgotten units only: nothing to hold
            self._mark_groups.clear()
            self._marked_forgotten.clear()

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

    def reflects(self, record: InputRecord, source: Source) -> bool | None:
        """Whether ``record`` was taken into account already: a fill or ledger entry whose id
        is in its partition's duplicate window, a tick no newer than the last applied tick of
        its symbol. None for a tick that says nothing (of a symbol nothing is priced by).
        Past the window (10,000 ids a partition) an applied fill or entry reads as new."""
        if isinstance(record, PriceTick):
            if record.symbol not in self._price_symbols:
                return None
            last_ts = self.price_ts.get(record.symbol)
            return last_ts is not None and record.ts <= last_ts
        window = self._dedupe.get((source.topic, source.partition))
        record_id = record.fill_id if isinstance(record, Fill) else record.entry_id
        return window is not None and (record.account, record_id) in window

    def _window(self, source: Source) -> DedupeWindow:
        key = (source.topic, source.partition)
        window = self._dedupe.get(key)
        if window is None:
            window = self._dedupe[key] = DedupeWindow(self._dedupe_window)
        return window

    def _first_time(self, source: Source, account: str, record_id: str) -> bool:
        return self._window(source).add((account, record_id))

    def _duplicate_fill(self, fill: Fill, source: Source) -> bool:
        """Is the fill's id in the window? Checked apart from recording it: a fill rejected
        for its margin mode is recognised as a duplicate first, but is not applied, so its
        id is not recorded (SPEC §4.1)."""
        if (fill.account, fill.fill_id) in self._window(source):
            self.stats.duplicates += 1
            return True
        return False

    def _record_fill(self, fill: Fill, source: Source) -> None:
        self._window(source).add((fill.account, fill.fill_id))

    @staticmethod
    def _fill_key(fill: Fill) -> RiskKey:
        """The risk unit a fill trades: the account, or its isolated position."""
        return fill.account if fill.margin_mode == CROSS else UnitKey(fill.account, fill.symbol)

    @staticmethod
    def _mode_conflict(fill: Fill) -> Rejected:
        held = "isolated" if fill.margin_mode == CROSS else "cross"
        return Rejected(Reason.MARGIN_MODE_CONFLICT,
                        f"margin_mode: account {fill.account!r} holds {fill.symbol} in {held} "
                        f"margin; a {fill.margin_mode} fill cannot trade it until it is closed")

    @property
    def upkeep_due(self) -> bool:
        """Whether `upkeep` has work to do."""
        return False

    def upkeep(self) -> bool:
        """Upkeep to do while idle, a step at a time; True while more remains (none here)."""
        return False

    def take_dirty(self) -> DirtyUnits:
        """Risk units changed since the last call, with the input partition each lives in (a
        missing one was forgotten: its tombstone goes to the partition it lived in)."""
        keys = self._hand_out()
        partitions = [self.partition_of(key) for key in keys]
        return DirtyUnits(keys, _NO_ROWS, np.array(
            [self._tombstone_in.get(key, -1) if p is None else p
             for key, p in zip(keys, partitions, strict=True)], np.int64))

    def partition_of(self, key: RiskKey) -> int | None:
        raise NotImplementedError  # each engine's own

    def transitions_of(self, key: RiskKey) -> int | None:
        """A risk unit's transition counter (None: not held)."""
        raise NotImplementedError  # each engine's own

    def renumber(self, key: RiskKey, transitions: int) -> None:
        """Set a held risk unit's transition counter, its next event's id following it
        (`service.published`); a checkpoint writes it."""
        raise NotImplementedError  # each engine's own

    def _hand_out(self) -> list[RiskKey]:
        """Empty the set of changed risk units, and keep the partitions of those forgotten
        blank among them (in ``_tombstone_in``, until a checkpoint has written them)."""
        dirty, self._dirty = self._dirty, set()
        # the partitions of those handed out before and put back (`mark_dirty`), then newer
        forgotten = self._tombstone_in | self._blank_in
        self._tombstone_in = {key: forgotten[key] for key in forgotten.keys() & dirty}
        self._blank_in = {}
        return list(dirty)

    def _forgot(self, key: RiskKey, partition: int | None) -> None:
        """A risk unit left blank is forgotten (SPEC §5): note where its tombstone goes."""
        if partition is not None and partition >= 0:
            self._blank_in[key] = partition
            if key in self._caught_up_from:  # its marks outlive its row
                self._marked_forgotten.setdefault(partition, set()).add(key)

    def mark_dirty(self, keys: Sequence[RiskKey], rows: np.ndarray | None = None,
                   partition: int | None = None) -> None:
        """Put back risk units whose checkpoint could not be written (``rows``: as
        `take_dirty` handed them out), or add units changed elsewhere (by a catch-up's private
        engine; ``partition``: theirs, where a checkpoint tombstones those not held here)."""
        self._dirty.update(keys)
        if partition is not None:
            for key in keys:
                if self.partition_of(key) is None:
                    self._forgotten_elsewhere(key, partition)

    def _forgotten_elsewhere(self, key: RiskKey, partition: int) -> None:
        """A dirty unit not held here lives in ``partition``, unless this engine knows."""
        if key not in self._tombstone_in:
            self._blank_in.setdefault(key, partition)

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
        self.accounts = AccountsView(self.book, self.book.index)
        self.units = AccountsView(self.book, self.book.units)  # isolated positions
        self.accounts_in_state: dict[AccountState, int] = dict.fromkeys(AccountState, 0)
        self.units_in_state: dict[AccountState, int] = dict.fromkeys(AccountState, 0)
        # rows installed by load_account(s), not yet banded: one at a time, and in bulk
        self._unindexed: list[int] = []
        self._unindexed_bulk: list[np.ndarray] = []
        self._reindex_all = False  # prices were replaced under the bands
        self._run = AccountRun()  # `apply_account_records`' arguments for the kernel
        self._fills_at_compaction = 0  # `stats.applied_fills` when the last one began

    def partition_of(self, key: RiskKey) -> int | None:
        """The input partition owning a risk unit held here (None: not held, or replay)."""
        book = self.book
        row = book.row_of(key)
        if row is None:
            return None
        partition = int(book.part_m[row])
        return None if partition < 0 else partition

    def transitions_of(self, key: RiskKey) -> int | None:
        row = self.book.row_of(key)
        return None if row is None else int(self.book.trans_m[row])

    def renumber(self, key: RiskKey, transitions: int) -> None:
        book = self.book
        row = book.row_of(key)
        if row is not None:
            book.trans_m[row] = transitions
            book.dirty_m[row] = True

    def take_dirty(self) -> DirtyUnits:
        """`InputLedger.take_dirty`. Here a change marks its unit's row (`Book.dirty`); only
        units without a row (forgotten since they changed) are kept by key. So the units
        come out in row order, each one's key and partition read from its row rather than
        looked up by key: at 1,000,000 accounts a checkpoint takes ~100,000 of them, and
        two dictionary lookups each had been a sixth of its cost."""
        book = self.book
        without_row: set[RiskKey] = set()
        for key in self._dirty:  # a unit forgotten, then held again since: by its row
            row = book.row_of(key)
            if row is None:
                without_row.add(key)
            else:
                book.dirty_m[row] = True
        self._dirty = without_row
        rowless = self._hand_out()
        rows = np.flatnonzero(book.dirty[:len(book.ids)])
        book.dirty[rows] = False
        ids = book.ids
        keys: list[RiskKey] = [ids[row] for row in rows.tolist()]  # type: ignore[misc]
        forgotten = np.array([self._tombstone_in.get(key, -1) for key in rowless], np.int64)
        return DirtyUnits(keys + rowless, rows,
                          np.concatenate([book.part[rows].astype(np.int64), forgotten]))

    def mark_dirty(self, keys: Sequence[RiskKey], rows: np.ndarray | None = None,
                   partition: int | None = None) -> None:
        """`InputLedger.mark_dirty`: by row where the key still holds the one it was handed
        out with, else looked up."""
        dirty = self.book.dirty_m
        for key, row in zip(keys, self._rows_now(keys, rows), strict=True):
            if row is None:
                self._dirty.add(key)
                if partition is not None:
                    self._forgotten_elsewhere(key, partition)
            else:
                dirty[row] = True

    def _rows_now(self, keys: Sequence[RiskKey], rows: np.ndarray | None
                  ) -> list[int | None]:
        """The row each key holds now: the one `take_dirty` handed out with it (``rows``, of
        the first ``len(rows)`` keys) while it still holds that key object, else looked up
        (a row freed and given to another unit meanwhile)."""
        ids, row_of = self.book.ids, self.book.row_of
        handed: list[int] = [] if rows is None else rows.tolist()
        found = [row if ids[row] is key else row_of(key)
                 for key, row in zip(keys[:len(handed)], handed, strict=True)]
        return found + self._rows(keys[len(handed):])

    def _rows(self, keys: Sequence[RiskKey]) -> list[int | None]:
        """`Book.row_of` of each key, one dictionary lookup each."""
        book = self.book
        if book.units:
            row_of = book.row_of
            return [row_of(key) for key in keys]
        get = book.index.get  # no isolated position held: a UnitKey finds no row here either
        return [get(key) for key in keys]  # type: ignore[arg-type]

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
        """Apply one valid record; events come back in ascending account-id order, an
        account's cross event before its isolated positions' (by symbol). Raises `Rejected`
        (margin_mode_conflict) for a fill that state makes bad input: nothing changed."""
        self._index_due()
        self.accounts.changed()
        self.units.changed()
        if isinstance(record, PriceTick):
            return self._apply_tick(record, source)
        if isinstance(record, Fill):
            return self._apply_fill(record, source)
        return self._apply_ledger(record, source)

    def apply_many(self, records: Iterable[tuple[InputRecord, Source]]) -> list[Event]:
        """Apply records in order, each exactly as `apply` would; their events, in order.
        A record `apply` rejects (margin_mode_conflict) raises here too: feed records one by
        one with `apply` where such input may come."""
        events: list[Event] = []
        extend = events.extend
        apply = self.apply
        for record, source in records:
            extend(apply(record, source))
        return events

    def apply_account_records(self, records: Sequence[AccountRecord], sources: Sequence[Source]
                              ) -> list[tuple[int, Outcome]]:
        """`apply` of each fill and ledger entry in turn, with the same outcome: the records
        that had one (their events, or the rejection `apply` would raise), by index.

        With no restore marks pending, plain records (a cross-margin fill or a ledger entry
        other than an isolated-margin transfer, on an account already held that holds the
        symbol in no isolated position) are applied a chunk at a time: `apply`'s Python (the
        duplicate window, the account's row) is done for the chunk first, in order, then one
        compiled call (`Book.account_run`) applies them, values each account and files its
        bands (taking and freeing position slots itself), stopping at a record whose verdict
        needs more (a state to move, bands that do not fit, an account that may be blank...),
        which is finished here as `apply` finishes it. The rest go through `apply`."""
        if self._caught_up_from:  # after a restore, each record is checked against its marks
            return super().apply_account_records(records, sources)
        self._index_due()
        self.accounts.changed()
        self.units.changed()
        outcomes: list[tuple[int, Outcome]] = []
        run = self._run
        ops, rows, codes, amounts, prices, fees = (run.ops, run.rows, run.codes, run.amounts,
                                                   run.prices, run.fees)
        index, units = self.book.index, self.book.units
        instr_index, asset_index = self._t.instr_index, self._t.asset_index
        count = len(records)
        k = 0
        while k < count:
            chunk: list[int] = []  # index of each record in the run
            fills = 0  # of them
            plain = True
            while k < count and len(chunk) < AccountRun.SIZE:
                record = records[k]
                row = index.get(record.account)
                if row is None:
                    plain = False
                    break
                j = len(chunk)
                if isinstance(record, Fill):
                    # units hold UnitKeys; a NamedTuple equals (and hashes as) a plain tuple
                    if record.margin_mode != CROSS or (
                            units and (record.account, record.symbol) in units):
                        plain = False
                        break
                    seen, fill = (record.account, record.fill_id), 1
                    ops[j], codes[j], fees[j] = FILL, instr_index[record.symbol], record.fee
                    amounts[j] = record.qty if record.side == "buy" else -record.qty
                    prices[j] = record.price
                else:
                    if record.kind == ISOLATED_MARGIN:
                        plain = False
                        break
                    seen, fill = (record.account, record.entry_id), 0
                    ops[j], codes[j] = BALANCE, asset_index[record.asset]
                    amounts[j] = record.amount
                if self._window(sources[k]).add(seen):
                    rows[j] = row
                    chunk.append(k)
                    fills += fill
                else:
                    self.stats.duplicates += 1
                k += 1
            if chunk:
                self._apply_run(records, sources, chunk, fills, outcomes)
            if not plain:
                self._apply_one(k, records[k], sources[k], outcomes)
                k += 1
        return outcomes

    def _apply_run(self, records: Sequence[AccountRecord], sources: Sequence[Source],
                   chunk: list[int], fills: int, outcomes: list[tuple[int, Outcome]]) -> None:
        """`apply_account_records`' compiled part for one chunk (``chunk``: each record's
        index, ``fills`` of them fills; its arguments in ``self._run``), its duplicate windows
        already updated. Every record of the chunk is applied."""
        book, run = self.book, self._run
        size = len(chunk)
        self.stats.applied_fills += fills
        self.stats.applied_ledger += size - fills
        start = 0
        while start < size:
            stop, verdict = book.account_run(run, start, size)
            if stop == size:
                return
            k = chunk[stop]
            record, row = records[k], int(run.rows[stop])
            if isinstance(record, Fill):
                kind, ref = "fill", record.fill_id
            else:
                kind, ref = "ledger", record.entry_id
            events = self._after_account_change(row, record.account, record.ts, kind, ref,
                                                sources[k], verdict)
            if events:
                outcomes.append((k, events))
            if book.row_of(record.account) is None:  # left blank and forgotten: a later
                for j in range(stop + 1, size):  # record of it starts a new row, as `apply`
                    if run.rows[j] == row:
                        later = chunk[j]
                        run.rows[j] = self._row(records[later].account,
                                                sources[later].partition)
            start = stop + 1

    def _apply_tick(self, tick: PriceTick, source: Source) -> list[Event]:
        if not self._fresh_tick(tick):
            return []
        symbol = tick.symbol
        self._prices[symbol] = tick.price
        sym = self._t.sym_index[symbol]
        book = self.book
        book.sym_px_m[sym] = tick.price
        if self._caught_up_from:  # `_reevaluate` skips the accounts snapshots reflect
            rows = book.candidates(sym, tick.price)
            return [] if rows is None else self._reevaluate(rows, tick.ts, symbol, source)
        crossed = book.reevaluate_crossed(sym, tick.price)
        if crossed is None:
            return []
        if isinstance(crossed, np.ndarray):  # many: valued, then filed by symbol in bulk
            return self._reevaluate(crossed, tick.ts, symbol, source)
        moved, new_states, unevaluated = crossed
        self.stats.unevaluated += unevaluated
        return self._price_moves(moved, new_states, tick.ts, symbol, source)

    def _reevaluate(self, rows: np.ndarray, ts: int, symbol: str,
                    source: Source) -> list[Event]:
        """Re-value the accounts whose band a tick left; events in `Event.order`."""
        book = self.book
        evaluation = book.evaluate(rows)
        evaluable, new_state, eps = evaluation.evaluable, evaluation.new_state, evaluation.eps
        moved = evaluable & (new_state != book.state[rows])
        if self._caught_up_from:  # snapshots newer than this input: leave them as they are
            reflected = self._reflected_rows(book.ids, rows, source)
            evaluable[reflected] = True  # not counted as unevaluated: it was skipped
            moved[reflected] = False
            eps[reflected] = 0.0
        self.stats.unevaluated += len(rows) - int(np.count_nonzero(evaluable))
        book.anchor_many(rows, eps, evaluation)
        at = np.flatnonzero(moved)
        return self._price_moves(rows[at].tolist(), new_state[at].tolist(), ts, symbol, source)

    def _price_moves(self, rows: list[int], new_states: list[int], ts: int, symbol: str,
                     source: Source) -> list[Event]:
        """Move the accounts a tick moved (their bands filed for their new states already);
        their events in `Event.order`."""
        book = self.book
        events = []
        for row, new in zip(rows, new_states, strict=True):
            event, settled = self._transition(row, book.state_m[row], ts, "price", symbol,
                                              source)
            if settled != new:  # pragma: no cover - both valuations sum identically
                book.anchor(row, 0.0, book.watched(row))
            if event is not None:
                events.append(event)
        if len(events) > 1:
            events.sort(key=Event.order)
        return events

    def _apply_fill(self, fill: Fill, source: Source) -> list[Event]:
        if self._duplicate_fill(fill, source):
            return []
        key = self._fill_key(fill)
        if self._caught_up_from and self._already_reflected(key, source):
            self._record_fill(fill, source)
            return []
        book = self.book
        instr = self._t.instr_index[fill.symbol]
        # SPEC §4.1: the position is held in one mode until it is closed.
        if isinstance(key, UnitKey):
            other = book.index.get(fill.account)
        else:
            other = book.units.get(UnitKey(fill.account, fill.symbol)) if book.units else None
        if other is not None and book.holds(other, instr):
            raise self._mode_conflict(fill)
        self._record_fill(fill, source)
        row = self._row(key, source.partition)
        signed = fill.qty if fill.side == "buy" else -fill.qty
        verdict = book.fill_and_evaluate(row, instr, signed, fill.price, fill.fee)
        self.stats.applied_fills += 1
        return self._after_account_change(row, key, fill.ts, "fill", fill.fill_id, source,
                                          verdict)

    def _apply_ledger(self, entry: LedgerEntry, source: Source) -> list[Event]:
        if not self._first_time(source, entry.account, entry.entry_id):
            self.stats.duplicates += 1
            return []
        if entry.kind == ISOLATED_MARGIN:
            return self._move_margin(entry, source)
        if self._caught_up_from and self._already_reflected(entry.account, source):
            return []
        row = self._row(entry.account, source.partition)
        self.book.add_balance(row, self._t.asset_index[entry.asset], entry.amount)
        self.stats.applied_ledger += 1
        return self._after_account_change(row, entry.account, entry.ts, "ledger",
                                          entry.entry_id, source)

    def _move_margin(self, entry: LedgerEntry, source: Source) -> list[Event]:
        """SPEC §4.1: move the amount from the cross balance to the isolated wallet; the cross
        account is evaluated first, then the isolated position. After a restore each side
        skips the entry on its own if its snapshot already reflects it."""
        asset = self._t.asset_index[entry.asset]
        assert entry.symbol is not None  # the decoder requires it of this kind
        events: list[Event] = []
        applied = False
        for key, amount in ((entry.account, -entry.amount),
                            (UnitKey(entry.account, entry.symbol), entry.amount)):
            if self._caught_up_from and self._already_reflected(key, source):
                continue
            row = self._row(key, source.partition)
            self.book.add_balance(row, asset, amount)
            applied = True
            events += self._after_account_change(row, key, entry.ts, "ledger", entry.entry_id,
                                                 source)
        self.stats.applied_ledger += applied
        return events

    def _row(self, key: RiskKey, partition: int | None) -> int:
        """The risk unit's row, created (HEALTHY) on its first input."""
        book = self.book
        row = book.row_of(key)
        if row is None:
            row = book.new_row(key, partition)
            self._in_state(row)[_HEALTHY] += 1
        return row

    def _in_state(self, row: int) -> dict[AccountState, int]:
        """The per-state count the row belongs to: accounts or isolated positions."""
        return self.units_in_state if self.book.isolated_m[row] else self.accounts_in_state

    def accounts_moved_by(self, symbol: str) -> frozenset[RiskKey]:
        """Risk units a tick on this symbol can move (SPEC §6, §4.1): a position marked by it
        or settling in an asset priced by it, or a non-zero balance in an asset priced by it."""
        sym = self._t.sym_index.get(symbol)
        if sym is None:
            return frozenset()
        self._index_due()
        ids = self.book.ids
        return frozenset(ids[row] for row in self.book.holders(sym).tolist())

    def valuation(self, key: RiskKey) -> Valuation | None:
        """The risk unit's figures at the current prices, from scratch (SPEC §4, §4.1)."""
        isolated = isinstance(key, UnitKey)
        account = self.units[key] if isolated else self.accounts[key]  # type: ignore[index]
        return value_account(account.balances, account.positions, self.config, self._prices,
                             isolated=isolated)

    # -- bookkeeping -------------------------------------------------------------------------

    def _after_account_change(self, row: int, key: RiskKey, ts: int, kind: str, ref: str,
                              source: Source, verdict: Verdict | None = None) -> list[Event]:
        """``verdict``: the account's, if the change already made it (a fill)."""
        self.book.dirty_m[row] = True
        if verdict is None:
            verdict = self.book.evaluate_and_file(row)
        event = self._evaluate(row, ts, kind, ref, source, verdict)
        if self.book.is_blank(row):  # nothing to remember (SPEC §5, §4.1 tombstone rule)
            self._in_state(row)[_HEALTHY] -= 1  # blank implies never left it
            self._forgot(key, int(self.book.part_m[row]))
            self._dirty.add(key)  # its row goes, the change stays: a tombstone
            self.book.free_row(row)
        return [event] if event is not None else []

    # -- evaluation --------------------------------------------------------------------------

    def _evaluate(self, row: int, ts: int, kind: str, ref: str, source: Source,
                  verdict: Verdict) -> Event | None:
        """Move one account's state as its from-scratch evaluation says (its new band is
        filed already)."""
        evaluable, _, new, _ = verdict
        if not evaluable:  # a settle asset has no price yet: filed with eps 0
            self.stats.unevaluated += 1
            return None
        state = self.book.state_m[row]
        if new == state:
            return None
        event, settled = self._transition(row, state, ts, kind, ref, source)
        if settled != new:  # pragma: no cover - both valuations sum identically
            self.book.anchor(row, 0.0, self.book.watched(row))
        return event

    def _transition(self, row: int, state: int, ts: int, kind: str, ref: str,
                    source: Source) -> tuple[Event | None, int]:
        """Build the event from a from-scratch valuation and move the account's state."""
        book = self.book
        count = book.event_figures(row)
        if count < 0:  # pragma: no cover - the kernel found every settle price
            return None, state
        (collateral, upnl, equity, maintenance, initial, ratio,
         unpriced) = book.account_figures.tolist()
        previous = _STATES[state]
        new_state = next_state(previous, ratio, self.config.thresholds)
        if new_state == previous:  # pragma: no cover - both valuations sum identically
            return None, state
        transitions = book.trans_m[row] + 1
        book.trans_m[row] = transitions
        key: RiskKey = book.ids[row]  # type: ignore[assignment]
        unit = key if isinstance(key, UnitKey) else None
        book.dirty_m[row] = True
        valuation = Valuation(collateral, upnl, equity, maintenance, initial, ratio,
                              bool(unpriced))
        plan = (book.liquidation_plan(row, count) if new_state == AccountState.LIQUIDATING
                else None)
        event = build_event(
            account=key if unit is None else unit.account,  # type: ignore[arg-type]
            transition=transitions,
            previous=previous,
            state=new_state,
            valuation=valuation,
            balances=book.balances_of(row),
            details=self._position_details(count),
            plan=plan,
            config=self.config,
            price_ts=self.price_ts,
            ts=ts,
            trigger_kind=kind,
            trigger_ref=ref,
            source=source,
            isolated=None if unit is None else unit.symbol,
        )
        in_state = self._in_state(row)
        in_state[previous] -= 1
        in_state[new_state] += 1
        book.state_m[row] = int(new_state)
        return event, int(new_state)

    def _position_details(self, count: int) -> list[dict[str, Any]]:
        """The event's positions (`position_detail` of each, by symbol) from what
        `Book.event_figures` found."""
        names = self._t.instruments
        details = [position_detail(
            names[int(instr)], qty, entry, mark, notional, upnl, maintenance, initial,
            None if liquidation != liquidation else liquidation,  # NaN: none
            None if bankruptcy != bankruptcy else bankruptcy)
            for (instr, qty, entry, mark, _, notional, upnl, maintenance, initial, _,
                 liquidation, bankruptcy) in self.book.position_figures_m[:count].tolist()]
        if count > 1:
            details.sort(key=_by_symbol)
        return details

    def index_restored(self) -> int:
        """File accounts installed by `load_account` (or all, after `load_prices`) in the
        band index. `apply` does it before the next record; call it to pay the cost at
        restore time instead. Nothing is evaluated: no event, no counter moves."""
        book = self.book
        if self._reindex_all:
            rows = book.rows_in_use()
        else:  # sorted, once each, and none freed since (a mask: no sort of a million rows)
            pending = np.zeros(len(book.ids), bool)
            pending[np.array(self._unindexed, np.int64)] = True
            for installed in self._unindexed_bulk:
                pending[installed] = True
            pending[np.array(book.free_rows, np.int64)] = False
            rows = np.flatnonzero(pending)
        self._unindexed = []
        self._unindexed_bulk = []
        self._reindex_all = False
        book.refile_all(rows, INDEX_CHUNK)
        return len(rows)

    def _index_due(self) -> None:
        """Band what restores installed or re-priced, before the bands are relied on."""
        if self._unindexed or self._unindexed_bulk or self._reindex_all:
            self.index_restored()

    def merge_overdue_bands(self) -> bool:
        """Tidy the band index after a tick that moved many accounts: one symbol's overdue
        merge (`Book.merge_overdue_bands`); True while more remain. The first part of
        `upkeep`, so that the next ticks do not pay for it. Changes which structure holds a
        band, never which accounts a tick re-values."""
        return self.book.merge_overdue_bands()

    def upkeep(self) -> bool:
        """A step of what the service does while it has nothing ready, so that records do not
        pay for it: an overdue band merge (`merge_overdue_bands`) while any is left, else a
        step of a pass that moves each account's positions side by side
        (`Book.compact_positions`), begun once fills applied since the last one began
        number half the open positions (`COMPACT_AFTER_FILLS` at least). True while more
        remains. Neither changes an event or what an account holds."""
        book = self.book
        if book.bulk_filed:
            self.merge_overdue_bands()
            return self.upkeep_due
        if not book.compacting and self._compaction_due():
            self._fills_at_compaction = self.stats.applied_fills
            book.start_compaction()
        book.compact_positions()
        return self.upkeep_due

    def _compaction_due(self) -> bool:
        fills = self.stats.applied_fills - self._fills_at_compaction
        return fills >= max(COMPACT_AFTER_FILLS, self.book.positions // 2)

    @property
    def upkeep_due(self) -> bool:
        book = self.book
        return book.bulk_filed or book.compacting or self._compaction_due()

    def expire_bands(self, symbol: str | None = None) -> int:
        """Forget the safe bands of every account a tick on ``symbol`` can move (or of every
        account), so that the next tick on any of their symbols re-values them all. For
        benchmarks and tests: it changes which accounts are re-valued, never an event."""
        self._index_due()
        book = self.book
        if symbol is None:
            rows = book.rows_in_use()
        else:
            sym = self._t.sym_index.get(symbol)
            if sym is None:
                return 0
            rows = book.holders(sym).astype(np.int64)
        book.refile_all(rows, INDEX_CHUNK, width=0.0)
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

    def load_account(self, key: RiskKey, account: Account,
                     caught_up_from: dict[tuple[str, int | None], int] | None = None) -> None:
        """Install a restored account, or isolated position (``key`` a `UnitKey`).
        ``caught_up_from`` marks a snapshot that already reflects inputs about to be
        re-read: records before those offsets skip it."""
        self.accounts.changed()
        self.units.changed()
        book = self.book
        previous = book.row_of(key)
        if previous is not None:
            self._forget(previous)
        row = book.load(key, {a: b for a, b in account.balances.items() if b != 0},
                        account.positions, int(account.state), account.transitions,
                        account.partition)
        self._in_state(row)[account.state] += 1
        self._unindexed.append(row)
        if caught_up_from:
            self._mark({key: caught_up_from})
        else:
            self._caught_up_from.pop(key, None)

    def load_accounts(self, snapshots: Snapshots,
                      caught_up_from: Mapping[RiskKey, Offsets] | None = None) -> None:
        """Install restored accounts and isolated positions in bulk: `load_account` for a
        whole changelog partition, column by column. ``caught_up_from``, by key: the marks of
        snapshots that already reflect inputs about to be re-read (see `load_account`)."""
        self.accounts.changed()
        self.units.changed()
        book = self.book
        indexes: tuple[dict[Any, int], ...] = (book.index, book.units)
        for held in indexes:  # those held already are replaced
            if held and not held.keys().isdisjoint(snapshots.ids):
                for key in snapshots.ids:
                    row = held.get(key)
                    if row is not None:
                        self._forget(row)
        rows = book.install_many(snapshots)
        unit = book.isolated[rows] != 0
        for in_state, chosen in ((self.accounts_in_state, ~unit), (self.units_in_state, unit)):
            counts = np.bincount(snapshots.state[chosen], minlength=len(_STATES)).tolist()
            for state in _STATES:
                in_state[state] += counts[state]
        self._unindexed_bulk.append(rows)
        if caught_up_from:
            self._mark(caught_up_from)

    def snapshots(self, keys: Sequence[RiskKey], rows: np.ndarray | None = None) -> Snapshots:
        """Those of these accounts and isolated positions held here, in the keys' order, as
        checkpoint columns read from the book's (``rows``: as `take_dirty` handed them out,
        each checked to hold its key still, else looked up)."""
        found = self._rows_now(keys, rows)
        held = [key for key, row in zip(keys, found, strict=True) if row is not None]
        return self.book.snapshots(np.array([row for row in found if row is not None], np.int64),
                                   held)

    def _rows_of_partition(self, partition: int | None) -> np.ndarray:
        """The rows of the risk units held for an input partition (None: replay's)."""
        book = self.book
        code = -1 if partition is None else partition
        rows = np.flatnonzero(book.part[:len(book.ids)] == code)  # free rows have part -1
        if partition is None:
            rows = rows[[book.ids[row] is not None for row in rows.tolist()]]
        return rows

    def mark_partition_dirty(self, partition: int) -> int:
        """Have the next checkpoint write every risk unit of an input partition held here;
        returns how many that is."""
        rows = self._rows_of_partition(partition)
        self.book.dirty[rows] = True
        return len(rows)

    def drop_partition(self, partition: int | None) -> int:
        """Forget every account and isolated position of an input partition (it was handed
        to another instance); returns how many risk units that was."""
        self.accounts.changed()
        self.units.changed()
        book = self.book
        rows = self._rows_of_partition(partition)
        isolated = book.isolated[rows] != 0
        for counts, mine in ((self.accounts_in_state, ~isolated),
                             (self.units_in_state, isolated)):
            in_state = np.bincount(book.state[rows[mine]], minlength=len(_STATES))
            for state, count in zip(_STATES, in_state.tolist(), strict=True):
                counts[state] -= count
        keys = book.free_many(rows)
        if self._caught_up_from:
            for key in keys:
                self._caught_up_from.pop(key, None)
        self._unmark_forgotten(partition)
        self._dirty.difference_update(keys)
        return len(rows)

    def _forget(self, row: int) -> None:
        book = self.book
        if book.dirty_m[row]:  # replaced: its change stays with its key
            self._dirty.add(book.ids[row])  # type: ignore[arg-type]
        self._in_state(row)[_STATES[book.state_m[row]]] -= 1
        self._caught_up_from.pop(book.ids[row], None)  # type: ignore[arg-type]
        book.free_row(row)

