"""The watermark prober (SPEC §6): the end-offset probes that let the merge release a record
once a silent partition is known to hold nothing earlier; and the broker watch, which says
whether Kafka answers at all. Against the embedded broker."""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace

import pytest
import structlog
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import (
    KafkaError,
    KafkaTimeoutError,
    LeaderNotAvailableError,
    UnknownTopicOrPartitionError,
)
from aiokafka.protocol.metadata import MetadataResponse_v5

from monitor.service.broker import EmbeddedBroker
from monitor.service.merge import TimestampMerge
from monitor.service.metrics import Metrics
from monitor.service.probe import (
    BrokerWatch,
    WatermarkProber,
    partition_counts_of,
    topic_partitions,
    topics_present,
)
from monitor.service.settings import ServiceSettings
from monitor.service.topics import PartitionsChanged, create_topics, output_topics
from tests.support.clock import Clock
from tests.support.kafka import fresh_settings, recreate
from tests.support.merge import positioned


@dataclass
class Rec:
    offset: int
    timestamp: int


async def probing(broker):
    """(settings, merge over fills/0 and fills/1 of fresh topics, a started consumer)."""
    settings = fresh_settings(broker.bootstrap, partitions=2)
    await create_topics(settings)
    merge = TimestampMerge(lambda topic: 0, max_skew_ms=0)
    first, second = (TopicPartition(settings.topics.fills, p) for p in (0, 1))
    for tp in (first, second):
        positioned(merge, tp, 0)
    consumer = AIOKafkaConsumer(bootstrap_servers=broker.bootstrap, group_id=None)
    await consumer.start()
    return settings, merge, (first, second), consumer


@contextlib.asynccontextmanager
async def running(prober: WatermarkProber, consumer: AIOKafkaConsumer
                  ) -> AsyncIterator[asyncio.Task[None]]:
    """The prober's task for the duration of the block; then it and the consumer stop."""
    task = asyncio.create_task(prober.run())
    try:
        yield task
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await consumer.stop()


async def until(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.005)


async def test_a_probe_goes_out_while_an_earlier_one_is_still_unanswered(broker) -> None:
    settings, merge, (first, second), consumer = await probing(broker)
    asked: list[list[TopicPartition]] = []
    first_answer = asyncio.Event()
    real = consumer.end_offsets

    async def held_first(tps):
        asked.append(list(tps))
        if len(asked) == 1:
            await first_answer.wait()
        return await real(tps)

    consumer.end_offsets = held_first
    prober = WatermarkProber(merge, consumer, settings, structlog.get_logger())
    async with running(prober, consumer):
        now = int(time.time() * 1000)
        merge.add(first, [Rec(0, now)])
        assert merge.take(10, [first, second]) == []  # held: the second partition is silent
        prober.wanted.set()
        await until(lambda: len(asked) == 1)
        # a record of the second partition, after the first: the first goes out, and the new
        # head needs a probe sent after its own arrival, while the first probe is still out
        await asyncio.sleep(0.002)
        merge.add(second, [Rec(0, now + 1)])
        assert [tp for tp, _ in merge.take(10, [first, second])] == [first]
        prober.wanted.set()
        await until(lambda: len(asked) == 2)
        assert not first_answer.is_set()
        first_answer.set()
        await until(lambda: [tp for tp, _ in merge.take(10, [first, second])] == [second])


async def test_a_failed_probe_is_sent_again(broker) -> None:
    settings, merge, (first, second), consumer = await probing(broker)
    calls = 0
    real = consumer.end_offsets

    async def failing_once(tps):
        nonlocal calls
        calls += 1
        if calls == 1:
            raise KafkaTimeoutError("the broker did not answer in time")
        return await real(tps)

    consumer.end_offsets = failing_once
    prober = WatermarkProber(merge, consumer, settings, structlog.get_logger())
    async with running(prober, consumer):
        merge.add(first, [Rec(0, int(time.time() * 1000))])
        assert merge.take(10, [first, second]) == []
        prober.wanted.set()
        await until(lambda: [tp for tp, _ in merge.take(10, [first, second])] == [first])
        assert calls == 2


async def test_poke_sends_the_probe_from_the_callers_step(broker) -> None:
    settings, merge, (first, second), consumer = await probing(broker)
    asked: list[list[TopicPartition]] = []
    real = consumer.end_offsets

    async def recorded(tps):
        asked.append(list(tps))
        return await real(tps)

    consumer.end_offsets = recorded
    prober = WatermarkProber(merge, consumer, settings, structlog.get_logger())  # not run
    try:
        merge.add(first, [Rec(0, int(time.time() * 1000))])
        assert merge.take(10, [first, second]) == []
        assert prober.poke()
        await asyncio.sleep(0)  # one step of the loop, as the service yields after a poke
        assert len(asked) == 1 and second in asked[0]  # the silent one, and the others
        assert not prober.poke()  # they are asked for already
        await until(lambda: [tp for tp, _ in merge.take(10, [first, second])] == [first])
    finally:
        await consumer.stop()


async def test_a_partition_sought_after_its_probe_was_answered_is_probed_again(broker) -> None:
    """A seek (a partition restored or kept through a rebalance) makes the merge forget what
    a probe proved of it; the prober must not count that answer still, or the record held
    back waits for --merge-wait and goes out unproven."""
    settings, merge, (first, second), consumer = await probing(broker)
    merge.max_wait = 60.0
    prober = WatermarkProber(merge, consumer, settings, structlog.get_logger())  # not run
    try:
        merge.add(first, [Rec(0, int(time.time() * 1000))])
        assert merge.take(10, [first, second]) == []
        assert prober.poke()
        await until(lambda: not prober._in_flight)  # answered: the second holds nothing
        positioned(merge, second, 0)  # e.g. kept through a rebalance and resumed
        assert merge.take(10, [first, second]) == []
        assert prober.poke()  # asked again
        await until(lambda: [tp for tp, _ in merge.take(10, [first, second])] == [first])
        assert merge.forced == 0
    finally:
        await consumer.stop()


async def test_poke_leaves_a_probe_due_later_to_the_prober_task(broker) -> None:
    settings, merge, (first, second), consumer = await probing(broker)
    asked_at: list[float] = []
    real = consumer.end_offsets

    async def recorded(tps):
        asked_at.append(time.time() * 1000)
        return await real(tps)

    consumer.end_offsets = recorded
    prober = WatermarkProber(merge, consumer, settings, structlog.get_logger())
    async with running(prober, consumer):
        # a timestamp 300 ms ahead (max_skew_ms 0): only a probe sent after it proves order
        stamped = int(time.time() * 1000) + 300
        merge.add(first, [Rec(0, stamped)])
        assert merge.take(10, [first, second]) == []
        assert not prober.poke()
        assert asked_at == []
        await until(lambda: [tp for tp, _ in merge.take(10, [first, second])] == [first])
        assert asked_at[0] >= stamped


async def test_a_probe_that_fails_unexpectedly_stops_the_prober(broker) -> None:
    settings, merge, (first, second), consumer = await probing(broker)

    async def broken(tps):
        raise RuntimeError("not a Kafka error: a bug, never retried")

    consumer.end_offsets = broken
    prober = WatermarkProber(merge, consumer, settings, structlog.get_logger())
    async with running(prober, consumer) as task:
        merge.add(first, [Rec(0, int(time.time() * 1000))])
        assert merge.take(10, [first, second]) == []
        assert prober.poke()
        done, _ = await asyncio.wait([task], timeout=10)
        assert task in done
        assert isinstance(task.exception(), RuntimeError)


@pytest.mark.kafka  # starts a broker of its own
async def test_a_probe_an_outage_holds_up_holds_a_forced_release_until_it_is_answered() -> None:
    """The second partition's probe goes out as the broker freezes. --merge-wait runs out and
    Kafka is seen to answer a request sent since, as when the outage ends: the probe, still
    out, holds the release back. Answered once the broker thaws, it proves the order."""
    with EmbeddedBroker() as own_broker:
        settings, _, (first, second), consumer = await probing(own_broker)
        clock = Clock()
        merge = TimestampMerge(lambda topic: 0, max_skew_ms=0, max_wait=0.5, clock=clock,
                               most_per_turn=math.inf)
        for tp in (first, second):
            positioned(merge, tp, 0)
        prober = WatermarkProber(merge, consumer, settings, structlog.get_logger())  # not run
        try:
            merge.add(first, [Rec(0, int(time.time() * 1000))])
            assert merge.take(10, [first, second], kafka_answered=0.0) == []
            own_broker.pause()
            assert prober.poke()
            await asyncio.sleep(0.2)  # sent, and held
            clock.now = 0.5
            assert merge.take(10, [first, second], kafka_answered=0.0) == []
            clock.now = 0.6
            assert merge.take(10, [first, second], kafka_answered=0.6) == []
            own_broker.resume()
            await until(lambda: not prober._in_flight)
            assert [tp for tp, _ in merge.take(10, [first, second], kafka_answered=0.6)] == [first]
            assert merge.forced == 0
        finally:
            own_broker.resume()
            await consumer.stop()


@contextlib.asynccontextmanager
async def producer_client(bootstrap: str) -> AsyncIterator[AIOKafkaProducer]:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap)
    await producer.start()
    try:
        yield producer
    finally:
        await producer.stop()


async def test_topics_present_names_the_asked_topics_that_exist_and_creates_none(broker) -> None:
    """The watch asks for liqmon's output topics alone, not the whole cluster's metadata: of
    the four output topics and one never created, four are present, and asking did not create
    the fifth (a broker that auto-creates topics on metadata requests is told not to)."""
    settings = fresh_settings(broker.bootstrap)
    await create_topics(settings)
    outputs = output_topics(settings)
    never_created = f"{settings.topics.margin_calls}.never"
    async with producer_client(broker.bootstrap) as producer:
        assert await topics_present(producer.client, [*outputs, never_created]) == set(outputs)
        cluster = await producer.client.fetch_all_metadata()
    assert never_created not in cluster.topics()


@pytest.mark.kafka  # starts a broker of its own
async def test_topics_present_raises_a_kafka_error_when_no_broker_answers() -> None:
    """The watch reads a Kafka error as "unreachable" (and an unexpected one as a bug that
    stops the instance), so a broker that is gone must surface as a Kafka error."""
    with EmbeddedBroker() as own_broker:
        async with producer_client(own_broker.bootstrap) as producer:
            assert own_broker.process is not None
            own_broker.process.kill()
            own_broker.process.wait()
            with pytest.raises(KafkaError):
                await asyncio.wait_for(topics_present(producer.client, ["any"]), timeout=30)


@contextlib.asynccontextmanager
async def watching(bootstrap: str
                   ) -> AsyncIterator[tuple[BrokerWatch, list[tuple[bool, bool]]]]:
    """A broker watch that asks only when told (an interval of an hour), and what it found
    each time: (Kafka answered, within PROMPT_ANSWER)."""
    async with watching_topics(fresh_settings(bootstrap)) as (watch, found, _):
        yield watch, found


@contextlib.asynccontextmanager
async def watching_topics(settings: ServiceSettings) -> AsyncIterator[
        tuple[BrokerWatch, list[tuple[bool, bool]], list[BaseException]]]:
    """`watching` of these settings' topics, and what the watch stopped the instance for."""
    counts = await create_topics(settings)
    producer = AIOKafkaProducer(bootstrap_servers=settings.bootstrap)
    await producer.start()
    found: list[tuple[bool, bool]] = []
    failures: list[BaseException] = []
    watch = BrokerWatch(producer.client, settings, Metrics(), structlog.get_logger(),
                        lambda *seen: found.append(seen), failures.append, counts,
                        interval=3600)
    task = asyncio.create_task(watch.run())
    try:
        yield watch, found, failures
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await producer.stop()


async def test_a_topic_re_created_with_other_partitions_stops_the_instance(broker) -> None:
    """fills deleted and made again with 3 partitions, where the instance found 1 and reads
    that one: the watch stops it rather than leave two partitions unread."""
    settings = fresh_settings(broker.bootstrap)
    async with watching_topics(settings) as (watch, _, failures):
        await recreate(settings, settings.topics.fills, partitions=3)
        watch.ask()
        await until(lambda: failures != [])
    (failure,) = failures
    assert isinstance(failure, PartitionsChanged)
    assert (failure.topic, failure.was, failure.now) == (settings.topics.fills, 1, 3)
    assert str(failure).startswith(f"topic '{settings.topics.fills}' has 3 partitions, 1 when "
                                   "this instance started")


async def test_topic_partitions_counts_each_asked_topic_that_exists(broker) -> None:
    settings = replace(fresh_settings(broker.bootstrap), partitions=2)
    await create_topics(settings)
    async with producer_client(broker.bootstrap) as producer:
        counts = await topic_partitions(producer.client, [settings.topics.fills, "never.made"])
    assert counts == {settings.topics.fills: 2}


def test_a_topic_whose_leader_is_being_elected_exists_with_no_count_yet() -> None:
    """Apache Kafka may answer LEADER_NOT_AVAILABLE with no partition listed (the embedded
    broker never does): counted as 0, the watch would stop the instance for nothing."""
    partition = (0, 0, 1, [1], [1], [])  # error, index, leader, replicas, isr, offline
    sent = MetadataResponse_v5(0, [(1, "127.0.0.1", 9092, None)], "cluster", 1, [
        (0, "fills", False, [partition, (0, 1, 1, [1], [1], [])]),
        (LeaderNotAvailableError.errno, "ledger", False, []),
        (UnknownTopicOrPartitionError.errno, "gone", False, [])])
    answer = MetadataResponse_v5.decode(sent.encode())  # as the client reads it
    assert partition_counts_of(answer) == {"fills": 2, "ledger": None}


async def test_the_broker_watch_asked_sends_a_request_at_once(broker) -> None:
    async with watching(broker.bootstrap) as (watch, found):
        asked_at = time.monotonic()
        watch.ask()
        await until(lambda: found == [(True, True)])
        assert watch.answered_sent_at >= asked_at


@pytest.mark.kafka  # starts a broker of its own
async def test_an_answer_held_up_by_an_outage_does_not_show_that_kafka_answers_now() -> None:
    """Asked while the broker is frozen, the request is answered once it thaws, a second
    later: that says the outage ended (and is reported as not prompt), not that a request
    sent then is answered. Asked again right after, the answer is prompt."""
    with EmbeddedBroker() as own_broker:
        async with watching(own_broker.bootstrap) as (watch, found):
            watch.ask()
            await until(lambda: found == [(True, True)])
            before = watch.answered_sent_at
            own_broker.pause()
            watch.ask()
            await asyncio.sleep(1.0)
            own_broker.resume()
            await until(lambda: len(found) == 2)
            assert found == [(True, True), (True, False)]
            assert watch.answered_sent_at == before
            asked_at = time.monotonic()
            watch.ask()
            await until(lambda: len(found) == 3)
            assert watch.answered_sent_at >= asked_at and found[2] == (True, True)


@pytest.mark.kafka  # starts a broker of its own
async def test_a_watch_asked_without_pause_against_a_stopped_broker_asks_ten_times_a_second_at_most(
        ) -> None:
    """A broker that is gone refuses connections, and each request fails at once: asked on
    every turn of the loop, the watch still sends one request per 0.1 s at most."""
    with EmbeddedBroker() as own_broker:
        async with watching(own_broker.bootstrap) as (watch, found):
            assert own_broker.process is not None
            own_broker.process.kill()  # gone at once: it would linger on SIGTERM
            own_broker.process.wait()
            started = time.monotonic()
            while time.monotonic() - started < 1.0:
                watch.ask()
                await asyncio.sleep(0.001)
            assert 1 <= found.count((False, False)) <= 11
