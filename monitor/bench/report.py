"""What `liqmon bench` measures and how it shows it: the run's plan, one figure beside its
baseline, progress, the table."""

from __future__ import annotations

import gc
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from monitor.bench.workload import (
    Population,
)
from monitor.engine import Engine
from monitor.reference import ReferenceEngine

TICK_SYMBOL = "BTC-PERP"
DEFAULT_VOLATILITY = 1e-5


@dataclass
class Figure:
    key: str
    name: str
    unit: str
    value: float | None
    baseline: float | None = None
    target: str = ""
    met: bool | None = None
    higher_is_better: bool = False
    note: str = ""

    @property
    def ratio(self) -> float | None:
        """How many times better than the baseline."""
        if self.value is None or self.baseline is None or not self.value or not self.baseline:
            return None
        return self.value / self.baseline if self.higher_is_better else self.baseline / self.value

    def as_json(self) -> dict[str, Any]:
        return {"name": self.name, "unit": self.unit, "value": self.value,
                "baseline": self.baseline, "ratio": self.ratio, "target": self.target,
                "met": self.met, "note": self.note}


@dataclass
class Plan:
    accounts: int
    instruments: int = 50
    seed: int = 7
    volatility: float = DEFAULT_VOLATILITY
    records: int = 0  # engine-only stream length (0: by scale)
    e2e: bool = True
    keep_logs: Path | None = None  # where phases' logs are kept (None: only a failed one's)
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = self.accounts
        if not self.records:
            self.records = int(min(200_000, max(30_000, n // 2)))
        self.naive_budget = 2.5 if n <= 20_000 else 8.0 if n <= 200_000 else 15.0
        self.e2e_records = int(min(400_000, max(60_000, 3 * n)))
        self.latency_seconds = 3.0 if n <= 20_000 else 6.0 if n <= 200_000 else 10.0


# -- helpers ------------------------------------------------------------------------------------

def rss_bytes() -> int:
    """Resident set size, after handing freed heap back to the OS (glibc malloc_trim) so
    that memory the allocator merely keeps does not count."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def load_population(engine: Engine | ReferenceEngine, pop: Population,
                    progress: Callable[[int], None] | None = None) -> float:
    """Install every account as a restore would; returns the seconds it took."""
    started = time.perf_counter()
    engine.load_prices(pop.price_table())
    for n, (account_id, account) in enumerate(pop.accounts()):
        engine.load_account(account_id, account)
        if progress is not None and n % 50_000 == 49_999:
            progress(50_000)
    if isinstance(engine, Engine):
        engine.index_restored()
    if progress is not None:
        progress(pop.count % 50_000)
    return time.perf_counter() - started


@contextmanager
def stamping_window() -> Iterator[None]:
    """While this process stamps arrivals: no garbage collection in it. A full pass walks
    every object the bench holds (0.2–0.3 s with a 100,000-account workload), and a reader paused
    by it stamps whatever arrives meanwhile that much late, the service's events and the relay's
    copies alike. The windows are seconds long and make little cyclic garbage."""
    from monitor.service.changelog import collector

    gc.collect()
    collector.pause()
    try:
        yield
    finally:
        collector.resume()


@contextmanager
def collected_as_in_service() -> Iterator[None]:
    """While engines are timed in this process: the garbage collector as `liqmon run` sets it
    (`Collector.settle`), not Python's default, under which full passes walk the whole
    workload the bench holds (its population and the records of the race, ~100,000 objects
    and more) over and over: a fifth of a volatile replay's time, which the service does not
    pay. Python's settings come back after."""
    from monitor.service.changelog import collector

    thresholds = gc.get_threshold()
    collector.settle()
    try:
        yield
    finally:
        gc.unfreeze()
        gc.set_threshold(*thresholds)


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    return float(np.quantile(np.array(values), q))


class Phases:
    """A rich progress display on stderr (quiet when asked)."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet
        self.progress: Any = None
        if not quiet:
            from rich.console import Console
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

            self.progress = Progress(TextColumn("{task.description:<44}"), BarColumn(),
                                     TextColumn("{task.percentage:>3.0f}%"),
                                     TimeElapsedColumn(), console=Console(stderr=True),
                                     transient=False)

    def __enter__(self) -> Phases:
        if self.progress is not None:
            self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.progress is not None:
            self.progress.stop()

    def task(self, name: str, total: float) -> Callable[[float], None]:
        if self.progress is None:
            return lambda advance: None
        task_id = self.progress.add_task(name, total=total)
        return lambda advance: self.progress.advance(task_id, advance)

    def done(self, step: Callable[[float], None], left: float = 0) -> None:
        if self.progress is not None and left:
            step(left)


def _value(figure: dict[str, Any]) -> str:
    value = figure["value"]
    if value is None:
        return figure["note"] if figure["note"] in ("skipped",) else "n/a"
    unit = figure["unit"]
    if unit == "records/s":
        return f"{value:,.0f}/s"
    if unit == "bytes":
        return f"{value:,.0f} B"
    if unit == "ms":
        if value < 1:
            return f"{value * 1000:,.1f} µs"
        return f"{value:,.2f} ms" if value < 10 else f"{value:,.1f} ms"
    return f"{value:,.2f} {unit}"


def render(report: dict[str, Any], console: Any) -> None:
    from rich.table import Table

    title = (f"liqmon bench — {report['accounts']:,} accounts, {report['positions']:,} "
             f"positions, {report['instruments']} instruments, tick σ "
             f"{report['tick_volatility']:g}")
    table = Table(width=max(console.width, 110), title=title)
    for column in ("figure", "value", "naive baseline", "ratio", "target", "met?"):
        table.add_column(column, justify="left" if column in ("figure", "target") else "right")
    notes = []
    for figure in report["figures"].values():
        baseline = None if figure["baseline"] is None else _value({**figure,
                                                                   "value": figure["baseline"]})
        ratio = "—" if figure["ratio"] is None else f"{figure['ratio']:,.1f}×"
        met = {True: "[green]yes[/]", False: "[red]no[/]", None: "—"}[figure["met"]]
        table.add_row(figure["name"], _value(figure), baseline or "—", ratio,
                      figure["target"], met)
        if figure["note"]:
            notes.append(f"[bold]{figure['name']}[/]: {figure['note']}")
    console.print(table)
    for note in notes:
        console.print(note, highlight=False)
    console.print(f"ran {report['seconds']:.0f} s on {report['machine']['cpus']} CPUs, "
                  f"Python {report['machine']['python']}", highlight=False)
