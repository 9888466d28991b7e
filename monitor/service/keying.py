"""Fills and ledger entries keyed other than by their account (SPEC §2 keys both by account).

The key decides the partition, and the partition decides which instance of a group holds the
account. Records of one account keyed two ways (by fill id, or with no key, which producers
spread over partitions) can land on partitions that different instances own, each holding a
part of the account: one sees a position without the deposit that backs it. liqmon applies
such records as they come (with one instance the result is the same), and makes them visible.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from aiokafka import ConsumerRecord, TopicPartition
from prometheus_client import Counter
from structlog.stdlib import BoundLogger

from monitor.service.counted_warning import CountedWarning

SHOWN_KEY_CHARS = 100  # of a key quoted in the log


class MiskeyedInputs:
    """Counts the fills and ledger entries whose Kafka key is not their account's id in
    UTF-8 (`liqmon_records_miskeyed_total{topic}`), and says so in the log with one example
    (`CountedWarning`: at once the first time, then at most once every 30 seconds; a producer
    that keys wrongly does so for every record)."""

    def __init__(self, counter: Counter, log: BoundLogger,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._warning = CountedWarning(
            counter, log, "input records keyed other than by their account: with more than "
            "one instance, their accounts can be split between instances", clock)
        self._totals: dict[str, int] = {}
        self._noted = False  # since the last report
        self._example: dict[str, object] | None = None

    def saw(self, tp: TopicPartition, message: ConsumerRecord, account: str) -> None:
        """Note a record whose key is not ``account`` in UTF-8, or that has no key. The
        caller compares, inline: a call for every record would cost ~1 % end to end."""
        self._totals[tp.topic] = self._totals.get(tp.topic, 0) + 1
        self._noted = True
        if self._example is None:
            key = message.key
            self._example = {
                "topic": tp.topic, "partition": tp.partition, "offset": message.offset,
                "key": None if key is None else key[:SHOWN_KEY_CHARS].decode("utf-8", "replace"),
                "account": account}

    def report(self) -> None:
        """Count what `saw` noted since the last report (once per batch: a counter's
        increment costs more than the check) and log it when the last line is old enough."""
        if not self._noted:
            return
        self._noted = False
        if self._warning.report(self._totals, lambda: {"example": self._example}):
            self._example = None
