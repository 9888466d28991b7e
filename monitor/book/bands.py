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
                  hi: np.ndarray) -> bool:
        """File bands in the pending buffer (`Book.anchor` files one band inline); True when
        the buffer is due for a merge."""
        n, k = self.np, len(rows)
        if n + k > self.pcap:
            self._grow_pending(n + k)
        self.plo[n:n + k] = lo
        self.phi[n:n + k] = hi
        self.prow[n:n + k] = rows
        self.paid[n:n + k] = aids
        self.pfloor = min(self.pfloor, float(hi.min()))
        self.pceil = max(self.pceil, float(lo.max()))
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
        """Fold the pending buffer into the sorted runs (a linear insert). Stale entries are
        dropped from the pending buffer always, from the runs once they may make up half."""
        n = self.np
        prow, paid = self.prow[:n], self.paid[:n]
        ok = aid[prow] == paid
        prow, paid = prow[ok], paid[ok]
        plo, phi = self.plo[:n][ok], self.phi[:n][ok]
        hs, ls = self.hs, self.ls
        hi, hlo, hrow, haid = self.hi[hs:], self.hlo[hs:], self.hrow[hs:], self.haid[hs:]
        lneg, lrow, laid = self.lneg[ls:], self.lrow[ls:], self.laid[ls:]
        self.stale += len(prow)  # each filed band may have made an older one stale
        if self.stale * 2 > len(hi):
            live = aid[hrow] == haid
            hi, hlo, hrow, haid = hi[live], hlo[live], hrow[live], haid[live]
            live = aid[lrow] == laid
            lneg, lrow, laid = lneg[live], lrow[live], laid[live]
            self.stale = 0
        order = np.argsort(phi)
        self.hi, self.hlo, self.hrow, self.haid = _inserted(
            (hi, hlo, hrow, haid), (phi[order], plo[order], prow[order], paid[order]))
        pneg = -plo
        order = np.argsort(pneg)
        self.lneg, self.lrow, self.laid = _inserted(
            (lneg, lrow, laid), (pneg[order], prow[order], paid[order]))
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


def _inserted(run: tuple[np.ndarray, ...], new: tuple[np.ndarray, ...]) -> tuple[np.ndarray, ...]:
    """Columns of a run sorted by its first column, with ``new`` columns (sorted the same
    way) inserted, each after the entries of equal key."""
    if not len(run[0]):  # a restore's first filing: the new entries are the run (np.insert
        return new       # takes ~0.4 s a million entries to find that out)
    at = run[0].searchsorted(new[0], "right")
    return tuple(np.insert(old, at, column) for old, column in zip(run, new, strict=True))
