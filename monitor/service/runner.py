"""`liqmon run`: the engine on Kafka (SPEC §6).

A group consumer reads fills and ledger (the group spreads account partitions over instances);
a group-less consumer reads every partition of prices (each instance needs every price). Both
feed a time-ordered merge, whose output is applied record by record exactly as `liqmon replay`
does. A batch's events and dead letters are produced with acks=all; then, every few seconds, a
checkpoint of the changed accounts and of the input offsets goes to the compacted changelog.
On start, and whenever the group hands this instance partitions, their accounts are restored
from the changelog and their inputs resume right after the checkpointed offsets.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import Sequence
from typing import Any

import structlog
from aiokafka import (
    AIOKafkaConsumer,
    AIOKafkaProducer,
    ConsumerRebalanceListener,
    ConsumerRecord,
    TopicPartition,
)
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.coordinator.assignors.range import RangePartitionAssignor
from aiokafka.errors import KafkaError

from monitor.account import RiskKey, account_of
from monitor.book import warm_up
from monitor.config import RiskConfig, fingerprint
from monitor.engine import Engine
from monitor.events import Event, Source
from monitor.records import InputRecord, PriceTick, Rejected, decode_batch
from monitor.service.changelog import (
    ConfigChanged,
    RestoredPartition,
    RestoreProgress,
    control_message,
    controls_now,
    read_changelog,
    snapshot_messages,
    write_reset_markers,
)
from monitor.service.delivery import MAX_BACKOFF, Delivery, DeliveryAbandoned, Pipeline
from monitor.service.merge import TimestampMerge
from monitor.service.metrics import LiveFigures, Metrics
from monitor.service.outbox import Outgoing, dead_letter_message, event_message
from monitor.service.security import refusal
from monitor.service.settings import CLOSE_TIMEOUT, ServiceSettings
from monitor.service.topics import TopicMissing, ensure_topics, output_topics
from monitor.snapshot import Offsets
from monitor.state import EVENT_TYPES, AccountState

PROBE_INTERVAL = 1.0  # seconds between broker reachability probes
OUTAGE_REMINDER = 30.0  # seconds between "still unreachable" log lines
TICK = 0.2  # the loop wakes at least this often (merge wait limit, checkpoint timer)
# Kafka answers a fetch as soon as data arrives, so this only paces idle polling; some brokers
# (the embedded one) hold a long-poll to its end, and every ms of it is a ms of latency.
FETCH_MAX_WAIT_MS = 5
# Records buffered per partition beyond which it is paused until the merge drains it: a backlog
# on one partition waiting for another's records must not grow without bound.
MAX_BUFFERED = 20_000
PROBE_RETRY = 0.05  # seconds before a failed watermark probe is tried again
RESTORE_REPORT_INTERVAL = 5.0  # seconds between "restoring" log lines
CHECKPOINT_CHUNK = 256  # snapshots encoded between two turns of the loop


class _StopRequested(Exception):
    """A stop was requested while partitions were being restored: they are not taken."""


class Monitor:
    def __init__(self, settings: ServiceSettings, config: RiskConfig,
                 metrics: Metrics | None = None) -> None:
        self.settings = settings
        self.config = config
        self.engine = Engine(config)
        self.metrics = metrics or Metrics()
        self.metrics.watch(self._live_figures)
        self.fingerprint = fingerprint(config)
        self.metrics.config_info.labels(self.fingerprint).set(1)
        topics = settings.topics
        for topic in (topics.prices, topics.fills, topics.ledger):  # export zeros from the start
            self.metrics.records_consumed.labels(topic)
        for event_type in EVENT_TYPES:
            self.metrics.events_emitted.labels(event_type)
        self.log = structlog.get_logger("liqmon")
        self.ready = asyncio.Event()  # see _update_ready
        self._consuming = False
        self._restoring = False
        self._warming_up = True  # loading (first start: compiling) the engine's kernels
        self.restore_status: RestoreProgress | None = None  # of the restore under way
        self._restore_started = 0.0
        self.restore_seconds: float | None = None  # how long the last restore took
        self._restore_said = 0.0  # when the last "restoring" line was logged
        self._reachable = True  # as the broker watch last found it
        self.partition_counts: dict[str, int] = {}
        self._rank = {topics.ledger: 0, topics.fills: 1, topics.prices: 2}.__getitem__
        self._merge = TimestampMerge(rank=self._rank, max_skew_ms=settings.max_skew_ms,
                                     max_wait=settings.max_idle)
        self._forced_reported = 0
        self._unlogged: list[tuple[Event, TopicPartition, int]] = []  # events to log
        self._checkpointing: asyncio.Task[None] | None = None  # a checkpoint being written
        self._frontier: tuple[int, int, int, int] | None = None  # merge key last applied
        self._lock = asyncio.Lock()  # one batch, checkpoint or rebalance step at a time
        self._stopping = asyncio.Event()
        self._stop_requested_at: float | None = None
        self._fatal: BaseException | None = None
        self._restored = asyncio.Event()  # the first assignment has been restored
        self._closing = False
        self._owned: set[int] = set()  # account partitions restored and being processed
        self._processed: dict[TopicPartition, int] = {}  # next offset to apply, per partition
        self._delivered: dict[TopicPartition, int] = {}  # next offset whose events are acked
        self._paused: set[TopicPartition] = set()
        self._touched: dict[str, int] = {}  # account -> partition, since the last checkpoint
        self._seq = 0
        self._since_checkpoint = 0  # records applied since the last checkpoint
        self._last_checkpoint = time.monotonic()
        self._last_tick_wall: dict[str, float] = {}
        self._producer: AIOKafkaProducer | None = None
        self._delivery: Delivery | None = None
        self._pipeline: Pipeline | None = None
        self._prices: AIOKafkaConsumer | None = None
        self._accounts: AIOKafkaConsumer | None = None
        self._probe: AIOKafkaConsumer | None = None  # end offsets for watermarks, own socket
        self._probe_wanted = asyncio.Event()
        self._wake = asyncio.Event()  # a probe answered: the merge may release more

    # -- lifecycle ------------------------------------------------------------------------------

    def request_stop(self) -> None:
        if not self._stopping.is_set():
            self.log.info("stopping")
            self._stop_requested_at = time.monotonic()
            self._stopping.set()
            self._update_ready()

    def fail(self, exc: BaseException) -> None:
        """Stop on a fatal error raised outside the loop (in a callback such as the rebalance
        listener or the broker probe) and let run() raise it. Nothing is checkpointed from
        here on: what was processed is re-processed after a restart."""
        if self._fatal is None:
            self._fatal = exc
        if self._pipeline is not None:
            self._pipeline.abort(exc)
        self.request_stop()

    async def run(self) -> None:
        """Connect, restore, consume until asked to stop, then deliver, checkpoint and close;
        raise what stopped it, if anything did (after logging it)."""
        try:
            await self._run()
        except Exception as exc:
            if self._fatal is None:
                self._fatal = exc
        if self._fatal is not None:
            abandoned = isinstance(self._fatal, DeliveryAbandoned)
            self.log.error("shutdown abandoned" if abandoned else "stopped by an error",
                           error=str(self._fatal), kind=type(self._fatal).__name__)
            raise self._fatal

    async def _run(self) -> None:
        try:
            # compiled once per install (seconds), loaded from numba's cache after that; in a
            # thread so that /healthz answers meanwhile
            seconds = await asyncio.to_thread(warm_up)
            self._warming_up = False
            self.log.info("kernels ready", seconds=round(seconds, 3))
            await self._connect()
            if not self._stopping.is_set():
                await self._until_restored()
            if not self._stopping.is_set():
                self._consuming = True
                self._update_ready()
                self.log.info("consuming", bootstrap=self.settings.bootstrap,
                              group=self.settings.group, partitions=sorted(self._owned))
                watchdog = asyncio.create_task(self._watch_broker())
                try:
                    await self._within_shutdown_timeout(asyncio.ensure_future(self._consume()))
                finally:
                    self._closing = True  # the final checkpoint is written (or abandoned)
                    watchdog.cancel()
                    await asyncio.gather(watchdog, return_exceptions=True)
        finally:
            self._consuming = False
            self._update_ready()
            await self._close()

    async def _within_shutdown_timeout(self, work: asyncio.Future[None]) -> None:
        """Await ``work``; once a stop is requested, give it --shutdown-timeout from the
        request, then cancel it: the grace period of a deployment must not run out first."""
        stopping = asyncio.ensure_future(self._stopping.wait())
        try:
            waiters: list[asyncio.Future[Any]] = [work, stopping]
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
            if not work.done():
                assert self._stop_requested_at is not None
                left = self._stop_requested_at + self.settings.shutdown_timeout - time.monotonic()
                await asyncio.wait([work], timeout=max(0.0, left))
        finally:
            stopping.cancel()
            if not work.done():  # out of time (or this task itself was cancelled)
                work.cancel()
                await asyncio.gather(work, return_exceptions=True)
        if work.cancelled():
            pending = 0 if self._pipeline is None else self._pipeline.in_flight
            raise DeliveryAbandoned(
                f"the stop did not finish within {self.settings.shutdown_timeout}s "
                f"(--shutdown-timeout): {pending} messages not acknowledged, partitions "
                f"{sorted(self._owned)} not checkpointed; their inputs are re-processed on "
                "restart")
        work.result()

    def _restore_progress(self, status: RestoreProgress) -> None:
        """A large restore says how far it has got: in /readyz, and a log line every few
        seconds (so an operator is not left guessing for minutes)."""
        self.restore_status = status
        now = time.monotonic()
        if now - self._restore_said >= RESTORE_REPORT_INTERVAL:
            self._restore_said = now
            self.log.info("restoring", records=status.records, expected_records=status.expected,
                          accounts=status.accounts,
                          seconds=round(now - self._restore_started, 1))

    def not_ready_because(self) -> str:
        """Why /readyz says 503, in words an operator can act on."""
        if self._stopping.is_set():
            return "stopping"
        if self._restoring:
            status = self.restore_status
            if status is None:
                return "restoring state"
            return (f"restoring state: {status.records:,} of at most {status.expected:,} "
                    f"changelog records read, {status.accounts:,} accounts")
        if self._warming_up:
            return "loading the engine's compiled kernels (the first start compiles them)"
        if not self._consuming:
            return "connecting to kafka"
        if not self._reachable:
            return "kafka does not answer"
        return ""

    def _update_ready(self) -> None:
        """/readyz: restored, consuming, and the broker answers (SPEC §8); not once stopping."""
        ready = (self._consuming and self._reachable and not self._restoring
                 and not self._stopping.is_set())
        if ready:
            self.ready.set()
        else:
            self.ready.clear()
        self.metrics.ready.set(1 if ready else 0)

    async def _until_restored(self) -> None:
        stopping = asyncio.ensure_future(self._stopping.wait())
        restored = asyncio.ensure_future(self._restored.wait())
        await asyncio.wait([stopping, restored], return_when=asyncio.FIRST_COMPLETED)
        for waiter in (stopping, restored):
            waiter.cancel()

    async def _connect(self) -> None:
        """Wait for the broker (with backoff), create missing topics, start the clients."""
        s = self.settings
        kafka = s.security.client_kwargs()  # TLS and SASL, the same for every client
        backoff = 0.2
        said: tuple[str, float] | None = None  # the refusal last logged, and when
        while not self._stopping.is_set():
            admin = AIOKafkaAdminClient(bootstrap_servers=s.bootstrap, client_id=s.client_id,
                                        request_timeout_ms=s.request_timeout_ms, **kafka)
            try:
                await admin.start()
                self.partition_counts = await ensure_topics(admin, s)
                break
            except KafkaError as exc:
                # A refusal (TLS, SASL) is said once, then as often as an outage is, not on
                # every retry; still retried: the broker's certificate or user may get fixed.
                cause = await refusal(s.bootstrap, s.security, s.request_timeout_ms)
                if cause is None:
                    self.log.warning("kafka unreachable, retrying", bootstrap=s.bootstrap,
                                     error=repr(exc), retry_in=round(backoff, 2))
                elif said is None or said[0] != cause or \
                        time.monotonic() - said[1] >= OUTAGE_REMINDER:
                    self.log.error("kafka refused the connection, retrying",
                                   bootstrap=s.bootstrap, cause=cause)
                    said = (cause, time.monotonic())
            finally:
                await admin.close()
            await self._sleep_unless_stopping(backoff)
            backoff = min(backoff * 2, MAX_BACKOFF)
        if self._stopping.is_set():
            return
        self._producer = AIOKafkaProducer(
            bootstrap_servers=s.bootstrap, client_id=s.client_id, acks="all",
            compression_type=None if s.compression == "none" else s.compression,
            linger_ms=2, max_batch_size=256 * 1024, max_request_size=8 * 1024 * 1024,
            request_timeout_ms=s.request_timeout_ms, **kafka,
        )
        await self._producer.start()
        self._delivery = Delivery(self._producer, self.metrics, self.log, s.shutdown_timeout,
                                  lambda: self._stop_requested_at)
        self._pipeline = Pipeline(self._delivery, self._mark_delivered)
        self._pipeline.start()
        if s.reset_state:
            partitions = range(self.partition_counts[s.topics.state])
            await write_reset_markers(self._producer, s.topics.state, partitions)
            self.log.warning("checkpoints discarded (--reset-state): state is rebuilt from the "
                             "input topics", topic=s.topics.state, start=s.start)
        common: dict[str, Any] = {
            "bootstrap_servers": s.bootstrap, "client_id": s.client_id,
            "enable_auto_commit": False, "auto_offset_reset": s.start,
            "request_timeout_ms": max(s.request_timeout_ms, s.session_timeout_ms + 1000),
            "max_partition_fetch_bytes": 4 * 1024 * 1024,
            "fetch_max_wait_ms": FETCH_MAX_WAIT_MS, **kafka,
        }
        self._prices = AIOKafkaConsumer(group_id=None, **common)
        await self._prices.start()
        # Its own connection: a broker answers one request per connection at a time, so a
        # probe queued behind a fetch's long-poll would wait for it.
        self._probe = AIOKafkaConsumer(**{**common, "client_id": f"{s.client_id}-watermarks"},
                                       group_id=None)
        await self._probe.start()
        self._accounts = AIOKafkaConsumer(
            group_id=s.group, session_timeout_ms=s.session_timeout_ms,
            # Range gives fills p and ledger p to the same instance (co-partitioning); the
            # default round-robin would split an account's fills from its ledger.
            partition_assignment_strategy=(RangePartitionAssignor,),
            heartbeat_interval_ms=s.heartbeat_interval_ms,
            rebalance_timeout_ms=s.session_timeout_ms, **common,
        )
        await self._accounts.start()
        self._accounts.subscribe([s.topics.fills, s.topics.ledger],
                                 listener=_Rebalance(self))

    async def _close(self) -> None:
        """Close every client, together, for at most CLOSE_TIMEOUT seconds: against an
        unreachable broker a consumer leaving its group or a producer flushing would wait
        for as long as the broker stays away."""
        self._closing = True
        if self._checkpointing is not None:  # cut short by a failure or the shutdown timeout
            self._checkpointing.cancel()
            await asyncio.gather(self._checkpointing, return_exceptions=True)
        if self._pipeline is not None:
            await self._pipeline.close()
        clients = [c for c in (self._prices, self._accounts, self._probe, self._producer)
                   if c is not None]
        closing = asyncio.gather(*(c.stop() for c in clients), return_exceptions=True)
        try:
            await asyncio.wait_for(closing, timeout=CLOSE_TIMEOUT)
        except TimeoutError:
            self.log.warning("kafka clients abandoned: not closed in time",
                             seconds=CLOSE_TIMEOUT)

    async def _sleep_unless_stopping(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), timeout=seconds)

    # -- rebalance: restore what is gained, checkpoint what is lost ------------------------------

    async def on_assigned(self, assigned: set[TopicPartition]) -> None:
        if self._stopping.is_set():
            return  # stopping: take nothing new (no restore, no catch-up, no event)
        t = self.settings.topics
        fills = {tp.partition for tp in assigned if tp.topic == t.fills}
        ledger = {tp.partition for tp in assigned if tp.topic == t.ledger}
        if fills != ledger:
            raise RuntimeError(
                f"the group assigned fills partitions {sorted(fills)} but ledger partitions "
                f"{sorted(ledger)}: every instance of group {self.settings.group!r} must use "
                "the range assignor so that an account's fills and ledger stay together"
            )
        gained = sorted(fills - self._owned)
        if not gained and self._restored.is_set():
            return
        async with self._lock:
            if self._stopping.is_set():  # requested while waiting for the lock
                return
            await self._finish_checkpoint()
            started = time.monotonic()
            self._restoring = True
            self.restore_status = None
            self._update_ready()
            try:
                s = self.settings
                self._restore_started = started
                restored = await read_changelog(s.bootstrap, s.topics.state, gained,
                                                client_id=f"{s.client_id}-restore",
                                                request_timeout_ms=s.request_timeout_ms,
                                                progress=self._restore_progress,
                                                security=s.security)
                self._check_config(restored)
                first = not self._restored.is_set()
                if first:
                    await self._restore_prices(list(restored.values()))
                accounts = replayed = 0
                for partition in gained:
                    if self._stopping.is_set():
                        raise _StopRequested
                    if not first and self._behind_on_prices(restored[partition]):
                        replayed += await self._catch_up(restored[partition])
                    else:
                        await self._install(restored[partition])
                    self._owned.add(partition)
                    accounts += len(restored[partition].snapshots)
                # File the restored accounts in the band index before saying ready, or the
                # first record after it would wait for that (~1.7 s per million accounts).
                self.engine.index_restored()
            except _StopRequested:
                self.log.info("restore abandoned: stopping",
                              partitions=sorted(set(gained) - self._owned))
                return
            finally:
                self._restoring = False
                self._update_ready()
            self._restored.set()
            self.restore_seconds = time.monotonic() - started
            await self._report_lag([tp for tp in self._processed
                                    if tp.partition in gained or tp.topic == t.prices])
            self.log.info("restored", partitions=gained, accounts=accounts,
                          changelog_records=sum(r.records_read for r in restored.values()),
                          records_replayed=replayed,
                          seconds=round(time.monotonic() - started, 3))

    async def on_revoked(self, revoked: set[TopicPartition]) -> None:
        lost = {tp.partition for tp in revoked} & self._owned
        if not lost or self._closing:
            return
        async with self._lock:
            if self._closing:  # the final checkpoint, written meanwhile, covers them
                return
            await self._finish_checkpoint()
            try:
                await self._checkpoint(lost)
            except KafkaError as exc:
                # The new owner restores the previous checkpoint and re-reads from there.
                self.log.error("checkpoint before handing partitions over failed",
                               partitions=sorted(lost), error=repr(exc))
            t = self.settings.topics
            for partition in lost:
                dropped = self.engine.drop_partition(partition)
                tps = [TopicPartition(t.fills, partition), TopicPartition(t.ledger, partition)]
                self._merge.drop(tps)
                for tp in tps:
                    self._processed.pop(tp, None)
                    self._delivered.pop(tp, None)
                    self._paused.discard(tp)
                    for gauge in (self.metrics.input_offset, self.metrics.consumer_lag):
                        with contextlib.suppress(KeyError):
                            gauge.remove(tp.topic, str(tp.partition))
                self.log.info("partition handed over", partition=partition, accounts=dropped)
            self._owned -= lost

    async def _report_lag(self, tps: list[TopicPartition]) -> None:
        """Lag of partitions just (re)positioned. Until records of theirs are applied nothing
        else sets it, and a rebalance removes the series of every partition it revokes, even
        of those it gives straight back."""
        assert self._probe is not None
        try:
            ends = await self._probe.end_offsets(tps)
        except KafkaError:
            return  # the first records applied set it
        for tp, end in ends.items():
            if tp in self._processed:
                self._set_lag(tp, end)

    def _check_config(self, restored: dict[int, RestoredPartition]) -> None:
        """Refuse state checkpointed under another risk config (another instance of the
        fleet runs it, or the config changed), unless the operator said the change is meant:
        its events would differ from the ones already published for the same records."""
        for partition, part in sorted(restored.items()):
            theirs = None if part.control is None else part.control.config
            if theirs is None or theirs == self.fingerprint:
                continue  # no checkpoint yet, or one written before fingerprints existed
            if not self.settings.accept_config_change:
                raise ConfigChanged(self.settings.topics.state, partition, theirs,
                                    self.fingerprint)
            self.log.warning("restoring state checkpointed under another risk config "
                             "(--accept-config-change)", partition=partition,
                             checkpointed=theirs, configured=self.fingerprint)

    async def _restore_prices(self, restored: list[RestoredPartition]) -> None:
        """Price table and price offsets from the control record furthest behind in the
        price stream, so that every restored partition re-reads the ticks it has not seen
        (accounts that have seen them skip them)."""
        assert self._prices is not None
        topic = self.settings.topics.prices
        controls = [r.control for r in restored if r.control is not None]
        oldest = min(controls, key=lambda c: sum(
            offset for (name, _), offset in c.offsets.items() if name == topic),
            default=None)
        if oldest is not None:
            self.engine.load_prices(oldest.prices)
            self._seq = max(c.seq for c in controls)
        tps = [TopicPartition(topic, p) for p in range(self.partition_counts[topic])]
        self._prices.assign(tps)
        for tp in tps:
            offset = None if oldest is None else oldest.offsets.get((topic, tp.partition))
            await self._position(self._prices, tp, offset)

    async def _install(self, restored: RestoredPartition) -> None:
        """Load one partition's accounts and duplicate windows; seek its inputs."""
        assert self._accounts is not None
        t = self.settings.topics
        partition, control = restored.partition, restored.control
        for topic in (t.fills, t.ledger):
            tp = TopicPartition(topic, partition)
            offset = None if control is None else control.offsets.get((topic, partition))
            await self._position(self._accounts, tp, offset)
        self._load_partition(self.engine, restored, self._positions())

    def _positions(self) -> Offsets:
        return {(tp.topic, tp.partition): offset for tp, offset in self._processed.items()}

    def _load_partition(self, engine: Engine, restored: RestoredPartition,
                        positions: Offsets) -> None:
        control = restored.control
        if control is not None:
            for (topic, p), ids in control.dedupe.items():
                engine.load_dedupe_ids(topic, p, ids)
        engine.load_accounts(restored.snapshots,
                             restored.marks(positions, self.settings.topics.prices))

    def _behind_on_prices(self, restored: RestoredPartition) -> bool:
        """Did this partition's last owner checkpoint at an earlier point of the price stream
        than this instance has reached? Then its records must be replayed with the ticks
        in between, as they were the first time."""
        if restored.control is None:
            return True
        prices = self.settings.topics.prices
        return any(restored.control.offsets.get((prices, tp.partition), 0) < offset
                   for tp, offset in self._processed.items() if tp.topic == prices)

    async def _catch_up(self, restored: RestoredPartition) -> int:
        """Bring a gained partition up to where this instance is, in the order a single
        instance would have applied its records.

        A private engine holds the partition's accounts and the price table of its last
        checkpoint; the ticks between that checkpoint and this instance's position are
        merged by timestamp with the partition's own records, up to the last record this
        instance applied. Events come out with the ids the first pass gave them. Then the
        accounts join the main engine and the partition joins the main merge.
        """
        assert self._accounts is not None and self._delivery is not None
        s, t = self.settings, self.settings.topics
        partition, control = restored.partition, restored.control
        price_ends = {tp: offset for tp, offset in self._processed.items()
                      if tp.topic == t.prices}
        own = [TopicPartition(t.fills, partition), TopicPartition(t.ledger, partition)]
        reader = AIOKafkaConsumer(bootstrap_servers=s.bootstrap, group_id=None,
                                  client_id=f"{s.client_id}-catch-up", enable_auto_commit=False,
                                  auto_offset_reset=s.start,
                                  request_timeout_ms=max(s.request_timeout_ms, 10_000),
                                  **s.security.client_kwargs())
        await reader.start()
        private = Engine(self.config)
        # No forced release: every partition still read here holds records up to a known end,
        # so waiting for them is always right; releasing early would apply records in another
        # order than the first pass and publish events with its ids but other contents.
        merge = TimestampMerge(rank=self._rank, max_skew_ms=s.max_skew_ms, max_wait=math.inf)
        positions: dict[TopicPartition, int] = {}
        applied = 0
        try:
            reader.assign([*price_ends, *own])
            for tp in [*price_ends, *own]:
                offset = None if control is None else control.offsets.get(
                    (tp.topic, tp.partition))
                # never checkpointed: every tick since the start of the price stream matters
                start = "earliest" if tp in price_ends else s.start
                positions[tp] = await _seek(reader, tp, offset, start)
                merge.seek(tp, positions[tp])
            if control is not None:
                private.load_prices(control.prices)
            self._load_partition(private, restored,
                                 {(tp.topic, tp.partition): o for tp, o in positions.items()})
            stopped: set[TopicPartition] = set()

            def done_with(tp: TopicPartition, next_offset: int) -> bool:
                if tp in price_ends:
                    return next_offset >= price_ends[tp]
                highwater = reader.highwater(tp)
                return tp in stopped or (highwater is not None and next_offset >= highwater)

            while not all(done_with(tp, positions[tp]) for tp in positions):
                if self._stopping.is_set():
                    raise _StopRequested  # nothing of this partition is taken over
                batch = await reader.getmany(timeout_ms=200, max_records=s.max_batch_records)
                for tp, records in batch.items():
                    if tp in price_ends:
                        merge.add(tp, [r for r in records if r.offset < price_ends[tp]])
                    elif tp not in stopped:
                        merge.add(tp, records)
                active = [tp for tp in positions if not done_with(tp, positions[tp])]
                ready = []
                for tp, record in merge.take(s.max_batch_records, active, done_with):
                    if tp in stopped:
                        continue
                    if tp in own and (self._frontier is None or
                                      self._key(tp, record) > self._frontier):
                        stopped.add(tp)  # from here on the main loop takes over
                        positions[tp] = record.offset
                        merge.drop([tp])
                        continue
                    ready.append((tp, record))
                await self._delivery.deliver(self.apply_batch(ready, private))
                self._log_events()
                for tp, record in ready:
                    positions[tp] = record.offset + 1
                applied += len(ready)
        finally:
            await reader.stop()
        for tp in own:
            self._accounts.seek(tp, positions[tp])
            self._set_position(tp, positions[tp])
        marks = restored.marks(self._positions(), t.prices)
        held: list[RiskKey] = [*private.accounts, *private.units]
        self.engine.load_accounts(private.snapshots(held),
                                  {key: m for key, m in marks.items()
                                   if key in private.accounts or key in private.units})
        for topic in (t.fills, t.ledger):
            self.engine.load_dedupe_ids(topic, partition, private.dedupe_ids(topic, partition))
        changed = private.take_dirty()
        for key in changed:
            self._touched[account_of(key)] = partition
        self.engine.mark_dirty(set(changed))
        return applied

    async def _position(self, consumer: AIOKafkaConsumer, tp: TopicPartition,
                        offset: int | None) -> None:
        """Seek to a checkpointed offset, or apply --start on a first start."""
        self._set_position(tp, await _seek(consumer, tp, offset, self.settings.start))

    def _mark_delivered(self, offsets: dict[TopicPartition, int]) -> None:
        for tp, offset in offsets.items():
            if tp in self._delivered:  # not handed over meanwhile
                self._delivered[tp] = offset

    def _set_position(self, tp: TopicPartition, offset: int) -> None:
        self._processed[tp] = offset
        self._delivered[tp] = offset
        self._merge.seek(tp, offset)
        self.metrics.input_offset.labels(tp.topic, str(tp.partition)).set(offset)

    # -- the loop -------------------------------------------------------------------------------

    async def _consume(self) -> None:
        assert self._prices is not None and self._accounts is not None
        limit = self.settings.max_batch_records
        consumers = (self._prices, self._accounts)
        fetches = {c: asyncio.ensure_future(c.getmany(timeout_ms=500, max_records=limit))
                   for c in consumers}
        stopping = asyncio.ensure_future(self._stopping.wait())
        prober = asyncio.create_task(self._probe_watermarks())
        woken = asyncio.ensure_future(self._wake.wait())
        backlog = False  # the merge released a full batch: more may be ready without a fetch
        try:
            while not self._stopping.is_set():
                await asyncio.wait([*fetches.values(), stopping, woken, prober],
                                   timeout=0 if backlog else TICK,
                                   return_when=asyncio.FIRST_COMPLETED)
                if prober.done():
                    prober.result()  # the prober never returns: raise what killed it
                if woken.done():
                    self._wake.clear()
                    woken = asyncio.ensure_future(self._wake.wait())
                for consumer in consumers:
                    fetch = fetches[consumer]
                    if not fetch.done() or self._stopping.is_set():
                        continue
                    fetches[consumer] = asyncio.ensure_future(
                        consumer.getmany(timeout_ms=500, max_records=limit))
                    try:
                        batch = fetch.result()
                    except KafkaError as exc:
                        self.log.warning("fetch failed, retrying", error=repr(exc))
                        continue
                    for tp, records in batch.items():
                        if tp in self._processed:  # still ours (a rebalance may intervene)
                            self._merge.add(tp, records)
                async with self._lock:
                    backlog = await self._process_ready(limit) >= limit
                if self._checkpointing is not None and self._checkpointing.done():
                    checkpointed, self._checkpointing = self._checkpointing, None
                    checkpointed.result()  # raise what made it fail
                if self._checkpointing is None and self._checkpoint_due():
                    self._checkpointing = asyncio.create_task(
                        self._checkpoint(set(self._owned)))
                self._pace_fetching()
                if self._merge.to_probe():
                    self._probe_wanted.set()
        finally:
            for task in (*fetches.values(), stopping, woken, prober):
                task.cancel()
            await asyncio.gather(*fetches.values(), stopping, woken, prober,
                                 return_exceptions=True)
        async with self._lock:  # finish: what was applied is delivered; checkpoint it
            await self._finish_checkpoint()
            await self._checkpoint(self._owned)
        self.log.info("stopped", checkpoint=self._seq,
                      offsets={f"{tp.topic}/{tp.partition}": o
                               for tp, o in sorted(self._processed.items())})

    async def _probe_watermarks(self) -> None:
        """Ask for the end offsets of the partitions that hold the merge back, each time
        after the held record arrived and after its timestamp + max_skew_ms, so that a silent
        partition stops holding the others back one round trip later (see merge.py)."""
        assert self._probe is not None
        while True:
            needs = self._merge.head_needs
            if needs is None or not self._merge.to_probe():
                await self._probe_wanted.wait()
                self._probe_wanted.clear()
                continue
            early = (needs - time.time() * 1000) / 1000
            if early > 0:  # a probe sent sooner proves nothing about this record
                await asyncio.sleep(min(early, self.settings.max_idle))
            tps = self._merge.to_probe()
            if not tps:
                continue
            sent_at_ms = time.time() * 1000
            try:
                ends = await self._probe.end_offsets(tps)
            except KafkaError as exc:
                self.log.debug("watermark probe failed", error=repr(exc))
                await asyncio.sleep(PROBE_RETRY)
                continue
            self._merge.probed(sent_at_ms, ends)
            self._wake.set()
            if len(ends) < len(tps):  # the broker left some out: do not hammer it
                await asyncio.sleep(PROBE_RETRY)

    def _pace_fetching(self) -> None:
        """Pause partitions whose buffer is full (the merge waits on another one), resume
        them once drained: memory stays bounded however far one input runs ahead."""
        for tp in list(self._processed):
            buffered = self._merge.buffered(tp)
            if tp not in self._paused and buffered >= MAX_BUFFERED:
                self._consumer_of(tp).pause(tp)
                self._paused.add(tp)
            elif tp in self._paused and buffered < MAX_BUFFERED // 2:
                self._consumer_of(tp).resume(tp)
                self._paused.discard(tp)

    async def _process_ready(self, limit: int) -> int:
        """Apply what the merge releases and hand its output to the pipeline (which gets
        it acknowledged behind the loop); how many records."""
        assert self._pipeline is not None
        batch = self._merge.take(limit, list(self._processed))
        if self._merge.forced > self._forced_reported:
            self.metrics.merge_forced.inc(self._merge.forced - self._forced_reported)
            self.log.warning("released records out of proven order", records=self._merge.forced
                             - self._forced_reported, waited_seconds=self._merge.max_wait,
                             blocked_on=[f"{tp.topic}/{tp.partition}"
                                         for tp in self._merge.blocked_on])
            self._forced_reported = self._merge.forced
        if not batch:
            return 0
        outgoing = self.apply_batch(batch, self.engine, self.settings.conflate_ticks)
        advanced: dict[TopicPartition, int] = {}
        for tp, record in batch:
            advanced[tp] = record.offset + 1
        await self._pipeline.submit(outgoing, advanced)
        self._log_events()  # after the produce: a cascade's log lines never delay its events
        self._frontier = self._key(*batch[-1])
        self._processed.update(advanced)
        self._since_checkpoint += len(batch)
        self._update_lag(set(advanced))
        self.engine.release_caught_up(self._positions())
        return len(batch)

    def _key(self, tp: TopicPartition, record: ConsumerRecord) -> tuple[int, int, int, int]:
        """The time-ordered merge's sort key of a record."""
        return (record.timestamp, self._rank(tp.topic), tp.partition, record.offset)

    def _consumer_of(self, tp: TopicPartition) -> AIOKafkaConsumer:
        consumer = self._prices if tp.topic == self.settings.topics.prices else self._accounts
        assert consumer is not None
        return consumer

    def _update_lag(self, tps: set[TopicPartition]) -> None:
        for tp in tps:
            self.metrics.input_offset.labels(tp.topic, str(tp.partition)).set(
                self._processed[tp])
            highwater = self._consumer_of(tp).highwater(tp)
            if highwater is not None:
                self._set_lag(tp, highwater)

    def _set_lag(self, tp: TopicPartition, end: int) -> None:
        self.metrics.consumer_lag.labels(tp.topic, str(tp.partition)).set(
            max(0, end - self._processed[tp]))

    def _log_events(self) -> None:
        """One info line per event (SPEC §8), for the events of the batch just produced."""
        for event, tp, offset in self._unlogged:
            self.log.info("event", event_id=event.event_id, type=event.type,
                          account=event.account, topic=tp.topic, partition=tp.partition,
                          offset=offset, margin_ratio=event.payload["margin_ratio"])
        self._unlogged.clear()

    def apply_batch(self, batch: Sequence[tuple[TopicPartition, ConsumerRecord]],
                    engine: Engine, conflate: bool = False) -> list[Outgoing]:
        """Decode and apply records in order; return their events and dead letters.

        With ``conflate`` (--conflate-ticks), a tick is skipped when a later tick of the same
        symbol is in the same batch: only the latest price per symbol is applied, at its own
        place in the batch.
        """
        config, topics, metrics = self.config, self.settings.topics, self.metrics
        stats = engine.stats
        before = (stats.stale_ticks, stats.unused_ticks, stats.duplicates)
        out: list[Outgoing] = []
        consumed: dict[str, int] = {}
        not_after_ms = int(time.time() * 1000 + self.settings.max_future * 1000)
        kind_of = topics.input_kinds()
        kinds = []
        for tp, _ in batch:
            consumed[tp.topic] = consumed.get(tp.topic, 0) + 1
            kinds.append(kind_of[tp.topic])
        decoded = decode_batch(kinds, [message.value for _, message in batch], config,
                               not_after_ms=not_after_ms)
        superseded = _superseded_ticks(decoded) if conflate else set()
        if superseded:
            metrics.conflated_ticks.inc(len(superseded))
        for index, ((tp, message), record) in enumerate(zip(batch, decoded, strict=True)):
            if index in superseded:
                continue
            if not isinstance(record, Rejected):
                if not isinstance(record, PriceTick):
                    self._touched[record.account] = tp.partition
                applied_ticks = stats.applied_ticks
                try:
                    events = engine.apply(record, Source(tp.topic, tp.partition,
                                                         message.offset))
                except Rejected as rejection:  # what only state makes bad input
                    record = rejection
            if isinstance(record, Rejected):
                out.append(dead_letter_message(record, tp.topic, tp.partition,
                                               message.offset, message.key, message.value,
                                               topics))
                metrics.records_rejected.labels(tp.topic, record.reason).inc()
                self.log.warning("rejected", topic=tp.topic, partition=tp.partition,
                                 offset=message.offset, reason=record.reason,
                                 detail=record.detail)
                continue
            if isinstance(record, PriceTick) and stats.applied_ticks != applied_ticks:
                self._last_tick_wall[record.symbol] = time.time()
            for event in events:
                out.append(event_message(event, topics, message.timestamp))
                self._unlogged.append((event, tp, message.offset))
        for topic, count in consumed.items():
            metrics.records_consumed.labels(topic).inc(count)
        stale, unused, duplicates = before
        metrics.stale_ticks.inc(stats.stale_ticks - stale)
        metrics.unused_ticks.inc(stats.unused_ticks - unused)
        metrics.duplicates.inc(stats.duplicates - duplicates)
        return out

    # -- checkpoints ----------------------------------------------------------------------------

    def _checkpoint_due(self) -> bool:
        if self._since_checkpoint >= self.settings.checkpoint_records:
            return True
        elapsed = time.monotonic() - self._last_checkpoint
        return self._since_checkpoint > 0 and elapsed >= self.settings.checkpoint_interval

    async def _checkpoint(self, partitions: set[int]) -> None:
        """Write the changed accounts of these partitions, then their control records.

        What the control records vouch for — offsets, price table, duplicate windows — is
        captured at once; the snapshots are then encoded and produced a chunk at a time, so
        that the loop goes on applying records in between (run as a task it never blocks).
        A chunk is stamped with the offsets its state reflects when it is encoded, and is
        produced only once the events of those inputs are acknowledged; the control records
        go last. So nothing in the changelog runs ahead of what was published: at-least-once,
        never lossy (an account snapshot newer than its control record skips the re-read
        inputs it already reflects).
        """
        if not partitions or self._delivery is None:
            return
        assert self._pipeline is not None
        started = time.monotonic()
        t = self.settings.topics
        taken = self.engine.take_dirty()
        as_of = self._as_of(partitions)
        seq = self._seq + 1
        controls = controls_now(self.engine, seq, as_of, t, int(time.time() * 1000),
                                self.fingerprint)
        vouched = self._pipeline.mark()
        if partitions >= self._owned:
            self._since_checkpoint = 0
            self._last_checkpoint = time.monotonic()
        mine: dict[RiskKey, int] = {}
        written: set[tuple[int, int]] = set()  # (partition, layout id) written this time
        try:
            # Which of them this checkpoint writes, found a chunk at a time too: all at once,
            # 100,000 held the loop ~0.1 s. (A hand-over waits for this checkpoint, so no
            # partition changes owner meanwhile.)
            others: set[RiskKey] = set()
            for n, key in enumerate(taken, 1):
                partition = self.engine.partition_of(key)
                if partition is None:  # deleted since: its tombstone goes where it lived
                    partition = self._touched.get(account_of(key))
                if partition in partitions:
                    mine[key] = partition
                else:
                    others.add(key)
                if n % CHECKPOINT_CHUNK == 0:
                    await asyncio.sleep(0)
            self.engine.mark_dirty(others)
            ids = list(mine)
            for start in range(0, len(ids), CHECKPOINT_CHUNK):
                # handed over meanwhile: the checkpoint before the hand-over wrote it
                chunk = {a: mine[a] for a in ids[start:start + CHECKPOINT_CHUNK]
                         if mine[a] in self._owned}
                layouts, snapshots = snapshot_messages(
                    self.engine, chunk, seq, self._as_of(set(chunk.values())), t, written)
                await self._pipeline.flush()  # the events of what these snapshots reflect
                if layouts:  # acknowledged first: no snapshot is ever without its layout
                    await self._delivery.deliver(layouts)
                await self._delivery.deliver(snapshots)
            await self._pipeline.settled(vouched)
            for partition, control in controls.items():
                # One at a time: with ~20,000 window ids each, encoding them and having the
                # producer compress them together (lz4 at level 9, on the loop) held the
                # loop ~50 ms at once.
                await self._delivery.deliver([control_message(partition, control, t)])
        except BaseException:
            self.engine.mark_dirty(taken)
            raise
        self._seq = seq
        for key in mine:
            self._touched.pop(account_of(key), None)
        self.metrics.checkpoint_duration.observe(time.monotonic() - started)
        self.metrics.last_checkpoint.set(time.time())
        await self._commit({TopicPartition(topic, p): offset
                            for p, offsets in as_of.items()
                            for (topic, _), offset in offsets.items() if topic != t.prices})

    async def _finish_checkpoint(self) -> None:
        """Wait for the checkpoint being written (a rebalance or a stop needs the state
        it took out of the dirty set written, or back in it)."""
        if self._checkpointing is not None:
            checkpointing, self._checkpointing = self._checkpointing, None
            await checkpointing

    def _as_of(self, partitions: set[int]) -> dict[int, Offsets]:
        """Per account partition: the input offsets its state reflects now (its own fills and
        ledger, and every price partition)."""
        t = self.settings.topics
        prices = {(tp.topic, tp.partition): offset for tp, offset in self._processed.items()
                  if tp.topic == t.prices}
        as_of: dict[int, Offsets] = {}
        for partition in partitions:
            offsets = dict(prices)
            for topic in (t.fills, t.ledger):
                tp = TopicPartition(topic, partition)
                if tp in self._processed:
                    offsets[(topic, partition)] = self._processed[tp]
            as_of[partition] = offsets
        return as_of

    async def _commit(self, offsets: dict[TopicPartition, int]) -> None:
        """Mirror checkpointed offsets into the consumer group, for lag tooling. The
        changelog, not the group, is where a restart resumes from."""
        if self._accounts is None:
            return
        assigned = self._accounts.assignment()
        offsets = {tp: o for tp, o in offsets.items() if tp in assigned}
        if not offsets:
            return
        try:
            await self._accounts.commit(offsets)
        except KafkaError as exc:  # broker away or a rebalance under way: the next one retries
            self.log.warning("offset commit failed, will retry", error=repr(exc))

    # -- broker reachability --------------------------------------------------------------------

    async def _watch_broker(self) -> None:
        """Say plainly when Kafka is out of reach and when it is back (and make /readyz
        say so too), and stop when an output topic has disappeared.

        The clients retry on their own and an idle consumer looks the same whether the broker
        is there or not, so a cheap metadata request each second tells the two apart.
        """
        assert self._producer is not None
        client = self._producer.client
        outputs = output_topics(self.settings)
        lost_at: float | None = None
        last_said = 0.0
        while True:
            await asyncio.sleep(PROBE_INTERVAL)
            present: set[str] | None = None
            try:
                cluster = await asyncio.wait_for(client.fetch_all_metadata(),
                                                 timeout=PROBE_INTERVAL * 2)
                present, error = cluster.topics(), None
            except (KafkaError, TimeoutError, OSError) as exc:
                error = exc
            reachable = present is not None
            now = time.monotonic()
            self.metrics.kafka_reachable.set(1 if reachable else 0)
            self._reachable = reachable
            self._update_ready()
            # Some brokers acknowledge produce requests to a deleted topic and keep nothing.
            missing = [name for name in outputs if present is not None and name not in present]
            if missing:
                self.fail(TopicMissing(missing[0]))
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

    # -- observability --------------------------------------------------------------------------

    def processed_offsets(self) -> dict[TopicPartition, int]:
        """Next offset per input partition whose events are all acknowledged (for tests,
        the demo and bench)."""
        return dict(self._delivered)

    def _live_figures(self) -> LiveFigures:
        engine = self.engine
        pending = self._since_checkpoint > 0
        return LiveFigures(
            accounts=len(engine.accounts),
            positions=engine.positions_held,
            by_state={state.name: engine.accounts_in_state[state] for state in AccountState},
            isolated_by_state={state.name: engine.units_in_state[state]
                               for state in AccountState},
            last_tick_wall=dict(self._last_tick_wall),
            checkpoint_age=time.monotonic() - self._last_checkpoint if pending else 0.0,
        )


async def _seek(consumer: AIOKafkaConsumer, tp: TopicPartition, offset: int | None,
                start: str) -> int:
    """Position a partition at a checkpointed offset, or where ``start`` says; the position."""
    if offset is not None:
        consumer.seek(tp, offset)
    elif start == "earliest":
        await consumer.seek_to_beginning(tp)
    else:
        await consumer.seek_to_end(tp)
    return await consumer.position(tp)


def _superseded_ticks(records: Sequence[InputRecord | Rejected]) -> set[int]:
    """Indexes of ticks followed, later in the same batch, by a tick of the same symbol."""
    latest: dict[str, int] = {}
    for index, record in enumerate(records):
        if isinstance(record, PriceTick):
            latest[record.symbol] = index
    return {index for index, record in enumerate(records)
            if isinstance(record, PriceTick) and latest[record.symbol] != index}


class _Rebalance(ConsumerRebalanceListener):
    """Called by the group consumer around rebalances; failures stop the monitor loudly."""

    def __init__(self, monitor: Monitor) -> None:
        self.monitor = monitor

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        try:
            await self.monitor.on_revoked(set(revoked))
        except Exception as exc:
            self.monitor.fail(exc)

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        try:
            await self.monitor.on_assigned(set(assigned))
        except Exception as exc:
            self.monitor.fail(exc)
