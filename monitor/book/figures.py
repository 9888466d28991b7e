"""What an event reports of an account (SPEC §5, §5.1), computed from the book's columns in
compiled code: the valuation with its initial margin, each position's figures with its
liquidation and bankruptcy prices (`event_figures`), and a liquidating account's liquidation
plan (`liquidation_plan`).

These are `margin.value_account`, `margin.position_figures`, `margin.liquidation_price`,
`margin.bankruptcy_price` and `liquidation.liquidation_plan` term for term and in the same
order (balances in the order a Python dict of them keeps, positions in opening order, each
expression's operations as Python evaluates them), so the numbers are bit-identical to what
the reference engine reports: numba keeps IEEE semantics (no fastmath, no fused
multiply-add). An event is built for every state change; in Python, a volatile market's
events spent more time on these figures than on anything else.
"""

from __future__ import annotations

import math

import numpy as np

from monitor.book.columns import unpack
from monitor.book.kernels import _fill_tables, _margin_ratio, _unpack
from monitor.compiled import jit as _jit
from monitor.margin import DUST

# The account's figures (`out_account`) and each position's (a row of `out_positions`).
COLLATERAL, UPNL, EQUITY, MM, IM, RATIO, UNPRICED = range(7)
ACCOUNT_FIGURES = 7
(P_INSTR, P_QTY, P_ENTRY, P_MARK, P_SETTLE, P_NOTIONAL, P_UPNL, P_MM, P_IM, P_TIER,
 P_LIQUIDATION, P_BANKRUPTCY) = range(12)
POSITION_FIGURES = 12


@_jit
def event_figures(cols, row):
    """Fill the book's ``account_figures`` and the first rows of its ``position_figures``
    (one per open position, in opening order; a price that is None in Python is NaN here);
    return how many positions, or -1 when a settle asset has no price (the account cannot be
    valued). (``cols``: the book's `Columns` table.)"""
    c = unpack(cols)
    out_account, out_positions, bal, isolated, first, p_next, p_instr, p_qty, p_entry = (
        c.account_figures, c.position_figures, c.bal, c.isolated, c.first, c.p_next,
        c.p_instr, c.p_qty, c.p_entry)
    sym_px, floats, ints, t_imr = c.sym_px, c.floats, c.ints, c.t_imr
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
        tier = _tier(t_max, i, notional)
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
    ratio = _margin_ratio(mm, equity)
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
def _tier(t_max, i, notional):
    """`Instrument.tier_for`: the first tier whose bound is ≥ notional, else the last (the
    tables pad an instrument's tiers with its last, bound INF)."""
    tier = 0
    while tier < t_max.shape[1] - 1 and not notional <= t_max[i, tier]:
        tier += 1
    return tier


@_jit
def _positive_finite(price):
    """The price, or NaN where Python's figure is None (not a positive finite number)."""
    if price > 0 and price < np.inf:
        return price
    return np.nan


# A liquidation plan's figures (`out_plan`) and each step's (a row of `out_steps`).
PLAN_STEPS, PLAN_DEPOSIT, PLAN_RATIO_AFTER, PLAN_BAD_DEBT = range(4)
PLAN_FIGURES = 4
S_INSTR, S_SELL, S_QTY, S_PRICE, S_FEE, S_CLOSE, S_RATIO_AFTER = range(7)
STEP_FIGURES = 7


@_jit
def liquidation_plan(cols, row, count, target):
    """`liquidation.liquidation_plan` of the row, term for term; the book's ``account_figures``
    and the first ``count`` rows of its ``position_figures`` are its `event_figures`. Fills
    the book's ``plan`` and the first rows of its ``plan_steps`` (side 1: a sell, closing a
    long); returns the number of steps. (``cols``: the book's `Columns` table.)"""
    c = unpack(cols)
    account, positions, out_plan, out_steps, bal, isolated, sym_px = (
        c.account_figures, c.position_figures, c.plan, c.plan_steps, c.bal, c.isolated,
        c.sym_px)
    floats, ints, i_fee, i_rank = c.floats, c.ints, c.i_fee, c.i_rank
    (na, a_fixed, a_weight, a_sym, i_cs, i_settle_fixed, i_settle_id, i_mark_id, t_max, t_mmr,
     t_cum, _) = _unpack(floats, ints)
    i_settle = _fill_tables(floats, ints)[2]
    tables = (a_fixed, a_weight, a_sym, i_cs, i_settle_fixed, i_settle_id, i_mark_id, t_max,
              t_mmr, t_cum, i_settle, sym_px, isolated[row] != 0)
    equity = account[EQUITY]
    mm = account[MM]
    ratio = account[RATIO]
    deposit = mm / target - equity
    out_plan[PLAN_DEPOSIT] = deposit if deposit > 0.0 else 0.0  # max(0.0, …)
    # The account as the steps so far leave it: its balances in the order a Python dict keeps
    # them (a balance that appears goes last, one that reaches 0 leaves), its positions in
    # opening order. Each step reduces a position no step touched before, so the figures the
    # event computed stand for every position but the one being reduced.
    assets = np.empty(na + 1, np.int64)
    amounts = np.empty(na + 1, np.float64)
    held = 0
    for a in range(na):
        amount = bal[row * na + a]
        if amount != 0.0:
            assets[held] = a
            amounts[held] = amount
            held += 1
    present = np.ones(count, np.bool_)
    trial_assets = np.empty(na + 1, np.int64)
    trial_amounts = np.empty(na + 1, np.float64)
    points = np.empty(t_max.shape[1] + 1, np.float64)
    steps = 0
    if ratio > target:
        for j in _by_maintenance(count, positions, i_rank):
            p = positions[j]
            i = int(p[P_INSTR])
            q, mark, cs, fee_rate = p[P_QTY], p[P_MARK], i_cs[i], i_fee[i]
            size = abs(q)
            settle_balance = 0.0
            for b in range(held):
                if assets[b] == i_settle[i]:
                    settle_balance = amounts[b]
            # Breakpoints in (0, size]: a tier bound (the last tier has none) and where the
            # settle balance crosses 0; sorted, each once.
            points[0] = size
            n_points = 1
            for k in range(t_max.shape[1] - 1):  # past the instrument's tiers, INF: < 0
                points[n_points] = size - t_max[i, k] / (cs * mark)
                n_points += 1
            per_contract = cs * (mark - p[P_ENTRY]) * math.copysign(1.0, q)
            per_contract -= fee_rate * cs * mark
            if per_contract != 0:
                points[n_points] = -settle_balance / per_contract
                n_points += 1
            low, low_mm, low_equity = 0.0, mm, equity
            reached = False
            last = np.nan
            delta = size
            after_held, after_ratio, after_equity, after_mm, remains = held, ratio, equity, mm, 1
            for point in np.sort(points[:n_points]):
                if not (0 < point <= size) or point == last:
                    continue
                last = point
                delta = point
                after_held, after_ratio, after_equity, after_mm, remains = _after_step(
                    j, delta, fee_rate, count, positions, present, assets, amounts, held,
                    trial_assets, trial_amounts, tables)
                if after_ratio <= target:
                    f_low = low_mm - target * low_equity
                    f_point = after_mm - target * after_equity
                    if f_point <= 0:  # f is linear on [low, point] and > 0 at low: its root
                        delta = low + (point - low) * f_low / (f_low - f_point)
                        after_held, after_ratio, after_equity, after_mm, remains = _after_step(
                            j, delta, fee_rate, count, positions, present, assets, amounts,
                            held, trial_assets, trial_amounts, tables)
                    # else the target is reached only by going flat (MM 0, equity ≤ 0)
                    if remains == 0:  # a remainder within DUST: a fill closes it
                        delta = size
                        after_held, after_ratio, after_equity, after_mm, remains = \
                            _after_step(j, delta, fee_rate, count, positions, present,
                                        assets, amounts, held, trial_assets, trial_amounts,
                                        tables)
                    reached = True
                    break
                low, low_mm, low_equity = point, after_mm, after_equity
            # the account after the step: the last one valued (at delta, or the whole size)
            held = after_held
            assets[:held] = trial_assets[:held]
            amounts[:held] = trial_amounts[:held]
            present[j] = remains != 0
            ratio, equity, mm = after_ratio, after_equity, after_mm
            _record_step(out_steps[steps], i, q, delta, size, mark, cs, fee_rate, ratio)
            steps += 1
            if reached:
                break
    out_plan[PLAN_STEPS] = steps
    out_plan[PLAN_RATIO_AFTER] = ratio
    bad_debt = -equity
    out_plan[PLAN_BAD_DEBT] = bad_debt if bad_debt > 0.0 else 0.0  # max(0.0, …)
    return steps


@_jit
def _by_maintenance(count, positions, i_rank):
    """Position indices by maintenance margin, largest first; ties by symbol."""
    order = np.arange(count)
    for k in range(1, count):  # insertion sort: an account holds a few positions
        j = order[k]
        m = k
        while m > 0 and _before(positions[j], positions[order[m - 1]], i_rank):
            order[m] = order[m - 1]
            m -= 1
        order[m] = j
    return order


@_jit
def _before(a, b, i_rank):
    if a[P_MM] != b[P_MM]:
        return a[P_MM] > b[P_MM]
    return i_rank[int(a[P_INSTR])] < i_rank[int(b[P_INSTR])]


@_jit
def _after_step(j, delta, fee_rate, count, positions, present, assets, amounts, held,
                trial_assets, trial_amounts, tables):
    """`liquidation._after_step`: the account after closing ``delta`` contracts of position
    ``j`` at its mark with the liquidation fee, as a §4 fill, valued from scratch (the other
    positions' figures as they are). Its balances go to the trial arrays; returns (balances
    held, ratio, equity, MM, 1 if a remainder of the position is still open else 0)."""
    (a_fixed, a_weight, a_sym, i_cs, i_settle_fixed, i_settle_id, i_mark_id, t_max, t_mmr,
     t_cum, i_settle, sym_px, full_weight) = tables
    p = positions[j]
    i = int(p[P_INSTR])
    q, e, mark = p[P_QTY], p[P_ENTRY], p[P_MARK]
    cs = i_cs[i]
    # margin.apply_fill_to_position(position, closing, mark, cs)
    closing = -math.copysign(delta, q)
    qty = abs(closing)
    realized = 0.0
    remains = 1
    if (q > 0) == (closing > 0):
        e = (abs(q) * e + qty * mark) / (abs(q) + qty)
        q = q + closing
    else:
        closed = qty if qty < abs(q) else abs(q)  # min(abs(q), qty)
        realized = closed * cs * (mark - e) * math.copysign(1.0, q)
        new_q = q + closing
        if abs(new_q) <= DUST * (qty if qty > abs(q) else abs(q)):  # margin.is_dust
            remains = 0
        elif (new_q > 0) != (q > 0):
            e = mark
        q = new_q
    # the settle balance, kept where a dict keeps it
    settle = i_settle[i]
    balance = 0.0
    at = -1
    for b in range(held):
        trial_assets[b] = assets[b]
        trial_amounts[b] = amounts[b]
        if assets[b] == settle:
            balance = amounts[b]
            at = b
    trial_held = held
    balance = balance + realized - fee_rate * delta * cs * mark
    if balance == 0:
        if at >= 0:
            for b in range(at, held - 1):
                trial_assets[b] = trial_assets[b + 1]
                trial_amounts[b] = trial_amounts[b + 1]
            trial_held -= 1
    elif at >= 0:
        trial_amounts[at] = balance
    else:
        trial_assets[held] = settle
        trial_amounts[held] = balance
        trial_held += 1
    # margin.value_account, the other positions' figures known
    collateral = 0.0
    for b in range(trial_held):
        a = trial_assets[b]
        amount = trial_amounts[b]
        px = a_fixed[a]
        if px != px:
            px = sym_px[a_sym[a]]
            if px != px:
                continue
        weight = a_weight[a] if amount > 0 and not full_weight else 1.0
        collateral += amount * px * weight
    upnl = 0.0
    mm = 0.0
    for k in range(count):
        if k != j:
            if present[k]:
                upnl += positions[k, P_UPNL]
                mm += positions[k, P_MM]
            continue
        if remains == 0:
            continue
        # margin.position_figures of what remains
        spx = i_settle_fixed[i]
        if spx != spx:
            spx = sym_px[i_settle_id[i]]
        position_mark = sym_px[i_mark_id[i]]
        if position_mark != position_mark:
            position_mark = e
        notional = abs(q) * cs * position_mark
        tier = _tier(t_max, i, notional)
        upnl += q * cs * (position_mark - e) * spx
        mm += (notional * t_mmr[i, tier] - t_cum[i, tier]) * spx
    equity = collateral + upnl
    return trial_held, _margin_ratio(mm, equity), equity, mm, remains


@_jit
def _record_step(out, i, q, delta, size, mark, cs, fee_rate, ratio_after):
    """`liquidation._step`: closing ``delta`` of the position (qty ``q``) at its mark."""
    out[S_INSTR] = i
    out[S_SELL] = q > 0
    out[S_QTY] = delta
    out[S_PRICE] = mark
    out[S_FEE] = fee_rate * delta * cs * mark
    out[S_CLOSE] = delta == size
    out[S_RATIO_AFTER] = ratio_after
