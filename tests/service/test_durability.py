"""Durability (SPEC §6): checkpoints in the compacted changelog, restore, crash safety."""

from __future__ import annotations

import asyncio
import random
import subprocess
import time
from dataclasses import replace
from typing import Any

import pytest
import structlog
from aiokafka import AIOKafkaProducer, TopicPartition
from aiokafka.errors import RequestTimedOutError

from monitor.account import Account
from monitor.config import fingerprint, load_config
from monitor.engine import Engine
from monitor.events import Source
from monitor.records import LedgerEntry
from monitor.service import restorer, runner
from monitor.service.changelog import (
    ACCOUNT,
    CONTROL,
    LAYOUT,
    RestoreProgress,
    StateCorrupt,
    StateLost,
    read_changelog,
    snapshot_messages,
)
from monitor.service.runner import Monitor
from monitor.service.topics import create_topics
from monitor.snapshot import CONTROL_KEY, KIND_HEADER, Control, encode_account, encode_control
from tests.support.changelog import snapshot_history, snapshots_unlike_replay
from tests.support.compare import final_engine, state_of
from tests.support.kafka import (
    LZ4,
    ZSTD,
    MonitorProcess,
    RunningMonitor,
    batch_codecs,
    fresh_settings,
    hand_over_held_back,
    positions_of,
    produce,
    produce_timestamped,
    read_events,
    read_topic,
    recreate,
    replayed,
    routable,
    run_args,
    same_events,
    started_processes,
    wait_processed,
    without_wall_clock,
)
from tests.support.messages import deposit, fill, tick, withdrawal
from tests.support.paths import REPO
from tests.support.snapshots import json_snapshot
from tests.support.streams import random_stream

CONFIG = REPO / "examples" / "risk.toml"
pytestmark = pytest.mark.asyncio(loop_scope="session")


async def test_graceful_restart_restores_exactly_and_emits_nothing_twice(broker):
    config = load_config(CONFIG)
    records = routable(random_stream(seed=21, length=3_000, isolated=0.3))
    first, second = records[:1_800], records[1_800:]
    settings = fresh_settings(broker.bootstrap, checkpoint_interval=0.2, max_idle=5.0)
    await create_topics(settings)
    ends = await produce_timestamped(broker.bootstrap, settings.topics, first)
    async with RunningMonitor(settings, config) as monitor:
        await wait_processed(monitor, ends)
        before = state_of(monitor.engine)
        assert len(monitor.engine.units) > 10  # isolated positions restored below too
        held = len(monitor.engine.accounts), len(monitor.engine.units)
        offsets_before = monitor.processed_offsets()
    emitted = len(await read_events(broker.bootstrap, settings.topics))

    with structlog.testing.capture_logs() as logs:
        async with RunningMonitor(settings, config) as restarted:
            assert state_of(restarted.engine) == before  # balances, positions, states, counters
            assert restarted.processed_offsets() == offsets_before
            await asyncio.sleep(1.0)
    assert len(await read_events(broker.bootstrap, settings.topics)) == emitted
    # the log counts them as liqmon_accounts and the isolated-position gauges do
    (said,) = [entry for entry in logs if entry["event"] == "restored"]
    assert (said["accounts"], said["isolated_positions"]) == held

    # The rest arrives while no monitor runs: a backlog, applied in timestamp order.
    ends = await produce_timestamped(broker.bootstrap, settings.topics, second,
                                     first_timestamp_ms=2_000_000)
    async with RunningMonitor(settings, config) as again:
        await wait_processed(again, ends)

    events = await read_events(broker.bootstrap, settings.topics)
    assert len({e["event_id"] for e in events}) == len(events)  # nothing twice
    same_events(events, replayed(records, config), positions_of(records, settings.topics))


async def test_a_checkpoint_taken_while_the_producer_takes_a_batch_says_it_reflects_the_batch(
        broker, monkeypatch):
    """A checkpoint is written by a task of its own while the loop goes on. A snapshot it
    takes once the loop has applied a batch, while the producer is still taking that batch's
    output, holds the batch: stamped with the offsets before it, a restore would apply the
    batch to the account a second time."""
    settings = fresh_settings(broker.bootstrap, checkpoint_interval=3600.0)
    t = settings.topics
    await create_topics(settings)
    async with RunningMonitor(settings, load_config(CONFIG)) as monitor:
        await wait_processed(monitor, await produce(broker.bootstrap,
                                                    [deposit(t, "alice", 100.0, "d1")]))
        taking, go_on = hand_over_held_back(monitor._pipeline, monkeypatch)
        await produce(broker.bootstrap, [deposit(t, "alice", 50.0, "d2")])
        await asyncio.wait_for(taking.wait(), timeout=30)  # the loop applied it and waits
        checkpoint = asyncio.create_task(monitor._checkpointer.checkpoint({0}, monitor._sink))
        await asyncio.sleep(0.2)
        go_on.set()
        await checkpoint
    (restored,) = (await read_changelog(broker.bootstrap, t.state, [0])).values()
    ((_, alice, _, as_of),) = restored.snapshots.accounts()
    assert alice.balances == {"USDT": 150.0}
    assert as_of[(t.ledger, 0)] == 2  # both deposits, offsets 0 and 1


async def test_an_upgrade_to_zstd_restores_checkpoints_written_under_lz4(broker):
    """The default went from lz4 to zstd: an instance upgraded in place restores the lz4
    changelog, and its own checkpoints are zstd beside them."""
    config = load_config(CONFIG)
    records = routable(random_stream(seed=22, length=600))
    first, second = records[:400], records[400:]
    upgraded = fresh_settings(broker.bootstrap, checkpoint_interval=0.2)
    await create_topics(upgraded)
    ends = await produce_timestamped(broker.bootstrap, upgraded.topics, first)
    async with RunningMonitor(replace(upgraded, compression="lz4"), config) as old:
        await wait_processed(old, ends)
        before = state_of(old.engine)

    async with RunningMonitor(upgraded, config) as new:
        assert state_of(new.engine) == before
        ends = await produce_timestamped(broker.bootstrap, upgraded.topics, second,
                                         first_timestamp_ms=2_000_000, live=True)
        await wait_processed(new, ends)
    assert await batch_codecs(broker.bootstrap, upgraded.topics.state) == {LZ4, ZSTD}
    events = await read_events(broker.bootstrap, upgraded.topics)
    same_events(events, replayed(records, config), positions_of(records, upgraded.topics))


def monitor_command(settings, *extra: str) -> list[str]:
    return run_args(settings, "--group", settings.group, "--metrics-port", "0",
                    "--merge-wait", "5", "--session-timeout", "2", *extra)


@pytest.mark.parametrize("seed", [1, 2])
async def test_kill_9_at_random_points_loses_nothing_and_repeats_only_identical_events(
    broker, seed: int,
):
    config = load_config(CONFIG)
    records = routable(random_stream(seed=seed, length=30_000, isolated=0.3 * (seed == 2)))
    settings = fresh_settings(broker.bootstrap)
    await create_topics(settings)
    ends = await produce_timestamped(broker.bootstrap, settings.topics, records)
    args = monitor_command(settings, "--checkpoint-interval", "0.1", "--checkpoint-records",
                           "400", "--log-level", "info")
    rng = random.Random(seed)
    checkpointed_at_kill = []
    for _ in range(3):
        process = await MonitorProcess(args).start()
        await asyncio.wait_for(process.consuming.wait(), timeout=60)
        await asyncio.sleep(rng.uniform(0.0, 0.3))
        assert await process.stop(kill=True) == -9
        control = (await read_changelog(broker.bootstrap, settings.topics.state, [0]))[0].control
        checkpointed_at_kill.append(
            0 if control is None else control.offsets[(settings.topics.fills, 0)])
    fills_end = ends[TopicPartition(settings.topics.fills, 0)]
    assert checkpointed_at_kill[0] < fills_end, "the first kill should land mid-stream"

    process = await MonitorProcess(args).start()
    await asyncio.wait_for(process.consuming.wait(), timeout=60)
    final = settings.topics
    expected = replayed(records, config)
    for _ in range(600):  # until every expected event is out
        events = await read_events(broker.bootstrap, final, idle=0.2)
        if len({e["event_id"] for e in events}) >= len(expected):
            break
    assert await process.stop() == 0

    events = await read_events(broker.bootstrap, final)
    unique = {e["event_id"]: e for e in events}
    for event in events:  # a repeat is the same event
        assert without_wall_clock(event) == without_wall_clock(unique[event["event_id"]])
    same_events(list(unique.values()), expected, positions_of(records, final))

    restored = await read_changelog(broker.bootstrap, final.state, [0])
    engine = Engine(config)
    engine.load_accounts(restored[0].snapshots)
    engine.load_prices(restored[0].control.prices)
    assert state_of(engine) == state_of(final_engine(records, config))
    assert restored[0].control.offsets[(final.fills, 0)] == ends[TopicPartition(final.fills, 0)]
    # not only the newest: every snapshot ever written is replay's state at the offsets it
    # names, or a restore from it would apply some inputs twice or never
    history = await snapshot_history(broker.bootstrap, final.state)
    assert len(history) > len(restored[0].snapshots)  # older ones too
    assert snapshots_unlike_replay(history, records, positions_of(records, final), config) == []


async def corrupt_checkpoint(bootstrap: str, topic: str) -> int:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    try:
        meta = await producer.send_and_wait(topic, b"\x00not a snapshot", key=b"acct-x",
                                            partition=0, headers=[(KIND_HEADER, b"account")])
    finally:
        await producer.stop()
    return meta.offset


async def served(broker, records) -> tuple[Any, Any, dict[TopicPartition, int], dict]:
    """``records`` applied and checkpointed by a monitor now stopped: (config, settings,
    the inputs' ends, the state it held)."""
    config = load_config(CONFIG)
    settings = fresh_settings(broker.bootstrap, checkpoint_interval=0.2, max_idle=5.0)
    await create_topics(settings)
    ends = await produce_timestamped(broker.bootstrap, settings.topics, records)
    async with RunningMonitor(settings, config) as monitor:
        await wait_processed(monitor, ends)
        held = state_of(monitor.engine)
    return config, settings, ends, held


async def rebuilt_by_reset_state(settings, config, ends: dict[TopicPartition, int],
                                 healthy: dict) -> None:
    """A start with --reset-state rebuilds ``healthy`` from the inputs."""
    async with RunningMonitor(replace(settings, reset_state=True), config) as rebuilt:
        await wait_processed(rebuilt, ends)
        assert state_of(rebuilt.engine) == healthy


async def test_corrupt_checkpoint_stops_the_start_and_reset_state_recovers(broker, tmp_path):
    config, settings, ends, healthy = await served(broker,
                                                   routable(random_stream(seed=8, length=600)))
    offset = await corrupt_checkpoint(broker.bootstrap, settings.topics.state)

    with pytest.raises(StateCorrupt) as excinfo:
        await asyncio.wait_for(Monitor(settings, config).run(), timeout=60)
    assert f"{settings.topics.state}/0@{offset}" in str(excinfo.value)
    assert "--reset-state" in str(excinfo.value)

    result = await asyncio.create_subprocess_exec(
        *monitor_command(settings), stderr=subprocess.PIPE, stdout=subprocess.DEVNULL)
    started_processes.append(result)
    _, stderr = await asyncio.wait_for(result.communicate(), timeout=60)
    assert result.returncode == 1
    assert f"{settings.topics.state}/0@{offset} cannot be decoded".encode() in stderr

    await rebuilt_by_reset_state(settings, config, ends, healthy)
    async with RunningMonitor(settings, config) as later:  # the reset outlives the restart
        assert state_of(later.engine) == healthy



async def test_a_changelog_deleted_while_stopped_stops_the_start_and_reset_state_rebuilds(
        broker):
    """The state topic is deleted while the instance is stopped (liqmon creates it again,
    empty); the group still holds the offsets its checkpoints committed. A start that took
    this for a first one would go on from those offsets with no account at all."""
    config, settings, ends, healthy = await served(broker,
                                                   routable(random_stream(seed=10, length=400)))
    await recreate(settings, settings.topics.state, create=False)

    with pytest.raises(StateLost, match=rf"^{settings.topics.state}/0 holds no checkpoint, "
                                        rf"but group '{settings.group}' has committed "
                                        "offsets for "):
        await asyncio.wait_for(Monitor(settings, config).run(), timeout=60)
    await rebuilt_by_reset_state(settings, config, ends, healthy)


async def checkpointed(broker, seed: int, length: int, applied: int):
    """A random stream of ``length`` records, its first ``applied`` applied and checkpointed
    by a monitor now stopped: (config, settings, records, the rest, the state it held)."""
    records = routable(random_stream(seed=seed, length=length))
    config, settings, _, before = await served(broker, records[:applied])
    return config, settings, records, records[applied:], before


async def restart_then_the_rest(settings, config, before: dict, records, second) -> None:
    """A restart holds exactly ``before``; then ``second``, the rest of ``records``, is
    produced and applied, and the events of all of them are replay's, none twice."""
    async with RunningMonitor(settings, config) as restarted:
        assert state_of(restarted.engine) == before
    ends = await produce_timestamped(settings.bootstrap, settings.topics, second,
                                     first_timestamp_ms=2_000_000)
    async with RunningMonitor(settings, config) as again:
        await wait_processed(again, ends)
    events = await read_events(settings.bootstrap, settings.topics)
    assert len({e["event_id"] for e in events}) == len(events)
    same_events(events, replayed(records, config), positions_of(records, settings.topics))


async def test_an_upgrade_restores_json_snapshots_of_format_1_beside_binary_ones(broker):
    """A changelog written partly by a liqmon before format 2: every other account's newest
    snapshot is JSON. The restart holds exactly what was checkpointed, and the rest of the
    stream then gives exactly replay's events."""
    config, settings, records, second, before = await checkpointed(broker, 23, 2_000, 1_200)
    restored = (await read_changelog(broker.bootstrap, settings.topics.state, [0]))[0]
    older = [(account_id, json_snapshot(account, seq, as_of))
             for n, (account_id, account, seq, as_of) in enumerate(restored.snapshots.accounts())
             if n % 2 == 0]
    assert len(older) >= 5
    await write_state(broker.bootstrap, settings.topics.state,
                      [(account_id.encode(), value, ACCOUNT) for account_id, value in older])

    await restart_then_the_rest(settings, config, before, records, second)


async def test_a_restore_the_broker_fails_is_taken_again_and_nothing_is_consumed_meanwhile(
        broker, monkeypatch):
    """A first start: the broker times out when asked where the inputs begin. The instance
    does not stop: it takes the assignment again, consuming nothing meanwhile and saying why
    on /readyz, then applies the whole stream, with exactly replay's events."""
    config = load_config(CONFIG)
    records = routable(random_stream(seed=25, length=1_500))
    settings = fresh_settings(broker.bootstrap)
    await create_topics(settings)
    ends = await produce_timestamped(broker.bootstrap, settings.topics, records)
    starting_at, failed = restorer._log_bounds, []

    async def timing_out_once(consumer, checkpointed, start):
        if None in checkpointed.values() and not failed:  # the broker is asked
            failed.append(sorted(checkpointed))
            raise RequestTimedOutError()
        return await starting_at(consumer, checkpointed, start)

    monkeypatch.setattr(restorer, "_log_bounds", timing_out_once)
    monkeypatch.setattr(runner, "RESTORE_RETRY_INTERVAL", 0.5)
    started = Monitor(settings, config)
    running = asyncio.create_task(started.run())
    deadline = time.monotonic() + 30
    # /readyz says why (it had no reason of its own, and after a later rebalance's failed
    # restore said ready, the gained partitions not taken)
    while "the last attempt failed (RequestTimedOutError" not in started.not_ready_because():
        assert time.monotonic() < deadline, started.not_ready_because()
        await asyncio.sleep(0.01)
    assert failed == [[TopicPartition(settings.topics.prices, 0)]]
    assert started.applied_offsets() == {}  # until it is taken again, nothing is consumed
    await asyncio.wait_for(started.ready.wait(), timeout=30)
    await wait_processed(started, ends)
    started.request_stop()
    await asyncio.wait_for(running, timeout=30)
    same_events(await read_events(broker.bootstrap, settings.topics),
                replayed(records, config), positions_of(records, settings.topics))


async def test_a_first_start_from_latest_applies_only_the_records_after_it(broker):
    """--start latest: a first start skips what every input partition held, the price feed's
    included, and applies what comes after it. Worked numbers (examples/risk.toml, BTC-PERP
    mmr 0.004 up to 50,000 notional): 1 BTC bought at 50,000 on a deposit of 300, marked at
    its entry price while BTC-PERP has no tick: ratio 200 / 300 = 0.67, healthy; then a tick
    to 49,890: equity 300 − 110 = 190, maintenance margin 0.004 · 49,890 = 199.56, ratio
    1.05: liquidated by the tick. Had the earlier tick at 49,890 been applied, the fill
    would have liquidated it; "before", which bought the same before the start, is not held."""
    config = load_config(CONFIG)
    settings = fresh_settings(broker.bootstrap, start="latest", partitions=4)
    t = settings.topics
    await create_topics(settings)
    await produce(broker.bootstrap, [
        tick(t, "BTC-PERP", 49_890.0), deposit(t, "before", 300.0, "d0"),
        fill(t, "f0", "before", "BTC-PERP", 1.0, 50_000.0)], one_at_a_time=True)
    async with RunningMonitor(settings, config) as monitor:
        await wait_processed(monitor, await produce(broker.bootstrap, [
            deposit(t, "after", 300.0, "d1"), fill(t, "f1", "after", "BTC-PERP", 1.0, 50_000.0),
            tick(t, "BTC-PERP", 49_890.0)], one_at_a_time=True))
        assert list(monitor.engine.accounts) == ["after"]
    (event,) = await read_events(broker.bootstrap, t)
    assert (event["event_id"], event["trigger"]["kind"], event["margin_ratio"]) == (
        "after:1:liquidation", "price", pytest.approx(199.56 / 190))


async def test_a_restore_cancelled_inside_a_client_call_stops_the_instance_with_an_error(
        broker, monkeypatch):
    """A Kafka client call in the restore raises CancelledError, nobody having cancelled the
    restore (aiokafka's consumer.stop() can). The instance stops with an error that a restart
    mends, rather than stay in its group, heartbeating, never taking an assignment again."""

    async def cancelled_from_inside(consumer, checkpointed, start):
        raise asyncio.CancelledError()

    monkeypatch.setattr(restorer, "_log_bounds", cancelled_from_inside)
    settings = fresh_settings(broker.bootstrap)
    await create_topics(settings)
    with pytest.raises(RuntimeError, match="cancelled from inside a Kafka client call"):
        await asyncio.wait_for(Monitor(settings, load_config(CONFIG)).run(), timeout=60)


async def first_half_checkpointed_twice(broker):
    """(config, settings, records, the rest, the state held): 900 records of a stream of
    1,500 applied in two halves, each checkpointed (every account touched so far), by a
    monitor now stopped."""
    config = load_config(CONFIG)
    records = routable(random_stream(seed=24, length=1_500))
    first, second = records[:900], records[900:]
    settings = fresh_settings(broker.bootstrap, checkpoint_interval=0.1, max_idle=5.0)
    await create_topics(settings)
    async with RunningMonitor(settings, config) as monitor:
        for half, start_ms in ((first[:450], 1_000_000), (first[450:], 1_500_000)):
            ends = await produce_timestamped(broker.bootstrap, settings.topics, half,
                                             first_timestamp_ms=start_ms, live=True)
            await wait_processed(monitor, ends)
            await asyncio.sleep(0.5)  # checkpointed: every account touched so far
        before = state_of(monitor.engine)
    return config, settings, records, second, before


async def older_snapshots(bootstrap: str, topic: str) -> list[tuple[bytes, bytes, bytes]]:
    """What an instance frozen past its session timeout has its Kafka client send when it
    wakes: the first snapshot written of each account whose newest is another, as
    `write_state` takes them (at least 5)."""
    written = sorted(await read_topic(bootstrap, topic), key=lambda r: r.offset)
    snapshots = [r for r in written if dict(r.headers).get(KIND_HEADER) == ACCOUNT
                 and r.value is not None]
    newest = {r.key: r.value for r in snapshots}
    first_of: dict[bytes, bytes] = {}
    for r in snapshots:
        first_of.setdefault(r.key, r.value)
    stale = [(key, value, ACCOUNT) for key, value in first_of.items() if value != newest[key]]
    assert len(stale) >= 5
    return stale


async def compacted(settings):
    """``settings`` naming a copy of their state topic as Kafka's log cleaner leaves it (the
    embedded broker never compacts): of each key, only the last record of its partition,
    tombstones included, in their order."""
    records = sorted(await read_topic(settings.bootstrap, settings.topics.state),
                     key=lambda r: (r.partition, r.offset))
    last = {(r.partition, r.key): r.offset for r in records}
    copy = replace(settings, topics=replace(settings.topics,
                                            state=f"{settings.topics.state}.compacted"))
    await create_topics(copy)
    producer = AIOKafkaProducer(bootstrap_servers=settings.bootstrap, acks="all")
    await producer.start()
    try:
        for r in records:
            if last[(r.partition, r.key)] == r.offset:
                await producer.send_and_wait(copy.topics.state, r.value, key=r.key,
                                             partition=r.partition, headers=list(r.headers))
    finally:
        await producer.stop()
    assert len(records) > len(last)  # something was compacted away
    return copy


async def test_a_stale_snapshot_written_after_a_newer_one_is_not_restored(broker):
    """An instance frozen past its session timeout wakes, and its Kafka client sends the chunk
    of snapshots it was handed before the freeze: older states of accounts, written after the
    newer ones of the instance that took over. A restart restores the newer states, and the
    rest of the stream gives exactly replay's events."""
    config, settings, records, second, before = await first_half_checkpointed_twice(broker)
    stale = await older_snapshots(broker.bootstrap, settings.topics.state)
    await write_state(broker.bootstrap, settings.topics.state, stale)

    await restart_then_the_rest(settings, config, before, records, second)


async def test_a_restore_that_reads_a_stale_snapshot_last_writes_the_newer_state_again(broker):
    """Kafka's compaction keeps a key's last record: the stale one, which would then be all a
    restore finds. The restore that read both writes the newer state again, so that a
    restore from the changelog compacted after it still holds the newer states."""
    config, settings, records, second, before = await first_half_checkpointed_twice(broker)
    stale = await older_snapshots(broker.bootstrap, settings.topics.state)
    await write_state(broker.bootstrap, settings.topics.state, stale)
    async with RunningMonitor(settings, config) as restarted:  # stopped: checkpointed
        assert state_of(restarted.engine) == before

    await restart_then_the_rest(await compacted(settings), config, before, records, second)


async def test_a_stale_snapshot_written_while_the_owner_runs_is_followed_by_its_state(broker):
    """The frozen instance's client sends the chunk after the instance that took over has
    restored: that one's next checkpoint writes those accounts again, after the stale
    records, so that the changelog compacted after it holds its states."""
    config, settings, records, second, before = await first_half_checkpointed_twice(broker)
    stale = await older_snapshots(broker.bootstrap, settings.topics.state)
    async with RunningMonitor(settings, config):  # stopped: checkpointed
        await write_state(broker.bootstrap, settings.topics.state, stale)

    await restart_then_the_rest(await compacted(settings), config, before, records, second)


async def test_an_account_emptied_after_the_last_control_record_is_not_emptied_twice(broker):
    """A crash mid-checkpoint: alice had withdrawn everything, her tombstone was written and
    the control record after it was not. The restart re-reads her withdrawal from the older
    control record; her tombstone says it reflects it, so her next deposit leaves her holding
    100, not owing 400."""
    config = load_config(CONFIG)
    settings = fresh_settings(broker.bootstrap, max_idle=5.0)
    await create_topics(settings)
    t = settings.topics
    async with RunningMonitor(settings, config) as monitor:  # stopped: checkpointed
        await wait_processed(monitor, await produce(broker.bootstrap,
                                                    [deposit(t, "alice", 500.0, "d-1")]))
    ends = await produce(broker.bootstrap, [withdrawal(t, "alice", -500.0, "w-2"),
                                            deposit(t, "alice", 100.0, "d-3")])
    (ledger,) = ends  # alice's ledger partition: d-1 at offset 0, w-2 at 1, d-3 at 2
    p = ledger.partition
    # What the instance that crashed wrote: it had applied w-2, which emptied alice.
    crashed = Engine(config)
    crashed.apply(LedgerEntry("d-1", "alice", "USDT", 500.0, "deposit", 1), Source(t.ledger, p, 0))
    crashed.apply(LedgerEntry("w-2", "alice", "USDT", -500.0, "withdrawal", 1),
                  Source(t.ledger, p, 1))
    as_of = {(t.ledger, p): 2, (t.fills, p): 0, (t.prices, 0): 0}
    _, (tombstone,) = snapshot_messages(crashed, crashed.take_dirty(), 2, {p: as_of}, t, set())
    assert tombstone.value is None
    producer = AIOKafkaProducer(bootstrap_servers=broker.bootstrap, acks="all")
    await producer.start()
    try:
        await producer.send_and_wait(t.state, None, key=tombstone.key, partition=p,
                                     headers=tombstone.headers)
    finally:
        await producer.stop()

    async with RunningMonitor(settings, config) as restarted:
        await wait_processed(restarted, ends)
        assert restarted.engine.accounts["alice"].balances == {"USDT": 100.0}


def truncated(raw: bytes) -> bytes:
    return raw[:-3]


def of_a_later_version(raw: bytes) -> bytes:
    return raw[:2] + b"\x09" + raw[3:]


@pytest.mark.parametrize(("spoil", "layout_written", "detail"), [
    (truncated, True, "truncated or corrupt: 59 bytes where its header makes 62"),
    (of_a_later_version, True, "unsupported snapshot format version 9"),
    (lambda raw: raw, False, "which the changelog partition does not hold"),
])
async def test_a_binary_snapshot_that_cannot_be_decoded_stops_the_restore_naming_it(
    broker, spoil, layout_written: bool, detail: str,
):
    settings = fresh_settings(broker.bootstrap)
    await create_topics(settings)
    state = settings.topics.state
    layout, raw = encode_account(Account(balances={"USDT": 10.0}, partition=0), 1,
                                 {(settings.topics.fills, 0): 3})
    records = [(b"acct-1", raw, ACCOUNT), (b"acct-2", spoil(raw), ACCOUNT)]
    if layout_written:
        records.insert(0, (layout.key, layout.encoded, LAYOUT))
    offsets = await write_state(broker.bootstrap, state, records)

    with pytest.raises(StateCorrupt, match=detail) as excinfo:
        await read_changelog(broker.bootstrap, state, [0])
    first_bad = offsets[-1] if layout_written else offsets[0]  # without its layout: acct-1
    assert f"{state}/0@{first_bad} cannot be decoded" in str(excinfo.value)


async def write_state(bootstrap: str, topic: str,
                      records: list[tuple[bytes, bytes, bytes]]) -> list[int]:
    """(key, value, kind) records into partition 0 of a state topic; their offsets."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    try:
        return [(await producer.send_and_wait(topic, value, key=key, partition=0,
                                              headers=[(KIND_HEADER, kind)])).offset
                for key, value, kind in records]
    finally:
        await producer.stop()


async def checkpointed_then_changed(broker, tmp_path):
    """(the config, the settings, a changed config file): a first run of 300 records
    checkpointed under examples/risk.toml, and beside it the same file with BTC-PERP's
    first-tier mmr (0.004) changed to 0.0045."""
    config = load_config(CONFIG)
    settings = fresh_settings(broker.bootstrap, checkpoint_interval=0.2)
    await create_topics(settings)
    records = routable(random_stream(seed=9, length=300))
    ends = await produce_timestamped(settings.bootstrap, settings.topics, records)
    async with RunningMonitor(settings, config) as monitor:
        await wait_processed(monitor, ends)
    text = CONFIG.read_text(encoding="utf-8")
    assert text.count("mmr = 0.004,") == 1
    changed = tmp_path / "risk.toml"
    changed.write_text(text.replace("mmr = 0.004,", "mmr = 0.0045,"), encoding="utf-8")
    return config, settings, changed


async def test_restart_under_another_risk_config_is_refused_naming_both_fingerprints(
    broker, tmp_path,
):
    config, settings, changed = await checkpointed_then_changed(broker, tmp_path)

    process = await MonitorProcess(monitor_command(replace(settings, config_path=changed),
                                                   "--log-level", "info")).start()
    code = await asyncio.wait_for(process.proc.wait(), timeout=60)
    await process.reader
    assert code == 1
    # said when the restore refuses, and again as the process ends
    assert [e["event"] for e in process.logs if e["level"] == "error"] == [
        "stopping on an error", "stopped by an error"]
    (error,) = [e for e in process.logs if e["event"] == "stopped by an error"]
    assert error["kind"] == "ConfigChanged"
    assert fingerprint(config) in error["error"]
    assert fingerprint(load_config(changed)) in error["error"]
    assert "--accept-config-change" in error["error"]
    assert not any(e["event"] in ("restored", "consuming") for e in process.logs)


async def test_accept_config_change_restores_and_checkpoints_under_the_new_config(
    broker, tmp_path,
):
    config, settings, changed = await checkpointed_then_changed(broker, tmp_path)

    args = monitor_command(replace(settings, config_path=changed), "--log-level", "info")
    process = await MonitorProcess([*args, "--accept-config-change"]).start()
    await asyncio.wait_for(process.consuming.wait(), timeout=60)
    assert await process.stop() == 0
    (warning,) = [e for e in process.logs if e["event"].startswith("restoring state "
                                                                     "checkpointed under")]
    assert warning["level"] == "warning"
    assert (warning["checkpointed"], warning["configured"]) == (
        fingerprint(config), fingerprint(load_config(changed)))
    control = (await read_changelog(broker.bootstrap, settings.topics.state, [0]))[0].control
    assert control.config == fingerprint(load_config(changed))


async def test_a_restore_reports_records_and_accounts_read_against_the_expected_total(broker):
    """500 snapshots of 250 accounts (each written twice), their layout and one control
    record: the restore's last progress report has read all 502 records of 502 expected,
    250 accounts."""
    settings = fresh_settings(broker.bootstrap)
    await create_topics(settings)
    state = settings.topics.state
    as_of = {(settings.topics.fills, 0): 0}
    layout, snapshot = encode_account(Account(balances={"USDT": 10.0}, partition=0), 1, as_of)
    producer = AIOKafkaProducer(bootstrap_servers=broker.bootstrap, acks="all")
    await producer.start()
    try:
        # one record per batch: the embedded broker reports a partition's end as its last
        # batch's first offset + 1, so only then is the expected total exact there
        await (await producer.send(state, layout.encoded, key=layout.key, partition=0,
                                   headers=[(KIND_HEADER, LAYOUT)]))
        for n in range(500):
            await (await producer.send(state, snapshot, key=f"a{n % 250}".encode(),
                                       partition=0, headers=[(KIND_HEADER, ACCOUNT)]))
        await (await producer.send(
            state, encode_control(Control(seq=1, written_at=0, offsets=as_of, prices={})),
            key=CONTROL_KEY, partition=0, headers=[(KIND_HEADER, CONTROL)]))
    finally:
        await producer.stop()
    reports: list[RestoreProgress] = []
    restored = await read_changelog(broker.bootstrap, state, [0],
                                    progress=lambda status: reports.append(replace(status)))
    assert len(restored[0].snapshots) == 250
    assert reports, "no progress was reported"
    assert (reports[-1].records, reports[-1].expected, reports[-1].accounts) == (502, 502, 250)
    assert [r.records for r in reports] == sorted(r.records for r in reports)
