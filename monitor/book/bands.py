"""The safe-band index: per price symbol, the bands of every account that watches it (see
`monitor.book` for the proof that decides a band's width)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np

from monitor.book import kernels
from monitor.book.tables import INF

ROOM = 64  # pending bands a symbol has room for before its segment first grows
NUMPY_SORT_FROM = 512  # bands in a merge (`SymbolBands.merge_in`)
FIRST_LIMIT = 256  # pending bands that make a merge due, until the runs grow (`merge`)
PER_SQRT_BAND = 16  # then a merge is due after this many pending bands per √(bands in the runs)


# (hi, hrow, haid, hs, lneg, lrow, laid, ls): `SymbolBands.runs`
Runs = tuple[np.ndarray, np.ndarray, np.ndarray, int, np.ndarray, np.ndarray, np.ndarray, int]
RunColumns = tuple[np.ndarray, np.ndarray, np.ndarray]  # a sorted run's: key, row, anchor id


def _view(array: np.ndarray) -> Any:
    """A memoryview for scalar reads and writes; typed Any as typeshed's holds ints only."""
    return array.data


class PendingBands:
    """The bands filed since each symbol's last merge, every symbol's in one arena, so that a
    compiled kernel can file an account's bands in the same call that values it.

    Symbol s owns columns ``start[s]`` to ``start[s] + room[s]`` of ``bounds`` (rows: lo, hi)
    and ``ids`` (rows: account row, anchor id at filing), of which the first ``count[s]`` are
    filed; ``limit[s]`` is the count at which a merge is due; ``edges`` holds the lowest upper
    bound (row 0) and the highest lower bound (row 1) among them, INF and -INF when none.
    A segment that outgrows its room moves to the free end of the arena (or grows in place if
    it is the last). When the end is reached, or merges gave back room until the segments
    hold less than a quarter of the arena (`trim`), it is compacted into one twice the size
    of their room: memory follows the bands actually pending.
    """

    __slots__ = (
        "aid_m",
        "args",
        "bounds",
        "ceil_m",
        "count",
        "count_m",
        "edges",
        "floor_m",
        "hi_m",
        "ids",
        "limit",
        "limit_m",
        "lo_m",
        "meta",
        "moved",
        "room",
        "room_m",
        "row_m",
        "start",
        "start_m",
        "top",
        "waste",
    )

    def __init__(self, symbols: int, moved: Callable[[], None] | None = None) -> None:
        """``moved``: called whenever the arena is reallocated (its owner's tables of where
        the columns are, `columns.Columns`, must follow)."""
        self.moved = moved
        self.meta = np.zeros((4, symbols), np.int64)
        self.start, self.room, self.count, self.limit = self.meta
        self.start[:] = np.arange(symbols) * ROOM
        self.room[:] = ROOM
        self.limit[:] = FIRST_LIMIT
        self.edges = np.empty((2, symbols))
        self.edges[0], self.edges[1] = INF, -INF
        self.start_m, self.room_m = _view(self.start), _view(self.room)
        self.count_m, self.limit_m = _view(self.count), _view(self.limit)
        self.floor_m, self.ceil_m = _view(self.edges[0]), _view(self.edges[1])
        self.top = symbols * ROOM  # columns past the last segment are free
        self.waste = 0  # columns left behind by segments that moved or shrank
        self._columns(max(2 * self.top, 1))

    def _columns(self, size: int) -> None:
        self.bounds = np.empty((2, size))
        self.ids = np.empty((2, size), np.int64)
        self.lo_m, self.hi_m = _view(self.bounds[0]), _view(self.bounds[1])
        self.row_m, self.aid_m = _view(self.ids[0]), _view(self.ids[1])
        self.args = (self.bounds, self.ids, self.meta, self.edges)  # as kernels take them
        if self.moved is not None:
            self.moved()

    def segment(self, s: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Views of symbol s's pending bands: (lo, hi, row, anchor id)."""
        a = self.start_m[s]
        b = a + self.count_m[s]
        return self.bounds[0, a:b], self.bounds[1, a:b], self.ids[0, a:b], self.ids[1, a:b]

    def file(self, s: int, lo: float, hi: float, row: int, aid: int) -> bool:
        """File one band; True when a merge is due."""
        n = self.count_m[s]
        if n == self.room_m[s]:
            self._make_room(s, 2 * n)
        at = self.start_m[s] + n
        self.lo_m[at] = lo
        self.hi_m[at] = hi
        self.row_m[at] = row
        self.aid_m[at] = aid
        if hi < self.floor_m[s]:
            self.floor_m[s] = hi
        if lo > self.ceil_m[s]:
            self.ceil_m[s] = lo
        self.count_m[s] = n + 1
        return n + 1 >= self.limit_m[s]

    def file_by_symbol(self, rows: np.ndarray, eps: np.ndarray, watch: np.ndarray,
                       watch_start: np.ndarray, aid: np.ndarray, sym_px: np.ndarray,
                       spans: int | None = None) -> None:
        """Re-anchor many rows and file their bands (±eps around the price of each symbol
        ``watch`` lists for them, as `kernels.evaluate_rows` does) straight into the symbols'
        segments, room made for all of them first: a tick that moves many accounts. On
        ``spans`` runs of rows on every core, if given. A merge that falls due is left to the
        symbol's next tick (`SymbolBands.overdue`)."""
        self.reserve(np.bincount(watch, minlength=len(self.count)))
        if spans is None:
            kernels.file_by_symbol(rows, eps, watch, watch_start, aid, sym_px, *self.args)
        else:
            kernels.file_by_symbol_parallel(spans, rows, eps, watch, watch_start, aid, sym_px,
                                            *self.args)

    def reserve(self, extra: np.ndarray) -> None:
        """Room for ``extra[s]`` more bands in every symbol s's segment, the arena compacted
        at most once (a bulk filing: growing one segment after another could compact it once
        for each)."""
        need = self.count + extra
        short = np.flatnonzero(need > self.room)
        if not len(short):
            return
        rooms = self.room.copy()
        rooms[short] = np.maximum(need[short], 2 * rooms[short])
        if self.top + int(rooms[short].sum()) > self.bounds.shape[1]:
            self._compact(rooms)
            return
        for s in short.tolist():
            self._make_room(s, int(rooms[s]))

    def merged(self, s: int, limit: int) -> None:
        """Symbol s's pending bands were merged: empty its segment, set its next merge's
        ``limit``, and shrink room a bulk filing blew up (given back by `trim`)."""
        self.count_m[s] = 0
        self.floor_m[s], self.ceil_m[s] = INF, -INF
        self.limit_m[s] = limit
        room = self.room_m[s]
        if room > 4 * limit:
            end = self.start_m[s] + room
            if end == self.top:
                self.top = end - room + limit
            else:
                self.waste += room - limit
            self.room_m[s] = limit

    def trim(self) -> None:
        """Give memory back when the segments hold room for less than a quarter of the
        arena."""
        if self.bounds.shape[1] > 4 * max(self.top - self.waste, len(self.count) * ROOM):
            self._compact()

    def _make_room(self, s: int, room: int) -> None:
        start, old = self.start_m[s], self.room_m[s]
        size = self.bounds.shape[1]
        if start + old == self.top and start + room <= size:  # the last segment: grow in place
            self.top = start + room
        elif self.top + room <= size:  # move to the free end
            n = self.count_m[s]
            self.bounds[:, self.top:self.top + n] = self.bounds[:, start:start + n]
            self.ids[:, self.top:self.top + n] = self.ids[:, start:start + n]
            self.start_m[s] = self.top
            self.top += room
            self.waste += old
        else:
            rooms = self.room.copy()
            rooms[s] = room
            self._compact(rooms)
            return
        self.room_m[s] = room

    def _compact(self, rooms: np.ndarray | None = None) -> None:
        """Lay the segments out end to end in fresh columns twice their total room (each
        symbol's room raised to ``rooms``, if given)."""
        if rooms is None:
            rooms = self.room.copy()
        starts = np.concatenate(([0], np.cumsum(rooms)[:-1]))
        self.top = int(rooms.sum())
        old_bounds, old_ids = self.bounds, self.ids
        self._columns(max(2 * self.top, 1))
        for s in np.flatnonzero(self.count).tolist():
            a, b, n = int(self.start[s]), int(starts[s]), int(self.count[s])
            self.bounds[:, b:b + n] = old_bounds[:, a:a + n]
            self.ids[:, b:b + n] = old_ids[:, a:a + n]
        self.start[:] = starts
        self.room[:] = rooms
        self.waste = 0

    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.bounds, self.ids, self.meta, self.edges))


class SymbolBands:
    """The bands of every account that watches one price symbol.

    Two sorted runs (by upper bound ascending, by lower bound descending) from which a tick
    consumes the prefix it crosses, plus the symbol's pending bands (`PendingBands`), filed
    since the last merge. Entries carry the account's anchor id at filing time; an entry whose
    id no longer matches the account's is stale (the account was re-anchored) and is skipped.
    ``sfloor``/``sceil`` are the lowest upper and highest lower bound in the runs; with the
    pending ones', a tick that stays strictly between them costs four comparisons.
    """

    __slots__ = ("_high", "_low", "haid", "hi", "hrow", "hs", "laid", "lneg", "lrow", "ls",
                 "pending", "s", "sceil", "sfloor", "stale")

    def __init__(self, pending: PendingBands, s: int) -> None:
        self._high, self._low = _run_columns(0), _run_columns(0)  # key, row, anchor id each
        self.hs = self.ls = 0
        self._set_ends(0, 0)
        self.pending, self.s = pending, s
        self.sfloor, self.sceil = INF, -INF
        self.stale = 0  # bands filed since the runs were last cleared of stale entries

    def _set_ends(self, hn: int, ln: int) -> None:
        """The runs as kernels take them: their columns up to where each ends (a tick has
        consumed ``hs``/``ls`` of them; the rest of the columns is room for merges)."""
        self.hi, self.hrow, self.haid = (column[:hn] for column in self._high)
        self.lneg, self.lrow, self.laid = (column[:ln] for column in self._low)

    def _sorted_edges(self) -> None:
        self.sfloor = float(self.hi[self.hs]) if self.hs < len(self.hi) else INF
        self.sceil = -float(self.lneg[self.ls]) if self.ls < len(self.lneg) else -INF

    def overdue(self) -> bool:
        """A bulk filing (`Book.anchor_many`) left more pending than a merge waits for."""
        return self.pending.count_m[self.s] > self.pending.limit_m[self.s]

    def touched(self, price: float) -> bool:
        """Whether the price touches or leaves any band here (some may be stale)."""
        pending, s = self.pending, self.s
        return not (price < self.sfloor and price < pending.floor_m[s] and price > self.sceil
                    and price > pending.ceil_m[s])

    def take(self, price: float, aid: np.ndarray) -> np.ndarray | None:
        """Remove every band the price touches or leaves; the rows whose band it was (sorted,
        unique, stale entries skipped), or None."""
        if not self.touched(price):
            return None
        rows, hs, ls = kernels.take_crossed(price, *self.runs(), self.s, *self.pending.args, aid)
        self.taken(hs, ls)
        return rows if len(rows) else None

    def runs(self) -> Runs:
        """The sorted runs as `kernels.take_crossed` takes them."""
        return (self.hi, self.hrow, self.haid, self.hs, self.lneg, self.lrow, self.laid, self.ls)

    def taken(self, hs: int, ls: int) -> None:
        """A kernel took the runs' bands up to ``hs`` and ``ls``."""
        self.hs, self.ls = hs, ls
        self._sorted_edges()

    def merge(self, aid: np.ndarray, trim: bool = True) -> None:
        """Fold the pending bands into the sorted runs (`merge_in`). Stale entries are dropped
        from the pending bands always, from the runs once they may make up half. ``trim``:
        give back the arena's idle memory now (`PendingBands.trim`; `Book.refile_all` does it
        once, after merging every symbol)."""
        self.merge_in(*self.pending.segment(self.s), aid)
        if trim:
            self.pending.trim()

    def merge_laid_out(self, rows: np.ndarray, aids: np.ndarray, lo: np.ndarray,
                       hi: np.ndarray, aid: np.ndarray) -> None:
        """Fold bands laid out outside the pending ones (`Book.refile_all`) into the runs,
        after the pending ones."""
        if self.pending.count_m[self.s]:
            self.merge(aid, trim=False)
        self.merge_in(lo, hi, rows, aids, aid)

    def merge_in(self, lo: np.ndarray, hi: np.ndarray, rows: np.ndarray, aids: np.ndarray,
                 aid: np.ndarray) -> None:
        """Fold these bands (those whose anchor id is still the row's) into the runs: sorted,
        then merged in one linear pass each (`kernels.merge_runs`). From a few hundred they
        are sorted by numpy, whose argsort beats numba's by more the more there are (2× at
        1,000 on this machine, 6× at 4,000: a widely held symbol's merge); fewer in the
        kernel, where numpy's calls would cost more than the sort."""
        if len(rows) < NUMPY_SORT_FROM:
            by_hi, by_lo = kernels.current_by_bounds(lo, hi, rows, aids, aid)
        else:
            live = np.flatnonzero(aid[rows] == aids)
            by_hi = live[np.argsort(hi[live])]
            by_lo = live[np.argsort(-lo[live])]
        self._high, self.hs, hn = _with_room(self._high, self.hs, len(self.hi), len(by_hi))
        self._low, self.ls, ln = _with_room(self._low, self.ls, len(self.lneg), len(by_lo))
        self.hs, hn, self.ls, ln, self.stale = kernels.merge_runs(
            *self._high, self.hs, hn, *self._low, self.ls, ln, lo, hi, rows, aids, by_hi, by_lo,
            aid, self.stale)
        self._high, self.hs, hn = _fitted(self._high, self.hs, hn)
        self._low, self.ls, ln = _fitted(self._low, self.ls, ln)
        self._set_ends(hn, ln)
        self._sorted_edges()
        self.pending.merged(self.s,
                            int(min(8192, max(FIRST_LIMIT,
                                            PER_SQRT_BAND * math.isqrt(hn - self.hs)))))

    def live_rows(self, aid: np.ndarray) -> np.ndarray:
        """Rows with a current band here (the accounts this symbol can move)."""
        hrow, haid = self.hrow[self.hs:], self.haid[self.hs:]
        _, _, prow, paid = self.pending.segment(self.s)
        rows = np.concatenate((hrow[aid[hrow] == haid], prow[aid[prow] == paid]))
        return np.unique(rows)

    def nbytes(self) -> int:
        """Bytes of the sorted runs' columns (the pending bands are `PendingBands.nbytes`)."""
        return sum(column.nbytes for column in (*self._high, *self._low))


def _run_columns(size: int) -> RunColumns:
    """Columns for a sorted run: key, account row, anchor id."""
    return np.empty(size, np.float64), np.empty(size, np.int32), np.empty(size, np.uint32)


def _with_room(columns: RunColumns, start: int, end: int, new: int,
               ) -> tuple[RunColumns, int, int]:
    """Columns that hold the run ``[start, end)`` and ``new`` entries more (`merge_runs`
    moves the run to their front if they do not fit after it), with the run's start and end
    in them: these if large enough, else fresh ones a quarter larger than that (a merge is a
    pass over the run anyway: growing costs about what one merge does)."""
    need = end - start + new
    if need <= len(columns[0]):
        return columns, start, end
    return _moved(columns, start, end, need + need // 4)


def _fitted(columns: RunColumns, start: int, end: int) -> tuple[RunColumns, int, int]:
    """After a merge: the run in columns no more than four times its size (a tick took most
    of it, or stale entries were pruned), so that memory follows the bands."""
    live = end - start
    if len(columns[0]) <= 4 * live + ROOM:
        return columns, start, end
    return _moved(columns, start, end, live + live // 4)


def _moved(columns: RunColumns, start: int, end: int, size: int) -> tuple[RunColumns, int, int]:
    """The run copied to the front of fresh columns of this size."""
    fresh = _run_columns(size)
    for old, column in zip(columns, fresh, strict=True):
        column[:end - start] = old[start:end]
    return fresh, 0, end - start
