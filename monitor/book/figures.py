"""What an event reports of an account (SPEC §5), computed from the book's columns in one
compiled call: the valuation with its initial margin, each position's figures, and each
position's liquidation and bankruptcy prices.

These are `margin.value_account`, `margin.position_figures`, `margin.liquidation_price` and
`margin.bankruptcy_price` term for term and in the same order (balances in config order,
positions in opening order, each expression's operations as Python evaluates them), so the
numbers are bit-identical to what the reference engine reports: numba keeps IEEE semantics
(no fastmath, no fused multiply-add). An event is built for every state change; valued in
Python, a volatile market's events spent more time on these figures than on anything else.
"""

from __future__ import annotations

import numba
import numpy as np

from monitor.book.kernels import _unpack

_jit = numba.njit(cache=True, nogil=True)

# The account's figures (`out_account`) and each position's (a row of `out_positions`).
COLLATERAL, UPNL, EQUITY, MM, IM, RATIO, UNPRICED = range(7)
ACCOUNT_FIGURES = 7
(P_INSTR, P_QTY, P_ENTRY, P_MARK, P_SETTLE, P_NOTIONAL, P_UPNL, P_MM, P_IM, P_TIER,
 P_LIQUIDATION, P_BANKRUPTCY) = range(12)
POSITION_FIGURES = 12


@_jit
def event_figures(row, out_account, out_positions, bal, isolated, first, p_next, p_instr, p_qty,
                  p_entry, sym_px, floats, ints, t_imr):
    """Fill ``out_account`` and the first rows of ``out_positions`` (one per open position, in
    opening order; a price that is None in Python is NaN here); return how many positions,
    or -1 when a settle asset has no price (the account cannot be valued)."""
    (na, a_fixed, a_weight, a_sym, i_cs, i_settle_fixed, i_settle_id, i_mark_id, t_max, t_mmr,
     t_cum, thresholds) = _unpack(floats, ints)
    collateral = 0.0
    unpriced = False
    base = row * na
    full_weight = isolated[row] != 0  # SPEC §4.1: an isolated wallet counts in full
    for a in range(na):
        balance = bal[base + a]
        if balance == 0.0:  # the balances an account holds are its non-zero ones
            continue
        px = a_fixed[a]
        if px != px:  # priced by ticks
            px = sym_px[a_sym[a]]
            if px != px:
                unpriced = True
                continue
        weight = a_weight[a] if balance > 0 and not full_weight else 1.0
        collateral += balance * px * weight
    upnl = 0.0
    mm = 0.0
    im = 0.0
    n = 0
    width = t_max.shape[1]
    p = first[row]
    while p >= 0:
        i = p_instr[p]
        spx = i_settle_fixed[i]
        if spx != spx:
            spx = sym_px[i_settle_id[i]]
            if spx != spx:
                return -1
        q = p_qty[p]
        e = p_entry[p]
        cs = i_cs[i]
        mark = sym_px[i_mark_id[i]]
        if mark != mark:  # no tick yet: marked at its entry
            mark = e
        notional = abs(q) * cs * mark
        tier = 0  # `Instrument.tier_for`: the first whose bound is ≥ notional, else the last
        while tier < width - 1 and not notional <= t_max[i, tier]:
            tier += 1
        u = q * cs * (mark - e) * spx
        m = (notional * t_mmr[i, tier] - t_cum[i, tier]) * spx
        initial = notional * t_imr[i, tier] * spx
        upnl += u
        mm += m
        im += initial
        out = out_positions[n]
        out[P_INSTR] = i
        out[P_QTY] = q
        out[P_ENTRY] = e
        out[P_MARK] = mark
        out[P_SETTLE] = spx
        out[P_NOTIONAL] = notional * spx
        out[P_UPNL] = u
        out[P_MM] = m
        out[P_IM] = initial
        out[P_TIER] = tier
        n += 1
        p = p_next[p]
    equity = collateral + upnl
    if equity > 0:
        ratio = mm / equity
    elif mm == 0:
        ratio = 0.0
    else:
        ratio = np.inf
    out_account[COLLATERAL] = collateral
    out_account[UPNL] = upnl
    out_account[EQUITY] = equity
    out_account[MM] = mm
    out_account[IM] = im
    out_account[RATIO] = ratio
    out_account[UNPRICED] = unpriced
    big_l = thresholds[1]
    for j in range(n):
        out = out_positions[j]
        i = int(out[P_INSTR])
        tier = int(out[P_TIER])
        q = out[P_QTY]
        mark = out[P_MARK]
        spx = out[P_SETTLE]
        k = i_cs[i] * spx
        other_maintenance = mm - out[P_MM]
        denominator = q * k - abs(q) * k * t_mmr[i, tier] / big_l
        price = np.nan
        if denominator != 0:
            price = (other_maintenance / big_l - t_cum[i, tier] * spx / big_l - equity
                     + q * k * mark) / denominator
        out[P_LIQUIDATION] = _positive_finite(price)
        out[P_BANKRUPTCY] = _positive_finite(mark - equity / (q * i_cs[i] * spx))
    return n


@_jit
def _positive_finite(price):
    """The price, or NaN where Python's figure is None (not a positive finite number)."""
    if price > 0 and price < np.inf:
        return price
    return np.nan
