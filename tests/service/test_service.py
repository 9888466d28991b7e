"""`liqmon run` against a real broker (the embedded Tansu): events, dead letters, replay ≡ run,
and broker loss."""

from __future__ import annotations

import asyncio
import gc
import math
import time
from dataclasses import replace
from itertools import groupby
from types import SimpleNamespace

import orjson
import pytest
import structlog
from aiokafka import AIOKafkaProducer, TopicPartition

import monitor.engine as engine_module
from monitor.config import parse_config
from monitor.service import probe, runner
from monitor.service.broker import EmbeddedBroker
from monitor.service.runner import Monitor
from monitor.service.topics import output_topics
from tests.support.kafka import (
    ZSTD,
    RunningMonitor,
    batch_codecs,
    fresh_settings,
    produce,
    read_events,
    read_topic,
    replayed,
    routable,
    same_events,
    wait_processed,
    without_wall_clock,
)
from tests.support.messages import deposit, fill, tick
from tests.support.risk import RISK
from tests.support.schemas import schema_errors
from tests.support.streams import random_stream

pytestmark = pytest.mark.asyncio(loop_scope="session")


async def test_scenario_margin_call_liquidation_recovery_and_a_hedged_account(broker, risk):
    settings = fresh_settings(broker.bootstrap)
    t = settings.topics
    # Phases are fed one at a time: across topics, Kafka only promises fetch order.
    phases = [
        [tick(t, "BTC-PERP", 50_000.0), tick(t, "ETH-PERP", 2_500.0)],
        [deposit(t, "a", 300.0), deposit(t, "hedged", 3_000.0), deposit(t, "naked", 3_000.0)],
        [fill(t, "f1", "a", "BTC-PERP", 1.0, 50_000.0),
         fill(t, "f2", "hedged", "BTC-PERP", 1.0, 50_000.0),
         fill(t, "f3", "hedged", "ETH-PERP", -200.0, 2_500.0),  # 200 · 0.1 ETH short
         fill(t, "f4", "naked", "BTC-PERP", 1.0, 50_000.0)],
        [tick(t, "BTC-PERP", 49_940.0)],  # a: 199.76 / 240 → margin call
        [tick(t, "BTC-PERP", 49_890.0)],  # a: 199.56 / 190 → liquidation
        [tick(t, "ETH-PERP", 2_350.0)],  # hedged short gains 3000
        [tick(t, "BTC-PERP", 47_000.0)],  # naked: equity 0 → insolvent; hedged stays healthy
        [fill(t, "f5", "a", "BTC-PERP", -1.0, 47_000.0)],  # a closed out → recovered
    ]
    async with RunningMonitor(settings, parse_config(RISK)) as monitor:
        for phase in phases:
            await wait_processed(monitor, await produce(broker.bootstrap, phase))
    events = sorted(await read_events(broker.bootstrap, t),
                    key=lambda e: (e["trigger"]["topic"], e["trigger"]["offset"], e["account"]))
    summary = [(e["event_id"], e["margin_ratio"], e["trigger"]["topic"], e["trigger"]["offset"])
               for e in events]
    # "hedged" never appears: its short leg offsets the long one in the same pool.
    assert summary == [
        ("a:3:recovered", 0.0, t.fills, 4),
        ("a:1:margin_call", pytest.approx(199.76 / 240), t.prices, 2),
        ("a:2:liquidation", pytest.approx(199.56 / 190), t.prices, 3),
        ("naked:1:liquidation", None, t.prices, 5),  # equity 3000 − 3000 = 0: insolvent
    ]
    assert all(e["trigger"]["partition"] == 0 for e in events)
    assert events[3]["insolvent"] is True


async def test_events_are_keyed_by_account_and_split_by_type(broker, risk):
    settings = fresh_settings(broker.bootstrap)
    t = settings.topics
    async with RunningMonitor(settings, parse_config(RISK)) as monitor:
        for phase in ([tick(t, "BTC-PERP", 50_000.0)], [deposit(t, "a", 300.0)],
                      [fill(t, "f1", "a", "BTC-PERP", 1.0, 50_000.0)],
                      [tick(t, "BTC-PERP", 49_940.0)], [tick(t, "BTC-PERP", 49_890.0)]):
            await wait_processed(monitor, await produce(broker.bootstrap, phase))
    calls = await read_topic(broker.bootstrap, t.margin_calls)
    liquidations = await read_topic(broker.bootstrap, t.liquidations)
    assert [(r.key, orjson.loads(r.value)["type"]) for r in calls] == [(b"a", "margin_call")]
    assert [(r.key, orjson.loads(r.value)["type"]) for r in liquidations] == [
        (b"a", "liquidation")]
    assert dict(liquidations[0].headers)["event_id"] == b"a:2:liquidation"


BAD_INPUTS = [  # (topic kind, value, reason) — one per class of SPEC §2
    ("fills", b"{not json", "invalid_json"),
    ("fills", b"\xff\xfe not utf-8", "invalid_json"),
    ("ledger", None, "invalid_json"),  # a null (tombstone) value
    ("prices", b"[1, 2]", "not_object"),
    ("fills", b'{"fill_id": "x", "account": "a"}', "missing_field"),
    ("prices", b'{"symbol": "BTC", "price": "1", "ts": 1}', "wrong_type"),
    ("prices", b'{"symbol": "BTC", "price": 1e999, "ts": 1}', "non_finite"),
    ("prices", b'{"symbol": "BTC", "price": -3, "ts": 1}', "out_of_range"),
    ("fills", b'{"fill_id": "x", "account": "a", "symbol": "DOGE-PERP", "side": "buy",'
              b' "qty": 1, "price": 1, "ts": 1}', "unknown_instrument"),
    ("ledger", b'{"entry_id": "x", "account": "a", "asset": "DOGE", "amount": 1,'
               b' "kind": "deposit", "ts": 1}', "unknown_asset"),
    ("ledger", b'{"entry_id": "x", "account": "a", "asset": "USDT", "amount": 1,'
               b' "kind": "gift", "ts": 1}', "unknown_kind"),
    ("fills", b'{"fill_id": "x", "account": "a", "symbol": "BTC-PERP", "side": "long",'
              b' "qty": 1, "price": 1, "ts": 1}', "unknown_side"),
    ("fills", b'{"fill_id": "x", "account": "", "symbol": "BTC-PERP", "side": "buy",'
              b' "qty": 1, "price": 1, "ts": 1}', "bad_identifier"),
    ("ledger", b'{"entry_id": "x", "account": "a", "asset": "USDT", "amount": 100,'
               b' "kind": "withdrawal", "ts": 1}', "wrong_sign"),
    ("fills", b'{"fill_id": "x", "account": "a", "symbol": "BTC-PERP", "side": "buy",'
              b' "qty": 1, "price": 1, "ts": 1, "margin_mode": "portfolio"}',
     "unknown_margin_mode"),
    ("ledger", b'{"entry_id": "x", "account": "a", "asset": "BTC", "amount": 1,'
               b' "kind": "isolated_margin", "symbol": "BTC-PERP", "ts": 1}',
     "not_settle_asset"),
]


async def test_every_class_of_bad_input_is_dead_lettered_and_processing_continues(broker, risk):
    settings = fresh_settings(broker.bootstrap)
    t = settings.topics
    names = {"prices": t.prices, "fills": t.fills, "ledger": t.ledger}
    messages = [(names[kind], f"key-{i}".encode(), value)
                for i, (kind, value, _) in enumerate(BAD_INPUTS)]
    messages.append(deposit(t, "survivor", 100.0))  # a good record after the bad ones
    async with RunningMonitor(settings, parse_config(RISK)) as monitor:
        await wait_processed(monitor, await produce(broker.bootstrap, messages))
        assert monitor.engine.accounts["survivor"].balances == {"USDT": 100.0}
        assert set(monitor.engine.accounts) == {"survivor"}  # nothing else changed state
    dead = await read_topic(broker.bootstrap, t.dead_letter)
    assert len(dead) == len(BAD_INPUTS)
    offsets: dict[str, int] = {}
    by_key = {r.key: r for r in dead}
    for i, (kind, value, reason) in enumerate(BAD_INPUTS):
        record = by_key[f"key-{i}".encode()]
        body = orjson.loads(record.value)
        assert schema_errors("dead_letter", body) == [], body  # the real record, not a sample
        expected_offset = offsets.get(kind, 0)
        offsets[kind] = expected_offset + 1
        assert body["error"].startswith(f"{reason}: "), body
        assert (body["source_topic"], body["source_partition"], body["source_offset"]) == (
            names[kind], 0, expected_offset)
        assert body["key"] == f"key-{i}"
        assert body["value"] == ("" if value is None
                                 else value.decode("utf-8", errors="replace"))
        headers = dict(record.headers)
        assert headers["__liqmon.errors.reason"] == reason.encode()
        assert headers["__liqmon.errors.topic"] == names[kind].encode()
        assert headers["__liqmon.errors.partition"] == b"0"
        assert headers["__liqmon.errors.offset"] == str(expected_offset).encode()


async def test_tick_from_2100_is_dead_lettered_and_later_ticks_still_move_the_price(broker,
                                                                                   risk):
    settings = fresh_settings(broker.bootstrap)  # --max-future 300 s
    t = settings.topics
    now_ms = int(time.time() * 1000)
    async with RunningMonitor(settings, parse_config(RISK)) as monitor:
        for phase in ([tick(t, "BTC-PERP", 50_000.0, ts=now_ms - 1_000)],
                      [tick(t, "BTC-PERP", 90_000.0, ts=4_102_444_800_000)],  # 2100-01-01
                      [tick(t, "BTC-PERP", 51_000.0, ts=now_ms)]):
            await wait_processed(monitor, await produce(broker.bootstrap, phase))
        assert monitor.engine.prices["BTC-PERP"] == 51_000.0
        assert monitor.engine.stats.stale_ticks == 0
    (dead,) = await read_topic(broker.bootstrap, t.dead_letter)
    assert schema_errors("dead_letter", orjson.loads(dead.value)) == []
    assert dict(dead.headers)["__liqmon.errors.reason"] == b"ts_in_future"
    assert dict(dead.headers)["__liqmon.errors.offset"] == b"1"


async def test_a_tick_stamped_ahead_of_its_kafka_timestamp_is_dead_lettered_even_read_later(
        broker, risk):
    """Its ts was judged against the wall clock when read: a tick 3 s ahead was dead-lettered,
    and the same tick re-read after a crash, the clock having caught up, was applied, so the
    second pass published other events than the first. Its own Kafka timestamp does not move."""
    settings = replace(fresh_settings(broker.bootstrap), max_future=1.0)
    t = settings.topics
    produced_ms = int(time.time() * 1000)
    ends = await produce(broker.bootstrap,
                         [tick(t, "BTC-PERP", 50_000.0, ts=produced_ms + 3_000)])
    while time.time() * 1000 < produced_ms + 2_500:  # now within --max-future of its ts
        await asyncio.sleep(0.1)
    async with RunningMonitor(settings, parse_config(RISK)) as monitor:
        await wait_processed(monitor, ends)
        assert "BTC-PERP" not in monitor.engine.prices
    (dead,) = await read_topic(broker.bootstrap, t.dead_letter)
    assert dict(dead.headers)["__liqmon.errors.reason"] == b"ts_in_future"


async def feed_run_by_run(bootstrap: str, monitor, topics, records
                          ) -> list[tuple[str, int, int]]:
    """Produce same-topic runs one after another, each consumed before the next, so that
    the monitor applies them in exactly this order. Returns each record's (topic, offset)."""
    names = {"prices": topics.prices, "fills": topics.fills, "ledger": topics.ledger}
    next_offset: dict[str, int] = {}
    positions = []
    for kind, run in groupby(records, key=lambda r: r[0]):
        batch = [(names[kind], key, value) for _, key, value in run]
        for _ in batch:
            positions.append((names[kind], 0, next_offset.get(kind, 0)))
            next_offset[kind] = next_offset.get(kind, 0) + 1
        await wait_processed(monitor, await produce(bootstrap, batch), timeout=60)
    return positions


async def test_fill_in_the_other_margin_mode_is_dead_lettered_by_the_service(broker, risk):
    """SPEC §4.1: BTC-PERP is open in cross margin, so an isolated fill on it is bad input —
    known only from state, so the engine rejects it and the service dead-letters it."""
    settings = fresh_settings(broker.bootstrap)
    t = settings.topics
    isolated = (t.fills, b"a", orjson.dumps({
        "fill_id": "f2", "account": "a", "symbol": "BTC-PERP", "side": "buy", "qty": 0.5,
        "price": 50_000.0, "ts": 1, "margin_mode": "isolated"}))
    async with RunningMonitor(settings, parse_config(RISK)) as monitor:
        for phase in ([deposit(t, "a", 1_000.0)], [fill(t, "f1", "a", "BTC-PERP", 0.01, 50_000.0)],
                      [isolated]):
            await wait_processed(monitor, await produce(broker.bootstrap, phase))
        assert monitor.engine.accounts["a"].positions["BTC-PERP"].qty == 0.01
        assert len(monitor.engine.units) == 0
    (dead,) = await read_topic(broker.bootstrap, t.dead_letter)
    body = orjson.loads(dead.value)
    assert schema_errors("dead_letter", body) == []
    assert body["error"].startswith("margin_mode_conflict: margin_mode: account 'a' holds "
                                    "BTC-PERP in cross margin")
    assert (body["source_topic"], body["source_offset"], body["key"]) == (t.fills, 1, "a")
    assert dict(dead.headers)["__liqmon.errors.reason"] == b"margin_mode_conflict"


@pytest.mark.parametrize("isolated", [0.0, 0.3])
async def test_run_emits_exactly_what_replay_emits_for_the_same_records(broker, risk,
                                                                        isolated: float):
    config = parse_config(RISK)
    records = routable(random_stream(seed=11, length=2_500, mean_run=30, isolated=isolated))
    settings = fresh_settings(broker.bootstrap)
    async with RunningMonitor(settings, config) as monitor:
        positions = await feed_run_by_run(broker.bootstrap, monitor, settings.topics, records)
    run_events = await read_events(broker.bootstrap, settings.topics)
    expected = replayed(records, config)
    assert len(expected) > 20
    assert len(run_events) == len(expected)
    same_events(run_events, expected, positions)


@pytest.mark.kafka  # starts a broker of its own
async def test_broker_paused_mid_stream_loses_no_event(risk):
    config = parse_config(RISK)
    records = routable(random_stream(seed=5, length=1_500, mean_run=30))
    with EmbeddedBroker() as own_broker:  # paused: it must not stall the other tests
        settings = fresh_settings(own_broker.bootstrap)

        async def outage() -> None:
            await asyncio.sleep(1.0)
            own_broker.pause()
            await asyncio.sleep(6.0)  # longer than the request and session timeouts
            own_broker.resume()

        with structlog.testing.capture_logs() as logs:
            async with RunningMonitor(settings, config) as monitor:
                pause = asyncio.create_task(outage())
                positions = await feed_run_by_run(own_broker.bootstrap, monitor,
                                                  settings.topics, records)
                await pause
                for _ in range(100):  # the next reachability probe notices the recovery
                    if any(entry["event"] == "kafka reachable again" for entry in logs):
                        break
                    await asyncio.sleep(0.1)
        said = [entry["event"] for entry in logs]
        assert "kafka unreachable, clients keep retrying" in said
        assert "kafka reachable again" in said
        run_events = await read_events(own_broker.bootstrap, settings.topics)
    unique = {e["event_id"]: e for e in run_events}
    expected = replayed(records, config)
    assert len(unique) == len(expected)
    same_events(list(unique.values()), expected, positions)
    for event in run_events:  # a repeat, if any, is the same event
        assert without_wall_clock(event) == without_wall_clock(unique[event["event_id"]])


async def test_a_broker_watch_ended_by_a_bug_stops_the_instance(broker, risk, monkeypatch):
    """Without its watch an instance would report Kafka reachable for ever and never release a
    record without proof of order: an error that ends the watch stops it, loudly."""
    settings = fresh_settings(broker.bootstrap)

    async def broken(*_: object) -> dict[str, int]:
        raise RuntimeError("not a Kafka error: a bug")

    with structlog.testing.capture_logs() as logs, pytest.raises(RuntimeError, match="a bug"):
        async with RunningMonitor(settings, parse_config(RISK)) as monitor:
            monkeypatch.setattr(probe, "topic_partitions", broken)
            await asyncio.wait_for(monitor._stopping.wait(), timeout=30)
    (line,) = [entry for entry in logs if entry["event"] == "stopped by an error"]
    assert line["kind"] == "RuntimeError"


async def test_an_answer_an_outage_held_up_restarts_the_merges_wait(risk) -> None:
    """An instance frozen through the start of a broker outage wakes with the watch's request
    out, and its late answer, once the outage ends, is the only sign of the outage the watch
    has. It restarts the merge's wait, as Kafka found back after an outage does, so that the
    probes held up with it are answered before anything goes out without proof (the chaos
    drill, seed 911: 1,426 records released 55 ms after the broker thawed). A prompt answer
    restarts nothing."""
    settings = fresh_settings("127.0.0.1:9", max_idle=0.01)  # never connected
    t = settings.topics
    monitor = Monitor(settings, parse_config(RISK))
    merge = monitor._positions.merge
    prices, fills = TopicPartition(t.prices, 0), TopicPartition(t.fills, 0)
    for tp in (prices, fills):
        merge.seek(tp, 0)
    merge.add(prices, [SimpleNamespace(offset=0, timestamp=5)], arrived_ms=5.0)
    no_answer = -math.inf  # Kafka has answered nothing sent since the wait ran out
    assert merge.take(100, [prices, fills], kafka_answered=no_answer) == []
    await asyncio.sleep(0.05)
    assert merge.take(100, [prices, fills], kafka_answered=no_answer) == []
    assert merge.awaiting_kafka  # the wait ran out: a release waits for Kafka to answer
    monitor._reachability(True, True)
    assert merge.awaiting_kafka
    monitor._reachability(True, False)
    assert not merge.awaiting_kafka and merge.forced == 0


async def test_every_client_of_a_running_instance_tracks_its_own_topics_only(broker, risk):
    """A client that tracks no topic refreshes the metadata of every topic in the cluster
    (every 5 minutes, and after each broken connection), decoded on the event loop: ~60 ms at
    2,000 topics. The producer tracks the output topics from the start, the probe the inputs
    and the changelog it asks end offsets of."""
    settings = fresh_settings(broker.bootstrap)
    t = settings.topics
    async with RunningMonitor(settings, parse_config(RISK)) as monitor:
        tracked = [(client.client if isinstance(client, AIOKafkaProducer)
                    else client._client)._topics for client in monitor._started_clients()]
    assert tracked == [set(output_topics(settings)),  # producer
                       {t.prices},  # prices consumer
                       {t.prices, t.fills, t.ledger, t.state},  # probe
                       {t.fills, t.ledger}]  # group consumer


async def test_events_and_checkpoints_are_zstd_compressed_by_default(broker, risk):
    """Consumers of liqmon's topics must read zstd (README, --compression): every batch it
    writes, events and changelog alike, says so in its attributes (codec 4)."""
    settings = fresh_settings(broker.bootstrap)
    t = settings.topics
    async with RunningMonitor(settings, parse_config(RISK)) as monitor:
        for phase in ([tick(t, "BTC-PERP", 50_000.0)], [deposit(t, "a", 300.0)],
                      [fill(t, "f1", "a", "BTC-PERP", 1.0, 50_000.0)],
                      [tick(t, "BTC-PERP", 49_940.0)]):  # a: 199.76 / 240 → margin call
            await wait_processed(monitor, await produce(broker.bootstrap, phase))
    # stopped: its final checkpoint is written
    assert await batch_codecs(broker.bootstrap, t.margin_calls) == {ZSTD}
    assert await batch_codecs(broker.bootstrap, t.state) == {ZSTD}


async def test_partition_lag_is_zero_after_catching_up(broker, risk):
    settings = fresh_settings(broker.bootstrap)
    async with RunningMonitor(settings, parse_config(RISK)) as monitor:
        ends = await produce(broker.bootstrap, [deposit(settings.topics, f"u{i}", 10.0)
                                                for i in range(50)])
        await wait_processed(monitor, ends)
        lag = monitor.metrics.registry.get_sample_value(
            "liqmon_consumer_lag_records", {"topic": settings.topics.ledger, "partition": "0"})
        assert lag == 0
        assert monitor.processed_offsets()[TopicPartition(settings.topics.ledger, 0)] == 50


async def test_kafka_reachable_reads_1_from_the_connection_on(broker, risk):
    """Only the broker watch set it, started once the instance consumed and asking first an
    interval later: it read 0 through the group's assignment and the restore, and still for a
    moment once /readyz said ready (a helper's scrapes)."""
    async with RunningMonitor(fresh_settings(broker.bootstrap), risk) as monitor:
        assert monitor.ready.is_set()
        assert monitor.metrics.registry.get_sample_value("liqmon_kafka_reachable") == 1


async def test_the_lag_of_a_paused_partition_counts_what_was_appended_after_the_pause(
        broker, risk, monkeypatch):
    """Deposits stamped 30 s ahead are held until the clock reaches them, and the loop
    pauses their partition once it buffers 2. Not fetched, its high watermark stayed where
    the pause found it: the lag read 10 with 60 records behind (a helper's backlog: 4,500
    reported, 13,004 behind)."""
    monkeypatch.setattr(runner, "MAX_BUFFERED", 2)
    settings = fresh_settings(broker.bootstrap, max_idle=60.0)  # a record ahead is waited for
    t = settings.topics
    ledger = TopicPartition(t.ledger, 0)
    ahead = int(time.time() * 1000) + 30_000
    deadline = time.monotonic() + 15  # well before the clock reaches them

    def lag() -> float | None:
        return monitor.metrics.registry.get_sample_value(
            "liqmon_consumer_lag_records", {"topic": t.ledger, "partition": "0"})

    async with RunningMonitor(settings, risk) as monitor:
        # one batch each: the embedded broker reports a log's end as its last batch's
        # first offset + 1
        await produce(broker.bootstrap, [deposit(t, f"u{i}", 10.0) for i in range(10)],
                      first_timestamp_ms=ahead, one_at_a_time=True)
        while not monitor._positions.merge.is_paused(ledger):
            assert time.monotonic() < deadline, "the partition was not paused"
            await asyncio.sleep(0.01)
        ends = await produce(broker.bootstrap, [deposit(t, f"v{i}", 10.0) for i in range(50)],
                             first_timestamp_ms=ahead + 10, one_at_a_time=True)
        assert ends[ledger] == 60
        while lag() != 60:
            assert time.monotonic() < deadline, f"lag {lag()} of 60 records"
            await asyncio.sleep(0.05)
        assert monitor.applied_offsets()[ledger] == 0  # all of them still held


async def test_a_running_service_collects_young_garbage_only_every_50000_allocations(broker,
                                                                                    risk):
    """Not Python's 700: buffered records would reach the oldest generation and bring full
    passes that find nothing (changelog.YOUNG_COLLECTION_AFTER)."""
    settings = fresh_settings(broker.bootstrap)
    async with RunningMonitor(settings, parse_config(RISK)) as monitor:
        ends = await produce(broker.bootstrap, [deposit(settings.topics, "u1", 10.0)])
        await wait_processed(monitor, ends)
        assert gc.get_threshold()[0] == 50_000


async def test_conflate_ticks_applies_only_the_latest_tick_per_symbol_in_a_batch(broker, risk):
    """"a" (300 USDT, long 1 BTC-PERP from 50,000) would be liquidated at 49,890 and recover at
    50,000. Both ticks waiting in one batch: with conflation only 50,000 is applied."""
    config = parse_config(RISK)
    results = {}
    for conflate in (False, True):
        settings = fresh_settings(broker.bootstrap, conflate_ticks=conflate)
        t = settings.topics
        async with RunningMonitor(settings, config) as monitor:
            for phase in ([tick(t, "BTC-PERP", 50_000.0)], [deposit(t, "a", 300.0)],
                          [fill(t, "f1", "a", "BTC-PERP", 1.0, 50_000.0)]):
                await wait_processed(monitor, await produce(broker.bootstrap, phase))
        # Produced while no monitor runs, so the next one fetches both ticks in one batch.
        ends = await produce(broker.bootstrap, [tick(t, "BTC-PERP", 49_890.0, ts=2),
                                                tick(t, "BTC-PERP", 50_000.0, ts=3)])
        async with RunningMonitor(settings, config) as monitor:
            await wait_processed(monitor, ends)
            conflated = monitor.metrics.registry.get_sample_value(
                "liqmon_conflated_ticks_total")
        events = sorted(await read_events(broker.bootstrap, t), key=lambda e: e["event_id"])
        results[conflate] = ([e["type"] for e in events], conflated)
    assert results[False] == (["liquidation", "recovered"], 0)  # a:1:…, a:2:…
    assert results[True] == ([], 1)


async def test_an_idle_service_lays_each_account_s_positions_side_by_side(
        broker, monkeypatch):
    """Ten accounts open BTC-PERP one after another, then ETH-PERP: each account's two
    positions are ten slots apart. A compaction is due once the fills number half the open
    positions (10 of 20 here, the minimum lowered to 1): the idle service moves them side by
    side, account after account, and what each holds is what it held."""
    monkeypatch.setattr(engine_module, "COMPACT_AFTER_FILLS", 1)
    settings = fresh_settings(broker.bootstrap)
    t = settings.topics
    accounts = [f"u{n}" for n in range(10)]
    async with RunningMonitor(settings, parse_config(RISK)) as monitor:
        for phase in ([deposit(t, name, 50_000.0) for name in accounts],
                      [fill(t, f"b-{name}", name, "BTC-PERP", 0.1, 50_000.0)
                       for name in accounts],
                      [fill(t, f"e-{name}", name, "ETH-PERP", 1.0, 2_500.0)
                       for name in accounts]):
            await wait_processed(monitor, await produce(broker.bootstrap, phase))
        engine = monitor.engine
        deadline = time.monotonic() + 10
        while engine.upkeep_due and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        assert not engine.upkeep_due
        book = engine.book
        rows = sorted(book.index[name] for name in accounts)
        slots = [[book.first[row], book.p_next[book.first[row]]] for row in rows]
        assert slots == [[2 * k, 2 * k + 1] for k in range(10)]
        for name in accounts:
            positions = engine.accounts[name].positions
            assert (positions["BTC-PERP"].qty, positions["ETH-PERP"].qty) == (0.1, 1.0)


async def test_an_idle_service_merges_the_bands_a_shock_left_overdue(broker, risk):
    """400 accounts, each 5,000 USDT long 0.1 BTC-PERP from 50,000. A tick at 35,000 (−30 %)
    leaves every account's band (a band allows at most 18 %): all 400 are re-valued and their
    bands filed in bulk, more than the 256 a merge waits for. With nothing else to read, the
    service merges them then, rather than the next BTC-PERP tick doing it first."""
    settings = fresh_settings(broker.bootstrap)
    t = settings.topics
    accounts = [f"u{n}" for n in range(400)]
    async with RunningMonitor(settings, parse_config(RISK)) as monitor:
        for phase in ([tick(t, "BTC-PERP", 50_000.0)],
                      [deposit(t, name, 5_000.0) for name in accounts],
                      [fill(t, f"f-{name}", name, "BTC-PERP", 0.1, 50_000.0)
                       for name in accounts],
                      [tick(t, "BTC-PERP", 35_000.0, ts=2)]):
            await wait_processed(monitor, await produce(broker.bootstrap, phase))
        engine = monitor.engine
        assert engine.stats.applied_ticks == 2
        deadline = time.monotonic() + 10
        while engine.upkeep_due and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        pending = engine.book.pending
        assert not engine.upkeep_due
        assert not (pending.count > pending.limit).any()
        assert len(engine.accounts_moved_by("BTC-PERP")) == 400
