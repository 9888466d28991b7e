"""Reading whole partitions from their start to their end as fast as the broker sends them, for
a restore (changelog.read_changelog).

A consumer sends a partition's next fetch only once the records of the last one have been
handed over, so a reader that parses and keeps a million records waits for every fetch in
full: about a second of a million-account restore. Here the next fetch goes out as soon as
a response's batch headers say where it ends, and the response's records are parsed while
the broker prepares the next one. Records are handed over as the client's record objects
(offset, key, value, headers), without a `ConsumerRecord` built for each.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable
from typing import Any

from aiokafka import TopicPartition
from aiokafka import errors as Errors
from aiokafka.client import AIOKafkaClient
from aiokafka.errors import KafkaError
from aiokafka.protocol.fetch import FetchRequest
from aiokafka.protocol.offset import OffsetRequest
from aiokafka.record.memory_records import MemoryRecords

Record = Any  # the client's record: .offset, .key, .value, .headers (a list of pairs)
READ_UNCOMMITTED = 0
EARLIEST, LATEST = -2, -1  # ListOffsets timestamps
FETCH_WAIT_MS = 20  # only a partition already read to its end can make a fetch wait
PARTITION_BYTES = 16 * 1024 * 1024
RETRY_BACKOFF = 0.1  # seconds, after a leader moved or metadata was stale


async def bounds(client: AIOKafkaClient, tps: list[TopicPartition], timeout: float = 30.0
                 ) -> dict[TopicPartition, tuple[int, int]]:
    """(first offset, end offset) of each partition, as of now."""
    await client.set_topics(sorted({tp.topic for tp in tps}))
    starts = await list_offsets(client, tps, EARLIEST, timeout)
    ends = await list_offsets(client, tps, LATEST, timeout)
    return {tp: (starts[tp], ends[tp]) for tp in tps}


async def read_range(client: AIOKafkaClient, ranges: dict[TopicPartition, tuple[int, int]],
                     take: Callable[[TopicPartition, list[Record]], None],
                     timeout: float = 30.0) -> None:
    """Hand every record of these partitions between their offsets (`bounds`) to ``take``,
    in offset order per partition, a batch at a time. Errors the broker may recover from (a
    leader moved, the broker unreachable for a while) are retried until no record has come
    for ``timeout`` seconds."""
    ends = {tp: end for tp, (_, end) in ranges.items()}
    positions = {tp: start for tp, (start, end) in ranges.items() if start < end}
    deadline: float | None = None
    while positions:
        before = dict(positions)
        retry: _Retry | None = None
        by_leader = _by_leader(client, list(positions))
        if sum(map(len, by_leader.values())) < len(positions):
            retry = _Retry("a partition's leader is unknown")
        else:
            # One pipeline per leader; when one fails the others are cancelled (at an await,
            # where `positions` matches what was handed over) before any is started again:
            # two pipelines reading one partition would hand its records over out of order.
            try:
                async with asyncio.TaskGroup() as pipelines:
                    for node, group in by_leader.items():
                        pipelines.create_task(_pipeline(
                            client, node, {tp: positions[tp] for tp in group}, ends,
                            positions, take))
            except BaseExceptionGroup as failed:
                retries = [e for e in failed.exceptions if isinstance(e, _Retry)]
                if len(retries) < len(failed.exceptions):  # one that no retry can mend
                    raise next(e for e in failed.exceptions
                               if not isinstance(e, _Retry)) from None
                retry = retries[0]
        if positions != before:
            deadline = None
        else:  # nothing came: an error, or an answer without records
            deadline = deadline or time.monotonic() + timeout
            if time.monotonic() > deadline:
                raise KafkaError(f"reading {sorted(positions)} failed: "
                                 f"{retry or 'no records returned'}")
            await asyncio.sleep(RETRY_BACKOFF)
        if retry is not None:
            with contextlib.suppress(KafkaError):
                await client.force_metadata_update()
                if retry.out_of_range:  # records removed from the start meanwhile: skip them
                    earliest = await list_offsets(client, list(positions), EARLIEST, timeout)
                    for tp, offset in earliest.items():
                        positions[tp] = max(positions[tp], offset)
        for tp in [tp for tp, position in positions.items() if position >= ends[tp]]:
            del positions[tp]


async def list_offsets(client: AIOKafkaClient, tps: list[TopicPartition], when: int,
                       timeout: float = 30.0) -> dict[TopicPartition, int]:
    """The first (EARLIEST) or the end (LATEST) offset of each partition."""
    found: dict[TopicPartition, int] = {}
    deadline = time.monotonic() + timeout
    while len(found) < len(tps):
        missing = [tp for tp in tps if tp not in found]
        for node, group in _by_leader(client, missing).items():
            by_topic: dict[str, list[tuple[int, int]]] = defaultdict(list)
            for tp in group:
                by_topic[tp.topic].append((tp.partition, when))
            try:
                response = await client.send(
                    node, OffsetRequest(-1, READ_UNCOMMITTED, list(by_topic.items())))
            except KafkaError as exc:
                if not exc.retriable or time.monotonic() > deadline:
                    raise
                continue
            for topic, partitions in response.topics:
                for partition, error_code, *answer in partitions:
                    if error_code == 0:
                        found[TopicPartition(topic, partition)] = answer[-1]
                    elif not Errors.for_code(error_code).retriable:
                        raise Errors.for_code(error_code)(f"{topic}/{partition}")
        if len(found) < len(tps):
            if time.monotonic() > deadline:
                raise KafkaError(f"no offsets for {[tp for tp in tps if tp not in found]}")
            await client.force_metadata_update()
            await asyncio.sleep(RETRY_BACKOFF)
    return found


class _Retry(Exception):
    def __init__(self, reason: str, out_of_range: bool = False) -> None:
        super().__init__(reason)
        self.out_of_range = out_of_range


def _by_leader(client: AIOKafkaClient, tps: list[TopicPartition]
               ) -> dict[int, list[TopicPartition]]:
    by_leader: dict[int, list[TopicPartition]] = defaultdict(list)
    for tp in tps:
        leader = client.cluster.leader_for_partition(tp)
        if leader is not None and leader >= 0:
            by_leader[leader].append(tp)
    return by_leader


def _fetch(client: AIOKafkaClient, node: int, positions: dict[TopicPartition, int]
           ) -> asyncio.Future[Any]:
    by_topic: dict[str, list[tuple[int, int, int]]] = defaultdict(list)
    for tp, offset in positions.items():
        by_topic[tp.topic].append((tp.partition, offset, PARTITION_BYTES))
    request = FetchRequest(FETCH_WAIT_MS, 1, PARTITION_BYTES, READ_UNCOMMITTED,
                           list(by_topic.items()))
    sent: Awaitable[Any] = client.send(node, request)
    return asyncio.ensure_future(sent)


async def _pipeline(client: AIOKafkaClient, node: int, asked: dict[TopicPartition, int],
                    ends: dict[TopicPartition, int], positions: dict[TopicPartition, int],
                    take: Callable[[TopicPartition, list[Record]], None]) -> None:
    """Read the partitions one leader holds, one fetch always in flight ahead of the
    parsing; ``positions`` follows what was handed to ``take``."""
    pending: asyncio.Future[Any] | None = _fetch(client, node, asked)
    try:
        while pending is not None:
            try:
                response = await pending
            except KafkaError as exc:
                if exc.retriable:  # the broker went away or timed out: ask again
                    raise _Retry(repr(exc)) from None
                raise
            pending = None
            batches: dict[TopicPartition, list[Any]] = {}
            for topic, partitions in response.topics:
                for partition, error_code, _, *data in partitions:
                    tp = TopicPartition(topic, partition)
                    if tp not in asked:
                        continue
                    if error_code == Errors.OffsetOutOfRangeError.errno:
                        raise _Retry(f"{tp} offset {asked[tp]} out of range", out_of_range=True)
                    if error_code != 0:
                        error = Errors.for_code(error_code)
                        if error.retriable:
                            raise _Retry(f"{tp}: {error.__name__}")
                        raise error(f"{tp}")
                    batches[tp] = _whole_batches(MemoryRecords(data[-1]))
            # A partition may come back empty although it holds more: the response was full
            # (a batch too large for the limits still comes whole once it is the first).
            after = {tp: found[-1].next_offset if found else asked[tp]
                     for tp, found in batches.items()}
            if any(batches.values()):
                asked = {tp: offset for tp, offset in after.items() if offset < ends[tp]}
                if asked:
                    pending = _fetch(client, node, asked)  # in flight while these are parsed
            for tp, found in batches.items():
                start = positions[tp]
                for batch in found:
                    if batch.is_control_batch:
                        continue
                    records = [r for r in batch if r.offset >= start] if \
                        batch.base_offset < start else list(batch)
                    if records:
                        take(tp, records)
                if found:
                    positions[tp] = min(found[-1].next_offset, ends[tp])
    finally:
        if pending is not None:
            pending.cancel()


def _whole_batches(records: MemoryRecords) -> list[Any]:
    """The complete record batches of a response (a partial last one is left for the next
    fetch), their checksums verified."""
    found = []
    while (batch := records.next_batch()) is not None:
        if not batch.validate_crc():
            raise Errors.CorruptRecordError(f"record batch at {batch.base_offset}: bad CRC")
        found.append(batch)
    return found
