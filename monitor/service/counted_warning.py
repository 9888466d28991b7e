"""Records of a kind worth a warning, counted by topic and said at most every 30 s."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from typing import Any

from prometheus_client import Counter
from structlog.stdlib import BoundLogger

LOG_INTERVAL = 30.0  # seconds between two lines of one kind


class CountedWarning:
    """Per-topic totals that only grow (the merge's late and stamped-ahead records, the
    miskeyed inputs, the events the producer sends again), turned into a counter's increments
    (``counter`` labelled by topic; None: the caller counts them its own way) and a warning
    that says how many came since the last one: at once the first time, then at most once
    every `LOG_INTERVAL` seconds (a producer at fault is at fault for every record)."""

    def __init__(self, counter: Counter | None, log: BoundLogger, message: str,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._counter = counter
        self._log = log
        self._message = message
        self._clock = clock
        self._counted: dict[str, int] = {}
        self._logged: dict[str, int] = {}
        self._logged_at = -math.inf

    def report(self, totals: Mapping[str, int], details: Callable[[], dict[str, Any]]) -> bool:
        """Count what ``totals`` gained since the last call; log it, with ``details()``, if the
        last line is old enough. Whether it logged (the caller then clears its maxima)."""
        for topic, count in totals.items():
            counted = self._counted.get(topic, 0)
            if count > counted:
                if self._counter is not None:
                    self._counter.labels(topic).inc(count - counted)
                self._counted[topic] = count
        unlogged = {topic: count - self._logged.get(topic, 0) for topic, count in totals.items()
                    if count > self._logged.get(topic, 0)}
        now = self._clock()
        if not unlogged or now - self._logged_at < LOG_INTERVAL:
            return False
        self._log.warning(self._message, records=sum(unlogged.values()), by_topic=unlogged,
                          **details())
        self._logged, self._logged_at = dict(totals), now
        return True
