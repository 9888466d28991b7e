"""Live order equals replay order (SPEC §6): whenever producers' timestamps are ordered, the
service's events equal `liqmon replay`'s of the same records sorted by (Kafka timestamp, topic
rank, partition, offset), id for id and value for value — however the records are spread over
partitions and whenever they are fetched."""

from __future__ import annotations

import asyncio
import io
import time
from dataclasses import replace

import orjson
import pytest
import structlog
from aiokafka import AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from monitor.config import load_config
from monitor.engine import Engine
from monitor.service import runner
from monitor.service.broker import EmbeddedBroker
from monitor.service.input_history import replay_topics
from monitor.service.runner import Monitor
from monitor.service.settings import ServiceSettings
from tests.support.kafka import (
    RunningMonitor,
    fresh_settings,
    read_events,
    replayed,
    routable,
    same_events,
    wait_processed,
    without_wall_clock,
    write_commit_marker,
)
from tests.support.paths import REPO
from tests.support.streams import random_stream

pytestmark = pytest.mark.asyncio(loop_scope="session")
RANK = {"ledger": 0, "fills": 1, "prices": 2}
CONFIG = REPO / "examples" / "risk.toml"


async def create_inputs(settings, prices: int, accounts: int) -> None:
    t = settings.topics
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(t.prices, prices, 1),
                                   NewTopic(t.fills, accounts, 1),
                                   NewTopic(t.ledger, accounts, 1)])
    finally:
        await admin.close()


class Located:
    """Records as produced: where each landed and its Kafka timestamp (wall clock at send)."""

    def __init__(self, settings) -> None:
        self.bootstrap = settings.bootstrap
        self.names = {"prices": settings.topics.prices, "fills": settings.topics.fills,
                      "ledger": settings.topics.ledger}
        self.records: list[tuple[str, bytes, bytes]] = []
        self.keys: list[tuple[int, int, int, int]] = []
        self.locations: list[tuple[str, int, int]] = []
        self.ends: dict[TopicPartition, int] = {}

    def landed(self, record, timestamp: int, meta) -> None:
        self.records.append(record)
        self.keys.append((timestamp, RANK[record[0]], meta.partition, meta.offset))
        self.locations.append((meta.topic, meta.partition, meta.offset))
        tp = TopicPartition(meta.topic, meta.partition)
        self.ends[tp] = max(self.ends.get(tp, 0), meta.offset + 1)

    def in_timestamp_order(self) -> tuple[list, list]:
        order = sorted(range(len(self.records)), key=self.keys.__getitem__)
        return [self.records[i] for i in order], [self.locations[i] for i in order]


async def produce(located: Located, records, *, sequential: bool, rate: float = 0,
                  **batching: int) -> None:
    """Each record stamped with the wall clock when sent. Sequential: each acknowledged before
    the next is sent. Otherwise paced at ``rate`` records/s, acknowledgements not awaited.
    ``batching``: the producer's max_batch_size and linger_ms, if not its defaults."""
    producer = AIOKafkaProducer(bootstrap_servers=located.bootstrap, acks="all", **batching)
    await producer.start()
    try:
        pending = []
        started = time.monotonic()
        for n, record in enumerate(records):
            kind, key, value = record
            timestamp = int(time.time() * 1000)
            future = await producer.send(located.names[kind], value, key=key,
                                         timestamp_ms=timestamp)
            if sequential:
                located.landed(record, timestamp, await future)
                continue
            pending.append((record, timestamp, future))
            if rate and n % 20 == 19:
                await asyncio.sleep(max(0.0, started + (n + 1) / rate - time.monotonic()))
        for record, timestamp, future in pending:
            located.landed(record, timestamp, await future)
    finally:
        await producer.stop()


def late_records(monitor) -> float:
    """`liqmon_records_late_total`, every topic."""
    return sum(sample.value for metric in monitor.metrics.registry.collect()
               if metric.name == "liqmon_records_late" for sample in metric.samples
               if sample.name == "liqmon_records_late_total")


async def run_and_compare(settings, config, feed) -> list[dict]:
    located = Located(settings)
    async with RunningMonitor(settings, config) as monitor:
        await feed(located)
        await wait_processed(monitor, located.ends, timeout=120)
        assert monitor.metrics.merge_forced._value.get() == 0
        assert late_records(monitor) == 0
    events = await read_events(settings.bootstrap, settings.topics)
    records, locations = located.in_timestamp_order()
    expected = replayed(records, config)
    same_events(events, expected, locations)
    return events


async def test_one_sequential_producer_over_a_mixed_stream_gives_replays_events(broker):
    """The issue's first case: a tick acknowledged before a fill was sent must be applied
    before it, although they are on different topics fetched by different consumers."""
    config = load_config(CONFIG)
    settings = fresh_settings(broker.bootstrap)
    await create_inputs(settings, prices=1, accounts=1)
    records = routable(random_stream(seed=41, length=700))

    async def feed(located: Located) -> None:
        await produce(located, records, sequential=True)

    events = await run_and_compare(settings, config, feed)
    assert len(events) > 20  # the stream moves accounts through their states


async def test_several_partitions_at_a_steady_rate_give_replays_events(broker):
    """prices on 1 partition, fills and ledger on 4, one producer at 800 records/s not
    waiting for acknowledgements; the skew bound covers this machine's in-flight time."""
    config = load_config(CONFIG)
    settings = replace(fresh_settings(broker.bootstrap), max_skew_ms=1_000, max_idle=60.0)
    await create_inputs(settings, prices=1, accounts=4)
    records = routable(random_stream(seed=42, length=2_400))

    async def feed(located: Located) -> None:
        await produce(located, records, sequential=False, rate=800)

    events = await run_and_compare(settings, config, feed)
    assert len(events) > 50


async def test_the_services_events_are_the_replay_of_its_input_topics_but_emitted_at(broker):
    """`liqmon replay --bootstrap` reads the topics back and applies them in the service's
    order: its events are the service's, trigger partitions and offsets included."""
    config = load_config(CONFIG)
    settings = replace(fresh_settings(broker.bootstrap), max_skew_ms=1_000, max_idle=60.0)
    await create_inputs(settings, prices=1, accounts=4)
    records = routable(random_stream(seed=43, length=1_200))
    located = Located(settings)
    async with RunningMonitor(settings, config) as monitor:
        await produce(located, records, sequential=False, rate=800)
        await wait_processed(monitor, located.ends, timeout=120)
        assert monitor.metrics.merge_forced._value.get() == 0
        assert late_records(monitor) == 0
    live = await read_events(settings.bootstrap, settings.topics)
    out = io.BytesIO()
    history, _ = await replay_topics(settings.bootstrap, settings.topics, Engine(config), out,
                                     lambda source, rejection: None)
    replayed = [orjson.loads(line) for line in out.getvalue().splitlines()]
    assert history.records.count == len(records)
    assert len(replayed) > 30  # the stream moves accounts through their states

    def by_id(events: list[dict]) -> list[dict]:
        return sorted(map(without_wall_clock, events), key=lambda e: e["event_id"])

    assert by_id(live) == by_id(replayed)


async def test_partitions_ending_in_a_transaction_marker_hold_nothing_back(broker):
    """A transactional producer's commit markers take offsets that no record is handed over
    at. Fills and ledger get one half-way and one as their last offset, then a last tick
    comes: it needs both to be read to their ends, which they are, markers included — so it
    goes out in proven order (none forced), with replay's events, instead of waiting for ever
    for what will never be read."""
    config = load_config(CONFIG)
    settings = fresh_settings(broker.bootstrap)
    await create_inputs(settings, prices=1, accounts=1)
    records = routable(random_stream(seed=9, length=300))
    last_tick = max(n for n, (kind, _, _) in enumerate(records) if kind == "prices")
    tick = records.pop(last_tick)
    markers = [TopicPartition(settings.topics.fills, 0), TopicPartition(settings.topics.ledger, 0)]

    async def feed(located: Located) -> None:
        for part in (records[:150], records[150:]):
            await produce(located, part, sequential=True)
            for tp in markers:
                await write_commit_marker(settings.bootstrap, tp)
        await produce(located, [tick], sequential=True)

    events = await run_and_compare(settings, config, feed)
    assert events  # the stream moves accounts through their states


async def test_a_backlog_of_deposits_then_fills_applies_every_deposit_first(broker):
    """20,000 deposits, then 80,000 fills that each account can only afford with its deposit,
    all produced before the service starts (4 partitions): no account is liquidated."""
    config = load_config(CONFIG)
    settings = fresh_settings(broker.bootstrap)
    await create_inputs(settings, prices=1, accounts=4)
    accounts = [f"acct-{n}" for n in range(20_000)]

    def value(document: dict) -> bytes:
        return orjson.dumps({**document, "ts": 1})

    tick = [("prices", b"BTC-PERP",
             value({"symbol": "BTC-PERP", "price": 50_000.0}))]
    deposits = [("ledger", a.encode(), value({
        "entry_id": f"dep-{a}", "account": a, "asset": "USDT", "amount": 1_000.0,
        "kind": "deposit"})) for a in accounts]
    # four buys of 0.01 BTC each: 2,000 notional, maintenance 8 against 1,000 of collateral;
    # applied before the deposit, equity 0 and a liquidation
    fills = [("fills", a.encode(), value({
        "fill_id": f"f{n}-{a}", "account": a, "symbol": "BTC-PERP", "side": "buy",
        "qty": 0.01, "price": 50_000.0})) for n in range(4) for a in accounts]
    located = Located(settings)
    for batch in (tick, deposits, fills):
        await produce(located, batch, sequential=False)
    async with RunningMonitor(settings, config) as monitor:
        await wait_processed(monitor, located.ends, timeout=300)
        assert monitor.metrics.merge_forced._value.get() == 0
        assert late_records(monitor) == 0
    events = await read_events(settings.bootstrap, settings.topics)
    assert events == []
    records, _ = located.in_timestamp_order()
    assert replayed(records, config) == []


async def test_a_record_stamped_before_one_already_applied_is_counted_late_and_logged(broker):
    """A producer whose clock runs a second behind: its fill arrives after a tick stamped
    later has been applied. Replay of the records sorted applies the fill first, so live
    results may differ from replay's: `liqmon_records_late_total` counts it by topic, and a
    warning says how far behind it was and the --max-skew it exceeded. A second one soon
    after is counted, not logged: the line comes at most once every 30 s."""
    config = load_config(CONFIG)
    settings = fresh_settings(broker.bootstrap)
    await create_inputs(settings, prices=1, accounts=1)
    t = settings.topics
    now = int(time.time() * 1000)
    tick = orjson.dumps({"symbol": "BTC-PERP", "price": 50_000.0, "ts": now})
    fills = [orjson.dumps({"fill_id": f"f{n}", "account": "a", "symbol": "BTC-PERP",
                           "side": "buy", "qty": 0.01, "price": 50_000.0, "ts": now - 1_000})
             for n in (1, 2)]
    with structlog.testing.capture_logs() as logs:
        async with RunningMonitor(settings, config) as monitor:
            producer = AIOKafkaProducer(bootstrap_servers=settings.bootstrap, acks="all")
            await producer.start()
            try:
                await producer.send_and_wait(t.prices, tick, key=b"BTC-PERP", timestamp_ms=now)
                await wait_processed(monitor, {TopicPartition(t.prices, 0): 1}, timeout=60)
                for n, fill in enumerate(fills, start=1):
                    await producer.send_and_wait(t.fills, fill, key=b"a",
                                                 timestamp_ms=now - 1_000)
                    await wait_processed(monitor, {TopicPartition(t.fills, 0): n}, timeout=60)
            finally:
                await producer.stop()
            sample = monitor.metrics.registry.get_sample_value
            assert sample("liqmon_records_late_total", {"topic": t.fills}) == 2
            assert sample("liqmon_records_late_total", {"topic": t.prices}) == 0
            assert monitor.metrics.merge_forced._value.get() == 0
    late = [entry for entry in logs if entry["event"].startswith("applied records later")]
    assert [(e["log_level"], e["records"], e["by_topic"], e["most_behind_ms"], e["max_skew_ms"])
            for e in late] == [("warning", 1, {t.fills: 1}, 1_000, settings.max_skew_ms)]
    assert late[0]["arrived_after_timestamp_ms"] >= 1_000  # the clock's second, and the fetch


async def test_late_and_stamped_ahead_records_are_counted_and_said_apart():
    """The merge's two kinds of record out of replay's order, each with its counter and its
    own line (how far behind, or how far ahead)."""
    settings = fresh_settings("127.0.0.1:9")  # never connected
    t = settings.topics
    monitor = Monitor(settings, load_config(CONFIG))
    merge = monitor._positions.merge
    sample = monitor.metrics.registry.get_sample_value
    with structlog.testing.capture_logs() as logs:
        merge.late, merge.late_by_ms = {t.fills: 2}, 40
        merge.ahead, merge.ahead_by_ms = {t.prices: 1}, 600_000
        monitor._report_order(merge)
    assert sample("liqmon_records_late_total", {"topic": t.fills}) == 2
    assert sample("liqmon_records_stamped_ahead_total", {"topic": t.prices}) == 1
    assert sample("liqmon_records_stamped_ahead_total", {"topic": t.fills}) == 0
    assert [(e["event"].split(":")[0], e["by_topic"], e.get("most_behind_ms"),
             e.get("most_ahead_ms")) for e in logs] == [
        ("applied records later than replay would apply them", {t.fills: 2}, 40, None),
        ("applied records stamped further ahead of their arrival than --merge-wait in the "
         "order they arrived", {t.prices: 1}, None, 600_000)]
    assert (merge.late_by_ms, merge.ahead_by_ms) == (0, 0)  # said: the next line's own


async def test_a_record_stamped_ten_minutes_ahead_holds_its_partition_back_no_longer_than_the_merge_wait(  # noqa: E501
        broker):
    """A producer host whose clock runs 10 minutes ahead stamps a deposit: proving it in
    order would take until the wall clock got there, and while ticks keep coming (each sorts
    first) every later record of its partition would wait with it. It is applied in the order
    it arrived, as is the deposit after it, counted in `liqmon_records_stamped_ahead_total`
    and said in a warning."""
    config = load_config(CONFIG)
    settings = fresh_settings(broker.bootstrap)
    await create_inputs(settings, prices=1, accounts=1)
    t = settings.topics
    ledger = TopicPartition(t.ledger, 0)
    now = int(time.time() * 1000)
    with structlog.testing.capture_logs() as logs:
        async with RunningMonitor(settings, config) as monitor:
            producer = AIOKafkaProducer(bootstrap_servers=settings.bootstrap, acks="all")
            await producer.start()
            try:
                for n, stamped in enumerate((now + 600_000, int(time.time() * 1000))):
                    entry = orjson.dumps({"entry_id": f"d{n}", "account": "a", "asset": "USDT",
                                          "amount": 100.0, "kind": "deposit", "ts": now})
                    await producer.send_and_wait(t.ledger, entry, key=b"a", timestamp_ms=stamped)
                deadline = time.monotonic() + 60
                while monitor.processed_offsets().get(ledger, 0) < 2:
                    assert time.monotonic() < deadline, "the deposits are held back"
                    tick = orjson.dumps({"symbol": "BTC-PERP", "price": 50_000.0,
                                         "ts": int(time.time() * 1000)})
                    await producer.send_and_wait(t.prices, tick, key=b"BTC-PERP")
                    await asyncio.sleep(0.01)
            finally:
                await producer.stop()
            assert monitor.engine.accounts["a"].balances["USDT"] == 200.0
            sample = monitor.metrics.registry.get_sample_value
            assert sample("liqmon_records_stamped_ahead_total", {"topic": t.ledger}) == 1
    ahead = [e for e in logs if e["event"].startswith("applied records stamped further ahead")]
    assert [(e["log_level"], e["records"], e["by_topic"]) for e in ahead] == [
        ("warning", 1, {t.ledger: 1})]
    assert 590_000 < ahead[0]["most_ahead_ms"] <= 600_000  # less the time to arrive


@pytest.mark.kafka  # starts a broker of its own
async def test_no_record_is_released_without_proof_of_order_while_no_broker_answers() -> None:
    """A tick is held for a proof (--max-skew 2 s) when the only broker stops answering, for
    4 s: eight times --merge-wait (0.5 s). Released then, its events could not be published
    before the broker is back, and by then a probe proves its order: so it is held, and goes
    out proven once the broker answers again."""
    config = load_config(CONFIG)
    with EmbeddedBroker() as own_broker:  # paused: it must not stall the other tests
        settings = fresh_settings(own_broker.bootstrap, max_skew_ms=2_000)
        assert settings.max_idle == 0.5
        await create_inputs(settings, prices=1, accounts=1)
        prices = TopicPartition(settings.topics.prices, 0)
        with structlog.testing.capture_logs() as logs:
            async with RunningMonitor(settings, config) as monitor:
                located = Located(settings)
                tick = ("prices", b"BTC-PERP",
                        orjson.dumps({"symbol": "BTC-PERP", "price": 50_000.0}))
                await produce(located, [tick], sequential=True)
                merge = monitor._positions.merge
                deadline = time.monotonic() + 30
                while merge.buffered(prices) == 0:
                    assert time.monotonic() < deadline, "the tick was not fetched"
                    await asyncio.sleep(0.01)
                own_broker.pause()
                await asyncio.sleep(4.0)
                assert monitor.applied_offsets()[prices] == 0  # still held, not forced
                own_broker.resume()
                await wait_processed(monitor, located.ends, timeout=60)
                assert monitor.metrics.merge_forced._value.get() == 0
    said = [entry["event"] for entry in logs]
    assert "kafka unreachable, clients keep retrying" in said
    assert "released records out of proven order" not in said


async def test_a_partition_that_cannot_be_probed_while_kafka_answers_is_released_past_the_merge_wait(  # noqa: E501
        broker, monkeypatch):
    """The brokers answer, but not for the partitions a tick waits on (their leader is gone,
    say): neither probes nor fetches of them are answered. Past --merge-wait the tick is
    applied in the best order known, once a metadata request sent since shows that Kafka
    answers; counted and logged, with what it waited on."""
    config = load_config(CONFIG)
    settings = fresh_settings(broker.bootstrap)
    await create_inputs(settings, prices=1, accounts=1)
    t = settings.topics

    async def unanswered(tps):
        await asyncio.Event().wait()

    real_fetch = Monitor._fetch

    async def account_fetches_unanswered(self, consumer, limit):
        batch, read_to, taken_at = await real_fetch(self, consumer, limit)
        if any(tp.topic == t.ledger for tp in consumer.assignment()):
            return {}, {}, taken_at
        return batch, read_to, taken_at

    monkeypatch.setattr(Monitor, "_fetch", account_fetches_unanswered)
    with structlog.testing.capture_logs() as logs:
        async with RunningMonitor(settings, config) as monitor:
            monitor._probe.end_offsets = unanswered
            located = Located(settings)
            tick = ("prices", b"BTC-PERP", orjson.dumps({"symbol": "BTC-PERP", "price": 50_000.0}))
            await produce(located, [tick], sequential=True)
            await wait_processed(monitor, located.ends, timeout=60)
            assert monitor.metrics.merge_forced._value.get() == 1
    (forced,) = [e for e in logs if e["event"] == "released records out of proven order"]
    assert forced["records"] == 1
    assert sorted(forced["blocked_on"]) == [f"{t.fills}/0", f"{t.ledger}/0"]


async def test_records_released_out_of_proven_order_are_said_at_most_every_30_seconds():
    """With --merge-wait 0 nearly every turn of the loop releases records without proof: each
    is counted, and the warning sums them, at once the first time, then at most every 30 s
    (SPEC §8: never one line per input record)."""
    monitor = Monitor(fresh_settings("127.0.0.1:9"), load_config(REPO / "examples" / "risk.toml"))
    merge = monitor._positions.merge
    with structlog.testing.capture_logs() as logs:
        for forced in (1, 3, 7):  # three turns, the last two within 30 s of the first
            merge.forced = forced
            monitor._report_merge(merge)
        monitor._forced_logged_at -= runner.LOG_INTERVAL  # 30 s later
        merge.forced = 9
        monitor._report_merge(merge)
    said = [e["records"] for e in logs if e["event"] == "released records out of proven order"]
    assert said == [1, 8]
    assert monitor.metrics.merge_forced._value.get() == 9


async def test_a_partition_whose_records_never_come_stalls_and_the_others_go_on(broker):
    """A broker may report records in a partition that no fetch returns (a broker fault).
    Waiting for them would stop every account's monitoring, silently. Past --stall-timeout
    the partition is reported stalled — an error line, `liqmon_input_stalled` 1, its lag
    shown — and the other inputs are applied, each counted as forced; once it delivers again
    it holds the others back as before. Here the service's consumer has the fills partition
    paused: the probe sees the fill, no fetch brings it."""
    config = load_config(CONFIG)
    settings = fresh_settings(broker.bootstrap, max_stall=1.0)
    await create_inputs(settings, prices=1, accounts=1)
    t = settings.topics
    fills, prices, ledger = (TopicPartition(topic, 0) for topic in (t.fills, t.prices, t.ledger))
    fill = ("fills", b"a", orjson.dumps({"fill_id": "f1", "account": "a", "symbol": "BTC-PERP",
                                         "side": "buy", "qty": 0.01, "price": 50_000.0}))
    tick = ("prices", b"BTC-PERP", orjson.dumps({"symbol": "BTC-PERP", "price": 50_000.0}))
    deposit = ("ledger", b"a", orjson.dumps({"entry_id": "d1", "account": "a", "asset": "USDT",
                                             "amount": 1_000.0, "kind": "deposit"}))
    with structlog.testing.capture_logs() as logs:
        async with RunningMonitor(settings, config) as monitor:
            sample = monitor.metrics.registry.get_sample_value
            stalled = {"topic": t.fills, "partition": "0"}
            monitor._accounts.pause(fills)
            located = Located(settings)
            await produce(located, [fill, tick, deposit], sequential=True)
            await wait_processed(monitor, {prices: 1, ledger: 1}, timeout=60)
            assert monitor.processed_offsets()[fills] == 0
            assert sample("liqmon_input_stalled", stalled) == 1
            assert sample("liqmon_merge_forced_releases_total") == 2
            assert sample("liqmon_consumer_lag_records", stalled) == 1
            monitor._accounts.resume(fills)
            await wait_processed(monitor, {fills: 1}, timeout=60)
            assert sample("liqmon_input_stalled", stalled) is None
    errors = [entry for entry in logs if entry["log_level"] == "error"]
    assert [(e["event"].split(":")[0], e["topic"], e["read_to"], e["broker_end"])
            for e in errors] == [("input partition stalled", t.fills, 0, 1)]
    assert errors[0]["seconds_without_progress"] >= 1.0
    assert any(entry["event"] == "input partition delivers again" for entry in logs)


async def test_a_broker_slow_to_answer_a_long_partition_gets_a_wider_fetch_wait(broker):
    """The embedded broker takes longer to answer a fetch the more batches a partition holds,
    and past the fetch wait answers with nothing although it reports the records: at the
    default 10 ms, some 17,000 single-record batches in, a service would read nothing more.
    Started with 1 ms (outgrown after 2,000-4,000 batches), the service widens its wait and reads
    every tick, none of them out of order."""
    config = load_config(CONFIG)
    settings = fresh_settings(broker.bootstrap, fetch_max_wait_ms=1)
    await create_inputs(settings, prices=1, accounts=1)
    ticks = [("prices", b"BTC-PERP", orjson.dumps({"symbol": "BTC-PERP", "price": 50_000.0 + n}))
             for n in range(8_000)]
    with structlog.testing.capture_logs() as logs:
        async with RunningMonitor(settings, config) as monitor:
            located = Located(settings)
            await produce(located, ticks, sequential=True)  # a batch each
            await wait_processed(monitor, located.ends, timeout=60)
            assert monitor.metrics.merge_forced._value.get() == 0
    widened = [entry for entry in logs if entry["event"].startswith("the broker answers")]
    assert widened[0]["fetch_wait_ms"] == 2
    assert widened[0]["topic"] == settings.topics.prices
    assert widened[0]["broker_end"] > widened[0]["position"]
    assert not [entry for entry in logs if "stalled" in entry["event"]]


async def test_a_partition_paused_behind_a_long_backlog_is_not_declared_stalled(
        broker, monkeypatch):
    """60,000 deposits, then 2,000 ticks, then 4,000 fills, all produced before the service
    starts. The loop pauses a partition's fetching once it buffers 2 records and resumes it
    once it buffers none; it takes 100 records at a time. So the price partition is paused
    while the deposits drain, for longer than the 1 s stall timeout, and its buffered ticks
    go out while it is still paused: the fills next need it read on. A partition the loop
    paused cannot have stalled: nothing is forced, and the events are replay's."""
    monkeypatch.setattr(runner, "MAX_BUFFERED", 2)
    config = load_config(CONFIG)
    settings = fresh_settings(broker.bootstrap, max_stall=1.0, max_batch_records=100)
    await create_inputs(settings, prices=1, accounts=4)
    accounts = [f"acct-{n}" for n in range(2_000)]
    deposits = [("ledger", a.encode(), orjson.dumps({
        "entry_id": f"dep-{n}-{a}", "account": a, "asset": "USDT", "amount": 100.0,
        "kind": "deposit", "ts": 1})) for n in range(30) for a in accounts]
    ticks = [("prices", b"BTC-PERP", orjson.dumps({
        "symbol": "BTC-PERP", "price": 50_000.0 + n % 100, "ts": 1})) for n in range(2_000)]
    fills = [("fills", a.encode(), orjson.dumps({
        "fill_id": f"f{n}-{a}", "account": a, "symbol": "BTC-PERP", "side": "buy",
        "qty": 0.01, "price": 50_000.0, "ts": 1})) for n in range(2) for a in accounts]
    located = Located(settings)
    for batch in (deposits, ticks, fills):
        await produce(located, batch, sequential=False)
    with structlog.testing.capture_logs() as logs:
        async with RunningMonitor(settings, config) as monitor:
            await wait_processed(monitor, located.ends, timeout=300)
            assert monitor.metrics.merge_forced._value.get() == 0
            assert late_records(monitor) == 0
    assert not [e for e in logs if e["event"].startswith("input partition stalled")]
    events = await read_events(settings.bootstrap, settings.topics)
    records, locations = located.in_timestamp_order()
    same_events(events, replayed(records, config), locations)


async def small_takes_over_deposits_and_ticks(broker, monkeypatch
                                             ) -> tuple[ServiceSettings, list, list]:
    """Settings of a service that takes 100 records at a time and pauses a partition once it
    buffers 2, its inputs created (4 account partitions); 4,000 deposits to 1,000 accounts,
    and 10 ticks, to produce."""
    monkeypatch.setattr(runner, "MAX_BUFFERED", 2)
    settings = fresh_settings(broker.bootstrap, max_batch_records=100)
    await create_inputs(settings, prices=1, accounts=4)
    deposits = [("ledger", f"acct-{n % 1_000}".encode(), orjson.dumps({
        "entry_id": f"dep-{n}", "account": f"acct-{n % 1_000}", "asset": "USDT",
        "amount": 100.0, "kind": "deposit", "ts": 1})) for n in range(4_000)]
    ticks = [("prices", b"BTC-PERP", orjson.dumps({
        "symbol": "BTC-PERP", "price": 50_000.0 + n, "ts": 1})) for n in range(10)]
    return settings, deposits, ticks


async def test_records_the_consumer_holds_back_of_a_partitions_last_batch_are_waited_for(
        broker, monkeypatch):
    """4,000 deposits produced in bulk (batches of a hundred and more), then ticks. The
    embedded broker reports a partition's end as its last batch's first offset + 1. The
    consumer hands over 100 records at a time and the loop pauses a partition once it buffers
    2, so a ledger partition's position stops inside its last batch, past that end, while the
    rest of the batch waits in the consumer: it still sorts before the ticks, and is waited
    for. No record is applied after one that sorts after it."""
    config = load_config(CONFIG)
    settings, deposits, ticks = await small_takes_over_deposits_and_ticks(broker, monkeypatch)
    located = Located(settings)
    for batch in (deposits, ticks):
        await produce(located, batch, sequential=False)
    async with RunningMonitor(settings, config) as monitor:
        await wait_processed(monitor, located.ends, timeout=300)
        assert late_records(monitor) == 0
        assert monitor.metrics.merge_forced._value.get() == 0


async def test_a_restart_inside_a_partitions_last_batch_waits_for_the_rest_of_it(
        broker, monkeypatch):
    """4,000 deposits, each ledger partition's in one batch, then ticks. The service stops
    part-way through the deposits, so its checkpoint resumes a ledger partition inside its
    last batch. Restarted, its account consumer's first hand-over comes 0.3 s late (a long
    poll on other partitions, a slow broker), and meanwhile the embedded broker reports that
    partition's end as the batch's first offset + 1, behind the position: the rest of the
    batch still sorts before the ticks, and is waited for. No record is applied after one
    that sorts after it."""
    config = load_config(CONFIG)
    settings, deposits, ticks = await small_takes_over_deposits_and_ticks(broker, monkeypatch)
    located = Located(settings)
    await produce(located, deposits, sequential=False, max_batch_size=1 << 20, linger_ms=1_000)
    await produce(located, ticks, sequential=False)
    ledger = [tp for tp in located.ends if tp.topic == settings.topics.ledger]
    async with RunningMonitor(settings, config) as monitor:
        while not any(monitor.processed_offsets().get(tp, 0) > 0 for tp in ledger):
            await asyncio.sleep(0.001)
    real_fetch = Monitor._fetch
    delayed: set[int] = set()

    async def first_account_fetch_late(self, consumer, limit):
        if id(consumer) not in delayed and any(
                tp.topic == settings.topics.ledger for tp in consumer.assignment()):
            delayed.add(id(consumer))
            await asyncio.sleep(0.3)
        return await real_fetch(self, consumer, limit)

    monkeypatch.setattr(Monitor, "_fetch", first_account_fetch_late)
    async with RunningMonitor(settings, config) as monitor:
        resumed = monitor.processed_offsets()
        assert any(0 < resumed[tp] < located.ends[tp] for tp in ledger), resumed
        await wait_processed(monitor, located.ends, timeout=300)
        assert late_records(monitor) == 0
        assert monitor.metrics.merge_forced._value.get() == 0
