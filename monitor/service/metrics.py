"""Prometheus metrics, /healthz and /readyz on one HTTP port (SPEC §8).

Labels are bounded: topics, partitions, reasons, event types, states and configured symbols —
never accounts.
"""

from __future__ import annotations

import asyncio
import io
import socket
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterable, Iterator
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    make_wsgi_app,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

# *_created series double the exposition for no operational value.
disable_created_metrics()

# Milliseconds matter: the SPEC's target is p99 ≤ 10 ms.
LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)
CHECKPOINT_BUCKETS = (0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
RESTORE_BUCKETS = (0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)  # ~4 s a million


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.records_consumed = Counter(
            "liqmon_records_consumed", "Input records read, by topic.", ["topic"], registry=r)
        self.records_rejected = Counter(
            "liqmon_records_rejected", "Input records dead-lettered, by topic and reason.",
            ["topic", "reason"], registry=r)
        self.stale_ticks = Counter(
            "liqmon_stale_ticks", "Price ticks ignored because a tick of the same symbol with a "
            "later ts was applied (an equal ts is applied).",
            registry=r)
        self.unused_ticks = Counter(
            "liqmon_unused_ticks", "Price ticks for symbols no asset or instrument is priced by.",
            registry=r)
        self.conflated_ticks = Counter(
            "liqmon_conflated_ticks", "Ticks skipped by --conflate-ticks: a later tick of the "
            "same symbol was in the same batch.", registry=r)
        self.duplicates = Counter(
            "liqmon_duplicates", "Fills and ledger entries ignored as duplicates.", registry=r)
        self.events_emitted = Counter(
            "liqmon_events_emitted", "Events published (acknowledged by the broker), by type.",
            ["type"], registry=r)
        self.event_latency = Histogram(
            "liqmon_event_latency_seconds",
            "From the triggering input's Kafka timestamp to the event's acknowledgement, by "
            "trigger kind (price = tick-to-event latency).",
            ["trigger"], buckets=LATENCY_BUCKETS, registry=r)
        self.consumer_lag = Gauge(
            "liqmon_consumer_lag_records", "Records behind the partition's high watermark.",
            ["topic", "partition"], registry=r)
        self.input_offset = Gauge(
            "liqmon_input_offset", "Next offset to apply, per input partition this instance "
            "reads (what it has applied, unlike the group's committed offsets).",
            ["topic", "partition"], registry=r)
        self.delivery_retries = Counter(
            "liqmon_delivery_retries", "Messages sent again after a produce attempt failed "
            "(by liqmon, or by the Kafka client for a write the broker did not acknowledge).",
            registry=r)
        self.merge_forced = Counter(
            "liqmon_merge_forced_releases", "Input records applied before every other "
            "partition was known to hold nothing earlier (--merge-wait ran out, or a partition "
            "stalled).", registry=r)
        self.records_stamped_ahead = Counter(
            "liqmon_records_stamped_ahead", "Input records whose Kafka timestamp was further "
            "ahead of their arrival than --merge-wait (a producer clock ahead), by topic: "
            "applied in the order they arrived rather than held until the clock reached their "
            "timestamp; replay of the same records applies them later.", ["topic"], registry=r)
        self.records_late = Counter(
            "liqmon_records_late", "Input records applied after one that sorts after them "
            "(timestamp, topic rank, partition, offset) and bears on them (a tick bears on "
            "every record, a fill or ledger entry on its own account partition's), by topic: "
            "replay of the same records applies them earlier. They spent longer than "
            "--max-skew between their timestamp "
            "and their append, are stamped earlier than their partition's previous record, or "
            "waited behind a forced release.", ["topic"], registry=r)
        self.records_miskeyed = Counter(
            "liqmon_records_miskeyed", "Fills and ledger entries whose Kafka key is not their "
            "account (SPEC §2), by topic. They are applied; with more than one instance, an "
            "account whose records land on partitions different instances own is split "
            "between them.", ["topic"], registry=r)
        self.input_logs_replaced = Counter(
            "liqmon_input_logs_replaced", "Input partitions whose log came to end before what "
            "this instance had applied: read again from their beginning (the topic was deleted "
            "and re-created) or on from their end (the log was truncated).", ["topic", "partition"],
            registry=r)
        self.input_records_lost = Counter(
            "liqmon_input_records_lost", "Offsets of input records the broker deleted before "
            "liqmon applied them (the topic's retention ran out while they waited: liqmon "
            "away or behind for longer): found when a partition is positioned at a checkpoint "
            "its log now starts after. Its state misses them.", ["topic", "partition"],
            registry=r)
        self.input_stalled = Gauge(
            "liqmon_input_stalled", "1 while an input partition is stalled: the broker reports "
            "records in it that no fetch has returned for --stall-timeout; the others go on "
            "without it.", ["topic", "partition"], registry=r)
        self.rebalance_partitions = Counter(
            "liqmon_rebalance_partitions", "Account partitions at rebalances, by outcome: "
            "restored from the changelog, kept in memory (given back by the next generation), "
            "handed over (dropped from memory: taken by another instance, or by this one again "
            "in a later generation, and then restored afresh).", ["outcome"], registry=r)
        for outcome in ("restored", "kept", "handed_over"):
            self.rebalance_partitions.labels(outcome)
        self.restore_duration = Histogram(
            "liqmon_restore_duration_seconds", "Time to restore the partitions an assignment "
            "gains (changelog read, install, catch-up), during which /readyz is 503.",
            buckets=RESTORE_BUCKETS, registry=r)
        self.checkpoint_duration = Histogram(
            "liqmon_checkpoint_duration_seconds", "Time to write one checkpoint.",
            buckets=CHECKPOINT_BUCKETS, registry=r)
        self.last_checkpoint = Gauge(
            "liqmon_last_checkpoint_timestamp_seconds",
            "Unix time of the last completed checkpoint (0 before the first).", registry=r)
        # set by `HealthServer` from what /readyz answers; without one, nobody scrapes
        self.ready = Gauge("liqmon_ready", "1 while /readyz answers 200: restored, consuming, "
                           "Kafka answering and the event loop turning.", registry=r)
        self.kafka_reachable = Gauge(
            "liqmon_kafka_reachable", "1 while the brokers answer metadata requests.",
            registry=r)
        self.config_info = Gauge(
            "liqmon_config_info", "1, labelled with the fingerprint of the risk config in use: "
            "instances of one group showing different fingerprints disagree on margins.",
            ["fingerprint"], registry=r)
        self._live = _LiveCollector()
        r.register(self._live)

    def watch(self, sample: Callable[[], LiveFigures]) -> None:
        """Figures read at scrape time from the running monitor (no per-record cost)."""
        self._live.sample = sample


class LiveFigures:
    """What the monitor reports at scrape time."""

    def __init__(self, accounts: int, positions: int, by_state: dict[str, int],
                 last_tick_wall: dict[str, float], checkpoint_age: float,
                 isolated_by_state: dict[str, int]) -> None:
        self.accounts = accounts
        self.positions = positions
        self.by_state = by_state
        self.isolated_by_state = isolated_by_state
        self.last_tick_wall = last_tick_wall
        self.checkpoint_age = checkpoint_age


class _LiveCollector(Collector):
    def __init__(self) -> None:
        self.sample: Callable[[], LiveFigures] | None = None

    def describe(self) -> Iterable[Any]:
        return []

    def collect(self) -> Iterator[GaugeMetricFamily]:
        if self.sample is None:
            return
        figures = self.sample()
        now = time.time()
        yield GaugeMetricFamily("liqmon_accounts", "Accounts held in memory.",
                                value=figures.accounts)
        yield GaugeMetricFamily("liqmon_positions", "Open positions held in memory.",
                                value=figures.positions)
        by_state = GaugeMetricFamily("liqmon_accounts_by_state", "Accounts per state.",
                                     labels=["state"])
        for state, count in sorted(figures.by_state.items()):
            by_state.add_metric([state], count)
        yield by_state
        isolated = GaugeMetricFamily("liqmon_isolated_positions_by_state",
                                     "Isolated positions (risk units of their own, with a "
                                     "wallet, SPEC §4.1) per state.", labels=["state"])
        for state, count in sorted(figures.isolated_by_state.items()):
            isolated.add_metric([state], count)
        yield isolated
        age = GaugeMetricFamily("liqmon_price_age_seconds",
                                "Seconds (wall clock) since the last applied tick, per "
                                "symbol: the age of the price margins are computed from (a "
                                "configured symbol never ticked: since this instance began "
                                "applying ticks).",
                                labels=["symbol"])
        for symbol, wall in sorted(figures.last_tick_wall.items()):
            age.add_metric([symbol], max(0.0, now - wall))
        yield age
        yield GaugeMetricFamily(
            "liqmon_checkpoint_age_seconds",
            "Seconds since the oldest applied record that no checkpoint written holds was "
            "applied (0 when all state is saved): what a crash now would have to re-process.",
            value=figures.checkpoint_age)


def scrape_partition_gauge(port: int, name: str, host: str = "127.0.0.1"
                           ) -> dict[tuple[str, int], int]:
    """A per-partition gauge of a running instance, per (topic, partition). Empty when the
    instance does not answer."""
    try:
        with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=5) as response:
            text = response.read().decode()
    except OSError:
        return {}
    return {(sample.labels["topic"], int(sample.labels["partition"])): int(sample.value)
            for family in text_string_to_metric_families(text)
            if family.name == name for sample in family.samples}


def scrape_input_offsets(port: int, host: str = "127.0.0.1") -> dict[tuple[str, int], int]:
    """liqmon_input_offset of a running instance: what it has applied."""
    return scrape_partition_gauge(port, "liqmon_input_offset", host)


# Seconds a client may stay silent while it sends its request or reads the response. Probes
# and scrapers send at once; a port scan or a stuck scraper holding a connection open is
# dropped.
IDLE_TIMEOUT = 5.0
# Seconds a client may take to send its whole request: one that sends a byte now and then is
# never idle for long, and would otherwise hold its thread for ever.
REQUEST_TIMEOUT = 10.0
# Seconds /readyz trusts the readiness the event loop last told it (it tells it every 0.1 s):
# past them the loop is blocked, and the instance is not doing its job, whatever it said.
READINESS_TRUSTED = 2.0
TELL_EVERY = 0.1  # seconds between the event loop's word to /readyz (`HealthServer.follow`)


class _ThreadingServer(ThreadingMixIn, WSGIServer):
    """One thread per connection, so that one slow or idle client cannot hold /healthz back
    (the kubelet would kill the pod). Daemon threads: stopping never waits for a client."""

    daemon_threads = True
    idle_timeout = IDLE_TIMEOUT
    request_timeout = REQUEST_TIMEOUT

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that went quiet or away is not news; anything else is."""
        if not isinstance(sys.exc_info()[1], OSError):
            super().handle_error(request, client_address)


class _QuietHandler(WSGIRequestHandler):
    server: _ThreadingServer

    def setup(self) -> None:
        # per connection, applied to the socket by setup(); typeshed declares it class-wide
        self.timeout = self.server.idle_timeout  # type: ignore[misc]
        super().setup()
        self.rfile = io.BufferedReader(_RequestBefore(
            self.connection, time.monotonic() + self.server.request_timeout,
            self.server.idle_timeout))

    def log_message(self, format: str, *args: Any) -> None:
        """Scrapes every few seconds are not news."""


class _RequestBefore(io.RawIOBase):
    """A connection's reads, each bounded by what is left until the request's deadline as
    well as by the idle timeout (an expired deadline is a TimeoutError, an OSError: the
    connection is dropped quietly)."""

    def __init__(self, connection: socket.socket, deadline: float, idle_timeout: float) -> None:
        self._connection, self._deadline, self._idle_timeout = (connection, deadline,
                                                                idle_timeout)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        left = self._deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("the request took longer than its deadline to arrive")
        self._connection.settimeout(min(left, self._idle_timeout))
        try:
            return self._connection.recv_into(buffer)
        finally:  # the response is written under the idle timeout alone
            self._connection.settimeout(self._idle_timeout)


class HealthServer:
    """/metrics, /healthz and /readyz, served from daemon threads so that a busy event loop
    never makes Prometheus or the kubelet think the process is dead. Any other path is 404."""

    def __init__(self, metrics: Metrics, port: int, host: str = "0.0.0.0",
                 idle_timeout: float = IDLE_TIMEOUT,
                 request_timeout: float = REQUEST_TIMEOUT) -> None:
        self._metrics_app = make_wsgi_app(metrics.registry)
        self.ready = False
        self.not_ready_because = ""  # said in the 503 body
        self.told_at = time.monotonic()  # when the event loop last set the two (`tell`)
        # liqmon_ready says what /readyz says, read at scrape time: a loop that stopped
        # turning would leave a value it set saying ready (LiqmonNotReady would never fire)
        metrics.ready.set_function(lambda: 1.0 if self.answers_ready() else 0.0)
        self._server: _ThreadingServer = make_server(
            host, port, self._app, server_class=_ThreadingServer, handler_class=_QuietHandler)
        self._server.idle_timeout = idle_timeout
        self._server.request_timeout = request_timeout
        self.port = self._server.server_port
        self._thread = threading.Thread(target=self._server.serve_forever, name="liqmon-http",
                                        daemon=True)

    def _app(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        path = environ.get("PATH_INFO", "/")
        if path == "/metrics":
            return self._metrics_app(environ, start_response)
        if path == "/healthz":
            start_response("200 OK", [("Content-Type", "text/plain")])
            return [b"ok\n"]
        if path == "/readyz":
            if self.answers_ready():
                start_response("200 OK", [("Content-Type", "text/plain")])
                return [b"ready\n"]
            start_response("503 Service Unavailable", [("Content-Type", "text/plain")])
            silent = time.monotonic() - self.told_at
            reason = (f"the event loop has not answered for {silent:.0f} s" if self.ready
                      else self.not_ready_because)
            return [f"not ready: {reason}\n".encode() if reason else b"not ready\n"]
        start_response("404 Not Found", [("Content-Type", "text/plain")])
        return [b"not found: this port serves /metrics, /healthz and /readyz\n"]

    def answers_ready(self) -> bool:
        """What /readyz answers (and liqmon_ready reads): ready, as the event loop told it
        within `READINESS_TRUSTED`."""
        return self.ready and time.monotonic() - self.told_at <= READINESS_TRUSTED

    def tell(self, ready: bool, not_ready_because: str = "") -> None:
        """What /readyz says, from the event loop (at least every `READINESS_TRUSTED`)."""
        self.ready, self.not_ready_because = ready, not_ready_because
        self.told_at = time.monotonic()

    async def follow(self, not_ready_because: Callable[[], str]) -> None:
        """Tell it, from the event loop, why the instance is not ready (ready when nothing
        says so: one answer, so that a 503 always says why), every `TELL_EVERY` seconds until
        cancelled."""
        while True:
            reason = not_ready_because()
            self.tell(not reason, reason)
            await asyncio.sleep(TELL_EVERY)

    def start(self) -> HealthServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
