"""Every record the input topics hold, in the order the service applies them, for `liqmon
replay --bootstrap`: an audit of what the fleet computed, from the records themselves.

The order is SPEC §6's: (Kafka timestamp, topic rank ledger < fills < prices, partition,
offset) over every partition of the three topics, each read from its first offset to its end
as of the start (records appended later are not read, so a replay is one fixed set of
records). Read without joining a consumer group, and without creating a missing topic: some
brokers (the embedded one among them) create a topic a metadata request names.

Memory stays bounded however long the topics are: records are sorted in memory
``SORTED_IN_MEMORY`` at a time, each such run written to an unnamed temporary file, and the
runs merged as they are read back (`SortedRecords`, an external merge sort).

For `--check`, the event topics are read the same way, and what the fleet published is
compared with the replay's events as it is read (`replay.EventComparison`).
"""

from __future__ import annotations

import heapq
import struct
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack, closing
from dataclasses import dataclass, field
from typing import IO

from aiokafka import TopicPartition

from monitor.engine import Engine
from monitor.events import Source
from monitor.records import Rejected
from monitor.replay import EventCheck, EventComparison, EventSink, ReplaySummary, replay_inputs
from monitor.service.log_reader import (
    RecordBatch,
    TopicsNotFound,
    bounds,
    read_range,
    reading_client,
)
from monitor.service.probe import topics_present
from monitor.service.security import PLAINTEXT, KafkaSecurity
from monitor.service.settings import DEFAULT_MAX_FUTURE, Topics


@dataclass(frozen=True, slots=True)
class InputMessage:
    """One input record as read: its merge key's parts, the topic's kind and its value."""

    timestamp: int
    rank: int
    partition: int
    offset: int
    topic: str
    kind: str  # prices / fills / ledger
    value: bytes | None


def _order(m: InputMessage) -> tuple[int, int, int, int]:
    return m.timestamp, m.rank, m.partition, m.offset


SORTED_IN_MEMORY = 500_000  # records held at most before a sorted run goes to disk
_RUN_BUFFER = 1 << 16  # bytes read ahead from each run while merging
# a record in a run: timestamp, rank, partition, offset, value length (-1: none), the value
_HEAD = struct.Struct("<qBiqi")


@dataclass
class SortedRecords:
    """Records taken in any order, given back in the order the service applies them, with
    at most ``in_memory`` of them held: each time that many are held, they are sorted and
    written to an unnamed temporary file (in $TMPDIR, gone when closed or when the process
    ends), ~30 bytes a record beyond its value; `sorted` merges those runs as it reads them
    back. ``names`` is each rank's (topic, kind), which a run does not store."""

    names: dict[int, tuple[str, str]]
    in_memory: int = SORTED_IN_MEMORY
    count: int = 0
    held: list[InputMessage] = field(default_factory=list)
    runs: list[IO[bytes]] = field(default_factory=list)

    def extend(self, messages: Iterable[InputMessage]) -> None:
        before = len(self.held)
        self.held.extend(messages)
        self.count += len(self.held) - before
        if len(self.held) >= self.in_memory:
            self._spill()

    def _spill(self) -> None:
        self.held.sort(key=_order)
        run = tempfile.TemporaryFile(buffering=_RUN_BUFFER)  # noqa: SIM115 (see close)
        self.runs.append(run)
        pack, write = _HEAD.pack, run.write
        for m in self.held:
            value = m.value
            write(pack(m.timestamp, m.rank, m.partition, m.offset,
                       -1 if value is None else len(value)))
            if value:
                write(value)
        self.held = []

    def sorted(self) -> Iterator[InputMessage]:
        """Every record, in order: read once (the runs are read from their starts)."""
        self.held.sort(key=_order)
        if not self.runs:
            yield from self.held
            return
        for run in self.runs:
            run.seek(0)
        yield from heapq.merge(*map(self._read, self.runs), self.held, key=_order)

    def _read(self, run: IO[bytes]) -> Iterator[InputMessage]:
        size, unpack, names = _HEAD.size, _HEAD.unpack, self.names
        while head := run.read(size):
            timestamp, rank, partition, offset, length = unpack(head)
            topic, kind = names[rank]
            yield InputMessage(timestamp, rank, partition, offset, topic, kind,
                               None if length < 0 else run.read(length))

    def close(self) -> None:
        for run in self.runs:
            run.close()
        self.runs, self.held = [], []


@dataclass
class InputHistory:
    """The records of every input partition, in the order the service applies them, and the
    offsets each partition was read between (first, end). Closed once replayed."""

    records: SortedRecords
    ranges: dict[TopicPartition, tuple[int, int]]

    def inputs(self) -> Iterator[tuple[Source, str, bytes | None, int]]:
        """What `replay.replay_inputs` takes: each record's source, its topic's kind, its
        value, its Kafka timestamp."""
        for m in self.records.sorted():
            yield Source(m.topic, m.partition, m.offset), m.kind, m.value, m.timestamp

    def close(self) -> None:
        self.records.close()

    def summary(self) -> str:
        """One line: what was read, and which partitions no longer start at offset 0 (their
        earliest records are gone: deleted by retention, or the topic re-created), which the
        fleet may have applied and this read cannot."""
        per_topic: dict[str, int] = {}
        for tp in self.ranges:
            per_topic[tp.topic] = per_topic.get(tp.topic, 0) + 1
        parts = ", ".join(f"{topic} ({count} partition{'s' if count > 1 else ''})"
                          for topic, count in per_topic.items())
        line = (f"read {self.records.count:,} records of {parts} up to their ends at the "
                "start")
        later = sorted((tp.topic, tp.partition, start) for tp, (start, _) in self.ranges.items()
                       if start > 0)
        if later:
            line += ("; the earliest records of " + ", ".join(
                f"{topic}/{partition} (before offset {start:,})"
                for topic, partition, start in later)
                + " are gone from Kafka: what they did is missing from this replay")
        return line


async def read_input_history(bootstrap: str, topics: Topics,
                             security: KafkaSecurity = PLAINTEXT,
                             request_timeout_ms: int = 30_000,
                             in_memory: int = SORTED_IN_MEMORY) -> InputHistory:
    """Read every input partition from its first offset to its end as of now, and order the
    records as the service's merge does (holding at most ``in_memory`` of them at a time:
    `SortedRecords`). The caller closes the history."""
    kinds = topics.input_kinds()
    ranks = topics.input_ranks()
    records = SortedRecords({ranks[topic]: (topic, kind) for topic, kind in kinds.items()},
                            in_memory)

    def take(tp: TopicPartition, batch: RecordBatch) -> None:
        topic, partition = tp.topic, tp.partition
        kind, rank = kinds[topic], ranks[topic]
        records.extend(InputMessage(record.timestamp, rank, partition, record.offset, topic,
                                    kind, record.value)
                       for record in batch.records())

    try:
        ranges = await _read_whole(bootstrap, list(kinds), take, security, request_timeout_ms,
                                   "--topic-prices, --topic-fills, --topic-ledger")
    except BaseException:
        records.close()
        raise
    return InputHistory(records, ranges)


async def read_published_events(bootstrap: str, topics: Topics,
                                security: KafkaSecurity = PLAINTEXT,
                                request_timeout_ms: int = 30_000) -> list[bytes | None]:
    """The value of every record of the event topics (margin calls, liquidations), up to
    their ends as of now: what the fleet has published, repeats included."""
    values: list[bytes | None] = []
    await _read_published(bootstrap, topics, values.extend, security, request_timeout_ms)
    return values


async def _read_published(bootstrap: str, topics: Topics,
                          add: Callable[[Iterable[bytes | None]], None],
                          security: KafkaSecurity, request_timeout_ms: int) -> None:
    """Hand the values of every record of the event topics to ``add``, a batch at a time."""

    def take(tp: TopicPartition, batch: RecordBatch) -> None:
        add(record.value for record in batch.records())

    await _read_whole(bootstrap, [topics.margin_calls, topics.liquidations], take, security,
                      request_timeout_ms, "--topic-margin-calls, --topic-liquidations")


async def _read_whole(bootstrap: str, names: list[str],
                      take: Callable[[TopicPartition, RecordBatch], None],
                      security: KafkaSecurity, request_timeout_ms: int,
                      flags: str) -> dict[TopicPartition, tuple[int, int]]:
    """Hand every record of these topics' partitions, from the first offset to the end as of
    now, to ``take``; the offsets each was read between. A missing topic is an error, and is
    not created by asking for it."""
    async with reading_client(bootstrap, "liqmon-replay", request_timeout_ms,
                              security) as client:
        present = await topics_present(client, names)
        missing = [name for name in names if name not in present]
        if missing:
            raise TopicsNotFound(missing, flags)
        await client.set_topics(names)
        wanted = [TopicPartition(name, partition) for name in names
                  for partition in sorted(client.cluster.partitions_for_topic(name) or ())]
        ranges = await bounds(client, wanted, request_timeout_ms / 1000)
        await read_range(client, ranges, take, request_timeout_ms / 1000)
    return ranges


async def replay_topics(bootstrap: str, topics: Topics, engine: Engine, out: EventSink,
                        report_rejection: Callable[[Source, Rejected], None],
                        security: KafkaSecurity = PLAINTEXT,
                        max_future: float = DEFAULT_MAX_FUTURE
                        ) -> tuple[InputHistory, ReplaySummary]:
    """`liqmon replay --bootstrap`: read the input topics (`read_input_history`) and replay
    them into ``engine``, its events onto ``out``, refusing what the service refuses with
    `--max-future` ``max_future`` (seconds)."""
    history = await read_input_history(bootstrap, topics, security)
    try:
        return history, replay_inputs(history.inputs(), engine, out, report_rejection,
                                      int(max_future * 1000))
    finally:
        history.close()


async def check_published(bootstrap: str, topics: Topics, replayed: Iterable[bytes],
                          security: KafkaSecurity = PLAINTEXT,
                          request_timeout_ms: int = 30_000) -> EventCheck:
    """`liqmon replay --bootstrap --check`: the events published against those a replay of
    the topics wrote (``replayed``, JSON lines), compared as they are read
    (`replay.EventComparison`: memory bounded)."""
    with closing(EventComparison()) as comparison:
        comparison.add_replayed(replayed)
        await _read_published(bootstrap, topics, comparison.add_published, security,
                              request_timeout_ms)
        return comparison.result()


async def check_topics(bootstrap: str, topics: Topics, engine: Engine,
                       report_rejection: Callable[[Source, Rejected], None] = lambda s, r: None,
                       events: IO[bytes] | None = None) -> EventCheck:
    """What `liqmon replay --bootstrap --check` says of the topics: the input topics replayed
    into ``engine`` (`replay_topics`), its events written to ``events`` (a temporary file if
    none is given) and compared with those published (`check_published`)."""
    with ExitStack() as stack:
        if events is None:
            events = stack.enter_context(tempfile.TemporaryFile())
        await replay_topics(bootstrap, topics, engine, events, report_rejection)
        events.seek(0)
        return await check_published(bootstrap, topics, events)
