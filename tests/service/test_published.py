"""No event id goes out twice with other contents: after a crash, a backlog applied in another
order than the first pass (a late record) is checked against what was published
(`monitor.service.published`)."""

from __future__ import annotations

import asyncio
import time

import orjson
import pytest
from aiokafka import TopicPartition

from monitor.account import UnitKey
from monitor.events import Event
from monitor.service.published import PublishedEvents
from monitor.service.topics import create_topics
from tests.support.kafka import (
    MonitorProcess,
    fresh_settings,
    produce,
    read_events,
    run_args,
    without_wall_clock,
)
from tests.support.messages import deposit, fill, tick

FILLS = TopicPartition("fills", 0)


def event(account: str, transition: int, kind: str, equity: float,
          symbol: str | None = None) -> Event:
    unit = account if symbol is None else f"{account}/{symbol}"
    eid = f"{unit}:{transition}:{kind}"
    payload = {"event_id": eid, "type": kind, "account": account,
               **({} if symbol is None else {"symbol": symbol}), "equity": equity}
    return Event(event_id=eid, type=kind, account=account, payload=payload, symbol=symbol)


def published(*events: Event, restored: dict | None = None) -> PublishedEvents:
    """What a restore read: these events as the output topics hold them, emitted_at and all."""
    found = PublishedEvents()
    for e in events:
        found.add(orjson.dumps({**e.payload, "emitted_at": 1_700_000_000_000}),
                  lambda key: (restored or {}).get(key, 0))
    return found


class Counters(dict):
    """A stand-in for the engine's transition counters: `renumber` records what it is told."""

    def renumber(self, key, transitions: int) -> None:
        self[key] = transitions


def test_the_same_event_applied_again_keeps_its_id():
    first = event("A", 1, "liquidation", 190.0)
    counters = Counters()
    assert published(first).checked(event("A", 1, "liquidation", 190.0),
                                     counters.renumber) == first
    assert counters == {}


def test_an_event_whose_id_went_out_with_other_contents_takes_the_counter_after_the_last():
    """Published A:1:liquidation (equity 190) and A:2:recovered; applied again in replay's
    order the deposit came first, and the next liquidation (equity 100) was built as A:1."""
    found = published(event("A", 1, "liquidation", 190.0), event("A", 2, "recovered", 690.0))
    counters = Counters()
    again = found.checked(event("A", 1, "liquidation", 100.0), counters.renumber)
    assert (again.event_id, again.payload["event_id"]) == ("A:3:liquidation",) * 2
    assert again.payload["equity"] == 100.0
    assert counters == {"A": 3}  # the engine's counter follows: its next event is A:4
    assert found.renumbered == 1
    assert not found  # A is past everything published


def test_an_isolated_positions_event_is_renumbered_under_its_own_unit():
    found = published(event("A", 1, "margin_call", 50.0, symbol="BTC-PERP"))
    counters = Counters()
    again = found.checked(event("A", 1, "liquidation", 10.0, symbol="BTC-PERP"),
                          counters.renumber)
    assert again.event_id == "A/BTC-PERP:2:liquidation"
    assert counters == {UnitKey("A", "BTC-PERP"): 2}


def test_an_id_published_before_what_was_read_goes_out_as_built():
    """Every event beyond a restored counter is read: one that was not is a unit's rebuilt
    from its inputs' start (a partition reset), published long before, and rebuilt alike. A
    chaos drill: A:4, published before the read, rebuilt the same, went out as A:42 (the
    counter after the last one read), and every later event of A under another id than
    replay's."""
    found = published(event("A", 2, "recovered", 690.0), event("A", 41, "recovered", 700.0))
    counters = Counters()
    rebuilt = event("A", 4, "liquidation", 300.0)
    assert found.checked(rebuilt, counters.renumber) is rebuilt
    assert counters == {} and len(found) == 2


def test_an_event_beyond_the_last_published_goes_out_as_built():
    found = published(event("A", 1, "liquidation", 190.0))
    counters = Counters()
    beyond = event("A", 2, "recovered", 690.0)
    assert found.checked(beyond, counters.renumber) is beyond
    assert counters == {} and not found


def test_events_at_or_below_the_restored_counter_are_not_kept():
    """The checkpoint reflects them: they are never built again."""
    found = published(event("A", 3, "liquidation", 190.0), event("B", 1, "recovered", 5.0),
                      restored={"A": 3})
    assert len(found) == 1  # B's alone


def test_records_that_are_not_events_are_passed_over():
    found = PublishedEvents()
    for value in (None, b"", b"not json", b"[1]", b'{"event_id": "A:x:liquidation"}',
                  b'{"event_id": 7, "account": "A"}'):
        found.add(value, lambda key: 0)
    assert not found


def test_once_the_backlog_is_applied_units_behind_their_last_published_counter_catch_up():
    """A's backlog, applied again, gave it no transition: its counter stays 0 while A:1 and
    A:2 went out. Once the inputs are applied up to their ends at the restore, A's counter is
    brought to 2, so that its next event is A:3; a unit not held here is left alone."""
    found = published(event("A", 1, "liquidation", 190.0), event("A", 2, "recovered", 690.0),
                      event("elsewhere", 4, "recovered", 1.0))
    found.until({FILLS: 10})
    counters = Counters(A=0)
    assert not found.caught_up({FILLS: 9}, counters.get, counters.renumber)
    assert counters == {"A": 0} and found
    assert found.caught_up({FILLS: 10}, counters.get, counters.renumber)
    assert counters == {"A": 2} and found.advanced == 1
    assert not found


def test_a_partition_handed_over_before_its_backlog_was_applied_holds_nothing_back():
    found = published(event("A", 1, "liquidation", 190.0))
    found.until({FILLS: 10, TopicPartition("prices", 0): 5})
    counters = Counters(A=1)
    assert found.caught_up({TopicPartition("prices", 0): 5}, counters.get, counters.renumber)


# -- on the embedded broker: the crash a helper found ------------------------------------------


async def wait_for_event(bootstrap: str, topics, wanted) -> list[dict]:
    deadline = time.monotonic() + 60
    while True:
        events = await read_events(bootstrap, topics, idle=0.2)
        if wanted(events):
            return events
        assert time.monotonic() < deadline, [e["event_id"] for e in events]
        await asyncio.sleep(0.1)


@pytest.mark.parametrize("checkpointed", [True, False],
                         ids=["after-a-checkpoint", "before-the-first-checkpoint"])
@pytest.mark.asyncio(loop_scope="session")
async def test_a_liquidation_after_a_crash_that_reordered_a_late_deposit_takes_a_new_id(
        broker, checkpointed: bool):
    """examples/risk.toml; A and B: 1,000 USDT and long 1 BTC-PERP at 50,000, checkpointed.
    A tick to 49,190 (equity 190, maintenance margin 196.76: liquidation of both), then a
    deposit of 500 to A stamped 150 ms before the tick by a clock behind, applied after it
    (late: A recovered, equity 690). Killed before the next checkpoint, the restart applies
    the deposit first, as replay does: A has no transition, its counter stays 0. The tick to
    48,600 then liquidates A (equity 100, maintenance margin 194.4): built as A:1:liquidation,
    an id already out for the first liquidation, which a consumer de-duplicating by
    `event_id` would drop. It goes out as A:3:liquidation. The same when the crash comes
    before the partition's first checkpoint: the restart rebuilds it from its inputs."""
    settings = fresh_settings(broker.bootstrap)
    t = settings.topics
    await create_topics(settings)
    args = run_args(settings, "--group", settings.group, "--metrics-port", "0",
                    "--session-timeout", "2", "--checkpoint-interval", "3600",
                    "--log-level", "info")
    setup = [deposit(t, "A", 1_000.0, "a-d"), fill(t, "a-f", "A", "BTC-PERP", 1.0, 50_000.0),
             deposit(t, "B", 1_000.0, "b-d"), fill(t, "b-f", "B", "BTC-PERP", 1.0, 50_000.0),
             tick(t, "BTC-PERP", 50_000.0)]
    if checkpointed:
        first = await MonitorProcess(args).start()
        await asyncio.wait_for(first.consuming.wait(), timeout=60)
        await produce(broker.bootstrap, setup, one_at_a_time=True)
        await asyncio.sleep(1.0)
        assert await first.stop() == 0  # the final checkpoint holds the five records

    crashed = await MonitorProcess(args).start()
    await asyncio.wait_for(crashed.consuming.wait(), timeout=60)
    if not checkpointed:
        await produce(broker.bootstrap, setup, one_at_a_time=True)
    now = int(time.time() * 1000)
    await produce(broker.bootstrap, [tick(t, "BTC-PERP", 49_190.0)], first_timestamp_ms=now)
    await wait_for_event(broker.bootstrap, t, lambda events: "A:1:liquidation" in {
        e["event_id"] for e in events})
    await produce(broker.bootstrap, [deposit(t, "A", 500.0, "a-late")],
                  first_timestamp_ms=now - 150)
    await wait_for_event(broker.bootstrap, t, lambda events: "A:2:recovered" in {
        e["event_id"] for e in events})
    assert await crashed.stop(kill=True) == -9

    restarted = await MonitorProcess(args).start()
    await asyncio.wait_for(restarted.consuming.wait(), timeout=60)
    await produce(broker.bootstrap, [tick(t, "BTC-PERP", 48_600.0)])
    events = await wait_for_event(broker.bootstrap, t, lambda events: any(
        e["account"] == "A" and e["equity"] == pytest.approx(100.0) for e in events))
    assert await restarted.stop() == 0

    by_id: dict[str, dict] = {}
    for e in events:  # one content per id, whatever was sent twice
        assert without_wall_clock(by_id.setdefault(e["event_id"], e)) == without_wall_clock(e)
    (crash,) = [e for e in events if e["account"] == "A" and e["equity"] == pytest.approx(100.0)]
    assert (crash["event_id"], crash["margin_ratio"]) == ("A:3:liquidation",
                                                          pytest.approx(194.4 / 100.0))
    (said,) = [e for e in restarted.logs if e["event"].startswith("inputs applied again")]
    assert said["events_given_new_ids"] + said["counters_moved_past_published_ids"] == 1
