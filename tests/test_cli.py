"""`liqmon run` options (SPEC §7): each from its flag or its LIQMON_… environment variable;
and how the command line reports what stops liqmon."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import re
import signal
from importlib.metadata import version
from pathlib import Path
from typing import Any

import pytest
from aiokafka.errors import MessageSizeTooLargeError

from monitor.cli import _hold_task_dumps_until_started, build_parser, main
from monitor.errors import LiqmonError
from monitor.service import logs
from monitor.service.broker import BrokerUnavailable
from monitor.service.changelog import ConfigChanged, NoCheckpoint, StateCorrupt, UnknownToConfig
from monitor.service.delivery import DeliveryAbandoned, DeliveryFailed
from monitor.service.options import (
    Option,
    is_internal,
    option_group_class,
    option_values,
    options,
)
from monitor.service.runner import Monitor
from monitor.service.settings import ServiceSettings, run_settings
from monitor.service.topics import TopicLayoutError, TopicMissing
from monitor.stress import PlotUnavailable
from tests.support.cli import run_usage_error

REPO = Path(__file__).resolve().parents[1]
CONFIG = str(REPO / "examples" / "risk.toml")
OPTIONS = [spec for _, spec in options(ServiceSettings)]

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


def test_version_is_the_installed_distributions(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out == f"liqmon {version('liqmon')}\n"


def test_option_values_name_every_flag_with_its_value_in_the_flags_units() -> None:
    settings = run_settings(build_parser().parse_args(
        ["run", "--config", CONFIG, "--session-timeout", "2.5", "--max-skew", "40"]))
    values = option_values(settings)
    assert set(values) == {(spec.flag if spec.secret is None else spec.secret_flag)[2:]
                           for spec in OPTIONS}
    assert {name: values[name] for name in ("config", "session-timeout", "max-skew",
                                            "topic-fills", "sasl-password")} == {
        "config": CONFIG, "session-timeout": 2.5, "max-skew": 40, "topic-fills": "fills",
        "sasl-password": None}


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


def test_sigusr1_while_run_starts_is_answered_not_fatal(
        capfd: pytest.CaptureFixture[str]) -> None:
    """Before the loop's task-stack handler exists, SIGUSR1's default action would end it."""
    before = signal.getsignal(signal.SIGUSR1)
    try:
        _hold_task_dumps_until_started()
        os.kill(os.getpid(), signal.SIGUSR1)
    finally:
        signal.signal(signal.SIGUSR1, before)
    assert capfd.readouterr().err == (
        "liqmon: SIGUSR1 while starting; task stacks are logged once the service runs\n")


# -- each setting declared once ------------------------------------------------------------------


def leaf_fields(cls: type[Any]) -> list[dataclasses.Field[Any]]:
    """The fields of a settings dataclass, those of its nested option groups in their place."""
    leaves = []
    for field in dataclasses.fields(cls):
        group = option_group_class(field)
        leaves.extend(leaf_fields(group) if group is not None else [field])
    return leaves


def run_parser() -> argparse.ArgumentParser:
    (commands,) = [action for action in build_parser()._actions
                   if isinstance(action, argparse._SubParsersAction)]
    return commands.choices["run"]


def test_every_setting_is_a_flag_or_says_why_not() -> None:
    flagged = {field.name for field, _ in options(ServiceSettings)}
    for field in leaf_fields(ServiceSettings):
        assert (field.name in flagged) != is_internal(field), field.name


def test_no_two_settings_share_a_flag_or_an_environment_variable() -> None:
    flags = [spec.flag for spec in OPTIONS]
    variables = [spec.env for spec in OPTIONS] + [spec.secret_env for spec in OPTIONS
                                                  if spec.secret is not None]
    assert len(flags) == len(set(flags))
    assert len(variables) == len(set(variables))


def test_run_has_the_declared_flags_and_no_other() -> None:
    declared = {spec.flag for spec in OPTIONS}
    declared |= {spec.flag.replace("--", "--no-", 1) for spec in OPTIONS if spec.kind == "toggle"}
    declared |= {spec.secret_flag for spec in OPTIONS if spec.secret is not None}  # refused
    given = {flag for action in run_parser()._actions for flag in action.option_strings}
    assert given - {"-h", "--help"} == declared


def example_text(spec: Option) -> str:
    """A value the option accepts, as a flag or an environment variable would carry it."""
    if spec.choices:
        return spec.choices[-1]
    for text in ("2.5", "7", "x"):  # the first the option's parse takes
        with contextlib.suppress(ValueError, argparse.ArgumentTypeError):
            spec.parse(text)
            return text
    raise AssertionError(f"{spec.flag} takes none of the examples")


@pytest.mark.parametrize("spec", [s for s in OPTIONS if s.kind == "value" and s.secret is None],
                         ids=lambda spec: spec.flag)
def test_a_value_option_reads_its_environment_variable_as_its_flag(
        spec: Option, monkeypatch: pytest.MonkeyPatch) -> None:
    from_flag = vars(build_parser().parse_args(["run", spec.flag, example_text(spec)]))
    monkeypatch.setenv(spec.env, example_text(spec))
    assert vars(build_parser().parse_args(["run"])) == from_flag


@pytest.mark.parametrize("spec", [s for s in OPTIONS if s.kind != "value"],
                         ids=lambda spec: spec.flag)
def test_an_on_off_option_reads_its_environment_variable_as_its_flag(
        spec: Option, monkeypatch: pytest.MonkeyPatch) -> None:
    flag, text = ((spec.flag, "1") if spec.kind == "switch"
                  else (spec.flag.replace("--", "--no-", 1), "0"))
    from_flag = vars(build_parser().parse_args(["run", flag]))
    monkeypatch.setenv(spec.env, text)
    assert vars(build_parser().parse_args(["run"])) == from_flag


def documented_variables() -> set[str]:
    """The variables deploy/README.md's configuration table names."""
    readme = (REPO / "deploy" / "README.md").read_text(encoding="utf-8")
    return {name for line in readme.splitlines() if line.startswith("| `LIQMON_")
            for name in re.findall(r"LIQMON_[A-Z_]+", line)}


def read_variables() -> set[str]:
    """The variables `liqmon run` reads."""
    return {spec.env for spec in OPTIONS} | {spec.secret_env for spec in OPTIONS
                                            if spec.secret is not None}


def test_deploy_readme_documents_every_environment_variable() -> None:
    assert read_variables() - documented_variables() == set()


def test_deploy_readme_documents_no_environment_variable_liqmon_does_not_read() -> None:
    assert documented_variables() - read_variables() == set()


@pytest.mark.parametrize(("args", "said"), [
    (["synth", "--config", CONFIG, "--accounts", "0"], "argument --accounts: must be ≥ 1, got 0"),
    (["synth", "--config", CONFIG, "--steps", "-1"], "argument --steps: must be ≥ 0, got -1"),
    (["synth", "--config", CONFIG, "--bad-rate", "2"],
     "argument --bad-rate: must be from 0 to 1, got 2"),
    (["synth", "--config", CONFIG, "--accounts", "x"],
     "argument --accounts: not a whole number: 'x'"),
    (["demo", "--accounts", "0"], "argument --accounts: must be ≥ 1, got 0"),
    (["demo", "--duration", "0"], "argument --duration: must be a number of seconds > 0, got 0"),
    (["demo", "--duration", "-5"],
     "argument --duration: must be a number of seconds > 0, got -5"),
    (["bench", "--accounts", "50"], "argument --accounts: must be ≥ 100, got 50"),
    (["bench", "--instruments", "0"], "argument --instruments: must be ≥ 1, got 0"),
    (["bench", "--tick-volatility", "nan"], "argument --tick-volatility: must be from 0 to 1, "
     "got nan"),
    (["run", "--config", CONFIG, "--merge-wait", "-1"],
     "argument --merge-wait: must be a number of seconds ≥ 0, got -1"),
    (["run", "--config", CONFIG, "--max-skew", "-5"], "argument --max-skew: must be ≥ 0, got -5"),
    (["run", "--config", CONFIG, "--max-skew", "3600001"],
     "argument --max-skew: must be ≤ 3,600,000, got 3,600,001"),
    # past 2^63 it stopped the start with a TypeError from the log line listing the options
    (["run", "--config", CONFIG, "--checkpoint-records", str(2**64)],
     "argument --checkpoint-records: must be ≤ 9,007,199,254,740,992, got 18,446,744,073,709,"
     "551,616"),
    (["run", "--config", CONFIG, "--checkpoint-interval", "0"],
     "argument --checkpoint-interval: must be a number of seconds > 0, got 0"),
    (["run", "--config", CONFIG, "--checkpoint-records", "0"],
     "argument --checkpoint-records: must be ≥ 1, got 0"),
    (["run", "--config", CONFIG, "--stall-timeout", "inf"],
     "argument --stall-timeout: must be a number of seconds > 0, got inf"),
    (["run", "--config", CONFIG, "--session-timeout", "0"],
     "argument --session-timeout: must be a number of seconds > 0, got 0"),
    (["run", "--config", CONFIG, "--partitions", "0"], "argument --partitions: must be ≥ 1, got 0"),
    (["run", "--config", CONFIG, "--metrics-port", "70000"],
     "argument --metrics-port: must be a port from 0 to 65535, got 70000"),
    (["broker", "--port", "70000"], "argument --port: must be a port from 1 to 65535, got 70000"),
    (["demo", "--port", "0"], "argument --port: must be a port from 1 to 65535, got 0"),
    (["run", "--config", CONFIG, "--shutdown-timeout", "-1"],
     "argument --shutdown-timeout: must be a number of seconds ≥ 0, got -1"),
])
def test_a_count_or_duration_out_of_range_is_a_usage_error_naming_it(
        args: list[str], said: str, capsys: pytest.CaptureFixture[str]) -> None:
    """They ended in a traceback (synth and demo --accounts 0, demo --duration 0, run
    --metrics-port 70000), ran for ever (demo --duration -5), wrote a file of bad records only
    (synth --bad-rate 2), or ran a service that forced every release (--merge-wait -1) or
    weakened every proof of order (--max-skew -5), or took a tick volatility of NaN."""
    with pytest.raises(SystemExit) as exit_:
        main(args)
    assert exit_.value.code == 2
    assert said in capsys.readouterr().err


@pytest.mark.parametrize(("variable", "text", "said"), [
    ("LIQMON_MERGE_WAIT", "-3", "argument --merge-wait: must be a number of seconds ≥ 0, got -3 "
                                "(from LIQMON_MERGE_WAIT)"),
    ("LIQMON_MAX_SKEW", "abc", "argument --max-skew: not a whole number: 'abc' "
                               "(from LIQMON_MAX_SKEW)"),
    ("LIQMON_START", "earlist", "argument --start: invalid choice: 'earlist' (choose from "
                                "earliest, latest) (from LIQMON_START)"),
    ("LIQMON_SECURITY_PROTOCOL", "SASL_SSl", "argument --security-protocol: invalid choice: "
                                             "'SASL_SSl' (choose from PLAINTEXT, SSL, "
                                             "SASL_PLAINTEXT, SASL_SSL) "
                                             "(from LIQMON_SECURITY_PROTOCOL)"),
    ("LIQMON_LOG_LEVEL", "chatty", "argument --log-level: invalid choice: 'chatty' (choose "
                                   "from debug, info, warning, error) (from LIQMON_LOG_LEVEL)"),
    ("LIQMON_BOOTSTRAP", "", "argument --bootstrap: expected HOST:PORT[,HOST:PORT…], got '' "
                             "(from LIQMON_BOOTSTRAP)"),
    ("LIQMON_RESET_STATE", "on", "LIQMON_RESET_STATE='on' is neither on (1, true, yes) nor off "
                                 "(0, false, no)"),
    ("LIQMON_SSL_CHECK_HOSTNAME", "off", "LIQMON_SSL_CHECK_HOSTNAME='off' is neither on"),
])
def test_a_variable_that_cannot_be_used_is_refused_naming_it(
        variable: str, text: str, said: str, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """A deployment sets variables, not flags. A choice was not checked at all when it came
    from one: LIQMON_START=earlist started with aiokafka's "Unrecognized auto_offset_reset
    config, using NONE" warning."""
    monkeypatch.setenv(variable, text)
    assert said in run_usage_error([], capsys)


@pytest.mark.parametrize(("args", "said"), [
    (["--log-level", "chatty"], "argument --log-level: invalid choice: 'chatty'"),
    (["--bootstrap", "kafka:9092,"], "expected HOST:PORT[,HOST:PORT…], got 'kafka:9092,'"),
    (["--bootstrap", "kafka:90x2"], "'kafka:90x2': the port must be a number from 1 to 65535"),
    (["--topic-prices", "a/b"], "--topic-prices 'a/b' is not a valid Kafka topic name"),
    (["--group", ""], "argument --group: must not be empty, got ''"),
    (["--client-id", " "], "argument --client-id: must not be empty, got ' '"),
])
def test_a_run_flag_that_cannot_be_used_is_a_usage_error_naming_it(
        args: list[str], said: str, capsys: pytest.CaptureFixture[str]) -> None:
    """--log-level chatty and a bad topic name exited 1, --bootstrap "" retried ":9092" for
    ever."""
    assert said in run_usage_error(args, capsys)


@pytest.mark.parametrize("args", [
    ["--max-skew", "500"],  # the default --merge-wait, 0.5 s
    ["--max-skew", "1000", "--merge-wait", "0.5"],
])
def test_a_skew_not_below_the_merge_wait_is_a_usage_error_naming_both(
        args: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    """A record waits for proof until its timestamp + the skew, and --merge-wait releases it
    unproven first: with --max-skew 1000 and the default --merge-wait every record a quiet
    partition held back went out of proven order (a helper's fleet saw them by the hundred)."""
    said = run_usage_error(args, capsys)
    assert "--max-skew" in said and "must be below --merge-wait (0.5 s)" in said


@pytest.mark.parametrize("text", ["1", "TRUE", " yes "])
def test_an_on_off_variable_reads_on_whatever_its_case_and_spaces(
        text: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LIQMON_RESET_STATE", text)
    assert build_parser().parse_args(["run"]).reset_state is True


def test_the_demo_finds_its_example_config_wherever_it_is_run_from(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # not the repository: "examples/risk.toml" is not here
    config = build_parser().parse_args(["demo"]).config
    assert config.is_absolute() and config.is_file()
    assert config.samefile(REPO / "examples" / "risk.toml")


@pytest.mark.parametrize("environ", [{}, {"LIQMON_CONFIG": ""}], ids=["unset", "empty"])
def test_run_without_a_config_is_a_usage_error(environ: dict[str, str],
                                               monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    """Exit 2 as replay's and synth's, naming both ways to give it (not "cannot read risk
    config : No such file" for a template that leaves the variable blank)."""
    monkeypatch.delenv("LIQMON_CONFIG", raising=False)
    for variable, text in environ.items():
        monkeypatch.setenv(variable, text)
    assert main(["run"]) == 2
    assert "--config (or LIQMON_CONFIG) is required" in capsys.readouterr().err


def test_an_on_off_variable_set_empty_is_as_if_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    """A deployment template that leaves it blank."""
    monkeypatch.setenv("LIQMON_RESET_STATE", "")
    monkeypatch.setenv("LIQMON_SSL_CHECK_HOSTNAME", "")
    args = build_parser().parse_args(["run"])
    assert (args.reset_state, args.ssl_check_hostname) == (False, True)


def test_an_on_off_variable_that_is_neither_gives_way_to_its_flag(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LIQMON_RESET_STATE", "on")
    assert build_parser().parse_args(["run", "--reset-state"]).reset_state is True


def test_a_broker_port_variable_that_is_not_a_number_is_a_usage_error(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """It was read with int() as the parser was built: a ValueError traceback."""
    monkeypatch.setenv("LIQMON_BROKER_PORT", "abc")
    with pytest.raises(SystemExit) as exit_:
        main(["broker"])
    assert exit_.value.code == 2
    assert ("argument --port: not a whole number: 'abc' (from LIQMON_BROKER_PORT)"
            in capsys.readouterr().err)


def test_a_demo_whose_check_could_not_be_made_says_why_and_exits_1(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from monitor import demo

    class CheckLost(demo.Demo):
        async def run(self) -> demo.DemoView:
            return demo.DemoView(accounts=1, duration=1.0, seed=7,
                                 check_error="the check could not read the topics from x:1")

    monkeypatch.setattr(demo, "Demo", CheckLost)
    risk = Path(__file__).parents[1] / "examples" / "risk.toml"
    assert main(["demo", "--config", str(risk), "--duration", "1"]) == 1
    assert ("liqmon: error: the check could not read the topics from x:1"
            in capsys.readouterr().err)
