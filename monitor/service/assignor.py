"""How the group spreads account partitions over the instances: fills p and ledger p together
(an account's records), each partition left with the instance that holds it.

The range assignor also keeps fills p and ledger p together, but lays the partitions out over
the members in member-id order: a member that rejoins under a new id can shift every
partition to another instance, and each move is a restore (the accounts read back from the
changelog, the inputs since caught up). Kafka Streams' sticky task assignment avoids that;
this does the same for liqmon's one kind of task. Each member says in its subscription which
partitions it holds (JSON in the protocol's user data); the group's leader keeps every
partition with its holder as far as a balanced share allows (every member ⌊P/n⌋ or ⌈P/n⌉
partitions), and gives out the rest.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import orjson
from aiokafka.coordinator.protocol import (
    ConsumerProtocolMemberAssignment,
    ConsumerProtocolMemberMetadata,
)


def sticky_balanced(partitions: Sequence[int], held: Mapping[str, Sequence[int]]
                    ) -> dict[str, list[int]]:
    """Every partition to one member, each member ⌊P/n⌋ or ⌈P/n⌉ of them, moving as few as
    possible from the members that say they hold them (``held``, by member id, each in the
    order the member gained them). A member holding more than its share keeps those it has
    held longest: one it gained at the last rebalance, when another member left, may be
    restoring still, and goes back first. The larger shares go to the members holding the
    most; a partition two members claim (one of them out of date) stays with the first of
    them in that order. Deterministic: the same input gives every leader the same plan."""
    members = sorted(held, key=lambda member: (-len(held[member]), member))
    if not members:
        return {}
    share, larger = divmod(len(partitions), len(members))
    quota = {member: share + (k < larger) for k, member in enumerate(members)}
    existing = set(partitions)
    plan: dict[str, list[int]] = {member: [] for member in members}
    taken: set[int] = set()
    for member in members:
        for partition in held[member]:
            if len(plan[member]) == quota[member]:
                break
            if partition in existing and partition not in taken:
                plan[member].append(partition)
                taken.add(partition)
    free = iter(sorted(existing - taken))
    for member in members:
        while len(plan[member]) < quota[member]:
            plan[member].append(next(free))
        plan[member].sort()
    return plan


class StickyAccountPartitions:
    """The consumer group's assignor (an instance per consumer: it remembers what its
    consumer was last assigned, in the order gained, and says so when the consumer next
    joins)."""

    name = "liqmon-sticky"
    version = 0

    def __init__(self) -> None:
        self.held: list[int] = []

    def metadata(self, topics: Iterable[str]) -> ConsumerProtocolMemberMetadata:
        return ConsumerProtocolMemberMetadata(self.version, sorted(topics),
                                              orjson.dumps({"held": self.held}))

    def on_assignment(self, assignment: ConsumerProtocolMemberAssignment) -> None:
        assigned = {p for _, partitions in assignment.assignment for p in partitions}
        self.held = [p for p in self.held if p in assigned] + sorted(assigned - set(self.held))

    def assign(self, cluster: Any, members: Mapping[str, ConsumerProtocolMemberMetadata]
               ) -> dict[str, ConsumerProtocolMemberAssignment]:
        """Partition p of every subscribed topic to the member `sticky_balanced` gives p."""
        counts = {topic: len(cluster.partitions_for_topic(topic) or ())
                  for metadata in members.values() for topic in metadata.subscription}
        plan = sticky_balanced(range(max(counts.values(), default=0)),
                               {member: _held(metadata.user_data)
                                for member, metadata in members.items()})
        return {
            member: ConsumerProtocolMemberAssignment(self.version, sorted(
                (topic, [p for p in plan[member] if p < counts[topic]])
                for topic in metadata.subscription), b"")
            for member, metadata in members.items()
        }


def _held(user_data: bytes | None) -> list[int]:
    """The partitions a member says it holds; none if it says nothing readable (another
    version's data, or none at all)."""
    try:
        held = orjson.loads(user_data or b"{}").get("held", [])
    except (orjson.JSONDecodeError, AttributeError):
        return []
    if not isinstance(held, list):
        return []
    return [p for p in held if isinstance(p, int) and not isinstance(p, bool)]
