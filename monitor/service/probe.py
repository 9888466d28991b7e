"""Asking the broker, apart from fetching: end offsets that let the merge release records
(`WatermarkProber`, see merge.py), and whether the broker answers at all (`BrokerWatch`)."""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.client import AIOKafkaClient
from aiokafka.errors import KafkaError, LeaderNotAvailableError, NoError
from aiokafka.protocol.metadata import MetadataRequest
from structlog.stdlib import BoundLogger

from monitor.service.merge import NEVER, TimestampMerge
from monitor.service.metrics import Metrics
from monitor.service.settings import ServiceSettings
from monitor.service.tasks import cancel_and_wait
from monitor.service.topics import PartitionsChanged, TopicMissing, output_topics

PROBE_INTERVAL = 1.0  # seconds between broker reachability probes
ASKED_SPACING = 0.1  # seconds at least between two, when asked for sooner (`BrokerWatch.ask`)
PROMPT_ANSWER = 0.5  # seconds within which an answer shows that Kafka answers now
OUTAGE_REMINDER = 30.0  # seconds between "still unreachable" log lines
PROBE_RETRY = 0.05  # seconds before a failed watermark probe is tried again
MAX_PROBES_IN_FLIGHT = 4


class WatermarkProber:
    """Sends the merge's watermark probes on a consumer connection of their own.

    The loop sends a probe as soon as the merge says it waits (`poke`), or sets ``wanted``
    when it has partitions to probe; the prober sets ``answered`` when a probe came back, so
    that the merge may release more. A probe does not wait for the one before it to be
    answered: a record that arrives while a probe is out needs one sent after it, and
    waiting for the first answer before sending it held such records back for up to two
    round trips instead of one (up to ``MAX_PROBES_IN_FLIGHT`` at a time, so that a slow
    broker is not flooded).
    """

    def __init__(self, merge: TimestampMerge, probe: AIOKafkaConsumer,
                 settings: ServiceSettings, log: BoundLogger) -> None:
        self._merge = merge
        self._probe = probe
        self.settings = settings
        self.log = log
        self.wanted = asyncio.Event()
        self.answered = asyncio.Event()
        self._in_flight: set[asyncio.Task[None]] = set()
        self._sent: dict[TopicPartition, float] = {}  # newest probe still out (ms)
        self._failure: BaseException | None = None  # raised by a probe task

    async def run(self) -> None:
        """Ask for the end offsets of the partitions that hold the merge back, each time
        after the held record arrived and after its timestamp + max_skew_ms, so that a silent
        partition stops holding the others back one round trip later (see merge.py). The
        loop sends most probes itself (`poke`); this task sends those that must wait (for
        the record's timestamp + skew, or for a probe in flight to come back) and retries."""
        try:
            while True:
                if self._failure is not None:
                    raise self._failure  # what no retry can mend
                needs = self._merge.head_needs
                if not self._unasked() or len(self._in_flight) >= MAX_PROBES_IN_FLIGHT:
                    await self.wanted.wait()
                    self.wanted.clear()
                    continue
                assert needs is not None
                early = (needs - time.time() * 1000) / 1000
                if early > 0:  # a probe sent sooner proves nothing about this record
                    await asyncio.sleep(min(early, self.settings.max_idle))
                self._send()
        finally:
            await cancel_and_wait(*self._in_flight)

    def poke(self) -> bool:
        """Send the probe the merge needs, if it may go out now, from the caller's step (the
        loop's, right after `TimestampMerge.take` said what it waits for): left to this
        task, it went out only once the loop had applied and handed over the batch it
        released, ~5 ms later. Whether a probe went out (the caller then yields once, so
        that it is written before the batch is worked on)."""
        needs = self._merge.head_needs
        if needs is None or len(self._in_flight) >= MAX_PROBES_IN_FLIGHT:
            return False
        if needs > time.time() * 1000:
            self.wanted.set()  # too soon: this task sends it when it may go
            return False
        return self._send()

    def _send(self) -> bool:
        """A probe of the unasked partitions, as a task; whether there were any."""
        tps = self._unasked()
        if not tps:
            return False
        sent_at_ms = time.time() * 1000
        for tp in tps:
            self._sent[tp] = sent_at_ms
        self._merge.asked(sent_at_ms, tps)
        task = asyncio.create_task(self._ask(sent_at_ms, tps))
        self._in_flight.add(task)
        task.add_done_callback(self._finished)
        return True

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._in_flight.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self._failure = task.exception()
        self.wanted.set()  # room for another probe, or a failure to raise

    def _unasked(self) -> list[TopicPartition]:
        """The merge's partitions to probe (`TimestampMerge.to_probe`) but those a probe
        sent late enough is out for."""
        needs = self._merge.head_needs
        if needs is None:
            return []
        return [tp for tp in self._merge.to_probe() if self._sent.get(tp, NEVER) < needs]

    async def _ask(self, sent_at_ms: float, tps: list[TopicPartition]) -> None:
        ends: dict[TopicPartition, int] = {}
        try:
            ends = await self._probe.end_offsets(tps)
        except KafkaError as exc:
            self.log.debug("watermark probe failed", error=repr(exc))
        else:
            self._merge.probed(sent_at_ms, ends)
            self.answered.set()
            # answered: what it proves is the merge's to keep (a seek makes it forget)
            self._forget_sent(ends, sent_at_ms)
        finally:  # the merge no longer waits for what this probe did not answer
            self._merge.unanswered(sent_at_ms, [tp for tp in tps if tp not in ends])
        if len(ends) < len(tps):  # failed, or the broker left some out: ask again, later
            await asyncio.sleep(PROBE_RETRY)
            self._forget_sent([tp for tp in tps if tp not in ends], sent_at_ms)

    def _forget_sent(self, tps: Iterable[TopicPartition], sent_at_ms: float) -> None:
        for tp in tps:
            if self._sent.get(tp) == sent_at_ms:
                del self._sent[tp]


# Topic errors in a metadata answer that still mean the topic exists (a leader being elected).
_EXISTS = (NoError.errno, LeaderNotAvailableError.errno)


async def topics_present(client: AIOKafkaClient, names: Sequence[str]) -> set[str]:
    """Which of ``names`` exist (`topic_partitions`)."""
    return set(await topic_partitions(client, names))


async def topic_partitions(client: AIOKafkaClient, names: Sequence[str]
                           ) -> dict[str, int | None]:
    """The partition count of each of ``names`` that exists (None while its leader is being
    elected: Kafka may list no partition then), from a metadata request for them alone
    (never creating one), to the first broker that answers. The whole cluster's metadata,
    on a cluster of 2,000 topics, took ~60 ms of the event loop to decode; these few,
    ~0.2 ms."""
    request = MetadataRequest(list(names), allow_auto_topic_creation=False)
    nodes = [broker.nodeId for broker in client.cluster.brokers()]
    random.shuffle(nodes)  # as aiokafka's own metadata requests spread over the brokers
    failure: Exception = KafkaError("no broker known yet")
    for node in nodes:
        try:
            answer = await client.send(node, request)
        except KafkaError as exc:  # that broker is not reachable: the next one may be
            failure = exc
            continue
        return partition_counts_of(answer)
    raise failure


def partition_counts_of(answer: Any) -> dict[str, int | None]:
    """`topic_partitions` of a metadata answer."""
    # (error_code, topic, [is_internal since v1,] partitions, ...)
    at = 2 if answer.API_VERSION == 0 else 3
    return {topic[1]: len(topic[at]) if topic[0] == NoError.errno else None
            for topic in answer.topics if topic[0] in _EXISTS}


class BrokerWatch:
    """Says plainly when Kafka is out of reach and when it is back, and stops the instance
    through ``fail`` when an output topic has disappeared, or when a topic's partition count
    differs from ``partition_counts`` (what the instance found at start, and reads). Each
    time it asks it tells ``reachable`` whether Kafka answered (so that /readyz says so too)
    and whether within ``PROMPT_ANSWER`` (a late answer restarts the merge's wait: see
    below).

    The clients retry on their own and an idle consumer looks the same whether the broker
    is there or not, so a cheap metadata request each second tells the two apart: for
    liqmon's topics alone (`topic_partitions`). ``ask``
    sends one at once (the merge asks before it releases records without proof of order);
    ``answered_sent_at`` is when the newest one answered within ``PROMPT_ANSWER`` was sent
    (monotonic clock). One answered later was held up by an outage and says only that it
    ended: the merge's probes, held up with it, are answered as late. That may be the only
    sign of an outage the watch has: an instance frozen (SIGSTOP, a throttled container)
    through its start wakes with a request out that is answered when it ends.
    """

    def __init__(self, client: AIOKafkaClient, settings: ServiceSettings, metrics: Metrics,
                 log: BoundLogger, reachable: Callable[[bool, bool], None],
                 fail: Callable[[BaseException], None],
                 partition_counts: Mapping[str, int], interval: float = PROBE_INTERVAL) -> None:
        self._client = client  # the producer's
        self._counts = dict(partition_counts)
        self.settings = settings
        self.metrics = metrics
        self.log = log
        self._found_reachable = reachable
        self._fail = fail
        self._interval = interval
        self._asked = asyncio.Event()
        self.answered_sent_at = NEVER

    def ask(self) -> None:
        """Send a request now rather than at the next interval (once the one out is back)."""
        self._asked.set()

    async def run(self) -> None:
        client = self._client
        outputs = output_topics(self.settings)
        watched = sorted({*outputs, *self._counts})
        lost_at: float | None = None
        last_said = 0.0
        sent_at = NEVER
        self._asked.set()  # the first request at once, not an interval on
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._interval):
                    await self._asked.wait()
            self._asked.clear()
            # a broker refusing connections fails each request at once
            await asyncio.sleep(max(0.0, sent_at + ASKED_SPACING - time.monotonic()))
            present: dict[str, int | None] | None = None
            prompt = False
            sent_at = time.monotonic()
            try:
                # asyncio.timeout, not wait_for: see monitor/service/tasks.py
                async with asyncio.timeout(PROBE_INTERVAL * 2):
                    present, error = await topic_partitions(client, watched), None
                prompt = time.monotonic() - sent_at <= PROMPT_ANSWER
                if prompt:
                    self.answered_sent_at = sent_at
            except (KafkaError, TimeoutError, OSError) as exc:
                error = exc
            reachable = present is not None
            now = time.monotonic()
            self.metrics.kafka_reachable.set(1 if reachable else 0)
            self._found_reachable(reachable, prompt)
            # Some brokers acknowledge produce requests to a deleted topic and keep nothing.
            missing = [name for name in outputs if present is not None and name not in present]
            if missing:
                self._fail(TopicMissing(missing[0]))
                return
            changed = [(name, count, found) for name, count in self._counts.items()
                       if present is not None and (found := present.get(name)) is not None
                       and found != count]
            if changed:
                self._fail(PartitionsChanged(*changed[0]))
                return
            if reachable and lost_at is not None:
                self.log.info("kafka reachable again", bootstrap=self.settings.bootstrap,
                              outage_seconds=round(now - lost_at, 1))
                lost_at = None
            elif not reachable and (lost_at is None or now - last_said >= OUTAGE_REMINDER):
                lost_at = lost_at or now
                last_said = now
                self.log.warning("kafka unreachable, clients keep retrying",
                                 bootstrap=self.settings.bootstrap, error=repr(error),
                                 outage_seconds=round(now - lost_at, 1))
