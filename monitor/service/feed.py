"""Produce input records to Kafka: the synthetic market of the demo, replay files for tests."""

from __future__ import annotations

from collections.abc import Iterable

from aiokafka import AIOKafkaProducer

from monitor.market import MarketRecord
from monitor.service.settings import Topics


def input_producer(bootstrap: str, client_id: str = "liqmon-feed") -> AIOKafkaProducer:
    return AIOKafkaProducer(bootstrap_servers=bootstrap, client_id=client_id, acks="all",
                            linger_ms=5, max_batch_size=256 * 1024)


async def produce_records(producer: AIOKafkaProducer, records: Iterable[MarketRecord],
                          topics: Topics, partition: int | None = None) -> int:
    """Send records keyed as SPEC §2 says (symbol / account) and wait for every ack."""
    names = {"prices": topics.prices, "fills": topics.fills, "ledger": topics.ledger}
    futures = []
    for record in records:
        futures.append(await producer.send(
            names[record.topic], record.value_bytes(), key=record.key.encode(),
            partition=partition,
        ))
    for future in futures:
        await future
    return len(futures)
