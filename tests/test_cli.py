"""`liqmon run` options (SPEC §7): each from its flag or its LIQMON_… environment variable;
and how the command line reports what stops liqmon."""

from __future__ import annotations

from pathlib import Path

import pytest
from aiokafka.errors import MessageSizeTooLargeError

from monitor.cli import build_parser, main
from monitor.errors import LiqmonError
from monitor.service import logs
from monitor.service.broker import BrokerUnavailable
from monitor.service.changelog import ConfigChanged, NoCheckpoint, StateCorrupt, UnknownToConfig
from monitor.service.delivery import DeliveryAbandoned, DeliveryFailed
from monitor.service.runner import Monitor
from monitor.service.topics import TopicLayoutError, TopicMissing
from monitor.stress import PlotUnavailable

CONFIG = str(Path(__file__).resolve().parents[1] / "examples" / "risk.toml")

# One of each error the command line used to catch by name, before they shared LiqmonError.
STOPPING_ERRORS = [
    TopicLayoutError("fills and ledger have different partition counts"),
    TopicMissing("liquidations"),
    DeliveryAbandoned("3 messages not delivered within the shutdown timeout"),
    DeliveryFailed("liquidations", MessageSizeTooLargeError()),
    StateCorrupt("state", 0, 7, "not JSON"),
    ConfigChanged("state", 0, "sha256:aaa", "sha256:bbb"),
    NoCheckpoint("state"),
    UnknownToConfig("state", "acct-1", ["DOGE"]),
    PlotUnavailable("--plot needs matplotlib"),
    BrokerUnavailable("port 9092 is already in use"),
]


def test_max_future_defaults_to_five_minutes() -> None:
    assert build_parser().parse_args(["run"]).max_future == 300.0


def test_max_future_flag_sets_the_bound() -> None:
    assert build_parser().parse_args(["run", "--max-future", "60"]).max_future == 60.0


def test_max_future_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LIQMON_MAX_FUTURE", "2.5")
    assert build_parser().parse_args(["run"]).max_future == 2.5


def test_metrics_host_defaults_to_all_interfaces() -> None:
    assert build_parser().parse_args(["run"]).metrics_host == "0.0.0.0"


def test_metrics_host_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LIQMON_METRICS_HOST", "127.0.0.1")
    assert build_parser().parse_args(["run"]).metrics_host == "127.0.0.1"


@pytest.mark.parametrize("error", STOPPING_ERRORS, ids=lambda error: type(error).__name__)
def test_every_error_the_cli_reports_is_a_liqmon_error(error: Exception) -> None:
    assert isinstance(error, LiqmonError)


@pytest.mark.parametrize("error", STOPPING_ERRORS, ids=lambda error: type(error).__name__)
def test_run_reports_a_liqmon_error_in_one_line_with_exit_status_1(
        error: LiqmonError, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    async def stopped(self: Monitor) -> None:
        raise error

    monkeypatch.setattr(Monitor, "run", stopped)
    # the handlers it installs would outlive the test and reformat every later test's logs
    monkeypatch.setattr(logs, "configure_logging", lambda level: None)
    assert main(["run", "--config", CONFIG, "--metrics-port", "0"]) == 1
    assert capsys.readouterr().err == f"liqmon: error: {error}\n"
