"""`liqmon replay`: the deterministic offline run of SPEC §7 over a JSON-lines file.

Each line is ``{"topic": "prices"|"fills"|"ledger", "value": {...}}``. Bad lines are data, not
errors: they are reported with their line number and counted, and the run goes on.
"""

from __future__ import annotations

import codecs
import sqlite3
import time
from collections import Counter
from collections.abc import Callable, Iterable
from contextlib import closing
from dataclasses import dataclass, field
from typing import Any, Protocol

import orjson

from monitor.config import RiskConfig
from monitor.engine import Engine
from monitor.events import Event, Source
from monitor.records import (
    INPUT_KINDS,
    InputRecord,
    Reason,
    Rejected,
    decode,
    decode_json,
    from_document,
    ts_bounds,
)


class EventSink(Protocol):
    """Where events are written, one JSON line each: a file, or a command's checked output."""

    def write(self, data: bytes, /) -> object: ...


@dataclass
class ReplaySummary:
    records: int = 0
    rejected: Counter[str] = field(default_factory=Counter)
    events: Counter[str] = field(default_factory=Counter)
    # A file is applied in its own order: records stamped (ts) before one above them are
    # counted, since the service would have applied them first (SPEC §6)
    out_of_order: int = 0
    latest_ts: int | None = None

    def saw(self, ts: int) -> None:
        """Note a record's ts, in the order the records are applied."""
        if self.latest_ts is not None and ts < self.latest_ts:
            self.out_of_order += 1
        else:
            self.latest_ts = ts

    def lines(self, engine: Engine) -> list[str]:
        stats = engine.stats
        rejected = sum(self.rejected.values())
        events = sum(self.events.values())
        return [
            f"records: {self.records}",
            f"applied: prices {stats.applied_ticks}, fills {stats.applied_fills}, "
            f"ledger {stats.applied_ledger}",
            f"ignored: stale ticks {stats.stale_ticks}, duplicates {stats.duplicates}, "
            f"ticks for unused symbols {stats.unused_ticks}",
            f"rejected: {rejected}" + _breakdown(self.rejected),
            f"events: {events}" + _breakdown(self.events),
            f"accounts: {len(engine.accounts)}, isolated positions: {len(engine.units)}",
        ] + ([f"out of order: {self.out_of_order} records stamped before a record above "
              "them, applied where they are (the service applies records in ts order)"]
             if self.out_of_order else [])


def _breakdown(counts: Counter[str]) -> str:
    if not counts:
        return ""
    return " (" + ", ".join(f"{key} {counts[key]}" for key in sorted(counts)) + ")"


def decode_line(line: bytes, config: RiskConfig) -> tuple[str, InputRecord]:
    """One replay line → (topic, record), or Rejected."""
    if not line.strip():
        raise Rejected(Reason.INVALID_JSON, "empty line")
    return decode_json(line, lambda document: _from_envelope(document, config))


def _from_envelope(document: Any, config: RiskConfig) -> tuple[str, InputRecord]:
    if not isinstance(document, dict):
        raise Rejected(Reason.NOT_OBJECT, "a replay line must be a JSON object "
                                          '{"topic": ..., "value": {...}}')
    if "topic" not in document:
        raise Rejected(Reason.MISSING_FIELD, "topic: required field is missing")
    topic = document["topic"]
    if topic not in INPUT_KINDS:
        raise Rejected(Reason.UNKNOWN_TOPIC,
                       f"topic: must be one of {', '.join(INPUT_KINDS)}, got {topic!r}")
    if "value" not in document:
        raise Rejected(Reason.MISSING_FIELD, "value: required field is missing")
    return topic, from_document(topic, document["value"], config)


def replay(
    lines: Iterable[bytes],
    engine: Engine,
    out: EventSink,
    report_rejection: Callable[[int, Rejected], None],
) -> ReplaySummary:
    """Feed every line to the engine in order, writing events to ``out`` as JSON lines.

    ``report_rejection(index, rejected)`` is called for each bad line (0-based index).
    """
    summary = ReplaySummary()
    config = engine.config
    for index, raw in enumerate(lines):
        line = raw.rstrip(b"\r\n")
        if index == 0:  # a file saved by an editor that marks UTF-8
            line = line.removeprefix(codecs.BOM_UTF8)

        def decoded(line: bytes = line, index: int = index) -> tuple[InputRecord, Source]:
            topic, record = decode_line(line, config)
            summary.saw(record.ts)
            return record, Source(topic=topic, index=index)

        rejection = _apply(engine, decoded, summary, out)
        if rejection is not None:
            report_rejection(index, rejection)
    return summary


def replay_inputs(
    messages: Iterable[tuple[Source, str, bytes | None, int]],
    engine: Engine,
    out: EventSink,
    report_rejection: Callable[[Source, Rejected], None],
    max_future_ms: int | None = None,
) -> ReplaySummary:
    """`replay` of input topics' messages, already in the order to apply them: each its
    source (topic, partition, offset), its topic's kind (prices / fills / ledger), its
    value and its Kafka timestamp, decoded as the service decodes it: with
    ``max_future_ms``, a ts that far ahead of the Kafka timestamp (or of the clock now, if
    earlier) is refused as the service refuses it (`records.ts_bounds`). Events name their
    triggers' partitions and offsets as the service's do."""
    summary = ReplaySummary()
    config = engine.config
    now_ms = int(time.time() * 1000)
    for source, kind, value, timestamp in messages:
        not_after = (None if max_future_ms is None
                     else ts_bounds((timestamp,), now_ms, max_future_ms)[0])

        def decoded(source: Source = source, kind: str = kind, value: bytes | None = value,
                    not_after: int | None = not_after) -> tuple[InputRecord, Source]:
            return decode(kind, value, config, not_after_ms=not_after), source

        rejection = _apply(engine, decoded, summary, out)
        if rejection is not None:
            report_rejection(source, rejection)
    return summary


def _apply(engine: Engine, decoded: Callable[[], tuple[InputRecord, Source]],
           summary: ReplaySummary, out: EventSink) -> Rejected | None:
    """Decode one input and apply it, writing its events; its rejection, if any."""
    summary.records += 1
    try:
        record, source = decoded()
        # the engine rejects what only state makes bad input (margin_mode_conflict)
        events: list[Event] = engine.apply(record, source)
    except Rejected as rejection:
        summary.rejected[rejection.reason] += 1
        return rejection
    for event in events:
        summary.events[event.type] += 1
        out.write(event.encode())
        out.write(b"\n")
    return None


@dataclass
class EventCheck:
    """Published events against replay's, by `event_id`, every field but `emitted_at`
    compared. A repeat (at-least-once delivery) must equal the first copy."""

    replayed: int = 0
    published: int = 0  # distinct ids
    repeats: int = 0
    unreadable: int = 0  # published values that are not a JSON event
    missing: list[str] = field(default_factory=list)  # replayed, never published
    extra: list[str] = field(default_factory=list)  # published, not replayed
    different: list[tuple[str, list[str]]] = field(default_factory=list)  # id, fields
    repeats_unlike: list[tuple[str, list[str]]] = field(default_factory=list)

    def agrees(self) -> bool:
        return not (self.missing or self.extra or self.different or self.repeats_unlike
                    or self.unreadable)

    def lines(self, examples: int = 10) -> list[str]:
        """The verdict in one line, then up to ``examples`` ids of each kind of difference."""
        verdict = "agree" if self.agrees() else "DIFFER"
        out = [f"{self.replayed:,} event{'' if self.replayed == 1 else 's'} replayed, "
               f"{self.published:,} published "
               f"({self.repeats:,} repeats): {verdict}; {len(self.missing):,} missing, "
               f"{len(self.extra):,} extra, {len(self.different):,} different, "
               f"{len(self.repeats_unlike):,} repeats unlike the first, "
               f"{self.unreadable:,} unreadable"]
        out += [f"missing {event_id}" for event_id in self.missing[:examples]]
        out += [f"extra {event_id}" for event_id in self.extra[:examples]]
        out += [f"different {event_id}: {', '.join(fields)}"
                for event_id, fields in self.different[:examples]]
        out += [f"repeat unlike the first {event_id}: {', '.join(fields)}"
                for event_id, fields in self.repeats_unlike[:examples]]
        return out


_CANONICAL = orjson.OPT_SORT_KEYS
_BATCH = 10_000  # rows inserted at a time


class EventComparison:
    """`check_events`, fed a side at a time, with memory bounded however many events there
    are: both sides go to an SQLite database in a temporary file (gone when closed), each
    event as canonical JSON (keys sorted, `emitted_at` left out), and the comparison is a
    join by `event_id`. Only the differences come back into memory."""

    def __init__(self) -> None:
        self._db = sqlite3.connect("")  # "": a private database in a temporary file
        self._db.executescript("""
            CREATE TABLE replayed (id TEXT PRIMARY KEY, body BLOB) WITHOUT ROWID;
            CREATE TABLE published (seq INTEGER PRIMARY KEY, id TEXT, body BLOB);
        """)
        self._seq = 0
        self.unreadable = 0

    def add_replayed(self, lines: Iterable[bytes]) -> None:
        """The replay's events, JSON lines (a later line of an id replaces an earlier one)."""
        for rows in _batches(_canonical_row(orjson.loads(line)) for line in lines):
            self._db.executemany("INSERT OR REPLACE INTO replayed VALUES (?, ?)", rows)

    def add_published(self, values: Iterable[bytes | None]) -> None:
        """Values read from the event topics, in the order read (the first copy of an id is
        the one its repeats must equal)."""
        for rows in _batches(self._published_rows(values)):
            self._db.executemany("INSERT INTO published VALUES (?, ?, ?)", rows)

    def _published_rows(self, values: Iterable[bytes | None]
                        ) -> Iterable[tuple[int, str, bytes]]:
        for value in values:
            try:
                event_id, body = _canonical_row(orjson.loads(value or b""))
            except (orjson.JSONDecodeError, TypeError):
                self.unreadable += 1
                continue
            self._seq += 1
            yield self._seq, event_id, body

    def result(self) -> EventCheck:
        db = self._db
        db.executescript("""
            CREATE INDEX published_by_id ON published (id, seq);
            CREATE TABLE first AS SELECT id, MIN(seq) AS seq FROM published GROUP BY id;
            CREATE UNIQUE INDEX first_by_id ON first (id);
        """)
        check = EventCheck(unreadable=self.unreadable)
        check.replayed = db.execute("SELECT COUNT(*) FROM replayed").fetchone()[0]
        check.published = db.execute("SELECT COUNT(*) FROM first").fetchone()[0]
        check.repeats = db.execute("SELECT COUNT(*) FROM published").fetchone()[0] \
            - check.published
        check.missing = [row[0] for row in db.execute(
            "SELECT id FROM replayed WHERE id NOT IN (SELECT id FROM first) ORDER BY id")]
        check.extra = [row[0] for row in db.execute(
            "SELECT id FROM first WHERE id NOT IN (SELECT id FROM replayed) ORDER BY id")]
        check.different = _unlike(db.execute(
            "SELECT r.id, r.body, p.body FROM replayed r JOIN first f ON f.id = r.id "
            "JOIN published p ON p.seq = f.seq WHERE r.body != p.body ORDER BY r.id"))
        check.repeats_unlike = sorted(_unlike(db.execute(
            "SELECT p.id, o.body, p.body FROM published p JOIN first f ON f.id = p.id "
            "JOIN published o ON o.seq = f.seq WHERE p.seq != f.seq AND p.body != o.body "
            "ORDER BY p.seq")))
        return check

    def close(self) -> None:
        self._db.close()


def check_events(replayed: Iterable[bytes], published: Iterable[bytes | None]) -> EventCheck:
    """Compare the events a replay wrote (JSON, one each) with those read from the event
    topics. Ids are listed sorted."""
    with closing(EventComparison()) as comparison:
        comparison.add_replayed(replayed)
        comparison.add_published(published)
        return comparison.result()


def _canonical_row(event: Any) -> tuple[str, bytes]:
    """(event_id, the event as canonical JSON); TypeError if it is not an event."""
    comparable = _comparable(event)
    event_id = comparable.get("event_id")
    if not isinstance(event_id, str):
        raise TypeError("no event_id")
    return event_id, orjson.dumps(comparable, option=_CANONICAL)


def _unlike(rows: Iterable[tuple[str, bytes, bytes]]) -> list[tuple[str, list[str]]]:
    """(id, the fields that differ) of each pair of canonical events that differ as events
    (not only as bytes: 1 and 1.0 are equal, as they were compared before)."""
    out = []
    for event_id, a, b in rows:
        fields = _fields_unlike(orjson.loads(a), orjson.loads(b))
        if fields:
            out.append((event_id, fields))
    return out


def _batches(rows: Iterable[Any]) -> Iterable[list[Any]]:
    batch = []
    for row in rows:
        batch.append(row)
        if len(batch) == _BATCH:
            yield batch
            batch = []
    if batch:
        yield batch


def _comparable(event: Any) -> dict[str, Any]:
    if not isinstance(event, dict):
        raise TypeError("not an event")
    return {key: value for key, value in event.items() if key != "emitted_at"}


def _fields_unlike(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    return sorted(key for key in a.keys() | b.keys() if a.get(key) != b.get(key))
