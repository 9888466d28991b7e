"""Helpers for tests against the real (embedded) broker."""

from __future__ import annotations

import asyncio
import contextlib
import io
import itertools
import struct
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import replace
from typing import Any

import orjson
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.client import AIOKafkaClient
from aiokafka.protocol.produce import ProduceRequest
from aiokafka.record.default_records import DefaultRecordBatchBuilder
from aiokafka.record.util import calc_crc32c

from monitor.config import RiskConfig
from monitor.engine import Engine
from monitor.replay import replay
from monitor.service.delivery import Pipeline
from monitor.service.log_reader import bounds, read_range
from monitor.service.outbox import Outgoing
from monitor.service.runner import Monitor
from monitor.service.security import PLAINTEXT, KafkaSecurity
from monitor.service.settings import ServiceSettings, Topics
from tests.support.paths import REPO

_names = itertools.count()


def fresh_settings(bootstrap: str, **overrides: Any) -> ServiceSettings:
    """Settings with topic names and a group of their own, so tests never see each other."""
    n = next(_names)
    topics = Topics(**{field: f"t{n}.{getattr(Topics(), field)}"
                       for field in Topics.__dataclass_fields__})
    base = ServiceSettings(config_path=REPO / "examples" / "risk.toml", bootstrap=bootstrap,
                           group=f"g{n}", topics=topics, metrics_port=0,
                           session_timeout_ms=2_000, heartbeat_interval_ms=300,
                           request_timeout_ms=3_000)
    return replace(base, **overrides)


class RunningMonitor:
    """A Monitor running as a task in the test's event loop."""

    def __init__(self, settings: ServiceSettings, config: RiskConfig,
                 engine: Engine | None = None) -> None:
        self.monitor = Monitor(settings, config, engine=engine)
        self.task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Monitor:
        self.task = asyncio.create_task(self.monitor.run())
        await asyncio.wait_for(self.monitor.ready.wait(), timeout=30)
        return self.monitor

    async def __aexit__(self, *exc: object) -> None:
        self.monitor.request_stop()
        assert self.task is not None
        await asyncio.wait_for(self.task, timeout=30)


async def produce(bootstrap: str,
                  messages: Iterable[tuple[str, bytes | None, bytes | None]
                                     | tuple[str, bytes | None, bytes | None, int]],
                  first_timestamp_ms: int | None = None,
                  security: KafkaSecurity = PLAINTEXT,
                  max_request_size: int = 1024 * 1024,
                  one_at_a_time: bool = False) -> dict[TopicPartition, int]:
    """Produce (topic, key, value) in order, each to the partition its key picks or, given
    a fourth member, to that partition; returns the end offset per partition.

    With first_timestamp_ms, message i carries Kafka timestamp first_timestamp_ms + i, which
    fixes the order in which the monitor's time-ordered merge applies them: at once if the
    monitor starts after, and, while it runs, only if sent ``one_at_a_time`` (each acknowledged
    before the next; see `produce_located` for why)."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=2,
                                max_request_size=max_request_size,
                                **security.client_kwargs())
    await producer.start()
    ends: dict[TopicPartition, int] = {}
    try:
        futures = []
        for i, (topic, key, value, *where) in enumerate(messages):
            future = await producer.send(
                topic, value, key=key, partition=where[0] if where else None,
                timestamp_ms=None if first_timestamp_ms is None else first_timestamp_ms + i)
            if one_at_a_time:
                await future
            futures.append(future)
        for future in futures:
            meta = await future
            tp = TopicPartition(meta.topic, meta.partition)
            ends[tp] = max(ends.get(tp, 0), meta.offset + 1)
    finally:
        await producer.stop()
    return ends


async def wait_processed(monitor: Monitor, ends: dict[TopicPartition, int],
                         timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        done = monitor.processed_offsets()
        if all(done.get(tp, 0) >= end for tp, end in ends.items()):
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"monitor did not process {ends} in {timeout}s: {done}")
        await asyncio.sleep(0.01)


async def read_topic(bootstrap: str, topic: str, idle: float = 0.5,
                     security: KafkaSecurity = PLAINTEXT) -> list[Any]:
    """Every record of every partition of a topic, until it stays quiet for `idle` seconds."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, **security.client_kwargs())
    await admin.start()
    try:
        (described,) = await admin.describe_topics([topic])
    finally:
        await admin.close()
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None,
                                auto_offset_reset="earliest", enable_auto_commit=False,
                                **security.client_kwargs())
    await consumer.start()
    records: list[Any] = []
    try:
        consumer.assign([TopicPartition(topic, p["partition"])
                         for p in described["partitions"]])
        quiet_since = time.monotonic()
        while time.monotonic() - quiet_since < idle:
            batch = await consumer.getmany(timeout_ms=100)
            for part in batch.values():
                records.extend(part)
                quiet_since = time.monotonic()
    finally:
        await consumer.stop()
    return records


LZ4, ZSTD = 3, 4  # the codec bits of a record batch's attributes


async def batch_codecs(bootstrap: str, topic: str) -> set[int]:
    """The codecs of the record batches of a topic's partition 0, as written."""
    codecs: set[int] = set()
    client = AIOKafkaClient(bootstrap_servers=bootstrap)
    await client.bootstrap()
    try:
        tp = TopicPartition(topic, 0)
        await read_range(client, await bounds(client, [tp]),
                         lambda _, batch: codecs.add(batch.batch.compression_type))
    finally:
        await client.close()
    return codecs


async def recreate(settings: ServiceSettings, topic: str, *, create: bool = True,
                   partitions: int | None = None) -> None:
    """Delete a topic (its records gone) and, with ``create``, make it again at once, empty
    (with ``partitions``, else as many as liqmon makes). The embedded broker creates a topic
    a client asks metadata of, with 4 partitions: a running instance's consumer that asks
    between the two would make it so (and stop the instance, which finds the count changed).
    So the two go back to back, and again should the topic come back with other partitions."""
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.bootstrap)
    await admin.start()
    wanted = partitions or settings.partitions
    try:
        for _ in range(10):
            await admin.delete_topics([topic])
            if not create:
                return
            await admin.create_topics([NewTopic(topic, wanted, 1)])
            (described,) = await admin.describe_topics([topic])
            if len(described["partitions"]) == wanted:
                return
        raise AssertionError(f"{topic!r} keeps coming back with other partitions than {wanted}")
    finally:
        await admin.close()


async def read_events(bootstrap: str, topics: Topics, idle: float = 0.5,
                      security: KafkaSecurity = PLAINTEXT) -> list[dict]:
    """Events of both output topics, in the order of their trigger offsets then id."""
    events = []
    for topic in (topics.margin_calls, topics.liquidations):
        events.extend(orjson.loads(r.value) for r in await read_topic(
            bootstrap, topic, idle=idle, security=security))
    return events


def without_wall_clock(event: dict) -> dict:
    return {k: v for k, v in event.items() if k != "emitted_at"}


def routable(lines: list[bytes]) -> list[tuple[str, bytes, bytes]]:
    """(topic kind, key, value) of each replay line Kafka can carry (a line that is not
    even an envelope has no topic to go to)."""
    out = []
    for line in lines:
        try:
            envelope = orjson.loads(line)
        except orjson.JSONDecodeError:
            continue
        value = envelope["value"]
        key = value.get("symbol" if envelope["topic"] == "prices" else "account", "")
        out.append((envelope["topic"], str(key).encode(), orjson.dumps(value)))
    return out


def replayed(records, config, rejections: list[tuple[int, str]] | None = None) -> list[dict]:
    """Replay's events for (topic kind, key, value) records; each record it rejects, as
    (index, reason), onto ``rejections`` if given."""
    lines = [b'{"topic": "%s", "value": %s}' % (kind.encode(), value)
             for kind, _, value in records]
    out = io.BytesIO()
    replay(lines, Engine(config), out, lambda index, rejection: None if rejections is None
           else rejections.append((index, rejection.reason)))
    return [orjson.loads(line) for line in out.getvalue().splitlines()]


def same_events(run_events: list[dict], replay_events: list[dict],
                positions: list[tuple[str, int, int]]) -> None:
    """Equal but for where the trigger is located (offset in Kafka, line index in replay)."""
    def comparable(event: dict, location: tuple[str, int]) -> dict:
        trigger = {k: v for k, v in event["trigger"].items()
                   if k not in ("topic", "partition", "offset", "index")}
        return {**without_wall_clock(event), "trigger": {**trigger, "at": location}}

    expected = [comparable(e, positions[e["trigger"]["index"]]) for e in replay_events]
    got = [comparable(e, (e["trigger"]["topic"], e["trigger"]["partition"],
                          e["trigger"]["offset"])) for e in run_events]
    key = lambda e: e["event_id"]  # noqa: E731
    got, expected = sorted(got, key=key), sorted(expected, key=key)
    assert [e["event_id"] for e in got] == [e["event_id"] for e in expected]
    for mine, theirs in zip(got, expected, strict=True):
        assert mine == theirs


def positions_of(records, topics: Topics) -> list[tuple[str, int, int]]:
    """(topic, partition, offset) of each record produced in order to one-partition topics."""
    names = {"prices": topics.prices, "fills": topics.fills, "ledger": topics.ledger}
    next_offset: dict[str, int] = {}
    out = []
    for kind, _, _ in records:
        out.append((names[kind], 0, next_offset.get(kind, 0)))
        next_offset[kind] = next_offset.get(kind, 0) + 1
    return out


async def produce_timestamped(bootstrap: str, topics: Topics, records,
                              first_timestamp_ms: int = 1_000_000, *, live: bool = False
                              ) -> dict[TopicPartition, int]:
    """Produce (kind, key, value) records with increasing Kafka timestamps: the monitor's
    time-ordered merge then applies them in this order however it happens to fetch them.
    ``live``: a monitor is running, so each is acknowledged before the next is sent."""
    names = {"prices": topics.prices, "fills": topics.fills, "ledger": topics.ledger}
    return await produce(bootstrap, [(names[kind], key, value) for kind, key, value in records],
                         first_timestamp_ms=first_timestamp_ms, one_at_a_time=live)



started_processes: list[Any] = []  # every process a test started: reaped when it ends


def reap() -> None:
    """Kill what a finished (or failed) test left running (asyncio or subprocess.Popen)."""
    while started_processes:
        proc = started_processes.pop()
        if hasattr(proc, "poll"):
            proc.poll()
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()


class MonitorProcess:
    """`liqmon run` in its own process, with its log lines collected as they come."""

    def __init__(self, args: list[str]) -> None:
        self.args = args
        self.logs: list[dict] = []
        self.consuming = asyncio.Event()

    async def start(self) -> MonitorProcess:
        self.proc = await asyncio.create_subprocess_exec(
            *self.args, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL)
        started_processes.append(self.proc)
        self.reader = asyncio.create_task(self._read())
        return self

    async def _read(self) -> None:
        assert self.proc.stderr is not None
        async for line in self.proc.stderr:
            if line.startswith(b"{"):
                entry = orjson.loads(line)
                self.logs.append(entry)
                if entry["event"] == "consuming":
                    self.consuming.set()

    async def stop(self, kill: bool = False) -> int:
        with contextlib.suppress(ProcessLookupError):  # it may have stopped on its own
            if kill:
                self.proc.kill()
            else:
                self.proc.terminate()
        code = await asyncio.wait_for(self.proc.wait(), timeout=30)
        await self.reader
        return code


async def produce_located(bootstrap: str, messages: list[tuple[str, bytes | None, bytes]],
                          first_timestamp_ms: int) -> list[tuple[str, int, int]]:
    """Produce with increasing timestamps, each message acknowledged before the next is
    sent; (topic, partition, offset) of each. One at a time, because these timestamps are
    made up: only then does every partition append in timestamp order, which is what live
    order equal to replay's assumes (README, "Order"). Sent together, one request's batches
    for several partitions may be appended in any order, and a record seen early may go out
    before an earlier-stamped one that was not appended yet."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=0)
    await producer.start()
    try:
        located = []
        for i, (topic, key, value) in enumerate(messages):
            meta = await producer.send_and_wait(topic, value, key=key,
                                                timestamp_ms=first_timestamp_ms + i)
            located.append((meta.topic, meta.partition, meta.offset))
        return located
    finally:
        await producer.stop()


def run_args(settings: ServiceSettings, *extra: str) -> list[str]:
    """`liqmon run` as a separate process with these settings' config, broker and topic
    names (the group is left to the caller: a flag or the environment, as each test needs)."""
    return [sys.executable, "-m", "monitor.cli", "run", *settings.run_args(), *extra]


async def write_commit_marker(bootstrap: str, tp: TopicPartition) -> None:
    """Append a transaction commit marker to a partition, as a transactional producer's
    coordinator does: an offset that consumers skip and never hand over. The embedded broker
    refuses transactional producers, but takes the marker's control batch written directly."""
    builder = DefaultRecordBatchBuilder(
        magic=2, compression_type=0, is_transactional=1, producer_id=1_000, producer_epoch=0,
        base_sequence=-1, batch_size=1 << 16)
    # a control record: key (version 0, type 1 = commit), value (version 0, coordinator epoch)
    builder.append(0, timestamp=None, key=struct.pack(">hh", 0, 1),
                   value=struct.pack(">hi", 0, 0), headers=[])
    batch = bytearray(builder.build())
    attributes_at, crc_at = struct.calcsize(">qiibI"), struct.calcsize(">qiib")
    attributes = struct.unpack_from(">h", batch, attributes_at)[0] | 0x20  # control batch
    struct.pack_into(">h", batch, attributes_at, attributes)
    struct.pack_into(">I", batch, crc_at, calc_crc32c(bytes(batch[attributes_at:])))
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap)
    await producer.start()
    try:
        await producer.client.force_metadata_update()
        leader = producer.client.cluster.leader_for_partition(tp)
        response = await producer.client.send(
            leader, ProduceRequest(None, -1, 10_000, [(tp.topic, [(tp.partition, bytes(batch))])]))
        ((_, ((_, error, *_),)),) = response.topics
        assert error == 0, f"marker refused: error {error}"
    finally:
        await producer.stop()


def hand_over_held_back(pipeline: Pipeline, monkeypatch: pytest.MonkeyPatch
                        ) -> tuple[asyncio.Event, asyncio.Event]:
    """Make the producer's taking of a batch wait: (taking, go_on) — set once it has
    started, and what lets it go on."""
    taking, go_on = asyncio.Event(), asyncio.Event()
    start_sending = pipeline.delivery.start_sending

    async def held_back(outgoing: Sequence[Outgoing]) -> Any:
        taking.set()
        await go_on.wait()
        return await start_sending(outgoing)

    monkeypatch.setattr(pipeline.delivery, "start_sending", held_back)
    return taking, go_on
