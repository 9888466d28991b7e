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


def test_a_topic_renamed_for_a_file_replay_is_a_usage_error() -> None:
    """It reads no topic: the flag is a slip (--bootstrap was meant), not a no-op."""
    result = liqmon("replay", EXAMPLE, "--topic-prices", "px", "--topic-margin-calls", "mc",
                    "--config", CONFIG)
    assert result.returncode == 2
    assert (b"--topic-prices, --topic-margin-calls name topics of --bootstrap: a file replay "
            b"reads none") in result.stderr


def test_max_future_without_bootstrap_is_a_usage_error() -> None:
    """A file has no Kafka timestamps to judge a ts against."""
    result = liqmon("replay", EXAMPLE, "--max-future", "60", "--config", CONFIG)
    assert result.returncode == 2
    assert b"--max-future judges a ts against its Kafka timestamp: it needs --bootstrap" in (
        result.stderr)


DEPOSIT = (b'{"topic": "ledger", "value": {"entry_id": "%s", "account": "a", "asset": "USDT", '
           b'"amount": 100, "kind": "deposit", "ts": %d}}')


def test_records_stamped_before_one_above_them_are_counted_and_applied_where_they_are(
        tmp_path: Path) -> None:
    """The service applies records in ts order; a file is applied as it is, so its summary
    says how many records the two orders disagree on."""
    source = tmp_path / "in.jsonl"
    source.write_bytes(b"\n".join([DEPOSIT % (b"e1", 2000), DEPOSIT % (b"e2", 1000),
                                   DEPOSIT % (b"e3", 1500), DEPOSIT % (b"e4", 2000)]))
    stderr = liqmon("replay", source, "--config", CONFIG).stderr.decode()
    assert "replay: applied: prices 0, fills 0, ledger 4" in stderr
    assert "replay: out of order: 2 records stamped before a record above them" in stderr


def test_a_file_in_ts_order_says_nothing_of_order(tmp_path: Path) -> None:
    source = tmp_path / "in.jsonl"
    source.write_bytes(DEPOSIT % (b"e1", 1000) + b"\n" + DEPOSIT % (b"e2", 1000))
    assert "out of order" not in liqmon("replay", source, "--config", CONFIG).stderr.decode()


def test_a_byte_order_mark_before_the_first_line_is_skipped(tmp_path: Path) -> None:
    source = tmp_path / "in.jsonl"
    source.write_bytes(b"\xef\xbb\xbf" + DEPOSIT % (b"e1", 1000))
    stderr = liqmon("replay", source, "--config", CONFIG).stderr.decode()
    assert "replay: applied: prices 0, fills 0, ledger 1" in stderr
    assert "replay: rejected: 0" in stderr
