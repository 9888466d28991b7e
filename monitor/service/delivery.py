"""Producing with acks=all, retried with backoff while the broker is away."""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError, KafkaTimeoutError, MessageSizeTooLargeError
from structlog.stdlib import BoundLogger

from monitor.errors import LiqmonError
from monitor.service.counted_warning import CountedWarning
from monitor.service.metrics import Metrics
from monitor.service.outbox import Outgoing
from monitor.service.tasks import cancel_and_wait

MAX_BACKOFF = 5.0
SEND_ALONE_BYTES = 64 * 1024  # a checkpoint message larger than this is not batched


class DeliveryAbandoned(LiqmonError):
    """Shutdown could not deliver every pending message in time. Their inputs stay
    uncommitted, so a restart re-processes them: nothing is lost, some may repeat."""


class DeliveryFailed(LiqmonError):
    """The broker refused a message for good (too large, invalid topic, not authorised, …):
    retrying cannot help and skipping it would lose it, so the instance stops. Its input is
    not checkpointed: after the cause is fixed, a restart re-processes it. Names the event
    (or the record's size), and for one too large, the setting to raise."""

    def __init__(self, topic: str, error: BaseException,
                 message: Outgoing | None = None) -> None:
        what = remedy = ""
        if message is not None:
            size = len(message.value or b"")
            event_id = dict(message.headers).get("event_id")
            what = (f" a record of {size:,} bytes" if event_id is None
                    else f" event {event_id.decode(errors='replace')} ({size:,} bytes)")
            if isinstance(error, MessageSizeTooLargeError):
                remedy = (f"; raise the max.message.bytes of {topic!r} (Kafka's default, "
                          "1 MiB, bounds a compressed batch) and restart: README, Event size")
        super().__init__(f"cannot publish{what} to topic {topic!r}: {error!r} is not "
                         f"retriable; stopping without checkpointing its input{remedy}")
        self.topic, self.error = topic, error


def _refused(message: Outgoing, error: BaseException) -> None:
    """Raise DeliveryFailed when ``error`` is one a retry cannot fix. aiokafka marks its
    KafkaTimeoutError not retriable, but raises it when a record could not be handed over in
    time because the batch before it was not sent (the broker slow or away): waiting fixes
    that, as it fixes a request that timed out."""
    if isinstance(error, KafkaError) and not error.retriable \
            and not isinstance(error, KafkaTimeoutError):
        raise DeliveryFailed(message.topic, error, message)


def keep_batches_in_order(producer: AIOKafkaProducer,
                          retried: Callable[[str, int], None]) -> None:
    """Have the producer retry a batch until the broker takes it or refuses it for good, and
    report each retry's topic and records to ``retried``.

    aiokafka gives up on a batch older than its request timeout (a KafkaTimeoutError) and goes
    on with the partition's next batch: after a broker stall longer than that, the next batch
    was written first and the retry of the expired one after it (a liquidation behind the
    recovery that followed it). A batch that never expires is retried by the client itself,
    in order, one request in flight per partition, for as long as the error is retriable; a
    stop bounds the wait (--shutdown-timeout). aiokafka 0.14 keeps that age limit in its
    accumulator, as its idempotent producer (the embedded broker refuses one) never expires
    batches. Done once per producer."""
    accumulator = producer._message_accumulator
    if accumulator._batch_ttl == math.inf:
        return
    accumulator._batch_ttl = math.inf
    reenqueue = accumulator.reenqueue

    def counted(batch: Any) -> None:
        retried(batch.tp.topic, batch.record_count)
        reenqueue(batch)

    accumulator.reenqueue = counted


class Delivery:
    """Produces to the producer given, which from then on keeps its batches in order
    (`keep_batches_in_order`)."""

    def __init__(self, producer: AIOKafkaProducer, metrics: Metrics, log: BoundLogger,
                 shutdown_timeout: float, stop_requested_at: Callable[[], float | None]) -> None:
        self.producer = producer
        self.metrics = metrics
        self.log = log
        self.shutdown_timeout = shutdown_timeout
        self._stop_requested_at = stop_requested_at
        # the producer's own re-sends, by topic, said by `_resent` (an outage re-sends every
        # batch in flight, again and again)
        self._resent_totals: dict[str, int] = {}
        self._resent = CountedWarning(
            None, log, "events not acknowledged in time, the producer sends them again")
        keep_batches_in_order(producer, self._producer_resent)

    def _producer_resent(self, topic: str, records: int) -> None:
        """A batch the broker did not acknowledge (a request timed out, a leader moved), sent
        again by the producer: counted as retries (unlabelled), and said (`CountedWarning`)."""
        self.metrics.delivery_retries.inc(records)
        self._resent_totals[topic] = self._resent_totals.get(topic, 0) + records
        self._resent.report(self._resent_totals, dict)

    async def deliver(self, outgoing: Sequence[Outgoing]) -> list[tuple[int, int]]:
        """Produce everything; return once every message is acknowledged by all replicas,
        with the (partition, offset) each was written at, in the order acknowledged.

        Messages reach the producer in order: while it cannot take one (the broker away
        longer than the request timeout), the rest wait for it. A retry re-sends only what
        failed. A repeat carries the same event_id, and the transition counter inside the id
        orders one account's events. An error no retry can fix raises DeliveryFailed.
        """
        retry = Retry(self)
        written: list[tuple[int, int]] = []
        failed, error = await self._send(list(outgoing), retry, written)
        await self.redeliver(failed, error, retry, written)
        return written

    async def redeliver(self, failed: list[Outgoing], error: BaseException | None,
                        retry: Retry | None = None,
                        written: list[tuple[int, int]] | None = None) -> None:
        """Retry messages whose first attempt failed with ``error`` (counted as retries),
        with backoff (``retry``'s, if the first attempt's hand-over waited already), until
        every one is acknowledged; as `deliver`."""
        retry = retry or Retry(self)
        while failed:
            await retry.pause(len(failed), error)
            failed, error = await self._send(failed, retry, written)
        retry.resumed()

    async def start_sending(self, messages: Sequence[Outgoing]
                            ) -> tuple[list[asyncio.Future[Any]], KafkaError | None]:
        """Hand messages to the producer in order, without waiting for acknowledgements:
        the futures of those handed over, and the error that stopped the rest (no metadata,
        buffer full for too long: the broker is away), if one did."""
        if messages and all(message.partition is not None for message in messages):
            return await self._start_batches(messages)
        futures: list[asyncio.Future[Any]] = []
        for message in messages:
            try:
                futures.append(await self._send_one(message))
            except KafkaError as exc:
                return futures, exc
        return futures, None

    async def _send_one(self, message: Outgoing) -> asyncio.Future[Any]:
        """Hand one message to the producer (which refuses one over the request size limit)."""
        future: asyncio.Future[Any] = await self.producer.send(
            message.topic, message.value, key=message.key, headers=message.headers,
            partition=message.partition)
        return future

    async def _start_batches(self, messages: Sequence[Outgoing]
                             ) -> tuple[list[asyncio.Future[Any]], KafkaError | None]:
        """`start_sending` for messages whose partitions are known (a checkpoint's): appended
        to one record batch per partition, handed over a batch at a time. A future and a
        coroutine per message cost the loop twice as much (0.62 against 0.27 s of CPU for
        100,000 snapshots). Each message gets its batch's future; when a batch cannot be
        handed over, the messages from the first one of it on count as not handed over
        (some may then be written twice: a changelog keeps the last of a key anyway). A
        large message goes alone through `send`, which refuses one over the request size
        limit, after every batch open before it."""
        futures: list[asyncio.Future[Any] | None] = [None] * len(messages)
        open_batches: dict[tuple[str, int], tuple[Any, list[int]]] = {}
        producer = self.producer

        async def hand_over_open() -> None:
            for (topic, partition), (batch, members) in sorted(
                    open_batches.items(), key=lambda item: item[1][1][0]):
                future = await producer.send_batch(batch, topic, partition=partition)
                for k in members:
                    futures[k] = future
            open_batches.clear()

        try:
            for k, message in enumerate(messages):
                assert message.partition is not None
                key, value, headers = message.key, message.value, message.headers
                if value is not None and len(value) > SEND_ALONE_BYTES:
                    await hand_over_open()
                    futures[k] = await self._send_one(message)
                    continue
                where = (message.topic, message.partition)
                if where not in open_batches:
                    open_batches[where] = producer.create_batch(), []
                batch, members = open_batches[where]
                if batch.append(key=key, value=value, timestamp=None, headers=headers) is None:
                    await hand_over_open()  # full: hand all over, start another
                    batch, members = open_batches[where] = (producer.create_batch(), [])
                    # an empty batch takes a message of any size
                    batch.append(key=key, value=value, timestamp=None, headers=headers)
                members.append(k)
            await hand_over_open()
        except KafkaError as exc:
            handed = next((k for k, future in enumerate(futures) if future is None),
                          len(futures))
            return [f for f in futures[:handed] if f is not None], exc
        return [f for f in futures if f is not None], None

    async def hand_over_rest(self, messages: Sequence[Outgoing],
                             futures: list[asyncio.Future[Any]], error: KafkaError | None,
                             retry: Retry) -> None:
        """Hand the messages after the first ``len(futures)`` (handed over already; ``error``
        stopped the rest) to the producer, in order, adding their futures to ``futures``;
        pause with ``retry`` while it cannot take them. One it refuses for good raises
        DeliveryFailed."""
        while len(futures) < len(messages):
            if error is not None:
                _refused(messages[len(futures)], error)
                await retry.pause(len(messages) - len(futures), error)
            handed, error = await self.start_sending(messages[len(futures):])
            futures += handed

    async def _send(self, messages: list[Outgoing], retry: Retry,
                    written: list[tuple[int, int]] | None = None
                    ) -> tuple[list[Outgoing], Exception | None]:
        """One attempt at producing every message (its hand-over retried with ``retry`` until
        the producer takes all); returns those that failed, and the first error. Where the
        others were written goes to ``written``."""
        futures, error = await self.start_sending(messages)
        await self.hand_over_rest(messages, futures, error, retry)
        results = await outcomes(futures)
        failed = self.settle(messages, results)
        if written is not None:
            written += [(result.partition, result.offset) for result in results
                        if not isinstance(result, BaseException)]
        return failed, next((r for r in results if isinstance(r, Exception)), None)

    def settle(self, messages: Sequence[Outgoing], results: Sequence[Any]) -> list[Outgoing]:
        """Count what was delivered; return what was not (to retry), or raise DeliveryFailed
        when the broker refused a message for good."""
        now_ms = time.time() * 1000
        failed = []
        for message, result in zip(messages, results, strict=True):
            if isinstance(result, BaseException):
                _refused(message, result)
                failed.append(message)
                continue
            if message.event_type is None:
                continue
            self.metrics.events_emitted.labels(message.event_type).inc()
            if message.trigger_timestamp_ms is not None and message.trigger_timestamp_ms > 0:
                self.metrics.event_latency.labels(message.trigger_kind).observe(
                    max(0.0, (now_ms - message.trigger_timestamp_ms) / 1000))
        return failed


class Retry:
    """The wait before another attempt at messages the broker did not take: counted as
    retries, logged, doubled each time up to MAX_BACKOFF, and given up (DeliveryAbandoned)
    once a stop has waited --shutdown-timeout."""

    def __init__(self, delivery: Delivery) -> None:
        self._delivery = delivery
        self._backoff = 0.1
        self.failures = 0

    async def pause(self, pending: int, error: BaseException | None) -> None:
        delivery = self._delivery
        self.failures += 1
        delivery.metrics.delivery_retries.inc(pending)
        stop_at = delivery._stop_requested_at()
        if stop_at is not None and time.monotonic() - stop_at > delivery.shutdown_timeout:
            raise DeliveryAbandoned(
                f"{pending} messages could not be delivered within "
                f"{delivery.shutdown_timeout}s of the stop request ({error!r}); their inputs "
                "are not checkpointed and will be re-processed on restart"
            )
        delivery.log.warning("kafka unreachable, retrying delivery", pending=pending,
                             error=repr(error), retry_in=round(self._backoff, 2))
        await asyncio.sleep(self._backoff)
        self._backoff = min(self._backoff * 2, MAX_BACKOFF)

    def resumed(self) -> None:
        if self.failures:
            self._delivery.log.info("kafka reachable again, delivery resumed",
                                    retries=self.failures)


@dataclass(slots=True)
class _Submitted:
    """A batch in the pipeline: its messages, the futures of those handed to the producer
    (the first ones), the error that stopped the hand-over of the rest, if one did, and what
    to report once every message is acknowledged."""

    outgoing: list[Outgoing]
    delivered: Any
    futures: list[asyncio.Future[Any]] = field(default_factory=list)
    error: KafkaError | None = None

    @property
    def handed_over(self) -> bool:
        return len(self.futures) == len(self.outgoing)


class Pipeline:
    """Batches in flight: produced as soon as the engine made them, acknowledged behind it.

    The processing loop hands each batch over and goes on to the next; a settler awaits the
    acknowledgements in batch order, re-delivers what failed (with `Delivery`'s backoff), and
    only then reports the batch's input offsets as delivered. `flush()` waits for everything
    handed over so far, `settled(mark)` for everything handed over before a `mark()`: a
    checkpoint waits so before it writes the state and offsets of what it captured, so that
    an event is acknowledged before the offsets of its input are checkpointed (SPEC §6).

    Messages reach the producer in the order submitted, so that each output partition holds
    a unit's events in the order they were made: when the producer could not take all of a
    batch (the broker away for longer than the request timeout), the batches submitted after
    it wait, whole, until the settler has handed its rest over.
    """

    def __init__(self, delivery: Delivery, on_delivered: Callable[[Any], None],
                 max_in_flight: int = 100_000) -> None:
        self.delivery = delivery
        self._on_delivered = on_delivered
        self._max_in_flight = max_in_flight
        self._queue: deque[_Submitted] = deque()
        # a queued batch is not all handed over: `submit` queues batches without handing
        # them over until the settler has handed that one and every one behind it over
        self._held_back = False
        self._in_flight = 0  # messages handed over and not settled
        self._submitted = 0  # batches handed over, ever
        self._settled = 0  # batches acknowledged, ever (in order)
        self._changed = asyncio.Condition()
        self._settler: asyncio.Task[None] | None = None
        self._error: BaseException | None = None

    def start(self) -> None:
        self._settler = asyncio.create_task(self._settle_in_order())

    async def room(self) -> None:
        """Return once fewer than the most messages allowed are in flight (back-pressure: the
        broker is behind). The loop waits here before it applies a batch, never between
        applying one and submitting it."""
        self._raise_if_failed()
        if self._in_flight >= self._max_in_flight:
            async with self._changed:
                await self._changed.wait_for(
                    lambda: self._in_flight < self._max_in_flight or self._error is not None)
            self._raise_if_failed()

    async def submit(self, outgoing: list[Outgoing], delivered: Any) -> None:
        """Produce a batch without waiting for its acknowledgement; ``delivered`` is passed
        to ``on_delivered`` once every message of it is acknowledged.

        The batch counts as submitted (`mark`, what `flush` waits for) from the call on,
        before the producer takes its messages, which may wait: a checkpoint written
        meanwhile reflects the batch, so it must wait for the batch's events too."""
        self._raise_if_failed()
        self._submitted += 1
        self._in_flight += len(outgoing)
        batch = _Submitted(outgoing, delivered)
        try:
            if not self._held_back:
                # if the broker is away, the settler hands over the rest, retrying
                batch.futures, batch.error = await self.delivery.start_sending(outgoing)
                self._held_back = not batch.handed_over
        except BaseException:
            # counted, never queued: no flush may return as if its events were out
            self.abort(DeliveryAbandoned(
                f"the hand-over of a batch of {len(outgoing)} messages to the producer was "
                "cut short; its inputs stay uncommitted and are processed again on restart"))
            async with self._changed:
                self._changed.notify_all()
            raise
        self._queue.append(batch)
        async with self._changed:
            self._changed.notify_all()

    async def flush(self) -> None:
        """Return once everything submitted so far is acknowledged (or raise why not)."""
        await self.settled(self.mark())

    def mark(self) -> int:
        """A point in the stream of batches: everything submitted so far."""
        return self._submitted

    async def settled(self, mark: int) -> None:
        """Return once every batch submitted before ``mark`` is acknowledged."""
        async with self._changed:
            await self._changed.wait_for(
                lambda: self._settled >= mark or self._error is not None)
        self._raise_if_failed()

    @property
    def in_flight(self) -> int:
        """Messages handed over and not yet acknowledged."""
        return self._in_flight

    def abort(self, exc: BaseException) -> None:
        """A fatal error elsewhere: from now on submit() and flush() raise it, so that no
        checkpoint vouches for what was processed before the instance stopped."""
        if self._error is None:
            self._error = exc

    async def close(self, within: float | None = None) -> None:
        """Stop settling; wait at most ``within`` seconds for the settler to end."""
        if self._settler is not None:
            await cancel_and_wait(self._settler, within=within)

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise self._error

    async def _settle_in_order(self) -> None:
        try:
            while True:
                async with self._changed:
                    await self._changed.wait_for(lambda: bool(self._queue))
                batch = self._queue[0]
                if not batch.handed_over:
                    await self._hand_over_held_back()
                # Settled at once when acknowledged already: awaited, each batch would take a
                # turn of the loop, and while it drains a backlog (a batch of thousands of
                # records a turn) a flush would wait a turn for every batch queued before it.
                results = done_outcomes(batch.futures)
                if results is None:
                    results = await outcomes(batch.futures)
                # what the producer gave up on (it keeps batches in order while the error is
                # retriable: a producer that does not would have sent later ones meanwhile)
                failed = self.delivery.settle(batch.outgoing, results)
                if failed:
                    error = next((r for r in results if isinstance(r, BaseException)), None)
                    await self.delivery.redeliver(failed, error)
                self._queue.popleft()
                self._in_flight -= len(batch.outgoing)
                self._settled += 1
                self._on_delivered(batch.delivered)
                async with self._changed:
                    self._changed.notify_all()
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # surfaced to the loop by submit() / flush()
            self._error = exc
            async with self._changed:
                self._changed.notify_all()

    async def _hand_over_held_back(self) -> None:
        """Hand over, in order, the rest of the first queued batch and every batch queued
        behind it, retrying while the producer cannot take them (`Retry`); then `submit`
        hands over again itself. A message the broker refuses for good raises
        DeliveryFailed."""
        retry = Retry(self.delivery)
        k = 0
        while k < len(self._queue):  # batches submitted meanwhile are queued, held back
            batch = self._queue[k]
            await self.delivery.hand_over_rest(batch.outgoing, batch.futures, batch.error,
                                               retry)
            batch.error = None
            k += 1
        self._held_back = False
        retry.resumed()


def done_outcomes(futures: Sequence[asyncio.Future[Any]]) -> list[Any] | None:
    """`outcomes` of futures that are all done, read without waiting (None if one is not)."""
    if not all(future.done() for future in futures):
        return None
    return [asyncio.CancelledError() if future.cancelled()
            else future.exception() or future.result() for future in futures]


async def outcomes(futures: Sequence[asyncio.Future[Any]]) -> list[Any]:
    """Each send's result or error, in order. A caller cancelled (a shutdown abandoned)
    leaves the sends to finish, their errors read: cancelled, a batch's future would orphan
    the producer's own future behind it, whose error asyncio then logs as "Future exception
    was never retrieved" after "shutdown abandoned" has said what became of them."""
    results: list[Any] = await asyncio.shield(asyncio.gather(*futures, return_exceptions=True))
    return results
