"""Records of a kind worth a warning, counted at once and said at most every 30 s."""

from __future__ import annotations

import structlog
from prometheus_client import CollectorRegistry, Counter

from monitor.service.counted_warning import LOG_INTERVAL, CountedWarning
from tests.support.clock import Clock


class Reported:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.clock = Clock()
        self.warning = CountedWarning(
            Counter("liqmon_records_late", "", ["topic"], registry=self.registry),
            structlog.get_logger("liqmon"), "late", self.clock)

    def count(self, topic: str) -> float | None:
        return self.registry.get_sample_value("liqmon_records_late_total", {"topic": topic})


def test_the_first_records_are_counted_and_said_at_once_with_the_details() -> None:
    reported = Reported()
    with structlog.testing.capture_logs() as logs:
        assert reported.warning.report({"fills": 2}, lambda: {"most_behind_ms": 40})
    assert reported.count("fills") == 2
    assert [(e["event"], e["log_level"], e["records"], e["by_topic"], e["most_behind_ms"])
            for e in logs] == [("late", "warning", 2, {"fills": 2}, 40)]


def test_more_within_30_s_are_counted_and_said_in_the_next_line_after_it() -> None:
    reported = Reported()
    with structlog.testing.capture_logs() as logs:
        reported.warning.report({"fills": 2}, dict)
        reported.clock.now = LOG_INTERVAL - 1
        assert not reported.warning.report({"fills": 3, "ledger": 1}, dict)
        assert (reported.count("fills"), reported.count("ledger")) == (3, 1)
        reported.clock.now = LOG_INTERVAL
        assert reported.warning.report({"fills": 3, "ledger": 1}, dict)
        reported.clock.now = 3 * LOG_INTERVAL
        assert not reported.warning.report({"fills": 3, "ledger": 1}, dict)  # nothing new
    assert [(e["records"], e["by_topic"]) for e in logs] == [
        (2, {"fills": 2}), (2, {"fills": 1, "ledger": 1})]
    assert (reported.count("fills"), reported.count("ledger")) == (3, 1)
