"""The time-ordered merge of input partitions (SPEC §6): a record goes out only once every
other partition is known to hold nothing earlier."""

from __future__ import annotations

import math
from dataclasses import dataclass

from aiokafka import TopicPartition

from monitor.service.merge import MAX_ANSWERS, TimestampMerge
from tests.support.clock import Clock
from tests.support.merge import positioned

PRICES, FILLS = TopicPartition("prices", 0), TopicPartition("fills", 0)
RANK = {"prices": 1, "fills": 0}.__getitem__
NOW = 1_700_000_000_000.0  # wall clock (ms) at which the test's records reach the merge


@dataclass
class Rec:
    offset: int
    timestamp: int


def merge(max_wait: float = 10, skew: int = 5, max_stall: float = 10,
          clock: Clock | None = None, most_per_turn: float = math.inf) -> TimestampMerge:
    """Every gap between takes counts in full towards the bounds unless ``most_per_turn`` says
    otherwise (the tests of a process held still say so)."""
    m = TimestampMerge(RANK, max_skew_ms=skew, max_wait=max_wait, max_stall=max_stall,
                       clock=clock or Clock(), most_per_turn=most_per_turn)
    for tp in (PRICES, FILLS):
        positioned(m, tp, 0, at_ms=NOW - 2)  # the service positions every partition first
    return m


def offsets(out) -> list[tuple[str, int]]:
    return [(tp.topic, r.offset) for tp, r in out]


def test_records_come_out_in_timestamp_order_across_partitions() -> None:
    m = merge()
    m.add(PRICES, [Rec(0, 1), Rec(1, 4), Rec(2, 6)], NOW)
    m.add(FILLS, [Rec(0, 2), Rec(1, 3), Rec(2, 6)], NOW)
    assert offsets(m.take(4, [PRICES, FILLS])) == [
        ("prices", 0), ("fills", 0), ("fills", 1), ("prices", 1)]
    # both partitions answer a probe sent after the records arrived: the rest may go out
    m.probed(NOW + 1, {PRICES: 3, FILLS: 3})
    assert offsets(m.take(100, [PRICES, FILLS])) == [
        ("fills", 2), ("prices", 2)]  # equal timestamps: fills ranks first


def test_records_released_in_order_are_not_late() -> None:
    m = merge()
    m.add(PRICES, [Rec(0, 1), Rec(1, 6)], NOW)
    m.add(FILLS, [Rec(0, 6)], NOW)
    m.probed(NOW + 1, {PRICES: 2, FILLS: 1})
    assert offsets(m.take(100, [PRICES, FILLS])) == [("prices", 0), ("fills", 0), ("prices", 1)]
    assert (m.late, m.late_by_ms) == ({}, 0)


def test_a_record_reaching_the_merge_after_a_later_one_went_out_is_counted_late() -> None:
    """A producer that batched it past the skew: the probe proved fills empty, the tick went
    out, then a fill stamped 3 ms before the tick arrives. Replay applies it first."""
    m = merge()
    m.add(PRICES, [Rec(0, int(NOW) + 10)], NOW)
    m.take(100, [PRICES, FILLS])
    m.probed(NOW + 16, {FILLS: 0})
    assert offsets(m.take(100, [PRICES, FILLS])) == [("prices", 0)]
    m.add(FILLS, [Rec(0, int(NOW) + 7)], NOW + 30)
    m.probed(NOW + 31, {PRICES: 1})
    assert offsets(m.take(100, [PRICES, FILLS])) == [("fills", 0)]
    assert (m.late, m.late_by_ms) == ({"fills": 1}, 3)
    assert m.late_arrival_ms == 23  # a --max-skew of 23 ms would have held the tick for it


def test_a_record_tied_with_one_already_out_but_of_a_lower_rank_is_late_by_0_ms() -> None:
    m = merge()
    m.add(PRICES, [Rec(0, 10)], NOW)
    m.probed(NOW + 16, {FILLS: 0})
    assert offsets(m.take(100, [PRICES, FILLS])) == [("prices", 0)]
    m.add(FILLS, [Rec(0, 10)], NOW + 30)  # equal timestamps: fills ranks first in replay
    m.probed(NOW + 31, {PRICES: 1})
    assert offsets(m.take(100, [PRICES, FILLS])) == [("fills", 0)]
    assert (m.late, m.late_by_ms) == ({"fills": 1}, 0)


def test_a_record_stamped_earlier_than_its_partitions_previous_one_is_late() -> None:
    """Offsets go out in order within a partition; replay, sorting by timestamp, would not."""
    m = merge()
    m.add(PRICES, [Rec(0, 10), Rec(1, 4), Rec(2, 12)], NOW)
    m.probed(NOW + 13, {FILLS: 0})
    assert offsets(m.take(100, [PRICES, FILLS])) == [("prices", 0), ("prices", 1), ("prices", 2)]
    assert (m.late, m.late_by_ms) == ({"prices": 1}, 6)


FILLS_1, LEDGER = TopicPartition("fills", 1), TopicPartition("ledger", 0)
ACCOUNTS = ("fills", "ledger")  # co-partitioned by account, as the service merges them


def released_then_arriving(first: TopicPartition, first_ts: int, then: TopicPartition,
                           then_ts: int) -> TimestampMerge:
    """``first``'s record goes out, proven by a probe finding ``then`` empty; then a record of
    ``then`` stamped ``then_ts`` arrives 30 ms late and goes out after it."""
    tps = [first, then]
    m = TimestampMerge({"prices": 2, "fills": 1, "ledger": 0}.__getitem__, max_skew_ms=5,
                       clock=Clock(), co_partitioned=ACCOUNTS)
    for tp in tps:
        positioned(m, tp, 0, at_ms=NOW - 2)
    m.add(first, [Rec(0, first_ts)], NOW)
    m.take(100, tps)
    m.probed(NOW + 16, {then: 0})
    assert offsets(m.take(100, tps)) == [(first.topic, 0)]
    m.add(then, [Rec(0, then_ts)], NOW + 30)
    m.probed(NOW + 31, {first: 1})
    assert offsets(m.take(100, tps)) == [(then.topic, 0)]
    return m


def test_a_fill_after_a_later_fill_of_another_account_partition_is_not_late() -> None:
    """Their accounts never meet: replay's order between them changes nothing it computes."""
    m = released_then_arriving(FILLS_1, int(NOW) + 10, FILLS, int(NOW) + 7)
    assert m.late == {}


def test_a_fill_after_a_later_ledger_entry_of_its_own_account_partition_is_late() -> None:
    m = released_then_arriving(LEDGER, int(NOW) + 10, FILLS, int(NOW) + 7)
    assert (m.late, m.late_by_ms) == ({"fills": 1}, 3)


def test_a_tick_after_a_later_fill_of_any_account_partition_is_late() -> None:
    """A tick bears on every account: the fill was valued at the price before it."""
    m = released_then_arriving(FILLS_1, int(NOW) + 10, PRICES, int(NOW) + 7)
    assert (m.late, m.late_by_ms) == ({"prices": 1}, 3)


def test_a_fill_after_a_later_tick_is_late_in_a_co_partitioned_merge_too() -> None:
    m = released_then_arriving(PRICES, int(NOW) + 10, FILLS_1, int(NOW) + 7)
    assert (m.late, m.late_by_ms) == ({"fills": 1}, 3)


def test_a_partition_handed_over_and_gained_again_is_late_only_against_what_follows() -> None:
    """Gained back, its records are read again from the new owner's checkpoint: earlier than
    what this instance applied of it before, but not after anything applied since."""
    m = released_then_arriving(FILLS_1, int(NOW) + 10, FILLS, int(NOW) + 7)
    m.drop([FILLS_1])
    positioned(m, FILLS_1, 0, at_ms=NOW - 2)
    m.add(FILLS_1, [Rec(0, int(NOW) + 8)], NOW + 40)
    m.probed(NOW + 41, {FILLS: 1})
    assert offsets(m.take(100, [FILLS, FILLS_1])) == [("fills", 0)]
    assert m.late == {}


def test_a_record_stamped_minutes_ahead_of_its_arrival_goes_out_as_if_stamped_on_arrival(
        ) -> None:
    """A producer whose clock runs 10 minutes ahead: proving its records in order would take
    until the wall clock got there, holding the rest of their partition back meanwhile. They
    are placed at their arrival + --merge-wait (0.5 s) and counted."""
    m = merge(max_wait=0.5)
    ahead = int(NOW) + 600_000
    m.add(FILLS, [Rec(0, ahead), Rec(1, ahead + 1)], NOW)
    m.probed(NOW + 506, {PRICES: 0})  # proves prices empty past arrival + 0.5 s + the skew
    assert offsets(m.take(100, [PRICES, FILLS])) == [("fills", 0), ("fills", 1)]
    assert (m.ahead, m.ahead_by_ms) == ({"fills": 2}, 600_001)


def test_a_tick_stamped_after_the_arrival_of_one_stamped_ahead_goes_out_after_it() -> None:
    """Live order is arrival order for such a record; replay, sorting by timestamp, applies
    the tick first."""
    m = merge(max_wait=0.5)
    m.add(FILLS, [Rec(0, int(NOW) + 600_000)], NOW)
    m.add(PRICES, [Rec(0, int(NOW) + 600)], NOW + 600)
    m.probed(NOW + 610, {PRICES: 1, FILLS: 1})
    assert offsets(m.take(100, [PRICES, FILLS])) == [("fills", 0), ("prices", 0)]


def test_a_record_stamped_ahead_by_less_than_the_merge_wait_keeps_its_timestamp() -> None:
    """Clocks a little apart: it waits for a proof at its timestamp + the skew, as replay's
    order needs."""
    m = merge(max_wait=0.5)
    m.add(FILLS, [Rec(0, int(NOW) + 400)], NOW)
    m.add(PRICES, [Rec(0, int(NOW) + 300)], NOW + 300)
    m.probed(NOW + 301, {FILLS: 1})
    assert offsets(m.take(100, [PRICES, FILLS])) == [("prices", 0)]
    assert m.take(100, [PRICES, FILLS]) == [] and m.head_needs == NOW + 405
    m.probed(NOW + 405, {PRICES: 1})
    assert offsets(m.take(100, [PRICES, FILLS])) == [("fills", 0)]
    assert m.ahead == {}


def test_a_silent_partition_never_probed_holds_the_others_back() -> None:
    m = merge()
    m.add(PRICES, [Rec(0, 5)], NOW)
    assert m.take(100, [PRICES, FILLS]) == []
    assert m.blocked_on == [FILLS]
    assert m.head_needs == NOW  # a probe sent from the record's arrival on proves it


def test_a_probe_sent_before_the_record_arrived_proves_nothing_about_it() -> None:
    m = merge()
    m.probed(NOW - 1, {FILLS: 0})
    m.add(PRICES, [Rec(0, 5)], NOW)
    assert m.take(100, [PRICES, FILLS]) == []
    assert FILLS in m.to_probe()


def test_a_partition_with_records_buffered_is_probed_too_so_it_is_proven_once_drained() -> None:
    m = merge()
    m.add(PRICES, [Rec(0, 5)], NOW)
    m.add(FILLS, [Rec(0, 4)], NOW)
    assert m.take(1, [PRICES, FILLS]) != []  # fills@4 goes first; fills is now silent
    assert m.to_probe() == [PRICES, FILLS]
    m.probed(NOW + 1, {PRICES: 1, FILLS: 1})  # nothing beyond what was read, anywhere
    assert offsets(m.take(100, [PRICES, FILLS])) == [("prices", 0)]
    assert m.to_probe() == []


def test_a_probe_sent_after_arrival_with_nothing_new_releases_the_record() -> None:
    m = merge()
    m.add(PRICES, [Rec(0, 5)], NOW)
    m.take(100, [PRICES, FILLS])
    m.probed(NOW + 2, {FILLS: 0})  # fills ends where it was read to
    assert offsets(m.take(100, [PRICES, FILLS])) == [("prices", 0)]


def test_a_probe_that_finds_unread_records_releases_only_once_they_are_buffered() -> None:
    m = merge()
    m.add(PRICES, [Rec(0, 5)], NOW)
    m.take(100, [PRICES, FILLS])
    m.probed(NOW + 2, {PRICES: 1, FILLS: 1})  # fills holds one record not fetched yet
    assert m.take(100, [PRICES, FILLS]) == []
    assert m.to_probe() == []  # the answered probe will do once the fetch arrives
    m.add(FILLS, [Rec(0, 3)], NOW + 3)  # earlier timestamp: it goes first
    assert offsets(m.take(100, [PRICES, FILLS])) == [("fills", 0), ("prices", 0)]


def test_a_record_waits_for_a_probe_sent_after_its_timestamp_plus_the_skew() -> None:
    m = merge(skew=5)
    ts = int(NOW) + 10  # a producer clock slightly ahead of ours
    m.add(PRICES, [Rec(0, ts)], NOW)
    m.take(100, [PRICES, FILLS])
    assert m.head_needs == ts + 5
    m.probed(ts + 4, {FILLS: 0})
    assert m.take(100, [PRICES, FILLS]) == []
    m.probed(ts + 5, {FILLS: 0})
    assert offsets(m.take(100, [PRICES, FILLS])) == [("prices", 0)]


def test_historical_timestamps_are_ordered_by_arrival_proofs_not_by_the_clock() -> None:
    """A backfill with 1970 timestamps: a probe from now proves nothing about records
    appended after it, whatever their timestamps."""
    m = merge()
    m.probed(NOW, {FILLS: 0})
    m.add(PRICES, [Rec(0, 1_000)], NOW + 10)
    assert m.take(100, [PRICES, FILLS]) == []
    assert m.blocked_on == [FILLS]


def test_an_exhausted_partition_does_not_hold_anyone_back() -> None:
    m = merge()
    m.add(PRICES, [Rec(0, 5), Rec(1, 6)], NOW)
    out = m.take(100, [PRICES, FILLS], lambda tp, offset: True)
    assert [r.offset for _, r in out] == [0, 1]


def test_holding_back_is_bounded_by_max_wait_and_counted() -> None:
    m = merge(max_wait=0)
    m.add(PRICES, [Rec(0, 5), Rec(1, 6)], NOW)
    assert [r.offset for _, r in m.take(100, [PRICES, FILLS])] == [0, 1]
    assert m.forced == 2


def test_a_partition_sought_anew_gets_the_whole_max_wait_before_records_pass_it() -> None:
    """The loop may stand still for a while with the head held back (a restore, a rebalance);
    a partition positioned meanwhile has not been probed yet and must get its chance."""
    clock = Clock()
    m = merge(max_wait=0.5, clock=clock)
    m.add(PRICES, [Rec(0, 5)], NOW)
    assert m.take(100, [PRICES, FILLS]) == []  # held back for fills from clock 0
    clock.now = 3.0  # the loop stood still; fills is positioned again (kept, resumed)
    m.seek(FILLS, 40)
    assert m.take(100, [PRICES, FILLS]) == [] and m.forced == 0
    clock.now = 3.5
    assert [r.offset for _, r in m.take(100, [PRICES, FILLS])] == [0] and m.forced == 1


def test_the_wait_restarts_when_the_loop_has_held_still() -> None:
    clock = Clock()
    m = merge(max_wait=0.5, clock=clock)
    m.add(PRICES, [Rec(0, 5)], NOW)
    assert m.take(100, [PRICES, FILLS]) == []
    clock.now = 3.0  # a rebalance: the loop took nothing, so no probe was asked for
    m.restart_wait()
    assert m.take(100, [PRICES, FILLS]) == [] and m.forced == 0
    clock.now = 3.5
    assert [r.offset for _, r in m.take(100, [PRICES, FILLS])] == [0] and m.forced == 1


def test_a_forced_release_names_the_partition_it_did_not_wait_for_any_longer() -> None:
    m = merge(max_wait=0)
    m.add(PRICES, [Rec(0, 5)], NOW)
    m.probed(NOW + 1, {PRICES: 1})  # prices is proven; fills never answered
    assert [r.offset for _, r in m.take(100, [PRICES, FILLS])] == [0]
    assert m.forced_on == {FILLS}
    assert m.blocked_on == []  # nothing buffered is left to hold back


def test_a_partition_known_to_hold_unread_records_is_waited_for_past_max_wait() -> None:
    """A backlog: the consumer hands over other partitions first. The broker answered, so
    this is no outage; the records it named may sort first and are on their way."""
    m = merge(max_wait=0)
    m.add(PRICES, [Rec(0, 5)], NOW)
    m.probed(NOW + 1, {PRICES: 1, FILLS: 2})  # fills holds two records not read yet
    assert m.take(100, [PRICES, FILLS]) == []
    assert (m.forced, m.blocked_on) == (0, [FILLS])
    m.add(FILLS, [Rec(0, 4), Rec(1, 5)], NOW + 900)
    assert offsets(m.take(100, [PRICES, FILLS])) == [("fills", 0), ("fills", 1), ("prices", 0)]
    assert m.forced == 0


def test_a_probe_proves_nothing_while_the_consumer_holds_records_it_fetched() -> None:
    """Fills' last batch holds offsets 0-3, and the broker reports its end as the batch's
    first offset + 1 (the embedded broker does). The consumer handed over offsets 0 and 1
    only (its records limit), and its fetch reported a high watermark of 4: offsets 2 and 3,
    stamped before the price, wait in it. Prices goes out only once they are handed over."""
    m = merge()
    m.add(PRICES, [Rec(0, 9)], NOW)
    m.probed(NOW + 10, {PRICES: 1, FILLS: 1})
    m.fetched(FILLS, [Rec(0, 1), Rec(1, 2)], 2, fetched_end=4, fetched_end_at_ms=NOW)
    assert offsets(m.take(100, [PRICES, FILLS])) == [("fills", 0), ("fills", 1)]
    assert m.blocked_on == [FILLS]
    m.fetched(FILLS, [Rec(2, 3), Rec(3, 4)], 4, fetched_end=4, fetched_end_at_ms=NOW)
    assert offsets(m.take(100, [PRICES, FILLS])) == [("fills", 2), ("fills", 3), ("prices", 0)]
    assert (m.forced, m.late) == (0, {})


def test_a_partition_positioned_inside_its_last_batch_is_proven_only_by_a_fetch_since() -> None:
    """A restart: fills' last batch holds offsets 0-9, and the checkpoint resumes it at 6. The
    embedded broker reports its end as 1, behind the position, before the consumer fetched
    anything: offsets 6-9, stamped before the price, are still to come. Prices goes out only
    after them, once the first fetch since has reported a high watermark of 10."""
    m = merge()
    m.seek(FILLS, 6, at_ms=NOW)
    m.add(PRICES, [Rec(0, 9)], NOW)
    m.probed(NOW + 10, {PRICES: 1, FILLS: 1})
    assert m.take(100, [PRICES, FILLS]) == []
    assert m.blocked_on == [FILLS]
    m.fetched(FILLS, [Rec(6, 1), Rec(7, 2), Rec(8, 3), Rec(9, 4)], 10, fetched_end=10,
              fetched_end_at_ms=NOW + 12)
    assert offsets(m.take(100, [PRICES, FILLS])) == [
        ("fills", 6), ("fills", 7), ("fills", 8), ("fills", 9), ("prices", 0)]
    assert (m.forced, m.late) == (0, {})


def test_an_answer_that_waited_for_a_fetch_since_positioning_proves_an_idle_partition() -> None:
    """Fills, positioned at 0 on an empty log, is probed before its consumer's first fetch:
    the answer waits. That fetch brings no record and moves no position, but reports the
    end, 0: the answer now proves fills, and the price goes out without waiting for more."""
    m = merge(max_wait=60)
    m.seek(FILLS, 0, at_ms=NOW)
    m.add(PRICES, [Rec(0, 9)], NOW)
    m.probed(NOW + 10, {PRICES: 1, FILLS: 0})
    assert m.take(100, [PRICES, FILLS]) == []
    m.fetched(FILLS, [], 0, fetched_end=0, fetched_end_at_ms=NOW + 12)
    assert offsets(m.take(100, [PRICES, FILLS])) == [("prices", 0)]
    assert m.forced == 0


def test_a_high_watermark_fetched_before_the_partition_was_positioned_is_not_taken() -> None:
    """Fills was read up to 4 before a replaced log moved it to 6 (inside its last batch,
    0-9): the consumer still reports that old fetch's high watermark, which proves nothing
    of the new position. Prices goes out after offsets 6-9, once a fetch since brings them."""
    m = merge()
    m.seek(FILLS, 6, at_ms=NOW)
    m.add(PRICES, [Rec(0, 9)], NOW)
    m.fetched(FILLS, [], 6, fetched_end=4, fetched_end_at_ms=NOW - 5)
    m.probed(NOW + 10, {PRICES: 1, FILLS: 1})
    assert m.take(100, [PRICES, FILLS]) == []
    m.fetched(FILLS, [Rec(6, 1), Rec(7, 2), Rec(8, 3), Rec(9, 4)], 10, fetched_end=10,
              fetched_end_at_ms=NOW + 12)
    assert offsets(m.take(100, [PRICES, FILLS]))[-1] == ("prices", 0)
    assert (m.forced, m.late) == (0, {})


def test_records_the_broker_reports_but_never_delivers_stall_the_partition_after_max_stall(
        ) -> None:
    """Fills answered an end of 2 and, ten seconds on, still no fetch brought its records
    (a broker fault): it is declared stalled and prices go on without it, counted."""
    clock = Clock()
    m = merge(max_wait=0, clock=clock)
    m.add(PRICES, [Rec(0, 5)], NOW)
    m.probed(NOW + 1, {PRICES: 1, FILLS: 2})
    clock.now = 9.9
    assert m.take(100, [PRICES, FILLS]) == []
    clock.now = 10.0
    assert offsets(m.take(100, [PRICES, FILLS])) == [("prices", 0)]
    assert m.stalled == {FILLS: (0, 2, 10.0)}
    assert (m.forced, m.forced_past_stalled) == (0, 1)


def test_a_partition_its_caller_paused_gets_the_whole_stall_timeout_once_resumed() -> None:
    """Prices' buffer was full, so the loop paused its fetching for 60 s while fills caught
    up (a backlog); a probe had found prices records past those buffered. Resumed at 60 s,
    its buffer drains and fills' next record waits for prices' consumer, which delivers half a
    second later: nothing is declared stalled, nothing forced, replay's order."""
    clock = Clock()
    m = merge(clock=clock)
    m.add(PRICES, [Rec(0, 1), Rec(1, 2)], NOW)
    m.add(FILLS, [Rec(0, 10)], NOW)
    m.probed(NOW + 1, {PRICES: 4, FILLS: 1})
    clock.now = 60.0
    m.resumed(PRICES)
    assert offsets(m.take(100, [PRICES, FILLS])) == [("prices", 0), ("prices", 1)]
    clock.now = 60.5
    m.add(PRICES, [Rec(2, 8), Rec(3, 12)], NOW + 60_500)
    assert offsets(m.take(100, [PRICES, FILLS])) == [("prices", 2), ("fills", 0)]
    assert not m.stalled and (m.forced, m.forced_past_stalled) == (0, 0)


def test_a_partition_its_caller_paused_is_not_declared_stalled_however_long() -> None:
    """Prices was paused with two records buffered and more found by a probe; 60 s on, its
    buffer drains in one take before the caller resumes it. Fills' record waits for prices'
    consumer (nothing stalled, nothing forced) until the caller resumes it, and only a whole
    stall timeout after that is prices declared stalled."""
    clock = Clock()
    m = merge(clock=clock)
    m.add(PRICES, [Rec(0, 1), Rec(1, 2)], NOW)
    m.add(FILLS, [Rec(0, 10)], NOW)
    m.probed(NOW + 1, {PRICES: 4, FILLS: 1})
    m.paused(PRICES)
    clock.now = 60.0
    assert offsets(m.take(100, [PRICES, FILLS])) == [("prices", 0), ("prices", 1)]
    assert not m.stalled and m.forced_past_stalled == 0
    m.resumed(PRICES)
    clock.now = 69.9
    assert m.take(100, [PRICES, FILLS]) == []
    clock.now = 70.0
    assert offsets(m.take(100, [PRICES, FILLS])) == [("fills", 0)]
    assert PRICES in m.stalled and m.forced_past_stalled == 1


def test_a_stalled_partition_holds_nothing_back_and_is_not_probed() -> None:
    clock = Clock()
    m = merge(max_stall=0, clock=clock)
    m.add(PRICES, [Rec(0, 5)], NOW)
    m.probed(NOW + 1, {PRICES: 1, FILLS: 2})
    assert offsets(m.take(100, [PRICES, FILLS])) == [("prices", 0)]
    m.add(PRICES, [Rec(1, 6), Rec(2, 7)], NOW + 50)
    m.probed(NOW + 51, {PRICES: 3})
    assert offsets(m.take(100, [PRICES, FILLS])) == [("prices", 1), ("prices", 2)]
    assert m.to_probe() == []
    assert m.forced_past_stalled == 3


def test_the_stall_clock_restarts_whenever_the_partition_is_read_further() -> None:
    clock = Clock()
    m = merge(clock=clock)
    m.add(PRICES, [Rec(0, 5)], NOW)
    m.probed(NOW + 1, {PRICES: 1, FILLS: 3})  # three fills, none read yet
    clock.now = 8.0
    m.add(FILLS, [Rec(0, 1)], NOW + 2)  # the consumer is getting there
    assert offsets(m.take(100, [PRICES, FILLS])) == [("fills", 0)]
    clock.now = 17.9
    assert m.take(100, [PRICES, FILLS]) == []
    assert m.stalled == {}
    clock.now = 18.0
    assert offsets(m.take(100, [PRICES, FILLS])) == [("prices", 0)]
    assert m.stalled == {FILLS: (1, 3, 10.0)}


def test_the_stall_clock_of_a_long_idle_partition_starts_when_records_are_found() -> None:
    """Fills was last read at 0 s; at 100 s a probe finds a record of it: the consumer gets
    the full ten seconds to bring it."""
    clock = Clock()
    m = merge(clock=clock)
    clock.now = 100.0
    m.add(PRICES, [Rec(0, 5)], NOW)
    m.probed(NOW + 1, {PRICES: 1, FILLS: 1})
    clock.now = 109.9
    assert m.take(100, [PRICES, FILLS]) == []
    clock.now = 110.0
    assert offsets(m.take(100, [PRICES, FILLS])) == [("prices", 0)]


def test_a_stalled_partition_that_delivers_again_holds_records_back_again() -> None:
    clock = Clock()
    m = merge(max_stall=0, clock=clock)
    m.add(PRICES, [Rec(0, 5)], NOW)
    m.probed(NOW + 1, {PRICES: 1, FILLS: 2})
    assert offsets(m.take(100, [PRICES, FILLS])) == [("prices", 0)]
    m.add(FILLS, [Rec(0, 3), Rec(1, 4)], NOW + 60)  # late, and out of replay's order
    assert m.stalled == {}
    m.add(PRICES, [Rec(1, 8)], NOW + 61)
    assert offsets(m.take(100, [PRICES, FILLS])) == [("fills", 0), ("fills", 1)]
    assert m.take(100, [PRICES, FILLS]) == []  # prices@8 waits for a probe of fills again
    assert m.blocked_on == [FILLS]


def test_a_transaction_marker_the_consumer_skipped_counts_as_read() -> None:
    """Offsets 0 and 1 are records, 2 a commit marker: the end is 3, and no record at 2
    is ever handed over; the consumer's position says it was passed."""
    m = merge(max_wait=0)
    m.add(PRICES, [Rec(0, 5)], NOW)
    m.add(FILLS, [Rec(0, 1), Rec(1, 2)], NOW)
    m.probed(NOW + 1, {PRICES: 1, FILLS: 3})
    assert offsets(m.take(100, [PRICES, FILLS])) == [("fills", 0), ("fills", 1)]
    m.read_to(FILLS, 3)
    assert offsets(m.take(100, [PRICES, FILLS])) == [("prices", 0)]
    assert m.forced == 0


def test_an_answer_from_a_log_since_cut_back_stops_counting_as_unread() -> None:
    """Fills answered an end of 2, then, after an unclean leader election, an end of 0:
    the first answer will never be read up to, and must not hold the merge for ever."""
    m = merge(max_wait=0)
    m.probed(NOW - 2, {FILLS: 2})
    m.probed(NOW - 1, {FILLS: 0})
    m.add(PRICES, [Rec(0, 5)], NOW)  # needs a proof from after NOW; none comes
    assert offsets(m.take(100, [PRICES, FILLS])) == [("prices", 0)]
    assert m.forced_on == {FILLS}


def test_limit_and_seek() -> None:
    m = merge()
    m.add(PRICES, [Rec(0, 1), Rec(1, 2), Rec(2, 3)], NOW)
    assert len(m.take(2, [PRICES])) == 2
    m.seek(PRICES, 0)  # re-positioned: what was buffered is stale
    assert m.take(10, [PRICES]) == []
    assert m.fetched_to[PRICES] == 0


def test_records_before_the_position_are_ignored() -> None:
    """Records a partition's position has passed (applied by a catch-up, or buffered
    already) never go out again."""
    m = merge()
    positioned(m, FILLS, 3, at_ms=NOW - 2)
    m.add(FILLS, [Rec(1, 1), Rec(2, 2), Rec(3, 3), Rec(4, 4)], NOW)
    m.add(FILLS, [Rec(3, 3), Rec(4, 4)], NOW)  # the consumer's own fetch from the new position
    m.probed(NOW + 1, {FILLS: 5, PRICES: 0})
    assert offsets(m.take(10, [PRICES, FILLS])) == [("fills", 3), ("fills", 4)]
    assert m.fetched_to[FILLS] == 5


def test_a_record_behind_one_proven_past_max_wait_gets_the_whole_wait_again() -> None:
    """Out of an outage: the price at 5 ms waited 0.6 s for fills, longer than the merge wait,
    with Kafka answering nothing sent since. Then fills answers a probe sent at 10 ms: the
    first price goes out, proven. The second, which arrived at 20 ms, needs a probe sent
    since; it waits the whole merge wait for one, not the nothing left of the first's."""
    clock = Clock()
    m = merge(max_wait=0.5, clock=clock)
    m.add(PRICES, [Rec(0, 5)], NOW)
    m.add(PRICES, [Rec(1, 6)], NOW + 20)
    no_answer = -math.inf
    assert m.take(100, [PRICES, FILLS], kafka_answered=no_answer) == []
    clock.now = 0.6
    assert m.take(100, [PRICES, FILLS], kafka_answered=no_answer) == []
    m.probed(NOW + 10, {FILLS: 0})
    assert offsets(m.take(100, [PRICES, FILLS], kafka_answered=0.6)) == [("prices", 0)]
    clock.now = 0.7  # the second's wait starts
    assert m.take(100, [PRICES, FILLS], kafka_answered=0.7) == []
    clock.now = 1.1
    assert m.take(100, [PRICES, FILLS], kafka_answered=1.1) == [] and m.forced == 0
    clock.now = 1.2  # no probe proved it: the merge wait is over
    assert offsets(m.take(100, [PRICES, FILLS], kafka_answered=1.2)) == [("prices", 1)]
    assert m.forced == 1


def test_a_process_held_still_past_max_wait_does_not_force_on_waking() -> None:
    """Frozen 7 s (SIGSTOP) with the head held back for fills: the gap counts 0.25 s, not 7,
    so the probe asked for on waking gets its chance. The wait goes on in turns of the loop."""
    clock = Clock()
    m = merge(max_wait=0.5, clock=clock, most_per_turn=0.25)
    m.add(PRICES, [Rec(0, 5)], NOW)
    assert m.take(100, [PRICES, FILLS]) == []  # held back for fills from clock 0
    clock.now = 7.0  # woken
    assert m.take(100, [PRICES, FILLS]) == [] and m.forced == 0  # 0.25 s counted
    clock.now = 7.2
    assert m.take(100, [PRICES, FILLS]) == [] and m.forced == 0  # 0.45 s
    m.probed(NOW + 7_100, {FILLS: 0})  # the probe asked on waking: fills holds nothing
    assert [r.offset for _, r in m.take(100, [PRICES, FILLS])] == [0] and m.forced == 0


def test_a_loop_slower_than_a_turn_still_forces_past_a_silent_partition() -> None:
    """Every turn takes 2 s: each counts 0.25 s, so a silent fills is forced past after two
    turns (0.5 s counted, 4 s of clock)."""
    clock = Clock()
    m = merge(max_wait=0.5, clock=clock, most_per_turn=0.25)
    m.add(PRICES, [Rec(0, 5)], NOW)
    assert m.take(100, [PRICES, FILLS]) == []
    clock.now = 2.0
    assert m.take(100, [PRICES, FILLS]) == []
    clock.now = 4.0
    assert [r.offset for _, r in m.take(100, [PRICES, FILLS])] == [0] and m.forced == 1


def test_a_process_held_still_past_the_stall_timeout_does_not_stall_a_partition() -> None:
    """A probe found fills records not read yet; then the process is frozen 12 s. On waking,
    fills has not been without progress for max_stall (10 s) of the loop's turning."""
    clock = Clock()
    m = merge(max_wait=0, max_stall=10, clock=clock, most_per_turn=0.25)
    m.add(PRICES, [Rec(0, 5)], NOW)
    m.probed(NOW + 1, {FILLS: 3})  # fills holds records this instance has not read
    assert m.take(100, [PRICES, FILLS]) == []
    clock.now = 12.0
    assert m.take(100, [PRICES, FILLS]) == [] and not m.stalled


def test_the_wait_does_not_count_while_no_broker_answers() -> None:
    """Held back for fills from clock 0 with --merge-wait 0.5; at 0.2 s the broker watch finds
    no broker answering, for 6 s. Nothing is forced meanwhile (its events could not be
    published anyway); once a broker answers again the wait goes on from 0.2 s counted."""
    clock = Clock()
    m = merge(max_wait=0.5, clock=clock, most_per_turn=0.25)
    m.add(PRICES, [Rec(0, 5)], NOW)
    assert m.take(100, [PRICES, FILLS]) == []
    clock.now = 0.2
    assert m.take(100, [PRICES, FILLS]) == []
    for turn in range(1, 31):
        clock.now = 0.2 + turn * 0.2
        assert m.take(100, [PRICES, FILLS], counting=False) == []
    assert m.forced == 0
    clock.now = 6.4  # a broker answers: 0.4 s counted
    assert m.take(100, [PRICES, FILLS]) == [] and m.forced == 0
    clock.now = 6.5  # 0.5 s counted
    assert [r.offset for _, r in m.take(100, [PRICES, FILLS])] == [0] and m.forced == 1


def test_a_partition_does_not_stall_while_no_broker_answers() -> None:
    """A probe found fills records not read yet; then no broker answers for 12 s, so the
    consumer cannot read them: fills is not declared stalled (10 s) for that."""
    clock = Clock()
    m = merge(max_wait=0, max_stall=10, clock=clock, most_per_turn=0.25)
    m.add(PRICES, [Rec(0, 5)], NOW)
    m.probed(NOW + 1, {FILLS: 3})  # fills holds records this instance has not read
    assert m.take(100, [PRICES, FILLS]) == []
    for turn in range(1, 61):
        clock.now = turn * 0.2
        assert m.take(100, [PRICES, FILLS], counting=False) == []
    assert not m.stalled and m.forced_past_stalled == 0


def test_a_forced_release_waits_for_kafka_to_answer_a_request_sent_after_the_wait() -> None:
    """--merge-wait 0.5 runs out at 0.5 s; the broker watch's newest answer is to a request
    sent at 0.1 s, before: no broker may answer now, and a release could not be published.
    The merge says it waits for Kafka; a request sent at 0.6 s comes back and it forces."""
    clock = Clock()
    m = merge(max_wait=0.5, clock=clock)
    m.add(PRICES, [Rec(0, 5)], NOW)
    assert m.take(100, [PRICES, FILLS], kafka_answered=0.1) == []
    clock.now = 0.5
    assert m.take(100, [PRICES, FILLS], kafka_answered=0.1) == [] and m.awaiting_kafka
    clock.now = 3.0
    assert m.take(100, [PRICES, FILLS], kafka_answered=0.1) == [] and m.forced == 0
    clock.now = 3.1
    out = m.take(100, [PRICES, FILLS], kafka_answered=0.6)
    assert [r.offset for _, r in out] == [0] and m.forced == 1 and not m.awaiting_kafka


def test_kafka_found_back_restarts_the_wait() -> None:
    """The watch found Kafka back at 4 s, after an outage the wait ran out in: the probes
    asked for since get a whole --merge-wait to prove the order first."""
    clock = Clock()
    m = merge(max_wait=0.5, clock=clock)
    m.add(PRICES, [Rec(0, 5)], NOW)
    assert m.take(100, [PRICES, FILLS], kafka_answered=0.0) == []
    clock.now = 4.0
    assert m.take(100, [PRICES, FILLS], kafka_answered=0.0) == [] and m.awaiting_kafka
    m.restart_wait()
    assert not m.awaiting_kafka
    assert m.take(100, [PRICES, FILLS], kafka_answered=4.0) == []
    clock.now = 4.1
    m.probed(NOW + 4_100, {FILLS: 0})
    assert [r.offset for _, r in m.take(100, [PRICES, FILLS], kafka_answered=4.0)] == [0]
    assert m.forced == 0


def test_a_probe_out_when_kafka_is_seen_to_answer_holds_a_forced_release_until_it_is_back(
        ) -> None:
    """An outage the broker watch never saw ends at 0.9 s: the watch's request, sent at 0.6 s
    after --merge-wait ran out, is answered promptly, and the probe of fills sent at 0.1 s and
    held up since comes back a few ms later. It finds fills holding a record not read yet,
    stamped before the tick: nothing was forced, and the fill goes out first."""
    clock = Clock()
    m = merge(max_wait=0.5, clock=clock)
    m.add(PRICES, [Rec(0, 5)], NOW)
    assert m.take(100, [PRICES, FILLS], kafka_answered=0.0) == []
    clock.now = 0.1
    m.asked(NOW + 100, [FILLS])
    clock.now = 0.5
    assert m.take(100, [PRICES, FILLS], kafka_answered=0.0) == [] and m.awaiting_kafka
    clock.now = 0.9
    assert m.take(100, [PRICES, FILLS], kafka_answered=0.6) == []
    m.probed(NOW + 100, {FILLS: 1})
    clock.now = 0.91
    assert m.take(100, [PRICES, FILLS], kafka_answered=0.6) == []  # fills/0 exists: read it
    m.add(FILLS, [Rec(0, 3)], NOW + 910)
    assert offsets(m.take(100, [PRICES, FILLS], kafka_answered=0.6)) == [
        ("fills", 0), ("prices", 0)]
    assert m.forced == 0


def held_by_a_probe_out_when_kafka_answered(clock: Clock) -> TimestampMerge:
    """A tick waits on fills, whose probe (sent at NOW) is out; --merge-wait 0.5 runs out,
    and at 0.6 s Kafka is seen to answer a request sent at 0.5 s: the tick is held still."""
    m = merge(max_wait=0.5, clock=clock)
    m.add(PRICES, [Rec(0, 5)], NOW)
    m.asked(NOW, [FILLS])
    assert m.take(100, [PRICES, FILLS], kafka_answered=0.0) == []
    clock.now = 0.5
    assert m.take(100, [PRICES, FILLS], kafka_answered=0.0) == []
    clock.now = 0.6
    assert m.take(100, [PRICES, FILLS], kafka_answered=0.5) == []
    return m


def test_a_probe_still_out_half_a_second_after_kafka_answered_no_longer_holds_a_release(
        ) -> None:
    """A broker that answers the watch but never the probe of fills (its leader is down):
    the forced release waits 0.5 s (HELD_UP_PROBES) after the answer was seen, no longer."""
    clock = Clock()
    m = held_by_a_probe_out_when_kafka_answered(clock)
    clock.now = 1.09
    assert m.take(100, [PRICES, FILLS], kafka_answered=1.0) == []
    clock.now = 1.1
    assert offsets(m.take(100, [PRICES, FILLS], kafka_answered=1.0)) == [("prices", 0)]
    assert m.forced == 1


def test_a_probe_sent_after_kafka_was_seen_to_answer_does_not_hold_a_forced_release() -> None:
    """The held-up probe failed; the one sent in its place went out after Kafka's answer was
    seen, to a broker known to answer: the release is forced at once."""
    clock = Clock()
    m = held_by_a_probe_out_when_kafka_answered(clock)
    m.unanswered(NOW, [FILLS])
    m.asked(NOW + 610, [FILLS])
    clock.now = 0.62
    assert offsets(m.take(100, [PRICES, FILLS], kafka_answered=0.5)) == [("prices", 0)]
    assert m.forced == 1


def test_a_merge_wait_of_zero_forces_at_once_without_asking_kafka() -> None:
    m = merge(max_wait=0)
    m.add(PRICES, [Rec(0, 5)], NOW)
    out = m.take(100, [PRICES, FILLS], kafka_answered=-math.inf)
    assert [r.offset for _, r in out] == [0] and m.forced == 1


# A fetch's answer is a probe's too: the account partitions (fills 0 and 1) are fetched on one
# connection, prices on another; each was answered at NOW - 20 and NOW - 10 before the test's
# fetches, so that each answer in a test is at least the third in a row on its connection.
ACCOUNTS_LINK, PRICES_LINK = ("accounts", 1), ("prices", 1)  # (consumer, broker)


def linked_merge(fills_1_link: object = ACCOUNTS_LINK) -> TimestampMerge:
    m = TimestampMerge(RANK, max_skew_ms=5, max_wait=10, clock=Clock())
    for tp, link in ((PRICES, PRICES_LINK), (FILLS, ACCOUNTS_LINK), (FILLS_1, fills_1_link)):
        m.seek(tp, 0, at_ms=NOW - 30)
        for at in (NOW - 20, NOW - 10):
            m.fetched(tp, [], 0, fetched_end=0, fetched_end_at_ms=int(at), connection=link)
    return m


def answered(m: TimestampMerge, tp: TopicPartition, at_ms: float, link: object,
             records: list[Rec] | None = None) -> None:
    """The partition's consumer answered a fetch at ``at_ms``: its records, and nothing more."""
    records = records or []
    end = records[-1].offset + 1 if records else m.fetched_to[tp]
    m.fetched(tp, records, end, fetched_end=end, fetched_end_at_ms=int(at_ms), connection=link)


def held_until_fills_1_answers(m: TimestampMerge, at_ms: float, link: object,
                               released: tuple[str, int]) -> None:
    """Nothing goes out while fills 1 proves nothing; its answer at ``at_ms`` releases
    ``released``."""
    assert m.take(10, [PRICES, FILLS, FILLS_1]) == [] and m.blocked_on == [FILLS_1]
    answered(m, FILLS_1, at_ms, link)
    assert offsets(m.take(10, [PRICES, FILLS, FILLS_1])) == [released]


def test_records_arrive_just_after_the_fetch_answer_that_brought_them() -> None:
    """A fill in a fetch answered at NOW (whole ms) arrived by NOW + 1: a probe sent at NOW + 1
    proves the other partitions for it, one sent at NOW + 0.5 may have left before it came."""
    m = linked_merge()
    answered(m, FILLS, NOW, ACCOUNTS_LINK, [Rec(0, int(NOW) - 20)])
    assert m.take(10, [PRICES, FILLS, FILLS_1]) == [] and m.head_needs == NOW + 1
    m.probed(NOW + 0.5, {PRICES: 0, FILLS_1: 0})
    assert m.take(10, [PRICES, FILLS, FILLS_1]) == []
    m.probed(NOW + 1, {PRICES: 0, FILLS_1: 0})
    assert offsets(m.take(10, [PRICES, FILLS, FILLS_1])) == [("fills", 0)]


def test_a_fetch_answered_after_a_record_on_its_connection_proves_its_partition() -> None:
    """Fills 1 shares the fill's connection: the broker answered its fetches one after the
    other, so one answered in a later ms than the fill's (NOW + 8) was asked for after the
    fill arrived, and proves fills 1 for it. Prices, on another connection, answered at NOW + 8
    a fetch asked for after its answer of NOW - 10 only: it still holds the fill back."""
    m = linked_merge()
    answered(m, FILLS, NOW, ACCOUNTS_LINK, [Rec(0, int(NOW) - 20)])
    answered(m, FILLS_1, NOW, ACCOUNTS_LINK)  # in the same answer as the fill: proves nothing
    answered(m, PRICES, NOW + 8, PRICES_LINK)
    assert m.take(10, [PRICES, FILLS, FILLS_1]) == []
    assert m.blocked_on == [PRICES, FILLS_1]
    answered(m, FILLS_1, NOW + 8, ACCOUNTS_LINK)
    assert m.take(10, [PRICES, FILLS, FILLS_1]) == [] and m.blocked_on == [PRICES]
    answered(m, PRICES, NOW + 16, PRICES_LINK)  # asked for after its answer at NOW + 8
    assert offsets(m.take(10, [PRICES, FILLS, FILLS_1])) == [("fills", 0)]
    assert (m.forced, m.late) == (0, {})


def test_a_fetch_on_the_records_connection_proves_it_only_if_asked_for_after_ts_plus_skew(
        ) -> None:
    """A fill stamped NOW + 10 (a producer's clock a little ahead) needs proofs asked for at
    NOW + 15 or later: fills 1's answers at NOW + 8 and NOW + 16 were asked for at NOW and
    NOW + 8 (right after the answer before), the one at NOW + 24 at NOW + 16."""
    m = linked_merge()
    answered(m, FILLS, NOW, ACCOUNTS_LINK, [Rec(0, int(NOW) + 10)])
    answered(m, PRICES, NOW + 30, PRICES_LINK)
    answered(m, PRICES, NOW + 40, PRICES_LINK)
    answered(m, FILLS_1, NOW + 8, ACCOUNTS_LINK)
    answered(m, FILLS_1, NOW + 16, ACCOUNTS_LINK)
    held_until_fills_1_answers(m, NOW + 24, ACCOUNTS_LINK, ("fills", 0))


def test_a_fetch_answered_on_another_broker_than_the_last_proves_nothing() -> None:
    """Fills 1's leader moved to broker 2: its consumer may have had fetches out to both, so
    the first answer from broker 2 (NOW + 12) is not known to be asked for after the one from
    broker 1 (NOW + 4), nor after the price that arrived by NOW + 1; and the leader read after
    an answer may be the new one for an answer from the old, so nor is the second (NOW + 20).
    The third, at NOW + 28, was asked for after NOW + 20."""
    m = linked_merge()
    moved = ("accounts", 2)
    answered(m, PRICES, NOW, PRICES_LINK, [Rec(0, int(NOW) - 20)])
    answered(m, FILLS, NOW + 4, ACCOUNTS_LINK)
    answered(m, FILLS, NOW + 12, ACCOUNTS_LINK)
    answered(m, FILLS_1, NOW + 4, ACCOUNTS_LINK)
    answered(m, FILLS_1, NOW + 12, moved)
    answered(m, FILLS_1, NOW + 20, moved)
    held_until_fills_1_answers(m, NOW + 28, moved, ("prices", 0))


def test_a_fetch_on_an_unknown_connection_proves_only_as_a_probe_would() -> None:
    """Fills 1's connection is not known: its answer at NOW + 8 proves what a probe sent at
    NOW - 10 would, nothing about a fill that arrived by NOW + 1. The one at NOW + 16 was asked
    for at NOW + 8."""
    m = linked_merge(fills_1_link=None)
    answered(m, FILLS, NOW, ACCOUNTS_LINK, [Rec(0, int(NOW) - 20)])
    answered(m, PRICES, NOW + 8, PRICES_LINK)
    answered(m, PRICES, NOW + 16, PRICES_LINK)
    answered(m, FILLS_1, NOW + 8, None)
    held_until_fills_1_answers(m, NOW + 16, None, ("fills", 0))


def test_a_partition_read_up_to_none_of_its_answers_keeps_a_bounded_few() -> None:
    """A catch-up: forty fetches of fills 1 report an end that moves on (producers append as
    it is read), and the consumer hands over none of it yet. The merge keeps MAX_ANSWERS of
    them, the newest among them, which proves fills 1 once it is read up to it."""
    m = linked_merge()
    m.add(PRICES, [Rec(0, int(NOW) + 100)], NOW)
    for n in range(1, 41):
        m.fetched(FILLS_1, [], 0, fetched_end=n, fetched_end_at_ms=int(NOW) + n,
                  connection=ACCOUNTS_LINK)
    assert len(m._probed[FILLS_1]) == MAX_ANSWERS
    m.read_to(FILLS_1, 40)
    assert m.proven[FILLS_1] == NOW + 39  # asked for right after the answer at NOW + 39


def test_records_behind_one_released_without_proof_go_out_in_the_same_take() -> None:
    """While a partition stays silent past max_wait (its broker down, the others answering),
    a take releases every record it is given, not one per answer from Kafka."""
    clock = Clock()
    m = merge(max_wait=0.5, clock=clock)
    m.add(PRICES, [Rec(0, 5), Rec(1, 6), Rec(2, 7)], NOW)
    assert m.take(100, [PRICES, FILLS], kafka_answered=0.0) == []  # held from clock 0
    clock.now = 0.6
    assert m.take(100, [PRICES, FILLS], kafka_answered=0.55) == []  # no answer since: waits
    clock.now = 0.7
    out = m.take(100, [PRICES, FILLS], kafka_answered=0.65)
    assert [r.offset for _, r in out] == [0, 1, 2] and m.forced == 3


def test_a_record_sorting_before_the_one_held_waits_for_an_answer_sent_after_it_came() -> None:
    """Max_wait has run out for the price held since clock 0 (fills silent), and Kafka
    answered a request sent at 0.65; a second price partition then hands over a record
    stamped before it, at 0.7. That answer cannot prove the new head: it waits for the next
    (found by the property test of a broker outage)."""
    other = TopicPartition("prices", 1)
    clock = Clock()
    m = merge(max_wait=0.5, clock=clock)
    positioned(m, other, 0, at_ms=NOW - 2)
    m.add(PRICES, [Rec(0, 9)], NOW)
    partitions = [PRICES, other, FILLS]
    assert m.take(100, partitions, kafka_answered=0.0) == []
    clock.now = 0.6
    assert m.take(100, partitions, kafka_answered=0.55) == []
    clock.now = 0.7
    m.add(other, [Rec(0, 5)], NOW + 700)
    assert m.take(100, partitions, kafka_answered=0.65) == [] and m.forced == 0
    clock.now = 0.8
    out = m.take(100, partitions, kafka_answered=0.75)
    assert [(tp.partition, r.offset) for tp, r in out] == [(1, 0), (0, 0)] and m.forced == 2
