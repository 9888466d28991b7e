"""Reading a consumer's position without waiting, as the loop does after each fetch; widening
an input consumer's fetch wait when the broker answers fetches without the records it reports."""

from __future__ import annotations

from aiokafka import AIOKafkaConsumer, TopicPartition

from monitor.service.clients import FETCH_MAX_WAIT_CAP_MS, FetchWait, position_now
from tests.support.clock import Clock
from tests.support.kafka import fresh_settings, produce

P0, P1 = TopicPartition("prices", 0), TopicPartition("prices", 1)


async def test_the_position_after_a_fetch_is_the_offset_after_what_it_handed_over(broker):
    topic = fresh_settings(broker.bootstrap).topics.fills
    await produce(broker.bootstrap, [(topic, b"k", b"v")] * 3)
    tp = TopicPartition(topic, 0)
    consumer = AIOKafkaConsumer(bootstrap_servers=broker.bootstrap, enable_auto_commit=False,
                                auto_offset_reset="earliest")
    await consumer.start()
    try:
        consumer.assign([tp])
        handed: list[int] = []
        while len(handed) < 2:
            batch = await consumer.getmany(tp, timeout_ms=1_000, max_records=2 - len(handed))
            handed += [record.offset for record in batch.get(tp, [])]
        assert position_now(consumer, tp) == 2  # one record is fetched but not handed over
        assert position_now(consumer, TopicPartition(topic, 1)) is None  # not assigned
    finally:
        await consumer.stop()


def test_a_partition_left_behind_its_end_for_half_a_second_doubles_the_fetch_wait():
    clock = Clock()
    wait = FetchWait(10, clock)
    assert wait.starved({P0: (100, 150), P1: (7, 7)}) is None
    clock.now = 0.4
    assert wait.starved({P0: (100, 150), P1: (7, 9)}) is None
    clock.now = 0.5
    assert wait.starved({P0: (100, 160), P1: (7, 9)}) == (P0, 0.5)
    assert wait.ms == 20


def test_a_partition_that_moves_or_is_at_its_end_never_widens_the_wait():
    clock = Clock()
    wait = FetchWait(10, clock)
    for step in range(20):
        clock.now = step * 0.1
        # P0 advances each fetch, however far behind; P1 has read all there is
        assert wait.starved({P0: (100 + step, 10_000), P1: (7, 7)}) is None
    assert wait.ms == 10


def test_after_a_widening_the_next_one_takes_another_half_second():
    clock = Clock()
    wait = FetchWait(10, clock)
    wait.starved({P0: (100, 150)})
    clock.now = 0.5
    assert wait.starved({P0: (100, 150)}) == (P0, 0.5)
    clock.now = 0.9
    assert wait.starved({P0: (100, 150)}) is None
    clock.now = 1.0
    assert wait.starved({P0: (100, 150)}) == (P0, 0.5)
    assert wait.ms == 40


def test_the_fetch_wait_stops_at_kafkas_default():
    clock = Clock()
    wait = FetchWait(300, clock)
    wait.starved({P0: (100, 150)})
    clock.now = 0.5
    assert wait.starved({P0: (100, 150)}) == (P0, 0.5)
    assert wait.ms == FETCH_MAX_WAIT_CAP_MS == 500
    clock.now = 5.0
    assert wait.starved({P0: (100, 150)}) is None
    assert wait.ms == 500
