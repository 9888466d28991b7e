"""The reference engine: the straightforward implementation of SPEC §4–§6 that liqmon shipped
first. Plain dicts per account, and every account a record can move is re-valued from scratch
with `margin.value_account` after every record.

It is kept, unchanged in behaviour, as the *naive baseline* of `liqmon bench` (a plain-Python
full recomputation of every affected account) and as a second oracle in the tests: the
columnar engine of `monitor.engine` must agree with it event for event. It has the same public
API as `monitor.engine.Engine`, so the service can run on either.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from monitor.account import Account, RiskKey, UnitKey
from monitor.config import RiskConfig
from monitor.engine import DEFAULT_DEDUPE_WINDOW, InputLedger
from monitor.events import Event, Source, build_event
from monitor.margin import apply_fill_to_position, value_account
from monitor.records import ISOLATED_MARGIN, Fill, InputRecord, LedgerEntry, PriceTick
from monitor.snapshot import Offsets, Snapshots
from monitor.state import AccountState, next_state


class ReferenceEngine(InputLedger):
    def __init__(self, config: RiskConfig, dedupe_window: int = DEFAULT_DEDUPE_WINDOW) -> None:
        super().__init__(config, dedupe_window)
        self.config = config
        self.prices: dict[str, float] = {}
        self.accounts: dict[str, Account] = {}
        self.units: dict[UnitKey, Account] = {}  # isolated positions (SPEC §4.1)
        self.positions_held = 0
        self.accounts_in_state: dict[AccountState, int] = dict.fromkeys(AccountState, 0)
        self.units_in_state: dict[AccountState, int] = dict.fromkeys(AccountState, 0)
        self._watchers: dict[str, set[RiskKey]] = {}  # price symbol -> units it can move

    # -- input -------------------------------------------------------------------------------

    def partition_of(self, key: RiskKey) -> int | None:
        """The input partition owning a risk unit held here (None: not held, or replay)."""
        account = self._held(key).get(key)
        return None if account is None else account.partition

    def transitions_of(self, key: RiskKey) -> int | None:
        account = self._held(key).get(key)
        return None if account is None else account.transitions

    def renumber(self, key: RiskKey, transitions: int) -> None:
        account = self._held(key).get(key)
        if account is not None:
            account.transitions = transitions
            self._dirty.add(key)

    def _held(self, key: RiskKey) -> dict[Any, Account]:  # keyed by str or UnitKey
        return self.units if isinstance(key, UnitKey) else self.accounts

    def _in_state(self, key: RiskKey) -> dict[AccountState, int]:
        return self.units_in_state if isinstance(key, UnitKey) else self.accounts_in_state

    def apply(self, record: InputRecord, source: Source) -> list[Event]:
        """Apply one valid record; events come back in ascending account-id order."""
        if isinstance(record, PriceTick):
            return self._apply_tick(record, source)
        if isinstance(record, Fill):
            return self._apply_fill(record, source)
        return self._apply_ledger(record, source)

    def _apply_tick(self, tick: PriceTick, source: Source) -> list[Event]:
        if not self._fresh_tick(tick):
            return []
        symbol = tick.symbol
        self.prices[symbol] = tick.price
        events = []
        guarded = self._caught_up_from
        for key in self.accounts_moved_by(symbol):
            if guarded and self._already_reflected(key, source):
                continue
            event = self._evaluate(key, tick.ts, "price", symbol, source)
            if event is not None:
                events.append(event)
        events.sort(key=Event.order)
        return events

    def _apply_fill(self, fill: Fill, source: Source) -> list[Event]:
        if self._duplicate_fill(fill, source):
            return []
        key = self._fill_key(fill)
        if self._caught_up_from and self._already_reflected(key, source):
            self._record_fill(fill, source)
            return []
        # SPEC §4.1: the position is held in one mode until it is closed.
        other = (self.accounts.get(fill.account) if isinstance(key, UnitKey)
                 else self.units.get(UnitKey(fill.account, fill.symbol)))
        if other is not None and fill.symbol in other.positions:
            raise self._mode_conflict(fill)
        self._record_fill(fill, source)
        account = self._account(key, source.partition)
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
        return self._after_account_change(key, account, fill.ts, "fill", fill.fill_id, source)

    def _apply_ledger(self, entry: LedgerEntry, source: Source) -> list[Event]:
        if not self._first_time(source, entry.account, entry.entry_id):
            self.stats.duplicates += 1
            return []
        moves: list[tuple[RiskKey, float]] = [(entry.account, entry.amount)]
        if entry.kind == ISOLATED_MARGIN:  # SPEC §4.1: cross balance → isolated wallet
            assert entry.symbol is not None
            moves = [(entry.account, -entry.amount),
                     (UnitKey(entry.account, entry.symbol), entry.amount)]
        events: list[Event] = []
        applied = False
        for key, amount in moves:
            if self._caught_up_from and self._already_reflected(key, source):
                continue
            account = self._account(key, source.partition)
            self._set_balance(account, entry.asset,
                              account.balances.get(entry.asset, 0.0) + amount)
            applied = True
            events += self._after_account_change(key, account, entry.ts, "ledger",
                                                 entry.entry_id, source)
        self.stats.applied_ledger += applied
        return events

    def accounts_moved_by(self, symbol: str) -> frozenset[RiskKey] | set[RiskKey]:
        """Risk units a tick on this symbol can move (SPEC §6, §4.1): a position marked by it
        or settling in an asset priced by it, or a non-zero balance in an asset priced by it."""
        return self._watchers.get(symbol, frozenset())

    # -- bookkeeping -------------------------------------------------------------------------

    def _account(self, key: RiskKey, partition: int | None) -> Account:
        held = self._held(key)
        account = held.get(key)
        if account is None:
            account = held[key] = Account(partition=partition)
            self._in_state(key)[AccountState.HEALTHY] += 1
        return account

    @staticmethod
    def _set_balance(account: Account, asset: str, balance: float) -> None:
        if balance == 0:
            account.balances.pop(asset, None)
        else:
            account.balances[asset] = balance

    def _after_account_change(self, key: RiskKey, account: Account, ts: int, kind: str,
                              ref: str, source: Source) -> list[Event]:
        self._dirty.add(key)
        self._rewatch(key, account)
        event = self._evaluate(key, ts, kind, ref, source)
        if account.is_blank():
            self._forgot(key, account.partition)
            del self._held(key)[key]
            self._in_state(key)[AccountState.HEALTHY] -= 1  # blank implies never left it
        return [event] if event is not None else []

    def _rewatch(self, account_id: RiskKey, account: Account) -> None:
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

    def _evaluate(self, key: RiskKey, ts: int, kind: str, ref: str,
                  source: Source) -> Event | None:
        unit = key if isinstance(key, UnitKey) else None
        account = self.accounts[key] if unit is None else self.units[unit]  # type: ignore[index]
        valuation = value_account(account.balances, account.positions, self.config, self.prices,
                                  isolated=unit is not None)
        if valuation is None:
            self.stats.unevaluated += 1
            return None
        new_state = next_state(account.state, valuation.ratio, self.config.thresholds)
        if new_state == account.state:
            return None
        account.transitions += 1
        self._dirty.add(key)
        event = build_event(
            account=key if unit is None else unit.account,  # type: ignore[arg-type]
            transition=account.transitions,
            previous=account.state,
            state=new_state,
            valuation=valuation,
            balances=account.balances,
            positions=account.positions,
            config=self.config,
            prices=self.prices,
            price_ts=self.price_ts,
            ts=ts,
            trigger_kind=kind,
            trigger_ref=ref,
            source=source,
            isolated=None if unit is None else unit.symbol,
        )
        in_state = self._in_state(key)
        in_state[account.state] -= 1
        in_state[new_state] += 1
        account.state = new_state
        return event

    # -- durability: what a checkpoint saves and a restore loads --------------------------------

    def price_table(self) -> dict[str, tuple[float, int]]:
        return {symbol: (price, self.price_ts[symbol]) for symbol, price in self.prices.items()}

    def load_prices(self, table: dict[str, tuple[float, int]]) -> None:
        self.prices = {symbol: price for symbol, (price, _) in table.items()}
        self.price_ts = {symbol: ts for symbol, (_, ts) in table.items()}

    def index_restored(self) -> int:
        """`Engine.index_restored`: nothing to file here, as this engine re-values every
        account a record can move (the service calls it after a restore)."""
        return 0

    def load_account(self, key: RiskKey, account: Account,
                     caught_up_from: dict[tuple[str, int | None], int] | None = None) -> None:
        """Install a restored account, or isolated position (``key`` a `UnitKey`).
        ``caught_up_from`` marks a snapshot that already reflects inputs about to be
        re-read: records before those offsets skip it."""
        held = self._held(key)
        previous = held.get(key)
        if previous is not None:
            self._forget(key, previous)
        account.watched = frozenset()
        held[key] = account
        self._in_state(key)[account.state] += 1
        self.positions_held += len(account.positions)
        self._rewatch(key, account)
        if caught_up_from:
            self._mark({key: caught_up_from})
        else:
            self._caught_up_from.pop(key, None)

    def load_accounts(self, snapshots: Snapshots,
                      caught_up_from: Mapping[RiskKey, Offsets] | None = None) -> None:
        """`load_account` for each of the snapshots."""
        marks = caught_up_from or {}
        for key, account, _, _ in snapshots.accounts():
            self.load_account(key, account, marks.get(key))

    def snapshots(self, keys: Sequence[RiskKey], rows: np.ndarray | None = None) -> Snapshots:
        """Those of these accounts and isolated positions held here, in the keys' order, as
        checkpoint columns (no rows here: ``rows`` is `Engine.snapshots`' hint)."""
        return Snapshots.from_accounts(
            [(key, self._held(key)[key], 0, {}) for key in keys if key in self._held(key)],
            names=[*self.config.assets, *self.config.instruments])

    def _of_partition(self, partition: int | None) -> list[RiskKey]:
        held: list[RiskKey] = [a for a, account in self.accounts.items()
                               if account.partition == partition]
        return held + [u for u, account in self.units.items() if account.partition == partition]

    def mark_partition_dirty(self, partition: int) -> int:
        """`Engine.mark_partition_dirty`."""
        held = self._of_partition(partition)
        self._dirty.update(held)
        return len(held)

    def drop_partition(self, partition: int | None) -> int:
        """Forget every account and isolated position of an input partition (it was handed
        to another instance); returns how many risk units that was."""
        gone = self._of_partition(partition)
        for key in gone:
            self._forget(key, self._held(key)[key])
            self._dirty.discard(key)
        self._unmark_forgotten(partition)
        return len(gone)

    def _forget(self, key: RiskKey, account: Account) -> None:
        for symbol in account.watched:
            holders = self._watchers[symbol]
            holders.discard(key)
            if not holders:
                del self._watchers[symbol]
        self._in_state(key)[account.state] -= 1
        self.positions_held -= len(account.positions)
        self._caught_up_from.pop(key, None)
        del self._held(key)[key]

