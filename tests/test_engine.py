"""Per-record processing (SPEC §5–§6): which accounts are evaluated, and the events.

The main account, "a", holds 300 USDT and is long 1 BTC-PERP from 50,000, so at mark p:
equity = 300 + (p − 50,000) and MM = 0.004 · p (tier 1). Its ratio reaches 0.8 at
p ≤ 49,949.75 and 1.0 at p ≤ 49,899.60.
"""

from __future__ import annotations

import pytest

from monitor.account import UnitKey
from monitor.engine import Engine
from monitor.events import Source
from monitor.records import Fill, LedgerEntry, PriceTick
from monitor.reference import ReferenceEngine
from tests.support.records import fill, ledger, tick, types


@pytest.fixture
def engine(risk) -> Engine:
    engine = Engine(risk)
    tick(engine, "BTC-PERP", 50_000.0)
    ledger(engine, "a", "USDT", 300.0)
    fill(engine, "a", "BTC-PERP", 1.0, 50_000.0)  # 200 / 300 = 0.667: healthy
    return engine


def test_every_transition_up_and_down_with_hysteresis(engine) -> None:
    assert types(tick(engine, "BTC-PERP", 49_940.0)) == ["margin_call"]  # 199.76 / 240 = 0.832
    assert types(tick(engine, "BTC-PERP", 49_890.0)) == ["liquidation"]  # 199.56 / 190 = 1.050
    assert tick(engine, "BTC-PERP", 49_905.0) == []  # 199.62 / 205 = 0.974 ≥ 0.95: stays
    assert types(tick(engine, "BTC-PERP", 49_915.0)) == ["margin_call"]  # 199.66 / 215 = 0.929
    assert tick(engine, "BTC-PERP", 49_960.0) == []  # 199.84 / 260 = 0.769 ≥ 0.75: stays
    assert types(tick(engine, "BTC-PERP", 49_980.0)) == ["recovered"]  # 199.92 / 280 = 0.714


def test_event_ids_count_the_accounts_transitions(engine) -> None:
    ids = [e.event_id for p in (49_940.0, 49_890.0, 49_915.0, 49_980.0)
           for e in tick(engine, "BTC-PERP", p)]
    assert ids == ["a:1:margin_call", "a:2:liquidation", "a:3:margin_call", "a:4:recovered"]


def test_healthy_straight_to_liquidation(engine) -> None:
    (event,) = tick(engine, "BTC-PERP", 49_890.0)
    assert (event.payload["previous_state"], event.payload["state"]) == (
        "HEALTHY", "LIQUIDATING")


def test_event_payload_is_complete(engine) -> None:
    (event,) = tick(engine, "BTC-PERP", 49_890.0, ts=1_732_400_000_123)
    p = event.payload
    assert p["ts"] == 1_732_400_000_123
    assert p["trigger"] == {"kind": "price", "ref": "BTC-PERP", "topic": "prices", "index": 7}
    assert p["margin_ratio"] == pytest.approx(199.56 / 190)
    assert (p["insolvent"], p["unpriced"]) == (False, False)
    assert p["equity"] == pytest.approx(190.0)
    assert p["collateral_value"] == pytest.approx(300.0)
    assert p["unrealized_pnl"] == pytest.approx(-110.0)
    assert p["maintenance_margin"] == pytest.approx(199.56)
    assert p["initial_margin"] == pytest.approx(399.12)
    assert p["balances"] == {"USDT": 300.0}
    (pos,) = p["positions"]
    assert pos["symbol"] == "BTC-PERP" and pos["qty"] == 1.0
    assert pos["entry_price"] == 50_000.0 and pos["mark_price"] == 49_890.0
    assert pos["notional"] == pytest.approx(49_890.0)
    # Binance, one long in tier 1: (300 − 1·50,000) / (0.004 − 1) = 49,899.598…
    assert pos["liquidation_price"] == pytest.approx((300 - 50_000) / (0.004 - 1))
    assert event.encode(emitted_at_ms=5).endswith(b',"emitted_at":5}')


def test_insolvent_account_reports_null_ratio(engine) -> None:
    (event,) = tick(engine, "BTC-PERP", 49_600.0)  # equity 300 − 400 = −100
    assert event.type == "liquidation"
    assert event.payload["margin_ratio"] is None
    assert event.payload["insolvent"] is True


def test_positions_closed_while_liquidating_recover_the_account(engine) -> None:
    tick(engine, "BTC-PERP", 49_890.0)
    (event,) = fill(engine, "a", "BTC-PERP", -1.0, 49_890.0)  # realized −110
    assert event.type == "recovered"
    assert event.payload["margin_ratio"] == 0.0
    assert event.payload["positions"] == []
    assert event.payload["balances"] == {"USDT": pytest.approx(190.0)}


@pytest.fixture
def bankrupt(risk) -> Engine:
    """"d": 100 USDT, long 0.1 + 0.2 BTC-PERP from 50,000 (q = 0.30000000000000004); at
    49,600 equity is 100 − 0.3 · 400 = −20: insolvent, liquidated."""
    engine = Engine(risk)
    tick(engine, "BTC-PERP", 50_000.0)
    ledger(engine, "d", "USDT", 100.0)
    fill(engine, "d", "BTC-PERP", 0.1, 50_000.0)
    fill(engine, "d", "BTC-PERP", 0.2, 50_000.0)
    assert types(tick(engine, "BTC-PERP", 49_600.0)) == ["liquidation"]
    return engine


def test_close_out_in_decimal_lots_leaves_a_bankrupt_account_flat_and_healthy(bankrupt) -> None:
    # The close-out sells 0.3: the −120 loss leaves −20 USDT of bad debt and no position, so
    # MM = 0 and the ratio is 0 (SPEC §4), not +inf from a 5.6e-17 BTC dust position.
    (event,) = fill(bankrupt, "d", "BTC-PERP", -0.3, 49_600.0)
    assert (event.type, event.payload["margin_ratio"]) == ("recovered", 0.0)
    assert event.payload["equity"] == pytest.approx(-20.0)
    assert event.payload["positions"] == []
    assert bankrupt.accounts["d"].positions == {}


def test_closed_out_account_is_not_liquidated_again_as_its_balance_moves(bankrupt) -> None:
    fill(bankrupt, "d", "BTC-PERP", -0.3, 49_600.0)  # flat, −20 USDT
    assert ledger(bankrupt, "d", "USDT", 30.0) == []  # +10 USDT
    assert ledger(bankrupt, "d", "USDT", -15.0) == []  # −5 USDT: still no requirement
    assert tick(bankrupt, "BTC-PERP", 49_000.0) == []


def test_hedged_account_survives_where_one_leg_alone_is_liquidated(risk) -> None:
    engine = Engine(risk)
    tick(engine, "BTC-PERP", 50_000.0)
    tick(engine, "ETH-PERP", 2_500.0)
    for account in ("hedged", "naked"):
        ledger(engine, account, "USDT", 3_000.0)
        fill(engine, account, "BTC-PERP", 1.0, 50_000.0)
    # 200 contracts · 0.1 ETH short: N = 50,000, tier 2: MM = 1000 − 100 = 900.
    assert fill(engine, "hedged", "ETH-PERP", -200.0, 2_500.0) == []  # 1100 / 3000
    assert tick(engine, "ETH-PERP", 2_350.0) == []  # the short gains 200 · 0.1 · 150 = 3000
    events = tick(engine, "BTC-PERP", 47_000.0)  # the long loses 3000
    assert [(e.account, e.type) for e in events] == [("naked", "liquidation")]  # equity 0
    # hedged: (47,000 · 0.004 + 47,000 · 0.02 − 100) / (3000 − 3000 + 3000) = 0.343
    assert engine.accounts["hedged"].state.name == "HEALTHY"


def test_events_of_one_tick_come_in_ascending_account_order(risk) -> None:
    engine = Engine(risk)
    tick(engine, "BTC-PERP", 50_000.0)
    for account in ("c", "a", "b"):
        ledger(engine, account, "USDT", 300.0)
        fill(engine, account, "BTC-PERP", 1.0, 50_000.0)
    assert [e.account for e in tick(engine, "BTC-PERP", 49_890.0)] == ["a", "b", "c"]


def test_a_tick_moves_only_the_accounts_exposed_to_its_symbol(risk) -> None:
    engine = Engine(risk)
    ledger(engine, "usdt-only", "USDT", 100.0)
    ledger(engine, "btc-holder", "BTC", 1.0)
    ledger(engine, "btc-settled", "USDT", 100.0)
    fill(engine, "btc-settled", "ETHBTC-PERP", 1.0, 0.05)
    ledger(engine, "emptied", "ETH", 2.0)
    ledger(engine, "emptied", "ETH", -2.0, entry_id="w")
    assert engine.accounts_moved_by("BTC") == {"btc-holder", "btc-settled"}
    assert engine.accounts_moved_by("ETHBTC-PERP") == {"btc-settled"}
    assert engine.accounts_moved_by("ETH") == frozenset()


def test_account_with_unpriced_settle_asset_waits_for_its_price(risk) -> None:
    engine = Engine(risk)
    ledger(engine, "a", "BTC", 0.01)
    assert fill(engine, "a", "ETHBTC-PERP", 100.0, 0.05) == []  # no BTC price: not evaluated
    assert engine.stats.unevaluated == 1
    # BTC arrives: N = 5 BTC · 0.01 = 0.05 BTC MM → 3000; equity 0.01 · 60,000 · 0.95 = 570.
    (event,) = tick(engine, "BTC", 60_000.0)
    assert event.type == "liquidation"
    assert event.payload["trigger"]["ref"] == "BTC"


def test_unpriced_collateral_is_flagged_in_events(engine) -> None:
    ledger(engine, "a", "ETH", 1.0)  # ETH has no price yet: contributes 0, flagged
    (event,) = tick(engine, "BTC-PERP", 49_890.0)
    assert event.payload["unpriced"] is True


def test_stale_tick_is_ignored_and_equal_ts_applies(engine) -> None:
    tick(engine, "BTC-PERP", 50_000.0, ts=10)
    assert tick(engine, "BTC-PERP", 49_890.0, ts=9) == []
    assert engine.stats.stale_ticks == 1
    assert engine.prices["BTC-PERP"] == 50_000.0
    assert types(tick(engine, "BTC-PERP", 49_890.0, ts=10)) == ["liquidation"]


def test_duplicate_fill_is_ignored_but_same_id_on_another_account_applies(engine) -> None:
    fill(engine, "a", "BTC-PERP", 1.0, 50_000.0, fill_id="t-1")
    fill(engine, "a", "BTC-PERP", 1.0, 50_000.0, fill_id="t-1")
    assert engine.accounts["a"].positions["BTC-PERP"].qty == 2.0
    assert engine.stats.duplicates == 1
    ledger(engine, "b", "USDT", 1000.0)
    fill(engine, "b", "BTC-PERP", -1.0, 50_000.0, fill_id="t-1")  # the other side of the trade
    assert engine.accounts["b"].positions["BTC-PERP"].qty == -1.0


def test_duplicate_ledger_entry_is_ignored(engine) -> None:
    ledger(engine, "a", "USDT", 50.0, entry_id="dep-9")
    ledger(engine, "a", "USDT", 50.0, entry_id="dep-9")
    assert engine.accounts["a"].balances["USDT"] == 350.0


def test_dedupe_window_is_bounded(risk) -> None:
    engine = Engine(risk, dedupe_window=2)
    for entry_id in ("d1", "d2", "d3", "d1"):  # d1 left the window when d3 arrived
        ledger(engine, "a", "USDT", 1.0, entry_id=entry_id)
    assert engine.accounts["a"].balances["USDT"] == 4.0


# -- reflects: was a record taken into account already (an input log that ends early) ------


def test_a_fill_or_entry_reflects_when_its_id_is_in_its_partitions_window(risk) -> None:
    engine = Engine(risk, dedupe_window=2)
    ledgers, fills = Source("ledger", index=5), Source("fills", index=3)  # tests.support.records
    for entry_id in ("d1", "d2", "d3"):  # d1 leaves the window when d3 comes
        ledger(engine, "a", "USDT", 1.0, entry_id=entry_id)
    fill(engine, "a", "BTC-PERP", 0.001, 50_000.0, fill_id="f1")
    assert engine.reflects(LedgerEntry("d3", "a", "USDT", 1.0, "deposit", 1), ledgers)
    assert not engine.reflects(LedgerEntry("d4", "a", "USDT", 1.0, "deposit", 1), ledgers)
    assert not engine.reflects(LedgerEntry("d3", "b", "USDT", 1.0, "deposit", 1), ledgers)
    assert not engine.reflects(LedgerEntry("d1", "a", "USDT", 1.0, "deposit", 1), ledgers)
    assert engine.reflects(Fill(fill_id="f1", account="a", symbol="BTC-PERP", side="buy", qty=0.001,
                                price=50_000.0, fee=0.0, ts=1), fills)
    assert not engine.reflects(Fill(fill_id="f1", account="a", symbol="BTC-PERP", side="buy",
                                    qty=0.001, price=50_000.0, fee=0.0, ts=1),
                               Source("fills", partition=2, offset=0))  # another window


def test_a_tick_reflects_up_to_its_symbols_last_applied_time(engine) -> None:
    prices = Source("prices", index=7)
    tick(engine, "BTC-PERP", 50_000.0, ts=10)
    assert engine.reflects(PriceTick("BTC-PERP", 49_000.0, 9), prices)
    assert engine.reflects(PriceTick("BTC-PERP", 50_000.0, 10), prices)
    assert not engine.reflects(PriceTick("BTC-PERP", 50_000.0, 11), prices)
    assert not engine.reflects(PriceTick("ETH-PERP", 3_000.0, 1), prices)  # none applied yet
    assert engine.reflects(PriceTick("DOGE", 0.1, 1), prices) is None  # nothing priced by it


def test_an_account_forgotten_blank_keeps_the_partition_it_lived_in_for_its_tombstone(
        risk) -> None:
    """Its tombstone must go where its snapshot is, not where the record that emptied it came
    from: one keyed by something else than the account comes from another partition."""
    engine = Engine(risk)
    engine.apply(LedgerEntry("d1", "b", "USDT", 100.0, "deposit", 1),
                 Source("ledger", partition=0, offset=0))
    engine.apply(LedgerEntry("w1", "b", "USDT", -100.0, "withdrawal", 2),
                 Source("ledger", partition=1, offset=0))
    assert ("b" not in engine.accounts, engine.partition_of("b")) == (True, None)
    taken = engine.take_dirty()
    assert (taken.keys, taken.partitions.tolist()) == (["b"], [0])
    engine.mark_dirty(["b"])  # a checkpoint that failed puts it back: still known
    taken = engine.take_dirty()
    assert (taken.keys, taken.partitions.tolist()) == (["b"], [0])
    assert engine.take_dirty().keys == []


def test_blank_account_is_forgotten_but_one_with_history_is_kept(engine) -> None:
    ledger(engine, "x", "USDT", 10.0)
    ledger(engine, "x", "USDT", -10.0, entry_id="out")
    assert "x" not in engine.accounts
    tick(engine, "BTC-PERP", 49_890.0)  # "a" liquidated: its counter must survive
    fill(engine, "a", "BTC-PERP", -1.0, 49_890.0)
    ledger(engine, "a", "USDT", -190.0, entry_id="withdraw-all")
    assert engine.accounts["a"].transitions == 2


@pytest.mark.parametrize("make", [Engine, ReferenceEngine])
def test_changed_units_are_handed_out_with_the_partition_each_lives_in(risk, make) -> None:
    """Held in partition 3, held in replay (no partition: -1), an isolated position (its
    account's partition), each handed out once."""
    engine = make(risk)
    engine.apply(LedgerEntry("d1", "a", "USDT", 100.0, "deposit", 1),
                 Source("ledger", partition=3, offset=0))
    engine.apply(LedgerEntry("d2", "r", "USDT", 100.0, "deposit", 1), Source("ledger", index=0))
    engine.apply(Fill(fill_id="f1", account="a", symbol="BTC-PERP", side="buy", qty=0.001,
                      price=50_000.0, fee=0.0, ts=2, margin_mode="isolated"),
                 Source("fills", partition=3, offset=0))
    taken = engine.take_dirty()
    assert dict(zip(taken.keys, taken.partitions.tolist(), strict=True)) == {
        "a": 3, "r": -1, UnitKey("a", "BTC-PERP"): 3}
    assert engine.take_dirty().keys == []


@pytest.mark.parametrize("make", [Engine, ReferenceEngine])
def test_units_changed_elsewhere_are_handed_out_in_their_partition_unless_known_here(
        risk, make) -> None:
    """A catch-up's private engine changed "a" (held here, in partition 3), "gone" (forgotten
    there: held nowhere) and "b" (forgotten here, in partition 1): each in the partition
    this engine knows for it, else the one given."""
    engine = make(risk)
    engine.apply(LedgerEntry("d1", "a", "USDT", 100.0, "deposit", 1),
                 Source("ledger", partition=3, offset=0))
    engine.apply(LedgerEntry("d2", "b", "USDT", 100.0, "deposit", 1),
                 Source("ledger", partition=1, offset=0))
    engine.apply(LedgerEntry("w2", "b", "USDT", -100.0, "withdrawal", 2),
                 Source("ledger", partition=1, offset=1))
    engine.mark_dirty(["a", "gone", "b"], partition=2)
    taken = engine.take_dirty()
    assert dict(zip(taken.keys, taken.partitions.tolist(), strict=True)) == {
        "a": 3, "gone": 2, "b": 1}
    engine.mark_dirty(taken.keys)  # a checkpoint that failed: the same partitions again
    again = engine.take_dirty()
    assert dict(zip(again.keys, again.partitions.tolist(), strict=True)) == {
        "a": 3, "gone": 2, "b": 1}


def test_a_unit_put_back_by_its_row_is_handed_out_again(risk) -> None:
    engine = Engine(risk)
    for n, account in enumerate(("a", "b")):
        engine.apply(LedgerEntry(f"d{n}", account, "USDT", 100.0, "deposit", 1),
                     Source("ledger", partition=n, offset=0))
    taken = engine.take_dirty()
    engine.mark_dirty(taken.keys, taken.rows)
    again = engine.take_dirty()
    assert (again.keys, again.rows.tolist(), again.partitions.tolist()) == (
        taken.keys, taken.rows.tolist(), [0, 1])


def test_a_row_handed_out_then_given_to_another_account_is_not_its_snapshot(risk) -> None:
    """"a" is emptied (forgotten) after a checkpoint took it, and "c" gets its row: the
    snapshot of "a" is none (a tombstone); its put-back goes by key, not by that row."""
    engine = Engine(risk)
    engine.apply(LedgerEntry("d1", "a", "USDT", 100.0, "deposit", 1),
                 Source("ledger", partition=0, offset=0))
    taken = engine.take_dirty()
    engine.apply(LedgerEntry("w1", "a", "USDT", -100.0, "withdrawal", 2),
                 Source("ledger", partition=0, offset=1))
    engine.apply(LedgerEntry("d2", "c", "USDT", 7.0, "deposit", 3),
                 Source("ledger", partition=0, offset=2))
    assert engine.take_dirty().rows.tolist() == taken.rows.tolist()  # "c" holds that row
    assert engine.snapshots(taken.keys, taken.rows).ids == []
    engine.mark_dirty(taken.keys, taken.rows)
    again = engine.take_dirty()
    assert (again.keys, again.rows.tolist(), again.partitions.tolist()) == (["a"], [], [0])


def test_a_unit_emptied_and_funded_again_is_snapshotted_from_its_new_row(risk) -> None:
    engine = Engine(risk)
    engine.apply(LedgerEntry("d1", "a", "USDT", 100.0, "deposit", 1),
                 Source("ledger", partition=0, offset=0))
    engine.apply(LedgerEntry("d2", "b", "USDT", 50.0, "deposit", 1),
                 Source("ledger", partition=0, offset=1))
    taken = engine.take_dirty()
    engine.apply(LedgerEntry("w1", "a", "USDT", -100.0, "withdrawal", 2),
                 Source("ledger", partition=0, offset=2))
    engine.apply(LedgerEntry("d3", "c", "USDT", 7.0, "deposit", 3),  # takes the row of "a"
                 Source("ledger", partition=0, offset=3))
    engine.apply(LedgerEntry("d4", "a", "USDT", 30.0, "deposit", 4),
                 Source("ledger", partition=0, offset=4))
    snapshots = engine.snapshots(taken.keys, taken.rows)
    assert (snapshots.ids, snapshots.bal_amount.tolist()) == (["a", "b"], [30.0, 50.0])


@pytest.mark.parametrize("make", [Engine, ReferenceEngine])
def test_snapshots_are_those_of_the_keys_held_in_the_keys_order(risk, make) -> None:
    """Those forgotten since a checkpoint took them get tombstones instead."""
    engine = make(risk)
    for n, account in enumerate(("b", "a", "c")):
        engine.apply(LedgerEntry(f"d{n}", account, "USDT", 10.0 + n, "deposit", 1),
                     Source("ledger", partition=0, offset=n))
    snapshots = engine.snapshots(["c", "gone", "a", UnitKey("a", "BTC-PERP")])
    assert snapshots.ids == ["c", "a"]
    assert snapshots.bal_amount.tolist() == [12.0, 11.0]


@pytest.mark.parametrize("make", [Engine, ReferenceEngine])
def test_a_price_s_first_tick_values_each_account_waiting_for_it_once(risk, make) -> None:
    """1,000 accounts hold 150 USDT and 0.01 BTC and go long 1 BTC-PERP from 50,000 before BTC
    has a price: equity 150 against MM 200 (BTC counts nothing yet), so each is liquidated at
    its fill. Each waits for BTC under an empty band, which any price leaves from both
    sides: most of those bands sit in both of the symbol's sorted runs, so the first tick
    finds ~1,900 entries in a book of 1,024 rows. BTC at 50,000 adds 0.01 · 50,000 · 0.95 =
    475: equity 625, ratio 0.32, and each account recovers exactly once."""
    engine = make(risk)
    tick(engine, "BTC-PERP", 50_000.0)
    accounts = [f"a{n:04d}" for n in range(1_000)]
    for account in accounts:
        ledger(engine, account, "USDT", 150.0)
        ledger(engine, account, "BTC", 0.01)
        assert types(fill(engine, account, "BTC-PERP", 1.0, 50_000.0)) == ["liquidation"]
    events = tick(engine, "BTC", 50_000.0)
    assert [(e.account, e.type) for e in events] == [(a, "recovered") for a in accounts]
    assert {e.payload["margin_ratio"] for e in events} == {200 / 625}
