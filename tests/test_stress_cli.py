"""`liqmon stress` as a user runs it (SPEC §7): book sources, scenarios, output, errors."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiokafka.admin import AIOKafkaAdminClient

from monitor.cli import MAX_GRID_SCENARIOS, _grid
from monitor.config import load_config
from monitor.service.topics import create_topics
from tests.support.kafka import RunningMonitor, fresh_settings, produce, routable, wait_processed
from tests.support.schemas import schema_errors

REPO = Path(__file__).resolve().parent.parent
CONFIG = REPO / "examples" / "risk.toml"


def line(topic: str, **value: Any) -> bytes:
    return orjson.dumps({"topic": topic, "value": value})


# each account: 10,000 USDT and 1 BTC-PERP at 60,000, one long, one short
BOOK = [
    line("prices", symbol="BTC-PERP", price=60_000, ts=1),
    line("ledger", entry_id="e1", account="long", asset="USDT", amount=10_000, kind="deposit",
         ts=1),
    line("fills", fill_id="f1", account="long", symbol="BTC-PERP", side="buy", qty=1,
         price=60_000, fee=0, ts=2),
    line("ledger", entry_id="e2", account="short", asset="USDT", amount=10_000, kind="deposit",
         ts=1),
    line("fills", fill_id="f2", account="short", symbol="BTC-PERP", side="sell", qty=1,
         price=60_000, fee=0, ts=2),
]


def liqmon(*args: str | Path, env: dict[str, str] | None = None,
           ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "monitor.cli", *map(str, args)],
                          capture_output=True, text=True, timeout=120, check=False,
                          env=env, cwd=REPO)


@pytest.fixture
def book(tmp_path: Path) -> Path:
    path = tmp_path / "book.jsonl"
    path.write_bytes(b"\n".join(BOOK) + b"\n")
    return path


def test_the_table_names_the_newly_liquidating_count_and_the_largest_loser(book: Path) -> None:
    # −17 %: the long is at −200 (lost 10,200), the short gains
    result = liqmon("stress", "--replay", book, "--config", CONFIG, "--shock", "BTC-PERP=-0.17")
    assert result.returncode == 0, result.stderr
    assert "BTC-PERP -17.0%" in result.stdout
    assert "long −10,200.00" in result.stdout
    assert "stress: replayed 5 records (0 rejected)" in result.stderr


def test_the_title_tells_isolated_positions_from_accounts(book: Path, tmp_path: Path) -> None:
    isolated = [
        line("ledger", entry_id="e3", account="iso", asset="USDT", amount=5_000,
             kind="deposit", ts=1),
        line("ledger", entry_id="e4", account="iso", asset="USDT", amount=-1_000,
             kind="isolated_margin", symbol="BTC-PERP", ts=2),
        line("fills", fill_id="f3", account="iso", symbol="BTC-PERP", side="buy", qty=0.1,
             price=60_000, fee=0, ts=3, margin_mode="isolated")]
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_bytes(book.read_bytes() + b"\n".join(isolated) + b"\n")
    result = liqmon("stress", "--replay", mixed, "--config", CONFIG, "--shock", "BTC-PERP=-0.1")
    assert result.returncode == 0, result.stderr
    assert "(0 rejected)" in result.stderr
    assert "3 risk units holding a position (2 accounts, 1 isolated position)" in result.stdout


def test_a_shock_of_a_symbol_without_a_tick_says_it_moved_nothing(book: Path) -> None:
    # the book ticks BTC-PERP only: a BTC shock leaves every figure as it was
    result = liqmon("stress", "--replay", book, "--config", CONFIG, "--shock", "BTC=-0.5")
    assert result.returncode == 0, result.stderr
    assert "stress: no tick yet, so no shock moves: BTC" in result.stderr
    assert "not moved by any shock, no tick yet: BTC" in result.stdout


def test_json_report_validates_against_its_schema(book: Path) -> None:
    result = liqmon("stress", "--replay", book, "--config", CONFIG, "--grid=-0.2:0.2:0.1",
                    "--json")
    assert result.returncode == 0, result.stderr
    report = orjson.loads(result.stdout)
    assert schema_errors("stress_report", report) == []
    assert "BTC-PERP" not in report["not_moved"] and "BTC" in report["not_moved"]


def test_a_grid_runs_one_scenario_per_step_including_both_bounds(book: Path) -> None:
    # −0.2, −0.1, 0.0, 0.1, 0.2 (rounded: −0.2 + 2·0.1 reads 0.0), every price symbol alike
    result = liqmon("stress", "--replay", book, "--config", CONFIG, "--grid=-0.2:0.2:0.1",
                    "--json")
    scenarios = orjson.loads(result.stdout)["scenarios"]
    assert [set(s["shock"].values()) for s in scenarios] == [{-0.2}, {-0.1}, {0.0}, {0.1},
                                                             {0.2}]
    assert set(scenarios[0]["shock"]) == set(load_config(CONFIG).price_symbols())
    # ±20 %: the long, then the short, ends at −2,000
    assert [s["newly_liquidating"] for s in scenarios] == [["long"], [], [], [], ["short"]]
    assert scenarios[0]["bad_debt"] == scenarios[4]["bad_debt"] == pytest.approx(2_000.0)


def test_a_grid_of_exactly_the_most_scenarios_is_allowed() -> None:
    grid = _grid("0:0.999:0.001")
    assert len(grid) == MAX_GRID_SCENARIOS == 1_000
    assert (grid[0], grid[1], grid[-1]) == (0.0, 0.001, 0.999)


def test_symbols_restrict_the_grid(book: Path) -> None:
    result = liqmon("stress", "--replay", book, "--config", CONFIG, "--grid=0:0.1:0.1",
                    "--symbols", "BTC-PERP,ETH", "--json")
    scenarios = orjson.loads(result.stdout)["scenarios"]
    assert [s["shock"] for s in scenarios] == [{"BTC-PERP": 0.0, "ETH": 0.0},
                                               {"BTC-PERP": 0.1, "ETH": 0.1}]


def test_repeated_shocks_make_one_scenario(book: Path) -> None:
    result = liqmon("stress", "--replay", book, "--config", CONFIG, "--shock", "BTC-PERP=-0.1",
                    "--shock", "BTC=0.05", "--json")
    assert [s["shock"] for s in orjson.loads(result.stdout)["scenarios"]] == [
        {"BTC-PERP": -0.1, "BTC": 0.05}]


@pytest.mark.parametrize(("args", "message"), [
    (["--shock", "BTC-PERP"], "expected SYMBOL=FRACTION"),
    (["--shock", "DOGE=-0.1"], "'DOGE' is not a price symbol"),
    (["--shock", "USDT=-0.1"], "'USDT' is not a price symbol"),  # fixed price: never moves
    (["--shock", "BTC-PERP=abc"], "'abc' is not a number"),
    (["--shock", "BTC-PERP=-1"], "> -1"),
    (["--shock", "BTC-PERP=-0.1", "--shock", "BTC-PERP=0.1"], "shocked twice"),
    (["--grid=-0.3:0.3:0"], "the step must be > 0"),
    (["--grid=-0.3:0.3:-0.1"], "the step must be > 0"),
    (["--grid=-0.3:0.3"], "expected FROM:TO:STEP"),
    (["--grid=0.3:-0.3:0.1"], "FROM must not exceed TO"),
    (["--grid=0:1:0.0009"], "more than 1,000 scenarios; take a larger step"),  # 1,112
    (["--grid=0:1e308:1e-300"], "more than 1,000 scenarios"),  # a count beyond any float
    (["--grid=-0.9999999999999:0:1"], "FROM is -1 to the grid's 12 decimal places"),
    (["--grid=-0.3:0.3:0.1", "--symbols", "BTC-PERP,DOGE"], "DOGE"),
    (["--shock", "BTC-PERP=-0.1", "--symbols", "BTC"], "--symbols applies to --grid only"),
    (["--shock", "BTC-PERP=-0.1", "--plot", "x.png"], "--plot charts a --grid"),
    (["--grid=0:0.1:0.1", "--plot", "x.pdf"], "--plot writes a PNG image: give a file name "
                                              "ending in .png, got x.pdf"),
    (["--shock", "BTC-PERP=-0.1", "--topic-state", "st"], "--topic-state names a topic of "
                                                          "--bootstrap"),
    (["--shock", "BTC-PERP=-0.1", "--grid=0:0.1:0.1"], "not allowed with argument"),
    ([], "one of the arguments --shock --grid is required"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_usage_errors_exit_2_naming_the_problem(book: Path, args: list[str],
                                                message: str) -> None:
    result = liqmon("stress", "--replay", book, "--config", CONFIG, *args)
    assert result.returncode == 2
    assert message in result.stderr


def test_without_a_book_source_it_is_a_usage_error() -> None:
    result = liqmon("stress", "--config", CONFIG, "--shock", "BTC-PERP=-0.1")
    assert result.returncode == 2
    assert "one of the arguments --replay --bootstrap is required" in result.stderr


def test_with_both_book_sources_it_is_a_usage_error(book: Path) -> None:
    result = liqmon("stress", "--replay", book, "--bootstrap", "127.0.0.1:1", "--config", CONFIG,
                    "--shock", "BTC-PERP=-0.1")
    assert result.returncode == 2
    assert "not allowed with argument" in result.stderr


def test_a_missing_replay_file_exits_1(tmp_path: Path) -> None:
    result = liqmon("stress", "--replay", tmp_path / "nope.jsonl", "--config", CONFIG,
                    "--shock", "BTC-PERP=-0.1")
    assert result.returncode == 1
    assert "cannot read" in result.stderr


# -- --plot ------------------------------------------------------------------------------------

def test_plot_writes_a_png(book: Path, tmp_path: Path) -> None:
    chart = tmp_path / "stress.png"
    result = liqmon("stress", "--replay", book, "--config", CONFIG, "--grid=-0.3:0.3:0.01",
                    "--plot", chart)
    assert result.returncode == 0, result.stderr
    assert chart.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")


def test_plot_into_a_missing_directory_exits_1(book: Path, tmp_path: Path) -> None:
    result = liqmon("stress", "--replay", book, "--config", CONFIG, "--grid=0:0.1:0.1",
                    "--plot", tmp_path / "no" / "such" / "dir.png")
    assert result.returncode == 1
    assert "cannot write" in result.stderr


def test_plot_without_the_extra_names_the_extra(book: Path, tmp_path: Path) -> None:
    # a package named matplotlib that fails to import, first on the path: as if not installed
    shim = tmp_path / "shim" / "matplotlib"
    shim.mkdir(parents=True)
    (shim / "__init__.py").write_text("raise ImportError('not installed')\n")
    env = {**os.environ, "PYTHONPATH": f"{shim.parent}{os.pathsep}{REPO}"}
    result = liqmon("stress", "--replay", book, "--config", CONFIG, "--grid=0:0.1:0.1",
                    "--plot", tmp_path / "x.png", env=env)
    assert result.returncode == 1
    assert "pip install 'liqmon[plot]'" in result.stderr
    assert not (tmp_path / "x.png").exists()


# -- the live book, from the changelog -----------------------------------------------------------

async def test_the_live_book_from_the_changelog_gives_the_replay_report(broker,
                                                                        book: Path) -> None:
    settings = fresh_settings(broker.bootstrap, partitions=2)
    await create_topics(settings)
    ends = await produce(broker.bootstrap, [(getattr(settings.topics, kind), key, value)
                                            for kind, key, value in routable(BOOK)])
    async with RunningMonitor(settings, load_config(CONFIG)) as monitor:
        await wait_processed(monitor, ends)
    # stopping checkpoints every partition: accounts, then the control with the prices
    scenario = ("--config", CONFIG, "--grid=-0.2:0.2:0.1", "--json")
    live = await asyncio.to_thread(liqmon, "stress", "--bootstrap", broker.bootstrap,
                                   "--topic-state", settings.topics.state, *scenario)
    assert live.returncode == 0, live.stderr
    replayed = liqmon("stress", "--replay", book, *scenario)
    assert orjson.loads(live.stdout) == orjson.loads(replayed.stdout)
    assert orjson.loads(live.stdout)["accounts"] == 2


async def test_a_config_without_the_books_instruments_exits_1_naming_them(
        broker, tmp_path: Path) -> None:
    settings = fresh_settings(broker.bootstrap)
    await create_topics(settings)
    ends = await produce(broker.bootstrap, [(getattr(settings.topics, kind), key, value)
                                            for kind, key, value in routable(BOOK)])
    async with RunningMonitor(settings, load_config(CONFIG)) as monitor:
        await wait_processed(monitor, ends)
    other = tmp_path / "eth-only.toml"  # no BTC-PERP, which both accounts hold
    other.write_text('[thresholds]\nmargin_call = 0.8\nliquidation = 1.0\nhysteresis = 0.05\n'
                     '[assets.USDT]\ncollateral_weight = 1.0\nprice = 1.0\n'
                     '[instruments."ETH-PERP"]\nsettle = "USDT"\ncontract_size = 1.0\n'
                     'tiers = [{ max_notional = "inf", mmr = 0.01, imr = 0.02 }]\n')
    result = await asyncio.to_thread(liqmon, "stress", "--bootstrap", broker.bootstrap,
                                     "--topic-state", settings.topics.state, "--config", other,
                                     "--shock", "ETH-PERP=-0.1")
    assert result.returncode == 1
    assert "holds BTC-PERP, which the risk config does not define" in result.stderr


async def test_a_missing_state_topic_exits_1_naming_it_and_is_not_created(broker) -> None:
    """A mistyped name, or a fleet not started yet. Asking a broker that creates topics on
    first use would have created it, with the broker's layout, which the fleet then refuses
    to start on (partition count, cleanup policy): a read-only command must not."""
    missing = fresh_settings(broker.bootstrap).topics.state
    result = await asyncio.to_thread(liqmon, "stress", "--bootstrap", broker.bootstrap,
                                     "--topic-state", missing, "--config", CONFIG,
                                     "--shock", "BTC-PERP=-0.1")
    assert result.returncode == 1
    assert f"topic {missing!r} not found" in result.stderr
    assert "--topic-state" in result.stderr
    admin = AIOKafkaAdminClient(bootstrap_servers=broker.bootstrap)
    await admin.start()
    try:
        assert missing not in await admin.list_topics()
    finally:
        await admin.close()


async def test_a_state_topic_without_a_checkpoint_exits_1_naming_it(broker) -> None:
    settings = fresh_settings(broker.bootstrap)
    await create_topics(settings)
    result = await asyncio.to_thread(liqmon, "stress", "--bootstrap", broker.bootstrap,
                                     "--topic-state", settings.topics.state, "--config", CONFIG,
                                     "--shock", "BTC-PERP=-0.1")
    assert result.returncode == 1
    assert f"state topic {settings.topics.state!r} holds no checkpoint" in result.stderr


def test_an_unreachable_broker_exits_1() -> None:
    # port 1: nothing listens there, the connection is refused at once
    result = liqmon("stress", "--bootstrap", "127.0.0.1:1", "--config", CONFIG,
                    "--shock", "BTC-PERP=-0.1")
    assert result.returncode == 1
    assert "cannot read the book from 127.0.0.1:1" in result.stderr


def test_the_live_book_takes_the_kafka_security_options_and_checks_them_first() -> None:
    """SASL_SSL with no mechanism, user or password: a usage error before any connection
    (the same checks as `liqmon run`), not an unreachable broker."""
    result = liqmon("stress", "--bootstrap", "127.0.0.1:1", "--config", CONFIG,
                    "--shock", "BTC-PERP=-0.1", "--security-protocol", "SASL_SSL")
    assert result.returncode == 2
    assert "--security-protocol SASL_SSL needs --sasl-mechanism" in result.stderr
    assert "cannot read the book" not in result.stderr
