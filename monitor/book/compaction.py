"""Keeping each account's positions side by side in the position columns.

A new position takes the slot freed last (`kernels._apply_fill`, `Book._take_slot`), wherever
that is: after a while of trading an account's positions lie far apart, and valuing it reads
a cache line per position and column instead of one per column. At 1,000,000 accounts with
their slots in random order, a tick that re-values 100,000 holders took 2–2.5× as long as on a
freshly restored book.

A compaction pass walks the rows in order and moves each position, in its account's list
order, to the next slot: the slot's occupant (another account's position) trades places with
it, or, if the slot is free, the position moves in and leaves its old slot on the free stack.
After a pass that nothing interrupted, row r's positions follow row r − 1's, from slot 0, and
the free slots come after all of them. A pass runs a step at a time (`compact_step`, a bounded
number of rows) while the service has nothing else to do; records applied between steps are
applied as always, and the next step goes on from its cursor. What an account holds, and in
which order, never changes: only which slot holds it.
"""

from __future__ import annotations

import numpy as np

from monitor.book.columns import unpack
from monitor.book.kernels import SLOTS_FREE, SLOTS_USED
from monitor.compiled import jit as _jit
from monitor.compiled import jit_inline as _jit_inline

INCONSISTENT = -1  # `compact_step`'s row when a slot in use is in no account's list
NOWHERE = np.iinfo(np.int64).max  # `_referrer` of a slot in no list


@_jit_inline
def _referrer(s, first, p_next, p_acct):
    """What points at slot ``s`` (in use): -1 - row for its account's ``first``, else the slot
    whose ``p_next`` it is; `NOWHERE` if ``s`` is in no list of its owner's."""
    row = p_acct[s]
    p = first[row]
    if p == s:
        return -1 - row
    while p >= 0:
        nxt = p_next[p]
        if nxt == s:
            return p
        p = nxt
    return NOWHERE


@_jit_inline
def _renamed(s, a, b):
    """Slot ``s`` once slots ``a`` and ``b`` have traded contents."""
    if s == a:
        return b
    if s == b:
        return a
    return s


@_jit_inline
def _point(ref, at, a, b, first, p_next):
    """Make ``ref`` (a `_referrer`, taken before slots ``a`` and ``b`` traded contents) point
    at slot ``at``; a referrer slot that was ``a`` or ``b`` has moved to the other."""
    if ref < 0:
        first[-1 - ref] = at
    else:
        p_next[_renamed(ref, a, b)] = at


@_jit_inline
def _trade(a, b, p_next, p_acct, p_instr, p_qty, p_entry):
    """Swap the contents of slots ``a`` and ``b``, links as they are (`_point` mends what
    pointed at either)."""
    p_acct[a], p_acct[b] = p_acct[b], p_acct[a]
    p_instr[a], p_instr[b] = p_instr[b], p_instr[a]
    p_qty[a], p_qty[b] = p_qty[b], p_qty[a]
    p_entry[a], p_entry[b] = p_entry[b], p_entry[a]
    p_next[a], p_next[b] = p_next[b], p_next[a]


@_jit
def compact_step(cols, row, end, slot):
    """Walk rows ``row`` to ``end`` - 1, moving each position, in list order, to slot
    ``slot``, ``slot`` + 1, …; returns (the next row, the next slot). The next row is
    `INCONSISTENT` if a slot in use is in no account's list (it and the rest are left as they
    are), and the step stops early at the end of the slots handed out (records applied between
    steps may have closed positions the pass counted and opened others after its cursor)."""
    c = unpack(cols)
    first, p_next, p_acct, p_instr, p_qty, p_entry = (c.first, c.p_next, c.p_acct, c.p_instr,
                                                      c.p_qty, c.p_entry)
    slots, free_slots = c.slots, c.free_slots
    used = slots[SLOTS_USED]
    stacked = slots[SLOTS_FREE]
    free = np.zeros(0, np.bool_)  # which slots are free: built when first needed
    freed = np.empty(0, np.int32)  # the slots of positions moved into free ones
    moved_in = 0  # how many
    r = row
    while r < end:
        p = first[r]
        previous = -1  # the slot of the row's position before p (what points at p)
        while p >= 0:
            if slot >= used:
                end = r
                break
            if p != slot:
                if free.shape[0] == 0:
                    free = np.zeros(used, np.bool_)
                    for k in range(stacked):
                        free[free_slots[k]] = True
                    freed = np.empty(used, np.int32)
                mine = -1 - r if previous < 0 else previous
                if free[slot]:
                    p_acct[slot], p_instr[slot] = p_acct[p], p_instr[p]
                    p_qty[slot], p_entry[slot], p_next[slot] = p_qty[p], p_entry[p], p_next[p]
                    p_next[p] = -1
                    _point(mine, slot, p, slot, first, p_next)
                    free[slot] = False
                    free[p] = True
                    freed[moved_in] = p
                    moved_in += 1
                else:
                    theirs = _referrer(slot, first, p_next, p_acct)
                    if theirs == NOWHERE:
                        r, end = INCONSISTENT, INCONSISTENT
                        break
                    _trade(p, slot, p_next, p_acct, p_instr, p_qty, p_entry)
                    _point(mine, slot, p, slot, first, p_next)
                    _point(theirs, p, p, slot, first, p_next)
            previous = slot
            p = p_next[slot]
            slot += 1
        if r < end:
            r += 1
    if moved_in:  # the free stack: the slots still free, in stack order, then those freed
        kept = 0
        for k in range(stacked):
            kept = _keep_if_free(free_slots[k], free, free_slots, kept)
        for k in range(moved_in):
            kept = _keep_if_free(freed[k], free, free_slots, kept)
    return r, slot


@_jit_inline
def _keep_if_free(s, free, free_slots, kept):
    """Stack slot ``s`` at ``kept`` if it is (still) free, once; the new height."""
    if not free[s]:
        return kept
    free[s] = False
    free_slots[kept] = s
    return kept + 1
