"""The messages the service produces (SPEC §2): events on the topic their type names, keyed by
account; dead letters with the `__liqmon.errors.*` headers and the rejected input. Read back
from the real broker where Kafka carries what is checked."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest
import structlog
from aiokafka import AIOKafkaProducer
from aiokafka.structs import ConsumerRecord
from jsonschema import Draft202012Validator

from monitor.events import Event
from monitor.records import Rejected
from monitor.service.broker import EmbeddedBroker
from monitor.service.delivery import Delivery
from monitor.service.metrics import Metrics
from monitor.service.outbox import (
    DEAD_LETTER_TEXT_LIMIT,
    Outgoing,
    dead_letter_message,
    event_message,
)
from monitor.service.settings import Topics
from monitor.service.topics import create_topics
from tests.support.kafka import fresh_settings, read_topic
from tests.support.paths import REPO

REJECTED = Rejected("unknown_kind", "kind: must be one of deposit, …, got 'gift'")


def event(event_type: str, account: str = "acct-7") -> Event:
    eid = f"{account}:3:{event_type}"
    return Event(event_id=eid, type=event_type, account=account,
                 payload={"event_id": eid, "type": event_type, "account": account,
                          "trigger": {"kind": "price", "topic": "prices", "partition": 0,
                                      "offset": 41}})


def dead_letter(key: bytes | None = b"acct-7", value: bytes | None = b'{"kind": "gift"}',
                topics: Topics | None = None) -> Outgoing:
    return dead_letter_message(REJECTED, "ledger", 2, 41, key, value, topics or Topics())


@pytest.fixture
async def topics(broker: EmbeddedBroker) -> Topics:
    settings = fresh_settings(broker.bootstrap)
    await create_topics(settings)
    return settings.topics


@pytest.fixture
async def producer(broker: EmbeddedBroker) -> AsyncIterator[AIOKafkaProducer]:
    producer = AIOKafkaProducer(bootstrap_servers=broker.bootstrap, acks="all")
    await producer.start()
    yield producer
    await producer.stop()


async def published(broker: EmbeddedBroker, producer: AIOKafkaProducer, message: Outgoing,
                    topic: str) -> list[ConsumerRecord[Any, Any]]:
    """Deliver the message as the service does, then read back everything ``topic`` holds."""
    delivery = Delivery(producer, Metrics(), structlog.get_logger("test_outbox"), 30.0,
                        lambda: None)
    await delivery.deliver([message])
    return await read_topic(broker.bootstrap, topic)


# -- events ----------------------------------------------------------------------------------------


@pytest.mark.asyncio(loop_scope="session")
async def test_a_liquidation_goes_to_the_liquidations_topic_keyed_by_account(
        broker: EmbeddedBroker, producer: AIOKafkaProducer, topics: Topics) -> None:
    message = event_message(event("liquidation"), topics, trigger_timestamp_ms=1)
    (record,) = await published(broker, producer, message, topics.liquidations)
    assert record.key == b"acct-7"
    assert await read_topic(broker.bootstrap, topics.margin_calls) == []


@pytest.mark.asyncio(loop_scope="session")
@pytest.mark.parametrize("event_type", ["margin_call", "recovered"])
async def test_margin_calls_and_recoveries_go_to_the_margin_calls_topic_keyed_by_account(
        event_type: str, broker: EmbeddedBroker, producer: AIOKafkaProducer,
        topics: Topics) -> None:
    message = event_message(event(event_type), topics, trigger_timestamp_ms=1)
    (record,) = await published(broker, producer, message, topics.margin_calls)
    assert record.key == b"acct-7"
    assert await read_topic(broker.bootstrap, topics.liquidations) == []


@pytest.mark.asyncio(loop_scope="session")
async def test_an_event_carries_its_type_and_id_as_headers(
        broker: EmbeddedBroker, producer: AIOKafkaProducer, topics: Topics) -> None:
    message = event_message(event("margin_call"), topics, trigger_timestamp_ms=1)
    (record,) = await published(broker, producer, message, topics.margin_calls)
    assert list(record.headers) == [("event_type", b"margin_call"),
                                    ("event_id", b"acct-7:3:margin_call")]


def test_an_event_value_is_its_payload_stamped_with_the_publication_time() -> None:
    happened = event("liquidation")
    value = orjson.loads(event_message(happened, Topics(), trigger_timestamp_ms=1).value or b"")
    assert {k: v for k, v in value.items() if k != "emitted_at"} == happened.payload
    assert isinstance(value["emitted_at"], int)


def test_an_event_message_carries_what_its_metrics_need() -> None:
    message = event_message(event("recovered"), Topics(), trigger_timestamp_ms=1_234)
    assert (message.event_type, message.trigger_kind, message.trigger_timestamp_ms) == \
        ("recovered", "price", 1_234)


# -- dead letters ----------------------------------------------------------------------------------


@pytest.mark.asyncio(loop_scope="session")
async def test_a_dead_letter_carries_the_reason_and_the_source_as_headers(
        broker: EmbeddedBroker, producer: AIOKafkaProducer, topics: Topics) -> None:
    (record,) = await published(broker, producer, dead_letter(topics=topics), topics.dead_letter)
    assert list(record.headers) == [("__liqmon.errors.reason", b"unknown_kind"),
                                    ("__liqmon.errors.topic", b"ledger"),
                                    ("__liqmon.errors.partition", b"2"),
                                    ("__liqmon.errors.offset", b"41")]


@pytest.mark.asyncio(loop_scope="session")
async def test_a_dead_letter_is_keyed_by_the_source_key(
        broker: EmbeddedBroker, producer: AIOKafkaProducer, topics: Topics) -> None:
    (record,) = await published(broker, producer, dead_letter(topics=topics), topics.dead_letter)
    assert record.key == b"acct-7"


@pytest.mark.asyncio(loop_scope="session")
async def test_a_dead_letter_value_holds_the_error_the_source_and_the_original_input(
        broker: EmbeddedBroker, producer: AIOKafkaProducer, topics: Topics) -> None:
    (record,) = await published(broker, producer, dead_letter(topics=topics), topics.dead_letter)
    assert orjson.loads(record.value) == {
        "error": str(REJECTED), "source_topic": "ledger", "source_partition": 2,
        "source_offset": 41, "key": "acct-7", "value": '{"kind": "gift"}'}


def test_a_dead_letter_value_follows_its_schema() -> None:
    schema = json.loads((REPO / "schemas" / "dead_letter.schema.json").read_text())
    Draft202012Validator(schema).validate(orjson.loads(dead_letter().value or b""))


def test_a_dead_letter_of_bytes_that_are_not_utf8_carries_them_with_replacement_characters(
) -> None:
    value = orjson.loads(dead_letter(key=b"\xffk", value=b"\x01\xfe").value or b"")
    assert (value["key"], value["value"]) == ("\ufffdk", "\x01\ufffd")


def test_a_dead_letter_of_a_tombstone_without_a_key_has_an_empty_value_and_a_null_key() -> None:
    message = dead_letter(key=None, value=None)
    value = orjson.loads(message.value or b"")
    assert (message.key, value["key"], value["value"]) == (None, None, "")


def test_a_dead_letter_goes_to_the_dead_letter_topic_and_counts_as_no_event() -> None:
    message = dead_letter(topics=Topics(dead_letter="dlq"))
    assert (message.topic, message.event_type) == ("dlq", None)


def test_a_dead_letter_holds_a_value_of_the_limit_whole() -> None:
    value = b"x" * DEAD_LETTER_TEXT_LIMIT
    message = dead_letter(value=value)
    letter = orjson.loads(message.value or b"")
    assert (letter["value"], letter["error"]) == (value.decode(), str(REJECTED))
    assert "__liqmon.errors.value.bytes" not in dict(message.headers)


def test_a_dead_letter_cuts_a_longer_value_and_says_so() -> None:
    message = dead_letter(value=b"x" * 100_000)
    letter = orjson.loads(message.value or b"")
    assert letter["value"] == "x" * 65_536
    assert letter["error"] == (f"{REJECTED}; this dead letter holds the first 65,536 "
                               "characters of the input's value (100,000 characters)")
    assert dict(message.headers)["__liqmon.errors.value.bytes"] == b"100000"


def test_a_dead_letter_cuts_a_longer_key_in_its_value_and_as_its_kafka_key() -> None:
    key = b"k" * 70_000
    message = dead_letter(key=key)
    letter = orjson.loads(message.value or b"")
    assert (message.key, letter["key"]) == (b"k" * 65_536, "k" * 65_536)
    assert letter["error"].endswith("of the input's key (70,000 characters)")
    headers = dict(message.headers)
    assert headers["__liqmon.errors.value.bytes"] == b"16"  # '{"kind": "gift"}'
    assert headers["__liqmon.errors.key.bytes"] == b"70000"


def test_a_dead_letter_keeps_a_key_of_the_limit_whole() -> None:
    key = b"k" * DEAD_LETTER_TEXT_LIMIT
    message = dead_letter(key=key)
    assert message.key == key
    assert "__liqmon.errors.key.bytes" not in dict(message.headers)


def test_a_cut_dead_letter_stays_under_a_megabyte_and_follows_its_schema() -> None:
    # a control character is six bytes in JSON ("\u0001"): the worst case for the copies
    # key and value together, as the broker counts a record against its 1 MB limit
    message = dead_letter(key=b"\x01" * 2_000_000, value=b"\x01" * 2_000_000)
    headers = sum(len(name) + len(value) for name, value in message.headers)
    assert len(message.key or b"") + len(message.value or b"") + headers < 1_000_000
    schema = json.loads((REPO / "schemas" / "dead_letter.schema.json").read_text())
    Draft202012Validator(schema).validate(orjson.loads(message.value or b""))
