"""The safe-band index of one symbol (`SymbolBands`): a tick at price p takes exactly the
accounts whose current band p touches or leaves, however bands were filed, re-filed (which
makes the older band stale) and folded into the sorted runs in between. As the engine does,
every account a tick takes is re-anchored (its anchor id bumped) before it is filed again."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from monitor.book.bands import SymbolBands

ROWS = 12

# one step: ("file", row, lo, width) | ("merge",) | ("tick", price)
steps = st.lists(st.one_of(
    st.tuples(st.just("file"), st.integers(0, ROWS - 1), st.integers(80, 120),
              st.integers(0, 20)),
    st.tuples(st.just("merge")),
    st.tuples(st.just("tick"), st.integers(70, 140)),
), max_size=80)


@settings(max_examples=300, deadline=None)
@given(steps)
def test_a_tick_takes_exactly_the_current_bands_it_touches_or_leaves(program) -> None:
    bands = SymbolBands()
    aid = np.zeros(ROWS, np.uint32)
    current: dict[int, tuple[float, float]] = {}  # row -> its live band
    for step in program:
        if step[0] == "file":
            _, row, lo, width = step
            aid[row] += 1
            current[row] = (float(lo), float(lo + width))
            bands.push_many(np.array([row], np.int32), np.array([aid[row]], np.uint32),
                            np.array([float(lo)]), np.array([float(lo + width)]),
                            float(lo + width), float(lo))
        elif step[0] == "merge":
            bands.merge(aid)
        else:
            price = float(step[1])
            expected = sorted(row for row, (lo, hi) in current.items()
                              if hi <= price or lo >= price)
            taken = bands.take(price, aid)
            assert ([] if taken is None else taken.tolist()) == expected
            for row in expected:  # the engine re-values each and files it anew (or not)
                del current[row]
                aid[row] += 1
    assert sorted(bands.live_rows(aid).tolist()) == sorted(current)


def test_a_fold_keeps_a_new_band_after_older_ones_of_equal_bound_and_drops_stale_ones() -> None:
    bands = SymbolBands()
    aid = np.zeros(4, np.uint32)
    for row, (lo, hi) in enumerate([(90.0, 110.0), (95.0, 110.0), (99.0, 101.0)]):
        aid[row] = 1
        bands.push_many(np.array([row], np.int32), np.array([1], np.uint32),
                        np.array([lo]), np.array([hi]), hi, lo)
    bands.merge(aid)
    aid[2], aid[3] = 2, 1  # row 2 re-anchored: its band above is stale
    bands.push_many(np.array([3], np.int32), np.array([1], np.uint32), np.array([80.0]),
                    np.array([110.0]), 110.0, 80.0)
    bands.push_many(np.array([2], np.int32), np.array([2], np.uint32), np.array([50.0]),
                    np.array([150.0]), 150.0, 50.0)
    bands.merge(aid)
    assert bands.hrow.tolist() == [0, 1, 3, 2]  # by upper bound; equal ones in filing order
    assert bands.hi.tolist() == [110.0, 110.0, 110.0, 150.0]
    assert bands.lrow.tolist() == [1, 0, 3, 2]  # by lower bound, highest first
    assert bands.take(110.0, aid).tolist() == [0, 1, 3]
