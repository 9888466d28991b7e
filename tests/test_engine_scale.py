"""Properties of the columnar engine (`monitor.engine` on `monitor.book`): on long random
streams with many accounts, price shocks, restores and catch-up guards it emits exactly what the
straightforward reference engine emits, no account is ever left in a state its from-scratch
ratio would move it out of, and its vectorized valuations equal the from-scratch ones.

None of these tests is timed.
"""

from __future__ import annotations

import contextlib
import math
import random
from typing import Any

import msgspec
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import monitor.engine as engine_module
from monitor.account import Account, UnitKey
from monitor.book import bands as bands_module
from monitor.book import kernels, store
from monitor.book.bands import PendingBands
from monitor.config import RiskConfig, parse_config
from monitor.engine import Engine
from monitor.events import Event, Source, build_event
from monitor.margin import Position, value_account
from monitor.records import Fill, InputRecord, LedgerEntry, PriceTick, Reason, Rejected
from monitor.reference import ReferenceEngine
from monitor.state import AccountState, next_state
from tests.support.compare import close
from tests.support.naive_model import ModeConflict, NaiveMonitor
from tests.support.risk import RISK

START = {"BTC-PERP": 50_000.0, "ETH-PERP": 2_500.0, "ETHBTC-PERP": 0.05, "BTC": 50_000.0,
         "ETH": 2_500.0}
SCALE = {"BTC-PERP": 0.02, "ETH-PERP": 4.0, "ETHBTC-PERP": 8.0}
SETTLE = {"BTC-PERP": "USDT", "ETH-PERP": "USDT", "ETHBTC-PERP": "BTC"}


def stream(seed: int, length: int, accounts: int, shock_rate: float = 0.01,
           late_btc: bool = True, whales: float = 0.0,
           isolated: float = 0.0) -> list[tuple[InputRecord, Source]]:
    """Decoded records for many accounts: leveraged trading on a jumpy random walk with
    occasional shocks that cross many bands at once, exact closes and flips, duplicates,
    stale ticks, several collateral assets and a settle asset (BTC) that is priced late.

    A ``whales`` fraction of the accounts trades and funds 100 times the size, which takes
    their positions into tiers 2 and 3 (everyone else stays in tier 1). It draws nothing
    from the random generator, so the stream is otherwise the same.

    With ``isolated`` > 0 (SPEC §4.1) that fraction of the positions opened from flat is
    isolated, a third of the ledger entries move margin into or out of isolated wallets, and
    one fill in 25 comes in the other mode than its open position's (margin_mode_conflict).
    Those draws come from a generator of their own, so isolated=0 is the cross-only stream."""
    rng = random.Random(seed)
    modes = random.Random(seed + 1)
    mode_held: dict[tuple[str, str], str] = {}
    names = [f"a{n:04d}" for n in range(accounts)]
    size = {name: 100.0 if n < accounts * whales else 1.0 for n, name in enumerate(names)}
    prices = dict(START)
    held: dict[tuple[str, str], float] = {}
    out: list[tuple[InputRecord, Source]] = []
    ts = 1
    sent: list[tuple[InputRecord, Source]] = []
    offsets = {"prices": 0, "fills": 0, "ledger": 0}

    def source(topic: str) -> Source:
        offsets[topic] += 1
        return Source(topic, 0, offsets[topic] - 1)

    for name in names:  # everyone starts with collateral, some with several assets
        out.append((LedgerEntry(f"d-{name}", name, "USDT",
                                rng.uniform(200, 3_000) * size[name], "deposit", ts),
                    source("ledger")))
        if rng.random() < 0.3:
            out.append((LedgerEntry(f"db-{name}", name, "BTC",
                                    rng.uniform(0.001, 0.05) * size[name], "deposit", ts),
                        source("ledger")))
    for n in range(length):
        ts += rng.choice([0, 1, 3])
        roll = rng.random()
        if roll < 0.4:
            symbol = rng.choice(list(START))
            if late_btc and symbol == "BTC" and n < length // 8:
                symbol = "ETH"
            move = rng.gauss(0, 0.003)
            if rng.random() < shock_rate:
                move += rng.choice([-1, 1]) * rng.uniform(0.02, 0.12)
            prices[symbol] *= math.exp(move)
            stale = rng.random() < 0.03
            out.append((PriceTick(symbol, prices[symbol], ts - 20 if stale else ts),
                        source("prices")))
        elif roll < 0.85:
            name = rng.choice(names)
            symbol = rng.choice(list(SCALE))
            have = held.get((name, symbol), 0.0)
            if have and rng.random() < 0.2:
                qty, side = abs(have), "sell" if have > 0 else "buy"
            elif have and rng.random() < 0.1:
                qty, side = abs(have) * 2, "sell" if have > 0 else "buy"  # flip
            else:
                qty = round(rng.uniform(0.1, 3.0) * SCALE[symbol] * size[name], 4)
                side = rng.choice(["buy", "sell"])
            if sent and rng.random() < 0.03:
                out.append(rng.choice(sent))  # a producer retry
                continue
            mode = "cross"
            if isolated:
                if not have:
                    mode_held[(name, symbol)] = (
                        "isolated" if modes.random() < isolated else "cross")
                mode = mode_held.get((name, symbol), "cross")
                if have and modes.random() < 0.04:  # the other mode: rejected, not held
                    mode = "isolated" if mode == "cross" else "cross"
                else:
                    held[(name, symbol)] = have + (qty if side == "buy" else -qty)
            else:
                held[(name, symbol)] = have + (qty if side == "buy" else -qty)
            record = (Fill(fill_id=f"f{n}", account=name, symbol=symbol, side=side, qty=qty,
                           price=prices[symbol] * rng.uniform(0.995, 1.005),
                           fee=rng.choice([0.0, 0.3, -0.05]), ts=ts, margin_mode=mode),
                      source("fills"))
            sent.append(record)
            out.append(record)
        elif isolated and modes.random() < 0.35:
            name = modes.choice(names)
            symbol = modes.choice(list(SETTLE))
            asset = SETTLE[symbol]
            amount = {"USDT": 150.0, "BTC": 0.004}[asset] * modes.uniform(-0.7, 2) * size[name]
            out.append((LedgerEntry(f"i{n}", name, asset, amount, "isolated_margin", ts,
                                    symbol), source("ledger")))
        else:
            name = rng.choice(names)
            asset = rng.choice(["USDT", "USDT", "BTC", "ETH"])
            amount = ({"USDT": 150.0, "BTC": 0.005, "ETH": 0.1}[asset] * rng.uniform(-1.5, 2)
                      * size[name])
            out.append((LedgerEntry(f"l{n}", name, asset, amount, "funding", ts),
                        source("ledger")))
    return out


def apply_both(mine: Engine, theirs: Engine | ReferenceEngine, record: InputRecord,
               source: Source, where: str) -> list[Event]:
    """Apply a record to both engines: the same events, or the same rejection."""
    try:
        expected = theirs.apply(record, source)
    except Rejected as rejection:
        with pytest.raises(Rejected) as raised:
            mine.apply(record, source)
        assert raised.value.reason == rejection.reason == Reason.MARGIN_MODE_CONFLICT, where
        return []
    got = mine.apply(record, source)
    assert_same_events(got, expected, where)
    return got


def payload(event: Event) -> dict[str, Any]:
    return event.payload


def assert_same_events(mine: list[Event], theirs: list[Event], where: str) -> None:
    assert [e.event_id for e in mine] == [e.event_id for e in theirs], where
    for a, b in zip(mine, theirs, strict=True):
        close(payload(a), payload(b), f"{where}:{a.event_id}")


def assert_same_state(engine: Engine, reference: ReferenceEngine) -> None:
    assert set(engine.accounts) == set(reference.accounts)
    assert set(engine.units) == set(reference.units)
    held: list[tuple[Any, Account, Account]] = [
        (name, engine.accounts[name], theirs) for name, theirs in reference.accounts.items()]
    held += [(key, engine.units[key], theirs) for key, theirs in reference.units.items()]
    for name, mine, theirs in held:
        assert (mine.state, mine.transitions, mine.partition) == (
            theirs.state, theirs.transitions, theirs.partition), name
        close(dict(mine.balances), dict(theirs.balances), name)
        close({s: [p.qty, p.entry_price] for s, p in mine.positions.items()},
              {s: [p.qty, p.entry_price] for s, p in theirs.positions.items()}, name)
        assert mine.watched == theirs.watched, name
    assert engine.accounts_in_state == reference.accounts_in_state
    assert engine.units_in_state == reference.units_in_state
    assert engine.positions_held == reference.positions_held
    assert engine.stats == reference.stats
    for symbol in engine.config.price_symbols():
        assert engine.accounts_moved_by(symbol) == reference.accounts_moved_by(symbol), symbol


def assert_same_dirty_units(engine: Engine, reference: ReferenceEngine, put_back: bool
                            ) -> None:
    """Both hand a checkpoint the same risk units changed, each with the same partition (the
    columnar engine reads them from its rows); with ``put_back``, every other one goes back
    as a failed checkpoint puts them back, and is handed out again next time."""
    mine, theirs = engine.take_dirty(), reference.take_dirty()
    assert dict(zip(mine.keys, mine.partitions.tolist(), strict=True)) == dict(
        zip(theirs.keys, theirs.partitions.tolist(), strict=True))
    if put_back:
        again = sorted(theirs.keys, key=str)[::2]
        chosen = np.array(sorted(mine.keys.index(key) for key in again), np.int64)
        back = mine.subset(chosen)
        engine.mark_dirty(back.keys, back.rows)
        reference.mark_dirty(again)


def assert_settled(engine: Engine) -> None:
    """No account sits in a state that its from-scratch ratio at the current prices would
    move it out of: every transition a record could cause was made by that record."""
    thresholds = engine.config.thresholds
    for name in [*engine.accounts, *engine.units]:
        if name in engine._caught_up_from:
            continue
        valuation = engine.valuation(name)
        if valuation is None:
            continue
        state = (engine.units[name] if isinstance(name, UnitKey)
                 else engine.accounts[name]).state
        assert next_state(state, valuation.ratio, thresholds) == state, (name, valuation)


class Calls:
    count = 0


@pytest.fixture
def bulk_filings(monkeypatch: pytest.MonkeyPatch) -> Calls:
    """Counts ticks whose bands are filed by symbol in one pass (`Book.anchor_many`), with
    the row count above which they are lowered to 16, so that these streams take both paths."""
    monkeypatch.setattr(store, "ANCHOR_ONE_BY_ONE", 16)
    calls = Calls()
    file_by_symbol = kernels.file_by_symbol

    def counted(*args: Any) -> Any:
        calls.count += 1
        return file_by_symbol(*args)

    monkeypatch.setattr(kernels, "file_by_symbol", counted)
    return calls


@pytest.mark.parametrize(("seed", "isolated"), [(0, 0.0), (1, 0.0), (2, 0.0), (3, 0.0),
                                                (4, 0.3), (5, 0.3)])
def test_columnar_engine_equals_reference_with_many_accounts_and_shocks(
    seed: int, isolated: float, bulk_filings: Calls,
) -> None:
    config = parse_config(RISK)
    engine, reference = Engine(config), ReferenceEngine(config)
    records = stream(seed, 12_000, accounts=250, shock_rate=0.02, isolated=isolated)
    unit_events = 0
    for n, (record, source) in enumerate(records):
        events = apply_both(engine, reference, record, source, f"record {n}")
        unit_events += sum(event.symbol is not None for event in events)
        if n % 1_500 == 0:
            assert_settled(engine)
            assert_same_dirty_units(engine, reference, put_back=n % 3_000 == 0)
    assert_same_state(engine, reference)
    assert_settled(engine)
    assert_same_dirty_units(engine, reference, put_back=False)
    assert bulk_filings.count > 50, "the stream should exercise the bulk band filing"
    assert (unit_events > 100) == (isolated > 0)


@pytest.mark.parametrize("seed", [0, 1])
def test_idle_upkeep_changes_no_event(
    seed: int, bulk_filings: Calls, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The service tidies the book when it has nothing ready (`Engine.upkeep`): it merges
    what a tick that moved many accounts left overdue in the band index, and compacts the
    positions trading has scattered. An engine that does it after every record emits and
    holds exactly what one that never does (merging inline, in the next tick that needs it)
    and the reference emit and hold. Merges are due after 8 pending bands here, so that bulk
    filings of a few dozen rows leave them overdue, and a compaction after 64 fills, in steps
    of 20 rows."""
    monkeypatch.setattr(bands_module, "FIRST_LIMIT", 8)
    monkeypatch.setattr(bands_module, "PER_SQRT_BAND", 1)
    monkeypatch.setattr(engine_module, "COMPACT_AFTER_FILLS", 64)
    monkeypatch.setattr(store, "COMPACT_ROWS", 20)
    config = parse_config(RISK)
    tidied, untidied, reference = Engine(config), Engine(config), ReferenceEngine(config)
    merges = compaction_steps = 0
    for n, (record, source) in enumerate(stream(seed, 8_000, accounts=250, shock_rate=0.02)):
        events = apply_both(tidied, reference, record, source, f"record {n}")
        assert_same_events(untidied.apply(record, source), events, f"record {n}, untidied")
        while tidied.upkeep_due:
            merging = tidied.book.bulk_filed
            more = tidied.upkeep()
            merges += merging
            compaction_steps += not merging
            if not more:
                break
        pending = tidied.book.pending
        assert not (pending.count > pending.limit).any(), f"record {n}: left overdue"
    assert_same_state(tidied, reference)
    assert_same_state(untidied, reference)
    assert merges > 50, "the stream should leave merges overdue"
    assert compaction_steps > 50, "the stream should call for compactions"


@pytest.mark.parametrize(("seed", "isolated"), [(0, 0.0), (1, 0.0), (2, 0.3)])
def test_columnar_engine_equals_the_naive_model_with_many_accounts_and_shocks(
    seed: int, isolated: float, bulk_filings: Calls,
) -> None:
    """The reference engine above shares the product's valuation, transition rule and event
    builder, so it cannot catch a bug in them; tests/support/naive_model.py shares no code. The
    model recomputes every account after every record, so the stream is shorter; whales
    take positions past tier 1, where the cumulative maintenance amount counts."""
    config = parse_config(RISK)
    engine, naive = Engine(config), NaiveMonitor(RISK)
    types = set()
    records = stream(seed, 6_000, accounts=250, shock_rate=0.02, whales=0.1, isolated=isolated)
    conflicts = 0
    for n, (record, source) in enumerate(records):
        try:
            theirs = naive.feed(source.topic, msgspec.structs.asdict(record), n)
        except ModeConflict:
            with pytest.raises(Rejected, match="margin_mode_conflict"):
                engine.apply(record, Source(source.topic, index=n))
            conflicts += 1
            continue
        mine = engine.apply(record, Source(source.topic, index=n))  # the model's trigger form
        assert [e.event_id for e in mine] == [e["event_id"] for e in theirs], f"record {n}"
        for event, expected in zip(mine, theirs, strict=True):
            close(payload(event), expected, f"record {n}:{event.event_id}")
            types.add(event.type)
    assert types == {"margin_call", "liquidation", "recovered"}
    assert bulk_filings.count > 50, "the stream should exercise the bulk band filing"
    assert (conflicts > 0) == (isolated > 0)
    held: list[tuple[Any, dict[str, Any], Any]] = list(
        (name, acct, engine.accounts) for name, acct in naive.accounts.items())
    held += [(UnitKey(*key), acct, engine.units) for key, acct in naive.units.items()]
    for name, acct, mine_held in held:
        if name in mine_held:
            mine_account = mine_held[name]
            assert (mine_account.state.value, mine_account.transitions) == (
                acct["state"], acct["n"]), name
        else:  # forgotten as blank: the model keeps it, empty
            assert acct["n"] == 0 and not acct["pos"], name


def test_long_stream_compiled_valuations_equal_from_scratch() -> None:
    """After 60,000 records every account's and isolated position's ratio from the compiled
    kernels — one row at a time and many at once — is bit-identical to `margin.value_account`
    from scratch (they sum the same terms in the same order; an isolated wallet without
    collateral weight), unvaluable ones agree, and every account is settled."""
    config = parse_config(RISK)
    engine = Engine(config)
    records = stream(11, 60_000, accounts=400, shock_rate=0.01, isolated=0.2)
    events = []
    for record, source in records:
        with contextlib.suppress(Rejected):  # margin_mode_conflict: dead-lettered
            events += engine.apply(record, source)
    assert {e.type for e in events} == {"margin_call", "liquidation", "recovered"}
    book = engine.book
    keys = [*engine.accounts, *engine.units]
    rows = np.array([book.row_of(key) for key in keys], dtype=np.int64)
    evaluation = book.evaluate(rows)
    evaluable, ratios = evaluation.evaluable, evaluation.ratio
    checked = 0
    for k, name in enumerate(keys):
        isolated = isinstance(name, UnitKey)
        account = engine.units[name] if isolated else engine.accounts[name]
        exact = value_account(account.balances, account.positions, config, engine.prices,
                              isolated=isolated)
        one_evaluable, one_ratio, _, _ = book.evaluate_and_file(int(rows[k]))
        if exact is None:
            assert not one_evaluable and not evaluable[k]
            continue
        checked += 1
        assert one_ratio == exact.ratio and ratios[k] == exact.ratio, name
    assert checked > 300 and len(engine.units) > 100
    assert_settled(engine)


@pytest.mark.parametrize("fees", [{}, {"BTC-PERP": 0.001, "ETH-PERP": 0.03,
                                        "ETHBTC-PERP": 0.005}])
def test_events_report_exactly_what_margin_py_computes_from_scratch(fees) -> None:
    """Each event the engine builds from its compiled figures (`Book.event_figures`,
    `Book.liquidation_plan`) equals, bit for bit, the event `build_event` makes from
    `margin.value_account`, the other margin.py formulas and `liquidation.liquidation_plan`
    for the same account at the same prices. Accounts in tiers 2 and 3, isolated positions, a
    settle asset priced late; without liquidation fees and with fees that leave a settle
    balance negative and exceed a maintenance rate."""
    risk = {**RISK, "instruments": {name: {**spec, **({"liquidation_fee": fees[name]}
                                                      if name in fees else {})}
                                    for name, spec in RISK["instruments"].items()}}
    config = parse_config(risk)
    engine = Engine(config)
    compared = {"cross": 0, "isolated": 0, "liquidation": 0}
    for record, source in stream(13, 20_000, accounts=300, whales=0.1, isolated=0.2):
        try:
            events = engine.apply(record, source)
        except Rejected:  # margin_mode_conflict: dead-lettered
            continue
        for event in events:
            p = event.payload
            symbol = p.get("symbol")
            key = event.account if symbol is None else UnitKey(event.account, symbol)
            account = engine.accounts[key] if symbol is None else engine.units[key]
            valuation = value_account(account.balances, account.positions, config,
                                      engine.prices, isolated=symbol is not None)
            assert valuation is not None
            trigger = p["trigger"]
            expected = build_event(
                account=event.account, transition=account.transitions,
                previous=AccountState[p["previous_state"]], state=AccountState[p["state"]],
                valuation=valuation, balances=account.balances, positions=account.positions,
                config=config, prices=engine.prices, price_ts=engine.price_ts, ts=p["ts"],
                trigger_kind=trigger["kind"], trigger_ref=trigger["ref"],
                source=Source(trigger["topic"], trigger["partition"], trigger["offset"]),
                isolated=symbol)
            assert event.payload == expected.payload, event.event_id
            compared["cross" if symbol is None else "isolated"] += 1
            compared["liquidation"] += "liquidation_plan" in p
    assert min(compared.values()) > 50, compared


def test_columnar_engine_on_every_core_equals_reference(monkeypatch: pytest.MonkeyPatch,
                                                        ) -> None:
    """Ticks that move many accounts re-value and re-file them with the parallel kernels
    (`store.PARALLEL_ROWS`, and `store.ANCHOR_ONE_BY_ONE` below which a tick is done in one
    serial call, both lowered here so that this stream's shocks take that path): the events
    and the final state are the reference engine's."""
    monkeypatch.setattr(store, "PARALLEL_ROWS", 8)
    monkeypatch.setattr(store, "ANCHOR_ONE_BY_ONE", 8)
    parallel_calls = 0
    evaluate_rows_parallel = kernels.evaluate_rows_parallel

    def counted(*args: Any) -> Any:
        nonlocal parallel_calls
        parallel_calls += 1
        return evaluate_rows_parallel(*args)

    monkeypatch.setattr(kernels, "evaluate_rows_parallel", counted)
    config = parse_config(RISK)
    engine, reference = Engine(config), ReferenceEngine(config)
    for n, (record, source) in enumerate(stream(6, 8_000, accounts=250, shock_rate=0.02,
                                                isolated=0.2)):
        apply_both(engine, reference, record, source, f"record {n}")
    assert_same_state(engine, reference)
    assert_settled(engine)
    assert parallel_calls > 50


def evaluated_book() -> Engine:
    config = parse_config(RISK)
    engine = Engine(config)
    for record, source in stream(12, 15_000, accounts=400, shock_rate=0.01, isolated=0.2):
        with contextlib.suppress(Rejected):  # margin_mode_conflict: dead-lettered
            engine.apply(record, source)
    return engine


@pytest.mark.parametrize(("spans", "decide"), [(1, True), (3, True), (8, True), (8, False),
                                               (2_000, True)])
def test_parallel_kernels_compute_exactly_what_the_serial_ones_compute(spans: int,
                                                                        decide: bool) -> None:
    """Per row the same evaluation, state, band and watched symbols, laid out in the same
    order, and the same anchor ids bumped — however the rows are cut (more spans than rows
    leaves some empty), deciding states (a tick) or not (indexing a restore). Every price is
    7 % lower than the book last saw, so deciding moves accounts."""
    book = evaluated_book().book
    book.sym_px[:] *= 0.93
    rows = book.rows_in_use().astype(np.int64)
    serial = kernels.evaluate_rows(rows, decide, book.state, *book._value_args)
    parallel = kernels.evaluate_rows_parallel(spans, rows, decide, book.state,
                                              *book._value_args)
    assert len(rows) > 500
    assert np.any(serial[2] != book.state[rows]) == decide
    for mine, theirs in zip(parallel, serial, strict=True):
        np.testing.assert_array_equal(mine, theirs)
    eps, watch, watch_start = serial[3], serial[4], serial[5]
    aid_serial, aid_parallel = book.aid.copy(), book.aid.copy()
    filed = kernels.bands_by_symbol(rows, eps, watch, watch_start, aid_serial, book.sym_px)
    filed_parallel = kernels.bands_by_symbol_parallel(spans, rows, eps, watch, watch_start,
                                                      aid_parallel, book.sym_px)
    for mine, theirs in zip(filed_parallel, filed, strict=True):
        np.testing.assert_array_equal(mine, theirs)
    np.testing.assert_array_equal(aid_parallel, aid_serial)
    assert not np.array_equal(aid_serial, book.aid)
    # filed straight into the pending segments: the same arena, column for column
    arenas = []
    for spans_or_serial in (None, spans):
        pending, aid = PendingBands(len(book.sym_px)), book.aid.copy()
        pending.file_by_symbol(rows, eps, watch, watch_start, aid, book.sym_px, spans_or_serial)
        arenas.append((pending, aid))
    (serial_arena, aid_serial), (parallel_arena, aid_parallel) = arenas
    np.testing.assert_array_equal(parallel_arena.meta, serial_arena.meta)
    np.testing.assert_array_equal(parallel_arena.edges, serial_arena.edges)
    for s in range(len(book.sym_px)):
        for mine, theirs in zip(parallel_arena.segment(s), serial_arena.segment(s), strict=True):
            np.testing.assert_array_equal(mine, theirs)
    np.testing.assert_array_equal(aid_parallel, aid_serial)
    assert serial_arena.count.sum() == len(watch)


def test_parallel_evaluation_falls_back_to_serial_when_rows_watch_many_symbols() -> None:
    """A span reserves room for 8 watched symbols a row; accounts holding 12 instruments
    overflow it, and the call is answered by the serial kernel: still the same arrays."""
    flat = [{"max_notional": "inf", "mmr": 0.01, "imr": 0.02}]
    risk = {**RISK, "instruments": {f"X{n}-PERP": {"settle": "USDT", "contract_size": 1.0,
                                                   "tiers": flat} for n in range(12)}}
    engine = Engine(parse_config(risk))
    for n in range(12):
        engine.apply(PriceTick(f"X{n}-PERP", 100.0 + n, 1), Source("prices", 0, n))
    for a in range(40):
        engine.apply(LedgerEntry(f"d{a}", f"a{a}", "USDT", 10_000.0, "deposit", 2),
                     Source("ledger", 0, a))
        for n in range(12):
            engine.apply(Fill(fill_id=f"f{a}-{n}", account=f"a{a}", symbol=f"X{n}-PERP",
                              side="buy", qty=1.0, price=100.0, fee=0.0, ts=3),
                         Source("fills", 0, 12 * a + n))
    book = engine.book
    rows = book.rows_in_use().astype(np.int64)
    serial = kernels.evaluate_rows(rows, True, book.state, *book._value_args)
    parallel = kernels.evaluate_rows_parallel(2, rows, True, book.state, *book._value_args)
    assert len(serial[4]) == 40 * 12 > kernels.WATCH_ROOM * 40 + 2 * 12
    for mine, theirs in zip(parallel, serial, strict=True):
        np.testing.assert_array_equal(mine, theirs)


def snapshot(engine: Engine) -> tuple[dict[Any, Account], dict[str, tuple[float, int]]]:
    """Every account and isolated position, by key, and the price table."""
    held: dict[Any, Account] = {name: engine.accounts[name] for name in engine.accounts}
    held.update((key, engine.units[key]) for key in engine.units)
    return held, engine.price_table()


@pytest.mark.parametrize(("prices_first", "index_chunk"), [(True, None), (False, None),
                                                           (True, 37)])
def test_restored_engine_continues_exactly_like_one_that_never_stopped(
    prices_first: bool, index_chunk: int | None, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """(index_chunk: the restore's band index valued and laid out a few accounts at a time,
    every symbol's bands merged once from the pieces.)"""
    if index_chunk is not None:
        monkeypatch.setattr(engine_module, "INDEX_CHUNK", index_chunk)
    config = parse_config(RISK)
    records = stream(5, 8_000, accounts=200, shock_rate=0.02, isolated=0.3)
    cut = 4_000
    engine, reference = Engine(config), ReferenceEngine(config)
    for n, (record, source) in enumerate(records[:cut]):
        apply_both(engine, reference, record, source, f"record {n}")
    accounts, prices = snapshot(engine)
    assert any(isinstance(key, UnitKey) for key in accounts)
    restored = Engine(config)
    if prices_first:
        restored.load_prices(prices)
    for name, account in accounts.items():
        restored.load_account(name, account)
    if not prices_first:
        restored.load_prices(prices)  # bands drawn around no prices must be redrawn
    for topic in ("fills", "ledger"):
        restored.load_dedupe_ids(topic, 0, engine.dedupe_ids(topic, 0))
    assert restored.index_restored() == len(accounts)
    for n, (record, source) in enumerate(records[cut:]):
        apply_both(restored, reference, record, source, f"record {cut + n}")
    assert_settled(restored)


def test_catch_up_guard_skips_exactly_what_the_reference_skips() -> None:
    """Accounts restored from snapshots newer than the inputs being re-read skip those inputs
    — ticks included — until the marks are released, in both engines alike."""
    config = parse_config(RISK)
    records = stream(9, 6_000, accounts=150, shock_rate=0.03, isolated=0.3)
    cut = 3_000
    warm, oracle = Engine(config), ReferenceEngine(config)
    for n, (record, source) in enumerate(records[:cut]):
        apply_both(warm, oracle, record, source, f"record {n}")
    accounts, prices = snapshot(warm)
    rng = random.Random(3)
    engines = (Engine(config), ReferenceEngine(config))
    marks = {name: {("prices", 0): rng.randrange(1_000, 2_500),
                    ("fills", 0): rng.randrange(1_000, 2_000)}
             for name in accounts if rng.random() < 0.4}
    for engine in engines:
        engine.load_prices(prices)
        for name, account in accounts.items():
            copy = Account(balances=dict(account.balances),
                           positions={s: Position(p.qty, p.entry_price)
                                      for s, p in account.positions.items()},
                           state=account.state, transitions=account.transitions,
                           partition=account.partition)
            engine.load_account(name, copy, dict(marks[name]) if name in marks else None)
    mine, theirs = engines
    for n, (record, source) in enumerate(records[cut:]):
        apply_both(mine, theirs, record, source, f"record {cut + n}")
        if n % 500 == 0:
            position = {("prices", 0): source.offset or 0, ("fills", 0): source.offset or 0}
            mine.release_caught_up(position)
            theirs.release_caught_up(position)
    assert_same_state(mine, theirs)


def marked(engine: Engine) -> set[Any]:
    """Risk units whose snapshot still skips re-read inputs."""
    return set(engine._caught_up_from)


def restored_with_marks(marks: dict[str, dict[tuple[str, int | None], int]]) -> Engine:
    engine = Engine(parse_config(RISK))
    for name in ("a", "b", "c"):
        engine.load_account(name, Account(balances={"USDT": 100.0}, partition=0),
                            marks.get(name))
    return engine


def test_marks_shared_by_many_accounts_are_released_together_once_passed() -> None:
    ticks_seen = {("prices", 0): 10}
    engine = Engine(parse_config(RISK))
    engine.load_accounts(
        restored_with_marks({}).snapshots(["a", "b", "c"]),
        {"a": ticks_seen, "b": ticks_seen, "c": {("prices", 0): 10, ("fills", 0): 7}})
    engine.release_caught_up({("prices", 0): 9, ("fills", 0): 9})
    assert marked(engine) == {"a", "b", "c"}  # the tick at offset 9 is still to be re-read
    engine.release_caught_up({("prices", 0): 10, ("fills", 0): 6})
    assert marked(engine) == {"c"}  # its fill at offset 6 is still to be re-read
    engine.release_caught_up({("prices", 0): 10, ("fills", 0): 7})
    assert marked(engine) == set()


def test_an_account_marked_anew_keeps_its_new_marks_when_the_old_ones_pass() -> None:
    engine = restored_with_marks({"a": {("prices", 0): 10}, "b": {("prices", 0): 10}})
    engine.load_account("a", engine.accounts["a"], {("prices", 0): 30})  # restored again
    engine.release_caught_up({("prices", 0): 15})
    assert marked(engine) == {"a"}
    engine.release_caught_up({("prices", 0): 30})
    assert marked(engine) == set()


def test_marks_of_accounts_handed_over_are_not_kept() -> None:
    engine = restored_with_marks({"a": {("prices", 0): 10}, "c": {("prices", 0): 20}})
    engine.drop_partition(0)
    engine.release_caught_up({("prices", 0): 0})
    assert marked(engine) == set() and engine._mark_groups == {}


def test_drop_partition_and_forgotten_accounts_leave_no_band_behind() -> None:
    config = parse_config(RISK)
    engine, reference = Engine(config), ReferenceEngine(config)
    records = stream(4, 3_000, accounts=120, isolated=0.3)
    half = [(r, Source(s.topic, 1 if getattr(r, "account", "a0")[-1] in "13579" else 0,
                       s.offset)) for r, s in records]
    for record, source in half:
        apply_both(engine, reference, record, source, "")
    units_on_1 = sum(key.account[-1] in "13579" for key in engine.units)
    assert units_on_1 > 0
    assert engine.drop_partition(1) == reference.drop_partition(1) > units_on_1
    assert not any(key.account[-1] in "13579" for key in engine.units)
    assert_same_state(engine, reference)
    for n, (record, source) in enumerate(stream(8, 2_000, accounts=120, isolated=0.3)):
        if source.partition == 0:
            apply_both(engine, reference, record, source, f"after drop {n}")
    assert_same_state(engine, reference)


def test_marking_a_partition_dirty_hands_out_every_unit_it_holds_in_both_engines() -> None:
    config = parse_config(RISK)
    engine, reference = Engine(config), ReferenceEngine(config)
    for record, source in stream(4, 1_000, accounts=60, isolated=0.3):
        partition = 1 if getattr(record, "account", "a0")[-1] in "13579" else 0
        apply_both(engine, reference, record, Source(source.topic, partition, source.offset),
                   "")
    engine.take_dirty()
    reference.take_dirty()
    held = {key for key in [*engine.accounts, *engine.units] if engine.partition_of(key) == 1}
    assert engine.mark_partition_dirty(1) == reference.mark_partition_dirty(1) == len(held) > 0
    assert set(engine.take_dirty().keys) == set(reference.take_dirty().keys) == held


def band_of(engine: Engine, name: str, symbol: str) -> tuple[float, float] | None:
    """The account's current band on a symbol (lo, hi), read from the index."""
    book = engine.book
    row, sym = book.index[name], book.t.sym_index[symbol]
    bands = book.bands[sym]
    aid = book.aid[row]
    los, his, rows, aids = book.pending.segment(sym)
    for k in range(len(rows)):
        if rows[k] == row and aids[k] == aid:
            return float(los[k]), float(his[k])
    # in the runs: its upper bound from the run by upper bound, its lower from the other
    high = [float(bands.hi[k]) for k in range(bands.hs, len(bands.hi))
            if bands.hrow[k] == row and bands.haid[k] == aid]
    low = [-float(bands.lneg[k]) for k in range(bands.ls, len(bands.lneg))
           if bands.lrow[k] == row and bands.laid[k] == aid]
    return (low[0], high[0]) if high and low else None


def risk_config() -> RiskConfig:
    return parse_config(RISK)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10_000), edges=st.lists(st.sampled_from(
    ["lo", "hi", "lo-in", "hi-in", "lo-out", "hi-out", "same", "jump"]), min_size=20,
    max_size=60))
def test_ticks_at_the_very_edges_of_bands_change_nothing_the_reference_would_see(
    seed: int, edges: list[str],
) -> None:
    """Adversarial ticks placed exactly on, one ulp inside and one ulp outside some account's
    band: the engine still agrees with the reference, event for event."""
    config = risk_config()
    rng = random.Random(seed)
    engine, reference = Engine(config), ReferenceEngine(config)
    setup = stream(seed, 300, accounts=8, shock_rate=0.05, late_btc=False)
    for record, source in setup:
        assert_same_events(engine.apply(record, source), reference.apply(record, source), "")
    ts = 10**9
    for n, edge in enumerate(edges):
        names = list(engine.accounts)
        symbol = rng.choice(sorted(START))
        base = engine.prices.get(symbol, START[symbol])
        price = base
        candidates = [band_of(engine, name, symbol) for name in names]
        bands = [b for b in candidates if b is not None and all(map(math.isfinite, b))]
        if edge == "jump" or not bands:
            price = base * math.exp(rng.gauss(0, 0.05))
        elif edge != "same":
            lo, hi = rng.choice(bands)
            price = {"lo": lo, "hi": hi, "lo-in": math.nextafter(lo, math.inf),
                     "hi-in": math.nextafter(hi, -math.inf),
                     "lo-out": math.nextafter(lo, -math.inf),
                     "hi-out": math.nextafter(hi, math.inf)}[edge]
        if not price > 0:
            continue
        tick = PriceTick(symbol, price, ts + n)
        source = Source("prices", 0, n)
        assert_same_events(engine.apply(tick, source), reference.apply(tick, source),
                           f"{edge} tick {n}")
    assert_settled(engine)
    assert {a: x.state for a, x in engine.accounts.items()} == {
        a: x.state for a, x in reference.accounts.items()}


def test_an_account_exactly_on_a_threshold_is_reevaluated_on_every_tick(risk) -> None:
    """MARGIN_CALL at a ratio of exactly 0.75 = 150/200 = margin_call − hysteresis: it stays
    (≥ 0.75), its band is empty, so even the smallest move down recovers it at once — a band
    never delays a transition."""
    engine = Engine(risk)
    engine.load_prices({"BTC-PERP": (50_000.0, 1)})
    engine.load_account("a", Account(balances={"USDT": 200.0},
                                      positions={"BTC-PERP": Position(0.75, 50_000.0)},
                                      state=AccountState.MARGIN_CALL, transitions=1))
    engine.index_restored()
    assert engine.valuation("a").ratio == 0.75  # type: ignore[union-attr]
    assert band_of(engine, "a", "BTC-PERP") == (50_000.0, 50_000.0)
    assert engine.apply(PriceTick("BTC-PERP", 50_000.0, 2), Source("prices", index=3)) == []
    assert band_of(engine, "a", "BTC-PERP") == (50_000.0, 50_000.0)  # re-valued, still on it
    (event,) = engine.apply(PriceTick("BTC-PERP", 50_000.01, 3), Source("prices", index=4))
    assert event.type == "recovered" and event.payload["margin_ratio"] < 0.75
    lo, hi = band_of(engine, "a", "BTC-PERP")  # type: ignore[misc]
    assert lo < 50_000.01 < hi  # healthy now, with room to move


def test_accounts_view_reads_like_the_old_dicts(risk) -> None:
    import copy

    engine = Engine(risk)
    engine.apply(PriceTick("BTC", 50_000.0, 1), Source("prices", index=0))
    engine.apply(LedgerEntry("d", "a", "USDT", 1000.0, "deposit", 1), Source("ledger", 0, 5))
    engine.apply(LedgerEntry("e", "a", "BTC", 0.1, "deposit", 1), Source("ledger", 0, 6))
    engine.apply(Fill(fill_id="f", account="a", symbol="ETH-PERP", side="sell", qty=10.0,
                      price=2_500.0, fee=1.0, ts=1),
                 Source("fills", 0, 7))
    engine.apply(Fill(fill_id="g", account="a", symbol="BTC-PERP", side="buy", qty=0.01,
                      price=50_000.0, fee=0.0, ts=1),
                 Source("fills", 0, 8))
    account = engine.accounts["a"]
    assert account.balances == {"USDT": 999.0, "BTC": 0.1}
    assert list(account.positions) == ["ETH-PERP", "BTC-PERP"]  # the order they were opened
    assert account.positions["ETH-PERP"] == Position(-10.0, 2_500.0)
    assert (account.state, account.transitions, account.partition) == (
        AccountState.HEALTHY, 0, 0)
    assert account.watched == {"BTC", "BTC-PERP", "ETH-PERP"}
    assert "a" in engine.accounts and "b" not in engine.accounts
    assert engine.accounts.get("b") is None and len(engine.accounts) == 1
    before = copy.deepcopy(engine.accounts)
    assert before == engine.accounts and isinstance(before, dict)
    engine.apply(LedgerEntry("w", "a", "USDT", -1.0, "withdrawal", 2), Source("ledger", 0, 9))
    assert before != engine.accounts


# -- fills and ledger entries a run at a time (Engine.apply_account_records) ----------------------

def apply_in_runs(engine: Engine, records: list[tuple[InputRecord, Source]]
                  ) -> list[list[Event] | Rejected]:
    """Each record's outcome, fills and ledger entries applied a run at a time as the service
    applies them (ticks one by one)."""
    return engine.apply_records([r for r, _ in records], [s for _, s in records])


def apply_one_by_one(engine: Engine, records: list[tuple[InputRecord, Source]]
                     ) -> list[list[Event] | Rejected]:
    outcomes: list[list[Event] | Rejected] = []
    for record, source in records:
        try:
            outcomes.append(engine.apply(record, source))
        except Rejected as rejection:
            outcomes.append(rejection)
    return outcomes


def assert_identical_engines(runs: Engine, single: Engine) -> None:
    """Bit for bit: every account, isolated position, counter and duplicate window."""
    assert dict(runs.accounts) == dict(single.accounts)
    assert dict(runs.units) == dict(single.units)
    assert runs.stats == single.stats
    assert runs.accounts_in_state == single.accounts_in_state
    assert runs.units_in_state == single.units_in_state
    assert runs.positions_held == single.positions_held
    in_runs, one_by_one = (set(zip(t.keys, t.partitions.tolist(), strict=True))
                           for t in (runs.take_dirty(), single.take_dirty()))
    assert in_runs == one_by_one
    for topic in ("fills", "ledger"):
        assert runs.dedupe_ids(topic, 0) == single.dedupe_ids(topic, 0)
    for symbol in runs.config.price_symbols():
        assert runs.accounts_moved_by(symbol) == single.accounts_moved_by(symbol), symbol


def assert_same_outcomes(runs: list[list[Event] | Rejected],
                         single: list[list[Event] | Rejected]) -> None:
    assert len(runs) == len(single)
    for n, (mine, theirs) in enumerate(zip(runs, single, strict=True)):
        if isinstance(theirs, Rejected):
            assert isinstance(mine, Rejected) and mine.reason == theirs.reason, f"record {n}"
        else:
            assert not isinstance(mine, Rejected), f"record {n}"
            assert [e.payload for e in mine] == [e.payload for e in theirs], f"record {n}"


@pytest.mark.parametrize(("seed", "isolated"), [(21, 0.0), (22, 0.3)])
def test_fills_and_ledger_entries_in_runs_give_exactly_what_one_by_one_gives(
        seed: int, isolated: float) -> None:
    # shocks, flips, exact closes, producer retries, new accounts; with isolated positions
    # their fills, margin transfers and mode conflicts in the middle of runs
    config = parse_config(RISK)
    records = stream(seed, 12_000, accounts=250, shock_rate=0.02, isolated=isolated)
    runs, single = Engine(config), Engine(config)
    outcomes = apply_in_runs(runs, records)
    expected = apply_one_by_one(single, records)
    assert_same_outcomes(outcomes, expected)
    assert sum(isinstance(o, list) and bool(o) for o in expected) > 100  # events among them
    assert (sum(isinstance(o, Rejected) for o in expected) > 0) == (isolated > 0)
    assert_identical_engines(runs, single)


def test_a_run_longer_than_one_chunk_gives_what_one_by_one_gives() -> None:
    # 1,000 fills and funding entries in a row: four compiled chunks of AccountRun.SIZE
    config = parse_config(RISK)
    records = [(r, s) for r, s in stream(23, 2_500, accounts=60, shock_rate=0.0)
               if not isinstance(r, PriceTick)]
    opening = [(PriceTick(symbol, price, 1), Source("prices", 0, n))
               for n, (symbol, price) in enumerate(START.items())]
    records = opening + records
    assert len(records) - len(opening) > 4 * store.AccountRun.SIZE
    runs, single = Engine(config), Engine(config)
    assert_same_outcomes(apply_in_runs(runs, records), apply_one_by_one(single, records))
    assert_identical_engines(runs, single)


def test_an_account_emptied_and_funded_again_within_one_run_starts_a_new_row() -> None:
    # the withdrawal leaves a blank account, forgotten (SPEC §5); the deposit after it, in
    # the same run, opens it anew, as one-by-one application does
    config = parse_config(RISK)
    records: list[tuple[InputRecord, Source]] = [
        (LedgerEntry("d1", "a", "USDT", 100.0, "deposit", 1), Source("ledger", 0, 0)),
        (LedgerEntry("d2", "b", "USDT", 50.0, "deposit", 1), Source("ledger", 0, 1)),
        (LedgerEntry("w1", "a", "USDT", -100.0, "withdrawal", 2), Source("ledger", 0, 2)),
        (LedgerEntry("d3", "b", "USDT", 5.0, "deposit", 2), Source("ledger", 0, 3)),
        (LedgerEntry("d4", "a", "USDT", 30.0, "deposit", 3), Source("ledger", 0, 4)),
        (LedgerEntry("d4", "a", "USDT", 30.0, "deposit", 3), Source("ledger", 0, 5)),  # again
    ]
    runs, single = Engine(config), Engine(config)
    for engine in (runs, single):  # both accounts held before the run, so it is all plain
        engine.apply(*records[0])
        engine.apply(*records[1])
    outcomes = runs.apply_account_records([r for r, _ in records[2:]],
                                          [s for _, s in records[2:]])
    assert outcomes == []
    apply_one_by_one(single, records[2:])
    assert runs.accounts["a"].balances == {"USDT": 30.0}
    assert runs.stats.duplicates == 1
    assert_identical_engines(runs, single)


def test_runs_after_a_restore_skip_exactly_what_one_by_one_skips() -> None:
    # restored accounts with marks: their re-read records are skipped in runs as one by one,
    # and once the marks are released the runs are compiled again
    config = parse_config(RISK)
    records = stream(9, 6_000, accounts=150, shock_rate=0.03)
    cut = 3_000
    warm = Engine(config)
    apply_one_by_one(warm, records[:cut])
    accounts, prices = snapshot(warm)
    rng = random.Random(3)
    marks = {name: {("prices", 0): rng.randrange(1_000, 2_000),
                    ("fills", 0): rng.randrange(1_000, 1_800)}
             for name in accounts if rng.random() < 0.4}
    runs, single = Engine(config), Engine(config)
    for engine in (runs, single):
        engine.load_prices(prices)
        for name, account in accounts.items():
            copy = Account(balances=dict(account.balances),
                           positions={s: Position(p.qty, p.entry_price)
                                      for s, p in account.positions.items()},
                           state=account.state, transitions=account.transitions,
                           partition=account.partition)
            engine.load_account(name, copy, dict(marks[name]) if name in marks else None)
    pending = len(marked(runs))
    assert pending > 0
    seen: dict[tuple[str, int | None], int] = {}
    for start in range(cut, len(records), 250):
        chunk = records[start:start + 250]
        assert_same_outcomes(apply_in_runs(runs, chunk), apply_one_by_one(single, chunk))
        for _, source in chunk:
            seen[(source.topic, source.partition)] = (source.offset or 0) + 1
        for engine in (runs, single):
            engine.release_caught_up(seen)
    assert len(marked(runs)) < pending  # some released: later runs compiled again
    assert_identical_engines(runs, single)
