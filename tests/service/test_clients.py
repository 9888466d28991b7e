"""Reading a consumer's position without waiting, as the loop does after each fetch; widening
an input consumer's fetch wait when the broker answers fetches without the records it reports;
stopping a consumer whose fetch failed while the broker was away; naming the connection a
partition is fetched on."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition

from monitor.service.broker import EmbeddedBroker
from monitor.service.clients import (
    FETCH_MAX_WAIT_CAP_MS,
    FetchWait,
    fetched_from,
    position_now,
    stop_consumer,
)
from tests.support.clock import Clock
from tests.support.kafka import fresh_settings, produce

P0, P1 = TopicPartition("prices", 0), TopicPartition("prices", 1)


@asynccontextmanager
async def assigned(bootstrap: str, records: int) -> AsyncIterator[tuple[AIOKafkaConsumer,
                                                                          TopicPartition]]:
    """A started consumer assigned partition 0 of a fresh fills topic holding ``records``."""
    topic = fresh_settings(bootstrap).topics.fills
    await produce(bootstrap, [(topic, b"k", b"v")] * records)
    tp = TopicPartition(topic, 0)
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False,
                                auto_offset_reset="earliest")
    await consumer.start()
    try:
        consumer.assign([tp])
        yield consumer, tp
    finally:
        await consumer.stop()


async def test_the_position_after_a_fetch_is_the_offset_after_what_it_handed_over(broker):
    async with assigned(broker.bootstrap, 3) as (consumer, tp):
        handed: list[int] = []
        while len(handed) < 2:
            batch = await consumer.getmany(tp, timeout_ms=1_000, max_records=2 - len(handed))
            handed += [record.offset for record in batch.get(tp, [])]
        assert position_now(consumer, tp) == 2  # one record is fetched but not handed over
        assert position_now(consumer, TopicPartition(tp.topic, 1)) is None  # not assigned


async def test_the_connection_label_changes_with_every_metadata_update_not_only_the_leader(
        broker):
    """A leader that moves to another broker and back between two looks leaves the leader as
    it was; the consumer's metadata updates in between change the label (so the merge's
    answers in a row on one connection start again)."""
    async with assigned(broker.bootstrap, 1) as (consumer, tp):
        while not (await consumer.getmany(tp, timeout_ms=1_000)).get(tp):
            pass
        before = fetched_from(consumer, tp)
        assert before is not None and fetched_from(consumer, tp) == before
        assert await consumer._client.force_metadata_update()
        after = fetched_from(consumer, tp)
        assert after is not None and after[0] == before[0] and after != before
        assert fetched_from(consumer, TopicPartition(tp.topic, 99)) is None  # no partition


def observe(wait: FetchWait, clock: Clock, at: float, fetched, answered: bool = True
            ) -> tuple | None:
    """``fetched``: (position, end) per partition, as the broker answered it at ``at``; or,
    not ``answered``, as it answered last (the fetch got no answer)."""
    clock.now = at
    answered_at = int(at * 1000) if answered else int(ANSWERED[id(wait)] * 1000)
    if answered:
        ANSWERED[id(wait)] = at
    return wait.starved({tp: (position, end, answered_at)
                         for tp, (position, end) in fetched.items()})


ANSWERED: dict[int, float] = {}  # per FetchWait observed: when its broker last answered


def test_a_partition_left_behind_its_end_for_half_a_second_and_three_fetches_doubles_the_wait():
    clock = Clock()
    wait = FetchWait(10, clock)
    assert observe(wait, clock, 0.0, {P0: (100, 150), P1: (7, 7)}) is None
    assert observe(wait, clock, 0.2, {P0: (100, 150), P1: (7, 9)}) is None
    assert observe(wait, clock, 0.4, {P0: (100, 160), P1: (7, 9)}) is None  # 0.4 s
    assert observe(wait, clock, 0.5, {P0: (100, 160), P1: (7, 9)}) == (P0, 0.5)
    assert wait.ms == 20


def test_fetches_the_broker_does_not_answer_are_no_starvation():
    """A broker frozen for 10 s answers nothing: each empty poll looked like an empty answer,
    and a helper saw the prices fetch wait widened to 500 ms for good, during an outage."""
    clock = Clock()
    wait = FetchWait(10, clock)
    observe(wait, clock, 0.0, {P0: (100, 150)})
    for at in (0.5, 1.0, 1.5, 2.0, 2.5):
        assert observe(wait, clock, at, {P0: (100, 150)}, answered=False) is None
    assert observe(wait, clock, 3.0, {P0: (150, 150)}) is None  # back: it reads on
    assert wait.ms == 10


def test_one_fetch_after_a_long_gap_is_no_starvation():
    """A rebalance stops fetching for seconds: the fetch after it may still find the
    partition where it was, behind the end the last answer reported."""
    clock = Clock()
    wait = FetchWait(10, clock)
    observe(wait, clock, 0.0, {P0: (100, 101)})
    assert observe(wait, clock, 3.0, {P0: (100, 101)}) is None
    assert observe(wait, clock, 3.01, {P0: (101, 101)}) is None
    assert wait.ms == 10


def test_a_partition_left_out_of_fetches_starts_afresh_when_it_is_back():
    """Paused, it is not fetched and does not move: that is no starvation."""
    clock = Clock()
    wait = FetchWait(10, clock)
    for at in (0.0, 0.1, 0.2):
        observe(wait, clock, at, {P0: (100, 150), P1: (7, 7)})
    observe(wait, clock, 0.3, {P1: (7, 7)})  # P0 paused
    assert observe(wait, clock, 2.0, {P0: (100, 150), P1: (7, 7)}) is None
    assert wait.ms == 10


def test_a_partition_that_moves_or_is_at_its_end_never_widens_the_wait():
    clock = Clock()
    wait = FetchWait(10, clock)
    for step in range(20):
        # P0 advances each fetch, however far behind; P1 has read all there is
        assert observe(wait, clock, step * 0.1, {P0: (100 + step, 10_000), P1: (7, 7)}) is None
    assert wait.ms == 10


def test_after_a_widening_the_next_one_takes_another_half_second():
    clock = Clock()
    wait = FetchWait(10, clock)
    for at in (0.0, 0.2, 0.4):
        observe(wait, clock, at, {P0: (100, 150)})
    assert observe(wait, clock, 0.5, {P0: (100, 150)}) == (P0, 0.5)
    for at in (0.6, 0.7, 0.9):
        assert observe(wait, clock, at, {P0: (100, 150)}) is None
    assert observe(wait, clock, 1.0, {P0: (100, 150)}) == (P0, 0.5)
    assert wait.ms == 40


def test_the_fetch_wait_stops_at_kafkas_default():
    clock = Clock()
    wait = FetchWait(300, clock)
    for at in (0.0, 0.2, 0.4):
        observe(wait, clock, at, {P0: (100, 150)})
    assert observe(wait, clock, 0.5, {P0: (100, 150)}) == (P0, 0.5)
    assert wait.ms == FETCH_MAX_WAIT_CAP_MS == 500
    for at in (1.0, 2.0, 5.0):
        assert observe(wait, clock, at, {P0: (100, 150)}) is None
    assert wait.ms == 500


@asynccontextmanager
async def fetch_failed_in_an_outage() -> AsyncIterator[AIOKafkaConsumer]:
    """A started consumer whose fetch timed out while its broker was frozen, and which now
    sleeps its 5 s retry backoff; the broker answers again."""
    with EmbeddedBroker() as kafka:
        topic = fresh_settings(kafka.bootstrap).topics.fills
        await produce(kafka.bootstrap, [(topic, b"k", b"v")])
        consumer = AIOKafkaConsumer(bootstrap_servers=kafka.bootstrap, request_timeout_ms=1_000,
                                    retry_backoff_ms=5_000, fetch_max_wait_ms=100,
                                    auto_offset_reset="earliest")
        await consumer.start()
        consumer.assign([TopicPartition(topic, 0)])
        await consumer.getmany(timeout_ms=5_000)
        fetching = asyncio.ensure_future(consumer.getmany(timeout_ms=20_000))
        os.kill(kafka.process.pid, signal.SIGSTOP)
        try:
            await asyncio.sleep(2.0)  # the fetch in flight times out after 1 s
        finally:
            os.kill(kafka.process.pid, signal.SIGCONT)
        try:
            yield consumer
        finally:
            fetching.cancel()


@pytest.mark.kafka
async def test_aiokafka_0_14_consumer_stop_cancels_its_caller_after_a_failed_fetch():
    """Why `stop_consumer` exists; if this fails after an aiokafka upgrade, it can go."""
    async with fetch_failed_in_an_outage() as consumer:
        with pytest.raises(asyncio.CancelledError):
            await consumer.stop()
        assert asyncio.current_task().cancelling() == 0  # nobody cancelled this task


@pytest.mark.kafka
async def test_stopping_a_consumer_whose_fetch_failed_in_an_outage_returns_with_it_closed():
    async with fetch_failed_in_an_outage() as consumer:
        await stop_consumer(consumer)
        # closed all the same: no connection left open
        assert not any(conn.connected() for conn in consumer._client._conns.values())
