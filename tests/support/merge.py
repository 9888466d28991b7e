"""Setting up a time-ordered merge as the service does before it reads."""

from __future__ import annotations

import time

from aiokafka import TopicPartition

from monitor.service.merge import TimestampMerge


def positioned(merge: TimestampMerge, tp: TopicPartition, offset: int,
               at_ms: float | None = None) -> None:
    """The partition is positioned at ``offset`` at wall-clock ``at_ms`` (now if not given),
    and its consumer's first fetch from there, answered 1 ms later, finds nothing more."""
    at_ms = time.time() * 1000 if at_ms is None else at_ms
    merge.seek(tp, offset, at_ms=at_ms)
    merge.fetched(tp, [], offset, fetched_end=offset, fetched_end_at_ms=at_ms + 1)
