"""Every Kafka client `liqmon run` uses, made in one place from its settings.

The monitor is given a `Clients` (its own by default), so that the client options live here
and nowhere else: TLS and SASL from `settings.security` on every client, the fetch tuning of
the input consumers. The bench passes one with diagnostic consumer options of its own.
"""

from __future__ import annotations

import asyncio
import time
import weakref
from collections.abc import Callable, Hashable, Iterable, Mapping
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.coordinator.assignors.range import RangePartitionAssignor

from monitor.service.assignor import StickyAccountPartitions
from monitor.service.settings import FETCH_MAX_WAIT_CAP_MS, ServiceSettings, compression_type
from monitor.service.topics import MAX_REQUEST_BYTES

# a partition may stay behind its broker's end, with nothing fetched, this long and over this
# many fetches before the fetch wait is widened
STARVED_AFTER = 0.5  # seconds
STARVED_FETCHES = 3


class Clients:
    """Makes (does not start) the clients of one monitor.

    ``consumer_options``: extra keyword arguments for every consumer made here (the input
    consumers, the watermark probe, the catch-up reader), for diagnosis; options these
    clients set themselves are not overridden.
    """

    def __init__(self, settings: ServiceSettings,
                 consumer_options: Mapping[str, Any] | None = None) -> None:
        self.settings = settings
        self.consumer_options = dict(consumer_options or {})

    def admin(self) -> AIOKafkaAdminClient:
        s = self.settings
        return AIOKafkaAdminClient(bootstrap_servers=s.bootstrap, client_id=s.client_id,
                                   request_timeout_ms=s.request_timeout_ms,
                                   **s.security.client_kwargs())

    def producer(self) -> AIOKafkaProducer:
        """Events, dead letters and checkpoints, acknowledged by every replica."""
        s = self.settings
        return AIOKafkaProducer(
            bootstrap_servers=s.bootstrap, client_id=s.client_id, acks="all",
            compression_type=compression_type(s.compression),
            # no linger: a batch's events are handed over together anyway, and the client
            # gathers whatever is produced while a request is in flight
            linger_ms=0, max_batch_size=256 * 1024, max_request_size=MAX_REQUEST_BYTES,
            request_timeout_ms=s.request_timeout_ms, **s.security.client_kwargs(),
        )

    def prices_consumer(self) -> AIOKafkaConsumer:
        """Every partition of prices, outside any group (each instance needs every price)."""
        return self._consumer(group_id=None, **self._inputs())

    def probe_consumer(self) -> AIOKafkaConsumer:
        """End offsets for the merge's watermark probes. Its own connection: a broker answers
        one request per connection at a time, so a probe queued behind a fetch's long-poll
        would wait for it."""
        inputs = self._inputs()
        return self._consumer(**{**inputs, "client_id": f"{self.settings.client_id}-watermarks"},
                              group_id=None)

    def group_consumer(self) -> AIOKafkaConsumer:
        """Fills and ledger, in the consumer group that spreads account partitions over the
        instances (not subscribed yet)."""
        s = self.settings
        return self._consumer(
            group_id=s.group, session_timeout_ms=s.session_timeout_ms,
            # fills p and ledger p to the same instance (co-partitioning; the default
            # round-robin would split an account's fills from its ledger), left where they
            # are held. Range, which co-partitions too, is all that earlier liqmon builds
            # offered: a group in a rolling upgrade agrees on it until every member offers
            # both.
            partition_assignment_strategy=(StickyAccountPartitions(), RangePartitionAssignor),
            heartbeat_interval_ms=s.heartbeat_interval_ms,
            rebalance_timeout_ms=s.session_timeout_ms, **self._inputs(),
        )

    def catch_up_reader(self) -> AIOKafkaConsumer:
        """A gained partition's inputs and the ticks it missed, read once by a catch-up."""
        s = self.settings
        return self._consumer(bootstrap_servers=s.bootstrap, group_id=None,
                              client_id=f"{s.client_id}-catch-up", enable_auto_commit=False,
                              auto_offset_reset=s.start,
                              request_timeout_ms=max(s.request_timeout_ms, 10_000),
                              **s.security.client_kwargs())

    def _inputs(self) -> dict[str, Any]:
        """What the consumers of the input topics share."""
        s = self.settings
        return {
            "bootstrap_servers": s.bootstrap, "client_id": s.client_id,
            "enable_auto_commit": False, "auto_offset_reset": s.start,
            "request_timeout_ms": max(s.request_timeout_ms, s.session_timeout_ms + 1000),
            "max_partition_fetch_bytes": 4 * 1024 * 1024,
            "fetch_max_wait_ms": s.fetch_max_wait_ms, **s.security.client_kwargs(),
        }

    def _consumer(self, **options: Any) -> AIOKafkaConsumer:
        return AIOKafkaConsumer(**{**self.consumer_options, **options})


class FetchWait:
    """One input consumer's fetch wait, doubled (up to ``FETCH_MAX_WAIT_CAP_MS``, never narrowed
    again) when the broker keeps answering a partition with nothing although it reports
    records past the consumer's position.

    Apache Kafka answers a fetch as soon as it holds data, so there the wait only paces idle
    polling and a wider one costs nothing; there this should not fire. The embedded broker takes
    longer to answer a fetch the more batches the partition holds, and answers empty once
    that takes longer than the wait: at 10 ms, some 17,000 single-record batches into a
    partition, whose consumer then reads nothing more (seen as "input partition stalled").
    A wider wait gives the broker the time it needs.
    """

    def __init__(self, start_ms: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.ms = start_ms
        self._clock = clock
        # per partition: position, since when it has not moved, fetches answered since, and
        # when the last of them was answered
        self._since: dict[TopicPartition, tuple[int, float, int, int | None]] = {}

    def starved(self, fetched: Mapping[TopicPartition, tuple[int, int | None, int | None]]
                ) -> tuple[TopicPartition, float] | None:
        """Observe a fetch that left nothing buffered in the consumer: ``fetched`` gives each
        partition it fetches (position after it, the end the broker reported, when the broker
        last answered a fetch of it). If one has stayed behind that end without moving for
        ``STARVED_AFTER`` seconds and ``STARVED_FETCHES`` answered fetches (a rebalance, which
        stops fetching for a while, is one gap, not a starvation; a broker away answers
        nothing, and says nothing of how it answers), the wait is doubled (``ms``): that
        partition and how long it waited. A partition left out (paused, handed over) starts
        afresh when it is back."""
        now = self._clock()
        before, self._since = self._since, {}
        for tp, (position, end, answered) in fetched.items():
            since = before.get(tp)
            if since is not None and since[0] == position and since[3] == answered:
                self._since[tp] = since  # no answer since the last look
                continue
            if since is None or since[0] != position or end is None or end <= position:
                self._since[tp] = (position, now, 0, answered)
                continue
            _, unmoved_since, fetches, _ = since
            self._since[tp] = (position, unmoved_since, fetches + 1, answered)
            if (now - unmoved_since >= STARVED_AFTER and fetches + 1 >= STARVED_FETCHES
                    and self.ms < FETCH_MAX_WAIT_CAP_MS):
                self.ms = min(2 * self.ms, FETCH_MAX_WAIT_CAP_MS)
                # the next widening waits as long again, from now
                self._since = {other: (at, now, 0, answered_at)
                               for other, (at, _, answered_at) in fetched.items()}
                return tp, now - unmoved_since
        return None


def set_fetch_wait(consumer: AIOKafkaConsumer, wait_ms: int) -> None:
    """Give the consumer's next fetches this wait. Sets aiokafka 0.14's fetcher attribute
    (the version pyproject.toml pins): the client reads it for every fetch request it
    builds, and offers no other way to change it after start."""
    consumer._fetcher._fetch_max_wait_ms = wait_ms


def position_now(consumer: AIOKafkaConsumer, tp: TopicPartition) -> int | None:
    """The consumer's position in an assigned partition — the offset after everything it has
    handed over or skipped (transaction markers) — or None while it has none (an offset
    reset pending). Unlike ``await consumer.position(tp)``, never waits, so it can be read
    in the same step as the fetch it follows. Reads aiokafka 0.14's subscription state (the
    version pyproject.toml pins)."""
    subscription = consumer._subscription.subscription
    assignment = None if subscription is None else subscription.assignment
    state = None if assignment is None else assignment.state_value(tp)
    if state is None or not state.has_valid_position:
        return None
    position: int = state.position
    return position


def fetched_from(consumer: AIOKafkaConsumer, tp: TopicPartition) -> Hashable | None:
    """The broker the consumer fetches the partition from, as a label that changes with every
    metadata update the consumer has taken since: (its leader, the updates counted); None
    while the leader is unknown. liqmon sets no ``client_rack``, so no follower is read.

    The consumer's fetches from one broker are answered one after another, and
    `TimestampMerge.fetched` relies on it for answers in a row under one label. The leader is
    read after an answer: one that moved to another broker and back between two reads would
    leave the label as it was, though an answer came from the other broker in between; the
    consumer can only fetch from a broker its metadata named, so counting the updates closes
    that gap. Reads aiokafka 0.14's client (the version pyproject.toml pins); its cluster
    metadata calls a listener on every update."""
    cluster = consumer._client.cluster
    updates = _metadata_updates.get(cluster)
    if updates is None:
        updates = _metadata_updates[cluster] = _Updates()
        cluster.add_listener(updates)
    leader: int | None = cluster.leader_for_partition(tp)
    return None if leader is None or leader < 0 else (leader, updates.count)


class _Updates:
    """A cluster metadata listener: how many updates it has seen."""

    def __init__(self) -> None:
        self.count = 0

    def __call__(self, cluster: object) -> None:
        self.count += 1


_metadata_updates: weakref.WeakKeyDictionary[Any, _Updates] = weakref.WeakKeyDictionary()


def group_generation(consumer: AIOKafkaConsumer) -> int:
    """The generation of the consumer group this consumer last joined: -1 before it joined and
    once the group no longer knows it. Reads aiokafka 0.14's coordinator (the version
    pyproject.toml pins)."""
    coordinator = consumer._coordinator
    return -1 if coordinator is None else int(coordinator.generation)


async def stop_consumer(consumer: AIOKafkaConsumer) -> None:
    """``consumer.stop()``, without the cancellation aiokafka 0.14 can raise in its caller.

    Its fetcher's close cancels the fetch tasks in flight and awaits each: one that failed
    (the broker out of reach) and sleeps its retry backoff ends cancelled, and awaiting it
    raises CancelledError in whoever called ``stop()``, though nobody cancelled that task,
    and leaves the rest of the close undone. Raised in the task that restores partitions,
    it ended that task without a word, and the instance never took another assignment.
    So: a cancellation of the caller itself goes on up; that one is absorbed, and the close
    finished (the fetch tasks left, then the connections). Reads the fetcher's tasks and the
    client of aiokafka 0.14 (the version pyproject.toml pins)."""
    try:
        await consumer.stop()
    except asyncio.CancelledError:
        current = asyncio.current_task()
        if current is not None and current.cancelling():
            raise  # the caller was cancelled: that is not ours to absorb
        pending = [task for task in consumer._fetcher._pending_tasks if not task.done()]
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending)
        await consumer._client.close()


def track_topics(client: AIOKafkaConsumer | AIOKafkaProducer, topics: Iterable[str]) -> None:
    """Have a started client keep the metadata of these topics alone.

    A client that tracks no topic asks for the whole cluster's metadata, every
    `metadata_max_age_ms` (5 minutes) and after each broken connection (a broker restart),
    and aiokafka decodes the answer on the event loop: ~60 ms at 2,000 topics of 4
    partitions. The producer tracks none until it first sends; the watermark probe, which only
    asks for end offsets, never would."""
    # aiokafka's consumer keeps its client private; the producer shows it
    own = client.client if isinstance(client, AIOKafkaProducer) else client._client
    own.set_topics(list(topics))


async def stop_client(client: AIOKafkaConsumer | AIOKafkaProducer) -> None:
    """Stop a consumer (as `stop_consumer` does) or a producer."""
    if isinstance(client, AIOKafkaConsumer):
        await stop_consumer(client)
    else:
        await client.stop()
