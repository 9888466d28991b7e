"""Log format (SPEC §8): JSON lines in production, readable on a terminal, level from config."""

from __future__ import annotations

import io
import logging
import sys
from pathlib import Path

import numpy as np
import orjson
import pytest
import structlog
from aiokafka.errors import RequestTimedOutError

from monitor.config import load_config
from monitor.service.logs import RepeatFilter, configure_logging
from monitor.service.runner import Monitor
from monitor.service.topics import TopicMissing
from tests.support.kafka import fresh_settings
from tests.support.paths import REPO


@pytest.fixture(autouse=True)
def restore_logging():
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    structlog.reset_defaults()


def test_json_lines_carry_the_bound_context_and_library_logs_too(capsys) -> None:
    configure_logging("info", json=True)
    structlog.get_logger("liqmon").warning("rejected", topic="fills", partition=2, offset=41,
                                           reason="unknown_side")
    logging.getLogger("aiokafka.consumer").warning("Heartbeat failed")
    lines = [orjson.loads(line) for line in capsys.readouterr().err.splitlines()]
    assert lines[0]["event"] == "rejected" and lines[0]["level"] == "warning"
    assert (lines[0]["topic"], lines[0]["partition"], lines[0]["offset"]) == ("fills", 2, 41)
    assert "timestamp" in lines[0]
    assert lines[1]["event"] == "Heartbeat failed"


def test_json_lines_write_numpy_numbers_as_numbers_and_anything_else_as_text(capsys) -> None:
    configure_logging("info", json=True)
    structlog.get_logger("liqmon").info("event", margin_ratio=np.float64(1.0625),
                                        offsets={3: 17}, path=Path("/var/lib/liqmon"))
    line = orjson.loads(capsys.readouterr().err)
    assert line["margin_ratio"] == 1.0625
    assert line["offsets"] == {"3": 17}
    assert "/var/lib/liqmon" in line["path"]


def test_json_lines_go_to_a_stderr_without_a_byte_buffer_too(monkeypatch) -> None:
    text = io.StringIO()
    monkeypatch.setattr(sys, "stderr", text)
    configure_logging("info", json=True)
    structlog.get_logger("liqmon").info("event", event_id="a:1:margin_call")
    assert orjson.loads(text.getvalue())["event_id"] == "a:1:margin_call"


def test_level_filters_and_console_mode_is_not_json(capsys) -> None:
    configure_logging("warning", json=False)
    log = structlog.get_logger("liqmon")
    log.info("event", event_id="a:1:liquidation")
    log.warning("kafka unreachable, clients keep retrying")
    err = capsys.readouterr().err
    assert "a:1:liquidation" not in err
    assert "kafka unreachable" in err and not err.lstrip().startswith("{")


def test_unknown_level_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown log level 'loud'"):
        configure_logging("loud")


def test_a_library_line_repeated_in_an_outage_is_written_once(capsys) -> None:
    configure_logging("info", json=True)
    client = logging.getLogger("aiokafka.client")
    for attempt in range(200):
        client.error("Unable connect to node with id %s: %s", 1, f"refused ({attempt})")
    client.error("Unable to update metadata from %s", [1])
    lines = [orjson.loads(line) for line in capsys.readouterr().err.splitlines()]
    assert [line["event"] for line in lines] == [
        "Unable connect to node with id 1: refused (0)", "Unable to update metadata from [1]"]


def test_a_held_back_line_is_counted_in_the_next_one_let_through() -> None:
    now = [100.0]
    repeats = RepeatFilter(window=30.0, clock=lambda: now[0])

    def line(attempt: int) -> logging.LogRecord:
        return logging.LogRecord("aiokafka.client", logging.ERROR, __file__, 1,
                                 "Unable connect to node with id %s: %s",
                                 (1, f"refused ({attempt})"), None)

    assert repeats.filter(line(0))
    now[0] = 110.0
    assert not repeats.filter(line(1))
    assert not repeats.filter(line(2))
    now[0] = 131.0
    later = line(3)
    assert repeats.filter(later)
    assert later.getMessage() == ("Unable connect to node with id 1: refused (3) "
                                  "(2 more like it in the last 31 s)")
    now[0] = 200.0
    quiet = line(4)
    assert repeats.filter(quiet)  # nothing held back since: said as it is
    assert quiet.getMessage() == "Unable connect to node with id 1: refused (4)"


async def stop_by(error: Exception, monkeypatch, capsys) -> dict:
    """The line a Monitor logs when ``error`` stops it."""
    configure_logging("info", json=True)
    monitor = Monitor(fresh_settings("127.0.0.1:1"), load_config(REPO / "examples" / "risk.toml"))

    async def consuming() -> None:
        raise error

    monkeypatch.setattr(monitor, "_run", consuming)
    with pytest.raises(type(error)):
        await monitor.run()
    return orjson.loads(capsys.readouterr().err.splitlines()[-1])


async def test_an_unforeseen_error_that_stops_the_instance_is_logged_with_where_it_came_from(
        monkeypatch, capsys) -> None:
    line = await stop_by(RequestTimedOutError(), monkeypatch, capsys)
    assert (line["event"], line["kind"]) == ("stopped by an error", "RequestTimedOutError")
    assert "in consuming" in line["exception"]  # the traceback, to the function that raised


async def test_liqmons_own_errors_stop_the_instance_with_their_message_alone(
        monkeypatch, capsys) -> None:
    line = await stop_by(TopicMissing("t.liquidations"), monkeypatch, capsys)
    assert (line["event"], line["kind"]) == ("stopped by an error", "TopicMissing")
    assert "exception" not in line
