"""Reading partitions to their end for a restore (monitor.service.log_reader), on the embedded
broker: every record once, in offset order, whatever the fetch and batch boundaries."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator

import pytest
from aiokafka import AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.client import AIOKafkaClient
from aiokafka.errors import KafkaError

from monitor.service import log_reader
from monitor.service.log_reader import LATEST, RecordBatch, bounds, list_offsets, read_range


async def topic_with(bootstrap: str, per_partition: dict[int, list[list[bytes]]]) -> str:
    """A new topic; each partition's values produced as the given record batches."""
    name = f"log-{uuid.uuid4().hex[:8]}"
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(name, max(per_partition) + 1, 1)])
    finally:
        await admin.close()
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=0)
    await producer.start()
    try:
        for partition, batches in per_partition.items():
            for values in batches:
                batch = producer.create_batch()
                for value in values:
                    batch.append(key=value, value=value, timestamp=None)
                await (await producer.send_batch(batch, name, partition=partition))
    finally:
        await producer.stop()
    return name


@contextlib.asynccontextmanager
async def client_of(broker, request_timeout_ms: int) -> AsyncIterator[AIOKafkaClient]:
    """A bootstrapped client of ``broker``; after it, the broker runs again (the test may have
    paused it) and the client is closed."""
    client = AIOKafkaClient(bootstrap_servers=broker.bootstrap,
                            request_timeout_ms=request_timeout_ms)
    await client.bootstrap()
    try:
        yield client
    finally:
        broker.resume()
        await client.close()


def freeze_this_process(broker, seconds: float) -> None:
    """This process stops for ``seconds`` (SIGSTOP, a throttled container) while a request
    waits on the paused ``broker``, which is back 50 ms after the process wakes: the process
    first finds the request timed out, as a frozen process does."""
    time.sleep(seconds)
    asyncio.get_running_loop().call_later(0.05, broker.resume)


async def read_all(bootstrap: str, tps: list[TopicPartition], start_at: dict | None = None,
                   wait_ms: int = log_reader.FETCH_WAIT_MS
                   ) -> dict[TopicPartition, list[tuple[int, bytes]]]:
    client = AIOKafkaClient(bootstrap_servers=bootstrap)
    await client.bootstrap()
    got: dict[TopicPartition, list[tuple[int, bytes]]] = {tp: [] for tp in tps}
    try:
        ranges = await bounds(client, tps)
        for tp, start in (start_at or {}).items():
            ranges[tp] = (start, ranges[tp][1])
        await read_range(client, ranges, lambda tp, batch: got[tp].extend(
            (r.offset, r.value) for r in batch.records()), wait_ms=wait_ms)
    finally:
        await client.close()
    return got


async def test_every_record_of_every_partition_is_read_once_in_offset_order(broker) -> None:
    values = [[f"{p}-{b}-{i}".encode() for i in range(50)] for p in range(2) for b in range(3)]
    topic = await topic_with(broker.bootstrap, {0: values[:3], 1: values[3:]})
    tps = [TopicPartition(topic, 0), TopicPartition(topic, 1)]
    got = await read_all(broker.bootstrap, tps)
    for partition, tp in enumerate(tps):
        expected = [v for batch in values[3 * partition:3 * partition + 3] for v in batch]
        assert got[tp] == list(enumerate(expected))


async def test_fetches_smaller_than_the_partition_still_read_it_all(broker, monkeypatch) -> None:
    """Many fetches, each asked for 4 KiB: the next one starts after the last whole batch."""
    monkeypatch.setattr(log_reader, "PARTITION_BYTES", 4096)
    batches = [[bytes([b]) * 100 for _ in range(20)] for b in range(30)]  # ~2 KiB a batch
    topic = await topic_with(broker.bootstrap, {0: batches})
    tp = TopicPartition(topic, 0)
    got = await read_all(broker.bootstrap, [tp])
    assert [offset for offset, _ in got[tp]] == list(range(600))


async def test_a_broker_too_slow_for_the_fetch_wait_gets_a_longer_one(broker) -> None:
    """The embedded broker takes longer to answer a fetch the more batches a partition holds
    and, past the fetch's wait, answers with nothing. At 1 ms it does so a few thousand
    single-record batches in (at the reader's 20 ms, by extrapolation, some 35,000): the read
    doubles its wait until the answers come, and reads every record."""
    batches = [[b"%d" % n] for n in range(6_000)]
    topic = await topic_with(broker.bootstrap, {0: batches})
    tp = TopicPartition(topic, 0)
    got = await read_all(broker.bootstrap, [tp], wait_ms=1)
    assert [offset for offset, _ in got[tp]] == list(range(6_000))


async def test_a_range_starting_inside_a_batch_skips_the_records_before_it(broker) -> None:
    topic = await topic_with(broker.bootstrap, {0: [[b"a", b"b", b"c", b"d"], [b"e"]]})
    tp = TopicPartition(topic, 0)
    got = await read_all(broker.bootstrap, [tp], start_at={tp: 2})
    assert got[tp] == [(2, b"c"), (3, b"d"), (4, b"e")]


async def test_an_empty_partition_beside_a_full_one_gives_nothing_and_the_read_ends(broker) -> None:
    topic = await topic_with(broker.bootstrap, {0: [], 1: [[b"x"]]})
    tps = [TopicPartition(topic, 0), TopicPartition(topic, 1)]
    got = await read_all(broker.bootstrap, tps)
    assert got == {tps[0]: [], tps[1]: [(0, b"x")]}


async def test_a_broker_that_stops_answering_for_a_while_delays_the_read_without_losing_records(
        own_broker, monkeypatch) -> None:
    monkeypatch.setattr(log_reader, "PARTITION_BYTES", 4096)  # many fetches: some in the pause
    batches = [[bytes([b]) * 100 for _ in range(20)] for b in range(30)]
    topic = await topic_with(own_broker.bootstrap, {0: batches})
    tp = TopicPartition(topic, 0)
    got: list[int] = []
    paused: list[bool] = []

    def take(_: TopicPartition, batch: RecordBatch) -> None:
        got.extend(r.offset for r in batch.records())
        if len(got) >= 200 and not paused:
            paused.append(True)
            own_broker.pause()  # answers nothing until resumed, a second later
            asyncio.get_running_loop().call_later(1.0, own_broker.resume)

    async with client_of(own_broker, 300) as client:
        await read_range(client, await bounds(client, [tp]), take, timeout=10)
    assert paused and got == list(range(600))


async def test_a_broker_gone_for_longer_than_the_timeout_fails_the_read_clearly(
        own_broker) -> None:
    topic = await topic_with(own_broker.bootstrap, {0: [[b"a"], [b"b"]]})
    tp = TopicPartition(topic, 0)
    async with client_of(own_broker, 200) as client:
        ranges = await bounds(client, [tp])
        own_broker.pause()
        with pytest.raises(KafkaError, match="failed"):
            await read_range(client, ranges, lambda tp, batch: None, timeout=1)


async def test_offsets_asked_before_this_process_froze_past_the_deadline_are_asked_again(
        own_broker) -> None:
    topic = await topic_with(own_broker.bootstrap, {0: [[b"a"], [b"b"], [b"c"]]})
    tp = TopicPartition(topic, 0)
    async with client_of(own_broker, 500) as client:
        await client.set_topics([topic])
        own_broker.pause()
        asking = asyncio.create_task(list_offsets(client, [tp], LATEST, timeout=0.2))
        await asyncio.sleep(0.05)  # the request is out
        freeze_this_process(own_broker, 0.8)  # past the deadline and the request's timeout
        assert await asking == {tp: 3}


async def test_offsets_of_a_broker_gone_past_the_deadline_fail_clearly(own_broker) -> None:
    topic = await topic_with(own_broker.bootstrap, {0: [[b"a"]]})
    tp = TopicPartition(topic, 0)
    async with client_of(own_broker, 200) as client:
        await client.set_topics([topic])
        own_broker.pause()
        with pytest.raises(KafkaError):
            await list_offsets(client, [tp], LATEST, timeout=0.5)


async def test_a_read_that_failed_then_froze_past_its_deadline_asks_again(
        own_broker, monkeypatch) -> None:
    monkeypatch.setattr(log_reader, "PARTITION_BYTES", 4096)
    batches = [[bytes([b]) * 100 for _ in range(20)] for b in range(30)]
    topic = await topic_with(own_broker.bootstrap, {0: batches})
    tp = TopicPartition(topic, 0)
    fetch, fetches, retried = log_reader._fetch, [], asyncio.Event()

    def counted(*args):
        fetches.append(fetch(*args))
        if len(fetches) == 2:
            retried.set()
        return fetches[-1]

    monkeypatch.setattr(log_reader, "_fetch", counted)
    got: list[int] = []
    async with client_of(own_broker, 200) as client:
        ranges = await bounds(client, [tp])
        own_broker.pause()
        reading = asyncio.create_task(read_range(client, ranges, lambda _, batch: got.extend(
            r.offset for r in batch.records()), timeout=1.0))
        # The first fetch timed out: 1 s without a record from then fails the read. The
        # second is out (a turn of the loop to send it) when this process stops for 1.3 s.
        await retried.wait()
        await asyncio.sleep(0.01)
        freeze_this_process(own_broker, 1.3)
        await reading
    assert got == list(range(600))
