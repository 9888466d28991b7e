"""Fills and ledger entries keyed other than by their account (SPEC §2): applied, counted by
topic, and said in the log with an example, at most every 30 seconds."""

from __future__ import annotations

from dataclasses import replace

import orjson
import pytest
import structlog
from aiokafka import ConsumerRecord, TopicPartition
from prometheus_client import CollectorRegistry, Counter

from monitor.config import parse_config
from monitor.service.broker import EmbeddedBroker
from monitor.service.counted_warning import LOG_INTERVAL
from monitor.service.keying import MiskeyedInputs
from monitor.service.topics import create_topics
from tests.support.clock import Clock
from tests.support.kafka import RunningMonitor, fresh_settings, produce, wait_processed
from tests.support.messages import deposit, fill, tick
from tests.support.risk import RISK

MISKEYED = ("input records keyed other than by their account: with more than one instance, "
            "their accounts can be split between instances")
FILLS, LEDGER = TopicPartition("fills", 3), TopicPartition("ledger", 1)


def message(tp: TopicPartition, offset: int, key: bytes | None) -> ConsumerRecord:
    return ConsumerRecord(tp.topic, tp.partition, offset, 0, 0, key, b"{}", None,
                          0 if key is None else len(key), 2, ())


class Reporter:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.clock = Clock()
        self.inputs = MiskeyedInputs(
            Counter("liqmon_records_miskeyed", "", ["topic"], registry=self.registry),
            structlog.get_logger("liqmon"), self.clock)

    def count(self, topic: str) -> float | None:
        return self.registry.get_sample_value("liqmon_records_miskeyed_total", {"topic": topic})


def test_a_record_keyed_by_its_fill_id_is_counted_and_logged_with_it() -> None:
    reporter = Reporter()
    with structlog.testing.capture_logs() as logs:
        reporter.inputs.saw(FILLS, message(FILLS, 41, b"f-9"), "acct-7")
        reporter.inputs.report()
    assert reporter.count("fills") == 1
    assert [(entry["event"], entry["log_level"], entry["records"], entry["by_topic"],
             entry["example"]) for entry in logs] == [
        (MISKEYED, "warning", 1, {"fills": 1},
         {"topic": "fills", "partition": 3, "offset": 41, "key": "f-9", "account": "acct-7"})]


def test_a_record_without_a_key_is_counted_with_key_null() -> None:
    reporter = Reporter()
    with structlog.testing.capture_logs() as logs:
        reporter.inputs.saw(LEDGER, message(LEDGER, 5, None), "acct-7")
        reporter.inputs.report()
    assert reporter.count("ledger") == 1
    assert logs[0]["example"]["key"] is None


def test_a_long_key_is_quoted_in_its_first_100_characters() -> None:
    reporter = Reporter()
    with structlog.testing.capture_logs() as logs:
        reporter.inputs.saw(FILLS, message(FILLS, 0, b"k" * 5_000), "acct-7")
        reporter.inputs.report()
    assert logs[0]["example"]["key"] == "k" * 100


def test_within_30_seconds_records_are_counted_and_the_next_line_sums_them() -> None:
    reporter = Reporter()
    with structlog.testing.capture_logs() as logs:
        reporter.inputs.saw(FILLS, message(FILLS, 0, b"f-1"), "acct-1")
        reporter.inputs.report()  # logged at once: the first
        reporter.clock.now += LOG_INTERVAL - 1
        reporter.inputs.saw(FILLS, message(FILLS, 1, b"f-2"), "acct-2")
        reporter.inputs.saw(LEDGER, message(LEDGER, 0, None), "acct-2")
        reporter.inputs.report()  # counted, not logged
        assert (reporter.count("fills"), reporter.count("ledger"), len(logs)) == (2, 1, 1)
        reporter.clock.now += 1
        reporter.inputs.saw(FILLS, message(FILLS, 2, b"f-3"), "acct-3")
        reporter.inputs.report()
    assert (reporter.count("fills"), reporter.count("ledger")) == (3, 1)
    assert [(entry["records"], entry["by_topic"], entry["example"]["offset"])
            for entry in logs] == [(1, {"fills": 1}, 0), (3, {"fills": 2, "ledger": 1}, 1)]


@pytest.mark.asyncio(loop_scope="session")
async def test_miskeyed_fills_and_deposits_are_applied_and_counted(
        broker: EmbeddedBroker) -> None:
    settings = fresh_settings(broker.bootstrap)
    await create_topics(settings)
    t = settings.topics
    _, _, b_deposit = deposit(t, "b", 10_000)
    with structlog.testing.capture_logs() as logs:
        async with RunningMonitor(settings, parse_config(RISK)) as monitor:
            # b's deposit has no key, its fill is keyed by the fill's id; a's are keyed right.
            ends = await produce(broker.bootstrap, [
                tick(t, "BTC-PERP", 60_000), deposit(t, "a", 5_000), (t.ledger, None, b_deposit),
                fill(t, "f1", "a", "BTC-PERP", 0.1, 60_000)])
            _, _, b_fill = fill(t, "f2", "b", "BTC-PERP", 1, 60_000)
            ends |= await produce(broker.bootstrap, [(t.fills, b"f2", b_fill)])
            await wait_processed(monitor, ends)
            b = monitor.engine.accounts["b"]
            assert (b.balances["USDT"], b.positions["BTC-PERP"].qty) == (10_000, 1)
            count = monitor.metrics.registry.get_sample_value
            # a's deposit and fill, keyed by a, are not counted
            assert count("liqmon_records_miskeyed_total", {"topic": t.ledger}) == 1
            assert count("liqmon_records_miskeyed_total", {"topic": t.fills}) == 1
    first = next(entry for entry in logs if entry["event"] == MISKEYED)
    assert first["example"] == {"topic": t.ledger, "partition": 0, "offset": 1, "key": None,
                                "account": "b"}


@pytest.mark.asyncio(loop_scope="session")
async def test_an_account_emptied_by_a_miskeyed_record_stays_forgotten_after_a_restart(
        broker: EmbeddedBroker) -> None:
    """b deposits 100 USDT on ledger partition 0 (checkpointed there), then withdraws it all
    with a record that lands on partition 1: b is blank and forgotten. Its tombstone went to
    partition 1, and a restart found b's snapshot on 0, with 100 USDT: b came back."""
    settings = replace(fresh_settings(broker.bootstrap), partitions=2)
    await create_topics(settings)
    t, config = settings.topics, parse_config(RISK)
    _, _, deposited = deposit(t, "b", 100, "d1")
    withdrawn = orjson.dumps({"entry_id": "w1", "account": "b", "asset": "USDT",
                              "amount": -100.0, "kind": "withdrawal", "ts": 2})
    for on_partition in ((t.ledger, b"b", deposited, 0), (t.ledger, b"b", withdrawn, 1)):
        async with RunningMonitor(settings, config) as monitor:  # each stop checkpoints
            await wait_processed(monitor, await produce(broker.bootstrap, [on_partition]))
    assert "b" not in monitor.engine.accounts
    async with RunningMonitor(settings, config) as monitor:
        assert "b" not in monitor.engine.accounts
