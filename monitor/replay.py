"""`liqmon replay`: the deterministic offline run of SPEC §7 over a JSON-lines file.

Each line is ``{"topic": "prices"|"fills"|"ledger", "value": {...}}``. Bad lines are data, not
errors: they are reported with their line number and counted, and the run goes on.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import IO, Any

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
)


@dataclass
class ReplaySummary:
    records: int = 0
    rejected: Counter[str] = field(default_factory=Counter)
    events: Counter[str] = field(default_factory=Counter)

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
        ]


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
    out: IO[bytes],
    report_rejection: Callable[[int, Rejected], None],
) -> ReplaySummary:
    """Feed every line to the engine in order, writing events to ``out`` as JSON lines.

    ``report_rejection(index, rejected)`` is called for each bad line (0-based index).
    """
    summary = ReplaySummary()
    config = engine.config
    for index, raw in enumerate(lines):
        line = raw.rstrip(b"\r\n")

        def decoded(line: bytes = line, index: int = index) -> tuple[InputRecord, Source]:
            topic, record = decode_line(line, config)
            return record, Source(topic=topic, index=index)

        rejection = _apply(engine, decoded, summary, out)
        if rejection is not None:
            report_rejection(index, rejection)
    return summary


def replay_inputs(
    messages: Iterable[tuple[Source, str, bytes | None]],
    engine: Engine,
    out: IO[bytes],
    report_rejection: Callable[[Source, Rejected], None],
) -> ReplaySummary:
    """`replay` of input topics' messages, already in the order to apply them: each its
    source (topic, partition, offset), its topic's kind (prices / fills / ledger) and its
    value, decoded as the service decodes it. Events name their triggers' partitions and
    offsets as the service's do."""
    summary = ReplaySummary()
    config = engine.config
    for source, kind, value in messages:

        def decoded(source: Source = source, kind: str = kind,
                    value: bytes | None = value) -> tuple[InputRecord, Source]:
            return decode(kind, value, config), source

        rejection = _apply(engine, decoded, summary, out)
        if rejection is not None:
            report_rejection(source, rejection)
    return summary


def _apply(engine: Engine, decoded: Callable[[], tuple[InputRecord, Source]],
           summary: ReplaySummary, out: IO[bytes]) -> Rejected | None:
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
