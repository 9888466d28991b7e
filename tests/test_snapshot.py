"""Checkpoint format (SPEC §6): versioned, lossless, and loud about what it cannot read."""

from __future__ import annotations

import math
import struct
from dataclasses import replace

import numpy as np
import orjson
import pytest

from monitor.account import Account, RiskKey, UnitKey
from monitor.book.store import NotInConfig
from monitor.engine import Engine
from monitor.events import Source
from monitor.margin import Position
from monitor.records import Fill, LedgerEntry
from monitor.snapshot import (
    SNAPSHOT_VERSION,
    ZSTD_MAGIC,
    Control,
    Layout,
    SnapshotError,
    Snapshots,
    decode_account,
    decode_control,
    decode_layout,
    decode_snapshots,
    encode_account,
    encode_control,
    encode_snapshots,
    risk_key,
    state_key,
)
from monitor.state import AccountState
from tests.support.snapshots import json_snapshot

AS_OF = {("fills", 3): 120, ("ledger", 3): 40, ("prices", 0): 999}
SHORT = Account(balances={"USDT": 1234.5678901234567, "BTC": -0.1},
                positions={"BTC-PERP": Position(-0.30000000000000004, 61_234.5)},
                state=AccountState.LIQUIDATING, transitions=7, partition=3)


def round_trip(account: Account, seq: int = 12, as_of=AS_OF) -> tuple[Account, int, dict]:
    layout, raw = encode_account(account, seq, as_of)
    return decode_account(raw, {layout.id: layout})


def test_account_round_trip_is_exact() -> None:
    restored, seq, as_of = round_trip(SHORT)
    assert (restored.balances, restored.positions, restored.state, restored.transitions,
            restored.partition) == (SHORT.balances, SHORT.positions, SHORT.state, 7, 3)
    assert (seq, as_of) == (12, AS_OF)


def test_a_record_is_a_header_and_fixed_width_entries() -> None:
    # 38-byte header, 10 bytes a balance, 18 a position, 14 an input offset: 2 + 1 + 3 entries
    _, raw = encode_account(SHORT, 12, AS_OF)
    assert raw[:3] == b"LQ\x02"
    assert len(raw) == 38 + 2 * 10 + 1 * 18 + 3 * 14 == 118


def test_positions_keep_their_opening_order() -> None:
    account = Account(positions={"ETH-PERP": Position(1.0, 3_000.0),
                                 "BTC-PERP": Position(-2.0, 60_000.0),
                                 "ETHBTC-PERP": Position(3.0, 0.05)})
    assert list(round_trip(account)[0].positions) == ["ETH-PERP", "BTC-PERP", "ETHBTC-PERP"]


@pytest.mark.parametrize("bad", [math.inf, -math.inf])
def test_account_with_an_infinite_number_round_trips(bad: float) -> None:
    account = Account(balances={"USDT": bad, "BTC": 0.5},
                      positions={"BTC-PERP": Position(bad, 1e308)}, transitions=1, partition=0)
    restored, _, _ = round_trip(account, 3, {("ledger", 0): 4})
    assert restored.balances == {"USDT": bad, "BTC": 0.5}
    assert restored.positions == {"BTC-PERP": Position(bad, 1e308)}


def test_account_with_a_nan_number_round_trips() -> None:
    account = Account(balances={"USDT": math.nan}, positions={"BTC-PERP": Position(1.0, math.nan)})
    restored, _, _ = round_trip(account, 1, {})
    assert math.isnan(restored.balances["USDT"])
    assert restored.positions["BTC-PERP"].qty == 1.0
    assert math.isnan(restored.positions["BTC-PERP"].entry_price)


def test_an_account_without_partition_or_inputs_round_trips() -> None:
    restored, seq, as_of = round_trip(Account(balances={"USDT": 5.0}), 2,
                                      {("prices", None): 8})
    assert (restored.partition, seq, as_of) == (None, 2, {("prices", None): 8})


def test_a_json_snapshot_of_format_1_still_decodes() -> None:
    account = Account(balances={"USDT": 10.5}, positions={"BTC-PERP": Position(0.2, math.inf)},
                      state=AccountState.MARGIN_CALL, transitions=3, partition=1)
    restored, seq, as_of = decode_account(json_snapshot(account, 4, AS_OF))
    assert (restored, seq, as_of) == (account, 4, AS_OF)


def test_a_batch_of_json_and_binary_snapshots_decodes_both() -> None:
    old = Account(balances={"USDT": 1.0}, positions={"ETH-PERP": Position(2.0, 3_000.0)},
                  transitions=1, partition=0)
    layout, new = encode_account(SHORT, 9, AS_OF)
    batch = decode_snapshots([json_snapshot(old, 8, {("fills", 0): 5}), new], ["old", "new"],
                             {layout.id: layout})
    assert {account_id: (account, seq, as_of)
            for account_id, account, seq, as_of in batch.accounts()} == {
        "old": (old, 8, {("fills", 0): 5}), "new": (SHORT, 9, AS_OF)}


def test_no_snapshots_encode_to_no_records() -> None:
    # a checkpoint chunk of forgotten accounts only: their tombstones need no record encoded
    assert encode_snapshots(Snapshots.from_accounts([]))[1] == []


def test_snapshots_of_two_layouts_decode_together() -> None:
    # after --accept-config-change: accounts checkpointed under the old and the new config
    first, a = encode_account(Account(balances={"USDT": 1.0}), 1, {})
    second, b = encode_account(Account(positions={"BTC-PERP": Position(1.0, 2.0)}), 2, {})
    assert first.id != second.id
    batch = decode_snapshots([a, b], ["a", "b"], {first.id: first, second.id: second})
    assert [(i, x.balances, x.positions) for i, x, _, _ in batch.accounts()] == [
        ("a", {"USDT": 1.0}, {}), ("b", {}, {"BTC-PERP": Position(1.0, 2.0)})]


def test_a_layout_round_trips_and_its_id_is_a_digest_of_its_names() -> None:
    layout = Layout(("USDT", "BTC-PERP", "fills"))
    assert decode_layout(layout.encoded) == layout
    assert layout.id == Layout(("USDT", "BTC-PERP", "fills")).id
    assert layout.id != Layout(("BTC-PERP", "USDT", "fills")).id
    assert layout.key.startswith(b"\x00liqmon.layout.")


@pytest.mark.parametrize("raw", [b"[1]", b'{"v": 3, "names": []}', b'{"v": 2, "names": [1]}'])
def test_an_undecodable_layout_raises(raw: bytes) -> None:
    with pytest.raises(SnapshotError):
        decode_layout(raw)


def binary(header: dict | None = None, entries: bytes = b"") -> bytes:
    """A format 2 record of layout 1 with the given header fields changed."""
    fields = {"magic": b"LQ", "version": 2, "state": 0, "partition": 0, "transitions": 0,
              "seq": 1, "layout": 1, "balances": 0, "positions": 0, "as_of": 0, **(header or {})}
    return struct.pack("<2sBBiqqQHHH", *fields.values()) + entries


LAYOUT_1 = {1: Layout(("USDT", "BTC-PERP"))}


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"\x00garbage", "neither a JSON nor a binary snapshot"),
        (b"[1]", "neither a JSON nor a binary snapshot"),
        (b"", "neither a JSON nor a binary snapshot"),
        (b"LQ\x07 a record of a later liqmon", "unsupported snapshot format version 7"),
        (orjson.dumps({"v": 99}), "unsupported snapshot format version 99"),
        (binary()[:20], "truncated: 20 bytes"),
        (binary({"balances": 1}), "truncated or corrupt: 38 bytes where its header makes 48"),
        (binary({"balances": 1}, struct.pack("<Hd", 0, 1.0) + b"x"), "49 bytes"),
        (binary({"layout": 2}), "refers to layout 0000000000000002"),
        (binary({"balances": 1}, struct.pack("<Hd", 2, 1.0)), "beyond its layout of 2"),
        (binary({"state": 3}), "state 3 is not a state"),
        (binary({"positions": 2}, struct.pack("<Hdd", 1, 1.0, 2.0) * 2),
         "names an asset or an instrument twice"),
        (orjson.dumps({"v": 1, "seq": 1}), "account snapshot is malformed"),
        (orjson.dumps({"v": 1, "seq": 1, "as_of": [], "balances": {"USDT": "x"},
                       "positions": {}, "state": 0, "transitions": 0, "partition": 0}),
         "account snapshot is malformed"),
        (orjson.dumps({"v": 1, "seq": 1, "as_of": [], "balances": {}, "positions": {},
                       "state": 7, "transitions": 0, "partition": 0}),
         "account snapshot is malformed"),
        (orjson.dumps({"v": 1, "seq": 1, "as_of": [], "balances": {"USDT": None},
                       "positions": {}, "state": 0, "transitions": 0, "partition": 0}),
         "account snapshot is malformed"),
        (orjson.dumps({"v": 1, "seq": 1, "as_of": [], "balances": {"USDT": True},
                       "positions": {}, "state": 0, "transitions": 0, "partition": 0}),
         "account snapshot is malformed"),
        # numbers past the columns a restore puts them in (2^64 - 1, 2^31)
        (b'{"v": 1, "seq": 1, "as_of": [], "balances": {}, "positions": {}, "state": 0, '
         b'"transitions": 18446744073709551615, "partition": 0}',
         "18446744073709551615 does not fit 64 bits"),
        (b'{"v": 1, "seq": 1, "as_of": [["fills", 0, 18446744073709551615]], "balances": {}, '
         b'"positions": {}, "state": 0, "transitions": 0, "partition": 0}',
         "18446744073709551615 does not fit 64 bits"),
        (orjson.dumps({"v": 1, "seq": 1, "as_of": [], "balances": {}, "positions": {},
                       "state": 0, "transitions": 0, "partition": 2**31}),
         "2147483648 does not fit 32 bits"),
    ],
)
def test_undecodable_account_snapshots_raise(raw: bytes, message: str) -> None:
    with pytest.raises(SnapshotError, match=message):
        decode_account(raw, LAYOUT_1)


def test_an_instrument_repeated_nine_positions_later_is_caught() -> None:
    # runs longer than 8 entries are compared entry by entry beyond the 8th
    layout = {1: Layout(tuple(f"I{k}" for k in range(12)))}
    positions = [struct.pack("<Hdd", k, 1.0, 2.0) for k in (*range(10), 1)]
    fine = binary({"positions": 10}, b"".join(positions[:10]))
    repeated = binary({"positions": 11}, b"".join(positions))
    assert len(decode_account(fine, layout)[0].positions) == 10
    with pytest.raises(SnapshotError, match="names an asset or an instrument twice") as excinfo:
        decode_snapshots([fine, repeated], ["a", "b"], layout)
    assert excinfo.value.index == 1


def test_the_error_names_which_record_of_a_batch_is_bad() -> None:
    good = binary()
    with pytest.raises(SnapshotError) as excinfo:
        decode_snapshots([good, good, good[:-1], good], ["a", "b", "c", "d"], LAYOUT_1)
    assert excinfo.value.index == 2


def test_a_well_formed_record_of_layout_1_decodes() -> None:
    entries = struct.pack("<Hd", 0, 7.5) + struct.pack("<Hdd", 1, -1.0, 50.0)
    account, seq, as_of = decode_account(binary({"balances": 1, "positions": 1, "state": 2,
                                                 "transitions": 4, "partition": -1}, entries),
                                         LAYOUT_1)
    assert account == Account(balances={"USDT": 7.5}, positions={"BTC-PERP": Position(-1, 50)},
                              state=AccountState.LIQUIDATING, transitions=4, partition=None)
    assert (seq, as_of) == (1, {})


def test_names_given_first_keep_their_numbers_even_when_one_repeats() -> None:
    # the reference engine numbers the config's assets, then its instruments: one name may
    # be both
    snapshots = Snapshots.from_accounts([("a", Account(balances={"X": 1.0}), 0, {})],
                                        names=["X", "Y", "X"])
    assert snapshots.names == ["X", "Y"]
    assert next(snapshots.accounts())[1].balances == {"X": 1.0}


def test_more_names_than_a_record_can_number_is_refused() -> None:
    many = Snapshots.from_accounts([("a", Account(), 1, {})])
    many.names = [f"n{k}" for k in range(70_000)]
    with pytest.raises(ValueError, match=f"too large for format {SNAPSHOT_VERSION}"):
        encode_snapshots(many)


def test_control_with_an_infinite_price_round_trips() -> None:
    control = Control(seq=1, written_at=1, offsets={}, prices={"BTC": (math.inf, 17)})
    assert decode_control(encode_control(control)) == control


def test_control_round_trip_keeps_window_order() -> None:
    control = Control(seq=4, written_at=1, offsets={("fills", 0): 10, ("prices", 1): 5},
                      prices={"BTC": (65_000.5, 17)},
                      dedupe={("fills", 0): [("a", "f2"), ("b", "f1")], ("ledger", 0): []})
    assert decode_control(encode_control(control)) == control


def test_undecodable_control_raises() -> None:
    with pytest.raises(SnapshotError, match="control record is malformed"):
        decode_control(orjson.dumps({"v": 1, "seq": "x"}))


def test_control_keeps_the_config_fingerprint() -> None:
    control = Control(seq=2, written_at=1, offsets={}, prices={}, config="1099e72073f623b0")
    assert decode_control(encode_control(control)).config == "1099e72073f623b0"


def test_control_written_before_fingerprints_decodes_without_one() -> None:
    old = orjson.dumps({"v": 1, "seq": 3, "written_at": 1, "offsets": [["fills", 0, 7]],
                        "prices": {}, "dedupe": []})
    assert decode_control(old) == Control(seq=3, written_at=1, offsets={("fills", 0): 7},
                                          prices={}, config=None)


def test_a_control_record_is_a_zstd_frame_much_smaller_than_its_json() -> None:
    window = [(f"acct-{k % 5_000:05d}", f"fill-{k:09d}") for k in range(20_000)]
    control = Control(seq=5, written_at=1, offsets={("fills", 0): 20_000}, prices={},
                      dedupe={("fills", 0): window})
    raw = encode_control(control)
    assert raw[:4] == ZSTD_MAGIC
    assert len(raw) * 3 < len(orjson.dumps([list(pair) for pair in window]))
    assert decode_control(raw) == control


def test_a_control_record_of_plain_json_from_before_zstd_is_still_read() -> None:
    control = Control(seq=6, written_at=1, offsets={("fills", 0): 3}, prices={"BTC": (1.5, 2)},
                      dedupe={("fills", 0): [("a", "f1")]})
    plain = orjson.dumps({"v": 1, "seq": 6, "written_at": 1, "offsets": [["fills", 0, 3]],
                          "prices": {"BTC": [1.5, 2]}, "dedupe": [["fills", 0, [["a", "f1"]]]],
                          "config": None})
    assert decode_control(plain) == control


def test_a_corrupt_zstd_frame_in_a_control_record_raises_naming_it() -> None:
    raw = encode_control(Control(seq=1, written_at=1, offsets={}, prices={}))
    with pytest.raises(SnapshotError, match="control record: a corrupt zstd frame"):
        decode_control(raw[:4] + b"\xff" * 12)


@pytest.mark.parametrize("key", ["acct-17", "a/BTC-PERP", "\x00liqmon.isolatedx", "é",
                                 UnitKey("acct-17", "BTC-PERP"), UnitKey("a/b", "BTC-PERP"),
                                 UnitKey('q"uote', "ETH-PERP")])
def test_state_keys_of_accounts_and_isolated_positions_round_trip(key: RiskKey) -> None:
    assert risk_key(state_key(key)) == key


def test_an_isolated_position_never_shares_a_key_with_an_account() -> None:
    # An account may well be called "acct-17/BTC-PERP": its key is that id, while the
    # isolated BTC-PERP position of "acct-17" has a NUL-led key of its own (compaction keeps
    # one record per key, so a shared key would lose one of them).
    unit, account = UnitKey("acct-17", "BTC-PERP"), "acct-17/BTC-PERP"
    assert state_key(unit) != state_key(account)
    assert state_key(unit) == b'\x00liqmon.isolated["acct-17","BTC-PERP"]'
    assert state_key(account) == b"acct-17/BTC-PERP"


@pytest.mark.parametrize("raw", [b"\x00liqmon.isolated", b"\x00liqmon.isolated[1, 2]",
                                 b'\x00liqmon.isolated["a"]', b"\x00liqmon.isolated{"])
def test_a_key_that_only_starts_like_an_isolated_position_is_an_account(raw: bytes) -> None:
    # Account ids are whatever producers send: one that merely begins with the prefix must
    # restore as the account it is, not make the checkpoint unreadable.
    assert risk_key(raw) == raw.decode()


# -- the book's columns in, the book's columns out -------------------------------------------

def traded(risk) -> Engine:
    """Three accounts: a opens ETH-PERP then BTC-PERP and holds USDT and BTC; b closes its
    only position (flat, balance left); c deposits only."""
    engine = Engine(risk)
    records = [
        LedgerEntry("e1", "a", "USDT", 10_000.0, "deposit", 1),
        LedgerEntry("e2", "a", "BTC", 0.5, "deposit", 2),
        Fill(fill_id="f1", account="a", symbol="ETH-PERP", side="buy", qty=10.0, price=3_000.0,
             fee=1.5, ts=3),
        Fill(fill_id="f2", account="a", symbol="BTC-PERP", side="sell", qty=0.1, price=60_000.0,
             fee=0.0, ts=4),
        LedgerEntry("e3", "b", "USDT", 500.0, "deposit", 5),
        Fill(fill_id="f3", account="b", symbol="BTC-PERP", side="buy", qty=0.01, price=60_000.0,
             fee=0.0, ts=6),
        Fill(fill_id="f4", account="b", symbol="BTC-PERP", side="sell", qty=0.01, price=61_000.0,
             fee=0.0, ts=7),
        LedgerEntry("e4", "c", "ETH", 2.0, "deposit", 8),
    ]
    for n, record in enumerate(records):
        engine.apply(record, Source("t", 0, n))
    return engine


def test_the_book_exports_what_its_accounts_hold(risk) -> None:
    engine = traded(risk)
    book = engine.book
    rows = np.array([book.index[a] for a in ("a", "b", "c")])
    exported = {account_id: account
                for account_id, account, _, _ in book.snapshots(rows).accounts()}
    assert exported == {a: replace(engine.accounts[a], watched=frozenset())  # derived
                        for a in ("a", "b", "c")}
    assert list(exported["a"].positions) == ["ETH-PERP", "BTC-PERP"]  # opening order


def test_bulk_install_holds_what_one_by_one_installs(risk) -> None:
    source = traded(risk)
    rows = np.array([source.book.index[a] for a in ("a", "b", "c")])
    layout, values = encode_snapshots(source.book.snapshots(rows).stamped(5, [{}] * 3))
    snapshots = decode_snapshots(values, ["a", "b", "c"], {layout.id: layout})
    bulk, single = Engine(risk), Engine(risk)
    bulk.load_accounts(snapshots)
    for account_id in ("a", "b", "c"):
        single.load_account(account_id, source.accounts[account_id])
    assert dict(bulk.accounts) == dict(single.accounts) == dict(source.accounts)
    assert bulk.accounts_in_state == single.accounts_in_state
    assert bulk.positions_held == single.positions_held == 2


def test_bulk_install_reuses_freed_rows_and_replaces_held_accounts(risk) -> None:
    engine = traded(risk)
    engine.drop_partition(0)  # every row and position row free
    again = traded(risk)
    rows = np.array([again.book.index[a] for a in ("a", "b", "c")])
    engine.load_accounts(again.book.snapshots(rows))
    engine.load_accounts(again.book.snapshots(rows[:1]))  # "a" once more: replaced
    assert dict(engine.accounts) == dict(again.accounts)
    assert engine.positions_held == 2 and len(engine.book.ids) == 3
    assert sum(engine.accounts_in_state.values()) == 3


def test_accounts_replaced_before_the_index_is_built_are_banded_once(risk) -> None:
    source = traded(risk)
    rows = np.array([source.book.index[a] for a in ("a", "b", "c")])
    engine = Engine(risk)
    engine.load_accounts(source.book.snapshots(rows))
    engine.load_account("a", source.accounts["a"])  # replaced one by one
    engine.load_accounts(source.book.snapshots(rows[1:2]))  # b replaced in bulk
    assert engine.index_restored() == 3
    assert engine.accounts_moved_by("ETH") == {"c"}  # c's ETH balance
    assert engine.accounts_moved_by("BTC-PERP") == {"a"}  # b's position is closed


def test_accounts_dropped_before_the_index_is_built_are_not_banded(risk) -> None:
    source = traded(risk)
    rows = np.array([source.book.index[a] for a in ("a", "b", "c")])
    engine = Engine(risk)
    engine.load_accounts(source.book.snapshots(rows))
    engine.drop_partition(0)  # handed over before the first record
    assert engine.index_restored() == 0
    assert engine.accounts_moved_by("ETH") == frozenset()


def test_bulk_install_refuses_an_instrument_the_config_lacks(risk) -> None:
    snapshots = Snapshots.from_accounts([
        ("a", Account(balances={"USDT": 1.0}), 1, {}),
        ("b", Account(positions={"DOGE-PERP": Position(1.0, 0.1)}, balances={"PEPE": 2.0}), 1,
         {})])
    with pytest.raises(NotInConfig) as excinfo:
        Engine(risk).load_accounts(snapshots)
    assert (excinfo.value.key, excinfo.value.names) == ("b", ["DOGE-PERP", "PEPE"])
    # the config it was checkpointed under, or, when that is this one, a record not liqmon's
    assert str(excinfo.value).endswith("start once with --reset-state to rebuild the state "
                                       "from the input topics")


def test_bulk_install_keeps_an_isolated_position_apart_from_its_account(risk) -> None:
    """Account "a" (1,000 USDT cross) and its isolated BTC-PERP position (wallet 300 USDT,
    long 0.1 from 50,000, MARGIN_CALL after 2 transitions) go through the binary format and a
    bulk install: the position comes back as a unit — in `engine.units`, not
    `engine.accounts`, flagged isolated in the book, and counted by state among units."""
    unit = UnitKey("a", "BTC-PERP")
    held = Account(balances={"USDT": 300.0}, positions={"BTC-PERP": Position(0.1, 50_000.0)},
                   state=AccountState.MARGIN_CALL, transitions=2, partition=0)
    snapshots = Snapshots.from_accounts([("a", Account(balances={"USDT": 1_000.0},
                                                       partition=0), 1, {}),
                                         (unit, held, 1, {})])
    layout, values = encode_snapshots(snapshots)
    keys = [risk_key(state_key(key)) for key in ("a", unit)]
    engine = Engine(risk)
    engine.load_accounts(decode_snapshots(values, keys, {layout.id: layout}))
    assert list(engine.accounts) == ["a"] and list(engine.units) == [unit]
    assert replace(engine.units[unit], watched=frozenset()) == held
    assert engine.book.isolated[engine.book.row_of(unit)] == 1
    assert engine.units_in_state[AccountState.MARGIN_CALL] == 1
    assert engine.accounts_in_state[AccountState.HEALTHY] == 1
    assert engine.snapshots([unit]).ids == [unit]  # and back out, under its own key


def test_bulk_install_refuses_an_isolated_position_of_an_instrument_the_config_lacks(
    risk,
) -> None:
    snapshots = Snapshots.from_accounts([(UnitKey("a", "DOGE-PERP"),
                                          Account(balances={"USDT": 5.0}), 1, {})])
    with pytest.raises(NotInConfig) as excinfo:
        Engine(risk).load_accounts(snapshots)
    assert excinfo.value.names == ["DOGE-PERP"]
    assert "isolated position 'a/DOGE-PERP'" in str(excinfo.value)
