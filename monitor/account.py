"""One account's state as the engines and the checkpoint see it (SPEC §5).

A module of its own, importing nothing of the engine or the book, so that the book can build
accounts, and snapshot and changelog code can read them, without an import cycle.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from monitor.margin import Position
from monitor.state import AccountState


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
