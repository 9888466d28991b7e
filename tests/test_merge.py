"""The time-ordered merge of input partitions."""

from __future__ import annotations

from dataclasses import dataclass

from aiokafka import TopicPartition

from monitor.service.merge import TimestampMerge

PRICES, FILLS = TopicPartition("prices", 0), TopicPartition("fills", 0)
RANK = {"prices": 1, "fills": 0}.__getitem__


@dataclass
class Rec:
    offset: int
    timestamp: int


def always(tp, offset) -> bool:
    return True


def never(tp, offset) -> bool:
    return False


def test_records_come_out_in_timestamp_order_across_partitions() -> None:
    merge = TimestampMerge(RANK, max_idle=10)
    merge.add(PRICES, [Rec(0, 1), Rec(1, 4), Rec(2, 6)])
    merge.add(FILLS, [Rec(0, 2), Rec(1, 3), Rec(2, 6)])
    out = merge.take(100, [PRICES, FILLS], always)
    assert [(tp.topic, r.offset) for tp, r in out] == [
        ("prices", 0), ("fills", 0), ("fills", 1), ("prices", 1),
        ("fills", 2), ("prices", 2),  # equal timestamps: fills ranks first
    ]


def test_a_partition_that_may_hold_earlier_records_holds_the_others_back() -> None:
    merge = TimestampMerge(RANK, max_idle=10)
    merge.add(PRICES, [Rec(0, 5)])
    assert merge.take(100, [PRICES, FILLS], never) == []  # fills not read to its end yet
    merge.add(FILLS, [Rec(0, 3)])
    out = merge.take(100, [PRICES, FILLS], lambda tp, offset: tp == PRICES)
    assert [(tp.topic, r.offset) for tp, r in out] == [("fills", 0)]  # then fills is empty


def test_a_caught_up_partition_does_not_hold_anyone_back() -> None:
    merge = TimestampMerge(RANK, max_idle=10)
    merge.add(PRICES, [Rec(0, 5), Rec(1, 6)])
    out = merge.take(100, [PRICES, FILLS], always)
    assert [r.offset for _, r in out] == [0, 1]


def test_waiting_is_bounded_by_max_idle() -> None:
    merge = TimestampMerge(RANK, max_idle=0)
    merge.add(PRICES, [Rec(0, 5)])
    assert [r.offset for _, r in merge.take(100, [PRICES, FILLS], never)] == [0]


def test_limit_and_seek() -> None:
    merge = TimestampMerge(RANK, max_idle=10)
    merge.add(PRICES, [Rec(0, 1), Rec(1, 2), Rec(2, 3)])
    assert len(merge.take(2, [PRICES], always)) == 2
    merge.seek(PRICES, 0)  # re-positioned: what was buffered is stale
    assert merge.take(10, [PRICES], always) == []
    assert merge.fetched_to[PRICES] == 0
