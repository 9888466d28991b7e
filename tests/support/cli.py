"""The command line as the tests drive it in-process."""

from __future__ import annotations

import pytest

from monitor import cli
from tests.support.paths import REPO

CONFIG = str(REPO / "examples" / "risk.toml")


def run_usage_error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """stderr of `liqmon run --config … ARGV`, which must stop with a usage error (exit 2:
    argparse's, which exits, or liqmon's, which main returns)."""
    try:
        code = cli.main(["run", "--config", CONFIG, *argv])
    except SystemExit as exit_:
        code = exit_.code
    assert code == 2
    return capsys.readouterr().err
