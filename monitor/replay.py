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
    write = out.write
    for index, raw in enumerate(lines):
        summary.records += 1
        line = raw.rstrip(b"\r\n")
        try:
            topic, record = decode_line(line, config)
            # the engine rejects what only state makes bad input (margin_mode_conflict)
            events: list[Event] = engine.apply(record, Source(topic=topic, index=index))
        except Rejected as rejection:
            summary.rejected[rejection.reason] += 1
            report_rejection(index, rejection)
            continue
        for event in events:
            summary.events[event.type] += 1
            write(event.encode())
            write(b"\n")
    return summary
