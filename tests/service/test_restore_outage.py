"""A restore while the broker is out of reach: it waits for the broker, reading the changelog
again, and the instance lives on (README, *Broker loss*), unless the restore is abandoned."""

from __future__ import annotations

import asyncio

import pytest
import structlog
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError
from structlog.testing import capture_logs

from monitor.config import fingerprint, load_config
from monitor.engine import Engine
from monitor.service import restorer as restorer_module
from monitor.service.checkpointer import Checkpointer
from monitor.service.clients import Clients, stop_consumer
from monitor.service.metrics import Metrics
from monitor.service.positions import Positions
from monitor.service.restorer import RestoreAbandoned, Restorer
from monitor.service.topics import create_topics
from tests.support.kafka import fresh_settings
from tests.support.paths import REPO

CONFIG = load_config(REPO / "examples" / "risk.toml")


def restorer_of(settings, abandon=lambda: None) -> Restorer:
    metrics, engine = Metrics(), Engine(CONFIG)
    positions = Positions(settings.topics, max_skew_ms=5, max_wait=0.5, max_stall=10.0,
                          metrics=metrics)
    checkpointer = Checkpointer(engine, positions, settings, metrics, fingerprint(CONFIG))
    return Restorer(settings, CONFIG, engine, positions, checkpointer, Clients(settings),
                    metrics, fingerprint(CONFIG), structlog.get_logger("liqmon"), abandon,
                    lambda batch, engine: asyncio.sleep(0))


@pytest.fixture
def quick_retries(monkeypatch) -> None:
    monkeypatch.setattr(restorer_module, "READ_RETRY_INTERVAL", 0.1)


async def test_a_restore_waits_for_a_broker_away_longer_than_its_request_timeout(
        own_broker, quick_retries) -> None:
    settings = fresh_settings(own_broker.bootstrap, request_timeout_ms=300)
    await create_topics(settings)
    restorer = restorer_of(settings)
    own_broker.pause()
    asyncio.get_running_loop().call_later(1.5, own_broker.resume)  # five request timeouts
    with capture_logs() as logs:
        restored = await restorer.read([0], lambda status: None)
    assert list(restored) == [0] and restored[0].control is None  # nothing checkpointed yet
    retries = [e for e in logs if e["event"] == "restore could not read the changelog, retrying"]
    assert retries and retries[0]["partitions"] == [0]


async def test_a_restore_waiting_for_the_broker_gives_up_when_it_is_abandoned(
        own_broker, quick_retries) -> None:
    settings = fresh_settings(own_broker.bootstrap, request_timeout_ms=300)
    await create_topics(settings)
    why: list[str] = []
    restorer = restorer_of(settings, abandon=lambda: why[0] if why else None)
    own_broker.pause()
    try:
        reading = asyncio.create_task(restorer.read([0], lambda status: None))
        await asyncio.sleep(1.0)
        why.append("stopping")
        with pytest.raises(RestoreAbandoned, match="stopping"):
            await reading
    finally:
        own_broker.resume()


async def test_a_broker_away_when_asked_where_partitions_start_fails_the_restore_retriably(
        own_broker) -> None:
    """A first start asks where its never-checkpointed partitions begin: a broker that does
    not answer fails that restore with an error the instance takes the assignment again
    after (`Monitor._restore_assignments`), not one that stops it."""
    settings = fresh_settings(own_broker.bootstrap, request_timeout_ms=300)
    await create_topics(settings)
    consumer = AIOKafkaConsumer(bootstrap_servers=own_broker.bootstrap, request_timeout_ms=300)
    await consumer.start()
    own_broker.pause()
    try:
        with pytest.raises(KafkaError, match="did not say where 1 partitions start") as raised:
            await restorer_module._log_bounds(
                consumer, {TopicPartition(settings.topics.prices, 0): None}, "earliest")
        assert raised.value.retriable
    finally:
        own_broker.resume()
        await stop_consumer(consumer)
