"""An input log that ends before the records liqmon applied from it. A topic deleted and
re-created: its new records are applied, not skipped because their offsets start again below
the position the old log had reached. A log truncated: what it still holds was applied
already, and is not applied twice."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from typing import Any

import orjson
import pytest
import structlog
from aiokafka import AIOKafkaConsumer, TopicPartition

from monitor.config import parse_config
from monitor.engine import Engine
from monitor.service import log_reader
from monitor.service import runner as service_runner
from monitor.service.broker import EmbeddedBroker
from monitor.service.changelog import EPOCH, read_changelog
from monitor.service.runner import Monitor
from monitor.service.settings import ServiceSettings
from monitor.service.topics import create_topics
from monitor.snapshot import KIND_HEADER
from tests.support.kafka import (
    RunningMonitor,
    fresh_settings,
    produce,
    read_events,
    read_topic,
    recreate,
    wait_processed,
)
from tests.support.messages import deposit, fill, tick
from tests.support.risk import RISK

ENDS_EARLY = "input partition's log ends before the records applied from it"


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
                while not any(entry["event"] == ENDS_EARLY for entry in logs):
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
    (said,) = [entry for entry in logs if entry["event"] == ENDS_EARLY]
    assert (said["topic"], said["partition"], said["applied_to"], said["log_end"],
            said["reading_from"]) == (t.ledger, 0, 50, 0, 0)
    assert said["cause"] == "it holds no record: the topic was re-created, or emptied"
    assert said["log_level"] == "error"
    assert replaced == 1


async def epoch_markers(settings: ServiceSettings) -> list[Any]:
    return [r for r in await read_topic(settings.bootstrap, settings.topics.state)
            if dict(r.headers).get(KIND_HEADER) == EPOCH]


@pytest.mark.asyncio(loop_scope="session")
async def test_state_checkpointed_from_a_re_created_ledger_is_restored_over_the_old_logs(
        broker: EmbeddedBroker) -> None:
    """Offsets start again on a re-created ledger, so a's next snapshot says it has read less
    (ledger offset 1) than the one before it (30): without the epoch marker written before
    it, a restart would keep the older one, 3,000 USDT, and lose the new deposit of 5."""
    settings = fresh_settings(broker.bootstrap)
    await create_topics(settings)
    t, config = settings.topics, parse_config(RISK)
    async with RunningMonitor(settings, config) as monitor:
        await wait_processed(monitor, await produce(
            broker.bootstrap, [deposit(t, "a", 100, f"d{n}") for n in range(30)]))
    await recreate(settings, t.ledger)
    with structlog.testing.capture_logs() as logs:
        async with RunningMonitor(settings, config) as monitor:
            async with asyncio.timeout(30):
                while not any(entry["event"] == ENDS_EARLY for entry in logs):
                    await asyncio.sleep(0.05)
            await wait_processed(monitor, await produce(
                broker.bootstrap, [deposit(t, "a", 5, "n0")]))
    async with RunningMonitor(settings, config) as restarted:
        assert restarted.engine.accounts["a"].balances["USDT"] == 3_005
    (marker,) = await epoch_markers(settings)
    assert marker.partition == 0
    assert orjson.loads(marker.value) | {"written_at": 0} == {
        "topic": t.ledger, "partition": 0, "applied_to": 30, "written_at": 0}


async def owning(monitors: list[Monitor], partitions: int) -> None:
    """Until each monitor owns some of the partitions and together all of them."""
    async with asyncio.timeout(30):
        while not (all(m._positions.owned for m in monitors) and sorted(
                p for m in monitors for p in m._positions.owned) == list(range(partitions))):
            await asyncio.sleep(0.05)


@pytest.mark.asyncio(loop_scope="session")
async def test_a_partition_gained_after_prices_were_re_created_is_restored_over_the_old_log(
        broker: EmbeddedBroker) -> None:
    """Every instance reads all of prices: one that found the prices log re-created marks the
    partitions it gains later, whose last owner may never have read the new log. Here the
    other instance is one that does not look (an older liqmon, say): its snapshots say they
    read 30 ticks, those written after it from the new log 1. Without the marker a restart
    would keep its 100 USDT per account and lose the deposits of 5 made since."""
    settings = replace(fresh_settings(broker.bootstrap, checkpoint_interval=0.2), partitions=2)
    await create_topics(settings)
    t, config = settings.topics, parse_config(RISK)
    accounts = [f"a{n}" for n in range(10)]
    with structlog.testing.capture_logs() as logs:
        async with RunningMonitor(settings, config) as finder:
            blind = RunningMonitor(settings, config)
            blind.monitor._read_replaced_logs_again = lambda consumer: asyncio.sleep(0)
            async with blind as other:
                await owning([finder, other], 2)
                ends = await produce(broker.bootstrap, [
                    *(tick(t, "BTC-PERP", 60_000 + n, n) for n in range(30)),
                    *(deposit(t, account, 100) for account in accounts)])
                for monitor in (finder, other):
                    await wait_processed(monitor, {tp: end for tp, end in ends.items()
                                                   if tp.topic == t.prices or tp.partition
                                                   in monitor._positions.owned})
                await recreate(settings, t.prices)
                await produce(broker.bootstrap, [tick(t, "BTC-PERP", 61_000, 100)])
                async with asyncio.timeout(30):
                    while not any(entry["event"] == ENDS_EARLY for entry in logs):
                        await asyncio.sleep(0.05)
            gained = set(range(2)) - finder._positions.owned
            await owning([finder], 2)
            await wait_processed(finder, await produce(
                broker.bootstrap, [deposit(t, account, 5, f"more-{account}")
                                   for account in accounts]))
    restored = await read_changelog(broker.bootstrap, t.state, range(2))
    engine = Engine(config)
    for part in restored.values():
        engine.load_accounts(part.snapshots)
    assert {a: engine.accounts[a].balances["USDT"] for a in accounts} == dict.fromkeys(
        accounts, 105)
    assert gained <= {marker.partition for marker in await epoch_markers(settings)}


@pytest.mark.asyncio(loop_scope="session")
async def test_a_truncated_ledger_is_read_on_from_its_end_not_applied_twice(
        broker: EmbeddedBroker) -> None:
    """An unclean leader election cuts a log below what was applied. Here: a ledger of 20
    deposits of 100 to a, all applied and checkpointed; the ledger made again of the first 18
    of them, the same records at the same offsets (what a truncation leaves); a restart. Read
    again from its beginning, d0…d14, which have left a duplicate window of 5 ids, would be
    applied a second time: a's 2,000 USDT would become 3,500."""
    settings = fresh_settings(broker.bootstrap)
    await create_topics(settings)
    t, config = settings.topics, parse_config(RISK)
    deposits = [deposit(t, "a", 100, f"d{n}") for n in range(20)]
    async with RunningMonitor(settings, config, Engine(config, dedupe_window=5)) as monitor:
        await wait_processed(monitor, await produce(broker.bootstrap, deposits))
    await recreate(settings, t.ledger)
    await produce(broker.bootstrap, deposits[:18])
    with structlog.testing.capture_logs() as logs:
        async with RunningMonitor(settings, config, Engine(config, dedupe_window=5)) as monitor:
            async with asyncio.timeout(30):
                while not any(entry["event"] == ENDS_EARLY for entry in logs):
                    await asyncio.sleep(0.05)
            # then a new deposit, at offset 18: applied
            await wait_processed(monitor, await produce(
                broker.bootstrap, [deposit(t, "a", 1_000, "d20")]))
            balance = monitor.engine.accounts["a"].balances["USDT"]
    # (The embedded broker answers the end offset of a log whose last batch holds several
    # records, as the 18 are here, as that batch's first offset + 1: the records read say 18.)
    (said,) = [entry for entry in logs if entry["event"] == ENDS_EARLY]
    assert (said["applied_to"], said["log_end"], said["reading_from"]) == (20, 18, 18)
    assert said["cause"] == ("its last records were applied already: the log was truncated "
                             "(an unclean leader election)")
    assert balance == 3_000


@pytest.mark.asyncio(loop_scope="session")
async def test_a_short_end_offset_with_the_records_still_there_replaces_nothing(
        broker: EmbeddedBroker, monkeypatch: pytest.MonkeyPatch) -> None:
    """A high watermark read before a seek, and an end offset short of the records (the
    embedded broker answers a log whose last batch holds several records with that batch's
    first offset + 1): the log's last records reach what was applied, so nothing was
    replaced and nothing is said."""
    settings = fresh_settings(broker.bootstrap)
    await create_topics(settings)
    t = settings.topics
    ledger = TopicPartition(t.ledger, 0)
    async with RunningMonitor(settings, parse_config(RISK)) as monitor:
        await wait_processed(monitor, await produce(
            broker.bootstrap, [deposit(t, "a", 100, f"d{n}") for n in range(20)]))
        highwater, end_offsets = AIOKafkaConsumer.highwater, AIOKafkaConsumer.end_offsets
        tails_read = asyncio.Event()
        reads = 0

        async def read_tails(*args: Any, **kwargs: Any) -> Any:
            nonlocal reads
            reads += 1
            tails = await log_reader.last_records(*args, **kwargs)
            tails_read.set()
            return tails

        async def short_end(self: AIOKafkaConsumer, tps: list[TopicPartition]) -> Any:
            return {tp: 1 if tp == ledger else end
                    for tp, end in (await end_offsets(self, tps)).items()}

        with structlog.testing.capture_logs() as logs:
            monkeypatch.setattr(service_runner, "last_records", read_tails)
            monkeypatch.setattr(AIOKafkaConsumer, "end_offsets", short_end)
            monkeypatch.setattr(AIOKafkaConsumer, "highwater", lambda self, tp: 0
                                if tp == ledger else highwater(self, tp))
            await asyncio.wait_for(tails_read.wait(), 30)
            await wait_processed(monitor, await produce(
                broker.bootstrap, [deposit(t, "a", 1_000, "d20")]))
            await asyncio.sleep(1)  # fetches go on, the watermark stays below: not read again
        balance = monitor.engine.accounts["a"].balances["USDT"]
    assert [entry for entry in logs if entry["event"] == ENDS_EARLY] == []
    assert balance == 3_000
    assert reads == 1
    assert await epoch_markers(settings) == []
