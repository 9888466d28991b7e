"""Restore of every account from `liqmon.state`, beside a bare consumer reading the same
changelog."""

from __future__ import annotations

import asyncio
import gc
import tempfile
import time
from pathlib import Path

from monitor.bench.end_to_end import bench_settings, bench_topics
from monitor.bench.report import Figure, Phases, Plan
from monitor.bench.workload import (
    Population,
)
from monitor.engine import Engine
from monitor.reference import ReferenceEngine

# -- restore -------------------------------------------------------------------------------------

async def restore_phase(plan: Plan, pop: Population, phases: Phases) -> list[Figure]:
    try:
        from monitor.service.changelog import read_changelog
        from monitor.snapshot import (
            CONTROL_KEY,
            KIND_HEADER,
            Control,
            encode_account,
            encode_control,
        )
    except ImportError:
        return [Figure("restore_s", "restore from liqmon.state", "s", None, None,
                       "≤ 10 s (1M accounts)", None, False, "n/a (durability pending)")]
    from aiokafka import AIOKafkaProducer

    from monitor.service.broker import EmbeddedBroker
    from monitor.service.topics import create_topics

    workdir = Path(tempfile.mkdtemp(prefix="liqmon-bench-"))
    with EmbeddedBroker(log_path=workdir / "broker.log") as broker:
        topics = bench_topics("bench.restore")
        await create_topics(bench_settings(broker.bootstrap, topics, "bench-admin"))
        step = phases.task(f"restore: write {pop.count:,} snapshots", pop.count)
        producer = AIOKafkaProducer(bootstrap_servers=broker.bootstrap, acks=1, linger_ms=20,
                                    max_batch_size=1024 * 1024,
                                    max_request_size=8 * 1024 * 1024)
        await producer.start()
        try:
            futures = []
            batch = producer.create_batch()
            header = [(KIND_HEADER, b"account")]
            as_of = {(topics.fills, 0): 0, (topics.ledger, 0): 0, (topics.prices, 0): 0}
            for n, (account_id, account) in enumerate(pop.accounts()):
                key, value = account_id.encode(), encode_account(account, 1, as_of)
                if batch.append(key=key, value=value, timestamp=None, headers=header) is None:
                    futures.append(await producer.send_batch(batch, topics.state, partition=0))
                    batch = producer.create_batch()
                    batch.append(key=key, value=value, timestamp=None, headers=header)
                if n % 10_000 == 9_999:
                    step(10_000)
            phases.done(step, pop.count % 10_000)
            control = Control(seq=1, written_at=int(time.time() * 1000), offsets=as_of,
                              prices=pop.price_table(), dedupe={})
            batch.append(key=CONTROL_KEY, value=encode_control(control), timestamp=None,
                         headers=[(KIND_HEADER, b"control")])
            futures.append(await producer.send_batch(batch, topics.state, partition=0))
            await asyncio.gather(*futures)
        finally:
            await producer.stop()
        gc.collect()
        bare_s = await bare_read(broker.bootstrap, topics.state)
        timings = {}
        for kind in ("fast", "naive"):
            step = phases.task(f"restore: read and install ({kind})", 2)
            gc.collect()
            started = time.perf_counter()
            restored = (await read_changelog(broker.bootstrap, topics.state, [0]))[0]
            read_s = time.perf_counter() - started
            step(1)
            engine: Engine | ReferenceEngine = (Engine(pop.config) if kind == "fast"
                                                else ReferenceEngine(pop.config))
            if restored.control is not None:
                engine.load_prices(restored.control.prices)
            for account_id, (account, _, _) in restored.accounts.items():
                engine.load_account(account_id, account)
            if isinstance(engine, Engine):
                engine.index_restored()
            total = time.perf_counter() - started
            step(1)
            timings[kind] = (total, read_s, len(restored.accounts))
            del restored, engine
    fast, naive = timings["fast"], timings["naive"]
    per_million = fast[0] * 1_000_000 / max(1, fast[2])
    overhead = Figure(
        "restore_vs_bare_read_s", "restore beside a bare consumer reading the same changelog",
        "s", fast[0], bare_s, "≤ 2× the bare read", fast[0] <= 2 * bare_s, False,
        f"a bare aiokafka consumer reads the {fast[2]:,}-account changelog in {bare_s:.2f} s "
        "(records only, nothing decoded)")
    return [overhead, Figure("restore_s", "restore from liqmon.state", "s", fast[0], naive[0],
                   "≤ 10 s (1M accounts)", per_million <= 10.0, False,
                   f"{fast[2]:,} accounts: read and decode {fast[1]:.2f} s, install "
                   f"{fast[0] - fast[1]:.2f} s; {per_million:.1f} s per million accounts")]


async def bare_read(bootstrap: str, topic: str) -> float:
    """Seconds a bare consumer takes to read partition 0 of a topic to its end."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None,
                                enable_auto_commit=False, fetch_max_wait_ms=20,
                                max_partition_fetch_bytes=16 * 1024 * 1024)
    started = time.perf_counter()
    await consumer.start()
    try:
        tp = TopicPartition(topic, 0)
        consumer.assign([tp])
        await consumer.seek_to_beginning(tp)
        end = (await consumer.end_offsets([tp]))[tp]
        while await consumer.position(tp) < end:
            await consumer.getmany(tp, timeout_ms=200, max_records=50_000)
    finally:
        await consumer.stop()
    return time.perf_counter() - started
