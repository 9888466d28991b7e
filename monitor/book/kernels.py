"""Compiled kernels over the book's columns: apply fills, value accounts, decide their state,
size their safe bands and file them by symbol (see `monitor.book` for the band proof). A tick
that moves thousands of accounts at once is valued and re-filed on every core.

They run as machine code through numba and are compiled once per machine: ``cache=True`` keeps
the compiled code beside this file (or under ``NUMBA_CACHE_DIR``), so only the first start after
an install pays for compilation (`warm_up` does it at once, 30–60 s with `figures.py`'s, by the
machine's load).

Fills do the arithmetic of `margin.apply_fill_to_position`. The valuation does the arithmetic
of `margin.value_account`, term for term and in the same order (balances in config order,
positions in opening order), so the ratio that decides a state is bit-identical to the one an
event reports. numba keeps IEEE semantics here (no fastmath, no fused multiply-add), which is
what makes that hold.

Arguments (the order `Book` binds them in):
- columns: bal (flat, ``n_assets`` per row), isolated (1: an isolated position's row, whose
  wallet counts without collateral weight), first, p_next, p_instr, p_qty, p_entry (and
  p_acct, the owner row, for fills);
- sym_px: the current price per symbol id, NaN before the first tick;
- tables, packed by `Tables` into floats and ints and read back by `_unpack` (a compiled call
  pays for every array it is passed): a_fixed (NaN where a tick prices the asset), a_weight,
  a_sym (-1 for fixed), i_cs, i_settle_fixed (NaN where the settle asset moves), i_settle_id
  (-1 fixed), i_mark_id, t_max, t_mmr, t_cum (tiers padded per instrument), thresholds (mc,
  liq, mc − h, liq − h); and, for fills, i_settle (each instrument's settle asset).

The calls made for every record, tick or event (`account_run`, `fill_and_evaluate`,
`evaluate_and_file`, `take_and_reevaluate`, `evaluate_and_file_rows`) take all of these as one
argument, the book's `columns.Columns` table, and hand them on as arrays.
"""

from __future__ import annotations

import math

import numba
import numpy as np
from llvmlite import ir
from numba.core import cgutils, types
from numba.core.extending import intrinsic
from numba.cpython.unsafe.numbers import trailing_zeros

from monitor.book.columns import unpack
from monitor.book.tables import CAP, CAP1, SAFETY, TOL
from monitor.compiled import jit as _jit
from monitor.compiled import jit_inline as _jit_inline
from monitor.compiled import jit_parallel as _jit_parallel
from monitor.margin import DUST

INF = math.inf
NAN = math.nan

# Rows ahead whose columns a many-row valuation asks the memory for, and (at 3/4, 1/2 and 1/4
# of that, each once the link before is in cache) whose first, second and third positions:
# the rows a tick re-values are scattered over columns far larger than the caches, and a row
# waits for its loads otherwise.
PREFETCH_ROWS = 24


@intrinsic
def _prefetch(typingctx, array, index):
    """Ask for the cache line holding ``array[index]`` to be loaded (LLVM's prefetch: for a
    read, kept close); a hint, it changes no result."""

    def codegen(context, builder, signature, args):
        array_type = signature.args[0]
        data = context.make_array(array_type)(context, builder, args[0])
        pointer = cgutils.get_item_pointer(context, builder, array_type, data, [args[1]],
                                           wraparound=False)
        byte_pointer = ir.IntType(8).as_pointer()
        flag = ir.IntType(32)
        prefetch = builder.module.declare_intrinsic(
            "llvm.prefetch", [byte_pointer],
            ir.FunctionType(ir.VoidType(), [byte_pointer, flag, flag, flag]))
        # read (0), high temporal locality (3), data cache (1)
        builder.call(prefetch, [builder.bitcast(pointer, byte_pointer), flag(0), flag(3),
                                flag(1)])
        return context.get_dummy_value()

    return types.void(array, index), codegen


@_jit
def _margin_ratio(mm, equity):
    """`margin.margin_ratio`."""
    if equity > 0:
        return mm / equity
    if mm == 0:
        return 0.0
    return INF


@_jit
def _value(row, bal, isolated, na, first, p_next, p_instr, p_qty, p_entry, a_fixed, a_weight,
           a_sym, i_cs, i_settle_fixed, i_settle_id, i_mark_id, t_max, t_mmr, t_cum, sym_px,
           watch):
    """(evaluable, ratio, equity, mm, scale, ae, be, am, bm, has_pos, watching) of one row,
    the symbol ids it watches (`_watched`, in its order) written to ``watch``: listed in the
    same walk over the row, not a second one (a fifth of a valuation's time).

    ae/be: first/second-order sensitivity of equity to a relative move ε of every moving
    price; am/bm the same for MM; scale: the magnitude of equity's terms (for the rounding
    margin)."""
    watching = 0
    collateral = 0.0
    scale = 0.0
    ae = 0.0
    be = 0.0
    am = 0.0
    bm = 0.0
    base = row * na
    full_weight = isolated[row] != 0  # SPEC §4.1: an isolated wallet counts in full
    for a in range(na):
        balance = bal[base + a]
        if balance == 0.0:
            continue
        weight = a_weight[a] if balance > 0 and not full_weight else 1.0
        fixed = a_fixed[a]
        if fixed != fixed:  # priced by ticks
            watching = _add_once(watch, watching, a_sym[a])
            px = sym_px[a_sym[a]]
            if px != px:  # no price yet: contributes 0
                continue
            term = balance * px * weight
            collateral += term
            term = abs(term)
            scale += term
            ae += term
        else:
            term = balance * fixed * weight
            collateral += term
            scale += abs(term)
    upnl = 0.0
    mm = 0.0
    evaluable = True
    p = first[row]
    has_pos = p >= 0
    width = t_max.shape[1]
    while p >= 0:
        i = p_instr[p]
        watching = _add_once(watch, watching, i_mark_id[i])
        if i_settle_id[i] >= 0:
            watching = _add_once(watch, watching, i_settle_id[i])
        spx = i_settle_fixed[i]
        moving = False
        if spx != spx:
            spx = sym_px[i_settle_id[i]]
            if spx != spx:
                evaluable = False
                p = p_next[p]
                continue
            moving = True
        q = p_qty[p]
        e = p_entry[p]
        cs = i_cs[i]
        mark = sym_px[i_mark_id[i]]
        if mark != mark:
            mark = e
        notional = abs(q) * cs * mark
        # The tier (first whose bound is ≥ notional) and the one the notional reaches grown by
        # CAP (for the slope bound), in one pass: bounds ascend, so the walk ends at the
        # first bound the grown notional does not pass.
        grown = notional * CAP1
        tier = 0
        reach = 0
        for k in range(width - 1):
            bound = t_max[i, k]
            if not grown > bound:
                break
            reach += 1
            tier += notional > bound
        u = q * cs * (mark - e) * spx
        m = (notional * t_mmr[i, tier] - t_cum[i, tier]) * spx
        upnl += u
        mm += m
        nq = notional * spx
        slope = t_mmr[i, reach] * nq
        u = abs(u)
        scale += u
        ae += nq
        am += slope
        if moving:
            ae += u
            be += nq
            am += m + slope
            bm += slope
        p = p_next[p]
    if not evaluable:
        return False, NAN, NAN, NAN, 0.0, 0.0, 0.0, 0.0, 0.0, has_pos, watching
    equity = collateral + upnl
    return (True, _margin_ratio(mm, equity), equity, mm, scale, ae, be, am, bm, has_pos,
            watching)


@_jit
def _unpack(floats, ints):
    """(na, a_fixed, a_weight, a_sym, i_cs, i_settle_fixed, i_settle_id, i_mark_id, t_max,
    t_mmr, t_cum, thresholds): views of the packed tables, in `Tables.k_floats` order."""
    na, ni, width = ints[0], ints[1], ints[2]
    cells = ni * width
    a_fixed = floats[0:na]
    a_weight = floats[na:2 * na]
    at = 2 * na
    i_cs = floats[at:at + ni]
    i_settle_fixed = floats[at + ni:at + 2 * ni]
    at += 2 * ni
    t_max = floats[at:at + cells].reshape((ni, width))
    t_mmr = floats[at + cells:at + 2 * cells].reshape((ni, width))
    t_cum = floats[at + 2 * cells:at + 3 * cells].reshape((ni, width))
    thresholds = floats[at + 3 * cells:at + 3 * cells + 4]
    a_sym = ints[3:3 + na]
    i_settle_id = ints[3 + na:3 + na + ni]
    i_mark_id = ints[3 + na + ni:3 + na + 2 * ni]
    return (na, a_fixed, a_weight, a_sym, i_cs, i_settle_fixed, i_settle_id, i_mark_id, t_max,
            t_mmr, t_cum, thresholds)


@_jit
def _fill_tables(floats, ints):
    """(na, i_cs, i_settle): what a fill needs of the packed tables (`_unpack`'s layout;
    i_settle follows i_mark_id)."""
    na, ni = ints[0], ints[1]
    return na, floats[2 * na:2 * na + ni], ints[3 + na + 2 * ni:3 + na + 3 * ni]


# `Book.slots`: how many freed slots are stacked in `Book.free_slots`, how many slots are in
# use (freed ones included: the next fresh slot), how many positions are open
SLOTS_FREE, SLOTS_USED, SLOTS_OPEN = 0, 1, 2


@_jit
def _apply_fill(row, instr, signed_qty, price, fee, slots, free_slots, bal, na, first, p_next,
                p_acct, p_instr, p_qty, p_entry, i_cs, i_settle):
    """SPEC §4 Fill with the arithmetic of `margin.apply_fill_to_position` (a close that
    leaves only float rounding is flat) and the fee. A new position takes a slot as
    `Book._take_slot` does (the caller made room for it), after the row's others; a closed
    one's slot goes on the free stack (``slots``, ``free_slots``: see `Book`)."""
    p = first[row]
    while p >= 0 and p_instr[p] != instr:
        p = p_next[p]
    realized = 0.0
    if p < 0:
        free = slots[SLOTS_FREE]
        if free > 0:  # the slot freed last
            spare = np.int64(free_slots[free - 1])
            slots[SLOTS_FREE] = free - 1
        else:
            spare = slots[SLOTS_USED]
            slots[SLOTS_USED] = spare + 1
        slots[SLOTS_OPEN] += 1
        p_acct[spare] = row
        p_instr[spare] = instr
        p_qty[spare] = signed_qty
        p_entry[spare] = price
        p_next[spare] = -1
        tail = first[row]
        if tail < 0:
            first[row] = spare
        else:  # positions keep the order in which they were opened
            while p_next[tail] >= 0:
                tail = p_next[tail]
            p_next[tail] = spare
    else:
        q = p_qty[p]
        if q == 0:
            p_qty[p] = signed_qty
            p_entry[p] = price
        else:
            e = p_entry[p]
            qty = abs(signed_qty)
            if (q > 0) == (signed_qty > 0):
                p_entry[p] = (abs(q) * e + qty * price) / (abs(q) + qty)
                p_qty[p] = q + signed_qty
            else:
                closed = min(abs(q), qty)
                realized = closed * i_cs[instr] * (price - e) * math.copysign(1.0, q)
                new_q = q + signed_qty
                if abs(new_q) <= DUST * max(abs(q), qty):  # margin.is_dust
                    if first[row] == p:
                        first[row] = p_next[p]
                    else:
                        before = first[row]
                        while p_next[before] != p:
                            before = p_next[before]
                        p_next[before] = p_next[p]
                    p_next[p] = -1
                    free_slots[slots[SLOTS_FREE]] = p
                    slots[SLOTS_FREE] += 1
                    slots[SLOTS_OPEN] -= 1
                else:
                    if (new_q > 0) != (q > 0):
                        p_entry[p] = price
                    p_qty[p] = new_q
    k = row * na + i_settle[instr]
    balance = bal[k]
    balance += realized
    balance -= fee
    bal[k] = balance


@_jit
def _next_state(state, ratio, thresholds):
    """SPEC §5: up-level first; otherwise the down-level, never above the current state."""
    mc, liq, mc_h, liq_h = thresholds[0], thresholds[1], thresholds[2], thresholds[3]
    if ratio >= liq:
        new = 2
    elif ratio >= mc:
        new = 1
    else:
        new = 0
    if new <= state:
        if ratio >= liq_h:
            new = 2
        elif ratio >= mc_h:
            new = 1
        else:
            new = 0
        if new > state:
            new = state
    return new


@_jit
def next_states(state, ratio, thresholds):
    """`_next_state` of every account at once (`liqmon stress`)."""
    out = np.empty(state.shape[0], np.int64)
    for k in range(state.shape[0]):
        out[k] = _next_state(state[k], ratio[k], thresholds)
    return out


@_jit
def _bound(limit, sign, equity, mm, scale, ae, be, am, bm, eps):
    """Shrink eps so that the ratio provably stays on its side of ``limit`` (-1: no room)."""
    room = sign * (limit * equity - mm) - TOL * (limit * scale + mm)
    if not room > 0:
        return -1.0
    lin = limit * ae + am
    quad = limit * be + bm
    if lin > 0 or quad > 0:
        bound = 2 * room / (lin + math.sqrt(lin * lin + 4 * quad * room))
        if bound < eps:
            return bound
    return eps


@_jit
def _safe_eps(state, evaluable, equity, mm, scale, ae, be, am, bm, has_pos, thresholds):
    """Largest relative move of every watched price (times SAFETY) that provably keeps the
    state; 0 when the account sits on a boundary or cannot be valued."""
    if not evaluable:
        return 0.0
    if not has_pos:  # no requirement: the ratio is 0 at any price
        return INF if state == 0 else 0.0
    eps = CAP
    if state < 2:
        up = thresholds[0] if state == 0 else thresholds[1]
        eps = _bound(up, 1.0, equity, mm, scale, ae, be, am, bm, eps)
        if eps < 0:
            return 0.0
    if state > 0:
        down = thresholds[2] if state == 1 else thresholds[3]
        eps = _bound(down, -1.0, equity, mm, scale, ae, be, am, bm, eps)
        if eps < 0:
            return 0.0
    return eps * SAFETY


@_jit
def evaluate_row(row, state, watched, bal, isolated, first, p_next, p_instr, p_qty, p_entry,
                 sym_px, tables):
    """One row: (evaluable, ratio, next state, eps for that state, how many watched symbol
    ids), the ids written to the start of ``watched`` (room for every symbol: returning an
    array would cost more than the valuation); see `evaluate_rows` and `watched_symbols`.
    ``tables``: `_unpack`'s views, made once per compiled call (each view costs a reference
    count taken and given back, ~15 ns: unpacked per record, they cost more than the
    valuation)."""
    (na, a_fixed, a_weight, a_sym, i_cs, i_settle_fixed, i_settle_id, i_mark_id, t_max, t_mmr,
     t_cum, thresholds) = tables
    ok, r, equity, mm, scale, ae, be, am, bm, has_pos, n = _value(
        row, bal, isolated, na, first, p_next, p_instr, p_qty, p_entry, a_fixed, a_weight,
        a_sym, i_cs, i_settle_fixed, i_settle_id, i_mark_id, t_max, t_mmr, t_cum, sym_px,
        watched)
    current = state[row]
    new = _next_state(current, r, thresholds) if ok else current
    return ok, r, new, _safe_eps(new, ok, equity, mm, scale, ae, be, am, bm, has_pos,
                                 thresholds), n


@_jit
def fill_and_evaluate(cols, row, instr, signed_qty, price, fee):
    """`_apply_fill`, then `evaluate_and_file` of the row: one compiled call per fill.
    Returns evaluate_and_file's six figures. (``cols``: the book's `Columns` table.)"""
    c = unpack(cols)
    return _fill_and_evaluate(row, instr, signed_qty, price, fee, c.slots, c.free_slots,
                              c.state, c.watched, c.bal, c.isolated, c.first, c.p_next,
                              c.p_instr, c.p_qty, c.p_entry, c.p_acct, c.sym_px,
                              _unpack(c.floats, c.ints), _fill_tables(c.floats, c.ints), c.aid,
                              c.bounds, c.ids, c.meta, c.edges)


@_jit
def _fill_and_evaluate(row, instr, signed_qty, price, fee, slots, free_slots, state, watched,
                       bal, isolated, first, p_next, p_instr, p_qty, p_entry, p_acct, sym_px,
                       tables, fill_tables, aid, bounds, ids, meta, edges):
    na, i_cs, i_settle = fill_tables
    _apply_fill(row, instr, signed_qty, price, fee, slots, free_slots, bal, na, first, p_next,
                p_acct, p_instr, p_qty, p_entry, i_cs, i_settle)
    return _evaluate_and_file(row, state, watched, bal, isolated, first, p_next, p_instr, p_qty,
                              p_entry, sym_px, tables, aid, bounds, ids, meta, edges)


FILL, BALANCE = 0, 1  # `account_run` operations
RUN_PREFETCH = 16  # records of a run whose accounts `account_run` asks the memory for at once


@_jit
def account_run(cols, table, start, end):
    """Records that change one account each, columns ``start`` to ``end`` of ``table`` (rows:
    op, account row, code, amount, price, fee; `AccountRun`) in turn: a FILL
    (`fill_and_evaluate`: instrument ``code``, signed quantity ``amount``, price, fee) or a
    BALANCE change (``amount`` added to asset ``code``, as `Book.add_balance` adds it, then
    `evaluate_and_file`); position slots are taken and freed as `_apply_fill` does (the
    caller made room for a new position per record), each record's account marked in
    ``dirty`` (`Book.dirty`). Stops after the first whose outcome
    needs more than this: a state to move (or an account it cannot value), bands that did not
    fit, or an account left with no position and no balance (it may be blank). Returns the
    index it stopped at (``end`` if none) and that record's six figures. (``cols``: the
    book's `Columns` table.)"""
    c = unpack(cols)
    dirty, slots, free_slots, state, watched, bal, isolated, first = (
        c.dirty, c.slots, c.free_slots, c.state, c.watched, c.bal, c.isolated, c.first)
    p_next, p_instr, p_qty, p_entry, p_acct, sym_px, floats, ints = (
        c.p_next, c.p_instr, c.p_qty, c.p_entry, c.p_acct, c.sym_px, c.floats, c.ints)
    aid, bounds, ids, meta, edges = c.aid, c.bounds, c.ids, c.meta, c.edges
    na = ints[0]
    tables, fill_tables = _unpack(floats, ints), _fill_tables(floats, ints)
    rows = table[1]
    _prefetch_run(rows, start, end, first, bal, na, state, isolated, aid, p_instr, p_qty,
                  p_entry, p_next)
    for k in range(start, end):
        _prefetch_run_ahead(rows, k, end, first, bal, na, state, isolated, aid, p_instr, p_qty,
                            p_entry, p_next)
        row = np.int64(table[1, k])
        code = np.int64(table[2, k])
        dirty[row] = True
        if table[0, k] == FILL:
            ok, r, new, eps, n, filed = _fill_and_evaluate(
                row, code, table[3, k], table[4, k], table[5, k], slots, free_slots, state,
                watched, bal, isolated, first, p_next, p_instr, p_qty, p_entry, p_acct, sym_px,
                tables, fill_tables, aid, bounds, ids, meta, edges)
        else:
            at = row * na + code
            bal[at] = bal[at] + table[3, k]
            ok, r, new, eps, n, filed = _evaluate_and_file(
                row, state, watched, bal, isolated, first, p_next, p_instr, p_qty, p_entry,
                sym_px, tables, aid, bounds, ids, meta, edges)
        if (not filed or not ok or new != state[row]
                or (first[row] < 0 and _no_balance(bal, row, na))):
            return k, ok, r, new, eps, n, filed
    return end, True, 0.0, 0, 0.0, 0, True


@_jit_inline
def _prefetch_run(rows, start, end, first, bal, na, state, isolated, aid, p_instr, p_qty,
                  p_entry, p_next):
    """Before accounts ``rows[start:end]`` are valued in turn (account rows as numbers of any
    type): ask the memory for the columns of the first `RUN_PREFETCH` and the first positions
    of half as many. They are scattered over the book, and this way their misses overlap
    instead of each account waiting for its own (a hint; it changes no result)."""
    for k in range(start, min(end, start + RUN_PREFETCH)):
        _prefetch_account(np.int64(rows[k]), first, bal, na, state, isolated, aid)
    for k in range(start, min(end, start + RUN_PREFETCH // 2)):
        _prefetch_positions(first[np.int64(rows[k])], p_instr, p_qty, p_entry, p_next)


@_jit_inline
def _prefetch_run_ahead(rows, k, end, first, bal, na, state, isolated, aid, p_instr, p_qty,
                        p_entry, p_next):
    """`_prefetch_run` kept ahead while account ``rows[k]`` is valued: the columns of the one
    `RUN_PREFETCH` further, the first position of the one half as far."""
    if k + RUN_PREFETCH < end:
        _prefetch_account(np.int64(rows[k + RUN_PREFETCH]), first, bal, na, state, isolated,
                          aid)
    if k + RUN_PREFETCH // 2 < end:
        _prefetch_positions(first[np.int64(rows[k + RUN_PREFETCH // 2])], p_instr, p_qty,
                            p_entry, p_next)


@_jit_inline
def _prefetch_account(row, first, bal, na, state, isolated, aid=None):
    """Ask for the columns of one account that valuing it reads first (and its anchor id,
    given ``aid``, for filing its bands)."""
    _prefetch(first, row)
    _prefetch(bal, row * na)
    _prefetch(state, row)
    _prefetch(isolated, row)
    if aid is not None:
        _prefetch(aid, row)


@_jit_inline
def _prefetch_positions(p, p_instr, p_qty, p_entry, p_next):
    """Ask for the columns of position ``p`` (none if -1): an account's first position, its
    others in the same cache lines where they sit side by side (`monitor.book.compaction`)."""
    if p >= 0:
        _prefetch(p_instr, p)
        _prefetch(p_qty, p)
        _prefetch(p_entry, p)
        _prefetch(p_next, p)


@_jit_inline
def _prefetch_link(p, depth, p_instr, p_qty, p_entry, p_next):
    """`_prefetch_positions` of the position ``depth`` links after ``p`` (none if the list
    ends first)."""
    for _ in range(depth):
        if p < 0:
            return
        p = p_next[p]
    _prefetch_positions(p, p_instr, p_qty, p_entry, p_next)


@_jit
def _no_balance(bal, row, na):
    for at in range(row * na, row * na + na):  # noqa: SIM110 - compiled: a loop, not a generator
        if bal[at] != 0.0:
            return False
    return True


@_jit
def evaluate_and_file(cols, row):
    """`evaluate_row`, then `file_bands` with the eps it found: evaluate_row's five figures
    and whether the bands were filed. (``cols``: the book's `Columns` table.)"""
    c = unpack(cols)
    return _evaluate_and_file(row, c.state, c.watched, c.bal, c.isolated, c.first, c.p_next,
                              c.p_instr, c.p_qty, c.p_entry, c.sym_px, _unpack(c.floats, c.ints),
                              c.aid, c.bounds, c.ids, c.meta, c.edges)


@_jit
def _evaluate_and_file(row, state, watched, bal, isolated, first, p_next, p_instr, p_qty,
                       p_entry, sym_px, tables, aid, bounds, ids, meta, edges):
    ok, r, new, eps, n = evaluate_row(row, state, watched, bal, isolated, first, p_next, p_instr,
                                      p_qty, p_entry, sym_px, tables)
    filed = file_bands(row, eps, watched[:n], aid, sym_px, bounds, ids, meta, edges)
    return ok, r, new, eps, n, filed


@_jit
def file_bands(row, eps, syms, aid, sym_px, bounds, ids, meta, edges):
    """Re-anchor one row and file its band of ±eps around the price of every symbol in
    ``syms`` in the pending bands (`PendingBands`' layout); an unpriced symbol gets the empty
    band (INF, -INF). Files nothing and returns False when a symbol's segment is full or its
    merge would be due: `Book.anchor` then makes room, and merges."""
    for k in range(syms.shape[0]):
        s = syms[k]
        if meta[2, s] >= meta[1, s] or meta[2, s] + 1 >= meta[3, s]:
            return False
    new_aid = _reanchor(aid, row)
    down = 1.0 - eps
    up = 1.0 + eps
    for k in range(syms.shape[0]):
        s = syms[k]
        lo, hi = _band(sym_px[s], down, up)
        at = meta[0, s] + meta[2, s]
        bounds[0, at] = lo
        bounds[1, at] = hi
        ids[0, at] = row
        ids[1, at] = new_aid
        meta[2, s] += 1
        if hi < edges[0, s]:
            edges[0, s] = hi
        if lo > edges[1, s]:
            edges[1, s] = lo
    return True


@_jit
def _reanchor(aid, row):
    """Bump the row's anchor id (wrapping at 2³²), making its filed bands stale; the new id."""
    new_aid = (np.int64(aid[row]) + 1) & 0xFFFFFFFF
    aid[row] = new_aid
    return new_aid


@_jit
def _band(price, down, up):
    """(lo, hi) of a band ±eps around ``price`` (``down`` = 1 − eps, ``up`` = 1 + eps); the
    empty band (INF, -INF) for a symbol without a price (NaN): its first tick re-values."""
    if price == price:
        return price * down, price * up
    return INF, -INF


@_jit
def file_rows(rows, eps, watch, watch_start, aid, sym_px, bounds, ids, meta, edges):
    """`file_bands` of each row in turn (the symbols `evaluate_rows` listed); returns how many
    rows were filed before one did not fit (all: ``rows.shape[0]``)."""
    for k in range(rows.shape[0]):
        if not file_bands(rows[k], eps[k], watch[watch_start[k]:watch_start[k + 1]], aid,
                          sym_px, bounds, ids, meta, edges):
            return k
    return rows.shape[0]


@_jit
def _evaluate_span(rows, start, stop, decide, state, bal, isolated, na, first, p_next, p_instr,
                   p_qty, p_entry, a_fixed, a_weight, a_sym, i_cs, i_settle_fixed,
                   i_settle_id, i_mark_id, t_max, t_mmr, t_cum, thresholds, sym_px,
                   evaluable, ratio, new_state, eps, watch_start, watch, at):
    """Evaluate ``rows[start:stop]`` into the outputs, listing their watched symbol ids in
    ``watch`` from ``at``. Stops before a row for which ``watch`` may lack room (one slot per
    symbol); returns (the next row's index, the next free slot)."""
    n_symbols = sym_px.shape[0]
    # The rows the loop below reaches before its own prefetches do (all of them, for the few
    # accounts a typical tick re-values): asked for at once.
    for k in range(start, min(stop, start + PREFETCH_ROWS)):
        _prefetch_account(rows[k], first, bal, na, state, isolated)
    for k in range(start, min(stop, start + 3 * PREFETCH_ROWS // 4)):
        _prefetch_positions(first[rows[k]], p_instr, p_qty, p_entry, p_next)
    for k in range(start, stop):
        if at + n_symbols > watch.shape[0]:
            return k, at
        if k + PREFETCH_ROWS < stop:
            _prefetch_account(rows[k + PREFETCH_ROWS], first, bal, na, state, isolated)
        # An account's positions, one link further at each nearer row (its first position at
        # 3/4 of the way, the next at 1/2, the third at 1/4): each link is read from a line
        # asked for a few rows before. After a while of trading an account's positions sit
        # wherever a slot was free, and walking them cold was most of an old book's valuation.
        for depth in range(3):
            ahead = k + (3 - depth) * PREFETCH_ROWS // 4
            if ahead < stop:
                _prefetch_link(first[rows[ahead]], depth, p_instr, p_qty, p_entry, p_next)
        row = rows[k]
        ok, r, equity, mm, scale, ae, be, am, bm, has_pos, watching = _value(
            row, bal, isolated, na, first, p_next, p_instr, p_qty, p_entry, a_fixed, a_weight,
            a_sym, i_cs, i_settle_fixed, i_settle_id, i_mark_id, t_max, t_mmr, t_cum, sym_px,
            watch[at:])
        current = state[row]
        new = _next_state(current, r, thresholds) if ok and decide else current
        evaluable[k] = ok
        ratio[k] = r
        new_state[k] = new
        eps[k] = _safe_eps(new, ok, equity, mm, scale, ae, be, am, bm, has_pos, thresholds)
        watch_start[k] = at
        at += watching
    return stop, at


@_jit
def _spans_of(n, spans):
    """First and end index of each of ``spans`` runs cutting range(n) (the last ones may be
    empty)."""
    per = (n + spans - 1) // spans
    starts = np.minimum(np.arange(spans) * per, n)
    return starts, np.minimum(starts + per, n)


@_jit
def _outputs(n):
    return (np.empty(n, np.bool_), np.empty(n, np.float64), np.empty(n, np.int8),
            np.empty(n, np.float64), np.empty(n + 1, np.int64))


@_jit
def evaluate_rows(rows, decide, state, bal, isolated, first, p_next, p_instr, p_qty, p_entry,
                  sym_px, floats, ints):
    """Value each row, decide its next state and size its band for that state.

    Returns (evaluable, ratio, new_state, eps) per row and the rows' watched symbol ids,
    end to end (row k's are ``watch[watch_start[k]:watch_start[k + 1]]``). A row that cannot
    be valued keeps its state and gets eps 0 (re-evaluated on every tick of its symbols). With
    ``decide`` off every row keeps its state (indexing a restored book moves nothing)."""
    (na, a_fixed, a_weight, a_sym, i_cs, i_settle_fixed, i_settle_id, i_mark_id, t_max, t_mmr,
     t_cum, thresholds) = _unpack(floats, ints)
    n = rows.shape[0]
    evaluable, ratio, new_state, eps, watch_start = _outputs(n)
    watch = np.empty(4 * n + sym_px.shape[0], np.int64)
    k, used = 0, 0
    while True:
        k, used = _evaluate_span(
            rows, k, n, decide, state, bal, isolated, na, first, p_next, p_instr, p_qty,
            p_entry, a_fixed, a_weight, a_sym, i_cs, i_settle_fixed, i_settle_id, i_mark_id,
            t_max, t_mmr, t_cum, thresholds, sym_px, evaluable, ratio, new_state, eps,
            watch_start, watch, used)
        if k == n:
            break
        bigger = np.empty(2 * watch.shape[0], np.int64)
        bigger[:used] = watch[:used]
        watch = bigger
    watch_start[n] = used
    return evaluable, ratio, new_state, eps, watch[:used], watch_start


WATCH_ROOM = 8  # watched-id slots per row a parallel span reserves (rows watch ~4 on average)


@_jit_parallel
def evaluate_rows_parallel(spans, rows, decide, state, bal, isolated, first, p_next, p_instr,
                           p_qty, p_entry, sym_px, floats, ints):
    """`evaluate_rows` on every core, for the ticks that move many accounts at once: the rows
    are cut into ``spans`` (a few per thread), each listing its watched ids in a region of its
    own, then packed end to end. Each row is computed exactly as the serial kernel computes
    it. Should a span run out of room (rows watching twice the usual), the serial kernel does
    the whole call."""
    (na, a_fixed, a_weight, a_sym, i_cs, i_settle_fixed, i_settle_id, i_mark_id, t_max, t_mmr,
     t_cum, thresholds) = _unpack(floats, ints)
    n = rows.shape[0]
    n_symbols = sym_px.shape[0]
    starts, stops = _spans_of(n, spans)
    regions = WATCH_ROOM * starts + np.arange(spans) * n_symbols  # each span's watch slots
    evaluable, ratio, new_state, eps, watch_start = _outputs(n)
    watch = np.empty(WATCH_ROOM * n + spans * n_symbols, np.int64)
    reached = np.empty(spans, np.int64)
    ends = np.empty(spans, np.int64)
    for c in numba.prange(spans):
        reached[c], ends[c] = _evaluate_span(
            rows, starts[c], stops[c], decide, state, bal, isolated, na, first, p_next, p_instr,
            p_qty, p_entry, a_fixed, a_weight, a_sym, i_cs, i_settle_fixed, i_settle_id,
            i_mark_id, t_max, t_mmr, t_cum, thresholds, sym_px, evaluable, ratio, new_state,
            eps, watch_start, watch[:regions[c] + WATCH_ROOM * (stops[c] - starts[c])
                                    + n_symbols], regions[c])
    if np.any(reached < stops):
        return evaluate_rows(rows, decide, state, bal, isolated, first, p_next, p_instr, p_qty,
                             p_entry, sym_px, floats, ints)
    packed = np.empty((ends - regions).sum(), np.int64)
    used = 0
    for c in range(spans):  # the regions end to end
        size = ends[c] - regions[c]
        packed[used:used + size] = watch[regions[c]:ends[c]]
        watch_start[starts[c]:stops[c]] += used - regions[c]
        used += size
    watch_start[n] = used
    return evaluable, ratio, new_state, eps, packed, watch_start


@_jit
def _watched(row, out, bal, na, first, p_next, p_instr, a_sym, i_settle_id, i_mark_id):
    """Write the distinct symbol ids that can move the row into ``out``; return how many."""
    n = 0
    base = row * na
    for a in range(na):
        s = a_sym[a]
        if s >= 0 and bal[base + a] != 0.0:
            n = _add_once(out, n, s)
    p = first[row]
    while p >= 0:
        i = p_instr[p]
        n = _add_once(out, n, i_mark_id[i])
        if i_settle_id[i] >= 0:
            n = _add_once(out, n, i_settle_id[i])
        p = p_next[p]
    return n


@_jit
def _add_once(out, n, s):
    for k in range(n):
        if out[k] == s:
            return n
    out[n] = s
    return n + 1


@_jit
def watched_symbols(row, n_symbols, bal, first, p_next, p_instr, floats, ints):
    """The symbol ids whose ticks can move one row (SPEC §6)."""
    na, _, _, a_sym, _, _, i_settle_id, i_mark_id, _, _, _, _ = _unpack(floats, ints)
    out = np.empty(n_symbols, np.int64)
    n = _watched(row, out, bal, na, first, p_next, p_instr, a_sym, i_settle_id, i_mark_id)
    return out[:n]


@_jit
def bands_by_symbol(rows, eps, watch, watch_start, aid, sym_px):
    """Re-anchor rows: bump each row's anchor id and lay out one band ±eps per (row, watched
    symbol) — the symbols `evaluate_rows` listed — grouped by symbol: (starts per symbol id
    + 1, rows, anchor ids, lo, hi, lowest hi and highest lo per symbol). An unpriced symbol
    gets the empty band (INF, -INF): its first tick re-evaluates the row."""
    n_symbols = sym_px.shape[0]
    counts = np.zeros(n_symbols + 1, np.int64)
    for x in range(watch.shape[0]):
        counts[watch[x] + 1] += 1
    starts = np.cumsum(counts)
    used = watch.shape[0]
    out_row = np.empty(used, np.int32)
    out_aid = np.empty(used, np.uint32)
    lo = np.empty(used, np.float64)
    hi = np.empty(used, np.float64)
    lowest_hi = np.full(n_symbols, INF)
    highest_lo = np.full(n_symbols, -INF)
    _lay_out(rows, 0, rows.shape[0], eps, watch, watch_start, aid, sym_px, starts[:-1].copy(),
             out_row, out_aid, lo, hi, lowest_hi, highest_lo)
    return starts, out_row, out_aid, lo, hi, lowest_hi, highest_lo


@_jit
def bands_by_symbol_parallel(spans, rows, eps, watch, watch_start, aid, sym_px):
    """`bands_by_symbol` on every core (`_lay_out_parallel`)."""
    used = watch.shape[0]
    out_row = np.empty(used, np.int32)
    out_aid = np.empty(used, np.uint32)
    lo = np.empty(used, np.float64)
    hi = np.empty(used, np.float64)
    ends, lowest_hi, highest_lo = _lay_out_parallel(
        spans, rows, eps, watch, watch_start, aid, sym_px, np.empty(0, np.int64), out_row,
        out_aid, lo, hi)
    starts = np.zeros(sym_px.shape[0] + 1, np.int64)
    starts[1:] = ends
    return starts, out_row, out_aid, lo, hi, lowest_hi, highest_lo


@_jit
def file_by_symbol(rows, eps, watch, watch_start, aid, sym_px, bounds, ids, meta, edges):
    """Re-anchor rows and file their bands (the symbols `evaluate_rows` listed) straight
    into each symbol's pending segment, after the ones there, in row order; the segments must
    have room (`PendingBands.reserve`)."""
    n_symbols = sym_px.shape[0]
    fill = meta[0] + meta[2]
    lowest_hi = np.full(n_symbols, INF)
    highest_lo = np.full(n_symbols, -INF)
    _lay_out(rows, 0, rows.shape[0], eps, watch, watch_start, aid, sym_px, fill, ids[0],
             ids[1], bounds[0], bounds[1], lowest_hi, highest_lo)
    _filed(fill, lowest_hi, highest_lo, meta, edges)


@_jit
def file_by_symbol_parallel(spans, rows, eps, watch, watch_start, aid, sym_px, bounds, ids,
                            meta, edges):
    """`file_by_symbol` on every core (`_lay_out_parallel`)."""
    ends, lowest_hi, highest_lo = _lay_out_parallel(
        spans, rows, eps, watch, watch_start, aid, sym_px, meta[0] + meta[2], ids[0], ids[1],
        bounds[0], bounds[1])
    _filed(ends, lowest_hi, highest_lo, meta, edges)


@_jit_parallel
def _lay_out_parallel(spans, rows, eps, watch, watch_start, aid, sym_px, base, out_row,
                      out_aid, lo, hi):
    """`_lay_out` of every row, cut into ``spans`` runs on every core: each run counts its
    bands per symbol, then writes them where one pass over all rows would (a symbol's bands
    in row order, span after span), from ``base[s]`` on, or, with ``base`` empty, packed
    symbol after symbol from 0. Returns where each symbol's bands end and their lowest hi
    and highest lo."""
    n_symbols = sym_px.shape[0]
    first_row, end_row = _spans_of(rows.shape[0], spans)
    counts = np.zeros((spans, n_symbols), np.int64)
    for c in numba.prange(spans):
        for x in range(watch_start[first_row[c]], watch_start[end_row[c]]):
            counts[c, watch[x]] += 1
    fill = np.empty((spans, n_symbols), np.int64)  # where each span's bands of a symbol go
    ends = np.empty(n_symbols, np.int64)
    at = 0
    for s in range(n_symbols):
        if base.shape[0]:
            at = base[s]
        for c in range(spans):
            fill[c, s] = at
            at += counts[c, s]
        ends[s] = at
    lowest = np.full((spans, n_symbols), INF)
    highest = np.full((spans, n_symbols), -INF)
    for c in numba.prange(spans):
        _lay_out(rows, first_row[c], end_row[c], eps, watch, watch_start, aid, sym_px, fill[c],
                 out_row, out_aid, lo, hi, lowest[c], highest[c])
    lowest_hi = np.empty(n_symbols, np.float64)
    highest_lo = np.empty(n_symbols, np.float64)
    for s in range(n_symbols):
        lowest_hi[s] = lowest[:, s].min()
        highest_lo[s] = highest[:, s].max()
    return ends, lowest_hi, highest_lo


@_jit
def _filed(end, lowest_hi, highest_lo, meta, edges):
    """Count what a bulk filing wrote (each segment now ends at ``end``) and widen the
    segments' edges by its bands' lowest hi and highest lo."""
    for s in range(meta.shape[1]):
        meta[2, s] = end[s] - meta[0, s]
        if lowest_hi[s] < edges[0, s]:
            edges[0, s] = lowest_hi[s]
        if highest_lo[s] > edges[1, s]:
            edges[1, s] = highest_lo[s]


@_jit
def _lay_out(rows, start, stop, eps, watch, watch_start, aid, sym_px, fill, out_row, out_aid,
             lo, hi, lowest_hi, highest_lo):
    """Bump the anchor ids of ``rows[start:stop]`` and write their bands where ``fill`` says
    each symbol's next band goes; keep each symbol's lowest hi and highest lo."""
    for k in range(start, stop):
        row = rows[k]
        new_aid = _reanchor(aid, row)
        down = 1.0 - eps[k]
        up = 1.0 + eps[k]
        for x in range(watch_start[k], watch_start[k + 1]):
            s = watch[x]
            at = fill[s]
            fill[s] = at + 1
            out_row[at] = row
            out_aid[at] = new_aid
            band_lo, band_hi = _band(sym_px[s], down, up)
            lo[at] = band_lo
            hi[at] = band_hi
            if band_hi < lowest_hi[s]:
                lowest_hi[s] = band_hi
            if band_lo > highest_lo[s]:
                highest_lo[s] = band_lo


@_jit
def current_by_bounds(lo, hi, rows, aids, aid):
    """The indexes of the bands whose anchor id is still the row's, by hi ascending and by
    lo descending (`merge_runs`'s ``by_hi`` and ``by_lo``)."""
    live = np.empty(rows.shape[0], np.int64)
    k = 0
    for j in range(rows.shape[0]):
        if aid[rows[j]] == aids[j]:
            live[k] = j
            k += 1
    live = live[:k]
    return live[np.argsort(hi[live])], live[np.argsort(-lo[live])]


@_jit
def merge_runs(hi, hrow, haid, hs, hn, lneg, lrow, laid, ls, ln, plo, phi, prow, paid, by_hi,
               by_lo, aid, stale):
    """Fold new bands (lo, hi, row, anchor id) into a symbol's two sorted runs, in place, in
    one pass each (see `SymbolBands.merge`): each run is ``[start, end)`` of its columns
    (``hs``/``hn``, ``ls``/``ln``), which hold room for the new entries after it (the
    caller's to make). ``by_hi`` and ``by_lo`` are the new entries to keep (those whose anchor
    id is current), by hi ascending and by lo descending; the runs' own stale entries are
    dropped once the bands filed since the last pruning (``stale``) may make up half of them.
    A new entry goes after the run's entries of equal key.

    Returns (hs, hn, ls, ln, stale after)."""
    stale += by_hi.shape[0]  # each band filed may have made an older one stale
    prune = stale * 2 > hn - hs
    if prune:
        stale = 0
    hs, hn = _merge_in_place(hi, hrow, haid, hs, hn, phi[by_hi], prow[by_hi], paid[by_hi], aid,
                             prune)
    ls, ln = _merge_in_place(lneg, lrow, laid, ls, ln, -plo[by_lo], prow[by_lo], paid[by_lo],
                             aid, prune)
    return hs, hn, ls, ln, stale


@_jit
def _merge_in_place(key, row, row_aid, start, end, new_key, new_row, new_aid, aid, prune):
    """Merge new entries (sorted by key) into the sorted run ``[start, end)`` of these columns,
    each after the run's entries of equal key, from the back: the merge moves an entry at most
    once and allocates nothing (a fresh run of a widely held symbol's size cost more in page faults
    than the merge). The run first moves to the front of its columns when the new entries do
    not fit after it, or with ``prune``, which drops its stale entries (anchor id no longer
    the row's) on the way. Returns the merged run's (start, end)."""
    k = new_key.shape[0]
    if prune or end + k > key.shape[0]:
        n = 0
        for i in range(start, end):
            if not prune or aid[row[i]] == row_aid[i]:
                key[n] = key[i]
                row[n] = row[i]
                row_aid[n] = row_aid[i]
                n += 1
        start, end = 0, n
    i = end - 1
    j = k - 1
    while j >= 0:  # once the new entries are placed, the run's first ones are where they were
        at = i + j + 1
        if i >= start and key[i] > new_key[j]:
            key[at] = key[i]
            row[at] = row[i]
            row_aid[at] = row_aid[i]
            i -= 1
        else:
            key[at] = new_key[j]
            row[at] = new_row[j]
            row_aid[at] = new_aid[j]
            j -= 1
    return start, end + k


@_jit
def take_crossed(price, hi, hrow, haid, hs, lneg, lrow, laid, ls, s, bounds, ids, meta, edges,
                 aid):
    """Remove every band of symbol ``s`` that ``price`` touches or leaves: the prefixes of the
    two sorted runs it crosses, and the pending bands it reaches (the rest compacted in place,
    their count and edges updated).

    Returns (rows, hs, ls): rows sorted, unique, and only those whose anchor id still matches
    (a stale entry is a re-anchored row)."""
    i, j = _crossed_runs(price, hi, hs, lneg, ls)
    out = np.empty((i - hs) + (j - ls) + meta[2, s], np.int64)
    n = _take(out, price, hrow, haid, hs, i, lrow, laid, ls, j, s, bounds, ids, meta, edges, aid)
    return _sorted_unique(out[:n], aid.shape[0]), i, j


@_jit
def _crossed_runs(price, hi, hs, lneg, ls):
    """Where the prefixes of the two sorted runs that ``price`` touches or leaves end."""
    i = hs
    end = hi.shape[0]
    while i < end and hi[i] <= price:
        i += 1
    j = ls
    end = lneg.shape[0]
    neg = -price
    while j < end and lneg[j] <= neg:
        j += 1
    return i, j


@_jit
def _take(out, price, hrow, haid, hs, i, lrow, laid, ls, j, s, bounds, ids, meta, edges, aid):
    """`take_crossed`'s removal, the rows (current entries only, in run order, not yet unique)
    written to ``out``: how many."""
    n = 0
    for k in range(hs, i):
        r = hrow[k]
        if aid[r] == haid[k]:
            out[n] = r
            n += 1
    for k in range(ls, j):
        r = lrow[k]
        if aid[r] == laid[k]:
            out[n] = r
            n += 1
    start = meta[0, s]
    kept = start
    floor = INF
    ceil = -INF
    for k in range(start, start + meta[2, s]):
        low = bounds[0, k]
        high = bounds[1, k]
        if high <= price or low >= price:
            r = ids[0, k]
            if aid[r] == ids[1, k]:
                out[n] = r
                n += 1
        else:
            if kept != k:  # (nothing moves before the first band taken)
                bounds[0, kept] = low
                bounds[1, kept] = high
                ids[0, kept] = ids[0, k]
                ids[1, kept] = ids[1, k]
            kept += 1
            if high < floor:
                floor = high
            if low > ceil:
                ceil = low
    meta[2, s] = kept - start
    edges[0, s] = floor
    edges[1, s] = ceil
    return n


@_jit
def take_and_reevaluate(cols, price, limit, hi, hrow, haid, hs, lneg, lrow, laid, ls, s):
    """`take_crossed` into ``taken`` (room for every row of the book twice: a row has one
    current band a symbol, found in both sorted runs when it is empty), then, if it took at
    most ``limit`` rows, `evaluate_and_file_rows` of them in the same call. Entering a
    compiled call costs ~70 ns an array argument, returning an array more: for the dozen
    accounts a tick in a volatile market re-values, three calls (take, value, file) and the
    numpy between them cost more than the work.

    Returns (rows taken, hs, ls) and `evaluate_and_file_rows`' five figures (where it stopped:
    -1 when more than ``limit`` rows were taken: valuing and filing them is the caller's).
    (``cols``: the book's `Columns` table; ``taken`` and ``moved`` are its.)"""
    c = unpack(cols)
    taken, moved, aid, bounds, ids, meta, edges = (c.taken, c.moved, c.aid, c.bounds, c.ids,
                                                   c.meta, c.edges)
    i, j = _crossed_runs(price, hi, hs, lneg, ls)
    n = _take(taken, price, hrow, haid, hs, i, lrow, laid, ls, j, s, bounds, ids, meta, edges,
              aid)
    n = _sort_unique_in_place(taken, n, aid.shape[0])
    if n > limit or n > moved.shape[1]:
        return n, i, j, -1, 0.0, 0, 0, 0
    stop, eps, watching, n_moved, unevaluated = _evaluate_and_file_rows(
        taken, 0, n, moved, 0, 0, c.state, c.watched, c.bal, c.isolated, c.first, c.p_next,
        c.p_instr, c.p_qty, c.p_entry, c.sym_px, _unpack(c.floats, c.ints), aid, bounds, ids,
        meta, edges)
    return n, i, j, stop, eps, watching, n_moved, unevaluated


@_jit
def _sort_unique_in_place(rows, n, n_rows):
    """Sort ``rows[:n]`` and drop repeats (an empty band, lo = hi, is taken from both runs);
    how many remain. Few by insertion, without allocating; many as `_sorted_unique`."""
    if n > 32:
        unique = _sorted_unique(rows[:n], n_rows)
        rows[:unique.shape[0]] = unique
        return unique.shape[0]
    for k in range(1, n):
        r = rows[k]
        at = k - 1
        while at >= 0 and rows[at] > r:
            rows[at + 1] = rows[at]
            at -= 1
        rows[at + 1] = r
    kept = 0
    for k in range(n):
        if kept == 0 or rows[kept - 1] != rows[k]:
            rows[kept] = rows[k]
            kept += 1
    return kept


@_jit
def evaluate_and_file_rows(cols, start, end, n_moved, unevaluated):
    """`evaluate_and_file` of ``taken[start:end]`` (the book's `Columns` table ``cols`` names
    ``taken`` and ``moved``) in turn, each row's bands filed for the
    state it moves to (before the move: its event is the caller's). A row that moves is
    written to column ``n_moved`` of ``moved`` (rows: the account row, its new state), and
    counted; one that cannot be valued counted in ``unevaluated``. Stops at a row whose bands
    did not fit (`Book.anchor` then files them, from the symbols left in ``watched``).

    Returns (where it stopped, ``end`` if it did not; that row's eps; how many symbols it
    watches; n_moved; unevaluated)."""
    c = unpack(cols)
    return _evaluate_and_file_rows(c.taken, start, end, c.moved, n_moved, unevaluated, c.state,
                                   c.watched, c.bal, c.isolated, c.first, c.p_next, c.p_instr,
                                   c.p_qty, c.p_entry, c.sym_px, _unpack(c.floats, c.ints), c.aid,
                                   c.bounds, c.ids, c.meta, c.edges)


@_jit
def _evaluate_and_file_rows(rows, start, end, moved, n_moved, unevaluated, state, watched, bal,
                            isolated, first, p_next, p_instr, p_qty, p_entry, sym_px, tables,
                            aid, bounds, ids, meta, edges):
    na = tables[0]
    _prefetch_run(rows, start, end, first, bal, na, state, isolated, aid, p_instr, p_qty,
                  p_entry, p_next)
    for k in range(start, end):
        _prefetch_run_ahead(rows, k, end, first, bal, na, state, isolated, aid, p_instr, p_qty,
                            p_entry, p_next)
        row = rows[k]
        ok, _, new, eps, n = evaluate_row(row, state, watched, bal, isolated, first, p_next,
                                          p_instr, p_qty, p_entry, sym_px, tables)
        if not ok:
            unevaluated += 1
        elif new != state[row]:
            moved[0, n_moved] = row
            moved[1, n_moved] = new
            n_moved += 1
        if not file_bands(row, eps, watched[:n], aid, sym_px, bounds, ids, meta, edges):
            return k, eps, n, n_moved, unevaluated
    return end, 0.0, 0, n_moved, unevaluated


@_jit
def _sorted_unique(rows, n_rows):
    """Sorted distinct rows: a sort for few; for many, one bit per row of the book set, then
    read back a word at a time (64 rows per step, and only the set bits of a word visited)."""
    if rows.shape[0] * 1024 < n_rows:  # measured: the sort wins below ~800 of 1,000,000 rows
        return np.unique(rows)
    words = np.zeros((n_rows + 63) >> 6, np.uint64)
    for r in rows:
        words[r >> 6] |= np.uint64(1) << np.uint64(r & 63)
    out = np.empty(rows.shape[0], np.int64)
    n = 0
    for w in range(words.shape[0]):
        word = words[w]
        while word:
            out[n] = (w << 6) + trailing_zeros(word)
            n += 1
            word &= word - np.uint64(1)  # clear the lowest set bit
    return out[:n]
