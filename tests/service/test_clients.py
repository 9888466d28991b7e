"""Reading a consumer's position without waiting, as the loop does after each fetch."""

from __future__ import annotations

from aiokafka import AIOKafkaConsumer, TopicPartition

from monitor.service.clients import position_now
from tests.support.kafka import fresh_settings, produce


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
