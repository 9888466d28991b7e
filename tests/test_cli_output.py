"""Where the offline commands write (SPEC §7: I/O errors exit non-zero): never over their own
input, and a write that cannot be made is one line, not a traceback."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
CONFIG = REPO / "examples" / "risk.toml"
EXAMPLE = REPO / "examples" / "market.jsonl"
FULL_DISK = Path("/dev/full")  # Linux: every write fails with ENOSPC

needs_dev_full = pytest.mark.skipif(not FULL_DISK.exists(), reason="no /dev/full here")


def liqmon(*args: str | Path, stdout: int | None = subprocess.PIPE,
           ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "monitor.cli", *map(str, args)],
                          stdout=stdout, stderr=subprocess.PIPE, text=True, timeout=120,
                          check=False)


def test_replay_refuses_an_output_that_is_its_input_and_leaves_the_input_whole(
        tmp_path: Path) -> None:
    source = tmp_path / "in.jsonl"
    shutil.copy(EXAMPLE, source)
    result = liqmon("replay", source, "--config", CONFIG, "-o", source)
    assert result.returncode == 2
    assert f"-o {source} is the input ({source}): writing there would destroy it" \
        in result.stderr
    assert source.read_bytes() == EXAMPLE.read_bytes()


def test_an_output_that_is_the_risk_config_is_refused_even_by_another_name(
        tmp_path: Path) -> None:
    config = tmp_path / "risk.toml"
    shutil.copy(CONFIG, config)
    alias = tmp_path / "alias.toml"
    alias.symlink_to(config)
    result = liqmon("synth", "--config", config, "--steps", "1", "-o", alias)
    assert result.returncode == 2
    assert f"-o {alias} is the risk config ({config})" in result.stderr
    assert config.read_bytes() == CONFIG.read_bytes()


def test_stress_refuses_a_plot_over_its_input(tmp_path: Path) -> None:
    source = tmp_path / "in.jsonl"
    shutil.copy(EXAMPLE, source)
    result = liqmon("stress", "--replay", source, "--config", CONFIG, "--grid=-0.1:0:0.1",
                    "--plot", source)
    assert result.returncode == 2
    assert f"--plot {source} is the input ({source})" in result.stderr
    assert source.read_bytes() == EXAMPLE.read_bytes()


@pytest.mark.parametrize("command", [
    ["replay", "{input}", "--config", str(CONFIG)],
    ["stress", "--replay", "{input}", "--config", str(CONFIG), "--shock", "BTC-PERP=-0.1"],
], ids=["replay", "stress"])
def test_stdout_appended_to_the_input_is_refused_and_leaves_it_whole(
        tmp_path: Path, command: list[str]) -> None:
    source = tmp_path / "in.jsonl"
    shutil.copy(EXAMPLE, source)
    with source.open("ab") as appended:  # `>> in.jsonl`
        result = liqmon(*[part.format(input=source) for part in command],
                        stdout=appended.fileno())
    assert result.returncode == 2
    assert f"stdout goes to the input ({source}): writing there would destroy it" \
        in result.stderr
    assert source.read_bytes() == EXAMPLE.read_bytes()


def test_an_output_file_named_stdout_is_a_file_like_any_other(tmp_path: Path) -> None:
    """Not where stdout goes: `-o stdout` over an input of that name is refused too."""
    source = tmp_path / "stdout"
    shutil.copy(EXAMPLE, source)
    result = subprocess.run([sys.executable, "-m", "monitor.cli", "replay", "stdout",
                             "--config", str(CONFIG), "-o", "stdout"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 2
    assert "-o stdout is the input (stdout): writing there would destroy it" in result.stderr
    assert source.read_bytes() == EXAMPLE.read_bytes()


def test_stdout_appended_to_the_risk_config_is_refused(tmp_path: Path) -> None:
    config = tmp_path / "risk.toml"
    shutil.copy(CONFIG, config)
    with config.open("ab") as appended:
        result = liqmon("synth", "--config", config, "--steps", "1", stdout=appended.fileno())
    assert result.returncode == 2
    assert f"stdout goes to the risk config ({config})" in result.stderr
    assert config.read_bytes() == CONFIG.read_bytes()


@needs_dev_full
def test_a_full_disk_under_the_output_file_is_one_line_and_exit_1() -> None:
    result = liqmon("replay", EXAMPLE, "--config", CONFIG, "-o", FULL_DISK)
    assert result.returncode == 1
    assert "liqmon: error: cannot write /dev/full: No space left on device" in result.stderr
    assert "Traceback" not in result.stderr


@needs_dev_full
@pytest.mark.parametrize("command", [
    ["synth", "--config", str(CONFIG)],
    ["stress", "--replay", str(EXAMPLE), "--config", str(CONFIG), "--grid=-0.3:0.3:0.01",
     "--json"],
], ids=["synth", "stress"])
def test_a_full_disk_under_stdout_is_one_line_and_exit_1(command: list[str]) -> None:
    with FULL_DISK.open("w") as full:
        result = liqmon(*command, stdout=full.fileno())
    assert result.returncode == 1
    assert "liqmon: error: cannot write stdout: No space left on device" in result.stderr
    assert "Traceback" not in result.stderr
    assert "Exception ignored" not in result.stderr


def test_a_reader_that_leaves_early_ends_the_command_quietly() -> None:
    # 200 accounts over 400 steps: far more than a pipe holds, so writes outlive the reader
    synth = subprocess.Popen([sys.executable, "-m", "monitor.cli", "synth", "--config",
                              str(CONFIG)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert synth.stdout is not None and synth.stderr is not None
    assert synth.stdout.readline().startswith(b'{"topic":')
    synth.stdout.close()  # as `| head -1` does
    assert synth.wait(timeout=120) == 1
    assert synth.stderr.read() == b""
