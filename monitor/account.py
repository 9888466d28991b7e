"""One account's state as the engines and the checkpoint see it (SPEC §5).

A module of its own, importing nothing of the engine or the book, so that the book can build
accounts, and snapshot and changelog code can read them, without an import cycle.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

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


class UnitKey(NamedTuple):
    """An isolated position (SPEC §4.1): a risk unit of its own, held apart from its account's
    cross margin. A tuple never equals an account id, so the two cannot collide in any index
    (an account id may itself contain "/")."""

    account: str
    symbol: str

    def label(self) -> str:
        """The unit's name in event ids and reports: `account/symbol`."""
        return f"{self.account}/{self.symbol}"


# What the engines keep state for: an account (its cross margin) or an isolated position.
RiskKey = str | UnitKey


def account_of(key: RiskKey) -> str:
    """The account a risk unit belongs to (its Kafka key and input partition)."""
    return key.account if isinstance(key, UnitKey) else key
