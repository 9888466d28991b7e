"""`liqmon stress`: what-if price shocks over the whole book (SPEC §7). Pure: no Kafka, no I/O.

A scenario moves the last applied price p of some symbols to p·(1 + fraction), all at once; a
symbol with no price yet is not moved, and a fixed-price asset never moves. Every account
holding a position is valued under SPEC §4 at the shocked prices and its state moved one step
under SPEC §5's rule from the state it is in now; nothing in the engine changes. An isolated
position (SPEC §4.1) is a risk unit of its own, valued on its wallet without collateral weight
and reported as `account/symbol`.

The book's columns are gathered once into arrays sorted by (instrument, |q|·cs). In one
scenario an instrument's mark and settle price are scalars, so its positions' notionals are
|q|·cs times one mark and its tier boundaries are cut points in that sorted run (a binary
search per tier instead of a comparison per position); per-account sums are one compiled pass
over the positions in that order, and each account's next state is the engine's compiled rule.
Summation order differs from `margin.value_account`, so figures agree to rounding (1e-9
relative), not bit for bit.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numba
import numpy as np

from monitor.account import RiskKey, UnitKey
from monitor.book import kernels
from monitor.engine import Engine
from monitor.errors import LiqmonError
from monitor.state import AccountState

LOSERS = 10  # largest losers reported per scenario
STATE_NAMES = tuple(state.name for state in AccountState)


@dataclass(slots=True)
class ScenarioResult:
    shock: dict[str, float]
    accounts_by_state: dict[str, int]
    unpriced: int
    newly_liquidating: list[str]
    equity: float
    maintenance_margin: float
    bad_debt: float
    largest_losers: list[dict[str, Any]]

    def to_json(self) -> dict[str, Any]:
        return {"shock": self.shock, "accounts_by_state": self.accounts_by_state,
                "unpriced": self.unpriced, "newly_liquidating": self.newly_liquidating,
                "equity": self.equity, "maintenance_margin": self.maintenance_margin,
                "bad_debt": self.bad_debt, "largest_losers": self.largest_losers}


@dataclass(slots=True)
class Figures:
    """Per evaluated account (rows of `StressBook.ids`): equity, MM, ratio, evaluable."""

    equity: np.ndarray
    mm: np.ndarray
    ratio: np.ndarray
    evaluable: np.ndarray


class StressBook:
    """The accounts holding a position, gathered from an engine's book into flat arrays."""

    def __init__(self, engine: Engine) -> None:
        book = engine.book
        t = book.t
        self.t = t
        self.prices = t.symbol_prices(engine.prices)  # NaN: no tick yet
        rows = book.rows_in_use()
        rows = rows[book.first[rows] >= 0]
        n = len(rows)
        keys = [book.ids[r] for r in rows.tolist()]
        self.keys: list[RiskKey] = keys
        # isolated positions by their event-id name, "account/symbol"
        self.ids = [key.label() if isinstance(key, UnitKey) else key for key in keys]
        self.state = book.state[rows].astype(np.int64)
        na = t.n_assets
        bal = book.bal.reshape(-1, na)[rows]
        weight = np.array(t.a_weight)
        # collateral weight applies to positive cross balances only (SPEC §4 CV, §4.1)
        weighted = (bal > 0) & (book.isolated[rows] == 0)[:, None]
        self.wbal = bal * np.where(weighted, weight, 1.0)
        self.a_fixed = np.array([math.nan if f is None else f for f in t.a_fixed])
        self.a_sym = np.array(t.a_sym_id, dtype=np.int64)
        pos, own = book.positions_of_rows(rows)
        instr = book.p_instr[pos].astype(np.int64)
        q = book.p_qty[pos]
        e = book.p_entry[pos]
        absk = np.abs(q) * t.v_cs[instr]
        order = np.lexsort((absk, instr))
        self.owner = own[order]
        self.q_cs = (q * t.v_cs[instr])[order]
        self.cost = self.q_cs * e[order]  # q·cs·e: uPnL = (q·cs·mark − cost)·spx
        self.absk = absk[order]
        self.entry = e[order]
        # ids in sorted order once, so each scenario lists its accounts without a string sort:
        # by account, its cross margin before its isolated positions (as events are ordered)
        def event_order(k: int) -> tuple[str, bool, str]:
            key = keys[k]
            return ((key.account, True, key.symbol) if isinstance(key, UnitKey)
                    else (key, False, ""))

        self.by_id = np.array(sorted(range(n), key=event_order), dtype=np.int64)
        n_i = len(t.instruments)
        self.bounds = np.searchsorted(instr[order], np.arange(n_i + 1))
        self.n = n

    def figures(self, sym_px: np.ndarray) -> Figures:
        """SPEC §4 equity, MM and ratio of every account at these symbol prices."""
        t = self.t
        n = self.n
        px = np.where(self.a_sym >= 0, sym_px[np.maximum(self.a_sym, 0)], self.a_fixed)
        collateral = self.wbal @ np.nan_to_num(px, nan=0.0)  # an unpriced asset adds 0
        u = np.empty(len(self.owner))
        m = np.empty(len(self.owner))
        unevaluable = np.zeros(n, bool)
        for i, (cs_fixed, mark_id, settle_id, tiers) in enumerate(zip(
                t.i_settle_fixed, t.i_mark_id, t.i_settle_id, t.i_tiers, strict=True)):
            a, b = int(self.bounds[i]), int(self.bounds[i + 1])
            if a == b:
                continue
            spx = cs_fixed if cs_fixed is not None else float(sym_px[settle_id])
            if spx != spx:  # SPEC §4: not evaluated until the settle price arrives
                unevaluable[self.owner[a:b]] = True
                u[a:b] = m[a:b] = 0.0
                continue
            absk = self.absk[a:b]
            mark = float(sym_px[mark_id])
            maxes = np.array([tier[0] for tier in tiers[:-1]])
            mmrs = np.array([tier[1] for tier in tiers])
            cums = np.array([tier[3] for tier in tiers])
            if mark == mark:
                notional = absk * mark  # sorted, as absk is: tiers are runs cut by max_k
                cuts = np.searchsorted(notional, maxes, side="right")
                sizes = np.diff(np.concatenate(([0], cuts, [b - a])))
                mmr, cum = np.repeat(mmrs, sizes), np.repeat(cums, sizes)
                u[a:b] = (self.q_cs[a:b] * mark - self.cost[a:b]) * spx
            else:  # no tick yet: each position is marked at its own entry price
                notional = absk * self.entry[a:b]
                tier = (notional[:, None] > maxes).sum(1)
                mmr, cum = mmrs[tier], cums[tier]
                u[a:b] = 0.0
            m[a:b] = (notional * mmr - cum) * spx
        upnl, mm = _sums_by_owner(self.owner, u, m, n)
        equity = collateral + upnl
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = np.where(equity > 0, mm / equity, np.where(mm == 0, 0.0, math.inf))
        return Figures(equity=equity, mm=mm, ratio=ratio, evaluable=~unevaluable)

    def next_states(self, ratio: np.ndarray) -> np.ndarray:
        """SPEC §5's rule (monitor.state.next_state) for every account at once, by the
        engine's compiled rule."""
        return kernels.next_states(self.state, ratio, self.t.k_thresholds)

    def shocked_prices(self, shock: Mapping[str, float]) -> np.ndarray:
        px = self.prices.copy()
        for symbol, fraction in shock.items():
            s = self.t.sym_index[symbol]
            px[s] = px[s] * (1.0 + fraction)  # NaN (no tick yet) stays NaN: not moved
        return px


@numba.njit(cache=True, nogil=True)
def _sums_by_owner(owner: np.ndarray, u: np.ndarray, m: np.ndarray,
                   n: int) -> tuple[np.ndarray, np.ndarray]:
    """Both of np.bincount(owner, u, n) and np.bincount(owner, m, n), in one pass (the
    same additions in the same order)."""
    su = np.zeros(n)
    sm = np.zeros(n)
    for k in range(owner.shape[0]):
        su[owner[k]] += u[k]
        sm[owner[k]] += m[k]
    return su, sm


@numba.njit(cache=True, nogil=True)
def _flagged_in_order(order: np.ndarray, flags: np.ndarray) -> np.ndarray:
    """The entries of ``order`` whose flag is set, in that order."""
    out = np.empty(order.shape[0], np.int64)
    n = 0
    for k in range(order.shape[0]):
        if flags[order[k]]:
            out[n] = order[k]
            n += 1
    return out[:n]


@dataclass(slots=True)
class StressReport:
    accounts: int  # accounts holding a position: the ones every scenario values
    scenarios: list[ScenarioResult]

    def to_json(self) -> dict[str, Any]:
        return {"accounts": self.accounts,
                "scenarios": [scenario.to_json() for scenario in self.scenarios]}


def stress(engine: Engine, shocks: Sequence[Mapping[str, float]],
           losers: int = LOSERS) -> StressReport:
    """Evaluate each shock (symbol → fraction) over the engine's book."""
    book = StressBook(engine)
    base = book.figures(book.prices)
    return StressReport(accounts=book.n,
                        scenarios=[_scenario(book, base, shock, losers) for shock in shocks])



def _scenario(book: StressBook, base: Figures, shock: Mapping[str, float],
              losers: int) -> ScenarioResult:
    f = book.figures(book.shocked_prices(shock))
    ok = f.evaluable
    new = book.next_states(f.ratio)
    counts = np.bincount(new[ok], minlength=len(STATE_NAMES))
    newly = ok & (new == 2) & (book.state != 2)
    ids = book.ids
    equity = f.equity[ok]
    loss = np.where(ok, base.equity - f.equity, 0.0)
    top = np.flatnonzero(loss > 0)
    if len(top) > losers:
        top = top[np.argpartition(-loss[top], losers - 1)[:losers]]
    ranked = sorted(top.tolist(), key=lambda r: (-loss[r], ids[r]))
    return ScenarioResult(
        shock=dict(shock),
        accounts_by_state={name: int(counts[k]) for k, name in enumerate(STATE_NAMES)},
        unpriced=int((~ok).sum()),
        newly_liquidating=[ids[r] for r in _flagged_in_order(book.by_id, newly).tolist()],
        equity=float(equity.sum()),
        maintenance_margin=float(f.mm[ok].sum()),
        bad_debt=float(np.maximum(0.0, -equity).sum()),
        largest_losers=[{"account": ids[r], "equity_loss": float(loss[r]),
                         "equity": float(f.equity[r])} for r in ranked],
    )


def shock_label(shock: Mapping[str, float]) -> str:
    """"BTC-PERP −17 %", or "all +10 %" style when every symbol moves alike (a grid step)."""
    fractions = set(shock.values())
    if len(shock) > 2 and len(fractions) == 1:
        return f"{len(shock)} symbols {fractions.pop():+.1%}"
    return ", ".join(f"{symbol} {fraction:+.1%}" for symbol, fraction in shock.items())


def render(report: StressReport, console: Any) -> None:
    """The report as a rich table, one row per scenario."""
    from rich.table import Table

    table = Table(title=f"liqmon stress: {report.accounts:,} accounts holding a position")
    for name in ("shock", "healthy", "margin call", "liquidating", "newly liquidating",
                 "unpriced", "equity", "maint. margin", "bad debt", "largest loser"):
        table.add_column(name, justify="left" if name in ("shock", "largest loser")
                         else "right")
    for s in report.scenarios:
        by_state = s.accounts_by_state
        loser = s.largest_losers[0] if s.largest_losers else None
        table.add_row(
            shock_label(s.shock), f"{by_state['HEALTHY']:,}", f"{by_state['MARGIN_CALL']:,}",
            f"{by_state['LIQUIDATING']:,}", f"{len(s.newly_liquidating):,}", f"{s.unpriced:,}",
            f"{s.equity:,.2f}", f"{s.maintenance_margin:,.2f}", f"{s.bad_debt:,.2f}",
            "" if loser is None else f"{loser['account']} −{loser['equity_loss']:,.2f}")
    console.print(table)


class PlotUnavailable(LiqmonError):
    """--plot without the optional plotting library installed."""


def pyplot() -> Any:
    """matplotlib's pyplot on the file-only Agg backend (works on servers and in CI)."""
    try:
        import matplotlib
    except ImportError:
        raise PlotUnavailable("--plot needs matplotlib, the optional 'plot' extra: "
                              "pip install 'liqmon[plot]'") from None
    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    return plt


def plot(plt: Any, report: StressReport, fractions: Sequence[float], path: str) -> None:
    """A PNG of newly liquidating accounts and bad debt against the grid's shock."""
    x = [100 * f for f in fractions]
    figure, left = plt.subplots(figsize=(9, 5))
    try:
        left.plot(x, [len(s.newly_liquidating) for s in report.scenarios], "o-",
                  color="tab:red")
        left.set_xlabel("price shock (%)")
        left.set_ylabel("accounts newly liquidating", color="tab:red")
        right = left.twinx()
        right.plot(x, [s.bad_debt for s in report.scenarios], "s--", color="tab:blue")
        right.set_ylabel("bad debt (quote currency)", color="tab:blue")
        left.set_title(f"liqmon stress: {report.accounts:,} accounts holding a position")
        left.grid(alpha=0.3)
        figure.tight_layout()
        figure.savefig(path, format="png")
    finally:
        plt.close(figure)
