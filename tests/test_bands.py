"""The safe-band index (`SymbolBands` over one shared `PendingBands` arena): a tick at price p
takes exactly the accounts whose current band on that symbol p touches or leaves, however bands
were filed (one by one, in bulk, by the compiled kernel), re-filed (which makes the older band
stale) and folded into the sorted runs in between, and however the symbols' pending segments
moved and the arena was compacted meanwhile. As the engine does, every account a tick takes is
re-anchored (its anchor id bumped) before it is filed again."""

from __future__ import annotations

from itertools import pairwise
from unittest import mock

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from monitor.book import bands as bands_module
from monitor.book import kernels
from monitor.book.bands import PendingBands, SymbolBands

ROWS = 12
SYMBOLS = 3

# one step: ("file", symbol, row, lo, width) | ("bulk", symbol, count, lo, width) |
# ("kernel", row, lo, width) (every symbol) | ("merge", symbol) | ("tick", symbol, price)
steps = st.lists(st.one_of(
    st.tuples(st.just("file"), st.integers(0, SYMBOLS - 1), st.integers(0, ROWS - 1),
              st.integers(80, 120), st.integers(0, 20)),
    st.tuples(st.just("bulk"), st.integers(0, SYMBOLS - 1), st.integers(1, 40),
              st.integers(80, 120), st.integers(0, 20)),
    st.tuples(st.just("kernel"), st.integers(0, ROWS - 1), st.integers(80, 120),
              st.integers(0, 20)),
    st.tuples(st.just("merge"), st.integers(0, SYMBOLS - 1)),
    st.tuples(st.just("tick"), st.integers(0, SYMBOLS - 1), st.integers(70, 140)),
), max_size=120)


def index(symbols: int) -> tuple[PendingBands, list[SymbolBands]]:
    pending = PendingBands(symbols)
    return pending, [SymbolBands(pending, s) for s in range(symbols)]


def assert_segments_tile_the_arena(pending: PendingBands) -> None:
    """Segments are disjoint, inside the arena and below its free end; they and the space left
    behind make up everything below it."""
    spans = sorted(zip(pending.start.tolist(), pending.room.tolist(), strict=True))
    for (a, room), (b, _) in pairwise(spans):
        assert a + room <= b
    assert all(c <= r for c, r in zip(pending.count.tolist(), pending.room.tolist(),
                                       strict=True))
    assert spans[-1][0] + spans[-1][1] <= pending.top <= pending.bounds.shape[1]
    assert sum(room for _, room in spans) + pending.waste == pending.top


def assert_runs_sorted(bands: list[SymbolBands]) -> None:
    """What a tick has not consumed of each run is sorted: by upper bound ascending, by lower
    bound descending."""
    for symbol in bands:
        assert (np.diff(symbol.hi[symbol.hs:]) >= 0).all()
        assert (np.diff(symbol.lneg[symbol.ls:]) >= 0).all()


@settings(max_examples=300, deadline=None)
@given(steps, st.booleans())
def test_a_tick_takes_exactly_the_current_bands_it_touches_or_leaves(program,
                                                                    numpy_sort: bool) -> None:
    # tiny rooms and merge limits, so that segments move, grow, shrink and get compacted; merges
    # sorted in the kernel (as small ones are) or by numpy (as large ones are)
    with mock.patch.object(bands_module, "ROOM", 2), \
            mock.patch.object(bands_module, "FIRST_LIMIT", 6), \
            mock.patch.object(bands_module, "NUMPY_SORT_FROM", 0 if numpy_sort else 8192):
        pending, bands = index(SYMBOLS)
        aid = np.zeros(ROWS, np.uint32)
        current: dict[int, dict[int, tuple[float, float]]] = {s: {} for s in range(SYMBOLS)}
        sym_px = np.full(SYMBOLS, 100.0)
        for step in program:
            if step[0] == "file":
                _, s, row, lo, width = step
                aid[row] += 1
                for held in current.values():  # re-anchoring makes every older band stale
                    held.pop(row, None)
                current[s][row] = (float(lo), float(lo + width))
                if pending.file(s, float(lo), float(lo + width), row, int(aid[row])):
                    bands[s].merge(aid)
            elif step[0] == "bulk":
                _, s, count, price, width = step
                rows = np.unique(np.arange(count) % ROWS)  # re-anchored by the filing
                eps = width / 200
                sym_px[s] = float(price)
                pending.file_by_symbol(rows, np.full(len(rows), eps), np.full(len(rows), s),
                                       np.arange(len(rows) + 1), aid, sym_px)
                for row in rows.tolist():
                    for held in current.values():
                        held.pop(row, None)
                    current[s][row] = (price * (1.0 - eps), price * (1.0 + eps))
            elif step[0] == "kernel":
                _, row, lo, width = step
                eps = width / 200
                syms = np.arange(SYMBOLS)
                sym_px[:] = float(lo)
                # a segment full or due files nothing (`Book.anchor` then makes room)
                if kernels.file_bands(row, eps, syms, aid, sym_px, *pending.args):
                    for held in current.values():
                        held[row] = (lo * (1.0 - eps), lo * (1.0 + eps))
            elif step[0] == "merge":
                bands[step[1]].merge(aid)
            else:
                _, s, price = step
                expected = sorted(row for row, (lo, hi) in current[s].items()
                                  if hi <= price or lo >= price)
                taken = bands[s].take(float(price), aid)
                assert ([] if taken is None else taken.tolist()) == expected
                for row in expected:  # the engine re-values each and files it anew (or not)
                    aid[row] += 1
                    for held in current.values():
                        held.pop(row, None)
            assert_segments_tile_the_arena(pending)
            assert_runs_sorted(bands)
        for s in range(SYMBOLS):
            assert sorted(bands[s].live_rows(aid).tolist()) == sorted(current[s])


@given(st.lists(st.integers(0, 4_999), max_size=400), st.sampled_from([5_000, 100_000]))
@settings(max_examples=60, deadline=None)
def test_the_rows_a_tick_takes_come_sorted_and_once_each(rows: list[int], n_rows: int) -> None:
    # a book of 5,000 rows reads nearly every draw back from a bitset; of 100,000, the
    # shorter draws (under ~100 rows) are sorted instead
    taken = kernels._sorted_unique(np.array(rows, np.int64), n_rows)
    assert taken.tolist() == sorted(set(rows))


@given(st.lists(st.integers(0, 4_999), max_size=80))
@settings(max_examples=100, deadline=None)
def test_the_rows_a_tick_takes_in_place_come_sorted_and_once_each(rows: list[int]) -> None:
    # up to 32 sorted by insertion where they lie, more as `_sorted_unique` sorts them; what
    # lies past the count is scratch
    buffer = np.array([*rows, -1, -1], np.int64)
    kept = kernels._sort_unique_in_place(buffer, len(rows), 5_000)
    assert buffer[:kept].tolist() == sorted(set(rows))


def test_a_bitset_of_rows_reads_back_across_its_word_boundaries() -> None:
    rows = np.array([4_999, 0, 63, 64, 127, 128, 63, 0, 4_096, 4_095], np.int64)
    assert kernels._sorted_unique(rows, 5_000).tolist() == [
        0, 63, 64, 127, 128, 4_095, 4_096, 4_999]


def test_the_kernel_files_nothing_when_a_segment_is_full_or_due() -> None:
    pending, _ = index(2)
    aid = np.zeros(4, np.uint32)
    sym_px = np.array([100.0, 10.0])
    limit = int(pending.limit[1])
    pending.count[1] = limit - 1  # one more band on symbol 1 makes its merge due
    pending.room[1] = limit
    assert not kernels.file_bands(3, 0.01, np.array([0, 1]), aid, sym_px, *pending.args)
    assert aid[3] == 0 and pending.count[0] == 0
    pending.count[1] = 0
    assert kernels.file_bands(3, 0.01, np.array([0, 1]), aid, sym_px, *pending.args)
    assert aid[3] == 1
    assert [list(map(float, column)) for column in pending.segment(1)] == [
        [10.0 * 0.99], [10.0 * 1.01], [3.0], [1.0]]


def test_a_bulk_filing_s_room_is_given_back_after_its_merge() -> None:
    pending, bands = index(4)
    aid = np.zeros(100_000, np.uint32)
    rows = np.arange(100_000)
    sym_px = np.full(4, 100.0)
    pending.file_by_symbol(rows, np.full(100_000, 0.1), np.full(100_000, 2),
                           np.arange(100_001), aid, sym_px)
    assert pending.bounds.shape[1] >= 100_000
    bands[2].merge(aid)
    limit = int(pending.limit[2])
    assert limit == 16 * 316  # 16·√(bands in the runs)
    room = bands_module.ROOM
    assert pending.room.tolist() == [room, room, limit, room]
    assert pending.bounds.shape[1] == 2 * (3 * room + limit)  # compacted to twice the room
    assert bands[2].take(111.0, aid).tolist() == list(range(100_000))  # hi = 110 (+ ulp)


def test_a_fold_keeps_a_new_band_after_older_ones_of_equal_bound_and_drops_stale_ones() -> None:
    pending, (bands,) = index(1)
    aid = np.zeros(4, np.uint32)
    for row, (lo, hi) in enumerate([(90.0, 110.0), (95.0, 110.0), (99.0, 101.0)]):
        aid[row] = 1
        pending.file(0, lo, hi, row, 1)
    bands.merge(aid)
    aid[2], aid[3] = 2, 1  # row 2 re-anchored: its band above is stale
    pending.file(0, 80.0, 110.0, 3, 1)
    pending.file(0, 50.0, 150.0, 2, 2)
    bands.merge(aid)
    assert bands.hrow.tolist() == [0, 1, 3, 2]  # by upper bound; equal ones in filing order
    assert bands.hi.tolist() == [110.0, 110.0, 110.0, 150.0]
    assert bands.lrow.tolist() == [1, 0, 3, 2]  # by lower bound, highest first
    assert bands.take(110.0, aid).tolist() == [0, 1, 3]


def test_a_merge_fills_the_room_after_a_run_and_moves_the_run_to_the_front_when_full() -> None:
    pending, (bands,) = index(1)
    aid = np.ones(8, np.uint32)
    for row, hi in enumerate([101.0, 102.0, 103.0, 104.0]):
        pending.file(0, 90.0, hi, row, 1)
    bands.merge(aid)
    columns = bands._high[0]
    assert len(columns) == 5  # four bands, and a quarter more
    assert bands.take(101.5, aid).tolist() == [0]  # consumes the run's first entry
    aid[0] = 2
    pending.file(0, 95.0, 102.5, 4, 1)
    bands.merge(aid)  # fits after the run (4 + 1 of 5): it stays where it is
    assert bands._high[0] is columns and bands.hs == 1
    assert bands.hi[bands.hs:].tolist() == [102.0, 102.5, 103.0, 104.0]
    pending.file(0, 95.0, 100.5, 5, 1)
    bands.merge(aid)  # 5 + 1 > 5: the run moves to the front first, in the same columns
    assert bands._high[0] is columns and bands.hs == 0
    assert bands.hi.tolist() == [100.5, 102.0, 102.5, 103.0, 104.0]
    assert bands.hrow.tolist() == [5, 1, 4, 2, 3]
    assert bands.take(95.0, aid).tolist() == [4, 5]  # those with a lower bound of 95


def test_a_run_s_columns_shrink_once_they_hold_four_times_what_is_left() -> None:
    pending, (bands,) = index(1)
    aid = np.ones(2_000, np.uint32)
    sym_px = np.array([100.0])
    pending.file_by_symbol(np.arange(2_000), np.full(2_000, 0.01), np.zeros(2_000, np.int64),
                           np.arange(2_001), aid, sym_px)
    bands.merge(aid)
    assert bands.nbytes() == 2 * 2_500 * (8 + 4 + 4)  # two runs: key, row, anchor id
    assert aid[0] == 2  # the filing re-anchored every row
    assert len(bands.take(102.0, aid)) == 2_000  # every band, from the run by upper bound
    aid[:] = 3  # each re-valued: its bands in the run by lower bound are stale
    pending.file(0, 99.0, 101.0, 7, 3)
    bands.merge(aid)
    assert bands.nbytes() == 2 * 1 * (8 + 4 + 4)  # the other run's stale entries pruned
    assert bands.take(102.0, aid).tolist() == [7]


def test_bands_laid_out_elsewhere_merge_after_the_pending_ones() -> None:
    pending, (bands,) = index(1)
    aid = np.array([1, 1, 1, 2], np.uint32)
    pending.file(0, 90.0, 110.0, 0, 1)
    pending.file(0, 95.0, 105.0, 3, 1)  # stale: row 3 is at anchor id 2
    bands.merge_laid_out(np.array([1, 2], np.int32), np.array([1, 1], np.uint32),
                         np.array([99.0, 80.0]), np.array([101.0, 120.0]), aid)
    assert pending.count.tolist() == [0]
    assert bands.hrow.tolist() == [1, 0, 2]
    assert bands.take(100.5, aid) is None
    assert bands.take(85.0, aid).tolist() == [0, 1]


def test_room_for_many_symbols_at_once_keeps_what_they_hold() -> None:
    pending, _ = index(3)
    for s in range(3):
        pending.file(s, float(s), float(s) + 1, s, 1)
    size = pending.bounds.shape[1]
    pending.reserve(np.array([size, 0, size]))  # more than the arena holds: one compaction
    assert pending.room.tolist()[0] >= size + 1 and pending.room.tolist()[2] >= size + 1
    assert_segments_tile_the_arena(pending)
    for s in range(3):
        assert [list(map(float, column)) for column in pending.segment(s)] == [
            [float(s)], [float(s) + 1], [float(s)], [1.0]]
