"""The engine's account book: columnar account state and the safe-band index (SPEC §4–§6 at
exchange scale).

Storage is a struct of arrays. Accounts (and isolated positions, SPEC §4.1) are rows (state,
transition counter, partition, one balance per configured asset, the head of a linked list of
positions); positions are rows of their own (account, instrument, qty, entry price, next).
Fills, valuation and band filing run as compiled kernels over the arrays (`kernels.py`), and
so do the figures an event reports (`figures.py`); the rest of the Python code that applies
inputs reads and writes them through memoryviews (~25 ns an access).

**Safe bands.** A tick must re-evaluate every account it can move (SPEC §6), but the result of
evaluating an account only matters when its state changes. After every exact evaluation the
book proves how far prices may move before the state *could* change and files the account in a
per-symbol index under a price band: a later tick re-evaluates an account only when it leaves
one of its bands. The proof (see `kernels._safe_eps`) bounds the change of

    F = U·equity − MM   (> 0 ⟺ the ratio stays below the next threshold up, U)
    G = MM − D·equity   (≥ 0 ⟺ the ratio stays at or above the threshold down, D)

when every price the account depends on moves by a relative amount of at most ε. Equity is
linear in each price; MM is piecewise linear in the mark with slope at most the largest mmr
reachable, and linear in the settle price. So |ΔF| ≤ A·ε + B·ε², and any ε with
A·ε + B·ε² < F keeps the state. The band uses 90 % of that room after subtracting a
floating-point margin (1e-11 of the magnitudes involved, far above the rounding of a valuation),
so the decision an exact evaluation would make anywhere inside the band is the same.

An account whose ratio sits on a boundary gets ε = 0 and is re-evaluated on every tick of any of
its symbols; so does one that cannot be evaluated yet (a settle asset without a price), and a
symbol without a price yet gives an empty band (its first tick always re-evaluates). Events are
always built from a from-scratch valuation (`margin.value_account`'s arithmetic, compiled), so
bands decide only *which* accounts are re-valued, never what an event says.
"""

from monitor.book.bands import PendingBands, SymbolBands
from monitor.book.store import AccountRun, Book, Verdict
from monitor.book.tables import Tables
from monitor.compiled import compiling

__all__ = ["AccountRun", "Book", "PendingBands", "SymbolBands", "Tables", "Verdict"]


def warm_up() -> float:
    """Compile (or load from numba's cache) every kernel the engine uses, by running each once
    over a one-account book, holding the compile lock (`monitor.compiled.compiling`); returns
    the seconds it took. Without it the first records pay."""
    import time

    import numpy as np

    from monitor.book import kernels
    from monitor.book.store import Evaluation
    from monitor.config import parse_config

    started = time.perf_counter()
    with compiling():
        book = Book(parse_config(_WARM_UP_RISK))
        row = book.new_row("warm-up", 0)
        book.add_balance(row, 0, 100.0)
        book.fill_and_evaluate(row, 0, 1.0, 10.0, 0.0)
        run = AccountRun()
        run.rows[0], run.amounts[0], run.prices[0] = row, 1.0, 10.0  # a fill (op 0)
        run.rows[1], run.ops[1], run.amounts[1] = row, kernels.BALANCE, 5.0  # a deposit
        book.account_run(run, 0, 2)
        book.sym_px[:] = 10.0
        book.evaluate_and_file(row)
        book.liquidation_plan(row, book.event_figures(row))
        rows = np.array([row], dtype=np.int64)
        evaluation = book.evaluate(rows)
        book.anchor(row, float(evaluation.eps[0]), book.watched(row))
        book.anchor_many(rows, evaluation.eps, evaluation)  # row by row
        book.refile_all(rows, 1)  # laid out by symbol, merged straight into the runs
        # the every-core variants a shock tick takes (store.PARALLEL_ROWS)
        evaluation = Evaluation(*kernels.evaluate_rows_parallel(2, rows, True, book.state,
                                                                *book._value_args))
        kernels.bands_by_symbol_parallel(2, rows, evaluation.eps, evaluation.watch,
                                         evaluation.watch_start, book.aid, book.sym_px)
        for spans in (None, 2):  # a tick's bulk filing, serial and on every core
            book.pending.file_by_symbol(rows, evaluation.eps, evaluation.watch,
                                        evaluation.watch_start, book.aid, book.sym_px, spans)
        book.bands[0].merge(book.aid)
        book.reevaluate_crossed(0, 15.0)  # a typical tick: taken, valued and filed in one call
        kernels.evaluate_and_file_rows(book._cols, 0, 0, 0, 0)  # ...resumed after a full segment
        book.candidates(0, 20.0)
        book.start_compaction()
        book.compact_positions()
    return time.perf_counter() - started


_WARM_UP_RISK = {
    "thresholds": {"margin_call": 0.8, "liquidation": 1.0, "hysteresis": 0.05},
    "assets": {"USD": {"collateral_weight": 1.0, "price": 1.0}},
    "instruments": {"X-PERP": {"settle": "USD", "contract_size": 1.0, "tiers": [
        {"max_notional": "inf", "mmr": 0.01, "imr": 0.02}]}},
}
