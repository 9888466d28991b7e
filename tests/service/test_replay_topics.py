"""`liqmon replay --bootstrap`: the input topics themselves replayed in the order the service
applies them (SPEC §6), as an operator audits what the fleet published."""

from __future__ import annotations

import asyncio
import random
import subprocess
import sys

import orjson
import pytest
from aiokafka import AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from monitor.config import load_config
from monitor.service.input_history import (
    InputHistory,
    InputMessage,
    SortedRecords,
    read_input_history,
)
from monitor.service.topics import create_topics
from tests.support.kafka import RunningMonitor, fresh_settings, wait_processed
from tests.support.paths import REPO

CONFIG = REPO / "examples" / "risk.toml"


def liqmon(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "monitor.cli", *args], capture_output=True,
                          text=True, timeout=120, check=False)


async def produce_stamped(bootstrap: str, messages: list[tuple[str, bytes, bytes, int]]) -> None:
    """(topic, key, value, Kafka timestamp), each acknowledged before the next is sent."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    try:
        for topic, key, value, timestamp in messages:
            await producer.send_and_wait(topic, value, key=key, timestamp_ms=timestamp)
    finally:
        await producer.stop()


async def test_records_are_applied_by_kafka_timestamp_not_in_the_order_produced(broker):
    """alice deposits 1,000 USDT, then buys 1 BTC-PERP at 50,000 stamped at 3 s; a tick at
    40,000 stamped at 2 s is produced after the fill. In timestamp order the tick comes first,
    and the fill liquidates her at once (equity 1,000 − 10,000): the event names the fill, at
    its partition and offset. (In the order produced, or by topic rank alone, the fill would
    be valued at its own price, healthy, and the tick would liquidate her.) A value that is
    not JSON is reported by where it is, and the run goes on."""
    settings = fresh_settings(broker.bootstrap)
    await create_topics(settings)
    t = settings.topics
    deposit = orjson.dumps({"entry_id": "d1", "account": "alice", "asset": "USDT",
                            "amount": 1_000.0, "kind": "deposit", "ts": 1_000})
    fill = orjson.dumps({"fill_id": "f1", "account": "alice", "symbol": "BTC-PERP",
                         "side": "buy", "qty": 1.0, "price": 50_000.0, "ts": 3_000})
    tick = orjson.dumps({"symbol": "BTC-PERP", "price": 40_000.0, "ts": 2_000})
    await produce_stamped(broker.bootstrap, [
        (t.ledger, b"alice", deposit, 1_000),
        (t.prices, b"BTC-PERP", b"not json", 500),
        (t.fills, b"alice", fill, 3_000),
        (t.prices, b"BTC-PERP", tick, 2_000),
    ])
    result = await asyncio.to_thread(
        liqmon, "replay", "--bootstrap", broker.bootstrap, "--config", str(CONFIG),
        "--topic-prices", t.prices, "--topic-fills", t.fills, "--topic-ledger", t.ledger)
    assert result.returncode == 0, result.stderr
    events = [orjson.loads(line) for line in result.stdout.splitlines()]
    assert [(e["type"], e["account"], e["trigger"]) for e in events] == [
        ("liquidation", "alice",
         {"kind": "fill", "ref": "f1", "topic": t.fills, "partition": 0, "offset": 0})]
    assert events[0]["equity"] == pytest.approx(-9_000.0)
    assert f"{t.prices}/0@0: rejected: invalid_json" in result.stderr
    assert "replay: read 4 records of " in result.stderr
    assert "replay: events: 1 (liquidation 1)" in result.stderr


def topic_args(settings) -> list[str]:
    t = settings.topics
    return ["--topic-prices", t.prices, "--topic-fills", t.fills, "--topic-ledger", t.ledger,
            "--topic-margin-calls", t.margin_calls, "--topic-liquidations", t.liquidations]


async def serve_alice(settings, ticks: list[tuple[float, int, int]]) -> None:
    """The service runs while alice deposits 1,000 USDT (at 1 s) and buys 1 BTC-PERP at
    50,000 (at 3 s); once it has applied them, ``ticks`` of BTC-PERP come: (price, ts, Kafka
    timestamp) each."""
    t = settings.topics
    deposit = orjson.dumps({"entry_id": "d1", "account": "alice", "asset": "USDT",
                            "amount": 1_000.0, "kind": "deposit", "ts": 1_000})
    fill = orjson.dumps({"fill_id": "f1", "account": "alice", "symbol": "BTC-PERP",
                         "side": "buy", "qty": 1.0, "price": 50_000.0, "ts": 3_000})
    async with RunningMonitor(settings, load_config(CONFIG)) as monitor:
        await produce_stamped(settings.bootstrap, [(t.ledger, b"alice", deposit, 1_000),
                                                   (t.fills, b"alice", fill, 3_000)])
        await wait_processed(monitor, {TopicPartition(t.ledger, 0): 1,
                                       TopicPartition(t.fills, 0): 1})
        await produce_stamped(settings.bootstrap, [
            (t.prices, b"BTC-PERP", orjson.dumps({"symbol": "BTC-PERP", "price": price,
                                                  "ts": ts}), timestamp)
            for price, ts, timestamp in ticks])
        await wait_processed(monitor, {TopicPartition(t.prices, 0): len(ticks)})


async def check_after_serving_alice(broker, ticks: list[tuple[float, int, int]],
                                    *flags: str) -> subprocess.CompletedProcess[str]:
    """`liqmon replay --bootstrap --check` of topics of their own, after `serve_alice`."""
    settings = fresh_settings(broker.bootstrap)
    await create_topics(settings)
    await serve_alice(settings, ticks)
    return await asyncio.to_thread(
        liqmon, "replay", "--bootstrap", broker.bootstrap, "--config", str(CONFIG), "--check",
        *topic_args(settings), *flags)


async def test_check_agrees_with_what_the_service_published(broker):
    """The tick is stamped after the fill and sent after it: live and replay apply the same
    order, and the one liquidation published is replay's."""
    result = await check_after_serving_alice(broker, [(40_000.0, 4_000, 4_000)])
    assert result.returncode == 0, result.stderr
    assert ("check: 1 event replayed, 1 published (0 repeats): agree; 0 missing, 0 extra, "
            "0 different, 0 repeats unlike the first, 0 unreadable") in result.stderr


async def test_check_shows_what_a_record_sent_after_one_that_sorts_after_it_changed(broker):
    """The tick is stamped 2 s, before the fill, but sent after the service applied the fill
    (counted late, liqmon_records_late_total): live, the tick liquidated alice; in timestamp
    order the fill does. The check exits 3 and names the event and the fields that differ."""
    result = await check_after_serving_alice(broker, [(40_000.0, 2_000, 2_000)])
    assert result.returncode == 3, result.stderr
    assert ("check: 1 event replayed, 1 published (0 repeats): DIFFER; 0 missing, 0 extra, "
            "1 different, 0 repeats unlike the first, 0 unreadable") in result.stderr
    assert "check: different alice:1:liquidation: trigger, ts\n" in result.stderr


FAR_AHEAD = [(1.0, 4_000 + 600_000, 4_000),  # ts 10 minutes past its Kafka timestamp
             (40_000.0, 5_000, 5_000)]


async def test_check_refuses_a_tick_stamped_in_the_future_as_the_service_did(broker):
    """A tick at 1.0 whose ts is 10 minutes past its Kafka timestamp: the service refuses it
    (ts_in_future, --max-future 300 s), and the tick at 40,000 after it liquidates alice.
    Replay of the topics refuses it too, by the same rule: had it applied it, that tick
    would have liquidated her, and made the next one stale."""
    result = await check_after_serving_alice(broker, FAR_AHEAD)
    assert result.returncode == 0, result.stderr
    assert "rejected: ts_in_future: ts: 604000 is more than --max-future ahead" in result.stderr
    assert "check: 1 event replayed, 1 published (0 repeats): agree" in result.stderr


async def test_check_with_a_longer_max_future_than_the_fleets_differs(broker):
    result = await check_after_serving_alice(broker, FAR_AHEAD, "--max-future", "900")
    assert result.returncode == 3, result.stderr
    assert "check: different alice:1:liquidation: " in result.stderr


async def test_a_missing_input_topic_exits_1_naming_it_and_is_not_created(broker):
    settings = fresh_settings(broker.bootstrap)
    t = settings.topics
    result = await asyncio.to_thread(
        liqmon, "replay", "--bootstrap", broker.bootstrap, "--config", str(CONFIG),
        "--topic-prices", t.prices, "--topic-fills", t.fills, "--topic-ledger", t.ledger)
    assert result.returncode == 1
    assert (f"topics {t.prices!r}, {t.fills!r}, {t.ledger!r} not found"
            in result.stderr)
    admin = AIOKafkaAdminClient(bootstrap_servers=broker.bootstrap)
    await admin.start()
    try:
        assert not {t.prices, t.fills, t.ledger} & set(await admin.list_topics())
    finally:
        await admin.close()


def test_an_unreachable_broker_exits_1() -> None:
    # port 1: nothing listens there, the connection is refused at once
    result = liqmon("replay", "--bootstrap", "127.0.0.1:1", "--config", str(CONFIG))
    assert result.returncode == 1
    assert "cannot read the input topics from 127.0.0.1:1" in result.stderr


def test_an_invalid_topic_name_is_a_usage_error() -> None:
    result = liqmon("replay", "--bootstrap", "127.0.0.1:1", "--config", str(CONFIG),
                    "--topic-fills", "fills?")
    assert result.returncode == 2
    assert "--topic-fills 'fills?' is not a valid Kafka topic name" in result.stderr


def test_the_summary_says_which_partitions_lost_their_earliest_records() -> None:
    history = InputHistory(SortedRecords(names={}), ranges={
        TopicPartition("prices", 0): (0, 10),
        TopicPartition("fills", 0): (0, 0),
        TopicPartition("fills", 1): (1_200, 3_000),
    })
    assert history.summary() == (
        "read 0 records of prices (1 partition), fills (2 partitions) up to their ends at the "
        "start; the earliest records of fills/1 (before offset 1,200) are gone from Kafka: "
        "what they did is missing from this replay")


NAMES = {0: ("ledger", "ledger"), 1: ("fills", "fills"), 2: ("prices", "prices")}


def order(m: InputMessage) -> tuple[int, int, int, int]:
    return m.timestamp, m.rank, m.partition, m.offset


def test_records_beyond_what_is_held_in_memory_come_back_in_order_from_sorted_runs() -> None:
    """100 records, fetched 9 at a time, at most 16 held in memory: five sorted runs of 18 go
    to disk and ten records stay; merged, they come back in (timestamp, rank, partition,
    offset) order, timestamp ties, tombstones and empty values included."""
    rng = random.Random(7)
    messages = []
    for offset in range(100):
        rank = rng.randrange(3)
        topic, kind = NAMES[rank]
        value = rng.choice([None, b"", b'{"n": %d}' % offset])
        messages.append(InputMessage(rng.randrange(20), rank, rng.randrange(2), offset, topic,
                                     kind, value))
    records = SortedRecords(NAMES, in_memory=16)
    for start in range(0, 100, 9):
        records.extend(messages[start:start + 9])
    assert (records.count, len(records.runs), len(records.held)) == (100, 5, 10)
    assert list(records.sorted()) == sorted(messages, key=order)
    runs = records.runs
    records.close()
    assert all(run.closed for run in runs)


async def test_the_topics_read_through_sorted_runs_come_back_as_read_in_memory(broker):
    """The same topics read twice, holding all their records at once and 5 at a time: the
    same records, in the same order."""
    settings = fresh_settings(broker.bootstrap, partitions=2)
    await create_topics(settings)
    t = settings.topics
    rng = random.Random(3)
    await produce_stamped(broker.bootstrap, [
        (rng.choice([t.prices, t.fills, t.ledger]), b"k%d" % rng.randrange(5), b"%d" % n,
         1_000 + rng.randrange(30)) for n in range(40)])

    async def read(in_memory: int) -> tuple[int, list[tuple]]:
        """(sorted runs written to disk, the records in order)"""
        history = await read_input_history(broker.bootstrap, t, in_memory=in_memory)
        try:
            assert history.records.count == 40
            return len(history.records.runs), list(history.inputs())
        finally:
            history.close()

    (spilled, in_runs), (none, in_memory) = await read(5), await read(1_000)
    assert spilled > 0 and none == 0
    assert in_runs == in_memory
