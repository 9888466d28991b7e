"""Where this instance stands in its inputs: one object, shared by the loop, the restorer and
the checkpointer (each given it explicitly), so that no one of them reaches into another."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from aiokafka import ConsumerRecord, TopicPartition

from monitor.service.merge import TimestampMerge
from monitor.service.metrics import Metrics
from monitor.service.settings import Topics
from monitor.snapshot import Offsets

MergeKey = tuple[int, int, int, int]  # (timestamp, topic rank, partition, offset)


class Positions:
    """The input partitions this instance holds and how far it has got in each.

    - ``owned``: the account partitions (of fills and ledger) restored and being processed;
    - ``processed``: per input partition held, the next offset to apply;
    - ``delivered``: per input partition held, the next offset whose events are all
      acknowledged (behind ``processed``: the pipeline acknowledges behind the loop);
    - ``merge``: the time-ordered merge of every input partition held, which the loop takes
      records from;
    - ``frontier``: the merge key of the last record the loop applied.

    The loop advances them, a restore seeks them, a hand-over drops them, and a checkpoint
    reads them.
    """

    def __init__(self, topics: Topics, max_skew_ms: int, max_wait: float, max_stall: float,
                 metrics: Metrics) -> None:
        self.topics = topics
        self.metrics = metrics
        self.rank: Callable[[str], int] = topics.input_ranks().__getitem__
        self.merge = TimestampMerge(rank=self.rank, max_skew_ms=max_skew_ms, max_wait=max_wait,
                                    max_stall=max_stall,
                                    co_partitioned=(topics.fills, topics.ledger))
        self.owned: set[int] = set()  # account partitions restored and being processed
        self.processed: dict[TopicPartition, int] = {}  # next offset to apply, per partition
        self.delivered: dict[TopicPartition, int] = {}  # next offset whose events are acked
        self.frontier: MergeKey | None = None  # merge key last applied
        self.seeks = 0  # seeks and hand-overs so far
        self._sought: dict[TopicPartition, int] = {}  # the count at each one's latest

    def key(self, tp: TopicPartition, record: ConsumerRecord) -> MergeKey:
        """The time-ordered merge's sort key of a record."""
        return (record.timestamp, self.rank(tp.topic), tp.partition, record.offset)

    def seek(self, tp: TopicPartition, offset: int) -> None:
        """The partition's consumer was positioned at ``offset``: nothing before it is
        pending, nothing buffered for it stands."""
        self._count_seek([tp])
        self.processed[tp] = offset
        self.delivered[tp] = offset
        self.merge.seek(tp, offset)
        self.metrics.input_offset.labels(tp.topic, str(tp.partition)).set(offset)

    def mark_delivered(self, offsets: dict[TopicPartition, int]) -> None:
        """The events of the inputs before these offsets are acknowledged (the pipeline's
        report)."""
        for tp, offset in offsets.items():
            if tp in self.delivered:  # not handed over meanwhile
                self.delivered[tp] = offset

    def drop(self, tps: Iterable[TopicPartition]) -> None:
        """Partitions handed over to another instance."""
        tps = list(tps)
        self._count_seek(tps)
        self.merge.drop(tps)
        for tp in tps:
            self.processed.pop(tp, None)
            self.delivered.pop(tp, None)

    def _count_seek(self, tps: list[TopicPartition]) -> None:
        self.seeks += 1
        for tp in tps:
            self._sought[tp] = self.seeks

    def sought_since(self, tp: TopicPartition, seeks: int) -> bool:
        """Was the partition sought or handed over after the seek count was ``seeks``? Then
        records of it fetched at that count come from the old position: a fetch completed
        before the seek may still be waiting to be handed to the merge."""
        return self._sought.get(tp, 0) > seeks

    def offsets(self) -> Offsets:
        """The next offset to apply per input partition, as checkpoints name partitions."""
        return {(tp.topic, tp.partition): offset for tp, offset in self.processed.items()}

    def prices(self) -> dict[TopicPartition, int]:
        """The next offset to apply per price partition."""
        prices = self.topics.prices
        return {tp: offset for tp, offset in self.processed.items() if tp.topic == prices}
