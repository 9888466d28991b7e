"""Reading whole partitions from their start to their end as fast as the broker sends them, for
a restore (changelog.read_changelog).

A consumer sends a partition's next fetch only once the records of the last one have been
handed over, so a reader that parses and keeps a million records waits for every fetch in
full: about a second of a million-account restore. Here the next fetch goes out as soon as
a response's batch headers say where it ends, and the response's records are parsed while
the broker prepares the next one. Records are handed over a batch at a time (`RecordBatch`):
as the client's record objects (offset, key, value, headers), without a `ConsumerRecord`
built for each, or as columns of the batch's bytes (`RecordBatch.columns`), with no object
for any record.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from aiokafka import TopicPartition
from aiokafka import errors as Errors
from aiokafka.client import AIOKafkaClient
from aiokafka.codec import gzip_decode, lz4_decode, snappy_decode, zstd_decode
from aiokafka.errors import KafkaError
from aiokafka.protocol.fetch import FetchRequest
from aiokafka.protocol.offset import OffsetRequest
from aiokafka.record.memory_records import MemoryRecords

from monitor.compiled import jit as _jit
from monitor.errors import LiqmonError
from monitor.service.security import KafkaSecurity
from monitor.service.settings import FETCH_MAX_WAIT_CAP_MS

Record = Any  # the client's record: .offset, .key, .value, .headers (a list of pairs)
READ_UNCOMMITTED = 0
EARLIEST, LATEST = -2, -1  # ListOffsets timestamps
FETCH_WAIT_MS = 20  # only a partition already read to its end can make a fetch wait
# The embedded broker takes longer to answer a fetch the more batches a partition holds, and
# past the fetch's wait answers with nothing: a read that gets nothing short of its ends
# doubles its wait, up to FETCH_MAX_WAIT_CAP_MS.
PARTITION_BYTES = 16 * 1024 * 1024
RETRY_BACKOFF = 0.1  # seconds, after a leader moved or metadata was stale
_BATCH_HEADER = struct.Struct(">qiibIhiqqqhii")  # a record batch of format 2, 61 bytes
_DECOMPRESS: dict[int, Callable[[bytes], bytes]] = {
    1: gzip_decode, 2: snappy_decode, 3: lz4_decode, 4: zstd_decode}


async def bounds(client: AIOKafkaClient, tps: list[TopicPartition], timeout: float = 30.0
                 ) -> dict[TopicPartition, tuple[int, int]]:
    """(first offset, end offset) of each partition, as of now."""
    await client.set_topics(sorted({tp.topic for tp in tps}))
    starts = await list_offsets(client, tps, EARLIEST, timeout)
    ends = await list_offsets(client, tps, LATEST, timeout)
    return {tp: (starts[tp], ends[tp]) for tp in tps}


async def read_range(client: AIOKafkaClient, ranges: dict[TopicPartition, tuple[int, int]],
                     take: Callable[[TopicPartition, RecordBatch], None],
                     timeout: float = 30.0, wait_ms: int = FETCH_WAIT_MS) -> None:
    """Hand every record of these partitions between their offsets (`bounds`) to ``take``,
    in offset order per partition, a batch at a time (control batches left out). Errors the
    broker may recover from (a leader moved, the broker unreachable for a while) are retried
    until no record has come for ``timeout`` seconds and a try asked after that has failed
    too (see `list_offsets`). A broker that answers with nothing short of the ends gets twice
    the fetch wait (from ``wait_ms``) on each try."""
    ends = {tp: end for tp, (_, end) in ranges.items()}
    positions = {tp: start for tp, (start, end) in ranges.items() if start < end}
    deadline: float | None = None
    while positions:
        before = dict(positions)
        asked_at = time.monotonic()
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
                            positions, take, wait_ms))
            except BaseExceptionGroup as failed:
                retries = [e for e in failed.exceptions if isinstance(e, _Retry)]
                if len(retries) < len(failed.exceptions):  # one that no retry can mend
                    raise next(e for e in failed.exceptions
                               if not isinstance(e, _Retry)) from None
                retry = retries[0]
        if positions != before:
            deadline = None
        else:  # nothing came: an error, or an answer without records
            if retry is None:
                wait_ms = min(2 * wait_ms, FETCH_MAX_WAIT_CAP_MS)
            deadline = deadline or time.monotonic() + timeout
            if asked_at > deadline:
                raise ReadTimedOut(f"reading {sorted(positions)} failed: "
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


class TopicsNotFound(LiqmonError):
    def __init__(self, names: list[str], flags: str) -> None:
        super().__init__(f"topic{'s' if len(names) > 1 else ''} "
                         f"{', '.join(map(repr, names))} not found: is --bootstrap right, and "
                         f"are the topics renamed ({flags})?")


@contextlib.asynccontextmanager
async def reading_client(bootstrap: str, client_id: str, request_timeout_ms: int,
                         security: KafkaSecurity) -> AsyncIterator[AIOKafkaClient]:
    """A bare client of its own for `bounds` and `read_range`, connected, closed after."""
    client = AIOKafkaClient(bootstrap_servers=bootstrap, client_id=client_id,
                            request_timeout_ms=request_timeout_ms, **security.client_kwargs())
    try:
        await client.bootstrap()
        yield client
    finally:
        await client.close()


async def last_records(bootstrap: str, ranges: dict[TopicPartition, tuple[int, int]],
                       count: int, *, client_id: str, request_timeout_ms: int,
                       security: KafkaSecurity) -> dict[TopicPartition, list[Record]]:
    """The records at the last ``count`` offsets of each partition before its end (``ranges``:
    first and end offset, as `bounds` gives them), oldest first: fewer where the partition
    holds fewer, or control records. On a client of its own, for the rare question."""
    return await records_between(
        bootstrap, {tp: (max(start, end - count), end) for tp, (start, end) in ranges.items()},
        client_id=client_id, request_timeout_ms=request_timeout_ms, security=security)


async def records_between(bootstrap: str, ranges: dict[TopicPartition, tuple[int, int]], *,
                          client_id: str, request_timeout_ms: int, security: KafkaSecurity
                          ) -> dict[TopicPartition, list[Record]]:
    """The records of each partition between its offsets [start, end), oldest first (control
    records left out), on a client of its own, for the rare question."""
    found: dict[TopicPartition, list[Record]] = defaultdict(list)

    def take(tp: TopicPartition, batch: RecordBatch) -> None:
        found[tp] += batch.records()

    async with reading_client(bootstrap, client_id, request_timeout_ms, security) as client:
        await client.set_topics(sorted({tp.topic for tp in ranges}))
        await read_range(client, ranges, take, request_timeout_ms / 1000)
    return dict(found)


async def list_offsets(client: AIOKafkaClient, tps: list[TopicPartition], when: int,
                       timeout: float = 30.0) -> dict[TopicPartition, int]:
    """The first (EARLIEST) or the end (LATEST) offset of each partition. Errors the broker
    may recover from are retried until a try asked after ``timeout`` seconds fails too: a
    process frozen past the deadline (SIGSTOP, a throttled container) finds, when it wakes,
    the request it sent before timed out, while the broker may have been well all along."""
    found: dict[TopicPartition, int] = {}
    deadline = time.monotonic() + timeout
    while True:
        asked_at = time.monotonic()
        error: KafkaError | None = None
        missing = [tp for tp in tps if tp not in found]
        for node, group in _by_leader(client, missing).items():
            by_topic: dict[str, list[tuple[int, int]]] = defaultdict(list)
            for tp in group:
                by_topic[tp.topic].append((tp.partition, when))
            try:
                response = await client.send(
                    node, OffsetRequest(-1, READ_UNCOMMITTED, list(by_topic.items())))
            except KafkaError as exc:
                if not exc.retriable:
                    raise
                error = exc
                continue
            for topic, partitions in response.topics:
                for partition, error_code, *answer in partitions:
                    if error_code == 0:
                        found[TopicPartition(topic, partition)] = answer[-1]
                    elif not Errors.for_code(error_code).retriable:
                        raise Errors.for_code(error_code)(f"{topic}/{partition}")
        if len(found) == len(tps):
            return found
        if asked_at > deadline:
            raise error or ReadTimedOut(
                f"no offsets for {[tp for tp in tps if tp not in found]}")
        await client.force_metadata_update()
        await asyncio.sleep(RETRY_BACKOFF)


class ReadTimedOut(KafkaError):  # type: ignore[misc]  # aiokafka is untyped
    """The broker gave nothing for the whole timeout: out of reach, or too slow for now. A
    caller that can wait may ask again."""
    retriable = True


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


def _fetch(client: AIOKafkaClient, node: int, positions: dict[TopicPartition, int],
           wait_ms: int) -> asyncio.Future[Any]:
    by_topic: dict[str, list[tuple[int, int, int]]] = defaultdict(list)
    for tp, offset in positions.items():
        by_topic[tp.topic].append((tp.partition, offset, PARTITION_BYTES))
    request = FetchRequest(wait_ms, 1, PARTITION_BYTES, READ_UNCOMMITTED,
                           list(by_topic.items()))
    sent: Awaitable[Any] = client.send(node, request)
    return asyncio.ensure_future(sent)


async def _pipeline(client: AIOKafkaClient, node: int, asked: dict[TopicPartition, int],
                    ends: dict[TopicPartition, int], positions: dict[TopicPartition, int],
                    take: Callable[[TopicPartition, RecordBatch], None], wait_ms: int
                    ) -> None:
    """Read the partitions one leader holds, one fetch always in flight ahead of the
    parsing; ``positions`` follows what was handed to ``take``."""
    pending: asyncio.Future[Any] | None = _fetch(client, node, asked, wait_ms)
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
                    batches[tp] = whole_batches(data[-1])
            # A partition may come back empty although it holds more: the response was full
            # (a batch too large for the limits still comes whole once it is the first).
            after = {tp: found[-1].next_offset if found else asked[tp]
                     for tp, found in batches.items()}
            if any(batches.values()):
                asked = {tp: offset for tp, offset in after.items() if offset < ends[tp]}
                if asked:
                    pending = _fetch(client, node, asked, wait_ms)  # in flight while parsing
            for tp, found in batches.items():
                start = positions[tp]
                for batch in found:
                    if not batch.batch.is_control_batch and batch.next_offset > start:
                        batch.start = start
                        take(tp, batch)
                if found:
                    positions[tp] = min(found[-1].next_offset, ends[tp])
    finally:
        if pending is not None:
            pending.cancel()


def whole_batches(data: bytes) -> list[RecordBatch]:
    """The complete record batches of a response (a partial last one is left for the next
    fetch), their checksums verified."""
    found = []
    records = MemoryRecords(data)
    position = 0
    while (batch := records.next_batch()) is not None:
        if not batch.validate_crc():
            raise Errors.CorruptRecordError(f"record batch at {batch.base_offset}: bad CRC")
        # every format starts with the offset and the length of what follows
        end = position + 12 + int.from_bytes(data[position + 8:position + 12], "big")
        found.append(RecordBatch(batch, memoryview(data)[position:end]))
        position = end
    return found


@dataclass(slots=True)
class RecordColumns:
    """The records of a batch as positions in its (decompressed) bytes: key k is
    ``payload[key_start[k]:key_start[k] + key_len[k]]`` (length -1: none), likewise values;
    ``plain``: the record's only header is the one asked about (`RecordBatch.columns`)."""

    payload: np.ndarray
    offset: np.ndarray
    key_start: np.ndarray
    key_len: np.ndarray
    value_start: np.ndarray
    value_len: np.ndarray
    plain: np.ndarray


class RecordBatch:
    """A whole record batch of a fetch response, its checksum verified; ``start``: the first
    offset of it wanted (a read may begin inside a batch)."""

    __slots__ = ("batch", "raw", "start")

    def __init__(self, batch: Any, raw: memoryview, start: int = 0) -> None:
        self.batch = batch  # the client's
        self.raw = raw
        self.start = start

    @property
    def next_offset(self) -> int:
        return int(self.batch.next_offset)

    def records(self) -> list[Record]:
        """The client's record objects, from ``start`` on (once: the client's batch is an
        iterator)."""
        if self.batch.base_offset < self.start:
            return [r for r in self.batch if r.offset >= self.start]
        return list(self.batch)

    def columns(self, header_key: str, header_value: bytes) -> RecordColumns | None:
        """The records from ``start`` on as columns, parsed in one compiled pass with no
        object per record; None for a batch of an older format, or one whose records do not
        parse (`records` then says why)."""
        if getattr(self.batch, "magic", None) != 2:
            return None
        head = _BATCH_HEADER.unpack_from(self.raw)
        base_offset, attributes, count = head[0], head[5], head[12]
        body = self.raw[_BATCH_HEADER.size:]
        codec = attributes & 0x07
        if codec:
            decompress = _DECOMPRESS.get(codec)
            if decompress is None:
                return None
            payload = np.frombuffer(decompress(bytes(body)), np.uint8)
        else:
            payload = np.frombuffer(body, np.uint8)
        if not 0 <= count <= len(payload):  # each record takes a byte at least
            return None
        parsed = _parse_records(payload, count, np.frombuffer(header_key.encode(), np.uint8),
                                np.frombuffer(header_value, np.uint8))
        if parsed is None:
            return None
        delta, key_start, key_len, value_start, value_len, plain = parsed
        offset = base_offset + delta
        wanted = slice(None)
        if base_offset < self.start:
            wanted = slice(int(np.searchsorted(offset, self.start)), None)
        return RecordColumns(payload, offset[wanted], key_start[wanted], key_len[wanted],
                             value_start[wanted], value_len[wanted], plain[wanted])


@_jit
def _varint(buf, pos, end):  # type: ignore[no-untyped-def]
    """A zigzag varint at ``pos``: (value, next position), or (0, -1) past ``end``."""
    result = np.uint64(0)
    shift = 0
    while True:
        if pos >= end or shift > 63:
            return 0, -1
        byte = buf[pos]
        pos += 1
        result |= np.uint64(byte & 0x7F) << np.uint64(shift)
        if byte < 0x80:
            break
        shift += 7
    value = np.int64(result >> np.uint64(1))
    return value ^ -np.int64(result & np.uint64(1)), pos


@_jit
def _holds(buf, pos, size, expected):  # type: ignore[no-untyped-def]
    """Are the ``size`` bytes at ``pos`` exactly ``expected``?"""
    if size != expected.shape[0]:
        return False
    for k in range(size):  # noqa: SIM110 - compiled: a loop, not a generator
        if buf[pos + k] != expected[k]:
            return False
    return True


@_jit
def _parse_records(buf, count, header_key, header_value):  # type: ignore[no-untyped-def]
    """Kafka's record format 2, ``count`` records end to end in ``buf``: per record its
    offset delta, key and value positions and lengths, and whether its only header is
    (``header_key``, ``header_value``). None if the bytes do not hold exactly that."""
    delta = np.empty(count, np.int64)
    key_start = np.empty(count, np.int64)
    key_len = np.empty(count, np.int64)
    value_start = np.empty(count, np.int64)
    value_len = np.empty(count, np.int64)
    plain = np.empty(count, np.bool_)
    end = buf.shape[0]
    pos = 0
    for k in range(count):
        length, pos = _varint(buf, pos, end)
        if pos < 0 or length < 1 or pos + length > end:
            return None
        stop = pos + length
        pos += 1  # attributes
        _, pos = _varint(buf, pos, stop)  # timestamp delta
        if pos < 0:
            return None
        delta[k], pos = _varint(buf, pos, stop)
        if pos < 0:
            return None
        key_len[k], pos = _varint(buf, pos, stop)
        key_start[k] = pos
        if pos < 0 or key_len[k] < -1 or pos + max(key_len[k], 0) > stop:
            return None
        pos += max(key_len[k], 0)
        value_len[k], pos = _varint(buf, pos, stop)
        value_start[k] = pos
        if pos < 0 or value_len[k] < -1 or pos + max(value_len[k], 0) > stop:
            return None
        pos += max(value_len[k], 0)
        headers, pos = _varint(buf, pos, stop)
        if pos < 0 or headers < 0:
            return None
        only = headers == 1
        for _ in range(headers):
            size, pos = _varint(buf, pos, stop)
            if pos < 0 or size < 0 or pos + size > stop:
                return None
            if only and not _holds(buf, pos, size, header_key):
                only = False
            pos += size
            size, pos = _varint(buf, pos, stop)
            if pos < 0 or size < -1 or pos + max(size, 0) > stop:
                return None
            if only and not _holds(buf, pos, size, header_value):
                only = False
            pos += max(size, 0)
        if pos != stop:
            return None
        plain[k] = only
    if pos != end:
        return None
    return delta, key_start, key_len, value_start, value_len, plain
