"""Messages the service produces: events and dead-letter records (SPEC §2, §5)."""

from __future__ import annotations

import msgspec
import orjson

from monitor.events import Event
from monitor.records import Rejected
from monitor.service.settings import Topics


# A Struct: one is built per snapshot a checkpoint writes, and it builds in C (~90 ns against
# ~250 for a slots dataclass).
class Outgoing(msgspec.Struct):
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


# A dead letter copies at most this many characters of the input's value and of its key.
# JSON spells a control character in 6 bytes, so a large junk input would make a dead letter
# several times its size, over the broker's message size limit (1 MB by default); a dead
# letter the broker refuses for good stops the instance, and again after every restart. Cut
# there, both copies stay under 1 MB; the whole input stays in its topic at the offset named.
# The dead letter's Kafka key (the input's, SPEC §2) is cut at as many bytes: an input whose
# key alone is near 1 MB made a dead letter over it.
DEAD_LETTER_TEXT_LIMIT = 65_536


def _text(raw: bytes | None) -> str | None:
    return None if raw is None else raw.decode("utf-8", errors="replace")


def dead_letter_message(rejection: Rejected, topic: str, partition: int, offset: int,
                        key: bytes | None, value: bytes | None, topics: Topics) -> Outgoing:
    """The rejected input, its reason and where it came from, with Connect-style headers
    (`__liqmon.errors.*`) so generic DLQ tooling can route and re-drive it. A key or value
    longer than `DEAD_LETTER_TEXT_LIMIT` characters is cut there; the error says so and the
    header `__liqmon.errors.value.bytes` gives the input value's size. The Kafka key is the
    input's, its first `DEAD_LETTER_TEXT_LIMIT` bytes if longer (then the header
    `__liqmon.errors.key.bytes` gives its size)."""
    error = str(rejection)
    key_text, value_text = _text(key), _text(value) or ""
    cut = [f"{name} ({len(text):,} characters)" for name, text in
           (("key", key_text or ""), ("value", value_text)) if len(text) > DEAD_LETTER_TEXT_LIMIT]
    headers = [
        ("__liqmon.errors.reason", rejection.reason.encode()),
        ("__liqmon.errors.topic", topic.encode()),
        ("__liqmon.errors.partition", str(partition).encode()),
        ("__liqmon.errors.offset", str(offset).encode()),
    ]
    if cut:
        error += (f"; this dead letter holds the first {DEAD_LETTER_TEXT_LIMIT:,} characters of "
                  f"the input's {' and '.join(cut)}")
        key_text = None if key_text is None else key_text[:DEAD_LETTER_TEXT_LIMIT]
        value_text = value_text[:DEAD_LETTER_TEXT_LIMIT]
        headers.append(("__liqmon.errors.value.bytes", str(len(value or b"")).encode()))
    if key is not None and len(key) > DEAD_LETTER_TEXT_LIMIT:
        headers.append(("__liqmon.errors.key.bytes", str(len(key)).encode()))
        key = key[:DEAD_LETTER_TEXT_LIMIT]
    record = {
        "error": error,
        "source_topic": topic,
        "source_partition": partition,
        "source_offset": offset,
        "key": key_text,
        "value": value_text,
    }
    return Outgoing(
        topic=topics.dead_letter,
        key=key,
        value=orjson.dumps(record),
        headers=headers,
    )
