"""A catch-up (SPEC §6) on the embedded broker, driven through the `Restorer` directly: a
gained partition's records replayed with the ticks in between, up to where this instance is."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

import orjson
import pytest
import structlog
from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition

from monitor.config import fingerprint, load_config
from monitor.engine import Engine
from monitor.events import Source
from monitor.records import decode
from monitor.service.changelog import RestoredPartition
from monitor.service.checkpointer import Checkpointer
from monitor.service.clients import Clients
from monitor.service.metrics import Metrics
from monitor.service.positions import MergeKey, Positions
from monitor.service.restorer import Restorer
from monitor.service.settings import ServiceSettings
from monitor.service.topics import create_topics
from monitor.snapshot import Snapshots
from tests.support.kafka import fresh_settings, produce
from tests.support.paths import REPO

pytestmark = pytest.mark.asyncio(loop_scope="session")
CONFIG = load_config(REPO / "examples" / "risk.toml")
FIRST_TS = 1_700_000_000_000


async def deposit_fill_tick(settings: ServiceSettings) -> None:
    """Partition 0's deposit, then its fill, then a tick, 1 ms apart from FIRST_TS."""
    t = settings.topics
    await produce(settings.bootstrap, [
        (t.ledger, b"a", orjson.dumps({"entry_id": "d1", "account": "a", "asset": "USDT",
                                       "amount": 1_000.0, "kind": "deposit"})),
        (t.fills, b"a", orjson.dumps({"fill_id": "f1", "account": "a", "symbol": "BTC-PERP",
                                      "side": "buy", "qty": 0.01, "price": 50_000.0})),
        (t.prices, b"BTC-PERP", orjson.dumps({"symbol": "BTC-PERP", "price": 50_000.0}))],
        first_timestamp_ms=FIRST_TS)


def recording_restorer(settings: ServiceSettings, engine: Engine, positions: Positions,
                       metrics: Metrics, clients: Clients
                       ) -> tuple[Restorer, list[tuple[str, int]]]:
    """A restorer whose catch-ups record what they replay, as (topic, offset), and apply
    nothing."""
    replayed: list[tuple[str, int]] = []

    async def replay(batch: list[tuple[TopicPartition, ConsumerRecord]], _: Engine) -> None:
        replayed.extend((tp.topic, record.offset) for tp, record in batch)

    restorer = Restorer(settings, CONFIG, engine, positions,
                        Checkpointer(engine, positions, settings, metrics, fingerprint(CONFIG)),
                        clients, metrics, fingerprint(CONFIG), structlog.get_logger("liqmon"),
                        lambda: None, replay)
    return restorer, replayed


def never_checkpointed(partition: int = 0) -> RestoredPartition:
    return RestoredPartition(partition=partition, control=None,
                             snapshots=Snapshots.from_accounts([]))


@contextlib.asynccontextmanager
async def gained_behind_the_tick(settings: ServiceSettings, frontier: MergeKey | None
                                 ) -> AsyncIterator[tuple[Positions, Metrics, AIOKafkaConsumer]]:
    """Partition 0's deposit, fill and tick in Kafka; the positions of an instance that applied
    the tick (its loop's frontier as given) and gained partition 0's fills and ledger; a
    consumer assigned those two, stopped on leaving."""
    await create_topics(settings)
    t = settings.topics
    await deposit_fill_tick(settings)
    metrics = Metrics()
    positions = Positions(t, max_skew_ms=5, max_wait=0.5, max_stall=1.0, metrics=metrics)
    positions.seek(TopicPartition(t.prices, 0), 1)  # the tick is applied here
    positions.frontier = frontier
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.bootstrap)
    await consumer.start()
    consumer.assign([TopicPartition(t.fills, 0), TopicPartition(t.ledger, 0)])
    try:
        yield positions, metrics, consumer
    finally:
        await consumer.stop()


class FillsWithheld(Clients):
    """The catch-up reader gets the gained partition's fills paused: the broker holds a record
    there (its end says so) that no fetch brings, as a broker that stopped serving it would."""

    reader: AIOKafkaConsumer

    def __init__(self, settings, fills: TopicPartition) -> None:
        super().__init__(settings)
        self.fills = fills

    def catch_up_reader(self) -> AIOKafkaConsumer:
        reader = self.reader = super().catch_up_reader()
        assign = reader.assign

        def assign_with_fills_paused(partitions: list[TopicPartition]) -> None:
            assign(partitions)
            reader.pause(self.fills)

        reader.assign = assign_with_fills_paused  # type: ignore[method-assign]
        return reader


async def test_a_catch_up_whose_partition_delivers_nothing_reports_it_and_finishes_later(broker):
    """A catch-up must read the gained partition to its end before its records join the loop
    (releasing them early would change the first pass's events), and it holds the loop
    meanwhile. So a partition that delivers nothing is named after --stall-timeout — an error
    line, `liqmon_input_stalled`, /readyz's reason — and once it delivers, the catch-up
    finishes with every record, in timestamp order."""
    settings = fresh_settings(broker.bootstrap, max_stall=1.0)
    t = settings.topics
    fills, gauge = TopicPartition(t.fills, 0), {"topic": t.fills, "partition": "0"}
    # this instance applied the tick: the gained partition is behind
    async with gained_behind_the_tick(settings, (FIRST_TS + 2, 2, 0, 0)) as (
            positions, metrics, consumer):
        clients = FillsWithheld(settings, fills)
        restorer, replayed = recording_restorer(settings, Engine(CONFIG), positions, metrics,
                                                clients)
        with structlog.testing.capture_logs() as logs:
            catch_up = asyncio.create_task(restorer.catch_up([never_checkpointed()], consumer))
            deadline = time.monotonic() + 30
            while metrics.registry.get_sample_value("liqmon_input_stalled", gauge) is None:
                assert time.monotonic() < deadline and not catch_up.done()
                await asyncio.sleep(0.05)
            assert restorer.catching_up is not None
            assert restorer.catching_up.describe().endswith(
                f"waiting for {t.fills}/0 (read to 0, end unknown), which the broker does not "
                "deliver")
            assert replayed == []  # the deposit and the tick wait for the fill
            clients.reader.resume(fills)
            assert await asyncio.wait_for(catch_up, timeout=30) == 3
    assert replayed == [(t.ledger, 0), (t.fills, 0), (t.prices, 0)]
    assert metrics.registry.get_sample_value("liqmon_input_stalled", gauge) is None
    assert restorer.catching_up is None
    said = [(entry["event"].split(":")[0], entry["log_level"]) for entry in logs]
    assert said == [("catch-up stalled", "error"), ("catch-up delivers again", "info")]
    assert logs[0]["waiting_on"] == [{"topic": t.fills, "partition": 0, "read_to": 0,
                                      "end": None}]


@pytest.mark.parametrize("frontier", [None, (FIRST_TS, 0, 0, 0)], ids=["unset", "before-the-fill"])
async def test_a_gained_partitions_records_before_ticks_the_instance_applied_are_caught_up(
        broker, frontier):
    """This instance applied the tick (its price position is past it), but its frontier, the
    last record its loop applied, says less: unset, or a record applied late, before the
    fill. The fill sorts before the tick, so the catch-up applies it, then the tick, as the
    first pass did. Left to the loop, the fill would come after the tick: seen in a chaos
    drill, as events of an account valued without a position it held."""
    settings = fresh_settings(broker.bootstrap)
    t = settings.topics
    async with gained_behind_the_tick(settings, frontier) as (positions, metrics, consumer):
        restorer, replayed = recording_restorer(settings, Engine(CONFIG), positions, metrics,
                                                Clients(settings))
        await asyncio.wait_for(restorer.catch_up([never_checkpointed()], consumer), timeout=30)
    assert replayed == [(t.ledger, 0), (t.fills, 0), (t.prices, 0)]


async def test_partitions_gained_together_are_caught_up_in_one_pass_reading_each_tick_once(
        broker):
    """Partitions 0 and 1, never checkpointed, each with a deposit before a tick this instance
    applied: one catch-up replays both deposits and the tick once (one per partition applied
    the tick twice, and read the price stream twice), then both join the loop's merge."""
    settings = fresh_settings(broker.bootstrap, partitions=2)
    t = settings.topics
    await create_topics(settings)

    def deposit(account: str) -> bytes:
        return orjson.dumps({"entry_id": f"d-{account}", "account": account, "asset": "USDT",
                             "amount": 1_000.0, "kind": "deposit"})

    await produce(settings.bootstrap, [
        (t.ledger, b"a", deposit("a"), 0), (t.ledger, b"b", deposit("b"), 1),
        (t.prices, b"BTC-PERP", orjson.dumps({"symbol": "BTC-PERP", "price": 50_000.0}), 0)],
        first_timestamp_ms=FIRST_TS)
    metrics = Metrics()
    positions = Positions(t, max_skew_ms=5, max_wait=0.5, max_stall=1.0, metrics=metrics)
    positions.seek(TopicPartition(t.prices, 0), 1)  # the tick is applied here
    gained = [TopicPartition(topic, p) for p in (0, 1) for topic in (t.fills, t.ledger)]
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.bootstrap)
    await consumer.start()
    consumer.assign(gained)
    try:
        restorer, replayed = recording_restorer(settings, Engine(CONFIG), positions, metrics,
                                                Clients(settings))
        await asyncio.wait_for(
            restorer.catch_up([never_checkpointed(0), never_checkpointed(1)], consumer),
            timeout=30)
    finally:
        await consumer.stop()
    assert replayed == [(t.ledger, 0), (t.ledger, 0), (t.prices, 0)]
    assert {tp: positions.processed[tp] for tp in gained} == {
        TopicPartition(t.fills, 0): 0, TopicPartition(t.ledger, 0): 1,
        TopicPartition(t.fills, 1): 0, TopicPartition(t.ledger, 1): 1}


async def test_an_account_a_catch_up_empties_is_tombstoned_in_the_gained_partition(broker):
    """"b" deposits and withdraws it all in the gained partition: blank, the catch-up's
    private engine forgets it, and the main engine never held it. The main engine must still
    hand it to the next checkpoint, with that partition for its tombstone; "a", held now,
    with it."""
    settings = fresh_settings(broker.bootstrap)
    t = settings.topics
    await create_topics(settings)

    def entry(n: int, account: str, amount: float) -> tuple[str, bytes, bytes, int]:
        kind = "deposit" if amount > 0 else "withdrawal"
        return (t.ledger, account.encode(), orjson.dumps(
            {"entry_id": f"e{n}", "account": account, "asset": "USDT", "amount": amount,
             "kind": kind, "ts": FIRST_TS + n}), 0)

    tick = (t.prices, b"BTC-PERP", orjson.dumps(
        {"symbol": "BTC-PERP", "price": 50_000.0, "ts": FIRST_TS + 3}), 0)
    await produce(settings.bootstrap, [entry(0, "b", 100.0), entry(1, "b", -100.0),
                                       entry(2, "a", 1_000.0), tick],
                  first_timestamp_ms=FIRST_TS)
    metrics = Metrics()
    positions = Positions(t, max_skew_ms=5, max_wait=0.5, max_stall=1.0, metrics=metrics)
    positions.seek(TopicPartition(t.prices, 0), 1)  # this instance applied the tick
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.bootstrap)
    await consumer.start()
    consumer.assign([TopicPartition(t.fills, 0), TopicPartition(t.ledger, 0)])
    engine = Engine(CONFIG)

    async def replay(batch: list[tuple[TopicPartition, ConsumerRecord]], private: Engine
                     ) -> None:
        for tp, record in batch:
            kind = "prices" if tp.topic == t.prices else "ledger"
            private.apply(decode(kind, record.value, CONFIG),
                          Source(tp.topic, tp.partition, record.offset))

    restorer = Restorer(settings, CONFIG, engine, positions,
                        Checkpointer(engine, positions, settings, metrics, fingerprint(CONFIG)),
                        Clients(settings), metrics, fingerprint(CONFIG),
                        structlog.get_logger("liqmon"), lambda: None, replay)
    try:
        assert await asyncio.wait_for(restorer.catch_up([never_checkpointed()], consumer),
                                      timeout=30) == 4
    finally:
        await consumer.stop()
    assert "b" not in engine.accounts
    taken = engine.take_dirty()
    assert dict(zip(taken.keys, taken.partitions.tolist(), strict=True)) == {"a": 0, "b": 0}


def replayed_batch(ticks_again: bool) -> tuple[ServiceSettings, list[str], Metrics]:
    """A deposit, a bad tick and a tick that liquidates nobody, applied by a monitor as a
    catch-up applies them (``ticks_again``) or as its loop does: its settings, the topics of
    what goes out, and its metrics."""
    from monitor.service.runner import Monitor
    from tests.support.messages import deposit, tick

    settings = fresh_settings("127.0.0.1:1")
    t = settings.topics
    monitor = Monitor(settings, load_config(REPO / "examples" / "risk.toml"))
    messages = [deposit(t, "alice", 100.0), (t.prices, b"BTC", b"not json"),
                tick(t, "BTC", 60_000.0)]
    batch = [(TopicPartition(topic, 0), ConsumerRecord(topic, 0, offset, 1, 0, key, value,
                                                       None, len(key), len(value), ()))
             for offset, (topic, key, value) in enumerate(messages)]
    out = monitor.apply_batch(batch, Engine(monitor.config), ticks_again=ticks_again)
    return settings, [message.topic for message in out], monitor.metrics


def consumed(metrics: Metrics, topic: str) -> float | None:
    return metrics.registry.get_sample_value("liqmon_records_consumed_total", {"topic": topic})


async def test_a_catch_up_neither_counts_nor_dead_letters_the_ticks_this_instance_applied(
        ) -> None:
    """They were counted, and the bad one dead-lettered, when the loop applied them."""
    settings, sent, metrics = replayed_batch(ticks_again=True)
    t = settings.topics
    assert t.dead_letter not in sent
    assert (consumed(metrics, t.prices), consumed(metrics, t.ledger)) == (0, 1)


async def test_the_loop_counts_and_dead_letters_every_tick() -> None:
    settings, sent, metrics = replayed_batch(ticks_again=False)
    t = settings.topics
    assert sent.count(t.dead_letter) == 1
    assert (consumed(metrics, t.prices), consumed(metrics, t.ledger)) == (2, 1)
