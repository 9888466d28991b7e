"""Fills and ledger entries keyed other than by their account (SPEC §2 keys both by account).

The key decides the partition, and the partition decides which instance of a group holds the
account. Records of one account keyed two ways (by fill id, or with no key, which producers
spread over partitions) can land on partitions that different instances own, each holding a
part of the account: one sees a position without the deposit that backs it. liqmon applies
such records as they come (with one instance the result is the same), and makes them visible.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

from aiokafka import ConsumerRecord, TopicPartition
from prometheus_client import Counter
from structlog.stdlib import BoundLogger

LOG_INTERVAL = 30.0  # seconds between "keyed other than by their account" log lines
SHOWN_KEY_CHARS = 100  # of a key quoted in the log


class MiskeyedInputs:
    """Counts the fills and ledger entries whose Kafka key is not their account's id in
    UTF-8 (`liqmon_records_miskeyed_total{topic}`), and says so in the log with one example:
    at once the first time, then at most once every `LOG_INTERVAL` seconds (a producer that
    keys wrongly does so for every record)."""

    def __init__(self, counter: Counter, log: BoundLogger,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._counter = counter
        self._log = log
        self._clock = clock
        self._uncounted: dict[str, int] = {}
        self._unlogged: dict[str, int] = {}
        self._example: dict[str, object] | None = None
        self._logged_at = -math.inf

    def saw(self, tp: TopicPartition, message: ConsumerRecord, account: str) -> None:
        """Note a record whose key is not ``account`` in UTF-8, or that has no key. The
        caller compares, inline: a call for every record would cost ~1 % end to end."""
        self._uncounted[tp.topic] = self._uncounted.get(tp.topic, 0) + 1
        if self._example is None:
            key = message.key
            self._example = {
                "topic": tp.topic, "partition": tp.partition, "offset": message.offset,
                "key": None if key is None else key[:SHOWN_KEY_CHARS].decode("utf-8", "replace"),
                "account": account}

    def report(self) -> None:
        """Count what `saw` noted since the last report (once per batch: a counter's
        increment costs more than the check) and log it when the last line is old enough."""
        if not self._uncounted:
            return
        for topic, count in self._uncounted.items():
            self._counter.labels(topic).inc(count)
            self._unlogged[topic] = self._unlogged.get(topic, 0) + count
        self._uncounted.clear()
        now = self._clock()
        if now - self._logged_at < LOG_INTERVAL:
            return
        self._log.warning("input records keyed other than by their account: with more than "
                          "one instance, their accounts can be split between instances",
                          records=sum(self._unlogged.values()), by_topic=self._unlogged,
                          example=self._example)
        self._unlogged, self._example, self._logged_at = {}, None, now
