"""The per-record processing of SPEC §6: apply one decoded input, re-evaluate exactly the
accounts it can move, and return the state-change events it causes.

The engine is synchronous and knows nothing of Kafka: `liqmon replay` and `liqmon run` feed it
the same records in the same order and therefore get the same events.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Hashable
from dataclasses import dataclass, field

from monitor.config import RiskConfig
from monitor.events import Event, Source, build_event
from monitor.margin import Position, apply_fill_to_position, value_account
from monitor.records import Fill, InputRecord, LedgerEntry, PriceTick
from monitor.state import AccountState, next_state

DEFAULT_DEDUPE_WINDOW = 10_000


@dataclass(slots=True)
class Account:
    balances: dict[str, float] = field(default_factory=dict)  # non-zero balances only
    positions: dict[str, Position] = field(default_factory=dict)
    state: AccountState = AccountState.HEALTHY
    transitions: int = 0  # events emitted so far; never reset (event ids depend on it)
    partition: int | None = None  # input partition that owns it (None in replay)
    watched: frozenset[str] = frozenset()  # price symbols whose ticks can move this account

    def is_blank(self) -> bool:
        """Nothing to remember: the account may be forgotten (SPEC §5 tombstone rule)."""
        return not self.balances and not self.positions and self.transitions == 0


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


class Engine:
    def __init__(self, config: RiskConfig, dedupe_window: int = DEFAULT_DEDUPE_WINDOW) -> None:
        self.config = config
        self.prices: dict[str, float] = {}
        self.price_ts: dict[str, int] = {}
        self.accounts: dict[str, Account] = {}
        self.stats = EngineStats()
        self._dedupe_window = dedupe_window
        self._dedupe: dict[tuple[str, int | None], DedupeWindow] = {}
        self.positions_held = 0
        self.accounts_in_state: dict[AccountState, int] = dict.fromkeys(AccountState, 0)
        self._price_symbols = config.price_symbols()
        self._watchers: dict[str, set[str]] = {}  # price symbol -> accounts it can move
        self._dirty: set[str] = set()  # accounts changed since the last take_dirty()
        # After a restore, accounts whose snapshot is newer than the inputs being re-read:
        # account -> {(topic, partition): first offset not yet reflected in the snapshot}.
        self._caught_up_from: dict[str, dict[tuple[str, int | None], int]] = {}

    # -- input -------------------------------------------------------------------------------

    def apply(self, record: InputRecord, source: Source) -> list[Event]:
        """Apply one valid record; events come back in ascending account-id order."""
        if isinstance(record, PriceTick):
            return self._apply_tick(record, source)
        if isinstance(record, Fill):
            return self._apply_fill(record, source)
        return self._apply_ledger(record, source)

    def _apply_tick(self, tick: PriceTick, source: Source) -> list[Event]:
        symbol = tick.symbol
        if symbol not in self._price_symbols:
            self.stats.unused_ticks += 1
            return []
        last_ts = self.price_ts.get(symbol)
        if last_ts is not None and tick.ts < last_ts:
            self.stats.stale_ticks += 1
            return []
        self.prices[symbol] = tick.price
        self.price_ts[symbol] = tick.ts
        self.stats.applied_ticks += 1
        events = []
        guarded = self._caught_up_from
        for account_id in self.accounts_moved_by(symbol):
            if guarded and self._already_reflected(account_id, source):
                continue
            event = self._evaluate(account_id, tick.ts, "price", symbol, source)
            if event is not None:
                events.append(event)
        events.sort(key=lambda event: event.account)
        return events

    def _apply_fill(self, fill: Fill, source: Source) -> list[Event]:
        if not self._first_time(source, fill.account, fill.fill_id):
            self.stats.duplicates += 1
            return []
        if self._caught_up_from and self._already_reflected(fill.account, source):
            return []
        account = self._account(fill.account, source.partition)
        instrument = self.config.instruments[fill.symbol]
        held = account.positions.get(fill.symbol)
        position, realized = apply_fill_to_position(
            held, fill.signed_qty, fill.price, instrument.contract_size
        )
        if position is None:
            del account.positions[fill.symbol]
            self.positions_held -= 1
        else:
            account.positions[fill.symbol] = position
            self.positions_held += held is None
        settle = instrument.settle
        balance = account.balances.get(settle, 0.0)
        balance += realized
        balance -= fill.fee
        self._set_balance(account, settle, balance)
        self.stats.applied_fills += 1
        return self._after_account_change(fill.account, account, fill.ts, "fill", fill.fill_id,
                                          source)

    def _apply_ledger(self, entry: LedgerEntry, source: Source) -> list[Event]:
        if not self._first_time(source, entry.account, entry.entry_id):
            self.stats.duplicates += 1
            return []
        if self._caught_up_from and self._already_reflected(entry.account, source):
            return []
        account = self._account(entry.account, source.partition)
        self._set_balance(account, entry.asset,
                          account.balances.get(entry.asset, 0.0) + entry.amount)
        self.stats.applied_ledger += 1
        return self._after_account_change(entry.account, account, entry.ts, "ledger",
                                          entry.entry_id, source)

    def accounts_moved_by(self, symbol: str) -> frozenset[str] | set[str]:
        """Accounts a tick on this symbol can move (SPEC §6): a position marked by it or
        settling in an asset priced by it, or a non-zero balance in an asset priced by it."""
        return self._watchers.get(symbol, frozenset())

    # -- bookkeeping -------------------------------------------------------------------------

    def _first_time(self, source: Source, account: str, record_id: str) -> bool:
        key = (source.topic, source.partition)
        window = self._dedupe.get(key)
        if window is None:
            window = self._dedupe[key] = DedupeWindow(self._dedupe_window)
        return window.add((account, record_id))

    def _account(self, account_id: str, partition: int | None) -> Account:
        account = self.accounts.get(account_id)
        if account is None:
            account = self.accounts[account_id] = Account(partition=partition)
            self.accounts_in_state[AccountState.HEALTHY] += 1
        return account

    @staticmethod
    def _set_balance(account: Account, asset: str, balance: float) -> None:
        if balance == 0:
            account.balances.pop(asset, None)
        else:
            account.balances[asset] = balance

    def _after_account_change(self, account_id: str, account: Account, ts: int, kind: str,
                              ref: str, source: Source) -> list[Event]:
        self._dirty.add(account_id)
        self._rewatch(account_id, account)
        event = self._evaluate(account_id, ts, kind, ref, source)
        if account.is_blank():
            del self.accounts[account_id]
            self.accounts_in_state[AccountState.HEALTHY] -= 1  # blank implies never left it
        return [event] if event is not None else []

    def _rewatch(self, account_id: str, account: Account) -> None:
        """Keep the symbol → accounts index in step with what the account now holds."""
        watched = self._watched_symbols(account)
        if watched == account.watched:
            return
        for symbol in account.watched - watched:
            holders = self._watchers[symbol]
            holders.discard(account_id)
            if not holders:
                del self._watchers[symbol]
        for symbol in watched - account.watched:
            self._watchers.setdefault(symbol, set()).add(account_id)
        account.watched = watched

    def _watched_symbols(self, account: Account) -> frozenset[str]:
        assets, instruments = self.config.assets, self.config.instruments
        symbols: set[str] = set()
        for symbol in account.positions:
            instrument = instruments[symbol]
            symbols.add(instrument.mark_symbol)
            settle_symbol = assets[instrument.settle].price_symbol
            if settle_symbol is not None:
                symbols.add(settle_symbol)
        for asset in account.balances:
            price_symbol = assets[asset].price_symbol
            if price_symbol is not None:
                symbols.add(price_symbol)
        return frozenset(symbols)

    # -- evaluation --------------------------------------------------------------------------

    def _evaluate(self, account_id: str, ts: int, kind: str, ref: str,
                  source: Source) -> Event | None:
        account = self.accounts[account_id]
        valuation = value_account(account.balances, account.positions, self.config, self.prices)
        if valuation is None:
            self.stats.unevaluated += 1
            return None
        new_state = next_state(account.state, valuation.ratio, self.config.thresholds)
        if new_state == account.state:
            return None
        account.transitions += 1
        self._dirty.add(account_id)
        event = build_event(
            account=account_id,
            transition=account.transitions,
            previous=account.state,
            state=new_state,
            valuation=valuation,
            balances=account.balances,
            positions=account.positions,
            config=self.config,
            prices=self.prices,
            ts=ts,
            trigger_kind=kind,
            trigger_ref=ref,
            source=source,
        )
        self.accounts_in_state[account.state] -= 1
        self.accounts_in_state[new_state] += 1
        account.state = new_state
        return event

    # -- durability: what a checkpoint saves and a restore loads --------------------------------

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

    def price_table(self) -> dict[str, tuple[float, int]]:
        return {symbol: (price, self.price_ts[symbol]) for symbol, price in self.prices.items()}

    def load_prices(self, table: dict[str, tuple[float, int]]) -> None:
        self.prices = {symbol: price for symbol, (price, _) in table.items()}
        self.price_ts = {symbol: ts for symbol, (_, ts) in table.items()}

    def load_account(self, account_id: str, account: Account,
                     caught_up_from: dict[tuple[str, int | None], int] | None = None) -> None:
        """Install a restored account. ``caught_up_from`` marks a snapshot that already
        reflects inputs about to be re-read: records before those offsets skip it."""
        previous = self.accounts.get(account_id)
        if previous is not None:
            self._forget(account_id, previous)
        account.watched = frozenset()
        self.accounts[account_id] = account
        self.accounts_in_state[account.state] += 1
        self.positions_held += len(account.positions)
        self._rewatch(account_id, account)
        if caught_up_from:
            self._caught_up_from[account_id] = caught_up_from
        else:
            self._caught_up_from.pop(account_id, None)

    def drop_partition(self, partition: int | None) -> int:
        """Forget every account of an input partition (it was handed to another instance)."""
        gone = [a for a, account in self.accounts.items() if account.partition == partition]
        for account_id in gone:
            self._forget(account_id, self.accounts[account_id])
            self._dirty.discard(account_id)
        return len(gone)

    def _forget(self, account_id: str, account: Account) -> None:
        for symbol in account.watched:
            holders = self._watchers[symbol]
            holders.discard(account_id)
            if not holders:
                del self._watchers[symbol]
        self.accounts_in_state[account.state] -= 1
        self.positions_held -= len(account.positions)
        self._caught_up_from.pop(account_id, None)
        del self.accounts[account_id]

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
