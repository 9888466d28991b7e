"""The safe-band index: per price symbol, the bands of every account that watches it (see
`monitor.book` for the proof that decides a band's width)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from monitor.book import kernels
from monitor.book.tables import INF, grown


class SymbolBands:
    """The bands of every account that watches one price symbol.

    Two sorted runs (by upper bound ascending, by lower bound descending) from which a tick
    consumes the prefix it crosses, plus an unsorted pending buffer for bands filed since the
    last merge. Entries carry the account's anchor id at filing time; an entry whose id no
    longer matches the account's is stale (the account was re-anchored) and is skipped.
    ``floor``/``ceil`` are the lowest upper and highest lower bound anywhere, so a tick that
    stays strictly between them costs two comparisons.
    """

    __slots__ = (
        "haid",
        "hi",
        "hlo",
        "hrow",
        "hs",
        "laid",
        "limit",
        "lneg",
        "lrow",
        "ls",
        "maid",
        "mhi",
        "mlo",
        "mrow",
        "np",
        "paid",
        "pcap",
        "pceil",
        "pfloor",
        "phi",
        "plo",
        "prow",
        "sceil",
        "sfloor",
        "stale",
    )

    def __init__(self) -> None:
        empty_f, empty_i, empty_u = (np.empty(0, np.float64), np.empty(0, np.int32),
                                     np.empty(0, np.uint32))
        self.hi, self.hlo, self.hrow, self.haid = empty_f, empty_f, empty_i, empty_u
        self.lneg, self.lrow, self.laid = empty_f, empty_i, empty_u
        self.hs = self.ls = 0
        self.np = 0
        self.limit = 256
        self.plo, self.phi = np.zeros(64), np.zeros(64)
        self.prow, self.paid = np.zeros(64, np.int32), np.zeros(64, np.uint32)
        self._views()
        self.pfloor, self.pceil = INF, -INF  # over the pending buffer
        self.sfloor, self.sceil = INF, -INF  # over the sorted runs
        self.stale = 0  # bands filed since the runs were last cleared of stale entries

    def _views(self) -> None:
        # memoryviews of the pending columns for scalar writes (`Book.anchor`); typed Any as
        # typeshed's memoryview holds ints only
        self.mlo: Any = self.plo.data
        self.mhi: Any = self.phi.data
        self.mrow: Any = self.prow.data
        self.maid: Any = self.paid.data
        self.pcap = len(self.plo)

    def _grow_pending(self, need: int) -> None:
        size = max(need, 2 * len(self.plo))
        self.plo, self.phi = grown(self.plo, size), grown(self.phi, size)
        self.prow, self.paid = grown(self.prow, size), grown(self.paid, size)
        self._views()

    def _sorted_edges(self) -> None:
        self.sfloor = float(self.hi[self.hs]) if self.hs < len(self.hi) else INF
        self.sceil = -float(self.lneg[self.ls]) if self.ls < len(self.lneg) else -INF

    def push_many(self, rows: np.ndarray, aids: np.ndarray, lo: np.ndarray,
                  hi: np.ndarray, lowest_hi: float, highest_lo: float) -> bool:
        """File bands in the pending buffer (`Book.anchor` files one band inline), ``hi``'s
        least and ``lo``'s greatest given; True when the buffer is due for a merge."""
        n, k = self.np, len(rows)
        if n + k > self.pcap:
            self._grow_pending(n + k)
        self.plo[n:n + k] = lo
        self.phi[n:n + k] = hi
        self.prow[n:n + k] = rows
        self.paid[n:n + k] = aids
        if lowest_hi < self.pfloor:
            self.pfloor = lowest_hi
        if highest_lo > self.pceil:
            self.pceil = highest_lo
        self.np = n + k
        return n + k >= self.limit

    def take(self, price: float, aid: np.ndarray) -> np.ndarray | None:
        """Remove every band the price touches or leaves; the rows whose band it was (sorted,
        unique, stale entries skipped), or None."""
        if (price < self.sfloor and price < self.pfloor and price > self.sceil
                and price > self.pceil):
            return None
        rows, self.hs, self.ls, self.np, pfloor, pceil = kernels.take_crossed(
            price, self.hi, self.hrow, self.haid, self.hs, self.lneg, self.lrow, self.laid,
            self.ls, self.plo, self.phi, self.prow, self.paid, self.np, aid)
        self.pfloor, self.pceil = float(pfloor), float(pceil)
        self._sorted_edges()
        return rows if len(rows) else None

    def merge(self, aid: np.ndarray) -> None:
        """Fold the pending buffer into the sorted runs (`kernels.merge_bands`, a linear
        merge). Stale entries are dropped from the pending buffer always, from the runs once
        they may make up half."""
        (self.hi, self.hlo, self.hrow, self.haid, self.lneg, self.lrow, self.laid,
         self.stale) = kernels.merge_bands(
            self.hi, self.hlo, self.hrow, self.haid, self.hs, self.lneg, self.lrow, self.laid,
            self.ls, self.plo, self.phi, self.prow, self.paid, self.np, aid, self.stale)
        self.hs = self.ls = 0
        self.np = 0
        self.pfloor, self.pceil = INF, -INF
        self._sorted_edges()
        self.limit = int(min(8192, max(256, 16 * math.isqrt(len(self.hi)))))
        if self.pcap > 4 * self.limit:  # give back a buffer a bulk load blew up
            self.plo, self.phi = np.zeros(self.limit), np.zeros(self.limit)
            self.prow = np.zeros(self.limit, np.int32)
            self.paid = np.zeros(self.limit, np.uint32)
            self._views()

    def live_rows(self, aid: np.ndarray) -> np.ndarray:
        """Rows with a current band here (the accounts this symbol can move)."""
        hrow, haid = self.hrow[self.hs:], self.haid[self.hs:]
        n = self.np
        prow, paid = self.prow[:n], self.paid[:n]
        rows = np.concatenate((hrow[aid[hrow] == haid], prow[aid[prow] == paid]))
        return np.unique(rows)

    def entries(self) -> int:
        return len(self.hi) - self.hs + self.np

