"""Messages the service produces: events and dead-letter records (SPEC §2, §5)."""

from __future__ import annotations

from dataclasses import dataclass

import orjson

from monitor.events import Event
from monitor.records import Rejected
from monitor.service.settings import Topics


@dataclass(slots=True)
class Outgoing:
    topic: str
    key: bytes | None
    value: bytes | None  # None: a tombstone
    headers: list[tuple[str, bytes]]
    event_type: str | None = None  # set for events, for metrics
    trigger_kind: str | None = None
    trigger_timestamp_ms: int | None = None  # Kafka timestamp of the input that caused it
    partition: int | None = None  # None: the producer's partitioner (by key) decides


def event_message(event: Event, topics: Topics, trigger_timestamp_ms: int | None) -> Outgoing:
    topic = topics.liquidations if event.type == "liquidation" else topics.margin_calls
    return Outgoing(
        topic=topic,
        key=event.account.encode(),
        value=event.encode(),
        headers=[("event_type", event.type.encode()), ("event_id", event.event_id.encode())],
        event_type=event.type,
        trigger_kind=event.payload["trigger"]["kind"],
        trigger_timestamp_ms=trigger_timestamp_ms,
    )


def _text(raw: bytes | None) -> str | None:
    return None if raw is None else raw.decode("utf-8", errors="replace")


def dead_letter_message(rejection: Rejected, topic: str, partition: int, offset: int,
                        key: bytes | None, value: bytes | None, topics: Topics) -> Outgoing:
    """The rejected input, its reason and where it came from, with Connect-style headers
    (`__liqmon.errors.*`) so generic DLQ tooling can route and re-drive it."""
    record = {
        "error": str(rejection),
        "source_topic": topic,
        "source_partition": partition,
        "source_offset": offset,
        "key": _text(key),
        "value": _text(value) or "",
    }
    return Outgoing(
        topic=topics.dead_letter,
        key=key,
        value=orjson.dumps(record),
        headers=[
            ("__liqmon.errors.reason", rejection.reason.encode()),
            ("__liqmon.errors.topic", topic.encode()),
            ("__liqmon.errors.partition", str(partition).encode()),
            ("__liqmon.errors.offset", str(offset).encode()),
        ],
    )
