"""Delivery (acks=all, retried while the broker is away, stopped by what no retry can fix) and
the Pipeline that acknowledges batches behind the processing loop, against the real broker."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
import structlog
from aiokafka import AIOKafkaProducer
from aiokafka.errors import (
    MessageSizeTooLargeError,
    RequestTimedOutError,
    TopicAuthorizationFailedError,
)

from monitor.service import delivery as delivery_module
from monitor.service.broker import EmbeddedBroker
from monitor.service.delivery import Delivery, DeliveryAbandoned, DeliveryFailed, Pipeline
from monitor.service.metrics import Metrics
from monitor.service.outbox import Outgoing
from monitor.service.topics import create_topics
from tests.support.kafka import fresh_settings, hand_over_held_back, read_topic

MAX_REQUEST_SIZE = 64 * 1024  # the producer refuses a larger message for good
TOO_LARGE = b"x" * (MAX_REQUEST_SIZE + 1)
RETRYING = "kafka unreachable, retrying delivery"
RESENT = "events not acknowledged in time, the producer sends them again"


def message(topic: str, n: int, value: bytes | None = None, **event: Any) -> Outgoing:
    return Outgoing(topic=topic, key=f"k{n}".encode(),
                    value=f"v{n}".encode() if value is None else value, headers=[], **event)


async def started_producer(bootstrap: str) -> AIOKafkaProducer:
    # a short request timeout: a paused broker fails a produce within a second
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=2,
                                max_request_size=MAX_REQUEST_SIZE, request_timeout_ms=1_000)
    await producer.start()
    return producer


@pytest.fixture
async def topic(broker: EmbeddedBroker) -> str:
    """A one-partition topic of the test's own on the shared broker."""
    settings = fresh_settings(broker.bootstrap)
    await create_topics(settings)
    return settings.topics.margin_calls


@pytest.fixture
async def producer(broker: EmbeddedBroker) -> AsyncIterator[AIOKafkaProducer]:
    producer = await started_producer(broker.bootstrap)
    yield producer
    await producer.stop()


@pytest.fixture
async def paused(own_broker: EmbeddedBroker) -> AsyncIterator[tuple[AIOKafkaProducer, str]]:
    """A producer and a topic on a broker of the test's own, paused once the producer knows
    the topic: every produce request times out (retriably) until the test resumes it."""
    settings = fresh_settings(own_broker.bootstrap)
    await create_topics(settings)
    topic = settings.topics.margin_calls
    producer = await started_producer(own_broker.bootstrap)
    await producer.send_and_wait(topic, b"known", key=b"k")  # metadata before the outage
    own_broker.pause()
    yield producer, topic
    own_broker.resume()
    await producer.stop()


@pytest.fixture
async def unreachable(own_broker: EmbeddedBroker
                      ) -> AsyncIterator[tuple[AIOKafkaProducer, str]]:
    """A producer and a topic it has not learned yet, on a broker of the test's own, paused:
    the producer cannot take a message for the topic (no metadata within its request
    timeout) until the test resumes the broker."""
    producer = await started_producer(own_broker.bootstrap)
    settings = fresh_settings(own_broker.bootstrap)
    await create_topics(settings)  # after the producer's first look at the cluster
    own_broker.pause()
    yield producer, settings.topics.margin_calls
    own_broker.resume()
    await producer.stop()


def delivery_of(producer: AIOKafkaProducer, metrics: Metrics | None = None,
                shutdown_timeout: float = 30.0,
                stop_requested_at: float | None = None) -> Delivery:
    return Delivery(producer, metrics or Metrics(), structlog.get_logger("test_delivery"),
                    shutdown_timeout, lambda: stop_requested_at)


async def values_of(bootstrap: str, topic: str) -> list[bytes]:
    return [record.value for record in await read_topic(bootstrap, topic)]


async def said(logs: list[dict[str, Any]], event: str, times: int) -> None:
    """Until ``event`` has been logged ``times`` times."""
    while sum(entry["event"] == event for entry in logs) < times:
        await asyncio.sleep(0.05)


def retries(metrics: Metrics) -> float:
    return metrics.registry.get_sample_value("liqmon_delivery_retries_total") or 0.0


async def retried(metrics: Metrics, messages: int) -> None:
    """Until ``messages`` messages have been retried in all (a failure after 30 s)."""
    async with asyncio.timeout(30):
        while retries(metrics) < messages:
            await asyncio.sleep(0.05)


# -- Delivery --------------------------------------------------------------------------------------


@pytest.mark.asyncio(loop_scope="session")
async def test_deliver_returns_with_every_message_on_the_topic_in_order(
        broker: EmbeddedBroker, topic: str, producer: AIOKafkaProducer) -> None:
    await delivery_of(producer).deliver([message(topic, n) for n in range(50)])
    assert await values_of(broker.bootstrap, topic) == [f"v{n}".encode() for n in range(50)]


@pytest.mark.asyncio(loop_scope="session")
async def test_only_events_count_as_emitted_once_acknowledged(
        topic: str, producer: AIOKafkaProducer) -> None:
    metrics = Metrics()
    await delivery_of(producer, metrics).deliver([
        message(topic, 0, event_type="liquidation"), message(topic, 1, event_type="recovered"),
        message(topic, 2)])  # a dead letter: no event type
    sample = metrics.registry.get_sample_value
    assert sample("liqmon_events_emitted_total", {"type": "liquidation"}) == 1
    assert sample("liqmon_events_emitted_total", {"type": "recovered"}) == 1
    assert sample("liqmon_events_emitted_total", {"type": "margin_call"}) is None


@pytest.mark.asyncio(loop_scope="session")
async def test_latency_is_observed_for_an_event_whose_trigger_has_a_timestamp(
        topic: str, producer: AIOKafkaProducer) -> None:
    metrics = Metrics()
    an_hour_ago = int(time.time() * 1000) - 3_600_000
    await delivery_of(producer, metrics).deliver([
        message(topic, 0, event_type="margin_call", trigger_kind="price",
                trigger_timestamp_ms=an_hour_ago),
        message(topic, 1, event_type="margin_call", trigger_kind="price",
                trigger_timestamp_ms=None),
        message(topic, 2, event_type="margin_call", trigger_kind="price",
                trigger_timestamp_ms=0)])  # no timestamp: nothing to measure from
    sample = metrics.registry.get_sample_value
    assert sample("liqmon_event_latency_seconds_count", {"trigger": "price"}) == 1
    assert sample("liqmon_event_latency_seconds_sum", {"trigger": "price"}) >= 3_600


@pytest.mark.asyncio(loop_scope="session")
async def test_a_message_the_producer_refuses_for_good_stops_delivery_naming_its_topic(
        topic: str, producer: AIOKafkaProducer) -> None:
    metrics = Metrics()
    whale = Outgoing(topic=topic, key=b"whale", value=TOO_LARGE,
                     headers=[("event_type", b"liquidation"),
                              ("event_id", b"whale:1:liquidation")], event_type="liquidation")
    with pytest.raises(DeliveryFailed) as failed:
        await delivery_of(producer, metrics).deliver([whale])
    assert failed.value.topic == topic
    assert isinstance(failed.value.error, MessageSizeTooLargeError)
    # an operator learns which event, how large, and what to raise
    assert str(failed.value).startswith(
        f"cannot publish event whale:1:liquidation (65,537 bytes) to topic {topic!r}: "
        "MessageSizeTooLargeError")
    assert str(failed.value).endswith(f"raise the max.message.bytes of {topic!r} (Kafka's "
                                      "default, 1 MiB, bounds a compressed batch) and restart: "
                                      "README, Event size")
    assert metrics.registry.get_sample_value("liqmon_delivery_retries_total") == 0


@pytest.mark.asyncio(loop_scope="session")
async def test_start_sending_hands_over_messages_up_to_the_first_the_producer_refuses(
        topic: str, producer: AIOKafkaProducer) -> None:
    futures, error = await delivery_of(producer).start_sending(
        [message(topic, 0), message(topic, 1, TOO_LARGE), message(topic, 2)])
    assert len(futures) == 1
    assert isinstance(error, MessageSizeTooLargeError)
    await asyncio.gather(*futures)


def placed(topic: str, n: int, value: bytes | None = None) -> Outgoing:
    """A checkpoint's kind of message: its partition chosen, not left to the partitioner."""
    return Outgoing(topic=topic, key=f"k{n}".encode(),
                    value=f"v{n}".encode() if value is None else value, headers=[],
                    partition=0)


@pytest.mark.asyncio(loop_scope="session")
async def test_messages_of_known_partitions_arrive_in_order_across_several_record_batches(
        broker: EmbeddedBroker, topic: str, producer: AIOKafkaProducer) -> None:
    values = [bytes([n]) * 1000 for n in range(60)]  # 60 KB: several of the producer's batches
    await delivery_of(producer).deliver([placed(topic, n, v) for n, v in enumerate(values)])
    assert await values_of(broker.bootstrap, topic) == values


@pytest.mark.asyncio(loop_scope="session")
async def test_messages_of_known_partitions_are_retried_while_the_broker_is_away(
        own_broker: EmbeddedBroker, paused: tuple[AIOKafkaProducer, str]) -> None:
    producer, topic = paused
    metrics = Metrics()
    delivering = asyncio.create_task(
        delivery_of(producer, metrics).deliver([placed(topic, n) for n in range(3)]))
    await retried(metrics, 2 * 3)
    own_broker.resume()
    await delivering
    assert (await values_of(own_broker.bootstrap, topic))[-3:] == [b"v0", b"v1", b"v2"]


@pytest.mark.asyncio(loop_scope="session")
async def test_a_message_of_a_known_partition_refused_for_good_stops_delivery(
        topic: str, producer: AIOKafkaProducer) -> None:
    with pytest.raises(DeliveryFailed) as failed:
        await delivery_of(producer).deliver([placed(topic, 0), placed(topic, 1, TOO_LARGE)])
    assert failed.value.topic == topic


@pytest.mark.asyncio(loop_scope="session")
async def test_settle_returns_the_messages_that_failed_retriably_to_be_sent_again(
        topic: str, producer: AIOKafkaProducer) -> None:
    delivered = await producer.send_and_wait(topic, b"v0", key=b"k0")
    first, second = message(topic, 0), message(topic, 1)
    assert delivery_of(producer).settle([first, second],
                                        [delivered, RequestTimedOutError()]) == [second]


@pytest.mark.asyncio(loop_scope="session")
async def test_settle_raises_for_a_result_the_broker_refused_for_good(
        topic: str, producer: AIOKafkaProducer) -> None:
    with pytest.raises(DeliveryFailed) as failed:
        delivery_of(producer).settle([message(topic, 0)], [TopicAuthorizationFailedError()])
    assert failed.value.topic == topic


@pytest.mark.asyncio(loop_scope="session")
async def test_the_producer_retries_a_batch_past_its_request_timeout_until_the_broker_is_back(
        own_broker: EmbeddedBroker, paused: tuple[AIOKafkaProducer, str]) -> None:
    """aiokafka would fail a batch older than its request timeout (1 s here) and go on with
    the partition's next one; kept, the batch is retried by the producer itself, counted."""
    producer, topic = paused
    metrics = Metrics()
    futures, error = await delivery_of(producer, metrics).start_sending(
        [message(topic, n) for n in range(3)])
    assert error is None
    await retried(metrics, 2 * 3)  # two requests timed out, each retried
    done, _ = await asyncio.wait(futures, timeout=1.0)
    assert not done
    own_broker.resume()
    await asyncio.gather(*futures)
    assert (await values_of(own_broker.bootstrap, topic))[-3:] == [b"v0", b"v1", b"v2"]


@pytest.mark.asyncio(loop_scope="session")
async def test_the_producer_s_re_sends_are_said_at_once_then_at_most_every_30_s(
        own_broker: EmbeddedBroker, paused: tuple[AIOKafkaProducer, str]) -> None:
    """The runbook sends the operator to the logs when retries are counted: the producer's
    own re-sends (no hand-over failed, so `Retry` says nothing) must show there too, without
    a line per re-sent batch through a long outage."""
    producer, topic = paused
    metrics = Metrics()
    with structlog.testing.capture_logs() as logs:
        futures, _ = await delivery_of(producer, metrics).start_sending(
            [message(topic, n) for n in range(3)])
        await retried(metrics, 2 * 3)  # the batch re-sent twice
        own_broker.resume()
        await asyncio.gather(*futures)
    (line,) = [entry for entry in logs if entry["event"] == RESENT]
    assert line["log_level"] == "warning"
    assert line == {**line, "records": 3, "by_topic": {topic: 3}}  # the first re-send


@pytest.mark.asyncio(loop_scope="session")
async def test_delivery_retries_while_the_producer_cannot_take_messages_and_resumes_after(
        own_broker: EmbeddedBroker, unreachable: tuple[AIOKafkaProducer, str]) -> None:
    producer, topic = unreachable
    metrics = Metrics()
    with structlog.testing.capture_logs() as logs:
        delivering = asyncio.create_task(
            delivery_of(producer, metrics).deliver([message(topic, n) for n in range(3)]))
        await said(logs, RETRYING, times=2)
        own_broker.resume()
        await delivering
    (resumed,) = [e for e in logs if e["event"] == "kafka reachable again, delivery resumed"]
    assert resumed["retries"] >= 2
    assert metrics.registry.get_sample_value("liqmon_delivery_retries_total") >= 2 * 3
    assert (await values_of(own_broker.bootstrap, topic))[-3:] == [b"v0", b"v1", b"v2"]


@pytest.mark.asyncio(loop_scope="session")
async def test_records_not_handed_over_in_time_while_the_broker_is_away_are_retried(
        own_broker: EmbeddedBroker, paused: tuple[AIOKafkaProducer, str]) -> None:
    """Forty 4 KB messages to one partition: the producer's first batch is sent and waits for
    the paused broker, the next fills up behind it, and the producer gives up on the rest
    after its request timeout with a KafkaTimeoutError, which aiokafka marks not retriable.
    The broker is away, not refusing: delivery retries, and stops for nothing."""
    producer, topic = paused
    values = [b"%02d" % n + b"x" * 4_000 for n in range(40)]
    with structlog.testing.capture_logs() as logs:
        delivering = asyncio.create_task(delivery_of(producer).deliver(
            [message(topic, n, value) for n, value in enumerate(values)]))
        retrying = asyncio.create_task(said(logs, RETRYING, times=2))
        await asyncio.wait([delivering, retrying], return_when=asyncio.FIRST_COMPLETED)
        assert not delivering.done(), delivering.exception()  # it gave up: DeliveryFailed
        own_broker.resume()
        await delivering
    assert any("KafkaTimeoutError" in entry["error"] for entry in logs
               if entry["event"] == RETRYING)
    assert (await values_of(own_broker.bootstrap, topic))[-40:] == values


@pytest.mark.asyncio(loop_scope="session")
async def test_retries_back_off_doubling_up_to_the_longest_wait(
        own_broker: EmbeddedBroker, unreachable: tuple[AIOKafkaProducer, str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(delivery_module, "MAX_BACKOFF", 0.4)  # reached in three retries
    producer, topic = unreachable
    with structlog.testing.capture_logs() as logs:
        delivering = asyncio.create_task(delivery_of(producer).deliver([message(topic, 0)]))
        await said(logs, RETRYING, times=4)
        own_broker.resume()
        await delivering
    waits = [entry["retry_in"] for entry in logs if entry["event"] == RETRYING]
    assert waits[:4] == [0.1, 0.2, 0.4, 0.4]


@pytest.mark.asyncio(loop_scope="session")
async def test_delivery_is_abandoned_once_a_stop_request_is_older_than_the_shutdown_timeout(
        unreachable: tuple[AIOKafkaProducer, str]) -> None:
    producer, topic = unreachable
    delivery = delivery_of(producer, shutdown_timeout=0.5,
                           stop_requested_at=time.monotonic() - 1.0)
    with pytest.raises(DeliveryAbandoned, match="1 messages could not be delivered"):
        await delivery.deliver([message(topic, 0)])


# -- Pipeline --------------------------------------------------------------------------------------


@pytest.fixture
async def running() -> AsyncIterator[list[Pipeline]]:
    """Pipelines a test starts, closed when it ends."""
    pipelines: list[Pipeline] = []
    yield pipelines
    for pipeline in pipelines:
        await pipeline.close()


def started_pipeline(producer: AIOKafkaProducer, delivered: list[Any],
                     running: list[Pipeline], max_in_flight: int = 100_000,
                     metrics: Metrics | None = None) -> Pipeline:
    pipeline = Pipeline(delivery_of(producer, metrics), delivered.append, max_in_flight)
    pipeline.start()
    running.append(pipeline)
    return pipeline


@pytest.mark.asyncio(loop_scope="session")
async def test_the_pipeline_reports_batches_delivered_in_the_order_they_were_submitted(
        topic: str, producer: AIOKafkaProducer, running: list[Pipeline]) -> None:
    delivered: list[Any] = []
    pipeline = started_pipeline(producer, delivered, running)
    for batch in range(20):
        await pipeline.submit([message(topic, batch * 10 + n) for n in range(10)], batch)
    await pipeline.flush()
    assert delivered == list(range(20))


@pytest.mark.asyncio(loop_scope="session")
async def test_flush_returns_once_every_submitted_message_is_on_the_topic(
        broker: EmbeddedBroker, topic: str, producer: AIOKafkaProducer,
        running: list[Pipeline]) -> None:
    pipeline = started_pipeline(producer, [], running)
    for batch in range(5):
        await pipeline.submit([message(topic, batch * 10 + n) for n in range(10)], batch)
    await pipeline.flush()
    assert pipeline.in_flight == 0
    assert len(await values_of(broker.bootstrap, topic)) == 50


@pytest.mark.asyncio(loop_scope="session")
async def test_flush_raises_when_a_submitted_message_is_refused_for_good(
        topic: str, producer: AIOKafkaProducer, running: list[Pipeline]) -> None:
    delivered: list[Any] = []
    pipeline = started_pipeline(producer, delivered, running)
    await pipeline.submit([message(topic, 0)], "fits")
    await pipeline.submit([message(topic, 1, TOO_LARGE)], "too large")
    with pytest.raises(DeliveryFailed):
        await pipeline.flush()
    assert delivered == ["fits"]  # the refused batch's input is never reported delivered


@pytest.mark.asyncio(loop_scope="session")
async def test_submit_raises_once_a_message_was_refused_for_good(
        topic: str, producer: AIOKafkaProducer, running: list[Pipeline]) -> None:
    pipeline = started_pipeline(producer, [], running)
    await pipeline.submit([message(topic, 0, TOO_LARGE)], "too large")
    with pytest.raises(DeliveryFailed):
        await pipeline.flush()
    with pytest.raises(DeliveryFailed):
        await pipeline.submit([message(topic, 1)], "after")


@pytest.mark.asyncio(loop_scope="session")
async def test_after_abort_submit_and_flush_raise_the_error_that_stopped_the_instance(
        topic: str, producer: AIOKafkaProducer, running: list[Pipeline]) -> None:
    pipeline = started_pipeline(producer, [], running)
    stopped = RuntimeError("the loop failed")
    pipeline.abort(stopped)
    with pytest.raises(RuntimeError) as from_flush:
        await pipeline.flush()
    with pytest.raises(RuntimeError) as from_submit:
        await pipeline.submit([message(topic, 0)], "after")
    assert from_flush.value is stopped and from_submit.value is stopped


@pytest.mark.asyncio(loop_scope="session")
async def test_the_pipeline_delivers_a_batch_again_when_the_broker_is_back(
        own_broker: EmbeddedBroker, paused: tuple[AIOKafkaProducer, str],
        running: list[Pipeline]) -> None:
    producer, topic = paused
    delivered: list[Any] = []
    metrics = Metrics()
    pipeline = started_pipeline(producer, delivered, running, metrics=metrics)
    await pipeline.submit([message(topic, n) for n in range(3)], "batch")
    await retried(metrics, 3)  # the first attempt failed
    own_broker.resume()
    await pipeline.flush()
    assert delivered == ["batch"]
    # the failed first attempt counts: an outage whose first retry succeeds still shows
    assert metrics.registry.get_sample_value("liqmon_delivery_retries_total") >= 3
    assert (await values_of(own_broker.bootstrap, topic))[-3:] == [b"v0", b"v1", b"v2"]


@pytest.mark.asyncio(loop_scope="session")
async def test_room_waits_while_the_most_messages_in_flight_are_unacknowledged(
        own_broker: EmbeddedBroker, paused: tuple[AIOKafkaProducer, str],
        running: list[Pipeline]) -> None:
    producer, topic = paused
    delivered: list[Any] = []
    metrics = Metrics()
    pipeline = started_pipeline(producer, delivered, running, max_in_flight=2,
                                metrics=metrics)
    await pipeline.submit([message(topic, 0), message(topic, 1)], "first")
    room = asyncio.create_task(pipeline.room())
    await retried(metrics, 2)  # the first batch failed once: still in flight
    assert not room.done()
    assert pipeline.in_flight == 2
    own_broker.resume()
    await room
    await pipeline.submit([message(topic, 2)], "second")
    await pipeline.flush()
    assert delivered == ["first", "second"]


@pytest.mark.asyncio(loop_scope="session")
async def test_a_batch_submitted_while_an_earlier_one_is_retried_is_written_after_it(
        own_broker: EmbeddedBroker, paused: tuple[AIOKafkaProducer, str],
        running: list[Pipeline]) -> None:
    """The first batch's request timed out; had the producer given up on it, the second
    would go out while the first waited for its retry (a recovery before its liquidation)."""
    producer, topic = paused
    metrics = Metrics()
    pipeline = started_pipeline(producer, [], running, metrics=metrics)
    await pipeline.submit([message(topic, 0)], "first")
    await retried(metrics, 1)
    await pipeline.submit([message(topic, 1)], "second")
    own_broker.resume()
    await pipeline.flush()
    assert (await values_of(own_broker.bootstrap, topic))[-2:] == [b"v0", b"v1"]


@pytest.mark.asyncio(loop_scope="session")
async def test_batches_submitted_after_one_not_all_handed_over_are_written_after_its_rest(
        own_broker: EmbeddedBroker, paused: tuple[AIOKafkaProducer, str],
        running: list[Pipeline]) -> None:
    """Forty 4 KB messages to one partition: the producer takes a batch's worth, then gives
    up on the rest after its request timeout (as in the test of Delivery above). The broker
    is back; a batch submitted while the settler waits to hand the rest over (its backoff)
    is held back until it has."""
    producer, topic = paused
    first = [b"%02d" % n + b"x" * 4_000 for n in range(40)]
    pipeline = started_pipeline(producer, [], running)
    with structlog.testing.capture_logs() as logs:
        await pipeline.submit([message(topic, n, value) for n, value in enumerate(first)],
                              "first")
        own_broker.resume()
        await said(logs, RETRYING, times=1)
        await pipeline.submit([message(topic, 40, b"second")], "second")
        await pipeline.flush()
    assert (await values_of(own_broker.bootstrap, topic))[-41:] == [*first, b"second"]


@pytest.mark.asyncio(loop_scope="session")
async def test_a_flush_waits_for_a_batch_the_producer_is_still_taking(
        topic: str, producer: AIOKafkaProducer, running: list[Pipeline],
        monkeypatch: pytest.MonkeyPatch) -> None:
    delivered: list[Any] = []
    pipeline = started_pipeline(producer, delivered, running)
    taking, go_on = hand_over_held_back(pipeline, monkeypatch)
    submitting = asyncio.create_task(pipeline.submit([message(topic, 0)], "held back"))
    await taking.wait()
    flushing = asyncio.create_task(pipeline.flush())
    await asyncio.sleep(0.2)
    assert not flushing.done()  # a checkpoint flushing now reflects the batch: it waits
    go_on.set()
    await submitting
    await flushing
    assert delivered == ["held back"]


@pytest.mark.asyncio(loop_scope="session")
async def test_a_hand_over_cut_short_makes_flush_raise_rather_than_wait_for_ever(
        topic: str, producer: AIOKafkaProducer, running: list[Pipeline],
        monkeypatch: pytest.MonkeyPatch) -> None:
    pipeline = started_pipeline(producer, [], running)
    taking, _ = hand_over_held_back(pipeline, monkeypatch)
    submitting = asyncio.create_task(pipeline.submit([message(topic, 0)], "cut short"))
    await taking.wait()
    flushing = asyncio.create_task(pipeline.flush())
    await asyncio.sleep(0.05)
    submitting.cancel()
    with pytest.raises(DeliveryAbandoned, match="cut short"):
        await asyncio.wait_for(flushing, timeout=5)


async def test_acknowledgements_already_in_are_read_without_waiting() -> None:
    """The settler takes every batch acknowledged meanwhile at once, rather than a turn of
    the loop each (a turn that applies thousands of records while a backlog drains)."""
    loop = asyncio.get_running_loop()
    acked, refused, cancelled, pending = (loop.create_future() for _ in range(4))
    acked.set_result("metadata")
    refused.set_exception(RequestTimedOutError())
    cancelled.cancel()
    outcomes = delivery_module.done_outcomes([acked, refused, cancelled])
    assert outcomes is not None
    assert outcomes[0] == "metadata"
    assert isinstance(outcomes[1], RequestTimedOutError)
    assert isinstance(outcomes[2], asyncio.CancelledError)
    assert delivery_module.done_outcomes([acked, pending]) is None
    pending.cancel()
