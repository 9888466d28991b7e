"""Scale-out (SPEC §6): instances in one consumer group, prices read by all, lossless
rebalances. Each instance is its own OS process; they are compared with one instance (whose
events `liqmon replay` reproduces, see test_service)."""

from __future__ import annotations

import asyncio
import signal
import time
from itertools import groupby

import pytest
from aiokafka import TopicPartition

from monitor.config import load_config
from monitor.service.changelog import read_changelog
from monitor.service.metrics import scrape_partition_gauge
from monitor.service.settings import ServiceSettings
from monitor.service.topics import create_topics
from tests.support.compare import final_engine, state_of
from tests.support.fleet import (
    PARTITIONS,
    Instance,
    consumed,
    final_state,
    multi_partition,
    settled,
    snapshots_going_back,
    start,
)
from tests.support.kafka import (
    RunningMonitor,
    produce_located,
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
CONFIG = REPO / "examples" / "risk.toml"


class Feed:
    """The stream, fed one same-topic run at a time, each applied before the next."""

    def __init__(self, settings: ServiceSettings, seed: int, length: int,
                 isolated: float = 0.3) -> None:
        self.settings = settings
        self.records = routable(random_stream(seed=seed, length=length, mean_run=40,
                                              isolated=isolated))
        kinds = [kind for kind, _ in groupby(r[0] for r in self.records)]
        self.runs = [list(run) for _, run in groupby(self.records, key=lambda r: r[0])]
        assert len(self.runs) == len(kinds)
        self.locations: list[tuple[str, int, int]] = []
        self.ends: dict[tuple[str, int], int] = {}
        self.timestamp = 1_000_000

    async def run(self, instances: list[Instance], runs: slice) -> None:
        t = self.settings.topics
        names = {"prices": t.prices, "fills": t.fills, "ledger": t.ledger}
        for run in self.runs[runs]:
            located = await produce_located(
                self.settings.bootstrap, [(names[kind], key, value) for kind, key, value in run],
                first_timestamp_ms=self.timestamp)
            self.timestamp += len(run)
            self.locations.extend(located)
            for topic, partition, offset in located:
                self.ends[(topic, partition)] = offset + 1
            await consumed(instances, self.settings, self.ends)


async def finish(instances: list[Instance], feed: Feed, config) -> list[dict]:
    for instance in instances:
        assert await instance.stop() == 0
    return await published_as_replay(feed, config)


async def published_as_replay(feed: Feed, config) -> list[dict]:
    """The events published so far, once each: replay's of the feed (a repeat is the same
    event)."""
    events = await read_events(feed.settings.bootstrap, feed.settings.topics, idle=0.5)
    unique = {e["event_id"]: e for e in events}
    for event in events:  # a repeat is the same event
        assert without_wall_clock(event) == without_wall_clock(unique[event["event_id"]])
    same_events(list(unique.values()), replayed(feed.records, config), feed.locations)
    return list(unique.values())


async def test_two_instances_split_the_partitions_and_emit_what_one_would(broker):
    config = load_config(CONFIG)
    settings = multi_partition(broker)
    await create_topics(settings)
    a = await start(settings)
    b = await start(settings)
    await settled([a, b], settings)
    assert len(a.owned(settings)) == len(b.owned(settings)) == 2
    feed = Feed(settings, seed=31, length=2_000)
    await feed.run([a, b], slice(None))
    await finish([a, b], feed, config)
    assert await final_state(settings, config) == state_of(
        final_engine(feed.records, config))["accounts"]


async def test_an_instance_killed_mid_stream_is_replaced_without_loss(broker):
    config = load_config(CONFIG)
    settings = multi_partition(broker)
    await create_topics(settings)
    instances = [await start(settings) for _ in range(3)]
    await settled(instances, settings)
    feed = Feed(settings, seed=32, length=2_000)
    third = len(feed.runs) // 3
    await feed.run(instances, slice(0, third))
    victim = next(i for i in instances if i.owned(settings))
    assert await victim.stop(kill=True) == -9
    survivors = [i for i in instances if i is not victim]
    await feed.run(survivors, slice(third, None))  # waits out the takeover
    await settled(survivors, settings)
    await finish(survivors, feed, config)
    assert await final_state(settings, config) == state_of(
        final_engine(feed.records, config))["accounts"]
    restored = [entry for i in survivors for entry in i.logs if entry["event"] == "restored"]
    assert any(entry["records_replayed"] > 0 or entry["accounts"] > 0 for entry in restored)


async def kill_one_before_it_checkpoints(settings: ServiceSettings, feed: Feed, config,
                                         before_the_kill=None) -> tuple[set[int], Instance]:
    """Two instances share the partitions, the victim never checkpointing; half the feed, then
    (after ``before_the_kill``, if given) the victim is killed and the survivor takes the rest.
    It must publish what one instance would have and end in its state. The victim's
    partitions, and the survivor."""
    await create_topics(settings)
    victim = await start(settings, checkpoint_interval=3600)
    survivor = await start(settings)
    await settled([victim, survivor], settings)
    kept = victim.owned(settings)
    half = len(feed.runs) // 2
    await feed.run([victim, survivor], slice(0, half))
    if before_the_kill is not None:
        await before_the_kill()
    assert await victim.stop(kill=True) == -9
    await feed.run([survivor], slice(half, None))  # waits out the takeover
    await finish([survivor], feed, config)
    assert await final_state(settings, config) == state_of(
        final_engine(feed.records, config))["accounts"]
    return kept, survivor


async def test_partitions_never_checkpointed_are_caught_up_from_their_first_record(broker):
    """The instance that held them is killed before any checkpoint of theirs: the survivor
    replays their records from the start, merged with every tick in between, and publishes
    what one instance would have (repeats of the dead one's events are the same events)."""
    settings = multi_partition(broker)
    kept, survivor = await kill_one_before_it_checkpoints(
        settings, Feed(settings, seed=34, length=2_000), load_config(CONFIG))
    # the rebalance after the kill hands the survivor every partition, its own included
    taken_over = [entry for entry in survivor.logs if entry["event"] == "restored"
                  and kept <= set(entry["partitions"])]
    assert taken_over and taken_over[-1]["records_replayed"] > 0


async def test_a_catch_up_reads_partitions_ending_in_a_transaction_marker_to_their_end(broker):
    """As above, with a commit marker as the last offset of every fills and ledger partition
    when the survivor catches up the dead one's: no record is ever handed over at it, yet
    the catch-up finishes (it would otherwise read for ever) and nothing is lost."""
    settings = multi_partition(broker)

    async def end_every_account_partition_in_a_marker() -> None:
        for topic in (settings.topics.fills, settings.topics.ledger):
            for partition in range(PARTITIONS):
                await write_commit_marker(settings.bootstrap, TopicPartition(topic, partition))

    await kill_one_before_it_checkpoints(settings, Feed(settings, seed=35, length=1_000),
                                         load_config(CONFIG),
                                         end_every_account_partition_in_a_marker)


async def test_an_instance_joining_mid_stream_takes_partitions_without_loss(broker):
    config = load_config(CONFIG)
    settings = multi_partition(broker)
    await create_topics(settings)
    a = await start(settings)
    await settled([a], settings)
    feed = Feed(settings, seed=33, length=2_000)
    half = len(feed.runs) // 2
    await feed.run([a], slice(0, half))
    b = await start(settings)
    await settled([a, b], settings)
    assert b.owned(settings)  # it took some
    await feed.run([a, b], slice(half, None))
    await finish([a, b], feed, config)
    assert await final_state(settings, config) == state_of(
        final_engine(feed.records, config))["accounts"]


async def test_a_reset_while_another_instance_runs_loses_no_account(broker):
    """--reset-state left set on a fleet: b starts with it after a has rebuilt and
    checkpointed, and resets the changelog under a, whose checkpoints would from then on hold
    only the accounts it changed. a finds the reset at its next checkpoint (the one on the
    rebalance b's join starts, unless it could not look then) and writes every account of its
    partitions again, naming the reset; b restores what it gains from that, or rebuilds it
    from the inputs. Every event is replay's, every partition ends with a control record that
    vouches for the reset, and a restart holds replay's state."""
    config = load_config(CONFIG)
    settings = multi_partition(broker)
    await create_topics(settings)
    a = await start(settings, extra=["--reset-state"])
    await settled([a], settings)
    feed = Feed(settings, seed=36, length=2_000)
    half = len(feed.runs) // 2
    await feed.run([a], slice(0, half))
    await asyncio.sleep(1.0)  # a checkpoints everything it rebuilt (every 0.2 s)
    b = await start(settings, extra=["--reset-state"])
    await settled([a, b], settings)
    await feed.run([a, b], slice(half, None))
    await finish([a, b], feed, config)
    assert any(entry["event"].startswith("the changelog was reset") for entry in a.logs)
    restored = await read_changelog(settings.bootstrap, settings.topics.state,
                                    range(PARTITIONS))
    assert all(part.control is not None for part in restored.values())

    async with RunningMonitor(settings, config) as restarted:
        await wait_processed(restarted, {TopicPartition(*key): end
                                         for key, end in feed.ends.items()})
        assert state_of(restarted.engine)["accounts"] == state_of(
            final_engine(feed.records, config))["accounts"]
    await published_as_replay(feed, config)


async def logged(instance: Instance, event: str, timeout: float = 60) -> dict:
    """The first log line of this event (waiting for it)."""
    deadline = time.monotonic() + timeout
    while True:
        found = [entry for entry in instance.logs if entry["event"] == event]
        if found:
            return found[0]
        assert time.monotonic() < deadline, f"never logged {event!r}"
        await asyncio.sleep(0.01)


async def test_sigterm_while_another_instance_joins_takes_no_new_partitions(broker):
    config = load_config(CONFIG)
    settings = multi_partition(broker)
    await create_topics(settings)
    a = await start(settings)
    await settled([a], settings)
    feed = Feed(settings, seed=34, length=2_000)
    half = len(feed.runs) // 2
    await feed.run([a], slice(0, half))
    b = Instance(settings)
    await b.start()
    await logged(a, "partition handed over")  # B joined: the group is rebalancing
    assert await a.stop() == 0
    await asyncio.wait_for(b.consuming.wait(), timeout=60)
    await settled([b], settings)
    await feed.run([b], slice(half, None))
    await finish([b], feed, config)  # every event, each id with one content, as replay's

    said = [entry["event"] for entry in a.logs]
    after = said[said.index("stopped") + 1:]
    assert after == [], after  # no assignment taken, nothing restored, no event after it


async def test_partitions_handed_over_leave_no_lag_or_offset_series_behind(broker):
    settings = multi_partition(broker)
    await create_topics(settings)
    a = await start(settings)
    await settled([a], settings)
    feed = Feed(settings, seed=35, length=600)
    await feed.run([a], slice(None))
    t = settings.topics
    lag = await asyncio.to_thread(scrape_partition_gauge, a.port, "liqmon_consumer_lag_records")
    assert {p for (topic, p) in lag if topic == t.fills} == set(range(PARTITIONS))
    b = await start(settings)
    await settled([a, b], settings)
    kept, lost = a.owned(settings), b.owned(settings)
    assert len(kept) == len(lost) == 2
    lag = await asyncio.to_thread(scrape_partition_gauge, a.port, "liqmon_consumer_lag_records")
    offsets = await asyncio.to_thread(a.positions)
    for series in (lag, offsets):
        accounts = {(topic, p) for (topic, p) in series if topic in (t.fills, t.ledger)}
        assert accounts == {(topic, p) for topic in (t.fills, t.ledger) for p in kept}
    for instance in (a, b):
        assert await instance.stop() == 0


async def test_an_instance_frozen_past_its_session_writes_no_checkpoint_over_its_successor(
        broker):
    """A long GC pause, a throttled container or a stopped VM: the group gives a frozen
    instance's partitions to another, which restores them and moves on. When the frozen one
    wakes it still holds its accounts, dirty, and checkpoints them as the rebalance takes its
    partitions back (or as its interval runs out), but they are stale now: written, they would
    be the changelog's newest snapshots of those accounts, and the next restore of them would
    start from a state older than its offsets say. Nothing it writes may land after its
    successor's."""
    config = load_config(CONFIG)
    settings = multi_partition(broker)
    await create_topics(settings)
    frozen = await start(settings, checkpoint_interval=3600)
    survivor = await start(settings)
    await settled([frozen, survivor], settings)
    feed = Feed(settings, seed=36, length=3_000)
    third = len(feed.runs) // 3
    await feed.run([frozen, survivor], slice(0, third))
    frozen.proc.send_signal(signal.SIGSTOP)  # having checkpointed none of its accounts
    try:
        await settled([survivor], settings)  # the session timed out: the survivor has all
        await feed.run([survivor], slice(third, 2 * third))
        await asyncio.sleep(1)  # the survivor checkpoints what it changed
    finally:
        frozen.proc.send_signal(signal.SIGCONT)
    await settled([frozen, survivor], settings)  # back in the group: partitions split again
    await feed.run([frozen, survivor], slice(2 * third, None))
    await finish([frozen, survivor], feed, config)
    assert await final_state(settings, config) == state_of(
        final_engine(feed.records, config))["accounts"]
    assert await snapshots_going_back(settings) == []
