"""Events published since the checkpoints a restore takes, so that no event id goes out
again with other contents.

After a crash the inputs since the last checkpoint are applied again, and their events go out
again under the same ids (SPEC §6). That holds while they are applied in the order they were
first applied, which is replay's order, unless the first pass applied a record late (a clock
beyond `--max-skew`, a forced release, a record placed at its arrival because it was stamped
ahead). Applied again in timestamp order, such a backlog can give a risk unit fewer
transitions than the first pass published, or others, and its next transition would then reuse
an id already published for another one: a consumer that de-duplicates by `event_id`, as the
README tells it to, would drop it, a liquidation included.

So a restore reads what the output topics received since the oldest control record it takes was
written (its `written_at`, less `READ_BEFORE_MS`), or from their start for a partition never
checkpointed (and not reset), keeps the events of counters beyond each unit's checkpointed one
(a digest of each, without `emitted_at`), and every event applied after that is checked
(`PublishedEvents.checked`): one whose id went out with other contents takes the counter after
the last published for its unit instead (the engine's counter with it). Once the instance has
applied its inputs up to their ends as of the restore, every unit still behind its last
published counter is brought to it, and the events are forgotten.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping

import msgspec
import orjson
from aiokafka import TopicPartition

from monitor.account import RiskKey, UnitKey
from monitor.events import Event, event_id
from monitor.service.log_reader import (
    LATEST,
    RecordBatch,
    list_offsets,
    read_range,
    reading_client,
)
from monitor.service.settings import ServiceSettings

# How long before a control record's `written_at` its partition's later events may seem to
# have been produced. By the instance that wrote it, none: its snapshots were taken then, by
# the clock that stamps its events. The margin covers another instance's clock (one that took
# the partition over, then crashed before checkpointing it) and a topic stamped by the
# broker's (LogAppendTime).
READ_BEFORE_MS = 30_000


def _digest(content: bytes) -> bytes:
    return hashlib.blake2b(content, digest_size=16).digest()


def _transition(event_id: str) -> int:
    """The transition counter an event id names (`monitor.events.event_id`)."""
    return int(event_id.rsplit(":", 2)[1])


def _key_of(event: Event) -> RiskKey:
    return event.account if event.symbol is None else UnitKey(event.account, event.symbol)


class PublishedEvents:
    """Events published beyond the restored counters, by risk unit: counter → digest of the
    event without `emitted_at`."""

    def __init__(self) -> None:
        self._by_unit: dict[RiskKey, dict[int, bytes]] = {}
        # applied inputs up to these offsets, the backlog of the restores is behind
        self._until: dict[TopicPartition, int] = {}
        self.renumbered = 0  # events given another counter than the one they were built with
        self.advanced = 0  # units whose counter `caught_up` brought to their last published

    def __bool__(self) -> bool:
        return bool(self._by_unit)

    def __len__(self) -> int:
        return sum(map(len, self._by_unit.values()))

    def add(self, value: bytes | None, restored_counter: Callable[[RiskKey], int]) -> None:
        """One record of an output topic; kept if it is an event beyond its unit's restored
        counter (0 for a unit no snapshot was restored of)."""
        try:
            event = orjson.loads(value or b"")
            transition = _transition(event["event_id"])
            symbol = event.get("symbol")
            key: RiskKey = event["account"] if symbol is None else UnitKey(event["account"],
                                                                           symbol)
            hash(key)
        except (orjson.JSONDecodeError, TypeError, KeyError, ValueError, AttributeError,
                IndexError):
            return  # not an event of ours: nothing to keep apart from
        if transition <= restored_counter(key):
            return
        event.pop("emitted_at", None)
        self._by_unit.setdefault(key, {})[transition] = _digest(orjson.dumps(event))

    def until(self, ends: Mapping[TopicPartition, int]) -> None:
        """Keep the events until the inputs are applied up to ``ends``."""
        for tp, end in ends.items():
            self._until[tp] = max(self._until.get(tp, 0), end)

    def checked(self, event: Event, renumber: Callable[[RiskKey, int], None]) -> Event:
        """``event``, or, if its id went out with other contents, the same event under the
        counter after its unit's last published one, the unit's counter set to it
        (``renumber``). An id not read goes out as built: every event beyond a restored
        counter is read, so it is one of a unit rebuilt from its inputs' start (a reset
        partition), published before what was read, and rebuilt alike."""
        key = _key_of(event)
        published = self._by_unit.get(key)
        if published is None:
            return event
        transition, last = _transition(event.event_id), max(published)
        if transition > last:
            del self._by_unit[key]  # beyond everything published: nothing left to collide
            return event
        digest = published.get(transition)
        if digest is None or digest == _digest(orjson.dumps(event.payload)):
            return event  # the same event again, as SPEC §6 has it, or one not read
        renumber(key, last + 1)
        del self._by_unit[key]
        self.renumbered += 1
        new_id = event_id(event.account, last + 1, event.type, event.symbol)
        return msgspec.structs.replace(event, event_id=new_id,
                                       payload={**event.payload, "event_id": new_id})

    def caught_up(self, applied: Mapping[TopicPartition, int],
                  counter: Callable[[RiskKey], int | None],
                  renumber: Callable[[RiskKey, int], None]) -> bool:
        """Once ``applied`` has reached the end in `until` of every partition it still
        holds: bring each unit held here (``counter`` not None) that is behind its last
        published counter up to it, forget the events, and say so."""
        if any(applied.get(tp, end) < end for tp, end in self._until.items()):
            return False
        for key, published in self._by_unit.items():
            now = counter(key)
            if now is not None and now < max(published):
                renumber(key, max(published))
                self.advanced += 1
        self._by_unit, self._until = {}, {}
        return True


async def read_published(settings: ServiceSettings, partition_counts: Mapping[str, int],
                         inputs: list[TopicPartition], since_ms: int, into: PublishedEvents,
                         restored_counter: Callable[[RiskKey], int]) -> int:
    """Add to ``into`` the events the output topics received from ``since_ms`` on (or from
    their start: `EARLIEST`), up to their ends now, and keep them until ``inputs`` are
    applied up to their ends now; how many records were read. A broker out of reach raises
    `ReadTimedOut` (retriable)."""
    t = settings.topics
    outputs = [TopicPartition(topic, p) for topic in (t.margin_calls, t.liquidations)
               for p in range(partition_counts[topic])]
    read = 0

    def take(tp: TopicPartition, batch: RecordBatch) -> None:
        nonlocal read
        for record in batch.records():
            into.add(record.value, restored_counter)
            read += 1

    async with reading_client(settings.bootstrap, f"{settings.client_id}-published",
                              settings.request_timeout_ms, settings.security) as client:
        await client.set_topics(sorted({tp.topic for tp in outputs + inputs}))
        timeout = settings.request_timeout_ms / 1000
        ends = await list_offsets(client, outputs + inputs, LATEST, timeout)
        starts = await list_offsets(client, outputs, since_ms, timeout)
        # nothing stamped since: the broker answers -1
        await read_range(client, {tp: (ends[tp] if starts[tp] < 0 else starts[tp], ends[tp])
                                  for tp in outputs}, take, timeout)
    into.until({tp: ends[tp] for tp in inputs})
    return read
