"""An input topic deleted and re-created while liqmon runs: its new records are applied, not
skipped because their offsets start again below the position the old log had reached."""

from __future__ import annotations

import asyncio

import pytest
import structlog
from aiokafka import TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from monitor.config import parse_config
from monitor.service.broker import EmbeddedBroker
from monitor.service.settings import ServiceSettings
from monitor.service.topics import create_topics
from tests.support.kafka import RunningMonitor, fresh_settings, produce, read_events, wait_processed
from tests.support.messages import deposit, fill, tick
from tests.support.risk import RISK

REPLACED = ("input partition's log ends before the records applied from it: the topic was "
            "deleted and re-created, or its log truncated; reading it again from its beginning")


async def recreate(settings: ServiceSettings, topic: str) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.bootstrap)
    await admin.start()
    try:
        await admin.delete_topics([topic])
        await asyncio.sleep(0.5)  # the broker forgets it before it is made again
        await admin.create_topics([NewTopic(topic, settings.partitions, 1)])
    finally:
        await admin.close()


@pytest.mark.asyncio(loop_scope="session")
async def test_a_re_created_ledgers_deposits_are_applied_from_its_first_offset(
        broker: EmbeddedBroker) -> None:
    settings = fresh_settings(broker.bootstrap)
    await create_topics(settings)
    t = settings.topics
    ledger = TopicPartition(t.ledger, 0)
    with structlog.testing.capture_logs() as logs:
        async with RunningMonitor(settings, parse_config(RISK)) as monitor:
            old = await produce(broker.bootstrap, [deposit(t, f"a{n}", 100) for n in range(50)])
            await wait_processed(monitor, old)
            await recreate(settings, t.ledger)
            async with asyncio.timeout(30):  # the next fetch finds the log ending at 0
                while not any(entry["event"] == REPLACED for entry in logs):
                    await asyncio.sleep(0.05)
            # b deposits 1,000,000 USDT on the new ledger, at offset 0 (the old one had
            # reached 50), then buys 10 BTC-PERP at 60,000: a 600,000 notional, whose
            # maintenance margin the deposit covers many times over. Skipped, the deposit
            # would leave b a position and no collateral: a liquidation.
            new = await produce(broker.bootstrap, [deposit(t, "b", 1_000_000),
                                                   tick(t, "BTC-PERP", 60_000)])
            new |= await produce(broker.bootstrap, [fill(t, "f1", "b", "BTC-PERP", 10, 60_000)])
            assert new[ledger] == 1
            await wait_processed(monitor, new)
            replaced = monitor.metrics.registry.get_sample_value(
                "liqmon_input_logs_replaced_total", {"topic": t.ledger, "partition": "0"})
        events = await read_events(broker.bootstrap, t)
    assert [e for e in events if e["account"] == "b"] == []
    (said,) = [entry for entry in logs if entry["event"] == REPLACED]
    assert (said["topic"], said["partition"], said["applied_to"], said["log_end"],
            said["reading_from"]) == (t.ledger, 0, 50, 0, 0)
    assert said["log_level"] == "error"
    assert replaced == 1
