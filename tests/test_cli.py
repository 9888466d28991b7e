"""`liqmon run` options (SPEC §7): each from its flag or its LIQMON_… environment variable."""

from __future__ import annotations

import pytest

from monitor.cli import build_parser


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
