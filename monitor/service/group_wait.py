"""The time an instance spends waiting for its consumer group to hand out partitions.

From the moment it joins the group, or a rebalance takes its partitions back, until the group
hands out the next assignment, an instance applies nothing (the loop holds still, prices too).
A rebalance normally ends within a few seconds. One that does not leaves every account of the
group unmonitored, and nothing else shows it: no partition is restoring, no consumer lags
behind a partition it owns, the broker answers. Seen on the embedded broker: after a member
was killed mid-rebalance and another left, it kept naming the departed member as the leader of
every new generation, so no one ever received an assignment, and the instances sat silent
with /readyz 200.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

from structlog.stdlib import BoundLogger

WAIT_REPORT_INTERVAL = 30.0  # seconds of waiting before it is said, then between reminders


class AssignmentWait:
    """When the wait began (None: not waiting), for /readyz; a warning once it has lasted
    `WAIT_REPORT_INTERVAL`, repeated as long again, and a line when a wait that was reported
    ends."""

    def __init__(self, group: str, log: BoundLogger,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.group = group
        self._log = log
        self._clock = clock
        self.since: float | None = None
        self._said_at = -math.inf

    def began(self) -> None:
        """The instance joined, or a rebalance revoked its partitions (aiokafka revokes them
        all, at every rebalance). A rebalance begun while waiting continues the wait."""
        if self.since is None:
            self.since = self._clock()
            self._said_at = self.since

    def ended(self) -> None:
        """The group handed out an assignment (possibly empty: more instances than
        partitions)."""
        if self.since is None:
            return
        if self._said_at > self.since:
            self._log.info("partitions assigned by the consumer group", group=self.group,
                           waited_seconds=self._waited())
        self.since = None

    def check(self) -> None:
        """Say so if the wait has gone on long enough since it began or was last said."""
        if self.since is None:
            return
        now = self._clock()
        if now - self._said_at < WAIT_REPORT_INTERVAL:
            return
        self._said_at = now
        self._log.warning("no partitions from the consumer group: it is still rebalancing, "
                          "and nothing is applied meanwhile", group=self.group,
                          waited_seconds=self._waited())

    def describe(self) -> str:
        """Why /readyz says 503 while waiting."""
        return (f"waiting for consumer group {self.group} to assign partitions "
                f"({self._waited():.0f} s)")

    def _waited(self) -> float:
        return 0.0 if self.since is None else round(self._clock() - self.since, 1)
