"""End to end through the embedded broker: the service drains a backlog, then answers paced
ticks; and the Kafka client's own ceiling on the same backlog. The service runs in a worker
process (`service_worker`)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

import orjson

from monitor.bench.report import (
    Figure,
    Phases,
    Plan,
    load_population,
    percentile,
    stamping_window,
)
from monitor.bench.workdirs import phase_dir
from monitor.bench.workload import (
    MixedStream,
    Population,
    StreamRecord,
    bench_config,
    encode,
    populate,
)
from monitor.engine import Engine
from monitor.reference import ReferenceEngine
from monitor.service.lifeline import tied_to_us

# -- end to end ---------------------------------------------------------------------------------

def bench_topics(prefix: str, inputs: str | None = None) -> Any:
    from monitor.service.settings import Topics

    base = Topics()
    names = {f.name: f"{prefix}.{getattr(base, f.name)}" for f in fields(Topics)}
    if inputs is not None:
        for name in ("prices", "fills", "ledger"):
            names[name] = f"{inputs}.{getattr(base, name)}"
    return Topics(**names)


def bench_settings(bootstrap: str, topics: Any, group: str, **overrides: Any) -> Any:
    from monitor.service.settings import ServiceSettings

    base = ServiceSettings(config_path=Path("bench"))
    wanted = {"bootstrap": bootstrap, "group": group, "client_id": group, "topics": topics,
              "metrics_port": 0, "start": "earliest", "session_timeout_ms": 2_000,
              "heartbeat_interval_ms": 300, "request_timeout_ms": 5_000, **overrides}
    known = {f.name for f in fields(ServiceSettings)}
    return replace(base, **{k: v for k, v in wanted.items() if k in known})




def topic_of(topics: Any, kind: str) -> str:
    return {"prices": topics.prices, "fills": topics.fills, "ledger": topics.ledger}[kind]


async def produce_backlog(bootstrap: str, topics: Any, records: list[StreamRecord],
                          step: Callable[[float], None]) -> dict[str, int]:
    """Write records in stream order (Kafka timestamps = record ts); returns end offsets."""
    from aiokafka import AIOKafkaProducer

    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks=1, linger_ms=20,
                                max_batch_size=1024 * 1024, max_request_size=8 * 1024 * 1024)
    await producer.start()
    counts = {"prices": 0, "fills": 0, "ledger": 0}
    try:
        batches = {kind: producer.create_batch() for kind in counts}
        futures = []
        for n, r in enumerate(records):
            batch = batches[r.topic]
            value = encode(r)
            if batch.append(key=r.key.encode(), value=value, timestamp=r.record.ts) is None:
                topic = topic_of(topics, r.topic)
                futures.append(await producer.send_batch(batch, topic, partition=0))
                batch = batches[r.topic] = producer.create_batch()
                batch.append(key=r.key.encode(), value=value, timestamp=r.record.ts)
            counts[r.topic] += 1
            if n % 20_000 == 19_999:
                step(20_000)
        for kind, batch in batches.items():
            if batch.record_count():
                topic = topic_of(topics, kind)
                futures.append(await producer.send_batch(batch, topic, partition=0))
        await asyncio.gather(*futures)
    finally:
        await producer.stop()
    return {topic_of(topics, kind): count for kind, count in counts.items()}


class Worker:
    """A `Monitor` with a preloaded engine in a subprocess, driven line by line."""

    def __init__(self, spec: dict[str, Any], log_path: Path) -> None:
        self.spec = spec
        self.log_path = log_path

    async def start(self) -> Worker:
        self.log = open(self.log_path, "ab")  # noqa: SIM115
        self.proc = await asyncio.create_subprocess_exec(
            *tied_to_us([sys.executable, "-m", "monitor.bench", "--worker",
                         json.dumps(self.spec)]),
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log,
            limit=16 * 1024 * 1024)
        return self

    async def read(self, timeout: float = 900) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = await asyncio.wait_for(self.proc.stdout.readline(), timeout)
        if not line:
            code = await self.proc.wait()
            raise RuntimeError(f"bench worker exited with status {code}; see {self.log_path}")
        return orjson.loads(line)

    async def say(self, text: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(text.encode() + b"\n")
        await self.proc.stdin.drain()

    async def close(self) -> None:
        if self.proc.returncode is None:
            try:
                await asyncio.wait_for(self.proc.wait(), 60)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()
        self.log.close()


async def paced_latency(bootstrap: str, topics: Any, stream: MixedStream, rate: float,
                        seconds: float, step: Callable[[float], None]) -> dict[str, Any]:
    """Produce at `rate` records/s with wall-clock ts and timestamps, read the events back,
    and measure tick-to-event latency: arrival at the reader − the tick's ts."""
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

    count = max(1, int(rate * seconds))
    records = stream.records(count)
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None,
                                enable_auto_commit=False, fetch_max_wait_ms=5)
    await consumer.start()
    outputs = [TopicPartition(topics.margin_calls, 0), TopicPartition(topics.liquidations, 0)]
    consumer.assign(outputs)
    await consumer.seek_to_end(*outputs)
    latencies: list[float] = []
    emit_latencies: list[float] = []
    events = 0
    stop_reading = asyncio.Event()

    async def read() -> None:
        nonlocal events
        while not stop_reading.is_set():
            batch = await consumer.getmany(timeout_ms=20)
            now_ms = time.time() * 1000
            for messages in batch.values():
                for message in messages:
                    event = orjson.loads(message.value)
                    events += 1
                    if event["trigger"]["kind"] == "price":
                        latencies.append(now_ms - event["ts"])
                        emit_latencies.append(event["emitted_at"] - event["ts"])

    reader = asyncio.create_task(read())
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks=1, linger_ms=0)
    await producer.start()
    try:
        started = time.monotonic()
        sent = 0
        futures = []
        while sent < count:
            due = min(count, int((time.monotonic() - started) * rate) + 1)
            while sent < due:
                r = records[sent]
                now_ms = int(time.time() * 1000)
                r.record.ts = now_ms
                futures.append(await producer.send(topic_of(topics, r.topic), encode(r),
                                                   key=r.key.encode(), timestamp_ms=now_ms))
                sent += 1
            if len(futures) > 5_000:
                await asyncio.gather(*futures)
                futures = []
            step(0)
            await asyncio.sleep(0.001)
        await asyncio.gather(*futures)
        elapsed = time.monotonic() - started
        await asyncio.sleep(1.5)  # let the last events arrive
    finally:
        stop_reading.set()
        await reader
        await producer.stop()
        await consumer.stop()
    return {"sent": sent, "seconds": elapsed, "rate": sent / elapsed, "events": events,
            "price_events": len(latencies), "p50": percentile(latencies, 0.5),
            "p99": percentile(latencies, 0.99), "emit_p50": percentile(emit_latencies, 0.5),
            "emit_p99": percentile(emit_latencies, 0.99)}


async def e2e_phase(plan: Plan, pop: Population, stream: MixedStream,
                    phases: Phases) -> list[Figure]:
    from monitor.service.broker import EmbeddedBroker
    from monitor.service.topics import create_topics

    results: dict[str, dict[str, Any]] = {}
    with (phase_dir("liqmon-bench-e2e-", plan.keep_logs) as workdir,
          EmbeddedBroker(log_path=workdir / "broker.log") as broker):
        inputs = bench_topics("bench.backlog")
        await create_topics(bench_settings(broker.bootstrap, inputs, "bench-admin"))
        backlog = stream.records(plan.e2e_records)
        step = phases.task(f"end to end: produce {len(backlog):,} records", len(backlog))
        ends = await produce_backlog(broker.bootstrap, inputs, backlog, step)
        step = phases.task("end to end: a bare consumer reads the backlog", 1)
        bare_rate, decoding_rate = await client_ceiling(broker.bootstrap, inputs, pop.config)
        step(1)
        for engine in ("fast", "naive"):
            tag = f"bench.{engine}"
            throughput_topics = bench_topics(tag, inputs="bench.backlog")
            latency_topics = bench_topics(f"{tag}.latency")
            for topics in (throughput_topics, latency_topics):
                await create_topics(bench_settings(broker.bootstrap, topics, "bench-admin"))
            spec = {"mode": "service", "engine": engine, "accounts": plan.accounts,
                    "instruments": plan.instruments, "seed": plan.seed,
                    "bootstrap": broker.bootstrap, "ends": ends,
                    "budget": None if engine == "fast" else plan.naive_budget,
                    # the baseline's batches are kept short so that its time budget holds
                    "consumer": plan.extra.get("consumer", {}),
                    "settings": {**plan.extra.get("settings", {}),
                                 **({} if engine == "fast" else {"max_batch_records": 100})},
                    "throughput_topics": {f.name: getattr(throughput_topics, f.name)
                                          for f in fields(throughput_topics)},
                    "latency_topics": {f.name: getattr(latency_topics, f.name)
                                       for f in fields(latency_topics)}}
            name = "columnar engine" if engine == "fast" else "reference engine"
            step = phases.task(f"end to end, {name}: load, consume backlog", 2)
            worker = await Worker(spec, workdir / f"worker-{engine}.log").start()
            try:
                ready = await worker.read()
                step(1)
                throughput = await worker.read()
                step(1)
                await worker.read()  # the latency monitor is consuming
                rate = throughput["rate"] / 2
                seconds = plan.latency_seconds
                step = phases.task(f"end to end, {name}: latency at {rate:,.0f} rec/s",
                                   seconds)
                last = [time.monotonic()]

                def tick(_: float, last: list[float] = last, step: Any = step) -> None:
                    now = time.monotonic()
                    step(now - last[0])
                    last[0] = now

                started = last[0]
                with stamping_window():
                    latency = await paced_latency(broker.bootstrap, latency_topics, stream,
                                                  rate, seconds, tick)
                # the pacer's last tick comes before its end: the bar stayed at 99 %
                phases.done(step, max(0.0, seconds - (last[0] - started)))
                await worker.say("stop")
                final = await worker.read()
            finally:
                await worker.close()
            results[engine] = {"ready": ready, "throughput": throughput, "latency": latency,
                               "final": final}
    fast, naive = results["fast"], results["naive"]
    ft, nt = fast["throughput"], naive["throughput"]
    fl, nl = fast["latency"], naive["latency"]
    return [
        Figure("e2e_records_per_s", "end to end: records/s (embedded broker)", "records/s",
               ft["rate"], nt["rate"], "≥ 200,000/s", ft["rate"] >= 200_000, True,
               f"{ft['records']:,} backlog records through Monitor in "
               f"{ft['seconds']:.1f} s ({ft['events']:,} events); baseline "
               f"{nt['records']:,} records in {nt['seconds']:.1f} s"),
        Figure("e2e_client_ceiling_records_per_s", "end to end beside the Kafka client alone "
               "(baseline: a bare consumer reading the same backlog)", "records/s", ft["rate"],
               bare_rate, "—", None, True,
               f"the bare aiokafka consumer reads {bare_rate:,.0f} records/s, "
               f"{decoding_rate:,.0f}/s when it also decodes each value as the service does: "
               "the ceiling of this client in Python on this machine"),
        Figure("latency_p50_ms", "tick-to-event latency p50 (half rate)", "ms", fl["p50"],
               nl["p50"], "—", None, False,
               f"{fl['price_events']} price-triggered events at {fl['rate']:,.0f} rec/s; "
               f"baseline {nl['price_events']} at {nl['rate']:,.0f} rec/s (half its own rate)"),
        Figure("latency_p99_ms", "tick-to-event latency p99 (half rate)", "ms", fl["p99"],
               nl["p99"], "≤ 10 ms", None if fl["p99"] is None else fl["p99"] <= 10.0, False,
               "tick ts (wall clock, ms) → event read back from the broker; in the monitor "
               f"(ts → emitted_at) p99 {_fmt(fl['emit_p99'])} ms"),
    ]


async def client_ceiling(bootstrap: str, topics: Any, config: Any) -> tuple[float, float]:
    """Records/s of a bare aiokafka consumer reading the backlog's input topics (partition 0)
    to their ends, and of the same read with every value decoded as the service decodes it:
    the most the service could do with this client, before any margin work."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    from monitor.records import decode_batch

    kinds = topics.input_kinds()
    rates = []
    for decoding in (False, True):
        consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None,
                                    enable_auto_commit=False, fetch_max_wait_ms=20,
                                    max_partition_fetch_bytes=16 * 1024 * 1024)
        await consumer.start()
        try:
            parts = [TopicPartition(topic, 0) for topic in kinds]
            consumer.assign(parts)
            await consumer.seek_to_beginning(*parts)
            ends = await consumer.end_offsets(parts)
            total = sum(ends.values())
            started = time.perf_counter()
            read = 0
            while read < total:
                fetched = await consumer.getmany(*parts, timeout_ms=200, max_records=50_000)
                for tp, messages in fetched.items():
                    read += len(messages)
                    if decoding:
                        decode_batch([kinds[tp.topic]] * len(messages),
                                     [m.value for m in messages], config)
            rates.append(read / (time.perf_counter() - started))
        finally:
            await consumer.stop()
    return rates[0], rates[1]


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f}"


async def service_worker(spec: dict[str, Any]) -> None:
    """Run the service with a preloaded engine: consume the backlog, then stand by for the
    paced latency run until told to stop (one JSON line per step on stdout)."""
    from aiokafka import TopicPartition

    from monitor.service.clients import Clients
    from monitor.service.logs import configure_logging
    from monitor.service.runner import Monitor
    from monitor.service.settings import ServiceSettings, Topics

    def say(doc: dict[str, Any]) -> None:
        sys.stdout.write(json.dumps(doc) + "\n")
        sys.stdout.flush()

    configure_logging("info", json=True)
    config = bench_config(spec["instruments"])
    pop = populate(config, spec["accounts"], spec["seed"])
    engine: Engine | ReferenceEngine = (Engine(config) if spec["engine"] == "fast"
                                        else ReferenceEngine(config))
    load_s = load_population(engine, pop)
    say({"loaded": load_s})
    bootstrap = spec["bootstrap"]

    def service(topics: dict[str, str], group: str) -> Monitor:
        """A monitor on the preloaded engine; its consumers take the spec's diagnostic options
        (consumer options the service does not expose), if any."""
        settings: ServiceSettings = bench_settings(bootstrap, Topics(**topics), group,
                                                   **spec.get("settings", {}))
        clients = Clients(settings, consumer_options=spec.get("consumer"))
        return Monitor(settings, config, clients=clients, engine=engine)

    monitor = service(spec["throughput_topics"], f"bench-{spec['engine']}")
    task = asyncio.create_task(monitor.run())
    await asyncio.wait_for(monitor.ready.wait(), 120)
    ends = {TopicPartition(topic, 0): end for topic, end in spec["ends"].items()}
    total = sum(ends.values())
    started = time.perf_counter()  # consuming from here: group joined, state restored
    budget = spec["budget"]
    # The baseline's budget: what it applied within it, counted once delivered (delivery is
    # acknowledged behind the loop, seconds behind for an engine this slow), over the time
    # until then.
    applied_in_budget: int | None = None

    def backlog_reached(offsets: dict[TopicPartition, int]) -> int:
        return sum(min(offsets.get(tp, 0), end) for tp, end in ends.items())

    while True:
        done = backlog_reached(monitor.processed_offsets())
        now = time.perf_counter()
        if done >= total or (applied_in_budget is not None and done >= applied_in_budget):
            break
        if budget and applied_in_budget is None and now - started > budget:
            applied_in_budget = backlog_reached(monitor.applied_offsets())
        if budget and now - started > 4 * budget:
            break  # delivery stuck: report what was delivered
        if task.done():
            task.result()
            raise RuntimeError("the monitor stopped")
        await asyncio.sleep(0.002)
    seconds = now - started
    events = int(sum(monitor.metrics.events_emitted.labels(t)._value.get()
                     for t in ("margin_call", "liquidation", "recovered")))
    monitor.request_stop()
    await task
    say({"records": done, "seconds": seconds, "rate": done / seconds if seconds else 0.0,
         "events": events, "complete": done >= total})
    latency = service(spec["latency_topics"], f"bench-{spec['engine']}-latency")
    task = asyncio.create_task(latency.run())
    await asyncio.wait_for(latency.ready.wait(), 120)
    say({"latency_ready": True})
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    latency.request_stop()
    await task
    say({"stopped": True})
