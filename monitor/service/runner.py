"""`liqmon run`: the engine on Kafka (SPEC §6).

Two consumers feed one processing loop: a group consumer on fills and ledger (accounts are
partitioned by the group) and a group-less consumer on every partition of prices (each instance
needs every price). Each fetched batch is decoded and applied record by record exactly as
`liqmon replay` does; its events and dead letters are produced with acks=all and only then are
the batch's input offsets committed, so delivery is at-least-once and never lossy.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Mapping, Sequence
from typing import Any

import structlog
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError

from monitor.config import RiskConfig
from monitor.engine import Engine
from monitor.events import Source
from monitor.records import Rejected, decode
from monitor.service.metrics import LiveFigures, Metrics
from monitor.service.outbox import Outgoing, dead_letter_message, event_message
from monitor.service.settings import ServiceSettings
from monitor.service.topics import ensure_topics
from monitor.state import EVENT_TYPES, AccountState

MAX_BACKOFF = 5.0
PROBE_INTERVAL = 1.0  # seconds between broker reachability probes
OUTAGE_REMINDER = 30.0  # seconds between "still unreachable" log lines


class DeliveryAbandoned(RuntimeError):
    """Shutdown could not deliver every pending message in time. Their inputs stay
    uncommitted, so a restart re-processes them: nothing is lost, some may repeat."""


class Monitor:
    def __init__(self, settings: ServiceSettings, config: RiskConfig,
                 metrics: Metrics | None = None) -> None:
        self.settings = settings
        self.config = config
        self.engine = Engine(config)
        self.metrics = metrics or Metrics()
        self.metrics.watch(self._live_figures)
        topics = settings.topics
        for topic in (topics.prices, topics.fills, topics.ledger):  # export zeros from the start
            self.metrics.records_consumed.labels(topic)
        for event_type in EVENT_TYPES:
            self.metrics.events_emitted.labels(event_type)
        self.log = structlog.get_logger("liqmon")
        self.ready = asyncio.Event()
        self.partition_counts: dict[str, int] = {}
        self._stopping = asyncio.Event()
        self._stop_requested_at: float | None = None
        self._processed: dict[TopicPartition, int] = {}  # next offset to read, per partition
        self._committed: dict[TopicPartition, int] = {}
        self._last_tick_wall: dict[str, float] = {}
        self._producer: AIOKafkaProducer | None = None
        self._prices: AIOKafkaConsumer | None = None
        self._accounts: AIOKafkaConsumer | None = None

    # -- lifecycle ------------------------------------------------------------------------------

    def request_stop(self) -> None:
        if not self._stopping.is_set():
            self.log.info("stopping", reason="signal")
            self._stop_requested_at = time.monotonic()
            self._stopping.set()

    async def run(self) -> None:
        """Connect, consume until asked to stop, then deliver, commit and close."""
        try:
            await self._connect()
            if self._stopping.is_set():
                return
            self.ready.set()
            self.metrics.ready.set(1)
            self.log.info("consuming", bootstrap=self.settings.bootstrap,
                          group=self.settings.group, partitions=self.partition_counts)
            watchdog = asyncio.create_task(self._watch_broker())
            try:
                await self._consume()
            finally:
                watchdog.cancel()
                await asyncio.gather(watchdog, return_exceptions=True)
        finally:
            self.ready.clear()
            self.metrics.ready.set(0)
            await self._close()

    async def _connect(self) -> None:
        """Wait for the broker (with backoff), create missing topics, start the clients."""
        s = self.settings
        backoff = 0.2
        while not self._stopping.is_set():
            admin = AIOKafkaAdminClient(bootstrap_servers=s.bootstrap, client_id=s.client_id,
                                        request_timeout_ms=s.request_timeout_ms)
            try:
                await admin.start()
                self.partition_counts = await ensure_topics(admin, s)
                break
            except KafkaError as exc:
                self.log.warning("kafka unreachable, retrying", bootstrap=s.bootstrap,
                                 error=repr(exc), retry_in=round(backoff, 2))
            finally:
                await admin.close()
            await self._sleep_unless_stopping(backoff)
            backoff = min(backoff * 2, MAX_BACKOFF)
        if self._stopping.is_set():
            return
        self._producer = AIOKafkaProducer(
            bootstrap_servers=s.bootstrap, client_id=s.client_id, acks="all",
            compression_type=None if s.compression == "none" else s.compression,
            linger_ms=2, max_batch_size=256 * 1024, request_timeout_ms=s.request_timeout_ms,
        )
        await self._producer.start()
        common: dict[str, Any] = {
            "bootstrap_servers": s.bootstrap, "client_id": s.client_id,
            "enable_auto_commit": False, "auto_offset_reset": s.start,
            "request_timeout_ms": max(s.request_timeout_ms, s.session_timeout_ms + 1000),
            "max_partition_fetch_bytes": 4 * 1024 * 1024,
        }
        self._prices = AIOKafkaConsumer(group_id=None, **common)
        await self._prices.start()
        self._prices.assign([TopicPartition(s.topics.prices, p)
                             for p in range(self.partition_counts[s.topics.prices])])
        self._accounts = AIOKafkaConsumer(
            group_id=s.group, session_timeout_ms=s.session_timeout_ms,
            heartbeat_interval_ms=s.heartbeat_interval_ms,
            rebalance_timeout_ms=s.session_timeout_ms, **common,
        )
        await self._accounts.start()
        self._accounts.subscribe([s.topics.fills, s.topics.ledger])

    async def _close(self) -> None:
        for consumer in (self._prices, self._accounts):
            if consumer is not None:
                await consumer.stop()
        if self._producer is not None:
            await self._producer.stop()

    async def _sleep_unless_stopping(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), timeout=seconds)

    async def _watch_broker(self) -> None:
        """Say plainly when Kafka is out of reach and when it is back.

        The clients retry on their own and an idle consumer looks the same whether the broker
        is there or not, so a cheap metadata request each second tells the two apart.
        """
        assert self._producer is not None
        client = self._producer.client
        lost_at: float | None = None
        last_said = 0.0
        while True:
            await asyncio.sleep(PROBE_INTERVAL)
            try:
                await asyncio.wait_for(client.fetch_all_metadata(), timeout=PROBE_INTERVAL * 2)
                reachable, error = True, None
            except (KafkaError, TimeoutError, OSError) as exc:
                reachable, error = False, exc
            now = time.monotonic()
            self.metrics.kafka_reachable.set(1 if reachable else 0)
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

    # -- the loop -------------------------------------------------------------------------------

    async def _consume(self) -> None:
        assert self._prices is not None and self._accounts is not None
        limit = self.settings.max_batch_records
        consumers = (self._prices, self._accounts)
        fetches = {c: asyncio.ensure_future(c.getmany(timeout_ms=1000, max_records=limit))
                   for c in consumers}
        stopping = asyncio.ensure_future(self._stopping.wait())
        try:
            while not self._stopping.is_set():
                await asyncio.wait([*fetches.values(), stopping],
                                   return_when=asyncio.FIRST_COMPLETED)
                for consumer in consumers:
                    fetch = fetches[consumer]
                    if not fetch.done() or self._stopping.is_set():
                        continue
                    fetches[consumer] = asyncio.ensure_future(
                        consumer.getmany(timeout_ms=1000, max_records=limit))
                    try:
                        batch = fetch.result()
                    except KafkaError as exc:
                        self.log.warning("fetch failed, retrying", error=repr(exc))
                        continue
                    if batch:
                        await self._process(consumer, batch)
        finally:
            for fetch in (*fetches.values(), stopping):
                fetch.cancel()
            await asyncio.gather(*fetches.values(), stopping, return_exceptions=True)
        await self._commit()
        self.log.info("stopped", committed={f"{tp.topic}/{tp.partition}": o
                                            for tp, o in sorted(self._committed.items())})

    async def _process(self, consumer: AIOKafkaConsumer,
                       batch: Mapping[TopicPartition, Sequence[ConsumerRecord]]) -> None:
        """Apply a fetched batch record by record, deliver what it produced, then commit."""
        outgoing = self.apply_batch(batch)
        await self._deliver(outgoing)
        for tp, records in batch.items():
            self._processed[tp] = records[-1].offset + 1
            highwater = consumer.highwater(tp)
            if highwater is not None:
                self.metrics.consumer_lag.labels(tp.topic, str(tp.partition)).set(
                    max(0, highwater - self._processed[tp]))
        if consumer is self._accounts:
            await self._commit()

    def apply_batch(self, batch: Mapping[TopicPartition, Sequence[ConsumerRecord]]
                    ) -> list[Outgoing]:
        engine, config, topics, metrics = self.engine, self.config, self.settings.topics, \
            self.metrics
        stats = engine.stats
        before = (stats.stale_ticks, stats.unused_ticks, stats.duplicates)
        out: list[Outgoing] = []
        for tp, records in batch.items():
            kind = topics.input_kind(tp.topic)
            metrics.records_consumed.labels(tp.topic).inc(len(records))
            for message in records:
                try:
                    record = decode(kind, message.value, config)
                except Rejected as rejection:
                    out.append(dead_letter_message(rejection, tp.topic, tp.partition,
                                                   message.offset, message.key, message.value,
                                                   topics))
                    metrics.records_rejected.labels(tp.topic, rejection.reason).inc()
                    self.log.warning("rejected", topic=tp.topic, partition=tp.partition,
                                     offset=message.offset, reason=rejection.reason,
                                     detail=rejection.detail)
                    continue
                applied_ticks = stats.applied_ticks
                events = engine.apply(record, Source(tp.topic, tp.partition, message.offset))
                if stats.applied_ticks != applied_ticks:
                    self._last_tick_wall[record.symbol] = time.time()  # type: ignore[union-attr]
                for event in events:
                    out.append(event_message(event, topics, message.timestamp))
                    self.log.info("event", event_id=event.event_id, type=event.type,
                                  account=event.account, topic=tp.topic,
                                  partition=tp.partition, offset=message.offset,
                                  margin_ratio=event.payload["margin_ratio"])
        stale, unused, duplicates = before
        metrics.stale_ticks.inc(stats.stale_ticks - stale)
        metrics.unused_ticks.inc(stats.unused_ticks - unused)
        metrics.duplicates.inc(stats.duplicates - duplicates)
        return out

    # -- delivery -------------------------------------------------------------------------------

    async def _deliver(self, outgoing: list[Outgoing]) -> None:
        """Produce everything with acks=all, retrying with backoff while the broker is away.

        Retries re-send only what failed; a repeat carries the same event_id, and the
        transition counter inside the id orders one account's events.
        """
        pending, backoff, failures = outgoing, 0.1, 0
        while pending:
            failed, error = await self._send(pending)
            if not failed:
                if failures:
                    self.log.info("kafka reachable again, delivery resumed", retries=failures)
                return
            failures += 1
            self.metrics.delivery_retries.inc(len(failed))
            if self._stop_requested_at is not None and (
                time.monotonic() - self._stop_requested_at > self.settings.shutdown_timeout
            ):
                raise DeliveryAbandoned(
                    f"{len(failed)} messages could not be delivered within "
                    f"{self.settings.shutdown_timeout}s of the stop request ({error!r}); their "
                    "inputs are not committed and will be re-processed on restart"
                )
            self.log.warning("kafka unreachable, retrying delivery", pending=len(failed),
                             error=repr(error), retry_in=round(backoff, 2))
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, MAX_BACKOFF)
            pending = failed

    async def _send(self, messages: list[Outgoing]) -> tuple[list[Outgoing], Exception | None]:
        """One attempt at producing every message; returns those that failed."""
        assert self._producer is not None
        futures: list[asyncio.Future[Any]] = []
        for index, message in enumerate(messages):
            try:
                futures.append(await self._producer.send(
                    message.topic, message.value, key=message.key, headers=message.headers))
            except KafkaError as exc:  # no metadata, buffer full for too long: broker away
                results = await asyncio.gather(*futures, return_exceptions=True)
                self._account_delivered(messages[:index], results)
                failed = [m for m, r in zip(messages[:index], results, strict=True)
                          if isinstance(r, BaseException)]
                return failed + messages[index:], exc
        results = await asyncio.gather(*futures, return_exceptions=True)
        self._account_delivered(messages, results)
        errors = [r for r in results if isinstance(r, Exception)]
        failed = [m for m, r in zip(messages, results, strict=True)
                  if isinstance(r, BaseException)]
        return failed, errors[0] if errors else None

    def _account_delivered(self, messages: Sequence[Outgoing], results: Sequence[Any]) -> None:
        now_ms = time.time() * 1000
        for message, result in zip(messages, results, strict=True):
            if isinstance(result, BaseException) or message.event_type is None:
                continue
            self.metrics.events_emitted.labels(message.event_type).inc()
            if message.trigger_timestamp_ms is not None and message.trigger_timestamp_ms > 0:
                self.metrics.event_latency.labels(message.trigger_kind).observe(
                    max(0.0, (now_ms - message.trigger_timestamp_ms) / 1000))

    async def _commit(self) -> None:
        """Commit the account partitions' processed offsets to the consumer group."""
        if self._accounts is None:
            return
        assigned = self._accounts.assignment()
        offsets = {tp: offset for tp, offset in self._processed.items()
                   if tp in assigned and self._committed.get(tp) != offset}
        if not offsets:
            return
        try:
            await self._accounts.commit(offsets)
        except KafkaError as exc:  # broker away or a rebalance under way: next batch retries
            self.log.warning("offset commit failed, will retry", error=repr(exc))
            return
        self._committed.update(offsets)

    def processed_offsets(self) -> dict[TopicPartition, int]:
        """Next offset to process per input partition (for tests, the demo and lag)."""
        return dict(self._processed)

    # -- observability --------------------------------------------------------------------------

    def _live_figures(self) -> LiveFigures:
        engine = self.engine
        return LiveFigures(
            accounts=len(engine.accounts),
            positions=engine.positions_held,
            by_state={state.name: engine.accounts_in_state[state] for state in AccountState},
            last_tick_wall=dict(self._last_tick_wall),
            last_checkpoint_wall=None,
        )
