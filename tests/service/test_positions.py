"""Where an instance stands in its inputs (`Positions`): a fetch taken before a partition was
sought or handed over must not reach the merge for that partition (the loop asks
`sought_since` with the seek count read together with the fetch)."""

from __future__ import annotations

from aiokafka import TopicPartition

from monitor.service.metrics import Metrics
from monitor.service.positions import Positions
from monitor.service.settings import Topics

FILLS_0, FILLS_1 = TopicPartition("fills", 0), TopicPartition("fills", 1)


def positions() -> Positions:
    return Positions(Topics(), max_skew_ms=5, max_wait=0.5, max_stall=10.0, metrics=Metrics())


def test_a_fetch_taken_before_a_seek_of_its_partition_is_stale() -> None:
    p = positions()
    p.seek(FILLS_0, 0)
    taken_at = p.seeks  # the loop's fetch completes here, records of fills/0 from offset 0
    p.seek(FILLS_0, 156)  # a catch-up applied 0..155 and moved the consumer on
    assert p.sought_since(FILLS_0, taken_at)


def test_a_seek_of_another_partition_leaves_the_fetch_good() -> None:
    p = positions()
    p.seek(FILLS_0, 0)
    p.seek(FILLS_1, 0)
    taken_at = p.seeks
    p.seek(FILLS_1, 40)
    assert not p.sought_since(FILLS_0, taken_at)
    assert p.sought_since(FILLS_1, taken_at)


def test_a_fetch_taken_after_the_seek_is_good() -> None:
    p = positions()
    p.seek(FILLS_0, 156)
    assert not p.sought_since(FILLS_0, p.seeks)


def test_a_hand_over_makes_an_earlier_fetch_stale_even_if_the_partition_comes_back() -> None:
    p = positions()
    p.seek(FILLS_0, 10)
    taken_at = p.seeks
    p.drop([FILLS_0])
    p.seek(FILLS_0, 10)  # given back by the same rebalance, restored at the same offset
    assert p.sought_since(FILLS_0, taken_at)
