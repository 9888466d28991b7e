"""`liqmon run`: the engine on Kafka (SPEC §6).

A group consumer reads fills and ledger (the group spreads account partitions over instances);
a group-less consumer reads every partition of prices (each instance needs every price). Both
feed a time-ordered merge, whose output is applied record by record exactly as `liqmon replay`
does. A batch's events and dead letters are produced with acks=all; then, every few seconds, a
checkpoint of the changed accounts and of the input offsets goes to the compacted changelog.
On start, and whenever the group hands this instance partitions, their accounts are restored
from the changelog and their inputs resume right after the checkpointed offsets.

`Monitor` is the lifecycle (connect, restore, consume, stop), the processing loop and the
rebalance steps, one at a time under its lock. It hands the parts to: `Clients` (clients.py,
every Kafka client), `Positions` (positions.py, where it stands in its inputs), `Restorer`
(restorer.py), `Checkpointer` (checkpointer.py), `WatermarkProber` and `BrokerWatch`
(probe.py).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import math
import threading
import time
from collections import Counter
from collections.abc import Callable, Coroutine, Hashable, Iterable, Sequence
from typing import Any, cast

import structlog
from aiokafka import (
    AIOKafkaConsumer,
    AIOKafkaProducer,
    ConsumerRebalanceListener,
    ConsumerRecord,
    TopicPartition,
)
from aiokafka.errors import KafkaError

from monitor.book import warm_up
from monitor.compiled import CACHE_PLACE, compiling
from monitor.config import RiskConfig, fingerprint
from monitor.engine import AccountRecord, Engine
from monitor.errors import LiqmonError
from monitor.events import Event, Source
from monitor.records import (
    Fill,
    InputRecord,
    LedgerEntry,
    PriceTick,
    Reason,
    Rejected,
    decode,
    decode_batch,
    ts_bounds,
)
from monitor.reference import ReferenceEngine
from monitor.service.changelog import (
    NO_RESET,
    RestoredPartition,
    RestoreProgress,
    collector,
    epoch_message,
    write_reset_markers,
)
from monitor.service.changelog import warm_up as warm_up_restore
from monitor.service.checkpointer import Checkpointer, KafkaSink
from monitor.service.clients import (
    Clients,
    FetchWait,
    fetched_from,
    group_generation,
    position_now,
    set_fetch_wait,
    stop_client,
    track_topics,
)
from monitor.service.counted_warning import LOG_INTERVAL, CountedWarning
from monitor.service.delivery import MAX_BACKOFF, Delivery, DeliveryAbandoned, Pipeline
from monitor.service.group_wait import AssignmentWait
from monitor.service.keying import MiskeyedInputs
from monitor.service.log_reader import EARLIEST, last_records
from monitor.service.merge import TimestampMerge
from monitor.service.metrics import LiveFigures, Metrics
from monitor.service.options import option_values
from monitor.service.outbox import Outgoing, dead_letter_message, event_message
from monitor.service.pacing import TurnPacer
from monitor.service.positions import Positions
from monitor.service.probe import OUTAGE_REMINDER, BrokerWatch, WatermarkProber
from monitor.service.published import READ_BEFORE_MS, PublishedEvents, read_published
from monitor.service.restorer import RestoreAbandoned, Restorer, staying
from monitor.service.security import refusal
from monitor.service.settings import CLOSE_TIMEOUT, ServiceSettings
from monitor.service.tasks import cancel_and_wait
from monitor.service.topics import changelog_kept, ensure_topics, output_topics
from monitor.state import EVENT_TYPES, AccountState
from monitor.version import liqmon_version

TICK = 0.2  # the loop wakes at least this often (merge wait limit, checkpoint timer)
# Records buffered per partition beyond which it is paused until the merge drains it: a backlog
# on one partition waiting for another's records must not grow without bound.
MAX_BUFFERED = 20_000
RESTORE_REPORT_INTERVAL = 5.0  # seconds between "restoring" log lines
RESTORE_RETRY_INTERVAL = 1.0  # seconds before a restore the broker failed is taken again
FENCE_RETRY = 0.5  # seconds before the stop's checkpoint asks a group that gave no answer again
LOG_TAIL_RECORDS = 64  # of an input log that ends early, read to tell why (`Engine.reflects`)
# Seconds before a partition whose high watermark stays below what was applied, but whose log
# was found whole, is checked again: not at every fetch.
LOG_RECHECK_INTERVAL = 5.0
# Seconds between asking the broker where the logs of paused partitions end: not fetched,
# their consumer's high watermark stays where the pause found it (`_ask_paused_ends`).
PAUSED_ENDS_INTERVAL = 1.0
ACCOUNT_RECORDS = (Fill, LedgerEntry)  # applied a run at a time (`apply_account_records`)
# After a fetch, per partition: the consumer's position, the high watermark its last fetch of
# the partition reported, the wall-clock ms that fetch was answered at, and the connection it
# came on (`merge.fetched`: the consumer, and `clients.fetched_from`'s label of the broker)
ReadTo = tuple[int, int | None, int | None, tuple[int, Hashable | None]]


class Monitor:
    """One instance of the service. ``clients`` makes its Kafka clients (by default from
    ``settings``); ``engine`` is the engine it runs (by default a new `Engine` of
    ``config``; the bench gives it one loaded beforehand)."""

    def __init__(self, settings: ServiceSettings, config: RiskConfig,
                 metrics: Metrics | None = None, *, clients: Clients | None = None,
                 engine: Engine | ReferenceEngine | None = None) -> None:
        self.settings = settings
        self.config = config
        self.engine: Engine | ReferenceEngine = Engine(config) if engine is None else engine
        self.clients = Clients(settings) if clients is None else clients
        self.metrics = metrics or Metrics()
        self.metrics.watch(self._live_figures)
        self.fingerprint = fingerprint(config)
        self.metrics.config_info.labels(self.fingerprint).set(1)
        topics = settings.topics
        for topic in (topics.prices, topics.fills, topics.ledger):  # export zeros from the start
            self.metrics.records_consumed.labels(topic)  # (so increase() sees the first ones)
            self.metrics.records_late.labels(topic)
            self.metrics.records_stamped_ahead.labels(topic)
        for topic in (topics.fills, topics.ledger):
            self.metrics.records_miskeyed.labels(topic)
        for topic in (topics.prices, topics.fills, topics.ledger):
            for reason in Reason.ALL:
                if reason != Reason.UNKNOWN_TOPIC:  # replay's envelopes only
                    self.metrics.records_rejected.labels(topic, reason)
        for event_type in EVENT_TYPES:
            self.metrics.events_emitted.labels(event_type)
        self.log = structlog.get_logger("liqmon")
        self._miskeyed = MiskeyedInputs(self.metrics.records_miskeyed, self.log)
        self._group_wait = AssignmentWait(settings.group, self.log)
        self._group_watch: asyncio.Task[None] | None = None
        self.ready = asyncio.Event()  # see _update_ready
        self._consuming = False
        self._restoring = False
        self._warming_up = True  # loading (first start: compiling) the engine's kernels
        self.restore_status: RestoreProgress | None = None  # of the restore under way
        self._restore_started = 0.0
        self.restore_seconds: float | None = None  # how long the last restore took
        self._restore_said = 0.0  # when the last "restoring" line was logged
        self._reachable = True  # as the broker watch last found it
        self._watch: BrokerWatch | None = None  # from the connection on
        self.partition_counts: dict[str, int] = {}
        self._positions = Positions(topics, settings.max_skew_ms, settings.max_idle,
                                    settings.max_stall, self.metrics)
        self._forced_reported = 0  # merge.forced, counted so far
        # merge.forced logged so far, and when: at once, then at most every LOG_INTERVAL
        # (with --merge-wait 0 nearly every turn releases some)
        self._forced_logged, self._forced_logged_at = 0, -math.inf
        self._past_stalled_reported = 0  # merge.forced_past_stalled, counted so far
        self._late = CountedWarning(
            self.metrics.records_late, self.log, "applied records later than replay would "
            "apply them: they arrived after records that sort after them")
        self._ahead = CountedWarning(
            self.metrics.records_stamped_ahead, self.log, "applied records stamped further "
            "ahead of their arrival than --merge-wait in the order they arrived: replay, "
            "sorting by timestamp, applies them later (a producer clock ahead)")
        self._stalled: set[TopicPartition] = set()  # stalled partitions, as last reported
        self._log_checked: dict[TopicPartition, float] = {}  # input logs checked for an end
        #                                                      before what was applied: when
        # a prices partition replaced, as `_read_replaced_logs_again` found it: the partitions
        # gained from then on may hold snapshots stamped with the old log's offsets
        self._prices_replaced: dict[str, object] | None = None
        self._unlogged: list[tuple[Event, TopicPartition, int]] = []  # events to log
        self._restore_failed: str | None = None  # the error, while a restore is to be retaken
        self._connect_failed: str | None = None  # why the last attempt to connect failed
        # where the broker said the logs of partitions paused since end (`_ask_paused_ends`)
        self._paused_ends: dict[TopicPartition, int] = {}
        self._asking_paused_ends: asyncio.Task[None] | None = None
        # events published beyond the restored counters (`monitor.service.published`)
        self._published = PublishedEvents()
        self._renumbered_said = (0, 0)  # (renumbered, advanced) when last said
        self._paused_ends_asked_at = -math.inf
        self._lock = asyncio.Lock()  # one batch, checkpoint or rebalance step at a time
        self._stopping = asyncio.Event()
        self._stop_requested_at: float | None = None
        self._close_deadline: float | None = None  # see _close_left
        self._fatal: BaseException | None = None
        self._said_stopped = False  # the "stopped" line is logged
        self._restored = asyncio.Event()  # the first assignment has been restored
        self._closing = False
        self._last_tick_wall: dict[str, float] = {}
        self._checkpointer = Checkpointer(self.engine, self._positions, settings,
                                          self.metrics, self.fingerprint)
        # The group's latest assignment, taken by a task of its own (`assignment_changed`).
        self._assignment: set[TopicPartition] = set()
        self._assignment_changed = asyncio.Event()
        self._assigned_generation = -1  # the group generation of that assignment
        self._rebalancing = False  # from a revocation to the next assignment: restores give up
        # Partitions revoked by the group's last rebalance, checkpointed and still in memory
        # (the next offset of their fills and ledger): if the next generation gives them back
        # they go on from there instead of being restored. Nothing is applied meanwhile.
        self._kept: dict[int, dict[TopicPartition, int]] = {}
        self._kept_generation = -1
        self._held = False
        self._restoring_task: asyncio.Task[None] | None = None
        # the records a turn of the loop (or of a catch-up) applies: see pacing.py
        self._pacer = TurnPacer(settings.max_batch_records)
        self._restorer = Restorer(settings, config, self.engine, self._positions,
                                  self._checkpointer, self.clients, self.metrics,
                                  self.fingerprint, self.log, self._why_abandon, self._replay,
                                  pacer=self._pacer)
        self._producer: AIOKafkaProducer | None = None
        self._delivery: Delivery | None = None
        self._pipeline: Pipeline | None = None
        self._sink: KafkaSink | None = None  # where checkpoints go, once connected
        self._prices: AIOKafkaConsumer | None = None
        self._accounts: AIOKafkaConsumer | None = None
        self._probe: AIOKafkaConsumer | None = None  # end offsets for watermarks, own socket
        self._prober: WatermarkProber | None = None

    # -- lifecycle ------------------------------------------------------------------------------

    def request_stop(self) -> None:
        if not self._stopping.is_set():
            if self._fatal is None:
                self.log.info("stopping")
            else:  # said when it happens, not only once the clients are closed (seconds on)
                self.log.error("stopping on an error", error=str(self._fatal),
                               kind=type(self._fatal).__name__)
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
            # where it came from, unless it is one of liqmon's own, whose message says all
            where = None if isinstance(self._fatal, LiqmonError) else self._fatal
            self.log.error("shutdown abandoned" if abandoned else "stopped by an error",
                           error=str(self._fatal), kind=type(self._fatal).__name__,
                           exc_info=where)
            raise self._fatal

    async def _run(self) -> None:
        config = self.config
        self.log.info("starting", version=liqmon_version(), config=self.fingerprint,
                      instruments=len(config.instruments), assets=len(config.assets),
                      options=option_values(self.settings))
        try:
            if CACHE_PLACE is not None:
                say = self.log.info if CACHE_PLACE.used is not None else self.log.warning
                say(CACHE_PLACE.describe(), configured=CACHE_PLACE.configured,
                    used=CACHE_PLACE.used)
            seconds = await self._warm_up()
            if seconds is not None:
                self._warming_up = False
                self.log.info("kernels ready", seconds=round(seconds, 3))
                collector.settle()
                await self._connect()
            if not self._stopping.is_set():
                await self._watched(self._restore_and_consume())
        finally:
            self._consuming = False
            self._update_ready()
            await self._close()
        # asked to stop before it consumed (waiting for the group, restoring)
        if not self._said_stopped and self._fatal is None:
            self._say_stopped()

    async def _warm_up(self) -> float | None:
        """Load the engine's kernels (`warm_up_kernels`; compiled once per install, which
        takes a minute or more, or waits for another process compiling them): the seconds it
        took, or None when a stop came first. In a daemon thread of its own, so that /healthz
        answers meanwhile, and a stop is not held for the compile (the stop has nothing to
        save yet, and the thread ends with the process; numba writes its cache files whole)."""
        done: concurrent.futures.Future[float] = concurrent.futures.Future()

        def warm() -> None:
            done.set_running_or_notify_cancel()
            try:
                done.set_result(warm_up_kernels(self._compiler_busy))
            except BaseException as exc:  # raised on the loop, by `result()`
                done.set_exception(exc)

        threading.Thread(target=warm, name="liqmon-kernels", daemon=True).start()
        warmed: asyncio.Future[Any] = asyncio.wrap_future(done)
        stopping: asyncio.Future[Any] = asyncio.ensure_future(self._stopping.wait())
        try:
            await asyncio.wait([warmed, stopping], return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopping.cancel()
        return warmed.result() if warmed.done() else None

    async def _watched(self, work: Coroutine[Any, Any, None]) -> None:
        """Run ``work`` with the broker watch beside it, from the connection on: whether
        Kafka answers (`liqmon_kafka_reachable`, /readyz), and whether a topic vanished or
        changed its partition count, while the group assigns and restores too."""
        assert self._producer is not None
        self.metrics.kafka_reachable.set(1)  # it just answered the connection's requests
        self._watch = BrokerWatch(self._producer.client, self.settings, self.metrics,
                                  self.log, self._reachability, self.fail,
                                  self.partition_counts)
        watchdog = asyncio.create_task(self._watch.run())
        watchdog.add_done_callback(self._watch_ended)
        try:
            await work
        finally:
            if await cancel_and_wait(watchdog, within=self._close_left()):
                self.log.warning("broker watch abandoned: not ended in time",
                                 seconds=CLOSE_TIMEOUT)

    async def _restore_and_consume(self) -> None:
        await self._until_restored()
        if self._stopping.is_set():
            return
        self._consuming = True
        self._update_ready()
        self.log.info("consuming", bootstrap=self.settings.bootstrap,
                      group=self.settings.group, partitions=sorted(self._positions.owned))
        try:
            await self._within_shutdown_timeout(asyncio.ensure_future(self._consume()))
        finally:
            self._closing = True  # the final checkpoint is written (or abandoned)

    def _say_stopped(self, checkpointed: bool = True) -> None:
        self._said_stopped = True
        offsets = {f"{tp.topic}/{tp.partition}": o
                   for tp, o in sorted(self._positions.processed.items())}
        if checkpointed:
            self.log.info("stopped", checkpoint=self._checkpointer.seq, offsets=offsets)
            return
        self.log.warning("stopped without its final checkpoint (the group no longer counts "
                         "this instance as the owner of its partitions): whoever restores "
                         "them re-processes the inputs since the last checkpoint, and "
                         "publishes their events again", checkpoint=self._checkpointer.seq,
                         offsets=offsets)

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
                await cancel_and_wait(work, within=self._close_left())
        if not work.done() or work.cancelled():
            pending = 0 if self._pipeline is None else self._pipeline.in_flight
            raise DeliveryAbandoned(
                f"the stop did not finish within {self.settings.shutdown_timeout}s "
                f"(--shutdown-timeout): {pending} messages not acknowledged, partitions "
                f"{sorted(self._positions.owned)} not checkpointed; their inputs are "
                "re-processed on restart")
        work.result()

    def _compiler_busy(self, lock: str) -> None:
        """Called from the warm-up's thread when another process is compiling the kernels."""
        self.log.info("another process is compiling the kernels: waiting for it, then loading "
                      "what it compiled", lock=lock)

    def _restore_progress(self, status: RestoreProgress) -> None:
        """A large restore says how far it has got: in /readyz, and a log line every few
        seconds (so an operator is not left guessing for minutes)."""
        self.restore_status = status
        now = time.monotonic()
        if now - self._restore_said >= RESTORE_REPORT_INTERVAL:
            self._restore_said = now
            self.log.info("restoring", records=status.records, expected_records=status.expected,
                          units_at_most=status.accounts,
                          seconds=round(now - self._restore_started, 1))

    def not_ready_because(self) -> str:
        """Why /readyz says 503, in words an operator can act on."""
        if self._stopping.is_set():
            return "stopping" if self._fatal is None else f"stopping on an error: {self._fatal}"
        if not self._reachable:  # the broker watch's finding, from the connection on
            return "kafka does not answer"
        if self._restoring:
            if self._restorer.catching_up is not None:
                return self._restorer.catching_up.describe()
            status = self.restore_status
            if status is None:
                return "restoring state"
            return (f"restoring state: {status.records:,} of at most {status.expected:,} "
                    f"changelog records read, up to {status.accounts:,} accounts and "
                    "isolated positions")
        if self._restore_failed is not None:
            return (f"restoring state: the last attempt failed ({self._restore_failed}), "
                    "taking the assignment again")
        if self._warming_up:
            return "loading the engine's compiled kernels (the first start compiles them)"
        if self._group_wait.since is not None:
            return self._group_wait.describe()
        if not self._consuming:
            if self._watch is not None:
                return "starting to consume"
            if self._connect_failed is None:
                return "connecting to kafka"
            return f"connecting to kafka: the last attempt failed ({self._connect_failed})"
        return ""

    def _update_ready(self) -> None:
        """/readyz: restored, consuming, and the broker answers (SPEC §8); not while the group
        rebalances (nothing is applied), nor once stopping."""
        ready = (self._consuming and self._reachable and not self._restoring
                 and self._restore_failed is None and self._group_wait.since is None
                 and not self._stopping.is_set())
        if ready:
            self.ready.set()
        else:
            self.ready.clear()

    def _watch_ended(self, watchdog: asyncio.Task[None]) -> None:
        """The broker watch runs until the service stops: what ends it sooner stops the
        instance (without the watch, /readyz and the merge's release rule would go stale)."""
        error = None if watchdog.cancelled() else watchdog.exception()
        if error is not None:
            self.fail(error)

    def _reachability(self, reachable: bool, prompt: bool) -> None:
        """What the broker watch found, each time it asked: whether Kafka answered, and
        whether within PROMPT_ANSWER."""
        if reachable and (not self._reachable or not prompt):
            # Kafka back after an outage, or an answer an outage held up (the watch may never
            # have seen the outage: this instance frozen through its start): what the merge
            # waited for through it may be proven one probe from now
            self._positions.merge.restart_wait()
        self._reachable = reachable
        self._update_ready()

    async def _until_restored(self) -> None:
        stopping = asyncio.ensure_future(self._stopping.wait())
        restored = asyncio.ensure_future(self._restored.wait())
        await asyncio.wait([stopping, restored], return_when=asyncio.FIRST_COMPLETED)
        for waiter in (stopping, restored):
            waiter.cancel()

    async def _connect(self) -> None:
        """Wait for the broker (with backoff), create missing topics, start the clients."""
        s = self.settings
        backoff = 0.2
        said: tuple[str, float] | None = None  # the refusal last logged, and when
        while not self._stopping.is_set():
            admin = self.clients.admin()
            try:
                await admin.start()
                self.partition_counts = await ensure_topics(admin, s, self.log)
                check = await changelog_kept(admin, s.topics.state)
                if check.doubt is not None:
                    self.log.warning("cannot check that the changelog is compacted only (a "
                                     "topic that deletes by age loses unchanged accounts)",
                                     topic=s.topics.state, reason=check.doubt)
                self._checkpointer.control_record_limit = check.record_limit
                await self._start_clients()
                break
            except KafkaError as exc:
                await self._stop_clients()  # the broker went away meanwhile: all again
                # A refusal (TLS, SASL) is said once, then as often as an outage is, not on
                # every retry; still retried: the broker's certificate or user may get fixed.
                cause = await refusal(s.bootstrap, s.security, s.request_timeout_ms)
                self._connect_failed = repr(exc) if cause is None else cause
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
        assert self._producer is not None and self._probe is not None
        assert self._accounts is not None
        self._delivery = Delivery(self._producer, self.metrics, self.log, s.shutdown_timeout,
                                  lambda: self._stop_requested_at)
        self._pipeline = Pipeline(self._delivery, self._positions.mark_delivered)
        self._pipeline.start()
        if s.reset_state:
            partitions = range(self.partition_counts[s.topics.state])
            await write_reset_markers(self._producer, s.topics.state, partitions)
            self.log.warning("checkpoints discarded (--reset-state): state is rebuilt from the "
                             "input topics", topic=s.topics.state, start=s.start)
        self._prober = WatermarkProber(self._positions.merge, self._probe, s, self.log)
        self._sink = KafkaSink(self._pipeline, self._accounts, self.log,
                               commit_timeout=s.request_timeout_ms / 1000, probe=self._probe,
                               settings=s)
        self._restoring_task = asyncio.create_task(self._restore_assignments())
        self._group_wait.began()
        self._group_watch = asyncio.create_task(self._watch_group())
        self._accounts.subscribe([s.topics.fills, s.topics.ledger],
                                 listener=_Rebalance(self))

    async def _start_clients(self) -> None:
        """The producer and the three consumers, connected (the group one not subscribed)."""
        t = self.settings.topics
        self._producer = self.clients.producer()
        await self._producer.start()
        track_topics(self._producer, output_topics(self.settings))
        self._prices = self.clients.prices_consumer()
        await self._prices.start()
        self._probe = self.clients.probe_consumer()
        await self._probe.start()
        track_topics(self._probe, [t.prices, t.fills, t.ledger, t.state])
        self._accounts = self.clients.group_consumer()
        await self._accounts.start()

    def _started_clients(self) -> list[AIOKafkaConsumer | AIOKafkaProducer]:
        """The clients `_start_clients` has made so far."""
        return [client for client in (self._producer, self._prices, self._probe, self._accounts)
                if client is not None]

    async def _stop_clients(self) -> None:
        """Close what `_start_clients` started before it failed."""
        for client in self._started_clients():
            with contextlib.suppress(Exception):  # TimeoutError too: given up
                async with asyncio.timeout(CLOSE_TIMEOUT):
                    await stop_client(client)
        self._producer = self._prices = self._probe = self._accounts = None

    async def _read_published(self, gained: list[int],
                              restored: dict[int, RestoredPartition]) -> int:
        """The events the output topics received since the oldest control record of the
        gained partitions was written, beyond each unit's restored counter: what this restore
        may build again, whose ids must not go out with other contents
        (`monitor.service.published`). A partition never checkpointed reads them from their
        start (an instance that crashed within its first checkpoint interval published them:
        on a first start the topics are empty), unless it was reset (`--reset-state`: a
        rebuild from the inputs, on topics that may hold a long history). How many records
        were read."""
        taken = [part.vouched() for part in restored.values()]
        since = [EARLIEST if part.control is None else part.control.written_at - READ_BEFORE_MS
                 for part in taken if part.control is not None or part.reset_at == NO_RESET]
        if not since:
            return 0
        counters = {key: int(count) for part in taken
                    for key, count in zip(part.snapshots.ids, part.snapshots.transitions,
                                          strict=True)}
        t = self.settings.topics
        inputs = [TopicPartition(topic, partition) for partition in gained
                  for topic in (t.fills, t.ledger)]
        inputs += [TopicPartition(t.prices, partition)
                   for partition in range(self.partition_counts[t.prices])]
        return await read_published(self.settings, self.partition_counts, inputs, min(since),
                                    self._published, lambda key: counters.get(key, 0))

    def _say_renumbered(self) -> None:
        """Warn of what `PublishedEvents` changed since the last warning: events given a new
        id, and units whose counter went past ids published before a crash."""
        published = self._published
        events = published.renumbered - self._renumbered_said[0]
        units = published.advanced - self._renumbered_said[1]
        if events or units:
            self._renumbered_said = (published.renumbered, published.advanced)
            self.log.warning(
                "inputs applied again after a crash gave other events than were published "
                "(records were applied late the first time: see liqmon_records_late_total); "
                "no event id goes out again with other contents", events_given_new_ids=events,
                counters_moved_past_published_ids=units)

    async def _watch_group(self) -> None:
        """Say so when the group keeps this instance waiting for partitions."""
        while True:
            await asyncio.sleep(1.0)
            self._group_wait.check()

    async def _close(self) -> None:
        """End the background tasks, then close every client, together, within what is left
        of CLOSE_TIMEOUT (`_close_left`): against an unreachable broker a consumer leaving
        its group or a producer flushing would wait for as long as the broker stays away."""
        self._closing = True
        if self._group_watch is not None:
            await cancel_and_wait(self._group_watch, within=self._close_left())
        if self._restoring_task is not None and await cancel_and_wait(
                self._restoring_task, within=self._close_left()):
            self.log.warning("restore abandoned: not ended in time", seconds=CLOSE_TIMEOUT)
        # cut short by a failure or the shutdown timeout
        await self._checkpointer.abandon(within=self._close_left())
        if self._pipeline is not None:
            await self._pipeline.close(within=self._close_left())
        closing = asyncio.gather(*(stop_client(c) for c in self._started_clients()),
                                 return_exceptions=True)
        try:
            async with asyncio.timeout(self._close_left()):
                await closing
        except TimeoutError:
            self.log.warning("kafka clients abandoned: not closed in time",
                             seconds=CLOSE_TIMEOUT)

    def _close_left(self) -> float:
        """Seconds left for closing: CLOSE_TIMEOUT in all, from its first step (ending the
        loop cut short by --shutdown-timeout, the background tasks, then the clients), so that
        a stop stays within ServiceSettings.shutdown_budget whichever step is slow."""
        now = time.monotonic()
        if self._close_deadline is None:
            self._close_deadline = now + CLOSE_TIMEOUT
        return max(0.0, self._close_deadline - now)

    async def _sleep_unless_stopping(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self._stopping.wait()

    # -- rebalance: restore what is gained, checkpoint what is lost ------------------------------

    def assignment_changed(self, assigned: set[TopicPartition]) -> None:
        """The group's new assignment (its callback, which returns at once). aiokafka sends no
        heartbeat while the callback runs: a restore done there that outlasted the session
        timeout got this instance expelled, the group rebalanced, and the restore began again,
        for ever. So the partitions gained are restored by `_restore_assignments`, a task
        beside the heartbeats."""
        self._assignment = assigned
        assert self._accounts is not None
        self._assigned_generation = group_generation(self._accounts)
        self._rebalancing = False
        self._assignment_changed.set()

    async def _restore_assignments(self) -> None:
        """Take each assignment the group hands out (the latest, if several came while a
        restore was under way). A restore the broker failed in a way it may recover from (a
        request timed out, the broker out of reach) is taken again after a pause; any other
        failure stops the monitor."""
        while True:
            await self._assignment_changed.wait()
            self._assignment_changed.clear()
            try:
                await self._take_assignment()
                if self._restore_failed is not None:
                    self._restore_failed = None  # taken whole at last
                    self._update_ready()
            except KafkaError as exc:
                if not exc.retriable:
                    self.fail(exc)
                    return
                self.log.warning("restore failed, taking the assignment again",
                                 error=repr(exc), retry_in=RESTORE_RETRY_INTERVAL)
                # not ready meanwhile: the partitions it gains are not restored, nor read
                self._restore_failed = repr(exc)
                self._update_ready()
                await asyncio.sleep(RESTORE_RETRY_INTERVAL)
                self._assignment_changed.set()  # unless a newer one came meanwhile: the same
            except asyncio.CancelledError as cancelled:
                current = asyncio.current_task()
                if current is not None and current.cancelling():
                    raise  # the monitor is closing
                # Raised by a library call, nobody having cancelled this task: ending quietly
                # here would leave the instance in the group, heartbeating, taking no
                # assignment ever again. Stopping says so, and a restart recovers.
                stray = RuntimeError("the restore was cancelled from inside a Kafka client "
                                     "call, not by liqmon")
                stray.__cause__ = cancelled
                self.fail(stray)
                return
            except Exception as exc:
                self.fail(exc)
                return

    def _why_abandon(self) -> str | None:
        """Why a restore under way should give up (the restorer asks), or None."""
        if self._stopping.is_set():
            return "stopping"
        if self._rebalancing:
            return "the group is rebalancing again"
        return None

    async def _take_assignment(self) -> None:
        """Settle the partitions kept through the rebalance, then restore those the group's
        latest assignment gains, all under the loop's lock: no revocation can come between
        (it needs the lock), so the assignment read here is the one in force."""
        async with self._lock:
            if self._why_abandon() is not None:  # stopping, or another rebalance began
                return  # take nothing new (no restore, no catch-up, no event)
            assigned = self._assignment
            await self._settle_kept(assigned)
            gained = self._restorer.gained(assigned)
            if not gained and self._restored.is_set():
                self._group_wait.ended()
                self._update_ready()
                return
            await self._checkpointer.finish()
            # Ended once the checkpoint being written is: until then /readyz says it waits for
            # the group (with nothing to say, its 503 had no reason).
            self._group_wait.ended()
            started = time.monotonic()
            self._pacer.careful()  # the catch-up's ticks re-value every restored holder
            self._restoring = True
            self.restore_status = None
            self._update_ready()
            try:
                self._restore_started = started
                restored = await self._restorer.read(gained, self._restore_progress)
                published_read = await self._read_published(gained, restored)
                assert self._prices is not None and self._accounts is not None
                first = not self._restored.is_set()
                accounts, isolated, replayed = await self._restorer.restore(
                    gained, restored, prices=self._prices, accounts=self._accounts,
                    price_partitions=self.partition_counts[self.settings.topics.prices])
                if first:
                    self._restored_price_ages()
            except RestoreAbandoned as abandoned:
                self.log.info(f"restore abandoned: {abandoned}",
                              partitions=sorted(set(gained) - self._positions.owned))
                return
            except KafkaError:
                # A partition taken halfway (its fills positioned, not its ledger) must not
                # be consumed meanwhile: none of its accounts is loaded.
                t = self.settings.topics
                self._release([TopicPartition(topic, partition)
                               for partition in set(gained) - self._positions.owned
                               for topic in (t.fills, t.ledger)])
                raise
            finally:
                self._restoring = False
                self._update_ready()
            if self._prices_replaced is not None:
                # Their snapshots may have been written by an instance that never read the
                # new prices log: what this one writes reads less of prices than those did.
                assert self._pipeline is not None
                await self._pipeline.delivery.deliver([epoch_message(
                    partition, self.settings.topics, self._prices_replaced)
                    for partition in sorted(gained)])
            self._restored.set()
            self._pacer.careful()  # so do the loop's, until the inputs pass the snapshots
            self.restore_seconds = time.monotonic() - started
            self.metrics.restore_duration.observe(self.restore_seconds)
            self.metrics.rebalance_partitions.labels("restored").inc(len(gained))
            prices = self.settings.topics.prices
            await self._report_lag([tp for tp in self._positions.processed
                                    if tp.partition in gained or tp.topic == prices])
            self.log.info("restored", partitions=gained, accounts=accounts,
                          isolated_positions=isolated,
                          changelog_records=sum(r.records_read for r in restored.values()),
                          records_replayed=replayed, events_read=published_read,
                          seconds=round(time.monotonic() - started, 3))
            self._say_renumbered()

    async def on_revoked(self, revoked: set[TopicPartition]) -> None:
        """The group takes partitions back (with aiokafka: every partition, at every
        rebalance). They are checkpointed for their next owner and kept in memory, the loop
        holding still, until the next assignment says which of them stay here
        (`_settle_kept`): a rebalance costs a restore only for partitions that move."""
        self._rebalancing = True  # a restore under way gives up what it has not taken yet
        self._group_wait.began()
        self._update_ready()
        if self._closing:
            return
        async with self._lock:
            # owned as of now: a restore that held the lock may have taken some meanwhile
            lost = {tp.partition for tp in revoked} & self._positions.owned
            if not lost or self._closing:  # closing: the final checkpoint covers them
                return
            assert self._accounts is not None
            replaced = group_generation(self._accounts) < 0
            try:
                if replaced:
                    # The group no longer knows this instance (no heartbeat within its
                    # session): a checkpoint's question would only be refused, after up to a
                    # request timeout each, and this callback holds up the rejoin meanwhile
                    # (a helper's fleet: 9 s, and the group formed without it).
                    await self._checkpointer.give_up()
                else:
                    await self._checkpointer.finish()
                    await self._checkpoint(lost)
            except KafkaError as exc:
                # The new owner restores the previous checkpoint and re-reads from there.
                self.log.error("checkpoint before handing partitions over failed",
                               partitions=sorted(lost), error=repr(exc))
                for partition in sorted(lost):
                    self._hand_over(partition)
                return
            t = self.settings.topics
            for partition in sorted(lost):
                tps = [TopicPartition(t.fills, partition), TopicPartition(t.ledger, partition)]
                self._kept[partition] = {tp: self._positions.processed[tp] for tp in tps}
                self._release(tps)
            self._positions.owned -= lost
            self._kept_generation = group_generation(self._accounts)
            self._held = True

    async def _settle_kept(self, assigned: set[TopicPartition]) -> None:
        """Partitions kept through the rebalance go on where they were if the generation right
        after the one they were revoked in gives them back (no other instance can have had
        them then); any other is handed over: its accounts are dropped. Then the loop goes
        on."""
        kept, self._kept = self._kept, {}
        if self._held:
            self._held = False
            self._positions.merge.restart_wait()
        if not kept:
            return
        assert self._accounts is not None
        fills = {tp.partition for tp in assigned if tp.topic == self.settings.topics.fills}
        stayed = staying(kept, self._kept_generation, self._assigned_generation, fills)
        if fills & kept.keys() and not stayed:
            self.log.info("partitions kept through the rebalance are restored afresh: the "
                          "group may have given them to another instance meanwhile",
                          partitions=sorted(fills & kept.keys()),
                          revoked_in_generation=self._kept_generation,
                          assigned_in_generation=self._assigned_generation)
        for partition, offsets in sorted(kept.items()):
            if partition not in stayed:
                self._hand_over(partition)
                continue
            for tp, offset in offsets.items():
                self._accounts.seek(tp, offset)
                self._positions.seek(tp, offset)
            self._positions.owned.add(partition)
        if stayed:
            self.metrics.rebalance_partitions.labels("kept").inc(len(stayed))
            self.log.info("partitions kept through the rebalance", partitions=stayed)
            await self._report_lag([tp for partition in stayed for tp in kept[partition]])

    def _restored_price_ages(self) -> None:
        """Each restored price counts as applied when it was stamped (or now, if stamped
        ahead) in `liqmon_price_age_seconds`: with none, a restart while the feed is silent
        would export no age at all, and clear LiqmonNoTicks. A configured symbol with no price
        yet ages from now, when ticks begin to be applied: else a fleet whose feed never
        started would raise no alert at all."""
        now = time.time()
        for symbol, ts in self.engine.price_ts.items():
            self._last_tick_wall.setdefault(symbol, min(ts / 1000, now))
        for symbol in self.engine.config.price_symbols():
            self._last_tick_wall.setdefault(symbol, now)

    def _hand_over(self, partition: int) -> None:
        """Forget an account partition another instance takes."""
        t = self.settings.topics
        dropped = self.engine.drop_partition(partition)
        self._release([TopicPartition(t.fills, partition), TopicPartition(t.ledger, partition)])
        self._positions.owned.discard(partition)
        self.metrics.rebalance_partitions.labels("handed_over").inc()
        self.log.info("partition handed over", partition=partition, accounts=dropped)

    def _release(self, tps: list[TopicPartition]) -> None:
        """Stop processing these input partitions: out of the merge, no gauges left."""
        self._positions.drop(tps)
        for tp in tps:
            for gauge in (self.metrics.input_offset, self.metrics.consumer_lag):
                with contextlib.suppress(KeyError):
                    gauge.remove(tp.topic, str(tp.partition))

    async def _checkpoint(self, partitions: set[int]) -> bool:
        """Checkpoint these partitions now (see Checkpointer.checkpoint): False if the group
        did not vouch for this instance."""
        if self._sink is None:
            return True
        return await self._checkpointer.checkpoint(partitions, self._sink)

    async def _report_lag(self, tps: list[TopicPartition]) -> dict[TopicPartition, int]:
        """Lag of partitions just (re)positioned, or paused, asked of the broker: until
        records of theirs are applied (fetched, if paused) nothing else sets it, and a
        rebalance removes the series of every partition it revokes, even of those it gives
        straight back. The ends the broker gave (none if it did not answer: the first records
        applied set it)."""
        assert self._probe is not None
        try:
            ends: dict[TopicPartition, int] = await self._probe.end_offsets(tps)
        except KafkaError:
            return {}
        for tp, end in ends.items():
            if tp in self._positions.processed:
                self._set_lag(tp, end)
        return ends

    # -- the loop -------------------------------------------------------------------------------

    async def _consume(self) -> None:
        assert self._prices is not None and self._accounts is not None
        assert self._prober is not None and self._sink is not None
        prober, positions = self._prober, self._positions
        limit = self.settings.max_batch_records
        consumers = (self._prices, self._accounts)
        fetches = {c: asyncio.ensure_future(self._fetch(c, limit)) for c in consumers}
        waits = {c: FetchWait(self.settings.fetch_max_wait_ms) for c in consumers}
        stopping = asyncio.ensure_future(self._stopping.wait())
        probing = asyncio.create_task(prober.run())
        woken = asyncio.ensure_future(prober.answered.wait())
        backlog = False  # the merge released a full batch: more may be ready without a fetch
        upkeep = False  # the engine has idle-time work left (`Engine.upkeep`)
        try:
            while not self._stopping.is_set():
                await asyncio.wait([*fetches.values(), stopping, woken, probing],
                                   timeout=0 if backlog or upkeep else TICK,
                                   return_when=asyncio.FIRST_COMPLETED)
                if probing.done():
                    probing.result()  # the prober never returns: raise what killed it
                if woken.done():
                    prober.answered.clear()
                    woken = asyncio.ensure_future(prober.answered.wait())
                for consumer in consumers:
                    fetch = fetches[consumer]
                    if not fetch.done() or self._stopping.is_set():
                        continue
                    fetches[consumer] = asyncio.ensure_future(self._fetch(consumer, limit))
                    try:
                        batch, read_to, taken_at = fetch.result()
                    except KafkaError as exc:
                        self.log.warning("fetch failed, retrying", error=repr(exc))
                        continue
                    for tp in batch.keys() | read_to.keys():
                        # a rebalance may have handed the partition over, or sought it,
                        # since these records were fetched
                        held = tp in positions.processed
                        if held and not positions.sought_since(tp, taken_at):
                            position, end, answered_at, connection = read_to.get(
                                tp, (None, None, None, None))
                            positions.merge.fetched(tp, batch.get(tp, ()), position, end,
                                                   answered_at, connection=connection)
                    self._refresh_lag(consumer.assignment())
                    await self._read_replaced_logs_again(consumer)
                    if sum(map(len, batch.values())) < limit:  # it handed over all it had
                        self._widen_if_starved(consumer, waits[consumer], read_to)
                async with self._lock:
                    taking = self._pacer.limit
                    applied = await self._process_ready(taking)
                    backlog = applied >= taking
                    # Tidy the book while nothing is ready (what a shock left in the band
                    # index, positions trading has scattered), a step per turn, once the
                    # events are out (the next turn when this one applied some), rather than
                    # in the records that come next.
                    upkeep = not backlog and (self.engine.upkeep_due if applied
                                              else self.engine.upkeep())
                self._checkpointer.poll(self._sink)
                self._pace_fetching()
                self._ask_paused_ends()
                if positions.merge.to_probe():
                    prober.wanted.set()
        finally:
            asking = [self._asking_paused_ends] if self._asking_paused_ends else []
            await cancel_and_wait(*fetches.values(), stopping, woken, probing, *asking)
        async with self._lock:  # finish: what was applied is delivered; checkpoint it
            # A revocation waiting for the lock meanwhile finds its partitions covered by
            # this checkpoint: it must not write one of its own while the clients close.
            self._closing = True
            await self._checkpointer.finish()
            checkpointed = await self._final_checkpoint(positions.owned)
        if self._fatal is None:  # else `run` says it stopped, and why
            self._say_stopped(checkpointed)

    async def _final_checkpoint(self, partitions: set[int]) -> bool:
        """The stop's checkpoint, asked again while the group gives no answer on whether this
        instance still owns its partitions (the broker away), until --shutdown-timeout cuts
        it short; False if the group said no (it has replaced this instance)."""
        while not await self._checkpoint(partitions):
            if self._sink is None or not self._sink.unanswered:
                return False
            await asyncio.sleep(FENCE_RETRY)
        return True

    async def _fetch(self, consumer: AIOKafkaConsumer, limit: int
                     ) -> tuple[dict[TopicPartition, list[ConsumerRecord]],
                                dict[TopicPartition, ReadTo], int]:
        """A fetch, the consumer's position in each partition after it (past what it skips,
        such as transaction markers) with the high watermark its last fetch of the partition
        reported, when that was answered and on which connection (this consumer, the broker
        it fetches the partition from), and the seek count it was taken at, all read in
        the same step: a restore that seeks a partition while the fetch waits to be handed to
        the merge makes that partition's records in it stale (`Positions.sought_since`)."""
        batch = await consumer.getmany(timeout_ms=500, max_records=limit)
        read_to = {tp: (position, consumer.highwater(tp), consumer.last_poll_timestamp(tp),
                        (id(consumer), fetched_from(consumer, tp)))
                   for tp in consumer.assignment()
                   if (position := position_now(consumer, tp)) is not None}
        return batch, read_to, self._positions.seeks

    def _widen_if_starved(self, consumer: AIOKafkaConsumer, wait: FetchWait,
                          read_to: dict[TopicPartition, ReadTo]) -> None:
        """Widen the consumer's fetch wait if the broker keeps answering a partition with
        nothing although it reports records past the position (`FetchWait`)."""
        fetched = {tp: (position, end, answered_at)
                   for tp, (position, end, answered_at, _) in read_to.items()
                   if tp in self._positions.processed
                   and not self._positions.merge.is_paused(tp)}
        starved = wait.starved(fetched)
        if starved is None:
            return
        tp, seconds = starved
        set_fetch_wait(consumer, wait.ms)
        self.log.warning("the broker answers fetches without the records it reports; fetch "
                         "wait widened", topic=tp.topic, partition=tp.partition,
                         position=fetched[tp][0], broker_end=fetched[tp][1],
                         seconds=round(seconds, 1), fetch_wait_ms=wait.ms)

    async def _read_replaced_logs_again(self, consumer: AIOKafkaConsumer) -> None:
        """Go on reading a partition whose log now ends before what this instance has applied
        of it, from where its records are new. The consumer's high watermark only raises the
        suspicion (one read before a restore's seek can be older than the position); the
        broker's end offset, asked now, decides. Then the log's last records say why:

        - applied already (`Engine.reflects`): the log was truncated (an unclean leader
          election) and holds the records applied from it up to its end: read on from there.
          Read from its beginning, every record still in it would be applied twice;
        - new, or none: the topic was deleted and re-created, its offsets start again, and a
          consumer left at the old position would skip its records without a word (a
          re-created ledger's deposits, say, and then false liquidations): read it from its
          beginning.

        Either way the partition's offsets go back, and the snapshots stamped with them will
        have read less, by their as_of totals, than those written before: first an epoch
        marker goes to each changelog partition whose accounts read the input (`epoch_message`:
        a restore then ranks what follows above what precedes it), once the checkpoint being
        written, stamped with the old offsets, is out. Every instance reads all of prices, so
        after a prices log is replaced, each partition this instance gains later gets a
        marker too (`_take_assignment`): its last owner may never have read the new log."""
        positions = self._positions
        now = time.monotonic()
        suspects = [tp for tp in consumer.assignment() if tp in positions.processed
                    and (end := consumer.highwater(tp)) is not None
                    and 0 <= end < positions.processed[tp]
                    and now - self._log_checked.get(tp, -math.inf) >= LOG_RECHECK_INTERVAL]
        if not suspects:
            return
        self._log_checked.update(dict.fromkeys(suspects, now))
        assert self._probe is not None and self._pipeline is not None
        settings = self.settings
        async with self._lock:
            try:
                ends = await self._probe.end_offsets(suspects)
                starts = await self._probe.beginning_offsets(suspects)
                replaced = [tp for tp in suspects if tp in positions.processed
                            and ends[tp] < positions.processed[tp]]
                if not replaced:
                    return
                tails = await last_records(
                    settings.bootstrap, {tp: (starts[tp], ends[tp]) for tp in replaced},
                    LOG_TAIL_RECORDS, client_id=f"{settings.client_id}-input-check",
                    request_timeout_ms=settings.request_timeout_ms, security=settings.security)
            except KafkaError as exc:  # asked again after LOG_RECHECK_INTERVAL
                self.log.debug("input log check failed", error=repr(exc))
                return
            # records at or past what was applied: the end offset was wrong, nothing replaced
            # (the embedded broker answers the end of a log whose last batch holds several
            # records as that batch's first offset + 1)
            replaced = [tp for tp in replaced if not (
                tails.get(tp) and tails[tp][-1].offset + 1 >= positions.processed[tp])]
            if not replaced:
                return
            await self._pipeline.flush()  # the old log's events out before its offsets go
            await self._checkpointer.finish()
            topics = settings.topics
            markers = []
            for tp in replaced:
                why = {"topic": tp.topic, "partition": tp.partition,
                       "applied_to": positions.processed[tp],
                       "written_at": int(time.time() * 1000)}
                if tp.topic == topics.prices:
                    self._prices_replaced = why
                markers += [epoch_message(partition, topics, why) for partition in sorted(
                    positions.owned if tp.topic == topics.prices
                    else positions.owned & {tp.partition})]
            if markers:
                await self._pipeline.delivery.deliver(markers)
            for tp in replaced:
                tail = tails.get(tp, [])
                truncated, cause = self._why_log_ends_early(tp, tail)
                # past the last record read, whatever the end offset said (as above)
                log_end = max(ends[tp], tail[-1].offset + 1) if tail else ends[tp]
                resume = log_end if truncated else starts[tp]
                self.log.error("input partition's log ends before the records applied from it",
                               topic=tp.topic, partition=tp.partition, cause=cause,
                               applied_to=positions.processed[tp], log_end=log_end,
                               reading_from=resume)
                self.metrics.input_logs_replaced.labels(tp.topic, str(tp.partition)).inc()
                consumer.seek(tp, resume)
                positions.seek(tp, resume)

    def _why_log_ends_early(self, tp: TopicPartition, tail: Sequence[Any]) -> tuple[bool, str]:
        """(truncated, why) of an input log that ends before the records applied from it,
        from its last records (``tail``, oldest first): the newest that tells whether it was
        applied already decides."""
        if not tail:
            return False, "it holds no record: the topic was re-created, or emptied"
        kind = self.settings.topics.input_kinds()[tp.topic]
        for message in reversed(tail):
            try:
                record = decode(kind, message.value, self.config)
            except Rejected:
                continue
            applied = self.engine.reflects(record, Source(tp.topic, tp.partition, message.offset))
            if applied:
                return True, ("its last records were applied already: the log was truncated "
                              "(an unclean leader election)")
            if applied is not None:
                return False, "its last records are new: the topic was deleted and re-created"
        return False, (f"none of its last {len(tail)} records tells whether it was applied: "
                       "taken for a re-created topic")

    def _pace_fetching(self) -> None:
        """Pause partitions whose buffer is full (the merge waits on another one), resume
        them once drained: memory stays bounded however far one input runs ahead. The merge
        keeps which are paused (it must know: a paused partition cannot stall)."""
        merge = self._positions.merge
        for tp in list(self._positions.processed):
            buffered = merge.buffered(tp)
            if not merge.is_paused(tp) and buffered >= MAX_BUFFERED:
                self._consumer_of(tp).pause(tp)
                merge.paused(tp)
            elif merge.is_paused(tp) and buffered < MAX_BUFFERED // 2:
                self._consumer_of(tp).resume(tp)
                merge.resumed(tp)

    def _ask_paused_ends(self) -> None:
        """Ask, once a `PAUSED_ENDS_INTERVAL`, where the logs of the paused partitions end
        (behind the loop), for their lag: their consumer's high watermark is that of their
        last fetch, before the pause, and a backlog that keeps growing behind a pause showed
        a lag far below the real one (`LiqmonConsumerLagGrowing` fired late or not at all)."""
        merge, processed = self._positions.merge, self._positions.processed
        for tp in [tp for tp in self._paused_ends if tp not in processed
                   or not merge.is_paused(tp)]:  # handed over, sought or resumed meanwhile
            del self._paused_ends[tp]
        if self._asking_paused_ends is not None and not self._asking_paused_ends.done():
            return
        if time.monotonic() - self._paused_ends_asked_at < PAUSED_ENDS_INTERVAL:
            return
        paused = [tp for tp in processed if merge.is_paused(tp)]
        if not paused:
            return
        self._paused_ends_asked_at = time.monotonic()
        self._asking_paused_ends = asyncio.create_task(self._paused_lag(paused))

    async def _paused_lag(self, tps: list[TopicPartition]) -> None:
        ends = await self._report_lag(tps)  # none: asked again a `PAUSED_ENDS_INTERVAL` on
        merge = self._positions.merge
        for tp, end in ends.items():
            if tp in self._positions.processed and merge.is_paused(tp):
                self._paused_ends[tp] = end
        self._refresh_lag(ends)

    async def _process_ready(self, limit: int) -> int:
        """Apply what the merge releases and hand its output to the pipeline (which gets
        it acknowledged behind the loop); how many records."""
        assert self._pipeline is not None
        if self._held:  # a rebalance: kept partitions wait for the new assignment
            return 0
        positions, merge = self._positions, self._positions.merge
        await self._pipeline.room()
        # whether Kafka answers, as the broker watch found: while it does not, nothing goes
        # out without proof of order (merge.py)
        assert self._watch is not None
        batch = merge.take(limit, list(positions.processed), counting=self._reachable,
                           kafka_answered=self._watch.answered_sent_at)
        if merge.awaiting_kafka:
            self._watch.ask()
        assert self._prober is not None
        if self._prober.poke():
            await asyncio.sleep(0)  # the probe is written out before this batch is worked on
        self._report_merge(merge)
        if not batch:
            return 0
        applying = time.perf_counter()
        outgoing = self.apply_batch(batch, self.engine, self.settings.conflate_ticks)
        took = time.perf_counter() - applying
        advanced: dict[TopicPartition, int] = {}
        for tp, record in batch:
            advanced[tp] = record.offset + 1
        # Recorded before the loop yields: a checkpoint is written by a task of its own, and
        # a snapshot it takes while the producer takes this batch's events must say that it
        # reflects the batch (a restore would apply it to the account again) and wait for
        # those events (submit counts them at once).
        positions.frontier = positions.key(*batch[-1])
        positions.processed.update(advanced)
        self._checkpointer.applied(len(batch), took)
        self._pacer.took(len(batch), took)
        self.engine.release_caught_up(positions.offsets())
        await self._pipeline.submit(outgoing, advanced)
        if self._published and self._published.caught_up(
                positions.processed, self.engine.transitions_of, self.engine.renumber):
            self._say_renumbered()
        self._log_events()  # after the produce: a cascade's log lines never delay its events
        self._update_lag(set(advanced))
        return len(batch)

    def _report_merge(self, merge: TimestampMerge) -> None:
        """Count and log what the merge released without proof of order, and the partitions
        it declared stalled or that deliver again."""
        if merge.forced > self._forced_reported:
            self.metrics.merge_forced.inc(merge.forced - self._forced_reported)
            self._forced_reported = merge.forced
        now = time.monotonic()
        if merge.forced > self._forced_logged and now - self._forced_logged_at >= LOG_INTERVAL:
            self.log.warning("released records out of proven order", records=merge.forced
                             - self._forced_logged, waited_seconds=merge.max_wait,
                             blocked_on=sorted(f"{tp.topic}/{tp.partition}"
                                               for tp in merge.forced_on))
            merge.forced_on.clear()
            self._forced_logged, self._forced_logged_at = merge.forced, now
        if merge.forced_past_stalled > self._past_stalled_reported:  # logged when it stalled
            self.metrics.merge_forced.inc(merge.forced_past_stalled
                                          - self._past_stalled_reported)
            self._past_stalled_reported = merge.forced_past_stalled
        self._report_order(merge)
        for tp in merge.stalled.keys() - self._stalled:
            read_to, end, seconds = merge.stalled[tp]
            self.log.error("input partition stalled: the broker reports records no fetch "
                           "returns; the other inputs go on without proof of order",
                           topic=tp.topic, partition=tp.partition, read_to=read_to,
                           broker_end=end, seconds_without_progress=round(seconds, 1))
            self.metrics.input_stalled.labels(tp.topic, str(tp.partition)).set(1)
            self._refresh_lag([tp])
        for tp in self._stalled - merge.stalled.keys():
            if tp in self._positions.processed:  # not handed over meanwhile
                self.log.info("input partition delivers again", topic=tp.topic,
                              partition=tp.partition, read_to=merge.fetched_to.get(tp))
            with contextlib.suppress(KeyError):
                self.metrics.input_stalled.remove(tp.topic, str(tp.partition))
        self._stalled = set(merge.stalled)

    def _report_order(self, merge: TimestampMerge) -> None:
        """Count and say the records the merge released out of replay's order: late ones,
        and those stamped too far ahead of their arrival to wait for."""
        if self._late.report(merge.late, lambda: {
                "most_behind_ms": merge.late_by_ms,
                "arrived_after_timestamp_ms": round(merge.late_arrival_ms),
                "max_skew_ms": merge.max_skew_ms}):
            merge.late_by_ms, merge.late_arrival_ms = 0, 0.0
        if self._ahead.report(merge.ahead, lambda: {
                "most_ahead_ms": merge.ahead_by_ms, "merge_wait_seconds": merge.max_wait}):
            merge.ahead_by_ms = 0

    async def _replay(self, batch: Sequence[tuple[TopicPartition, ConsumerRecord]],
                      engine: Engine) -> None:
        """A catch-up's batch: applied to its private engine, output delivered before the
        next one (the restorer's `Replay`)."""
        assert self._delivery is not None
        applying = time.perf_counter()
        outgoing = self.apply_batch(batch, engine, ticks_again=True)
        self._pacer.took(len(batch), time.perf_counter() - applying)
        await self._delivery.deliver(outgoing)
        self._log_events()

    def _consumer_of(self, tp: TopicPartition) -> AIOKafkaConsumer:
        consumer = self._prices if tp.topic == self.settings.topics.prices else self._accounts
        assert consumer is not None
        return consumer

    def _update_lag(self, tps: set[TopicPartition]) -> None:
        for tp in tps:
            self.metrics.input_offset.labels(tp.topic, str(tp.partition)).set(
                self._positions.processed[tp])
        self._refresh_lag(tps)

    def _refresh_lag(self, tps: Iterable[TopicPartition]) -> None:
        """Lag from the consumers' latest high watermarks. The loop calls it after every
        fetch, records applied or not, so that a partition that holds the others back, or
        one that stalled, shows its lag growing (a stalled one at least up to the end its
        probe found)."""
        stalled = self._positions.merge.stalled
        for tp in tps:
            if tp not in self._positions.processed:
                continue
            highwater = self._consumer_of(tp).highwater(tp)
            if tp in stalled:
                highwater = max(highwater or 0, stalled[tp][1])
            if tp in self._paused_ends:  # not fetched: the broker was asked instead
                highwater = max(highwater or 0, self._paused_ends[tp])
            if highwater is not None:
                self._set_lag(tp, highwater)

    def _set_lag(self, tp: TopicPartition, end: int) -> None:
        self.metrics.consumer_lag.labels(tp.topic, str(tp.partition)).set(
            max(0, end - self._positions.processed[tp]))

    def _log_events(self) -> None:
        """One info line per event (SPEC §8), for the events of the batch just produced."""
        for event, tp, offset in self._unlogged:
            self.log.info("event", event_id=event.event_id, type=event.type,
                          account=event.account, topic=tp.topic, partition=tp.partition,
                          offset=offset, margin_ratio=event.payload["margin_ratio"])
        self._unlogged.clear()

    def apply_batch(self, batch: Sequence[tuple[TopicPartition, ConsumerRecord]],
                    engine: Engine | ReferenceEngine, conflate: bool = False, *,
                    ticks_again: bool = False) -> list[Outgoing]:
        """Decode and apply records in order; return their events and dead letters.

        With ``conflate`` (--conflate-ticks), a tick is skipped when a later tick of the same
        symbol is in the same batch: only the latest price per symbol is applied, at its own
        place in the batch.

        With ``ticks_again`` (a catch-up: this instance applied its ticks already, and
        replays them for a gained partition's accounts), the ticks' events go out, but they
        are not counted again (consumed, stale, unused, price age) nor dead-lettered again:
        a failover counted each once more per partition taken over, and wrote each bad tick's
        dead letter as many times.
        """
        config, topics, metrics = self.config, self.settings.topics, self.metrics
        miskeyed = self._miskeyed.saw
        stats = engine.stats
        before = (stats.stale_ticks, stats.unused_ticks, stats.duplicates)
        out: list[Outgoing] = []
        now_ms, future_ms = int(time.time() * 1000), int(self.settings.max_future * 1000)
        kind_of = topics.input_kinds()
        batch_topics = [tp.topic for tp, _ in batch]
        not_after_ms = ts_bounds([message.timestamp for _, message in batch], now_ms,
                                 future_ms)
        decoded = decode_batch([kind_of[topic] for topic in batch_topics],
                               [message.value for _, message in batch], config,
                               not_after_ms=not_after_ms)
        superseded = _superseded_ticks(decoded) if conflate else set()
        if superseded:
            metrics.conflated_ticks.inc(len(superseded))
        index, size = 0, len(batch)
        while index < size:
            tp, message = batch[index]
            record = decoded[index]
            if type(record) in ACCOUNT_RECORDS:  # a run of them: `apply_account_records`
                end = index + 1
                while end < size and type(decoded[end]) in ACCOUNT_RECORDS:
                    end += 1
                records = cast(list[AccountRecord], decoded[index:end])
                sources = []
                for (run_tp, run_message), run_record in zip(batch[index:end], records,
                                                             strict=True):
                    account = run_record.account
                    if run_message.key != account.encode():  # SPEC §2: keyed by account
                        miskeyed(run_tp, run_message, account)
                    sources.append(Source(run_tp.topic, run_tp.partition, run_message.offset))
                for k, outcome in engine.apply_account_records(records, sources):
                    self._record_outcome(out, *batch[index + k], outcome, engine)
                index = end
                continue
            index += 1
            if index - 1 in superseded:
                continue
            again = ticks_again and tp.topic == topics.prices
            if isinstance(record, Rejected):
                if not again:
                    self._record_outcome(out, tp, message, record, engine)
                continue
            applied_ticks = stats.applied_ticks
            try:
                events = engine.apply(record, Source(tp.topic, tp.partition, message.offset))
            except Rejected as rejection:  # what only state makes bad input
                if not again:
                    self._record_outcome(out, tp, message, rejection, engine)
                continue
            if (isinstance(record, PriceTick) and stats.applied_ticks != applied_ticks
                    and not again):
                self._last_tick_wall[record.symbol] = time.time()
            self._record_outcome(out, tp, message, events, engine)
        for topic, count in Counter(batch_topics).items():
            if not (ticks_again and topic == topics.prices):
                metrics.records_consumed.labels(topic).inc(count)
        self._miskeyed.report()
        stale, unused, duplicates = before
        if not ticks_again:
            metrics.stale_ticks.inc(stats.stale_ticks - stale)
            metrics.unused_ticks.inc(stats.unused_ticks - unused)
        metrics.duplicates.inc(stats.duplicates - duplicates)
        return out

    def _record_outcome(self, out: list[Outgoing], tp: TopicPartition, message: ConsumerRecord,
                        outcome: list[Event] | Rejected,
                        engine: Engine | ReferenceEngine) -> None:
        """A record's events (from ``engine``), or its dead letter, onto ``out`` (in record
        order)."""
        topics = self.settings.topics
        if isinstance(outcome, Rejected):
            out.append(dead_letter_message(outcome, tp.topic, tp.partition, message.offset,
                                           message.key, message.value, topics))
            self.metrics.records_rejected.labels(tp.topic, outcome.reason).inc()
            self.log.warning("rejected", topic=tp.topic, partition=tp.partition,
                             offset=message.offset, reason=outcome.reason,
                             detail=outcome.detail)
            return
        published = self._published
        for event in outcome:
            if published:  # after a restore: no id goes out again with other contents
                event = published.checked(event, engine.renumber)
            out.append(event_message(event, topics, message.timestamp))
            self._unlogged.append((event, tp, message.offset))

    # -- observability --------------------------------------------------------------------------

    def processed_offsets(self) -> dict[TopicPartition, int]:
        """Next offset per input partition whose events are all acknowledged (for tests,
        the demo and bench)."""
        return dict(self._positions.delivered)

    def applied_offsets(self) -> dict[TopicPartition, int]:
        """Next offset per input partition to apply: ahead of `processed_offsets` by what
        awaits acknowledgement (for the bench and tests)."""
        return dict(self._positions.processed)

    def _live_figures(self) -> LiveFigures:
        engine = self.engine
        return LiveFigures(
            accounts=len(engine.accounts),
            positions=engine.positions_held,
            by_state={state.name: engine.accounts_in_state[state] for state in AccountState},
            isolated_by_state={state.name: engine.units_in_state[state]
                               for state in AccountState},
            last_tick_wall=dict(self._last_tick_wall),
            checkpoint_age=self._checkpointer.age(),
        )


def _superseded_ticks(records: Sequence[InputRecord | Rejected]) -> set[int]:
    """Indexes of ticks followed, later in the same batch, by a tick of the same symbol."""
    latest: dict[str, int] = {}
    for index, record in enumerate(records):
        if isinstance(record, PriceTick):
            latest[record.symbol] = index
    return {index for index, record in enumerate(records)
            if isinstance(record, PriceTick) and latest[record.symbol] != index}


def warm_up_kernels(on_wait: Callable[[str], None] | None = None) -> float:
    """Compile (or load from numba's cache) every kernel liqmon run uses: the engine's and
    the restore's (their `warm_up`s), under one hold of the compile lock
    (`monitor.compiled.compiling`: ``on_wait`` is called if another process holds it);
    returns the seconds it took."""
    started = time.perf_counter()
    with compiling(on_wait):
        warm_up()
        warm_up_restore()
    return time.perf_counter() - started


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
        self.monitor.assignment_changed(set(assigned))  # restored beside the heartbeats
