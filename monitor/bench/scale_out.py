"""One backlog drained by one and by two `liqmon run` processes in one consumer group."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from monitor.bench.end_to_end import bench_settings, bench_topics, topic_of
from monitor.bench.report import Figure, Phases, Plan
from monitor.bench.workdirs import phase_dir
from monitor.bench.workload import (
    MixedStream,
    bench_risk,
    encode,
    risk_toml,
)
from monitor.service.lifeline import tied_to_us

# -- scale-out -----------------------------------------------------------------------------------

SCALE_PARTITIONS = 2


async def scale_out_phase(plan: Plan, stream: MixedStream, phases: Phases) -> list[Figure]:
    """End-to-end records/s of one and of two `liqmon run` processes in one consumer group,
    each run draining the same backlog on two partitions from an empty state."""
    from aiokafka import AIOKafkaProducer

    from monitor.service.broker import EmbeddedBroker
    from monitor.service.topics import create_topics

    backlog = stream.records(min(plan.e2e_records, 120_000))
    rates: dict[int, float] = {}
    with phase_dir("liqmon-bench-scale-", plan.keep_logs) as workdir:
        config_path = workdir / "risk.toml"
        config_path.write_text(risk_toml(bench_risk(plan.instruments)))
        with EmbeddedBroker(log_path=workdir / "broker.log") as broker:
            for count in (1, 2):
                topics = bench_topics(f"bench.scale{count}")
                settings = bench_settings(broker.bootstrap, topics, f"bench-scale{count}",
                                          partitions=SCALE_PARTITIONS, config_path=config_path)
                await create_topics(settings)
                step = phases.task(f"scale-out: {count} instance(s), produce and drain "
                                   f"{len(backlog):,} records", 2)
                producer = AIOKafkaProducer(bootstrap_servers=broker.bootstrap, acks=1,
                                            linger_ms=20, max_batch_size=1024 * 1024)
                await producer.start()
                try:
                    futures = [await producer.send(topic_of(topics, r.topic), encode(r),
                                                   key=r.key.encode(), timestamp_ms=r.record.ts)
                               for r in backlog]
                    ends: dict[tuple[str, int], int] = {}
                    for meta in await asyncio.gather(*futures):
                        key = (meta.topic, meta.partition)
                        ends[key] = max(ends.get(key, 0), meta.offset + 1)
                finally:
                    await producer.stop()
                step(1)
                rates[count] = await _drain_with(count, settings, ends, workdir)
                step(1)
    one, two = rates[1], rates[2]
    return [Figure("scale_out_records_per_s", "end to end, 2 instances (baseline: 1)",
                   "records/s", two, one, "—", None, True,
                   f"{len(backlog):,} records on {SCALE_PARTITIONS} partitions, from empty "
                   f"state, each instance its own process; 1 instance {one:,.0f}/s, "
                   f"2 instances {two:,.0f}/s on a {os.cpu_count()}-core machine")]


async def _drain_with(count: int, settings: Any, ends: dict[tuple[str, int], int],
                      workdir: Path) -> float:
    """Start `count` instances on a backlog; records/s from the first applied record to the
    last (the group join and a rebalance, if any, included)."""
    from monitor.service.broker import free_port
    from monitor.service.metrics import scrape_input_offsets

    ports = [free_port() for _ in range(count)]
    procs = []
    for n, port in enumerate(ports):
        args = [sys.executable, "-m", "monitor.cli", "run", *settings.run_args(),
                "--group", settings.group, "--metrics-port", str(port),
                "--session-timeout", "2", "--log-level", "warning"]
        log = open(workdir / f"{settings.group}-{n}.log", "wb")  # noqa: SIM115
        procs.append((subprocess.Popen(tied_to_us(args), stdout=log, stderr=log), log))

    total = sum(ends.values())
    started = None
    try:
        deadline = time.monotonic() + 900
        while time.monotonic() < deadline:
            seen = [await asyncio.to_thread(scrape_input_offsets, port) for port in ports]
            if started is None and any(v > 0 for p in seen for v in p.values()):
                started = time.monotonic()
            if all(all(p.get(key, -1) >= end for p in seen) if key[0] == settings.topics.prices
                   else max(p.get(key, -1) for p in seen) >= end
                   for key, end in ends.items()):
                break
            await asyncio.sleep(0.05)
        else:
            raise RuntimeError(f"{count} instance(s) did not drain the backlog in 900 s")
    finally:
        for proc, _ in procs:
            proc.terminate()
        for proc, log in procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
            log.close()
    assert started is not None
    return total / max(time.monotonic() - started, 1e-9)
