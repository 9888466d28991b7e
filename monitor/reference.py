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

from monitor.account import Account
from monitor.config import RiskConfig
from monitor.engine import DEFAULT_DEDUPE_WINDOW, InputLedger
from monitor.events import Event, Source, build_event
from monitor.margin import apply_fill_to_position, value_account
from monitor.records import Fill, InputRecord, LedgerEntry, PriceTick
from monitor.snapshot import Offsets, Snapshots
from monitor.state import AccountState, next_state


class ReferenceEngine(InputLedger):
    def __init__(self, config: RiskConfig, dedupe_window: int = DEFAULT_DEDUPE_WINDOW) -> None:
        super().__init__(config, dedupe_window)
        self.config = config
        self.prices: dict[str, float] = {}
        self.accounts: dict[str, Account] = {}
        self.positions_held = 0
        self.accounts_in_state: dict[AccountState, int] = dict.fromkeys(AccountState, 0)
        self._watchers: dict[str, set[str]] = {}  # price symbol -> accounts it can move

    # -- input -------------------------------------------------------------------------------

    def partition_of(self, account_id: str) -> int | None:
        """The input partition owning an account held here (None: not held, or replay)."""
        account = self.accounts.get(account_id)
        return None if account is None else account.partition

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
            price_ts=self.price_ts,
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

    def load_accounts(self, snapshots: Snapshots,
                      caught_up_from: Mapping[str, Offsets] | None = None) -> None:
        """`load_account` for each of the snapshots."""
        marks = caught_up_from or {}
        for account_id, account, _, _ in snapshots.accounts():
            self.load_account(account_id, account, marks.get(account_id))

    def snapshots(self, account_ids: Sequence[str]) -> Snapshots:
        """Held accounts as checkpoint columns."""
        return Snapshots.from_accounts(
            [(account_id, self.accounts[account_id], 0, {}) for account_id in account_ids],
            names=[*self.config.assets, *self.config.instruments])

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

