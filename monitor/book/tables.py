"""The risk config as flat lists and padded arrays indexed by small integers, for the hot paths,
and the constants of the safe-band proof."""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from monitor.config import RiskConfig

CAP = 0.2  # largest relative move a band may allow (the tier-slope bound is computed for it)
CAP1 = 1.0 + CAP
SAFETY = 0.9  # a band allows 90 % of the provable room (TOL covers rounding)
TOL = 1e-11  # floating-point margin, relative to the magnitudes that make up F and G
INF = math.inf
NAN = math.nan


class Tables:
    """The risk config as flat lists and arrays indexed by small integers, for the hot paths."""

    def __init__(self, config: RiskConfig) -> None:
        th = config.thresholds
        self.mc, self.liq, self.h = th.margin_call, th.liquidation, th.hysteresis
        self.liq_h = th.liquidation - th.hysteresis  # as next_state computes them
        self.mc_h = th.margin_call - th.hysteresis
        self.symbols: list[str] = sorted(config.price_symbols())
        self.sym_index = {s: n for n, s in enumerate(self.symbols)}
        self.assets: list[str] = list(config.assets)
        self.asset_index = {a: n for n, a in enumerate(self.assets)}
        self.n_assets = len(self.assets)
        self.a_fixed: list[float | None] = []
        self.a_sym_id: list[int] = []
        self.a_weight: list[float] = []
        for name in self.assets:
            asset = config.assets[name]
            self.a_fixed.append(asset.fixed_price)
            self.a_sym_id.append(-1 if asset.price_symbol is None
                                 else self.sym_index[asset.price_symbol])
            self.a_weight.append(asset.collateral_weight)
        self.instruments: list[str] = list(config.instruments)
        self.instr_index = {i: n for n, i in enumerate(self.instruments)}
        self.i_cs: list[float] = []
        self.i_settle: list[int] = []
        self.i_settle_fixed: list[float | None] = []
        self.i_settle_id: list[int] = []
        self.i_mark_id: list[int] = []
        self.i_tiers: list[tuple[tuple[float, float, float, float], ...]] = []
        for name in self.instruments:
            instrument = config.instruments[name]
            settle = self.asset_index[instrument.settle]
            self.i_cs.append(instrument.contract_size)
            self.i_settle.append(settle)
            self.i_settle_fixed.append(self.a_fixed[settle])
            self.i_settle_id.append(self.a_sym_id[settle])
            self.i_mark_id.append(self.sym_index[instrument.mark_symbol])
            self.i_tiers.append(tuple((t.max_notional, t.mmr, t.imr, t.maintenance_amount)
                                      for t in instrument.tiers))
        self.v_cs = np.array(self.i_cs, dtype=np.float64)
        # what a liquidation plan needs besides (`monitor.book.figures`): each instrument's
        # liquidation fee, its place among the instruments by name (ties go by symbol)
        self.liquidation_target = th.liquidation_target
        self.i_fee = np.array([config.instruments[name].liquidation_fee
                               for name in self.instruments], np.float64)
        by_name = sorted(range(len(self.instruments)), key=self.instruments.__getitem__)
        self.i_rank = np.empty(len(self.instruments), np.int64)
        self.i_rank[by_name] = np.arange(len(self.instruments))
        self.k_thresholds = np.array([self.mc, self.liq, self.mc_h, self.liq_h], np.float64)
        # The tables compiled code reads, packed into one float and one int array
        # (`kernels._unpack` reads them back): every array a compiled call takes costs ~65 ns
        # of unboxing, several times the valuation of a small account. NaN marks an asset (or
        # settle asset) priced by ticks, -1 a fixed one's symbol id; tier tables are padded:
        # the last tier's bound is INF, tiers past an instrument's last repeat it.
        n_i = len(self.instruments)
        width = max((len(t) for t in self.i_tiers), default=1)
        t_max = np.full((n_i, width), INF)
        t_mmr = np.zeros((n_i, width))
        t_cum = np.zeros((n_i, width))
        t_imr = np.zeros((n_i, width))
        for i, tiers in enumerate(self.i_tiers):
            for k, (max_n, mmr, imr, cum) in enumerate(tiers):
                if k < len(tiers) - 1:
                    t_max[i, k] = max_n
                t_mmr[i, k], t_imr[i, k], t_cum[i, k] = mmr, imr, cum
            t_mmr[i, len(tiers):] = tiers[-1][1]
            t_imr[i, len(tiers):] = tiers[-1][2]
            t_cum[i, len(tiers):] = tiers[-1][3]
        self.t_max, self.t_mmr, self.t_cum = t_max, t_mmr, t_cum  # (instrument, tier)
        self.t_imr = t_imr  # only events report initial margin (`monitor.book.figures`)
        self.k_floats = np.concatenate((
            [NAN if f is None else f for f in self.a_fixed], self.a_weight, self.v_cs,
            [NAN if f is None else f for f in self.i_settle_fixed], t_max.ravel(),
            t_mmr.ravel(), t_cum.ravel(), self.k_thresholds)).astype(np.float64)
        self.k_ints = np.array([self.n_assets, n_i, width, *self.a_sym_id, *self.i_settle_id,
                                *self.i_mark_id, *self.i_settle], np.int64)

    def symbol_prices(self, prices: Mapping[str, float]) -> np.ndarray:
        """Current price per symbol id, NaN where there is none yet."""
        get = prices.get
        return np.array([get(s, NAN) for s in self.symbols], dtype=np.float64)



def grown(array: np.ndarray, size: int) -> np.ndarray:
    """A copy of the column with room for ``size`` rows (the new ones zero)."""
    bigger = np.zeros(size, dtype=array.dtype)
    bigger[: len(array)] = array
    return bigger
