"""The book's columns handed to a compiled call as one argument.

Entering a compiled call costs ~50–100 ns for each array it is passed (numba checks each
one's type and unpacks its buffer), and the calls a record, a tick or an event makes take two
dozen columns: an account run of no records cost 2.4 µs, more than the few records it
usually applies. A `Columns` is one int64 array holding each column's address and shape, from
which the compiled side rebuilds the arrays (`unpack`, inlined into each call: ~0.4 s more to
compile each) at no cost: one argument, ~0.2 µs.

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

from monitor.compiled import jit_inline as _jit_inline


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
def unpack(t):
    """The `BookColumns` a `Columns.table` ``t`` names, as arrays over the same memory (entry
    k at ``t[3k:3k + 3]``; written out, as a call per column costs to compile and to run)."""
    carray = numba.carray
    return BookColumns(
        carray(_pointer(t[0]), t[1], np.int8),  # state
        carray(_pointer(t[3]), t[4], np.bool_),  # dirty
        carray(_pointer(t[6]), t[7], np.uint32),  # aid
        carray(_pointer(t[9]), t[10], np.float64),  # bal
        carray(_pointer(t[12]), t[13], np.int8),  # isolated
        carray(_pointer(t[15]), t[16], np.int32),  # first
        carray(_pointer(t[18]), t[19], np.int32),  # p_next
        carray(_pointer(t[21]), t[22], np.int32),  # p_instr
        carray(_pointer(t[24]), t[25], np.float64),  # p_qty
        carray(_pointer(t[27]), t[28], np.float64),  # p_entry
        carray(_pointer(t[30]), t[31], np.int32),  # p_acct
        carray(_pointer(t[33]), t[34], np.int64),  # slots
        carray(_pointer(t[36]), t[37], np.int32),  # free_slots
        carray(_pointer(t[39]), t[40], np.float64),  # sym_px
        carray(_pointer(t[42]), t[43], np.float64),  # floats
        carray(_pointer(t[45]), t[46], np.int64),  # ints
        carray(_pointer(t[48]), t[49], np.int64),  # watched
        carray(_pointer(t[51]), t[52], np.int64),  # taken
        carray(_pointer(t[54]), (t[55], t[56]), np.int64),  # moved
        carray(_pointer(t[57]), (t[58], t[59]), np.float64),  # bounds
        carray(_pointer(t[60]), (t[61], t[62]), np.int64),  # ids
        carray(_pointer(t[63]), (t[64], t[65]), np.int64),  # meta
        carray(_pointer(t[66]), (t[67], t[68]), np.float64),  # edges
        carray(_pointer(t[69]), t[70], np.float64),  # account_figures
        carray(_pointer(t[72]), (t[73], t[74]), np.float64),  # position_figures
        carray(_pointer(t[75]), t[76], np.float64),  # plan
        carray(_pointer(t[78]), (t[79], t[80]), np.float64),  # plan_steps
        carray(_pointer(t[81]), (t[82], t[83]), np.float64),  # t_imr
        carray(_pointer(t[84]), t[85], np.float64),  # i_fee
        carray(_pointer(t[87]), t[88], np.int64),  # i_rank
    )
