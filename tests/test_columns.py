"""The book's columns as one table of addresses (`monitor.book.columns`): the compiled calls
read the book's arrays through it, so it must name exactly the arrays the book holds, after
every reallocation, and refuse a column it would misread."""

from __future__ import annotations

import copy
import pickle

import numba
import numpy as np
import pytest

from monitor.book.columns import BookColumns, Columns, unpack
from monitor.book.figures import COLLATERAL
from monitor.book.store import Book

USDT = 0  # asset number in tests.support.risk's config order


@numba.njit
def _unpacked(table):
    return unpack(table)


def test_the_table_names_every_column_the_book_holds(risk) -> None:
    book = Book(risk)
    columns = book._column_arrays()
    for name, held, rebuilt in zip(BookColumns._fields, columns, _unpacked(book._cols),
                                   strict=True):
        assert (rebuilt.dtype, rebuilt.shape) == (held.dtype, held.shape), name
        assert rebuilt.ctypes.data == held.ctypes.data, name


def test_the_table_follows_the_columns_when_they_are_reallocated(risk) -> None:
    book = Book(risk)
    before = book._column_arrays()
    rows = [book.new_row(f"a{n}", 0) for n in range(book.cap + 1)]  # the row columns grow
    book.room_for_positions(book.pcap + 1)  # the position columns
    book.pending.reserve(np.full(len(book.t.symbols), 10_000))  # the pending bands' arena
    after = book._column_arrays()
    for name in ("bal", "p_qty", "bounds", "ids"):
        assert getattr(after, name) is not getattr(before, name), name
    assert np.array_equal(book._cols, Columns(after).table)
    # and a compiled call reads the new memory: 500 USDT in a row past the old capacity
    book.add_balance(rows[-1], USDT, 500.0)
    assert book.event_figures(rows[-1]) == 0
    assert book.account_figures[COLLATERAL] == 500.0


def test_a_column_of_another_type_is_refused(risk) -> None:
    columns = Book(risk)._column_arrays()
    with pytest.raises(TypeError, match="column bal: float32"):
        Columns(columns._replace(bal=columns.bal.astype(np.float32)))


def test_a_strided_column_is_refused(risk) -> None:
    columns = Book(risk)._column_arrays()
    with pytest.raises(TypeError, match=r"column p_qty: float64\[1d\] strided"):
        Columns(columns._replace(p_qty=columns.p_qty[::2]))


def test_a_table_cannot_be_copied_with_the_addresses_of_another_s_columns(risk) -> None:
    columns = Columns(Book(risk)._column_arrays())
    for duplicate in (copy.copy, copy.deepcopy, pickle.dumps):
        with pytest.raises(TypeError, match="cannot be copied"):
            duplicate(columns)
