"""Tick-to-event latency while a checkpoint of every account is written (#15).

`liqmon run` (its own process, on the embedded broker) builds N accounts from deposits and
fills, so that every one of them is in its engine's dirty set. Its first checkpoint is set to
start a few seconds into a paced, volatile stream of ticks and fills (`--checkpoint-records`:
the set-up records plus those seconds of input; `--checkpoint-interval` out of reach), so that
it writes all N accounts while the stream goes on. A reader in this process stamps every event
on arrival: an input's latency is the arrival of its last event − its `ts` (wall clock at send).

The checkpoint's window comes from the service's own metrics, read before and after: the
checkpoint ended at `liqmon_last_checkpoint_timestamp_seconds` and took the growth of
`liqmon_checkpoint_duration_seconds`' sum. A tick whose time in flight (its `ts` to its last
event's arrival) overlaps that window counts as during the checkpoint. The baseline is the
ticks of the same run in two spans as long as the checkpoint, just before and just after it:
on the embedded broker latency creeps up through any run, checkpoint or not (its CPU grows
with what its partitions hold), so ticks further away would compare the checkpoint with
another broker. Every tick's times are left in the work directory (`samples.json`) for a
closer look.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from monitor.bench.latency import (
    VOLATILE,
    Arrivals,
    create_single_partition_topics,
    paced,
    produce_all,
    read_new,
    setup_records,
)
from monitor.bench.report import Figure, stamping_window
from monitor.bench.workdirs import add_keep_logs_option, phase_dir
from monitor.bench.workload import (
    MixedStream,
    Population,
    bench_config,
    bench_risk,
    populate,
    risk_toml,
)
from monitor.service.lifeline import tied_to_us

CHECKPOINTS = ("liqmon_checkpoint_duration_seconds_count",
               "liqmon_checkpoint_duration_seconds_sum",
               "liqmon_last_checkpoint_timestamp_seconds")


@dataclass
class CheckpointPlan:
    accounts: int = 100_000
    instruments: int = 50
    rate: float = 500.0  # input records/s
    shares: tuple[float, float, float] = (0.8, 0.2, 0.0)  # ticks, fills, ledger
    volatility: float = 0.0  # per-tick σ of the log price (0: by scale, below)
    before: float = 5.0  # seconds of paced input before the checkpoint starts (≥ its length)
    # The embedded broker's cost per request grows with the batches a partition holds: ticks
    # sent one per batch would make latency climb through the run, checkpoint or not.
    linger_ms: int = 5
    seed: int = 7
    partitions: int = 4  # of fills, ledger and the changelog (prices: 1)
    limit: float = 120.0  # seconds the checkpoint may take before the run gives up
    keep_logs: Path | None = None  # where the logs are kept (None: only if it fails)

    def __post_init__(self) -> None:
        # About 40 % of ticks produce an event whatever the scale: the more accounts, the
        # more of them a move crosses a threshold (σ 2e-3 at 10,000 accounts, 5e-4 at 100,000)
        if not self.volatility:
            self.volatility = VOLATILE * (10_000 / self.accounts) ** 0.6


@dataclass
class Input:
    """One input that caused events: its `ts`, when its first event left the service
    (`emitted_at`), when its last event arrived here, its kind."""

    ts: float
    emitted: float
    arrived: float
    kind: str


def scrape_checkpoints(port: int) -> tuple[int, float, float] | None:
    """The service's checkpoints so far: how many, their seconds in all, the Unix time the
    last one ended (None if it does not answer)."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as answer:
            text = answer.read().decode()
    except OSError:
        return None
    found = {sample.name: sample.value for family in text_string_to_metric_families(text)
             for sample in family.samples if sample.name in CHECKPOINTS}
    count, seconds, last = (found[name] for name in CHECKPOINTS)
    return int(count), seconds, last


async def read_inputs(bootstrap: str, partitions: dict[str, int], inputs: dict[Any, Input],
                      stop: asyncio.Event, positioned: asyncio.Event,
                      since_ms: list[float]) -> None:
    """Stamp every new event on arrival, per input that caused it (its trigger's topic,
    partition and offset), for inputs sent from ``since_ms[0]`` on."""
    def take(_topic: str, event: dict[str, Any], now_ms: float) -> None:
        if event["ts"] < since_ms[0]:
            return
        trigger = event["trigger"]
        key = (trigger["topic"], trigger["partition"], trigger["offset"])
        seen = inputs.get(key)
        if seen is None:
            inputs[key] = Input(event["ts"], event["emitted_at"], now_ms, trigger["kind"])
        else:
            seen.arrived = now_ms

    await read_new(bootstrap, partitions, stop, positioned, take)


def split(inputs: dict[Any, Input], start_ms: float, end_ms: float
          ) -> dict[str, Arrivals]:
    """Latencies of the price-triggered inputs in flight at some moment of the checkpoint
    [start, end], and of those in spans as long just before it (sent then, their last event
    arrived before it started) and just after it (sent then)."""
    span = end_ms - start_ms
    groups = {"before": Arrivals(), "during": Arrivals(), "after": Arrivals()}
    for one in inputs.values():
        if one.kind != "price":
            continue
        if one.arrived < start_ms:
            group = "before" if one.ts >= start_ms - span else None
        elif one.ts > end_ms:
            group = "after" if one.ts <= end_ms + span else None
        else:
            group = "during"
        if group is not None:
            groups[group].latencies_ms.append(one.arrived - one.ts)
    return groups


async def read_checkpoint(bootstrap: str, topic: str, partitions: int,
                          timeout: float = 120.0) -> list[Any]:
    """Every record of the changelog's partitions up to and including each one's first
    control record: the first checkpoint, which writes its control records last."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    from monitor.service.changelog import CONTROL
    from monitor.snapshot import KIND_HEADER

    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None,
                                auto_offset_reset="earliest", enable_auto_commit=False)
    await consumer.start()
    records: list[Any] = []
    try:
        left = {TopicPartition(topic, p) for p in range(partitions)}
        consumer.assign(list(left))
        await consumer.seek_to_beginning(*left)
        deadline = time.monotonic() + timeout
        while left:
            if time.monotonic() > deadline:
                raise RuntimeError(f"no control record in {sorted(left)} after {timeout} s")
            batch = await consumer.getmany(*left, timeout_ms=500, max_records=20_000)
            for tp, messages in batch.items():
                for message in messages:
                    records.append(message)
                    if dict(message.headers).get(KIND_HEADER) == CONTROL:
                        left.discard(tp)
                        break
    finally:
        await consumer.stop()
    return records


async def measure(plan: CheckpointPlan, pop: Population, bootstrap: str, workdir: Path,
                  say: Callable[[str], None]) -> dict[str, Any]:
    from monitor.service.broker import free_port
    from monitor.service.changelog import ACCOUNT
    from monitor.service.metrics import scrape_input_offsets
    from monitor.service.settings import ServiceSettings, Topics
    from monitor.service.topics import create_topics
    from monitor.snapshot import KIND_HEADER

    toml = workdir / "risk.toml"
    toml.write_text(risk_toml(bench_risk(plan.instruments)))
    base = Topics()
    topics = Topics(**{f: f"ckpt.{getattr(base, f)}" for f in base.__dataclass_fields__})
    names = {"prices": topics.prices, "fills": topics.fills, "ledger": topics.ledger}
    settings = ServiceSettings(config_path=toml, bootstrap=bootstrap, topics=topics,
                               partitions=plan.partitions)
    await create_single_partition_topics(bootstrap, [topics.prices])
    await create_topics(settings)  # the rest, with plan.partitions each
    say(f"building {pop.count:,} accounts from deposits and fills")
    records = setup_records(pop)
    await produce_all(bootstrap, names, records)
    setup = len(records)  # the embedded broker's end offsets can fall short of the records
    port = free_port()
    log = open(workdir / "service.log", "wb")  # noqa: SIM115
    service = await asyncio.create_subprocess_exec(
        *tied_to_us([sys.executable, "-m", "monitor.cli", "run", *settings.run_args(),
                     "--group", "ckpt", "--metrics-port", str(port),
                     "--checkpoint-interval", str(10 * plan.limit),
                     "--checkpoint-records", str(setup + int(plan.rate * plan.before))]),
        stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 600
        while True:
            seen = await asyncio.to_thread(scrape_input_offsets, port)
            if sum(seen.values()) >= setup:  # offsets from 0: records applied
                break
            if service.returncode is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the service did not consume its set-up; see {log.name}")
            await asyncio.sleep(0.2)
        first = await asyncio.to_thread(scrape_checkpoints, port)
        if first is None or first[0] != 0:
            raise RuntimeError(f"a checkpoint came before the paced input: {first}")
        arrivals: dict[Any, Input] = {}
        stop, positioned, written = asyncio.Event(), asyncio.Event(), asyncio.Event()
        since_ms = [float("inf")]
        with stamping_window():
            reader = asyncio.create_task(read_inputs(
                bootstrap, {topics.margin_calls: plan.partitions,
                            topics.liquidations: plan.partitions},
                arrivals, stop, positioned, since_ms))
            await positioned.wait()
            since_ms[0] = time.time() * 1000
            say(f"{plan.rate:,.0f} records/s; the checkpoint of every account starts after "
                f"{plan.before:g} s")
            stream = MixedStream(pop, seed=plan.seed, volatility=plan.volatility,
                                 shares=plan.shares)
            producing = asyncio.create_task(paced(bootstrap, names, stream, plan.rate,
                                                  plan.before + 2 * plan.limit, until=written,
                                                  linger_ms=plan.linger_ms))
            while not producing.done():  # until the checkpoint is written, and as long again
                await asyncio.sleep(0.5)
                if service.returncode is not None:
                    raise RuntimeError(f"the service stopped; see {log.name}")
                now = await asyncio.to_thread(scrape_checkpoints, port)
                if now is not None and now[0] > 0 and not written.is_set():
                    say("checkpoint written")
                    await asyncio.sleep(max(1.0, now[1]))
                    written.set()
            sent = await producing
            await asyncio.sleep(2.0)  # stragglers
            stop.set()
            await reader
        final = await asyncio.to_thread(scrape_checkpoints, port)
        if final is None or final[0] != 1:
            raise RuntimeError(f"expected one checkpoint during the paced input: {final}")
        say("reading the checkpoint back")
        changelog = await read_checkpoint(bootstrap, topics.state, plan.partitions)
    finally:
        if service.returncode is None:
            service.terminate()
        await service.wait()
        log.close()
    _, seconds, ended = final
    end_ms = ended * 1000
    start_ms = end_ms - seconds * 1000
    groups = split(arrivals, start_ms, end_ms)
    outside = Arrivals([*groups["before"].latencies_ms, *groups["after"].latencies_ms])
    (workdir / "samples.json").write_bytes(orjson.dumps({  # for a closer look
        "paced_from_ms": since_ms[0], "checkpoint_ms": [start_ms, end_ms],
        "inputs": [{"trigger": list(key), **vars(one)} for key, one in arrivals.items()]}))
    accounts = [m for m in changelog if dict(m.headers).get(KIND_HEADER) == ACCOUNT]
    return {"sent": sent, "setup_records": setup,
            "checkpoint": {"seconds": seconds, "started_after": (start_ms - since_ms[0]) / 1000,
                           "accounts": len(accounts),
                           "bytes": sum(len(m.key) + len(m.value or b"") for m in accounts),
                           "records": len(changelog)},
            "inputs_with_events": len(arrivals),
            "outside": outside.summary(),
            **{name: group.summary() for name, group in groups.items()}}


async def checkpoint_phase(plan: CheckpointPlan, say: Callable[[str], None]
                           ) -> dict[str, Any]:
    from monitor.service.broker import EmbeddedBroker

    pop = populate(bench_config(plan.instruments), plan.accounts, plan.seed)
    with (phase_dir("liqmon-checkpoint-", plan.keep_logs) as workdir,
          EmbeddedBroker(log_path=workdir / "broker.log") as broker):
        report = await measure(plan, pop, broker.bootstrap, workdir, say)
    return {**({"workdir": str(workdir)} if plan.keep_logs else {}), **report}


def figures(report: dict[str, Any], plan: CheckpointPlan) -> list[Figure]:
    """`liqmon bench` figures: tick-to-event latency during the checkpoint beside outside
    it, and the checkpoint itself."""
    during, outside, checkpoint = report["during"], report["outside"], report["checkpoint"]
    accounts = checkpoint["accounts"]
    ratio = (None if during["p99"] is None or not outside["p99"]
             else during["p99"] / outside["p99"])
    counts = "; ".join(
        f"{name}: {group['count']:,} ticks with events, p50 {_ms(group['p50'])}, p99 "
        f"{_ms(group['p99'])}, max {_ms(group['max'])}"
        for name, group in (("during", during), ("outside", outside),
                            ("of which just before", report["before"]),
                            ("just after", report["after"])))
    counts += "; p99 during / outside " + ("n/a" if ratio is None else f"{ratio:.2f}×")
    out = []
    for quantile in ("p50", "p99"):
        value, baseline = during[quantile], outside[quantile]
        met = None if quantile == "p50" or ratio is None else ratio <= 1.5
        out.append(Figure(
            f"checkpoint_latency_{quantile}_ms",
            f"tick-to-event latency {quantile} while a checkpoint of {accounts:,} dirty "
            "accounts is written (baseline: outside it, same run)", "ms", value, baseline,
            "unchanged (≤ 1.5×)" if quantile == "p99" else "—", met, False,
            counts if quantile == "p99" else
            f"{report['sent']:,} inputs at {plan.rate:,.0f} records/s "
            f"({plan.shares[0]:.0%} ticks, σ {plan.volatility:.2g}), events read by a separate "
            "consumer; a tick is during the checkpoint when its ts → last event overlaps it"))
    out.append(Figure(
        "checkpoint_write_s", f"checkpoint of {accounts:,} dirty accounts, written beside "
        "the loop", "s", checkpoint["seconds"], None, "—", None, False,
        f"{accounts:,} account snapshots, {checkpoint['bytes'] / 1e6:,.1f} MB encoded (keys "
        f"and values, before compression), {checkpoint['records']:,} changelog records in all; "
        f"started {checkpoint['started_after']:.1f} s into the paced input"))
    return out


def _ms(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f} ms"


def main() -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m monitor.bench.checkpoint")
    parser.add_argument("--accounts", type=int, default=CheckpointPlan.accounts)
    parser.add_argument("--rate", type=float, default=CheckpointPlan.rate)
    parser.add_argument("--volatility", type=float, default=0.0, help="default: by scale")
    add_keep_logs_option(parser)
    args = parser.parse_args()
    plan = CheckpointPlan(accounts=args.accounts, rate=args.rate, volatility=args.volatility,
                          keep_logs=args.keep_logs)
    report = asyncio.run(checkpoint_phase(plan, lambda text: print(text, file=sys.stderr)))
    print(orjson.dumps(report, option=orjson.OPT_INDENT_2).decode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
