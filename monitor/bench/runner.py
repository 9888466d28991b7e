"""`liqmon bench`: every phase in order, and the JSON report."""

from __future__ import annotations

import asyncio
import gc
import os
import platform
import time
from typing import Any

from monitor.bench.end_to_end import e2e_phase
from monitor.bench.engine import (
    engine_phase,
    memory_phase,
    stress_phase,
    tick_phase,
    volatile_phase,
)
from monitor.bench.report import TICK_SYMBOL, Figure, Phases, Plan
from monitor.bench.restore import restore_phase
from monitor.bench.scale_out import scale_out_phase
from monitor.bench.workload import (
    bench_config,
    populate,
)
from monitor.book import warm_up


def run(plan: Plan, quiet: bool = False) -> dict[str, Any]:
    config = bench_config(plan.instruments)
    figures: list[Figure] = []
    started = time.perf_counter()
    with Phases(quiet) as phases:
        step = phases.task("load the compiled kernels", 1)
        warm_up()  # as `liqmon run` does before it consumes: no timed phase pays for it
        step(1)
        step = phases.task(f"generate {plan.accounts:,} accounts", 1)
        pop = populate(config, plan.accounts, plan.seed)
        step(1)
        engine_figures, fast, naive, stream = engine_phase(plan, pop, phases)
        figures += engine_figures
        figures += tick_phase(plan, fast, naive, phases)
        figures += volatile_phase(plan, phases)
        figures += stress_phase(plan, fast, phases)
        del fast, naive
        gc.collect()
        figures += memory_phase(plan, phases)
        if plan.e2e:
            figures += asyncio.run(e2e_phase(plan, pop, stream, phases))
            figures += asyncio.run(restore_phase(plan, pop, phases))
            figures += asyncio.run(scale_out_phase(plan, stream, phases))
            figures += live_latency_phase(plan, phases)
            figures += checkpoint_latency_phase(plan, phases)
        else:
            figures += [Figure(key, name, "", None, None, target, None, False, "skipped")
                        for key, name, target in (
                            ("e2e_records_per_s", "end to end: records/s", "≥ 200,000/s"),
                            ("latency_p50_ms", "tick-to-event latency p50", "—"),
                            ("latency_p99_ms", "tick-to-event latency p99", "≤ 10 ms"),
                            ("restore_s", "restore from liqmon.state",
                             "≤ 10 s (1M accounts)"),
                            ("restore_vs_bare_read_s", "restart-to-ready overhead beside "
                             "a bare consumer reading the same changelog",
                             "≤ 2× the bare read"),
                            ("empty_start_s", "empty start to ready (baseline: a bare "
                             "group consumer joining)", "≤ 2 s"),
                            ("scale_out_records_per_s", "end to end, 2 instances "
                             "(baseline: 1)", "—"),
                            ("live_latency_p99_calm_ms", "input-to-event latency p99, calm "
                             "(baseline: bare relay)", "≤ 1.5× relay"),
                            ("live_latency_p99_volatile_ms", "input-to-event latency p99, "
                             "volatile (baseline: bare relay)", "≤ 1.5× relay"),
                            ("live_order_differences", "live events ≠ replay in timestamp "
                             "order", "0"),
                            ("checkpoint_latency_p50_ms", "tick-to-event latency p50 while a "
                             "checkpoint of every account is written (baseline: outside it)",
                             "—"),
                            ("checkpoint_latency_p99_ms", "tick-to-event latency p99 while a "
                             "checkpoint of every account is written (baseline: outside it)",
                             "unchanged (≤ 1.5×)"),
                            ("checkpoint_write_s", "checkpoint of every account, written "
                             "beside the loop", "—"))]
    return {
        "accounts": plan.accounts,
        "positions": pop.positions,
        "instruments": plan.instruments,
        "holders_of_tick_symbol": pop.holders(TICK_SYMBOL),
        "seed": plan.seed,
        "tick_volatility": plan.volatility,
        "engine_records": plan.records,
        "seconds": time.perf_counter() - started,
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(),
                    "platform": platform.platform()},
        "figures": {f.key: f.as_json() for f in figures},
    }


def live_latency_phase(plan: Plan, phases: Phases) -> list[Figure]:
    """The service beside a bare relay, calm then volatile, and the live order check."""
    from monitor.bench.latency import LatencyPlan, figures, latency_phase

    latency = LatencyPlan(accounts=min(plan.accounts, 10_000), instruments=plan.instruments,
                          seconds=max(3.0, plan.latency_seconds * 2), seed=plan.seed,
                          keep_logs=plan.keep_logs)
    step = phases.task("live latency beside a relay, calm and volatile", 6)
    report = asyncio.run(latency_phase(latency, lambda text: step(1)))
    return figures(report, latency.rate)


def checkpoint_latency_phase(plan: Plan, phases: Phases) -> list[Figure]:
    """`liqmon run` writing a checkpoint of every account (at most 100,000) while paced ticks
    flow: their latency during it beside before and after it."""
    from monitor.bench.checkpoint import CheckpointPlan, checkpoint_phase, figures

    checkpoint = CheckpointPlan(accounts=min(plan.accounts, 100_000),
                                instruments=plan.instruments, seed=plan.seed,
                                before=plan.latency_seconds, keep_logs=plan.keep_logs)
    step = phases.task(f"latency while {checkpoint.accounts:,} accounts are checkpointed", 4)
    report = asyncio.run(checkpoint_phase(checkpoint, lambda text: step(1)))
    return figures(report, checkpoint)
