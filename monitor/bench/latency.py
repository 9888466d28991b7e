"""Latency as a downstream consumer sees it, beside a bare relay (SPEC §9).

On one embedded broker, at the same time, fed the same paced input: `liqmon run` (its own
process, state built from real deposits and fills) and a bare pass-through relay (its own
process: consume the inputs, produce each value to one topic with acks=all). A reader in this
process stamps every event and every relayed record on arrival; latency is arrival − the
input's `ts` (wall clock at send). Both see the same broker, rate and CPU contention, so their
ratio is what the service costs on top of the broker's own floor.

Then the order check: every input record read back from Kafka, sorted by (timestamp, topic
rank, partition, offset) and replayed as `liqmon replay --bootstrap` replays them; the
service's events must equal replay's, id for id and field for field but emitted_at.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from monitor.bench.report import Figure, percentile, stamping_window
from monitor.bench.workdirs import add_keep_logs_option, phase_dir
from monitor.bench.workload import (
    MixedStream,
    Population,
    account_id,
    bench_config,
    bench_risk,
    encode,
    populate,
    risk_toml,
)
from monitor.service.lifeline import tied_to_us

CALM, VOLATILE = 1e-5, 2e-3  # per-tick σ of the log price


@dataclass
class LatencyPlan:
    accounts: int = 10_000
    instruments: int = 50
    rate: float = 2_000.0  # input records/s
    seconds: float = 15.0  # paced input per market
    seed: int = 7
    partitions: int = 4  # of fills and ledger (prices: 1)
    service_args: list[str] = field(default_factory=list)  # extra `liqmon run` flags
    keep_logs: Path | None = None  # where the logs are kept (None: only if it fails)


@dataclass
class Arrivals:
    latencies_ms: list[float] = field(default_factory=list)

    def summary(self) -> dict[str, float | int | None]:
        values = self.latencies_ms
        return {"count": len(values), "p50": percentile(values, 0.5),
                "p99": percentile(values, 0.99), "max": max(values, default=None)}


def setup_records(pop: Population) -> list[tuple[str, str, bytes]]:
    """The population as the inputs that build it: a tick per symbol, then per account its
    balances (ledger) and positions (fills at the entry price)."""
    out: list[tuple[str, str, bytes]] = []
    ts = int(time.time() * 1000)
    for symbol, price in sorted(pop.prices.items()):
        out.append(("prices", symbol, orjson.dumps({"symbol": symbol, "price": price,
                                                     "ts": ts})))
    for n in range(pop.count):
        name = account_id(n)
        account = pop.account(n)
        for asset, amount in account.balances.items():
            kind = "deposit" if amount > 0 else "adjustment"
            out.append(("ledger", name, orjson.dumps({
                "entry_id": f"setup-{asset}", "account": name, "asset": asset,
                "amount": amount, "kind": kind, "ts": ts})))
        for symbol, position in account.positions.items():
            out.append(("fills", name, orjson.dumps({
                "fill_id": f"setup-{symbol}", "account": name, "symbol": symbol,
                "side": "buy" if position.qty > 0 else "sell", "qty": abs(position.qty),
                "price": position.entry_price, "fee": 0.0, "ts": ts})))
    return out


async def produce_all(bootstrap: str, names: dict[str, str],
                      records: list[tuple[str, str, bytes]]) -> None:
    from aiokafka import AIOKafkaProducer

    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=10,
                                max_batch_size=512 * 1024)
    await producer.start()
    try:
        futures = [await producer.send(names[kind], value, key=key.encode())
                   for kind, key, value in records]
        await asyncio.gather(*futures)
    finally:
        await producer.stop()


async def paced(bootstrap: str, names: dict[str, str], stream: MixedStream, rate: float,
                seconds: float, until: asyncio.Event | None = None, linger_ms: int = 0) -> int:
    """Produce at ``rate`` records/s for ``seconds``, or until ``until`` is set if that comes
    first; each record's ts and Kafka timestamp are the wall clock when it is sent (before
    the producer's ``linger_ms``). Returns how many were sent."""
    from aiokafka import AIOKafkaProducer

    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=linger_ms)
    await producer.start()
    records = stream.records(int(rate * seconds))
    futures = []
    try:
        started = time.monotonic()
        for n, record in enumerate(records):
            if until is not None and until.is_set():
                break
            due = started + n / rate
            delay = due - time.monotonic()
            if delay > 0.001:
                await asyncio.sleep(delay)
            now_ms = int(time.time() * 1000)
            record.record.ts = now_ms
            futures.append(await producer.send(names[record.topic], encode(record),
                                               key=record.key.encode(), timestamp_ms=now_ms))
        await asyncio.gather(*futures)
    finally:
        await producer.stop()
    return len(futures)


async def read_arrivals(bootstrap: str, partitions: dict[str, int],
                        arrivals: dict[str, Arrivals], stop: asyncio.Event,
                        positioned: asyncio.Event, since_ms: list[float]) -> None:
    """Stamp every new record of these topics on arrival: arrival − the input's `ts` (an
    event's `ts`, a relayed input's own), for inputs sent from ``since_ms[0]`` on (set when
    the paced input starts)."""
    def take(topic: str, value: dict[str, Any], now_ms: float) -> None:
        ts = value["ts"]
        if ts >= since_ms[0]:
            arrivals[topic].latencies_ms.append(now_ms - ts)
            if "emitted_at" in value:  # an event: how much was inside liqmon
                arrivals["emitted"].latencies_ms.append(value["emitted_at"] - ts)

    await read_new(bootstrap, partitions, stop, positioned, take)


async def read_new(bootstrap: str, partitions: dict[str, int], stop: asyncio.Event,
                   positioned: asyncio.Event,
                   take: Callable[[str, dict[str, Any], float], None]) -> None:
    """Read these topics from their end (``positioned`` set once there) until ``stop``,
    handing each record's decoded JSON value to ``take`` with its topic and arrival time
    (wall-clock ms)."""
    from aiokafka import AIOKafkaConsumer

    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None,
                                enable_auto_commit=False, fetch_max_wait_ms=5)
    await consumer.start()
    try:
        await read_from_the_end(consumer, partitions)
        positioned.set()
        while not stop.is_set():
            batch = await consumer.getmany(timeout_ms=20)
            now_ms = time.time() * 1000
            for tp, messages in batch.items():
                for message in messages:
                    take(tp.topic, orjson.loads(message.value), now_ms)
    finally:
        await consumer.stop()


async def read_from_the_end(consumer: Any, partitions: dict[str, int]) -> None:
    """Assign every partition of these topics, positioned at their current ends."""
    from aiokafka import TopicPartition

    tps = [TopicPartition(topic, p) for topic, count in partitions.items()
           for p in range(count)]
    consumer.assign(tps)
    await consumer.seek_to_end(*tps)
    for tp in tps:
        await consumer.position(tp)


async def relay(bootstrap: str, partitions: dict[str, int], output: str) -> None:
    """The bare pass-through baseline: every input value to one topic, acks=all, with the
    fetch settings the service uses. Prints "ready" once positioned at the inputs' ends."""
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

    from monitor.service.settings import FETCH_MAX_WAIT_MS

    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None,
                                enable_auto_commit=False, fetch_max_wait_ms=FETCH_MAX_WAIT_MS)
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=0)
    await consumer.start()
    await producer.start()
    try:
        await read_from_the_end(consumer, partitions)
        print("ready", flush=True)
        while True:
            batch = await consumer.getmany(timeout_ms=500, max_records=5_000)
            for messages in batch.values():
                for message in messages:
                    await producer.send(output, message.value, key=message.key)
    finally:
        await producer.stop()
        await consumer.stop()


async def create_single_partition_topics(bootstrap: str, names: list[str]) -> None:
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(name, 1, 1) for name in names])
    finally:
        await admin.close()


async def end_offsets(bootstrap: str, partitions: dict[str, int]) -> dict[tuple[str, int], int]:
    from aiokafka import AIOKafkaConsumer, TopicPartition

    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None)
    await consumer.start()
    try:
        ends = await consumer.end_offsets([TopicPartition(t, p) for t, n in partitions.items()
                                           for p in range(n)])
    finally:
        await consumer.stop()
    return {(tp.topic, tp.partition): end for tp, end in ends.items()}


def scrape_order_counters(port: int) -> dict[str, float | None]:
    """The service's order counters (None if it does not answer): ``forced``, records applied
    out of proven order because --merge-wait ran out (liqmon_merge_forced_releases_total), and
    ``late``, records applied after one that sorts after them (liqmon_records_late_total, every
    topic)."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as answer:
            text = answer.read().decode()
    except OSError:
        return {"forced": None, "late": None}
    samples = [sample for family in text_string_to_metric_families(text)
               for sample in family.samples]
    return {"forced": sum(s.value for s in samples
                          if s.name == "liqmon_merge_forced_releases_total"),
            "late": sum(s.value for s in samples if s.name == "liqmon_records_late_total")}


async def order_check(config: Any, bootstrap: str, topics: Any) -> dict[str, int]:
    """The service's events against replay of its input topics in the service's order, as
    `liqmon replay --bootstrap --check` compares them: how many are equal, missing, extra,
    different."""
    from monitor.engine import Engine
    from monitor.service.input_history import check_topics

    check = await check_topics(bootstrap, topics, Engine(config))
    return {"expected": check.replayed, "got": check.published,
            "missing": len(check.missing), "extra": len(check.extra),
            "different": len(check.different) + len(check.repeats_unlike) + check.unreadable}


async def measure_market(plan: LatencyPlan, pop: Population, volatility: float, name: str,
                         bootstrap: str, workdir: Path, say: Callable[[str], None]
                         ) -> dict[str, Any]:
    from monitor.service.broker import free_port
    from monitor.service.metrics import scrape_input_offsets
    from monitor.service.settings import ServiceSettings, Topics
    from monitor.service.topics import create_topics

    config = bench_config(plan.instruments)
    toml = workdir / "risk.toml"
    toml.write_text(risk_toml(bench_risk(plan.instruments)))
    base = Topics()
    topics = Topics(**{f: f"lat.{name}.{getattr(base, f)}" for f in base.__dataclass_fields__})
    names = {"prices": topics.prices, "fills": topics.fills, "ledger": topics.ledger}
    relayed = f"lat.{name}.relay"
    settings = ServiceSettings(config_path=toml, bootstrap=bootstrap, topics=topics,
                               partitions=plan.partitions)
    await create_single_partition_topics(bootstrap, [topics.prices, relayed])
    await create_topics(settings)  # the rest, with plan.partitions each
    inputs = {topics.prices: 1, topics.fills: plan.partitions, topics.ledger: plan.partitions}
    say(f"{name}: building {pop.count:,} accounts from deposits and fills")
    await produce_all(bootstrap, names, setup_records(pop))
    ends = await end_offsets(bootstrap, inputs)
    port = free_port()
    log = open(workdir / f"service-{name}.log", "wb")  # noqa: SIM115
    service = await asyncio.create_subprocess_exec(
        *tied_to_us([sys.executable, "-m", "monitor.cli", "run", *settings.run_args(),
                     "--group", f"lat-{name}", "--metrics-port", str(port),
                     *plan.service_args]),
        stdout=log, stderr=log)
    relay_proc = await asyncio.create_subprocess_exec(
        *tied_to_us([sys.executable, "-m", "monitor.bench.latency", "--relay", bootstrap,
                     orjson.dumps(inputs).decode(), relayed]),
        stdout=asyncio.subprocess.PIPE)
    try:
        deadline = time.monotonic() + 600
        while True:
            seen = await asyncio.to_thread(scrape_input_offsets, port)
            if all(seen.get(key, -1) >= end for key, end in ends.items()):
                break
            if service.returncode is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the service did not consume its set-up; see {log.name}")
            await asyncio.sleep(0.2)
        assert relay_proc.stdout is not None
        await asyncio.wait_for(relay_proc.stdout.readline(), 60)
        arrivals = {t: Arrivals() for t in (topics.margin_calls, topics.liquidations, relayed,
                                            "emitted")}
        stop, positioned = asyncio.Event(), asyncio.Event()
        since_ms = [float("inf")]

        with stamping_window():
            reader = asyncio.create_task(read_arrivals(
                bootstrap, {topics.margin_calls: plan.partitions,
                            topics.liquidations: plan.partitions, relayed: 1},
                arrivals, stop, positioned, since_ms))
            await positioned.wait()
            since_ms[0] = time.time() * 1000
            say(f"{name}: {plan.rate:,.0f} records/s for {plan.seconds:g} s")
            stream = MixedStream(pop, seed=plan.seed, volatility=volatility)
            sent = await paced(bootstrap, names, stream, plan.rate, plan.seconds)
            await asyncio.sleep(2.0)  # stragglers
            stop.set()
            await reader
        counters = await asyncio.to_thread(scrape_order_counters, port)
    finally:
        relay_proc.kill()
        await relay_proc.wait()
        service.terminate()
        await service.wait()
        log.close()
    events_arrived = Arrivals([*arrivals[topics.margin_calls].latencies_ms,
                               *arrivals[topics.liquidations].latencies_ms])
    say(f"{name}: order check")
    order = await order_check(config, bootstrap, topics)
    return {"sent": sent, "service": events_arrived.summary(),
            "relay": arrivals[relayed].summary(), "order": order,
            "service_emitted": arrivals["emitted"].summary(),
            "forced_releases": counters["forced"], "late_records": counters["late"],
            "exit_code": service.returncode}


async def latency_phase(plan: LatencyPlan, say: Callable[[str], None]) -> dict[str, Any]:
    from monitor.service.broker import EmbeddedBroker

    pop = populate(bench_config(plan.instruments), plan.accounts, plan.seed)
    results: dict[str, Any] = {}
    with (phase_dir("liqmon-latency-", plan.keep_logs) as workdir,
          EmbeddedBroker(log_path=workdir / "broker.log") as broker):
        for name, volatility in (("calm", CALM), ("volatile", VOLATILE)):
            results[name] = await measure_market(plan, pop, volatility, name, broker.bootstrap,
                                                 workdir, say)
    return {**({"workdir": str(workdir)} if plan.keep_logs else {}), **results}


def main() -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m monitor.bench.latency")
    parser.add_argument("--relay", nargs=3, metavar=("BOOTSTRAP", "PARTITIONS", "OUTPUT"))
    parser.add_argument("--accounts", type=int, default=10_000)
    parser.add_argument("--rate", type=float, default=2_000.0)
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--service-arg", action="append", default=[],
                        help="an extra `liqmon run` flag (repeat), for diagnosis")
    add_keep_logs_option(parser)
    args = parser.parse_args()
    if args.relay:
        bootstrap, partitions, output = args.relay
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(relay(bootstrap, orjson.loads(partitions), output))
        return 0
    plan = LatencyPlan(accounts=args.accounts, rate=args.rate, seconds=args.seconds,
                       service_args=args.service_arg, keep_logs=args.keep_logs)
    report = asyncio.run(latency_phase(plan, lambda text: print(text, file=sys.stderr)))
    print(orjson.dumps(report, option=orjson.OPT_INDENT_2).decode())
    return 0


if __name__ == "__main__":
    sys.exit(main())


def figures(report: dict[str, Any], rate: float) -> list[Any]:
    """`liqmon bench` figures: the service's p50/p99 beside the relay's, per market, and
    the order check."""

    out = []
    for market in ("calm", "volatile"):
        result = report[market]
        service, relay_ = result["service"], result["relay"]
        for quantile in ("p50", "p99"):
            value, baseline = service[quantile], relay_[quantile]
            met = None if value is None or baseline is None or quantile == "p50" \
                else value <= 1.5 * baseline
            out.append(Figure(
                f"live_latency_{quantile}_{market}_ms",
                f"input-to-event latency {quantile}, {market} (baseline: bare relay)", "ms",
                value, baseline, "≤ 1.5× relay" if quantile == "p99" else "—", met, False,
                f"{service['count']:,} events at {rate:,.0f} records/s, read by a separate "
                f"consumer (max {_ms(service['max'])}); relay max {_ms(relay_['max'])}"))
    differences = {market: sum(report[market]["order"][k] for k in
                               ("missing", "extra", "different"))
                   for market in ("calm", "volatile")}
    total = sum(differences.values())
    out.append(Figure(
        "live_order_differences", "live events ≠ replay in timestamp order", "events",
        float(total), None, "0", total == 0, False,
        "; ".join(f"{market}: {report[market]['order']}, released out of proven order "
                  f"(--merge-wait ran out) {report[market]['forced_releases']}, applied late "
                  f"{report[market]['late_records']}"
                  for market in differences)
        + "; the paced producer does not wait for acknowledgements, so the guarantee holds "
          "while its in-flight time stays within --max-skew (README, Order)"))
    return out


def _ms(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f} ms"
