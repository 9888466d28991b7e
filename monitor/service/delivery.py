"""Producing with acks=all, retried with backoff while the broker is away."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError
from structlog.stdlib import BoundLogger

from monitor.service.metrics import Metrics
from monitor.service.outbox import Outgoing

MAX_BACKOFF = 5.0


class DeliveryAbandoned(RuntimeError):
    """Shutdown could not deliver every pending message in time. Their inputs stay
    uncommitted, so a restart re-processes them: nothing is lost, some may repeat."""


class Delivery:
    def __init__(self, producer: AIOKafkaProducer, metrics: Metrics, log: BoundLogger,
                 shutdown_timeout: float, stop_requested_at: Callable[[], float | None]) -> None:
        self.producer = producer
        self.metrics = metrics
        self.log = log
        self.shutdown_timeout = shutdown_timeout
        self._stop_requested_at = stop_requested_at

    async def deliver(self, outgoing: Sequence[Outgoing]) -> None:
        """Produce everything; return once every message is acknowledged by all replicas.

        A retry re-sends only what failed. A repeat carries the same event_id, and the
        transition counter inside the id orders one account's events.
        """
        pending, backoff, failures = list(outgoing), 0.1, 0
        while pending:
            failed, error = await self._send(pending)
            if not failed:
                if failures:
                    self.log.info("kafka reachable again, delivery resumed", retries=failures)
                return
            failures += 1
            self.metrics.delivery_retries.inc(len(failed))
            stop_at = self._stop_requested_at()
            if stop_at is not None and time.monotonic() - stop_at > self.shutdown_timeout:
                raise DeliveryAbandoned(
                    f"{len(failed)} messages could not be delivered within "
                    f"{self.shutdown_timeout}s of the stop request ({error!r}); their inputs "
                    "are not checkpointed and will be re-processed on restart"
                )
            self.log.warning("kafka unreachable, retrying delivery", pending=len(failed),
                             error=repr(error), retry_in=round(backoff, 2))
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, MAX_BACKOFF)
            pending = failed

    async def _send(self, messages: list[Outgoing]) -> tuple[list[Outgoing], Exception | None]:
        """One attempt at producing every message; returns those that failed."""
        futures: list[asyncio.Future[Any]] = []
        for index, message in enumerate(messages):
            try:
                futures.append(await self.producer.send(
                    message.topic, message.value, key=message.key, headers=message.headers,
                    partition=message.partition))
            except KafkaError as exc:  # no metadata, buffer full for too long: broker away
                results = await asyncio.gather(*futures, return_exceptions=True)
                failed = self._settle(messages[:index], results)
                return failed + messages[index:], exc
        results = await asyncio.gather(*futures, return_exceptions=True)
        errors = [r for r in results if isinstance(r, Exception)]
        return self._settle(messages, results), errors[0] if errors else None

    def _settle(self, messages: Sequence[Outgoing], results: Sequence[Any]) -> list[Outgoing]:
        """Count what was delivered; return what was not."""
        now_ms = time.time() * 1000
        failed = []
        for message, result in zip(messages, results, strict=True):
            if isinstance(result, BaseException):
                failed.append(message)
                continue
            if message.event_type is None:
                continue
            self.metrics.events_emitted.labels(message.event_type).inc()
            if message.trigger_timestamp_ms is not None and message.trigger_timestamp_ms > 0:
                self.metrics.event_latency.labels(message.trigger_kind).observe(
                    max(0.0, (now_ms - message.trigger_timestamp_ms) / 1000))
        return failed
