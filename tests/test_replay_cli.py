"""`liqmon replay` as a user runs it (SPEC §7)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import orjson

REPO = Path(__file__).resolve().parent.parent
CONFIG = REPO / "examples" / "risk.toml"
EXAMPLE = REPO / "examples" / "market.jsonl"


def liqmon(*args: str | Path, stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([sys.executable, "-m", "monitor.cli", *map(str, args)],
                          input=stdin, capture_output=True, timeout=120, check=False)


def test_example_input_shows_margin_calls_liquidations_and_recoveries(tmp_path: Path) -> None:
    out = tmp_path / "events.jsonl"
    result = liqmon("replay", EXAMPLE, "--config", CONFIG, "-o", out)
    assert result.returncode == 0, result.stderr
    events = [orjson.loads(line) for line in out.read_bytes().splitlines()]
    assert {e["type"] for e in events} == {"margin_call", "liquidation", "recovered"}
    stderr = result.stderr.decode()
    assert "replay: events: " in stderr
    assert "replay: rejected: " in stderr


def test_bad_lines_are_reported_with_their_line_number_and_do_not_stop_the_run(
    tmp_path: Path,
) -> None:
    good = b'{"topic": "ledger", "value": {"entry_id": "e1", "account": "a", "asset": "USDT",' \
           b' "amount": 100, "kind": "deposit", "ts": 1}}'
    source = tmp_path / "in.jsonl"
    source.write_bytes(b"garbage\n" + good + b"\n" + b'{"topic": "fills", "value": {}}\n')
    result = liqmon("replay", source, "--config", CONFIG)
    assert result.returncode == 0
    stderr = result.stderr.decode()
    assert f"{source}:1: rejected: invalid_json" in stderr
    assert f"{source}:3: rejected: missing_field: fill_id" in stderr
    assert "replay: records: 3" in stderr
    assert "replay: applied: prices 0, fills 0, ledger 1" in stderr
    assert "replay: rejected: 2 (invalid_json 1, missing_field 1)" in stderr


def test_replay_is_deterministic_but_for_emitted_at() -> None:
    runs = [liqmon("replay", EXAMPLE, "--config", CONFIG).stdout for _ in range(2)]

    def strip(stdout: bytes) -> list[dict]:
        events = [orjson.loads(line) for line in stdout.splitlines()]
        for event in events:
            event.pop("emitted_at")
        return events

    assert strip(runs[0]) == strip(runs[1]) != []


def test_reads_stdin_and_writes_stdout() -> None:
    result = liqmon("replay", "-", "--config", CONFIG, stdin=EXAMPLE.read_bytes())
    assert result.returncode == 0
    assert result.stdout.count(b"\n") > 100


def test_config_error_exits_non_zero_with_the_key(tmp_path: Path) -> None:
    bad = tmp_path / "risk.toml"
    bad.write_text(CONFIG.read_text().replace("hysteresis  = 0.05", "hysteresis  = 0.9"))
    result = liqmon("replay", EXAMPLE, "--config", bad)
    assert result.returncode == 1
    assert b"liqmon: error: thresholds.hysteresis: must be < margin_call" in result.stderr


def test_missing_input_file_exits_non_zero(tmp_path: Path) -> None:
    result = liqmon("replay", tmp_path / "nope.jsonl", "--config", CONFIG)
    assert result.returncode == 1
    assert b"cannot read" in result.stderr


def test_usage_error_exits_2() -> None:
    assert liqmon("replay").returncode == 2


def test_neither_a_file_nor_bootstrap_is_a_usage_error() -> None:
    result = liqmon("replay", "--config", CONFIG)
    assert result.returncode == 2
    assert b"give either INPUT.jsonl or --bootstrap" in result.stderr


def test_a_file_and_bootstrap_together_is_a_usage_error() -> None:
    result = liqmon("replay", EXAMPLE, "--bootstrap", "127.0.0.1:1", "--config", CONFIG)
    assert result.returncode == 2
    assert b"give either INPUT.jsonl or --bootstrap" in result.stderr


def test_check_without_bootstrap_is_a_usage_error() -> None:
    result = liqmon("replay", EXAMPLE, "--check", "--config", CONFIG)
    assert result.returncode == 2
    assert b"--check compares with the event topics: it needs --bootstrap" in result.stderr
