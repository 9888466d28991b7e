"""An instance waiting for its consumer group to assign partitions: said in /readyz at once,
in the log once it has waited 30 s and every 30 s after, and when the wait ends."""

from __future__ import annotations

import structlog

from monitor.service.group_wait import WAIT_REPORT_INTERVAL, AssignmentWait
from tests.support.clock import Clock

STILL_REBALANCING = ("no partitions from the consumer group: it is still rebalancing, and "
                     "nothing is applied meanwhile")


def waiting(clock: Clock) -> AssignmentWait:
    return AssignmentWait("risk-g", structlog.get_logger("liqmon"), clock)


def said_after_30_s(wait: AssignmentWait, clock: Clock) -> None:
    """A wait begun now, reported once it has lasted the interval."""
    wait.began()
    clock.now += WAIT_REPORT_INTERVAL
    wait.check()


def said(logs: list[dict]) -> list[tuple[str, str, float]]:
    return [(entry["event"], entry["log_level"], entry["waited_seconds"]) for entry in logs]


def test_a_rebalance_shorter_than_the_report_interval_is_not_logged() -> None:
    clock = Clock()
    wait = waiting(clock)
    with structlog.testing.capture_logs() as logs:
        wait.began()
        clock.now = WAIT_REPORT_INTERVAL - 0.5
        wait.check()
        wait.ended()
    assert logs == [] and wait.since is None


def test_a_long_wait_is_said_after_30_s_and_every_30_s_after() -> None:
    clock = Clock()
    wait = waiting(clock)
    with structlog.testing.capture_logs() as logs:
        wait.began()
        for clock.now in (29.0, 30.0, 45.0, 59.9, 60.0, 75.0):
            wait.check()
    assert said(logs) == [(STILL_REBALANCING, "warning", 30.0),
                          (STILL_REBALANCING, "warning", 60.0)]
    assert logs[0]["group"] == "risk-g"


def test_the_end_of_a_wait_that_was_said_is_said_with_its_length() -> None:
    clock = Clock()
    wait = waiting(clock)
    with structlog.testing.capture_logs() as logs:
        said_after_30_s(wait, clock)
        clock.now = 42.5
        wait.ended()
    assert said(logs)[1:] == [("partitions assigned by the consumer group", "info", 42.5)]


def test_a_rebalance_begun_while_waiting_continues_the_wait() -> None:
    clock = Clock()
    wait = waiting(clock)
    wait.began()
    clock.now = 20.0
    wait.began()  # another member joined meanwhile: the partitions are revoked again
    clock.now = 35.0
    assert wait.since == 0.0
    assert wait.describe() == "waiting for consumer group risk-g to assign partitions (35 s)"


def test_a_new_wait_starts_its_own_count() -> None:
    clock = Clock()
    wait = waiting(clock)
    with structlog.testing.capture_logs() as logs:
        said_after_30_s(wait, clock)
        wait.ended()
        clock.now = 99.0
        wait.began()
        clock.now = 128.0
        wait.check()  # 29 s into the new wait: not yet
        clock.now = 129.0
        wait.check()
    assert said(logs) == [(STILL_REBALANCING, "warning", 30.0),
                          ("partitions assigned by the consumer group", "info", 30.0),
                          (STILL_REBALANCING, "warning", 30.0)]
