"""`liqmon stress`: what-if price shocks over the whole book (SPEC §7). Pure: no Kafka, no I/O.

A scenario moves the last applied price p of some symbols to p·(1 + fraction), all at once; a
symbol with no price yet is not moved, and a fixed-price asset never moves. Every account
holding a position is valued under SPEC §4 at the shocked prices and its state moved one step
under SPEC §5's rule from the state it is in now; nothing in the engine changes. An isolated
position (SPEC §4.1) is a risk unit of its own, valued on its wallet without collateral weight
and reported as `account/symbol`.

The book's positions are gathered once into arrays grouped by account (each account's in
instrument order); a scenario is one compiled pass over them that reads each instrument's mark,
settle price and tier table from small per-instrument arrays and sums straight into the
account, so the only scattered reads are those tables. Each account's next state is the
engine's compiled rule.
Summation order differs from `margin.value_account`, so figures agree to rounding (1e-9
relative), not bit for bit.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from monitor.account import RiskKey, UnitKey
from monitor.book import kernels
from monitor.compiled import compiling, jit
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
        self.id_array = np.array(self.ids, dtype=object)  # lists of ids by one gather
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
        # by account, then instrument: each account's terms are summed in instrument order
        order = np.lexsort((instr, own))
        self.owner = own[order]
        self.instr = instr[order]
        self.q_cs = q[order] * t.v_cs[self.instr]
        self.entry = book.p_entry[pos][order]
        self.cost = self.q_cs * self.entry  # q·cs·e: uPnL = (q·cs·mark − cost)·spx
        self.absk = np.abs(self.q_cs)
        self.mark_id = np.array(t.i_mark_id, dtype=np.int64)
        self.settle_id = np.array(t.i_settle_id, dtype=np.int64)
        self.settle_fixed = np.array([math.nan if f is None else f for f in t.i_settle_fixed])
        # ids in sorted order once, so each scenario lists its accounts without a string sort:
        # by account, its cross margin before its isolated positions (as events are ordered)
        def event_order(k: int) -> tuple[str, bool, str]:
            key = keys[k]
            return ((key.account, True, key.symbol) if isinstance(key, UnitKey)
                    else (key, False, ""))

        self.by_id = np.array(sorted(range(n), key=event_order), dtype=np.int64)
        self.n = n

    def figures(self, sym_px: np.ndarray) -> Figures:
        """SPEC §4 equity, MM and ratio of every account at these symbol prices."""
        px = np.where(self.a_sym >= 0, sym_px[np.maximum(self.a_sym, 0)], self.a_fixed)
        collateral = self.wbal @ np.nan_to_num(px, nan=0.0)  # an unpriced asset adds 0
        mark = sym_px[self.mark_id]  # NaN: no tick yet, positions marked at their entry
        spx = np.where(self.settle_id >= 0, sym_px[np.maximum(self.settle_id, 0)],
                       self.settle_fixed)  # NaN: the account cannot be evaluated (SPEC §4)
        upnl, mm, unevaluable = _account_sums(
            self.owner, self.instr, self.q_cs, self.cost, self.absk, self.entry, mark, spx,
            self.t.t_max, self.t.t_mmr, self.t.t_cum, self.n)
        equity = collateral + upnl
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = np.where(equity > 0, mm / equity, np.where(mm == 0, 0.0, math.inf))
        return Figures(equity=equity, mm=mm, ratio=ratio, evaluable=~unevaluable)

    def next_states(self, ratio: np.ndarray) -> np.ndarray:
        """SPEC §5's rule (monitor.state.next_state) for every account at once, by the
        engine's compiled rule."""
        return kernels.next_states(self.state, ratio, self.t.k_thresholds)

    def unpriced(self, symbol: str) -> bool:
        """No tick yet: a shock leaves it where it is (not priced)."""
        return bool(np.isnan(self.prices[self.t.sym_index[symbol]]))

    def shocked_prices(self, shock: Mapping[str, float]) -> np.ndarray:
        px = self.prices.copy()
        for symbol, fraction in shock.items():
            s = self.t.sym_index[symbol]
            px[s] = px[s] * (1.0 + fraction)  # NaN (no tick yet) stays NaN: not moved
        return px


@jit
def _account_sums(owner: np.ndarray, instr: np.ndarray, q_cs: np.ndarray, cost: np.ndarray,
                   absk: np.ndarray, entry: np.ndarray, mark: np.ndarray, spx: np.ndarray,
                   t_max: np.ndarray, t_mmr: np.ndarray, t_cum: np.ndarray,
                   n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each account's uPnL and MM (SPEC §4) at instrument marks and settle prices, in one
    pass over its positions (grouped by account), and which accounts cannot be evaluated."""
    su = np.zeros(n)
    sm = np.zeros(n)
    unevaluable = np.zeros(n, np.bool_)
    last_tier = t_max.shape[1] - 1
    for k in range(owner.shape[0]):
        i = instr[k]
        a = owner[k]
        settle = spx[i]
        if settle != settle:
            unevaluable[a] = True
            continue
        price = mark[i]
        if price == price:
            notional = absk[k] * price
            su[a] += (q_cs[k] * price - cost[k]) * settle
        else:
            notional = absk[k] * entry[k]
        tier = 0
        while tier < last_tier and notional > t_max[i, tier]:
            tier += 1
        sm[a] += (notional * t_mmr[i, tier] - t_cum[i, tier]) * settle
    return su, sm, unevaluable


@jit
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
    # shocked symbols with no tick yet, which no scenario moves (SPEC §7), sorted
    not_moved: list[str]
    isolated: int = 0  # of the accounts, isolated positions (SPEC §4.1)

    def title(self) -> str:
        """What the table and the plot are of: risk units, told apart when some are isolated
        positions (an analyst reading "12 accounts" of 4 accounts would overstate exposure)."""
        if not self.isolated:
            return f"liqmon stress: {self.accounts:,} accounts holding a position"
        cross = self.accounts - self.isolated
        return (f"liqmon stress: {self.accounts:,} risk units holding a position "
                f"({cross:,} account{'s' * (cross != 1)}, {self.isolated:,} isolated "
                f"position{'s' * (self.isolated != 1)})")

    def to_json(self) -> dict[str, Any]:
        return {"accounts": self.accounts, "not_moved": self.not_moved,
                "scenarios": [scenario.to_json() for scenario in self.scenarios]}


def stress(engine: Engine, shocks: Sequence[Mapping[str, float]],
           losers: int = LOSERS) -> StressReport:
    """Evaluate each shock (symbol → fraction) over the engine's book."""
    book = StressBook(engine)
    with compiling():  # the first figures and scenario compile (or load) the kernels here
        base = book.figures(book.prices)
        scenarios = [_scenario(book, base, shock, losers) for shock in shocks[:1]]
    scenarios += [_scenario(book, base, shock, losers) for shock in shocks[1:]]
    shocked = {symbol for shock in shocks for symbol in shock}
    return StressReport(accounts=book.n, scenarios=scenarios,
                        not_moved=sorted(s for s in shocked if book.unpriced(s)),
                        isolated=sum(isinstance(key, UnitKey) for key in book.keys))



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
        newly_liquidating=book.id_array[_flagged_in_order(book.by_id, newly)].tolist(),
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

    caption = None
    if report.not_moved:
        caption = (f"not moved by any shock, no tick yet: {', '.join(report.not_moved)}")
    table = Table(title=report.title(), caption=caption)
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
        left.set_title(report.title())
        left.grid(alpha=0.3)
        figure.tight_layout()
        figure.savefig(path, format="png")
    finally:
        plt.close(figure)
