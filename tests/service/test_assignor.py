"""The group's assignor: account partitions balanced over the instances and left with the
instance that holds them; on the embedded broker, a group of real consumers."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import orjson
import pytest
from aiokafka import AIOKafkaConsumer
from aiokafka.coordinator.assignors.range import RangePartitionAssignor
from aiokafka.coordinator.protocol import (
    ConsumerProtocolMemberAssignment,
    ConsumerProtocolMemberMetadata,
)
from hypothesis import given
from hypothesis import strategies as st

from monitor.service.assignor import StickyAccountPartitions, sticky_balanced
from monitor.service.broker import EmbeddedBroker
from monitor.service.topics import create_topics
from tests.support.kafka import fresh_settings

# -- the plan ------------------------------------------------------------------------------------


def test_a_group_holding_nothing_is_given_equal_shares_in_member_order() -> None:
    assert sticky_balanced(range(6), {"b": [], "a": [], "c": []}) == {
        "a": [0, 1], "b": [2, 3], "c": [4, 5]}


def test_a_member_joining_takes_one_partition_from_each_holder_and_nothing_else_moves() -> None:
    plan = sticky_balanced(range(6), {"a": [0, 1, 2], "b": [3, 4, 5], "c": []})
    assert plan == {"a": [0, 1], "b": [3, 4], "c": [2, 5]}


def test_a_member_rejoining_under_an_id_that_sorts_first_moves_only_its_own_share() -> None:
    """Range lays partitions out in member-id order: "0-new" would take 0 and 1 from "a",
    and every partition would move. Here only the share the leaver dropped is given out."""
    plan = sticky_balanced(range(6), {"a": [0, 1], "b": [2, 3], "0-new": []})
    assert plan == {"a": [0, 1], "b": [2, 3], "0-new": [4, 5]}


def test_the_share_of_a_member_that_left_is_spread_over_those_that_stay() -> None:
    assert sticky_balanced(range(6), {"a": [0, 1], "b": [2, 3]}) == {
        "a": [0, 1, 4], "b": [2, 3, 5]}


def test_a_member_over_its_share_gives_back_the_partitions_it_gained_last() -> None:
    # "a" held 3 and 4, then gained 0 when a member left; that member is back as "c"
    plan = sticky_balanced(range(6), {"a": [3, 4, 0], "b": [1, 2, 5], "c": []})
    assert plan == {"a": [3, 4], "b": [1, 2], "c": [0, 5]}


def test_the_larger_shares_go_to_the_members_holding_the_most() -> None:
    # 5 over 2: one member gets 3; "b" holds 3, so nothing moves
    assert sticky_balanced(range(5), {"a": [0, 1], "b": [2, 3, 4]}) == {
        "a": [0, 1], "b": [2, 3, 4]}


def test_a_partition_two_members_claim_stays_with_the_one_holding_more() -> None:
    # "b" (3 claimed) goes first and keeps 1 and 2 (its share); "a" keeps 0, gets 3
    assert sticky_balanced(range(4), {"a": [0, 1], "b": [1, 2, 3]}) == {
        "a": [0, 3], "b": [1, 2]}


def test_claims_to_partitions_that_do_not_exist_are_ignored() -> None:
    assert sticky_balanced(range(2), {"a": [7, 1], "b": []}) == {"a": [1], "b": [0]}


def test_members_beyond_the_partition_count_stand_by_with_nothing() -> None:
    assert sticky_balanced(range(2), {"a": [], "b": [1], "c": []}) == {
        "a": [0], "b": [1], "c": []}


@given(st.integers(0, 12).flatmap(lambda count: st.tuples(
    st.just(count),
    st.dictionaries(st.text("abcdef", min_size=1, max_size=3),
                    st.lists(st.integers(0, 14), max_size=8), min_size=1, max_size=6))))
def test_every_partition_goes_to_one_member_and_shares_differ_by_at_most_one(
        case: tuple[int, dict[str, list[int]]]) -> None:
    count, held = case
    plan = sticky_balanced(range(count), held)
    assert sorted(p for partitions in plan.values() for p in partitions) == list(range(count))
    sizes = [len(partitions) for partitions in plan.values()]
    assert max(sizes) - min(sizes) <= 1
    # nobody whose claims nobody else shares gives up a partition while under its share
    for member, partitions in plan.items():
        own = set(held[member]) & set(range(count))
        if not any(own & set(held[other]) for other in held if other != member):
            assert len(own & set(partitions)) == min(len(own), len(partitions))


# -- what a member says ----------------------------------------------------------------------------


def test_a_member_says_which_partitions_it_was_last_assigned_oldest_first() -> None:
    assignor = StickyAccountPartitions()
    assignor.on_assignment(ConsumerProtocolMemberAssignment(
        0, [("fills", [2, 3]), ("ledger", [2, 3])], b""))
    assignor.on_assignment(ConsumerProtocolMemberAssignment(
        0, [("fills", [0, 3]), ("ledger", [0, 3])], b""))
    said = assignor.metadata(["ledger", "fills"])
    assert said.subscription == ["fills", "ledger"]
    assert orjson.loads(said.user_data) == {"held": [3, 0]}


@pytest.mark.parametrize("user_data", [b"", b"not json", b"[1, 2]", b'{"held": 3}',
                                       b'{"held": ["1", true]}'])
def test_a_member_whose_claim_cannot_be_read_holds_nothing(user_data: bytes) -> None:
    # "b" holds 1; "a" reads as holding nothing (read as claiming 1 twice or more, it would
    # go first and keep 1), so it is given 0
    plan = StickyAccountPartitions().assign(_Cluster({"fills": 2, "ledger": 2}), {
        "a": ConsumerProtocolMemberMetadata(0, ["fills", "ledger"], user_data),
        "b": ConsumerProtocolMemberMetadata(0, ["fills", "ledger"], b'{"held": [1]}')})
    assert plan["a"].assignment == [("fills", [0]), ("ledger", [0])]
    assert plan["b"].assignment == [("fills", [1]), ("ledger", [1])]


class _Cluster:
    def __init__(self, counts: dict[str, int]) -> None:
        self.counts = counts

    def partitions_for_topic(self, topic: str) -> set[int] | None:
        return set(range(self.counts[topic])) if topic in self.counts else None


# -- a group on the embedded broker ----------------------------------------------------------------


@pytest.fixture
async def topics(broker: EmbeddedBroker) -> AsyncIterator[tuple[str, str]]:
    settings = fresh_settings(broker.bootstrap, partitions=4)
    await create_topics(settings)
    yield settings.topics.fills, settings.topics.ledger


async def joined(bootstrap: str, group: str, topics: tuple[str, str],
                 offers_sticky: bool = True) -> AIOKafkaConsumer:
    """A consumer offering both assignors, as liqmon's does (its own is `.sticky`), or range
    alone, as earlier builds did."""
    sticky = StickyAccountPartitions()
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, group_id=group, session_timeout_ms=2_000,
        heartbeat_interval_ms=300, rebalance_timeout_ms=2_000,
        partition_assignment_strategy=(sticky, RangePartitionAssignor) if offers_sticky
        else (RangePartitionAssignor,))
    consumer.sticky = sticky
    await consumer.start()
    consumer.subscribe(list(topics))
    return consumer


async def settled(consumers: list[AIOKafkaConsumer], count: int) -> list[set[int]]:
    """Each consumer's account partitions once the group has given out all ``count``
    partitions of both topics among them (and every consumer has been through the same
    rebalance)."""
    while True:
        for consumer in consumers:  # fetching drives the group's protocol
            await consumer.getmany(timeout_ms=50)
        owned = [{tp.partition for tp in consumer.assignment()} for consumer in consumers]
        pairs = [sorted((tp.topic, tp.partition) for tp in c.assignment()) for c in consumers]
        if sorted(p for parts in owned for p in parts) == list(range(count)) and all(
                len(pair) == 2 * len(parts) for pair, parts in zip(pairs, owned, strict=True)):
            return owned
        await asyncio.sleep(0.05)


@pytest.mark.asyncio(loop_scope="session")
async def test_a_third_instance_joining_takes_one_partition_and_the_others_keep_theirs(
        broker: EmbeddedBroker, topics: tuple[str, str]) -> None:
    group = f"sticky-{topics[0]}"
    first = await joined(broker.bootstrap, group, topics)
    second = await joined(broker.bootstrap, group, topics)
    third: AIOKafkaConsumer | None = None
    try:
        before = await asyncio.wait_for(settled([first, second], 4), timeout=60)
        assert sorted(map(len, before)) == [2, 2]
        third = await joined(broker.bootstrap, group, topics)
        after = await asyncio.wait_for(settled([first, second, third], 4), timeout=60)
        assert sorted(map(len, after)) == [1, 1, 2]
        assert after[0] <= before[0] and after[1] <= before[1]  # nothing moved between them
        # the group agreed on liqmon's assignor (range's would not have told it)
        assert [c.sticky.held for c in (first, second, third)] == [sorted(a) for a in after]
    finally:
        for consumer in (first, second, third):
            if consumer is not None:
                await consumer.stop()


@pytest.mark.asyncio(loop_scope="session")
async def test_a_group_with_a_member_offering_only_range_agrees_on_range(
        broker: EmbeddedBroker, topics: tuple[str, str]) -> None:
    """A rolling update from a build that offered range alone: both members co-partitioned,
    by range, until every member offers liqmon's assignor."""
    group = f"mixed-{topics[0]}"
    older = await joined(broker.bootstrap, group, topics, offers_sticky=False)
    newer = await joined(broker.bootstrap, group, topics)
    try:
        owned = await asyncio.wait_for(settled([older, newer], 4), timeout=60)
        assert sorted(map(len, owned)) == [2, 2]
        assert newer.sticky.held == []  # never told of an assignment: range gave it
    finally:
        for consumer in (older, newer):
            await consumer.stop()
