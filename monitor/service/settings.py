"""Settings of `liqmon run`: flags, each also read from a `LIQMON_…` environment variable."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from monitor.service.security import KafkaSecurity

# Kafka's own rule for topic names (kafka.common.internals.Topic): a name breaking it is
# refused by the broker on every request, which a running monitor only notices on its outputs.
_TOPIC_NAME = re.compile(r"[a-zA-Z0-9._-]{1,249}")

# Seconds that closing the Kafka clients may take on stop, on top of --shutdown-timeout (which
# bounds delivering and checkpointing): a client talking to an unreachable broker is abandoned.
CLOSE_TIMEOUT = 5.0


@dataclass(frozen=True, slots=True)
class Topics:
    """Kafka topic names (SPEC §2); every one can be renamed with --topic-<name>."""

    prices: str = "prices"
    fills: str = "fills"
    ledger: str = "ledger"
    margin_calls: str = "margin-calls"
    liquidations: str = "liquidations"
    dead_letter: str = "liqmon.dead-letter"
    state: str = "liqmon.state"

    def input_kind(self, topic: str) -> str:
        """prices / fills / ledger for an input topic name."""
        return {self.prices: "prices", self.fills: "fills", self.ledger: "ledger"}[topic]

    def invalid(self) -> list[str]:
        """One message per name Kafka would refuse; empty when every name is valid."""
        problems = []
        for option, name in ((f, getattr(self, f)) for f in Topics.__dataclass_fields__):
            if name in (".", "..") or not _TOPIC_NAME.fullmatch(name):
                problems.append(
                    f"--topic-{option.replace('_', '-')} {name!r} is not a valid Kafka topic "
                    "name: 1 to 249 characters of a-z, A-Z, 0-9, '.', '_' and '-', and "
                    "not '.' or '..'")
        return problems


@dataclass(frozen=True, slots=True)
class ServiceSettings:
    config_path: Path
    bootstrap: str = "127.0.0.1:9092"
    group: str = "liqmon"
    client_id: str = "liqmon"
    security: KafkaSecurity = field(default_factory=KafkaSecurity)  # TLS and SASL
    topics: Topics = field(default_factory=Topics)
    partitions: int = 1  # for topics liqmon creates because they are missing
    start: Literal["earliest", "latest"] = "earliest"
    checkpoint_interval: float = 5.0  # seconds
    checkpoint_records: int = 100_000  # or after this many input records, whichever first
    reset_state: bool = False  # discard liqmon.state and rebuild from the inputs
    max_idle: float = 0.5  # seconds the merge may hold everything back for a silent partition
    max_skew_ms: int = 5  # producers' clock skew (and in-flight time) the merge allows for
    max_future: float = 300.0  # seconds a record's ts may be ahead of the wall clock
    conflate_ticks: bool = False  # overload mode: only the latest tick per symbol per batch
    metrics_port: int = 9464  # 0 disables the HTTP endpoint
    metrics_host: str = "0.0.0.0"  # bind address of the HTTP endpoint (all interfaces: probes)
    # lz4: a few µs per batch; aiokafka's gzip runs at level 9 on the loop and cost 14 % of
    # the service's time in the latency bench
    compression: str = "lz4"
    max_batch_records: int = 5_000
    shutdown_timeout: float = 30.0  # seconds to deliver pending events on SIGTERM
    accept_config_change: bool = False  # restore state checkpointed under another risk config
    session_timeout_ms: int = 6_000
    heartbeat_interval_ms: int = 1_000
    request_timeout_ms: int = 5_000

    @property
    def shutdown_budget(self) -> float:
        """Longest time from SIGTERM to exit: delivering and checkpointing, then closing the
        clients. A deployment's grace period must exceed it."""
        return self.shutdown_timeout + CLOSE_TIMEOUT

    def run_args(self) -> list[str]:
        """`liqmon run` flags for the config, the brokers and every topic name (tools and
        tests start separate instances with them; the group is theirs to choose)."""
        args = ["--config", str(self.config_path), "--bootstrap", self.bootstrap]
        for name in Topics.__dataclass_fields__:
            args += [f"--topic-{name.replace('_', '-')}", getattr(self.topics, name)]
        return args
