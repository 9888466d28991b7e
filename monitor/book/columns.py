"""The book's columns handed to a compiled call as one argument.

Entering a compiled call costs ~50–100 ns for each array it is passed (numba checks each
one's type and unpacks its buffer), and the calls a record, a tick or an event makes take two
dozen columns: an account run of no records cost 2.4 µs, more than the few records it
usually applies. A `Columns` is one int64 array holding each column's address and shape, from
which the compiled side rebuilds the arrays (`unpack`) at no cost: one argument, ~0.2 µs.

The table holds addresses, so it must not outlive the arrays it names: a `Columns` keeps the
arrays it was built from alive, and `Book` builds a new one whenever it reallocates a column
(`Book._bind_kernels`), so a stale table would read the old column, as a stale argument tuple
would, never freed memory.
"""

from __future__ import annotations

from typing import NamedTuple

import numba
import numpy as np
from llvmlite import ir
from numba.core import types
from numba.core.extending import intrinsic

_jit_inline = numba.njit(cache=True, nogil=True, inline="always")


class BookColumns(NamedTuple):
    """The columns the compiled calls take (`Book` names them the same, `store.py`), in the
    order of their entries in the table."""

    state: np.ndarray
    dirty: np.ndarray
    aid: np.ndarray
    bal: np.ndarray
    isolated: np.ndarray
    first: np.ndarray
    p_next: np.ndarray
    p_instr: np.ndarray
    p_qty: np.ndarray
    p_entry: np.ndarray
    p_acct: np.ndarray
    slots: np.ndarray
    free_slots: np.ndarray
    sym_px: np.ndarray
    floats: np.ndarray  # `Tables.k_floats`
    ints: np.ndarray  # `Tables.k_ints`
    watched: np.ndarray
    taken: np.ndarray
    moved: np.ndarray
    bounds: np.ndarray  # `PendingBands`' four
    ids: np.ndarray
    meta: np.ndarray
    edges: np.ndarray
    account_figures: np.ndarray  # `figures.event_figures`' outputs
    position_figures: np.ndarray
    plan: np.ndarray  # `figures.liquidation_plan`'s
    plan_steps: np.ndarray
    t_imr: np.ndarray  # `Tables`' for the figures an event reports
    i_fee: np.ndarray
    i_rank: np.ndarray


# Each column's element type and dimensions, as `unpack` rebuilds it.
KINDS: tuple[tuple[type, int], ...] = (
    (np.int8, 1), (np.bool_, 1), (np.uint32, 1), (np.float64, 1), (np.int8, 1), (np.int32, 1),
    (np.int32, 1), (np.int32, 1), (np.float64, 1), (np.float64, 1), (np.int32, 1),
    (np.int64, 1), (np.int32, 1), (np.float64, 1), (np.float64, 1), (np.int64, 1),
    (np.int64, 1), (np.int64, 1), (np.int64, 2), (np.float64, 2), (np.int64, 2),
    (np.int64, 2), (np.float64, 2), (np.float64, 1), (np.float64, 2), (np.float64, 1),
    (np.float64, 2), (np.float64, 2), (np.float64, 1), (np.int64, 1),
)
_ENTRY = 3  # address, rows, columns (1 for a one-dimensional column)


class Columns:
    """The table of ``columns``' addresses and shapes, and the arrays themselves, kept alive
    with it. Each must be C-contiguous, of its kind in `KINDS`: anything else is refused here
    rather than misread in compiled code."""

    __slots__ = ("arrays", "table")

    def __init__(self, columns: BookColumns) -> None:
        self.arrays = columns
        self.table = np.empty(_ENTRY * len(columns), np.int64)
        for k, (name, array, (dtype, ndim)) in enumerate(
                zip(BookColumns._fields, columns, KINDS, strict=True)):
            if array.dtype != dtype or array.ndim != ndim or not array.flags.c_contiguous:
                raise TypeError(f"column {name}: {array.dtype}[{array.ndim}d] "
                                f"{'' if array.flags.c_contiguous else 'strided'}, "
                                f"not {np.dtype(dtype)}[{ndim}d] contiguous")
            rows, width = (array.shape[0], 1) if ndim == 1 else array.shape
            self.table[_ENTRY * k:_ENTRY * (k + 1)] = array.ctypes.data, rows, width

    def __reduce__(self) -> tuple[object, ...]:
        # a copy's table would still name the original's memory: build one for the copy
        raise TypeError("a Columns table names memory by address and cannot be copied")


@intrinsic
def _pointer(typingctx, address):
    """The int64 ``address`` as a pointer (what `numba.carray` builds an array on)."""

    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], ir.IntType(8).as_pointer())

    return types.voidptr(types.int64), codegen


@_jit_inline
def _column(table, k, dtype):
    e = _ENTRY * k
    return numba.carray(_pointer(table[e]), table[e + 1], dtype)


@_jit_inline
def _column2(table, k, dtype):
    e = _ENTRY * k
    return numba.carray(_pointer(table[e]), (table[e + 1], table[e + 2]), dtype)


@_jit_inline
def unpack(table):
    """The `BookColumns` a `Columns.table` names, as arrays over the same memory."""
    return BookColumns(
        _column(table, 0, np.int8), _column(table, 1, np.bool_), _column(table, 2, np.uint32),
        _column(table, 3, np.float64), _column(table, 4, np.int8), _column(table, 5, np.int32),
        _column(table, 6, np.int32), _column(table, 7, np.int32),
        _column(table, 8, np.float64), _column(table, 9, np.float64),
        _column(table, 10, np.int32), _column(table, 11, np.int64),
        _column(table, 12, np.int32), _column(table, 13, np.float64),
        _column(table, 14, np.float64), _column(table, 15, np.int64),
        _column(table, 16, np.int64), _column(table, 17, np.int64),
        _column2(table, 18, np.int64), _column2(table, 19, np.float64),
        _column2(table, 20, np.int64), _column2(table, 21, np.int64),
        _column2(table, 22, np.float64), _column(table, 23, np.float64),
        _column2(table, 24, np.float64), _column(table, 25, np.float64),
        _column2(table, 26, np.float64), _column2(table, 27, np.float64),
        _column(table, 28, np.float64), _column(table, 29, np.int64))
