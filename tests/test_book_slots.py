"""Position slots in `Book`: a new position takes the slot freed last (else a fresh one), as
the compiled kernels and Python take them alike, so that where a position lives does not
depend on which path opened it; the count of open positions follows; the columns grow when a
run opens more positions than they hold."""

from __future__ import annotations

from monitor.book import kernels
from monitor.book.store import AccountRun, Book

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
