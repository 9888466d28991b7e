"""The phases without a broker: engine only (calm and volatile) beside the naive engine, one
tick on a widely held symbol, `liqmon stress` over a grid, resident memory per account."""

from __future__ import annotations

import gc
import json
import math
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from monitor.bench.report import (
    TICK_SYMBOL,
    Figure,
    Phases,
    Plan,
    collected_as_in_service,
    load_population,
    percentile,
    rss_bytes,
)
from monitor.bench.workload import (
    MixedStream,
    Population,
    bench_config,
    populate,
    with_sources,
)
from monitor.book import kernels, warm_up
from monitor.book.store import Book
from monitor.engine import Engine
from monitor.events import Source
from monitor.records import PriceTick, Rejected
from monitor.reference import ReferenceEngine
from monitor.service.lifeline import tied_to_us

# -- engine-only ---------------------------------------------------------------------------------

@dataclass
class EngineRace:
    """The columnar engine and the naive one over the same records (the naive on a prefix)."""

    fast_rate: float
    naive_rate: float
    records: int
    events: int
    naive_records: int
    agree: bool

    def note(self) -> str:
        return (f"{self.records:,} records, {self.events:,} events; baseline on the first "
                f"{self.naive_records:,} records; events "
                f"{'identical' if self.agree else 'DIFFER'} on that prefix")


def race(fast: Engine, naive: ReferenceEngine, records: list[Any], budget: float,
         phases: Phases, label: str) -> EngineRace:
    with collected_as_in_service():  # both engines, as `liqmon run` runs
        step = phases.task(f"{label}: {len(records):,} records", len(records))
        fast_ids: list[list[str]] = []
        elapsed = 0.0
        for start in range(0, len(records), 5_000):
            chunk = records[start:start + 5_000]
            inputs, sources = [r for r, _ in chunk], [s for _, s in chunk]
            t0 = time.perf_counter()
            outcomes = fast.apply_records(inputs, sources)  # as the service applies a batch
            elapsed += time.perf_counter() - t0
            fast_ids += [[] if isinstance(o, Rejected) else [e.event_id for e in o]
                         for o in outcomes]
            step(len(chunk))
        step = phases.task(f"{label}, naive baseline ({budget:.0f} s budget)", budget)
        naive_elapsed, done, agree = 0.0, 0, True
        last = 0.0
        for n, (record, source) in enumerate(records):
            t0 = time.perf_counter()
            events = naive.apply(record, source)
            naive_elapsed += time.perf_counter() - t0
            done = n + 1
            if [e.event_id for e in events] != fast_ids[n]:
                agree = False
            if naive_elapsed - last > 0.25:
                step(naive_elapsed - last)
                last = naive_elapsed
            if naive_elapsed > budget:
                break
        phases.done(step, max(0.0, budget - last))
        return EngineRace(len(records) / elapsed, done / naive_elapsed, len(records),
                          sum(len(ids) for ids in fast_ids), done, agree)


def engine_phase(plan: Plan, pop: Population, phases: Phases) -> tuple[list[Figure], Engine,
                                                                         ReferenceEngine,
                                                                         MixedStream]:
    config = pop.config
    step = phases.task("load accounts (columnar engine)", pop.count)
    fast = Engine(config)
    fast_load = load_population(fast, pop, step)
    step = phases.task("load accounts (reference engine)", pop.count)
    naive = ReferenceEngine(config)
    naive_load = load_population(naive, pop, step)

    stream = MixedStream(pop, plan.seed, plan.volatility)
    records = with_sources(stream.records(plan.records))
    result = race(fast, naive, records, plan.naive_budget, phases, "engine only")
    figures = [
        Figure("engine_records_per_s", "engine only: records/s", "records/s",
               result.fast_rate, result.naive_rate, "—", None, True, result.note()),
        Figure("load_accounts_s", "install accounts (load_account + index)", "s", fast_load,
               naive_load, "—", None, False, f"{pop.count:,} accounts, {pop.positions:,} "
                                                 "positions"),
    ]
    return figures, fast, naive, stream


VOLATILE_ACCOUNTS = 10_000
VOLATILE_SIGMA = 0.003  # SPEC §9: per-tick σ ≈ 0.3 %


def volatile_phase(plan: Plan, phases: Phases) -> list[Figure]:
    """SPEC §9's volatile replay: 10,000 accounts, per-tick σ 0.3 %, both engines."""
    config = bench_config(plan.instruments)
    pop = populate(config, min(plan.accounts, VOLATILE_ACCOUNTS), plan.seed + 11)
    fast, naive = Engine(config), ReferenceEngine(config)
    load_population(fast, pop)
    load_population(naive, pop)
    fast.index_restored()
    records = with_sources(MixedStream(pop, plan.seed + 11, VOLATILE_SIGMA).records(30_000))
    result = race(fast, naive, records, min(plan.naive_budget, 4.0), phases,
                  f"volatile replay ({pop.count:,} accounts, σ {VOLATILE_SIGMA:g})")
    ratio = result.fast_rate / result.naive_rate
    return [Figure("volatile_records_per_s", f"volatile market (σ {VOLATILE_SIGMA:g}, "
                   f"{pop.count:,} accounts): records/s", "records/s", result.fast_rate,
                   result.naive_rate, "≥ 300× naive",
                   ratio >= 300 if pop.count >= VOLATILE_ACCOUNTS else None, True,
                   result.note())]


def tick_phase(plan: Plan, fast: Engine, naive: ReferenceEngine, phases: Phases,
               target_holders: int = 100_000) -> list[Figure]:
    holders = len(fast.accounts_moved_by(TICK_SYMBOL))
    rng = np.random.default_rng(plan.seed + 5)
    price = fast.prices[TICK_SYMBOL]
    ts = max(fast.price_ts.get(TICK_SYMBOL, 0), naive.price_ts.get(TICK_SYMBOL, 0)) + 1
    step = phases.task(f"tick on {TICK_SYMBOL} ({holders:,} holders)", 3)
    typical, events = [], 0
    for n in range(400):
        price *= math.exp(plan.volatility * rng.normal())
        tick = PriceTick(TICK_SYMBOL, float(price), ts + n)
        t0 = time.perf_counter()
        events += len(fast.apply(tick, Source("prices", 0, 10**9 + n)))
        typical.append(time.perf_counter() - t0)
    step(1)

    def cold_ticks(first: int) -> tuple[list[float], list[float]]:
        """Five ticks that re-value every holder, and the band merges each leaves."""
        nonlocal price
        cold, upkeep = [], []
        for n in range(first, first + 5):
            fast.expire_bands(TICK_SYMBOL)
            price *= math.exp(plan.volatility * rng.normal())
            tick = PriceTick(TICK_SYMBOL, float(price), ts + n)
            t0 = time.perf_counter()
            fast.apply(tick, Source("prices", 0, 10**9 + n))
            t1 = time.perf_counter()
            while fast.merge_overdue_bands():  # what the service does next, when idle
                pass
            cold.append(t1 - t0)
            upkeep.append(time.perf_counter() - t1)
        return cold, upkeep

    cold, upkeep = cold_ticks(1_000)
    scatter_positions(fast.book, rng)
    aged, _ = cold_ticks(1_005)
    t0 = time.perf_counter()
    steps = compact_positions(fast.book)
    compaction_s = time.perf_counter() - t0
    compacted, _ = cold_ticks(1_010)
    step(1)
    naive_times = []
    deadline = time.perf_counter() + plan.naive_budget
    for n in range(5):
        price *= math.exp(plan.volatility * rng.normal())
        tick = PriceTick(TICK_SYMBOL, float(price), ts + 2_000 + n)
        t0 = time.perf_counter()
        naive.apply(tick, Source("prices", 0, 10**9 + 2_000 + n))
        naive_times.append(time.perf_counter() - t0)
        if time.perf_counter() > deadline and len(naive_times) >= 2:
            break
    step(1)
    naive_ms = statistics.median(naive_times) * 1e3
    scale = f"{holders:,} holders" + (
        "" if holders >= target_holders else f" (target is for {target_holders:,})")
    at_scale = holders >= 0.9 * target_holders  # judge the target only where it applies
    typical_ms = statistics.median(typical) * 1e3
    p99 = percentile(typical, 0.99) * 1e3  # type: ignore[operator]
    cold_ms = statistics.median(cold) * 1e3
    aged_ms = statistics.median(aged) * 1e3
    return [
        Figure("tick_100k_ms", f"tick on {TICK_SYMBOL}: typical (median)", "ms", typical_ms,
               naive_ms, "≤ 5 ms", typical_ms <= 5.0 if at_scale else None, False,
               f"{scale}; p99 {p99:.3f} ms, max {max(typical) * 1e3:.2f} ms over "
               f"{len(typical)} random-walk ticks ({events} events); baseline re-values every "
               "holder"),
        Figure("tick_100k_cold_ms", f"tick on {TICK_SYMBOL}: every holder re-valued", "ms",
               cold_ms, naive_ms, "≤ 5 ms", cold_ms <= 5.0 if at_scale else None, False,
               f"{scale}; safe bands expired first (worst case: a shock that leaves every "
               "band); median of five; then merging the bands it filed into the index, "
               f"which the service does when idle, {statistics.median(upkeep) * 1e3:.1f} ms"),
        Figure("tick_100k_aged_ms", "the same on a book whose positions trading scattered",
               "ms", aged_ms, naive_ms, "≤ 5 ms", aged_ms <= 5.0 if at_scale else None, False,
               "position slots permuted at random (each account's lists kept), as opening and "
               "closing positions leaves them; median of five; after a compaction pass, which "
               f"the service runs when idle ({compaction_s:.2f} s in {steps} steps): "
               f"{statistics.median(compacted) * 1e3:.1f} ms"),
    ]


def scatter_positions(book: Book, rng: np.random.Generator) -> None:
    """Move every position slot to a random place, each account's lists kept: what trading
    does to a book over time (a new position takes the slot freed last, wherever it is) and a
    freshly loaded one does not show."""
    used = int(book.slots[kernels.SLOTS_USED])
    to = rng.permutation(used).astype(np.int32)  # slot s moves to to[s]
    for column in (book.p_acct, book.p_instr, book.p_qty, book.p_entry):
        column[to] = column[:used].copy()
    links = book.p_next[:used].copy()
    linked = links >= 0
    book.p_next[to] = np.where(linked, to[np.where(linked, links, 0)], -1)
    holding = book.first >= 0
    book.first[holding] = to[book.first[holding]]
    stacked = int(book.slots[kernels.SLOTS_FREE])
    book.free_slots[:stacked] = to[book.free_slots[:stacked]]


def compact_positions(book: Book) -> int:
    """A whole compaction pass, as the service runs it while idle; how many steps."""
    book.start_compaction()
    steps = 1
    while book.compact_positions():
        steps += 1
    return steps


# -- stress --------------------------------------------------------------------------------------

STRESS_GRID = [round(-0.3 + k * 0.01, 12) for k in range(61)]  # -30 % … +30 % by 1 %


def stress_phase(plan: Plan, fast: Engine, phases: Phases) -> list[Figure]:
    """`liqmon stress --grid=-0.3:0.3:0.01` over the whole book, beside the scalar SPEC §4
    valuation of each account (timed on a sample within the budget, scaled to the grid)."""
    from monitor.margin import value_account
    from monitor.state import next_state
    from monitor.stress import stress

    step = phases.task(f"stress: {len(STRESS_GRID)}-scenario grid", 2)
    symbols = sorted(fast.config.price_symbols())
    shocks = [dict.fromkeys(symbols, f) for f in STRESS_GRID]
    t0 = time.perf_counter()
    report = stress(fast, shocks)
    seconds = time.perf_counter() - t0
    step(1)
    config, thresholds = fast.config, fast.config.thresholds
    shocked = {s: p * (1 + STRESS_GRID[0]) for s, p in fast.prices.items()}
    deadline = time.perf_counter() + plan.naive_budget / 4
    valued, elapsed = 0, 0.0
    for account_id in fast.accounts:
        account = fast.accounts[account_id]
        if not account.positions:
            continue
        t1 = time.perf_counter()
        v = value_account(account.balances, account.positions, config, shocked)
        if v is not None:
            next_state(account.state, v.ratio, thresholds)
        elapsed += time.perf_counter() - t1
        valued += 1
        if time.perf_counter() > deadline:
            break
    step(1)
    baseline = elapsed / max(valued, 1) * report.accounts * len(STRESS_GRID)
    worst = report.scenarios[0]
    at_scale = report.accounts >= 900_000  # the target is for 1M accounts
    return [Figure("stress_grid_s", f"stress: {len(STRESS_GRID)}-scenario grid", "s", seconds,
                   baseline, "≤ 10 s (1M accounts)", seconds <= 10 if at_scale else None, False,
                   f"{report.accounts:,} accounts holding a position, every symbol moved "
                   f"-30 %…+30 % by 1 %; at -30 %: {len(worst.newly_liquidating):,} newly "
                   f"liquidating; baseline: margin.value_account per account, timed on "
                   f"{valued:,} and scaled")]


# -- memory --------------------------------------------------------------------------------------

def memory_phase(plan: Plan, phases: Phases) -> list[Figure]:
    step = phases.task("resident memory per account (2 subprocesses)", 2)
    procs = {}
    for engine in ("fast", "naive"):
        spec = {"mode": "memory", "engine": engine, "accounts": plan.accounts,
                "instruments": plan.instruments, "seed": plan.seed}
        procs[engine] = subprocess.Popen(
            tied_to_us([sys.executable, "-m", "monitor.bench", "--worker", json.dumps(spec)]),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out = {}
    for engine, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=900)
        if proc.returncode != 0:
            raise RuntimeError(f"memory probe ({engine}) failed: {stderr.decode()[-2000:]}")
        out[engine] = json.loads(stdout.decode().strip().splitlines()[-1])
        step(1)
    fast = out["fast"]["bytes_per_account"]
    naive = out["naive"]["bytes_per_account"]
    return [Figure("rss_per_account_bytes", "resident memory per account", "bytes", fast,
                   naive, "≤ 1024 B", fast <= 1024, False,
                   f"RSS growth of a fresh process loading {plan.accounts:,} accounts "
                   f"({out['fast']['positions']:,} positions), generator data dropped; "
                   f"book columns and band index {out['fast']['book_bytes'] / plan.accounts:.0f}"
                   " B/account, the rest is account ids and their index")]


def memory_probe(spec: dict[str, Any]) -> dict[str, Any]:
    """RSS growth of a fresh process from before the workload is generated to after it is
    loaded and the generator's own data is dropped (the kernels loaded before)."""
    config = bench_config(spec["instruments"])
    engine: Engine | ReferenceEngine = (Engine(config) if spec["engine"] == "fast"
                                        else ReferenceEngine(config))
    if spec["engine"] == "fast":
        warm_up()  # the compiled kernels' code is per process, not per account
    gc.collect()
    before = rss_bytes()
    pop = populate(config, spec["accounts"], spec["seed"])
    count, positions = pop.count, pop.positions
    load_population(engine, pop)
    del pop
    gc.collect()
    after = rss_bytes()
    book = engine.book.memory_bytes() if isinstance(engine, Engine) else 0
    return {"bytes_per_account": (after - before) / count, "positions": positions,
            "rss_before": before, "rss_after": after, "book_bytes": book}
