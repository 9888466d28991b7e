"""`liqmon demo`: embedded broker + the monitor + a synthetic market, with a live summary.

The market follows a clock: a calm random walk for the first 35 % of the run, a crash of about
30 % over the next 20 %, then a rebound. A stand-in liquidation engine reads the `liquidations`
topic and closes liquidated accounts out, which is what brings them back to HEALTHY. The market
waits for the monitor to keep up, so the picture stays truthful on a slow machine.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError
from rich.console import Console, Group
from rich.live import Live
from rich.panel import Panel
from rich.table import Table

from monitor.config import RiskConfig
from monitor.engine import Engine
from monitor.market import SyntheticMarket
from monitor.records import FILLS, LEDGER, PRICES
from monitor.replay import EventCheck
from monitor.service.broker import EmbeddedBroker
from monitor.service.feed import input_producer
from monitor.service.input_history import check_topics
from monitor.service.runner import Monitor
from monitor.service.settings import ServiceSettings
from monitor.state import EVENT_TYPES, AccountState

CALM, CRASH = 0.35, 0.20  # shares of the run
CRASH_DEPTH = math.log(0.70)
REBOUND_TO = math.log(0.95)  # the market recovers to 5 % below where it started
MAX_BACKLOG = 2_000  # records the monitor may be behind before the market waits for it
READY_TIMEOUT = 300.0  # seconds for the monitor to start consuming (kernels compiled first)
# The market's producer batches (5 ms linger) and does not wait for each acknowledgement, so a
# record reaches the broker up to a loaded request's round trip after its timestamp, and its
# partitions' batches in any order: README *Order*, independent producers. Live events equal
# replay's (the check at the end) when --max-skew covers that; the default 5 ms did not, once
# in many runs on a 2-core machine (one event of 1,778 differed). Events come that much later.
MAX_SKEW_MS = 200


def market_level(progress: float) -> float:
    """Log level of the market factor at a point of the run (0..1)."""
    if progress <= CALM:
        return 0.0
    if progress <= CALM + CRASH:
        return CRASH_DEPTH * (progress - CALM) / CRASH
    rebound = min(1.0, (progress - CALM - CRASH) / (1 - CALM - CRASH))
    return CRASH_DEPTH + (REBOUND_TO - CRASH_DEPTH) * rebound


def phase_name(progress: float) -> str:
    if progress <= CALM:
        return "random walk"
    return "crash" if progress <= CALM + CRASH else "rebound"


def plan_summary(plan: dict[str, Any]) -> str:
    """A liquidation plan's steps in a few words: "close ETH-PERP, sell 0.025 BTC-PERP"."""
    return ", ".join(
        f"close {step['symbol']}" if step["close"]
        else f"{step['side']} {step['qty']:,.4g} {step['symbol']}"
        for step in plan["steps"]
    )


@dataclass
class DemoView:
    accounts: int
    duration: float
    seed: int
    started: float = field(default_factory=time.monotonic)
    produced: int = 0
    events: Counter[str] = field(default_factory=Counter)
    isolated_events: Counter[str] = field(default_factory=Counter)  # of isolated positions
    liquidations: deque[dict] = field(default_factory=lambda: deque(maxlen=8))
    prices: dict[str, float] = field(default_factory=dict)
    first_prices: dict[str, float] = field(default_factory=dict)
    progress: float = 0.0
    rate_samples: deque[tuple[float, int]] = field(default_factory=lambda: deque(maxlen=20))
    check: EventCheck | None = None  # the published events against replay of the topics
    check_error: str | None = None  # why that check could not be made

    def input_rate(self, consumed: int) -> float:
        now = time.monotonic()
        self.rate_samples.append((now, consumed))
        (t0, c0), (t1, c1) = self.rate_samples[0], self.rate_samples[-1]
        return (c1 - c0) / (t1 - t0) if t1 > t0 else 0.0


def _render(view: DemoView, monitor: Monitor) -> Panel:
    engine = monitor.engine
    consumed = engine.stats.applied_ticks + engine.stats.applied_fills + \
        engine.stats.applied_ledger + engine.stats.stale_ticks + engine.stats.duplicates
    header = Table.grid(padding=(0, 2))
    header.add_row(
        f"[bold]phase[/] {phase_name(view.progress)}",
        f"[bold]elapsed[/] {time.monotonic() - view.started:5.1f}s / {view.duration:.0f}s",
        f"[bold]input[/] {view.input_rate(consumed):8,.0f} rec/s",
        f"[bold]records[/] {consumed:,}",
    )
    prices = Table.grid(padding=(0, 2))
    cells = []
    for symbol in ("BTC", "ETH", "SOL"):
        if symbol in view.prices:
            change = view.prices[symbol] / view.first_prices[symbol] - 1
            colour = "red" if change < 0 else "green"
            cells.append(f"{symbol} {view.prices[symbol]:,.2f} [{colour}]{change:+.1%}[/]")
    prices.add_row(*cells)

    states = Table(title="risk units by state", expand=True)
    states.add_column("")
    for state in AccountState:
        states.add_column(state.name, justify="right")
    states.add_row("accounts (cross)", *(f"{engine.accounts_in_state[s]:,}" for s in AccountState))
    states.add_row("isolated positions", *(f"{engine.units_in_state[s]:,}" for s in AccountState))
    events = Table(title="events published", expand=True)
    events.add_column("")
    for event_type in EVENT_TYPES:
        events.add_column(event_type, justify="right")
    events.add_row("all", *(f"{view.events[t]:,}" for t in EVENT_TYPES))
    events.add_row("of isolated positions",
                   *(f"{view.isolated_events[t]:,}" for t in EVENT_TYPES))

    latest = Table(title="latest liquidations", expand=True)
    for column in ("account", "margin", "margin ratio", "equity", "maintenance", "plan",
                   "bad debt"):
        latest.add_column(column, justify="left" if column in ("account", "margin", "plan")
                          else "right")
    for event in reversed(view.liquidations):
        ratio = event["margin_ratio"]
        plan = event["liquidation_plan"]
        latest.add_row(
            event["account"],
            f"isolated {event['symbol']}" if event["margin_mode"] == "isolated" else "cross",
            "insolvent" if ratio is None else f"{ratio:.3f}",
            f"{event['equity']:,.2f}",
            f"{event['maintenance_margin']:,.2f}",
            plan_summary(plan),
            f"{plan['bad_debt']:,.2f}",
        )
    title = f"liqmon demo — {view.accounts:,} accounts, seed {view.seed}"
    return Panel(Group(header, prices, states, events, latest), title=title)


class Demo:
    def __init__(self, config: RiskConfig, config_path: Path, accounts: int, duration: float,
                 seed: int, port: int | None, console: Console) -> None:
        self.config = config
        self.config_path = config_path
        self.duration = duration
        self.console = console
        self.broker = EmbeddedBroker(port=port)
        self.market = SyntheticMarket(config, accounts=accounts, seed=seed,
                                      bad_record_rate=0.002)
        self.view = DemoView(accounts=accounts, duration=duration, seed=seed)
        self.to_close: list[tuple[str, str | None]] = []  # (account, isolated symbol)
        self.produced: dict[TopicPartition, int] = {}

    async def run(self) -> DemoView:
        self.broker.start()
        try:
            return await self._run()
        finally:
            self.broker.stop()

    async def _run(self) -> DemoView:
        settings = ServiceSettings(config_path=self.config_path, bootstrap=self.broker.bootstrap,
                                   group="liqmon-demo", metrics_port=0, max_skew_ms=MAX_SKEW_MS,
                                   session_timeout_ms=2_000, heartbeat_interval_ms=300)
        monitor = Monitor(settings, self.config)
        monitor_task = asyncio.create_task(monitor.run())
        try:
            await self._until_ready(monitor, monitor_task)
        except BaseException:
            monitor.request_stop()
            await asyncio.gather(monitor_task, return_exceptions=True)
            raise
        producer = input_producer(self.broker.bootstrap, client_id="liqmon-demo-market")
        await producer.start()
        events = AIOKafkaConsumer(bootstrap_servers=self.broker.bootstrap, group_id=None,
                                  auto_offset_reset="earliest", client_id="liqmon-demo-events")
        await events.start()
        events.assign([TopicPartition(topic, p)
                       for topic in (settings.topics.margin_calls, settings.topics.liquidations)
                       for p in range(monitor.partition_counts[topic])])
        reader = asyncio.create_task(self._read_events(events))
        try:
            with Live(_render(self.view, monitor), console=self.console,
                      refresh_per_second=4, transient=False) as live:
                painter = asyncio.create_task(self._paint(live, monitor))
                try:
                    await self._trade(producer, monitor, settings)
                    await self._drain(monitor)
                finally:
                    painter.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await painter
                    live.update(_render(self.view, monitor))
        finally:
            monitor.request_stop()
            await monitor_task
            await asyncio.sleep(0.3)  # let the reader see the last events
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader
            await events.stop()
            await producer.stop()
        await self._check(settings)
        return self.view

    async def _check(self, settings: ServiceSettings) -> None:
        """What `liqmon replay --bootstrap --check` says of the run: the input topics replayed
        in the service's order against the events published. The run is over by then: if Kafka
        cannot answer the check, the view says why rather than the demo ending in a
        traceback."""
        try:
            self.view.check = await check_topics(self.broker.bootstrap, settings.topics,
                                                 Engine(self.config))
        except KafkaError as exc:
            self.view.check_error = (f"the check could not read the topics from "
                                     f"{self.broker.bootstrap}: {exc or type(exc).__name__}")

    async def _until_ready(self, monitor: Monitor, monitor_task: asyncio.Task[None]) -> None:
        """Wait until the monitor consumes. The first start after an install compiles its
        kernels first (20–40 s, README), so the wait is long; a monitor that stops meanwhile
        raises what stopped it at once."""
        ready = asyncio.ensure_future(monitor.ready.wait())
        with self.console.status("starting liqmon (the first start after an install compiles "
                                 "its kernels: 20–40 s)"):
            done, _ = await asyncio.wait([ready, monitor_task], timeout=READY_TIMEOUT,
                                         return_when=asyncio.FIRST_COMPLETED)
        if ready in done:
            return
        ready.cancel()
        if monitor_task in done:
            monitor_task.result()  # raise what stopped it
            raise RuntimeError("liqmon stopped before it was ready")
        raise TimeoutError(f"liqmon was not ready within {READY_TIMEOUT:.0f} s")

    async def _paint(self, live: Live, monitor: Monitor) -> None:
        while True:
            live.update(_render(self.view, monitor))
            await asyncio.sleep(0.25)

    async def _trade(self, producer, monitor: Monitor, settings: ServiceSettings) -> None:
        names = {PRICES: settings.topics.prices, FILLS: settings.topics.fills,
                 LEDGER: settings.topics.ledger}
        await self._send(producer, names, list(self.market.opening_deposits()))
        await self._drain(monitor)
        await self._send(producer, names, list(self.market.opening_positions()))
        start = time.monotonic()
        level = 0.0
        while (progress := (time.monotonic() - start) / self.duration) < 1.0:
            self.view.progress = progress
            target = market_level(progress)
            batch = self.market.step(target - level)
            level = target
            while self.to_close:
                batch.extend(self.market.close_out(*self.to_close.pop()))
            await self._send(producer, names, batch)
            await self._keep_pace(monitor)
        self.view.progress = 1.0

    async def _send(self, producer, names: dict[str, str], records) -> None:
        futures = []
        for record in records:
            if record.topic == PRICES and isinstance(record.value, dict):
                symbol = record.value["symbol"]
                self.view.prices[symbol] = record.value["price"]
                self.view.first_prices.setdefault(symbol, record.value["price"])
            futures.append(await producer.send(names[record.topic], record.value_bytes(),
                                               key=record.key.encode()))
        for future in futures:
            meta = await future
            tp = TopicPartition(meta.topic, meta.partition)
            self.produced[tp] = max(self.produced.get(tp, 0), meta.offset + 1)
        self.view.produced += len(futures)

    def _backlog(self, monitor: Monitor) -> int:
        done = monitor.processed_offsets()
        return sum(end - done.get(tp, 0) for tp, end in self.produced.items())

    async def _keep_pace(self, monitor: Monitor) -> None:
        await asyncio.sleep(0.02)
        while self._backlog(monitor) > MAX_BACKLOG:
            await asyncio.sleep(0.02)

    async def _drain(self, monitor: Monitor, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while self._backlog(monitor) > 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)

    async def _read_events(self, consumer: AIOKafkaConsumer) -> None:
        while True:
            batch = await consumer.getmany(timeout_ms=200)
            for records in batch.values():
                for record in records:
                    event = orjson.loads(record.value)
                    self.view.events[event["type"]] += 1
                    if event["margin_mode"] == "isolated":
                        self.view.isolated_events[event["type"]] += 1
                    if event["type"] == "liquidation":
                        self.view.liquidations.append(event)
                        self.to_close.append((event["account"], event.get("symbol")))
