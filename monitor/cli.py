"""The `liqmon` command line. Thin: it parses arguments and hands over to the modules."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import BinaryIO

from monitor.config import ConfigError, RiskConfig, load_config


class CliError(Exception):
    """A usage, configuration or I/O problem: reported in one line, exit status 1."""


def _load(path: str) -> RiskConfig:
    try:
        return load_config(path)
    except ConfigError as exc:
        raise CliError(str(exc)) from exc


def _open_input(name: str, stack: ExitStack) -> BinaryIO:
    if name == "-":
        return sys.stdin.buffer
    try:
        return stack.enter_context(open(name, "rb"))
    except OSError as exc:
        raise CliError(f"cannot read {name}: {exc.strerror}") from exc


def _open_output(name: str | None, stack: ExitStack) -> BinaryIO:
    if name in (None, "-"):
        return sys.stdout.buffer
    try:
        return stack.enter_context(open(name, "wb"))
    except OSError as exc:
        raise CliError(f"cannot write {name}: {exc.strerror}") from exc


def cmd_replay(args: argparse.Namespace) -> int:
    from monitor.engine import Engine
    from monitor.replay import replay

    engine = Engine(_load(args.config))
    name = args.input

    def report(index: int, rejection: Exception) -> None:
        print(f"{name}:{index + 1}: rejected: {rejection}", file=sys.stderr)

    with ExitStack() as stack:
        source = _open_input(name, stack)
        out = _open_output(args.output, stack)
        summary = replay(source, engine, out, report)
        out.flush()
    for line in summary.lines(engine):
        print(f"replay: {line}", file=sys.stderr)
    return 0


def cmd_synth(args: argparse.Namespace) -> int:
    from monitor.market import simulate

    config = _load(args.config)
    with ExitStack() as stack:
        out = _open_output(args.output, stack)
        for record in simulate(config, args.accounts, args.steps, args.seed, args.bad_rate):
            out.write(record.replay_line())
            out.write(b"\n")
        out.flush()
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="liqmon", description="Streaming cross-margin liquidation monitor."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    replay = commands.add_parser(
        "replay", help="deterministic offline run over a JSON-lines file of input records",
        description="Process every line of INPUT in order and write the events as JSON lines. "
                    "Bad lines are reported on stderr and skipped; the exit status stays 0.",
    )
    replay.add_argument("input", metavar="INPUT.jsonl", help='input lines, "-" for stdin')
    replay.add_argument("--config", required=True, type=Path, help="risk config (TOML)")
    replay.add_argument("-o", "--output", metavar="EVENTS.jsonl",
                        help="where to write events (default: stdout)")
    replay.set_defaults(handler=cmd_replay)

    synth = commands.add_parser(
        "synth", help="write a synthetic market (random walk, crash, rebound) as replay input",
        description="Deterministic synthetic input for `liqmon replay`: deposits, leveraged "
                    "portfolios, a crash and a rebound, with liquidated accounts closed out.",
    )
    synth.add_argument("--config", required=True, type=Path, help="risk config (TOML)")
    synth.add_argument("--accounts", type=int, default=200)
    synth.add_argument("--steps", type=int, default=400, help="market time steps")
    synth.add_argument("--seed", type=int, default=7)
    synth.add_argument("--bad-rate", type=float, default=0.0,
                       help="share of deliberately malformed records (default 0)")
    synth.add_argument("-o", "--output", metavar="INPUT.jsonl", help="default: stdout")
    synth.set_defaults(handler=cmd_synth)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.handler(args))
    except CliError as exc:
        print(f"liqmon: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
