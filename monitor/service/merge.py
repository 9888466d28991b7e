"""Event-time ordering across input partitions.

Kafka orders records only within a partition. Left to fetch order, the interleaving of prices,
fills and ledger differs from run to run, and after a restart the re-read backlog would be
applied in a different order than the first time, giving different events. Like Kafka
Streams' timestamp synchronisation, the merge releases buffered records in order of their
Kafka timestamp, and holds back while a partition that may still hold earlier records has
nothing buffered — unless it is caught up (read to its high watermark) or has kept everyone
waiting for longer than ``max_idle`` seconds.
"""

from __future__ import annotations

import heapq
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from aiokafka import TopicPartition

Record = Any  # aiokafka ConsumerRecord: .timestamp, .offset, .key, .value


class TimestampMerge:
    def __init__(self, rank: Callable[[str], int], max_idle: float = 0.5) -> None:
        self._rank = rank  # tie-break between topics at equal timestamps
        self._buffers: dict[TopicPartition, deque[Record]] = {}
        self.fetched_to: dict[TopicPartition, int] = {}  # next offset not yet buffered
        self.max_idle = max_idle
        self._blocked_since: float | None = None

    def add(self, tp: TopicPartition, records: Sequence[Record]) -> None:
        if not records:
            return
        self._buffers.setdefault(tp, deque()).extend(records)
        self.fetched_to[tp] = records[-1].offset + 1

    def seek(self, tp: TopicPartition, offset: int) -> None:
        """The consumer was moved: forget what was buffered for this partition."""
        self._buffers.pop(tp, None)
        self.fetched_to[tp] = offset

    def drop(self, tps: Iterable[TopicPartition]) -> None:
        for tp in tps:
            self._buffers.pop(tp, None)
            self.fetched_to.pop(tp, None)

    def buffered(self) -> int:
        return sum(len(buffer) for buffer in self._buffers.values())

    def take(self, limit: int, partitions: Iterable[TopicPartition],
             caught_up: Callable[[TopicPartition, int], bool]) -> list[tuple[TopicPartition,
                                                                              Record]]:
        """Up to ``limit`` records in (timestamp, topic rank, partition, offset) order.

        ``partitions`` are those that may deliver records; ``caught_up(tp, next_offset)`` says
        whether a partition with nothing buffered has been read to its end.
        """
        waiting = [tp for tp in partitions
                   if not self._buffers.get(tp) and not caught_up(tp, self.fetched_to.get(tp, 0))]
        if waiting and not self._waited_enough():
            return []
        heap = [(buffer[0].timestamp, self._rank(tp.topic), tp.partition, buffer[0].offset, tp)
                for tp, buffer in self._buffers.items() if buffer]
        heapq.heapify(heap)
        out: list[tuple[TopicPartition, Record]] = []
        while heap and len(out) < limit:
            *_, tp = heapq.heappop(heap)
            buffer = self._buffers[tp]
            out.append((tp, buffer.popleft()))
            if buffer:
                head = buffer[0]
                heapq.heappush(heap, (head.timestamp, self._rank(tp.topic), tp.partition,
                                      head.offset, tp))
            elif not caught_up(tp, self.fetched_to[tp]) and not self._waited_enough():
                break  # this partition may hold earlier records than the other heads
        if out:
            self._blocked_since = None
        return out

    def _waited_enough(self) -> bool:
        now = time.monotonic()
        if self._blocked_since is None:
            self._blocked_since = now
            return self.max_idle <= 0
        return now - self._blocked_since >= self.max_idle
