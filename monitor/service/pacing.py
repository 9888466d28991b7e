"""How many records one turn of the event loop applies.

The loop applies a batch without yielding, and the consumer group's heartbeats, the health
endpoints and the merge's probes wait for it. A batch's cost per record is not steady: after
a restore, until the inputs pass what the restored snapshots reflect, every tick re-values
each holder of its symbol, ~1,000 times the usual cost, and 5,000 such ticks held the loop
for 55 s, past the session timeout: the group dropped the instance, the restore was lost,
and the fleet went round in rebalances while the backlog lasted. So a turn takes as many
records as its budget allows at the cost just seen, and the first turns after a restore
begins or ends only a few.
"""

from __future__ import annotations

TURN_BUDGET = 0.2  # seconds of applying per turn: far below any session timeout
# The first turns after a restore: the cost jumps before any batch has shown it, and a first
# turn of 5,000 such ticks still held the loop 3-8 s. 64 of them take ~0.6 s at worst.
CAREFUL_LIMIT = 64


class TurnPacer:
    """The records the next turn takes (``limit``), from what the last ones cost: cut to
    fit the budget when a batch overran it, doubled (up to ``most``) when a full batch
    fitted."""

    def __init__(self, most: int, budget: float = TURN_BUDGET) -> None:
        self.most = most
        self.budget = budget
        self.limit = most

    def careful(self) -> None:
        """A restore begins or ends: records may cost far more than the last ones did, so
        start again from a few and let `took` double back."""
        self.limit = min(self.limit, CAREFUL_LIMIT)

    def took(self, records: int, seconds: float) -> None:
        """A batch of ``records`` was applied in ``seconds``."""
        if records <= 0:
            return
        if seconds > self.budget:
            self.limit = max(1, int(records * self.budget / seconds))
        elif records >= self.limit:
            self.limit = min(self.most, self.limit * 2)
