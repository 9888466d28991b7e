"""Settings of `liqmon run`: flags, each also read from a `LIQMON_…` environment variable."""

from __future__ import annotations

import argparse
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, get_args

from monitor.service.options import (
    at_least,
    from_args,
    internal,
    non_empty,
    option,
    option_group,
    options,
    port,
    seconds,
    seconds_or_zero,
    servers,
)
from monitor.service.security import KafkaSecurity

LOG_LEVELS = ("debug", "info", "warning", "error")  # `--log-level`

# Kafka's own rule for topic names (kafka.common.internals.Topic): a name breaking it is
# refused by the broker on every request, which a running monitor only notices on its outputs.
_TOPIC_NAME = re.compile(r"[a-zA-Z0-9._-]{1,249}")

# Seconds that closing the Kafka clients may take on stop, on top of --shutdown-timeout (which
# bounds delivering and checkpointing): a client talking to an unreachable broker is abandoned.
CLOSE_TIMEOUT = 5.0

# `--max-future`: how far a record's ts may be ahead of its Kafka timestamp (`ts_bounds`), in
# `liqmon run` and in `liqmon replay --bootstrap`, which refuses what the service refuses.
DEFAULT_MAX_FUTURE = 300.0

# The input consumers' fetch wait at start (`clients.FetchWait` widens it). Kafka answers a
# fetch as soon as data arrives, so this only paces idle polling. The embedded broker holds a
# long-poll up to its end, which adds to latency, but polled more often it falls behind: at
# 2,000 records/s, a bare consumer's p99 lag on two connections was 37-44 ms with 5, 20 ms with
# 10, 22 ms with 20 (and 1.5 s with 1).
FETCH_MAX_WAIT_MS = 10
FETCH_MAX_WAIT_CAP_MS = 500  # Kafka's default: the widest any of liqmon's fetch waits grows to


def _topic(flag: str, default: str) -> Any:
    return field(default=default, metadata=option(flag, "topic name, default {default}",
                                                  metavar="NAME"))


@dataclass(frozen=True, slots=True)
class Topics:
    """Kafka topic names (SPEC §2); every one can be renamed with --topic-<name>."""

    prices: str = _topic("--topic-prices", "prices")
    fills: str = _topic("--topic-fills", "fills")
    ledger: str = _topic("--topic-ledger", "ledger")
    margin_calls: str = _topic("--topic-margin-calls", "margin-calls")
    liquidations: str = _topic("--topic-liquidations", "liquidations")
    dead_letter: str = _topic("--topic-dead-letter", "liqmon.dead-letter")
    state: str = _topic("--topic-state", "liqmon.state")

    def input_kinds(self) -> dict[str, str]:
        """Input topic name → prices / fills / ledger."""
        return {self.prices: "prices", self.fills: "fills", self.ledger: "ledger"}

    def input_ranks(self) -> dict[str, int]:
        """Input topic name → its rank in the order records are applied (SPEC §6): at one
        timestamp, ledger entries first, then fills, then ticks."""
        return {self.ledger: 0, self.fills: 1, self.prices: 2}

    def invalid(self) -> list[str]:
        """One message per name Kafka would refuse, and per name given to more than one
        topic; empty when every name is valid and its own."""
        problems = []
        flags_of: dict[str, list[str]] = {}
        for topic, spec in options(Topics):
            name = getattr(self, topic.name)
            flags_of.setdefault(name, []).append(spec.flag)
            if name in (".", "..") or not _TOPIC_NAME.fullmatch(name):
                problems.append(
                    f"{spec.flag} {name!r} is not a valid Kafka topic "
                    "name: 1 to 249 characters of a-z, A-Z, 0-9, '.', '_' and '-', and "
                    "not '.' or '..'")
        for name, flags in flags_of.items():
            if len(flags) > 1:  # dead letters read back as ticks, dead-lettered again: a loop
                problems.append(
                    f"{' and '.join(flags)} are {'both' if len(flags) == 2 else 'all'} "
                    f"{name!r}: every topic needs a name of its own (what liqmon writes to one "
                    "would be read back as another's records)")
        return problems


StartPosition = Literal["earliest", "latest"]
Compression = Literal["lz4", "zstd", "gzip", "none"]
# The producer compresses on the event loop. zstd: ~900 MB/s over event JSON, to 8 % of its
# size. aiokafka's lz4 runs at level 9 (LZ4-HC): 5.5x slower, to 15 %; its gzip at level 9
# cost 14 % of the service's time in the latency bench.
DEFAULT_COMPRESSION: Compression = "zstd"


def compression_type(compression: Compression) -> str | None:
    """The producer's ``compression_type`` for a --compression choice."""
    return None if compression == "none" else compression


def _seconds_to_ms(seconds: float) -> int:
    return int(seconds * 1000)


def _ms_to_seconds(ms: int) -> float:
    return ms / 1000


@dataclass(frozen=True, slots=True)
class ServiceSettings:
    """Every setting of `liqmon run`, each declared once: its field says its flag, its help
    and how it is parsed; the flag's environment variable follows from the flag (options.py).
    The order of the fields is the order of `liqmon run --help`."""

    config_path: Path = field(metadata=option(
        "--config", "risk config (TOML)", metavar="PATH", to_field=Path))
    bootstrap: str = field(default="127.0.0.1:9092", metadata=option(
        "--bootstrap", "Kafka bootstrap servers, default {default}", metavar="HOST:PORT[,…]",
        parse=servers))
    group: str = field(default="liqmon", metadata=option(
        "--group", "consumer group id, default {default}", parse=non_empty))
    client_id: str = field(default="liqmon", metadata=option(
        "--client-id", "Kafka client id, default {default}", parse=non_empty))
    metrics_port: int = field(default=9464, metadata=option(
        "--metrics-port", "port of /metrics, /healthz, /readyz (0 disables), default {default}",
        parse=port))
    # all interfaces: probes and scrapers come from outside the container
    metrics_host: str = field(default="0.0.0.0", metadata=option(
        "--metrics-host", "address /metrics, /healthz, /readyz listen on, default {default} "
        "(all interfaces)", metavar="ADDR"))
    start: StartPosition = field(default="earliest", metadata=option(
        "--start", "where inputs start on a first start (no checkpoint), default {default}",
        choices=get_args(StartPosition)))
    checkpoint_interval: float = field(default=5.0, metadata=option(
        "--checkpoint-interval", "seconds between checkpoints, default {default}", parse=seconds,
        metavar="SECONDS"))
    # or after this many input records, whichever comes first
    checkpoint_records: int = field(default=100_000, metadata=option(
        "--checkpoint-records", "input records between checkpoints, default {default}",
        parse=at_least(1), metavar="N"))
    reset_state: bool = field(default=False, metadata=option(
        "--reset-state", "discard the checkpoints in the state topic and rebuild state from "
        "the input topics", kind="switch"))
    # seconds the merge may hold everything back for a silent partition
    max_idle: float = field(default=0.5, metadata=option(
        "--merge-wait", "longest time, in seconds, that an input partition the broker does "
        "not answer for may hold the others back while other brokers answer; past it "
        "records are released out of proven order (and counted), default {default}",
        parse=seconds_or_zero, metavar="SECONDS"))
    # seconds a partition with records the broker reports but no fetch returns may hold
    # everything back
    max_stall: float = field(default=10.0, metadata=option(
        "--stall-timeout", "longest time, in seconds, that an input partition whose records the "
        "broker reports but no fetch returns may hold the others back; past it the partition "
        "is reported stalled and the others go on out of proven order (counted); a catch-up "
        "reports it and keeps waiting, default {default:g}", parse=seconds, metavar="SECONDS"))
    max_skew_ms: int = field(default=5, metadata=option(
        "--max-skew", "clock skew between producers (and their in-flight time) that timestamp "
        "order allows for, in ms (at most an hour), default {default}",
        parse=at_least(0, most=3_600_000), metavar="MS"))
    max_future: float = field(default=DEFAULT_MAX_FUTURE, metadata=option(
        "--max-future", "seconds a record's ts may be ahead of its Kafka timestamp, or of the "
        "wall clock if earlier; later ones are dead-lettered as ts_in_future, default "
        "{default:g}", parse=seconds, metavar="SECONDS"))
    session_timeout_ms: int = field(default=6_000, metadata=option(
        "--session-timeout", "seconds without heartbeat before the group reassigns a dead "
        "instance's partitions, default {default:g}", parse=seconds, metavar="SECONDS",
        to_field=_seconds_to_ms, from_field=_ms_to_seconds))
    conflate_ticks: bool = field(default=False, metadata=option(
        "--conflate-ticks", "overload mode: within one batch apply only the latest tick per "
        "symbol (see README)", kind="switch"))
    # for topics liqmon creates because they are missing
    partitions: int = field(default=1, metadata=option(
        "--partitions", "partition count of topics liqmon creates, default {default}",
        parse=at_least(1)))
    compression: Compression = field(default=DEFAULT_COMPRESSION, metadata=option(
        "--compression", "producer compression of events and checkpoints, default {default}",
        choices=get_args(Compression)))
    # bounds delivering and checkpointing on SIGTERM; closing the clients comes on top
    shutdown_timeout: float = field(default=30.0, metadata=option(
        "--shutdown-timeout", "seconds to deliver pending events and checkpoint on SIGTERM "
        f"(closing the Kafka clients may take {CLOSE_TIMEOUT:g} more), default {{default}}",
        parse=seconds_or_zero, metavar="SECONDS"))
    accept_config_change: bool = field(default=False, metadata=option(
        "--accept-config-change", "restore state checkpointed under a different risk config "
        "(a deliberate config roll-out, see README); without it such a restore is refused",
        kind="switch"))
    log_level: str = field(default="info", metadata=option(
        "--log-level", "debug, info (default), warning or error", parse=str.lower,
        choices=LOG_LEVELS))
    security: KafkaSecurity = field(default_factory=KafkaSecurity, metadata=option_group())
    topics: Topics = field(default_factory=Topics, metadata=option_group())
    max_batch_records: int = field(default=5_000, metadata=internal(
        "records the loop takes from the merge at a time: a tuning of the code, not of a "
        "deployment"))
    heartbeat_interval_ms: int = field(default=1_000, metadata=internal(
        "follows --session-timeout (heartbeat_for)"))
    fetch_max_wait_ms: int = field(default=FETCH_MAX_WAIT_MS, metadata=internal(
        "the input consumers' fetch wait at start (clients.FetchWait widens it): tests "
        "shorten it"))
    request_timeout_ms: int = field(default=5_000, metadata=internal(
        "aiokafka's request timeout: tests shorten it"))

    @property
    def shutdown_budget(self) -> float:
        """Longest time from SIGTERM to exit: delivering and checkpointing, then closing the
        clients. A deployment's grace period must exceed it."""
        return self.shutdown_timeout + CLOSE_TIMEOUT

    def run_args(self) -> list[str]:
        """`liqmon run` flags for the config, the brokers and every topic name (tools and
        tests start separate instances with them; the group is theirs to choose)."""
        flags = {f.name: spec.flag for f, spec in options(ServiceSettings)}
        args = [flags["config_path"], str(self.config_path), flags["bootstrap"], self.bootstrap]
        for topic, spec in options(Topics):
            args += [spec.flag, getattr(self.topics, topic.name)]
        return args


def heartbeat_for(session_timeout_ms: int) -> int:
    """The group heartbeat interval for a session timeout: a sixth of it, so that a few lost
    heartbeats do not cost an instance its partitions; never under 100 ms."""
    return max(100, session_timeout_ms // 6)


def run_settings(args: argparse.Namespace, **given: Any) -> ServiceSettings:
    """The settings `liqmon run` parsed ``args`` into (``given``: fields already built)."""
    settings: ServiceSettings = from_args(ServiceSettings, args, **given)
    return replace(settings, heartbeat_interval_ms=heartbeat_for(settings.session_timeout_ms))
