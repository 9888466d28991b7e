"""Checkpoint format (SPEC §6): versioned, lossless, and loud about what it cannot read."""

from __future__ import annotations

import math

import orjson
import pytest

from monitor.account import Account, RiskKey, UnitKey
from monitor.margin import Position
from monitor.snapshot import (
    Control,
    SnapshotError,
    decode_account,
    decode_control,
    encode_account,
    encode_control,
    risk_key,
    state_key,
)
from monitor.state import AccountState


def test_account_round_trip_is_exact() -> None:
    account = Account(balances={"USDT": 1234.5678901234567, "BTC": -0.1},
                      positions={"BTC-PERP": Position(-0.30000000000000004, 61_234.5)},
                      state=AccountState.LIQUIDATING, transitions=7, partition=3)
    as_of = {("fills", 3): 120, ("ledger", 3): 40, ("prices", 0): 999}
    restored, seq, restored_as_of = decode_account(encode_account(account, 12, as_of))
    assert (restored.balances, restored.positions, restored.state, restored.transitions,
            restored.partition) == (account.balances, account.positions, account.state, 7, 3)
    assert (seq, restored_as_of) == (12, as_of)


@pytest.mark.parametrize("bad", [math.inf, -math.inf])
def test_account_with_an_infinite_number_round_trips(bad: float) -> None:
    # Before the input bounds, two deposits of 1e308 made a balance inf; orjson wrote null and
    # every restart failed on "account snapshot is malformed".
    account = Account(balances={"USDT": bad, "BTC": 0.5},
                      positions={"BTC-PERP": Position(bad, 1e308)}, transitions=1, partition=0)
    raw = encode_account(account, 3, {("ledger", 0): 4})
    assert b"null" not in raw
    restored, _, _ = decode_account(raw)
    assert restored.balances == {"USDT": bad, "BTC": 0.5}
    assert restored.positions == {"BTC-PERP": Position(bad, 1e308)}


def test_account_with_a_nan_number_round_trips() -> None:
    account = Account(balances={"USDT": math.nan}, positions={"BTC-PERP": Position(1.0, math.nan)})
    restored, _, _ = decode_account(encode_account(account, 1, {}))
    assert math.isnan(restored.balances["USDT"])
    assert restored.positions["BTC-PERP"].qty == 1.0
    assert math.isnan(restored.positions["BTC-PERP"].entry_price)


def test_control_with_an_infinite_price_round_trips() -> None:
    control = Control(seq=1, written_at=1, offsets={}, prices={"BTC": (math.inf, 17)})
    assert decode_control(encode_control(control)) == control


def test_control_round_trip_keeps_window_order() -> None:
    control = Control(seq=4, written_at=1, offsets={("fills", 0): 10, ("prices", 1): 5},
                      prices={"BTC": (65_000.5, 17)},
                      dedupe={("fills", 0): [("a", "f2"), ("b", "f1")], ("ledger", 0): []})
    assert decode_control(encode_control(control)) == control


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"\x00garbage", "not JSON"),
        (b"[1]", "not a JSON object"),
        (orjson.dumps({"v": 99}), "unsupported snapshot format version 99"),
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
    ],
)
def test_undecodable_account_snapshots_raise(raw: bytes, message: str) -> None:
    with pytest.raises(SnapshotError, match=message):
        decode_account(raw)


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
