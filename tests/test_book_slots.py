"""Position slots in `Book`: a new position takes the slot freed last (else a fresh one), as
the compiled kernels and Python take them alike, so that where a position lives does not
depend on which path opened it; the count of open positions follows; the columns grow when a
run opens more positions than they hold. A compaction pass moves each account's positions
side by side, row after row, and changes nothing an account holds."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from monitor.book import kernels
from monitor.book.store import AccountRun, Book
from monitor.config import parse_config
from tests.support.risk import RISK

BTC, ETH, ETHBTC = 0, 1, 2  # instrument numbers in tests.support.risk's config order


def run_of(book: Book, records: list[tuple[int, int, float]]) -> None:
    """(row, instrument, signed qty) fills at price 100, one compiled call (`account_run`)
    however many it stops at."""
    run = AccountRun()
    for j, (row, instr, qty) in enumerate(records):
        run.ops[j], run.rows[j], run.codes[j] = kernels.FILL, row, instr
        run.amounts[j], run.prices[j], run.fees[j] = qty, 100.0, 0.0
    start = 0
    while start < len(records):
        stop, _ = book.account_run(run, start, len(records))
        start = stop + 1


def slots_of(book: Book, row: int) -> list[int]:
    """The row's position slots, in opening order."""
    out, p = [], book.first_m[row]
    while p >= 0:
        out.append(p)
        p = book.next_m[p]
    return out


def test_a_position_closed_in_a_run_frees_the_slot_the_next_new_one_takes(risk) -> None:
    book = Book(risk)
    a, b = book.new_row("a", 0), book.new_row("b", 0)
    run_of(book, [(a, BTC, 1.0), (a, ETH, 2.0), (b, BTC, 3.0)])
    assert (slots_of(book, a), slots_of(book, b), book.positions) == ([0, 1], [2], 3)
    run_of(book, [(a, BTC, -1.0),  # closed: slot 0 freed
                  (b, ETH, 1.0)])  # takes slot 0, after b's BTC-PERP
    assert (slots_of(book, a), slots_of(book, b), book.positions) == ([1], [2, 0], 3)
    run_of(book, [(b, ETHBTC, 1.0)])  # nothing freed: a fresh slot
    assert (slots_of(book, b), book.positions) == ([2, 0, 3], 4)


def test_the_kernel_and_python_take_freed_slots_last_freed_first(risk) -> None:
    book = Book(risk)
    a = book.new_row("a", 0)
    run_of(book, [(a, BTC, 1.0), (a, ETH, 1.0), (a, ETHBTC, 1.0)])
    book.free_row(a)  # Python frees 0, 1, 2 (in the row's order): 2 is on top
    b = book.new_row("b", 0)
    run_of(book, [(b, ETH, 1.0)])
    assert slots_of(book, b) == [2]
    book.fill_and_evaluate(b, BTC, 1.0, 100.0, 0.0)  # the single-fill kernel
    assert slots_of(book, b) == [2, 1]
    c = book.new_row("c", 0)
    book._new_pos(c, BTC, 1.0, 100.0)  # Python
    assert (slots_of(book, c), book.positions) == ([0], 3)
    book._new_pos(c, ETH, 1.0, 100.0)
    assert (slots_of(book, c), book.positions) == ([0, 3], 4)


def test_a_run_that_opens_more_positions_than_the_columns_hold_grows_them(risk) -> None:
    book = Book(risk)
    capacity = book.pcap
    rows = [book.new_row(f"a{n}", 0) for n in range(capacity // 3 + 100)]
    for start in range(0, len(rows), 80):  # 240 new positions per run, up to AccountRun.SIZE
        run_of(book, [(row, instr, 1.0) for row in rows[start:start + 80]
                      for instr in (BTC, ETH, ETHBTC)])
    assert book.pcap > capacity
    assert book.positions == 3 * len(rows)
    assert slots_of(book, rows[-1]) == [3 * len(rows) - 3, 3 * len(rows) - 2, 3 * len(rows) - 1]
    assert book.p_acct[:3 * len(rows)].tolist() == [row for row in rows for _ in range(3)]


def holdings(book: Book, row: int) -> list[tuple[int, float, float]]:
    """The row's positions, in opening order, as (instrument, qty, entry)."""
    return [(int(book.p_instr[p]), float(book.p_qty[p]), float(book.p_entry[p]))
            for p in slots_of(book, row)]


def compact(book: Book, rows: int = 4096) -> int:
    """A whole compaction pass, ``rows`` rows a step; how many steps it took."""
    book.start_compaction()
    steps = 1
    while book.compact_positions(rows):
        steps += 1
    return steps


def test_compaction_lays_out_each_account_s_positions_row_after_row(risk) -> None:
    book = Book(risk)
    a, b = book.new_row("a", 0), book.new_row("b", 0)
    run_of(book, [(a, BTC, 1.0), (a, ETH, 2.0), (b, BTC, 3.0)])
    run_of(book, [(a, BTC, -1.0), (b, ETH, 4.0), (b, ETHBTC, 5.0)])
    assert (slots_of(book, a), slots_of(book, b)) == ([1], [2, 0, 3])
    assert compact(book) == 1
    assert (slots_of(book, a), slots_of(book, b)) == ([0], [1, 2, 3])
    assert holdings(book, a) == [(ETH, 2.0, 100.0)]
    assert holdings(book, b) == [(BTC, 3.0, 100.0), (ETH, 4.0, 100.0), (ETHBTC, 5.0, 100.0)]
    assert book.p_acct[:4].tolist() == [a, b, b, b]
    assert not book.compacting


def test_compaction_moves_positions_into_free_slots_and_leaves_the_free_ones_after(risk) -> None:
    book = Book(risk)
    a, b = book.new_row("a", 0), book.new_row("b", 0)
    run_of(book, [(a, BTC, 1.0), (a, ETH, 1.0), (b, BTC, 2.0), (b, ETH, 2.0)])
    run_of(book, [(a, BTC, -1.0), (a, ETH, -1.0)])  # slots 0 then 1 freed: 1 on top
    assert (slots_of(book, b), book.free_slots[:2].tolist()) == ([2, 3], [0, 1])
    compact(book)
    assert (slots_of(book, a), slots_of(book, b)) == ([], [0, 1])
    assert holdings(book, b) == [(BTC, 2.0, 100.0), (ETH, 2.0, 100.0)]
    assert sorted(book.free_slots[:book.slots[kernels.SLOTS_FREE]].tolist()) == [2, 3]
    assert book.p_next[[2, 3]].tolist() == [-1, -1]  # as a closed position's slot
    assert book.positions == 2
    run_of(book, [(a, ETHBTC, 1.0)])  # a new position still takes a free slot
    assert slots_of(book, a) in ([2], [3])


def test_compaction_trades_places_within_one_account(risk) -> None:
    """An account whose second position sits in the slot its first should move to."""
    book = Book(risk)
    a, b = book.new_row("a", 0), book.new_row("b", 0)
    run_of(book, [(b, BTC, 1.0), (a, BTC, 2.0), (a, ETH, 3.0)])  # a: [1, 2]
    run_of(book, [(b, BTC, -1.0), (a, BTC, -2.0), (a, ETHBTC, 4.0)])  # 0, 1 freed; a: [2, 1]
    assert slots_of(book, a) == [2, 1]
    compact(book)
    assert slots_of(book, a) == [0, 1]
    assert holdings(book, a) == [(ETH, 3.0, 100.0), (ETHBTC, 4.0, 100.0)]


def test_a_pass_goes_on_from_where_the_last_step_stopped(risk) -> None:
    book = Book(risk)
    rows = [book.new_row(f"a{n}", 0) for n in range(10)]
    run_of(book, [(row, BTC, 1.0) for row in reversed(rows)])  # row 9 in slot 0, …
    book.start_compaction()
    assert book.compact_positions(rows=4)
    assert [slots_of(book, row) for row in rows[:4]] == [[0], [1], [2], [3]]
    assert book.compact_positions(rows=4)
    assert not book.compact_positions(rows=4)
    assert [slots_of(book, row)[0] for row in rows] == list(range(10))


def test_a_slot_in_use_in_no_account_s_list_stops_the_pass_with_an_error(risk) -> None:
    book = Book(risk)
    a, b = book.new_row("a", 0), book.new_row("b", 0)
    run_of(book, [(b, BTC, 1.0), (a, BTC, 2.0)])
    book.p_acct[0] = a  # b's position claims to be a's: corrupt
    book.start_compaction()
    with pytest.raises(RuntimeError, match="slot 0 is in use but in no account's list"):
        book.compact_positions()
    assert not book.compacting
    assert (holdings(book, a), holdings(book, b)) == ([(BTC, 2.0, 100.0)], [(BTC, 1.0, 100.0)])


ROWS = 6
# (row, instrument, signed qty or 0 to free the row, rows a compaction step walks or 0 for
# none): steps are rare, so that trading scatters the slots in between
OPS = st.lists(st.tuples(st.integers(0, ROWS - 1), st.integers(0, 2), st.integers(-1, 1),
                         st.sampled_from((0, 0, 0, 0, 1, 4))), min_size=1, max_size=80)


@settings(max_examples=300, deadline=None)
@given(OPS)
def test_compaction_between_fills_changes_nothing_an_account_holds(ops) -> None:
    """Fills open, grow and close positions of six accounts, rows are freed and taken
    again, and compaction steps of a few rows run in between. A twin book that never compacts
    holds the same in every account after every step; a last pass that nothing interrupts
    leaves every position side by side, row after row, and the free slots after them."""
    config = parse_config(RISK)
    compacted, twin = Book(config), Book(config)
    for book in (compacted, twin):
        for n in range(ROWS):
            book.new_row(f"a{n}", 0)
    for row, instr, qty, rows in ops:
        for book in (compacted, twin):
            if qty:
                run_of(book, [(row, instr, float(qty))])
            elif book.ids[row] is not None:
                book.free_row(row)
                assert book.new_row(f"a{row}", 0) == row
        if rows:
            compacted.start_compaction()
            compacted.compact_positions(rows)
        assert [holdings(compacted, r) for r in range(ROWS)] == \
            [holdings(twin, r) for r in range(ROWS)]
        assert compacted.positions == twin.positions
        free = compacted.free_slots[:compacted.slots[kernels.SLOTS_FREE]]
        assert (compacted.p_next[free] == -1).all(), "a free slot links nowhere"
    while compacted.compact_positions(5):  # the pass under way, then one of its own
        pass
    compact(compacted, rows=5)
    open_ = compacted.positions
    laid_out = [p for row in range(ROWS) for p in slots_of(compacted, row)]
    assert laid_out == list(range(open_))
    used, stacked = compacted.slots[kernels.SLOTS_USED], compacted.slots[kernels.SLOTS_FREE]
    assert sorted(compacted.free_slots[:stacked].tolist()) == list(range(open_, used))
    assert np.array_equal(compacted.p_acct[:open_],
                          [row for row in range(ROWS) for _ in slots_of(compacted, row)])
