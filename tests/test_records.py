"""Bad input (SPEC §2) is rejected with a clear reason and never changes state."""

from __future__ import annotations

import copy
import io
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from monitor.config import parse_config
from monitor.engine import Engine
from monitor.events import Source
from monitor.records import (
    Fill,
    PriceTick,
    Reason,
    Rejected,
    decode,
    decode_batch,
    ts_bounds,
)
from monitor.replay import replay
from tests.support.risk import RISK

TICK = {"symbol": "BTC-PERP", "price": 50_000.0, "ts": 10}
FILL = {"fill_id": "f1", "account": "a", "symbol": "BTC-PERP", "side": "buy", "qty": 1.0,
        "price": 50_000.0, "fee": 1.0, "ts": 10}
ENTRY = {"entry_id": "e1", "account": "a", "asset": "USDT", "amount": 500.0,
         "kind": "deposit", "ts": 10}
GOOD = {"prices": TICK, "fills": FILL, "ledger": ENTRY}


def changed(topic: str, **fields) -> bytes:
    value = {**GOOD[topic], **fields}
    return orjson.dumps({k: v for k, v in value.items() if v is not ...})


BAD = [
    ("fills", b"{not json", Reason.INVALID_JSON, "invalid_json"),
    ("fills", b"", Reason.INVALID_JSON, ""),
    ("prices", b'{"symbol": "BTC\xff", "price": 5.0, "ts": 1}', Reason.INVALID_JSON,
     "not UTF-8: byte 0xff at offset 15"),
    ("fills", b'["a", "list"]', Reason.NOT_OBJECT, "must be a JSON object, got array"),
    ("prices", b"42", Reason.NOT_OBJECT, "got number"),
    ("fills", changed("fills", qty=...), Reason.MISSING_FIELD, "qty: required field"),
    ("ledger", changed("ledger", entry_id=...), Reason.MISSING_FIELD, "entry_id: required"),
    ("prices", changed("prices", ts=...), Reason.MISSING_FIELD, "ts: required"),
    ("fills", changed("fills", qty="1"), Reason.WRONG_TYPE, "qty: must be a number, got string"),
    ("fills", changed("fills", qty=True), Reason.WRONG_TYPE, "qty: must be a number, got boolean"),
    ("fills", changed("fills", account=17), Reason.WRONG_TYPE, "account: must be a string"),
    ("prices", changed("prices", ts=10.5), Reason.WRONG_TYPE, "ts: must be an integer, got 10.5"),
    ("prices", changed("prices", ts=None), Reason.WRONG_TYPE, "ts: must be an integer, got null"),
    ("prices", b'{"symbol": "BTC", "price": 1e400, "ts": 1}', Reason.NON_FINITE,
     "price: must be finite"),
    ("ledger", b'{"entry_id": "e", "account": "a", "asset": "USDT", "amount": -1e999,'
               b' "kind": "deposit", "ts": 1}', Reason.NON_FINITE, "amount: must be finite"),
    ("ledger", changed("ledger", amount=1e308), Reason.TOO_LARGE,
     "amount: must be within ±1e+15, got 1e+308"),
    ("fills", changed("fills", price=1e308), Reason.TOO_LARGE,
     "price: must be at most 1e+15, got 1e+308"),
    ("fills", changed("fills", qty=2e15), Reason.TOO_LARGE, "qty: must be at most 1e+15"),
    ("fills", changed("fills", fee=-2e15), Reason.TOO_LARGE, "fee: must be within ±1e+15"),
    ("prices", changed("prices", price=1e16), Reason.TOO_LARGE, "price: must be at most"),
    ("prices", changed("prices", price=0), Reason.OUT_OF_RANGE, "price: must be > 0, got 0.0"),
    ("fills", changed("fills", qty=-2), Reason.OUT_OF_RANGE, "qty: must be > 0"),
    ("prices", changed("prices", ts=-1), Reason.OUT_OF_RANGE, "ts: must be in [0, 2^63-1]"),
    ("prices", changed("prices", ts=2**63), Reason.OUT_OF_RANGE, "ts: must be in"),
    ("fills", changed("fills", symbol="DOGE-PERP"), Reason.UNKNOWN_INSTRUMENT,
     "symbol: 'DOGE-PERP' is not a configured instrument"),
    ("ledger", changed("ledger", asset="DOGE"), Reason.UNKNOWN_ASSET,
     "asset: 'DOGE' is not a configured asset"),
    ("ledger", changed("ledger", kind="gift"), Reason.UNKNOWN_KIND, "kind: must be one of"),
    ("fills", changed("fills", side="long"), Reason.UNKNOWN_SIDE, "side: must be \"buy\""),
    ("fills", changed("fills", account=""), Reason.BAD_IDENTIFIER, "account: must not be empty"),
    ("ledger", changed("ledger", entry_id=""), Reason.BAD_IDENTIFIER, "entry_id: must not be"),
    ("prices", changed("prices", symbol=""), Reason.BAD_IDENTIFIER, "symbol: must not be empty"),
    # NUL begins liqmon's own state keys: this account's snapshot would be restored as the
    # isolated SOL-PERP position of account "victim"
    ("fills", changed("fills", account='\x00liqmon.isolated["victim","SOL-PERP"]'),
     Reason.BAD_IDENTIFIER, "account: must not contain NUL (U+0000)"),
    ("ledger", changed("ledger", account="a\x00b"), Reason.BAD_IDENTIFIER,
     "account: must not contain NUL (U+0000)"),
    # An isolated position's event ids are account/symbol:counter:type (SPEC §4.1): these
    # accounts' ids would be those of account "sub"'s and "desk/alice"'s isolated positions
    ("fills", changed("fills", account="sub/BTC-PERP"), Reason.BAD_IDENTIFIER,
     "account: must not end in '/' and an instrument ('BTC-PERP'): its event ids would be "
     "those of the isolated BTC-PERP position of account 'sub'"),
    ("ledger", changed("ledger", account="desk/alice/ETH-PERP"), Reason.BAD_IDENTIFIER,
     "the isolated ETH-PERP position of account 'desk/alice'"),
    ("fills", changed("fills", fill_id="f" * 10_000), Reason.BAD_IDENTIFIER,
     "fill_id: must be at most 256 characters, got 10000"),
    ("ledger", changed("ledger", asset="A" * 257), Reason.BAD_IDENTIFIER,
     "asset: must be at most 256 characters, got 257"),
    ("ledger", changed("ledger", kind="withdrawal", amount=500.0), Reason.WRONG_SIGN,
     "amount: a withdrawal must be < 0, got 500.0"),
    ("ledger", changed("ledger", kind="deposit", amount=-500.0), Reason.WRONG_SIGN,
     "amount: a deposit must be > 0, got -500.0"),
    ("ledger", changed("ledger", kind="deposit", amount=0), Reason.WRONG_SIGN,
     "amount: a deposit must be > 0, got 0.0"),
    ("fills", changed("fills", margin_mode="portfolio"), Reason.UNKNOWN_MARGIN_MODE,
     "margin_mode: must be \"cross\" or \"isolated\", got 'portfolio'"),
    ("fills", changed("fills", margin_mode=None), Reason.WRONG_TYPE,
     "margin_mode: must be a string, got null"),
    ("ledger", changed("ledger", kind="isolated_margin"), Reason.MISSING_FIELD,
     "symbol: required field is missing"),
    ("ledger", changed("ledger", kind="isolated_margin", symbol="DOGE-PERP"),
     Reason.UNKNOWN_INSTRUMENT, "symbol: 'DOGE-PERP' is not a configured instrument"),
    ("ledger", changed("ledger", kind="isolated_margin", symbol="ETHBTC-PERP"),
     Reason.NOT_SETTLE_ASSET,
     "asset: an isolated wallet of 'ETHBTC-PERP' holds 'BTC', got 'USDT'"),
]


@pytest.mark.parametrize(("topic", "raw", "reason", "detail"), BAD,
                         ids=[f"{b[2]}-{i}" for i, b in enumerate(BAD)])
def test_bad_input_is_rejected_with_its_reason(risk, topic, raw, reason, detail) -> None:
    with pytest.raises(Rejected) as excinfo:
        decode(topic, raw, risk)
    assert excinfo.value.reason == reason
    assert detail in str(excinfo.value)


@pytest.mark.parametrize(("topic", "raw", "reason", "detail"), BAD,
                         ids=[f"{b[2]}-{i}" for i, b in enumerate(BAD)])
def test_bad_input_leaves_state_as_it_was(risk, topic, raw, reason, detail) -> None:
    engine = Engine(risk)
    for kind, value in GOOD.items():
        engine.apply(decode(kind, orjson.dumps(value), risk), Source(kind, index=0))
    before = copy.deepcopy((engine.accounts, engine.prices, engine.price_ts, engine.stats))
    line = b'{"topic": "%s", "value": %s}' % (topic.encode(), raw or b'""')
    rejected: list[int] = []
    replay([line], engine, io.BytesIO(), lambda index, r: rejected.append(index))
    assert rejected == [0]
    assert (engine.accounts, engine.prices, engine.price_ts, engine.stats) == before


@pytest.mark.parametrize("account", ["master/sub", "sub/BTC", "sub/BTC-PERP/x",
                                     "/BTC-PERP", "sub/"])
def test_an_account_with_a_slash_not_followed_by_an_instrument_is_accepted(risk,
                                                                          account) -> None:
    """Only a '/' and an instrument at the end can repeat an isolated position's event ids
    ("/BTC-PERP" would be the empty account's, and no account is empty)."""
    raws = [changed("fills", account=account), changed("ledger", account=account)]
    decoded = decode_batch(["fills", "ledger"], raws, risk)
    assert [record.account for record in decoded] == [account, account]  # type: ignore[union-attr]


def test_margin_mode_defaults_to_cross_and_isolated_margin_carries_its_symbol(risk) -> None:
    assert decode("fills", orjson.dumps(FILL), risk).margin_mode == "cross"  # type: ignore[union-attr]
    isolated = decode("fills", changed("fills", margin_mode="isolated"), risk)
    assert isolated.margin_mode == "isolated"  # type: ignore[union-attr]
    entry = decode("ledger", changed("ledger", kind="isolated_margin", amount=-20.0,
                                     symbol="BTC-PERP"), risk)
    assert (entry.kind, entry.symbol, entry.amount) == (  # type: ignore[union-attr]
        "isolated_margin", "BTC-PERP", -20.0)
    # Other kinds ignore a symbol, as they ignore any field they do not use.
    assert decode("ledger", changed("ledger", symbol=5), risk).symbol is None  # type: ignore[union-attr]


def test_identifier_of_256_characters_is_accepted(risk) -> None:
    fill = decode("fills", changed("fills", account="a" * 256), risk)
    assert fill.account == "a" * 256


@pytest.mark.parametrize(("kind", "amount"), [
    ("withdrawal", -500.0), ("funding", 7.5), ("funding", -7.5), ("transfer", -1.0),
    ("adjustment", 0.0),
])
def test_ledger_kinds_other_than_deposit_take_their_own_sign(risk, kind: str,
                                                            amount: float) -> None:
    entry = decode("ledger", changed("ledger", kind=kind, amount=amount), risk)
    assert (entry.kind, entry.amount) == (kind, amount)


def test_a_long_unknown_kind_is_cut_short_in_the_rejection(risk) -> None:
    with pytest.raises(Rejected) as excinfo:
        decode("ledger", changed("ledger", kind="g" * 10_000), risk)
    assert excinfo.value.reason == Reason.UNKNOWN_KIND
    assert excinfo.value.detail.endswith("got 'gggggggggggggggggggg'…(10000 characters)")


def test_a_long_unknown_side_is_cut_short_in_the_rejection(risk) -> None:
    with pytest.raises(Rejected) as excinfo:
        decode("fills", changed("fills", side="s" * 10_000), risk)
    assert excinfo.value.reason == Reason.UNKNOWN_SIDE
    assert len(excinfo.value.detail) < 100


YEAR_2100_MS = 4_102_444_800_000


@pytest.mark.parametrize("topic", ["prices", "fills", "ledger"])
def test_ts_later_than_not_after_is_rejected_as_ts_in_future(risk, topic: str) -> None:
    with pytest.raises(Rejected) as excinfo:
        decode(topic, changed(topic, ts=1_001), risk, not_after_ms=1_000)
    assert excinfo.value.reason == Reason.TS_IN_FUTURE
    assert excinfo.value.detail == ("ts: 1001 is more than --max-future ahead of the "
                                    "record's Kafka timestamp (or of the clock, if that is "
                                    "earlier): latest accepted 1000")


def test_the_ts_bound_is_max_future_past_the_kafka_timestamp_or_the_clock_if_earlier() -> None:
    # now 10,000 ms, --max-future 300 ms: a record stamped 4,000 may carry ts up to 4,300;
    # one stamped ahead of the clock (12,000), or with no timestamp (-1), up to 10,300
    assert ts_bounds([4_000, 12_000, -1], now_ms=10_000, max_future_ms=300) == [
        4_300, 10_300, 10_300]


def test_ts_equal_to_not_after_is_accepted(risk) -> None:
    assert decode("prices", changed("prices", ts=1_000), risk, not_after_ms=1_000).ts == 1_000


def test_without_not_after_a_ts_in_2100_is_accepted(risk) -> None:
    assert decode("prices", changed("prices", ts=YEAR_2100_MS), risk).ts == YEAR_2100_MS


def test_replay_applies_a_tick_from_2100(risk) -> None:
    engine = Engine(risk)
    line = b'{"topic": "prices", "value": %s}' % changed("prices", ts=YEAR_2100_MS)
    replay([line], engine, io.BytesIO(), lambda index, rejection: None)
    assert engine.price_ts == {"BTC-PERP": YEAR_2100_MS}


def test_whole_numbers_written_as_floats_are_accepted(risk) -> None:
    tick = decode("prices", b'{"symbol": "BTC", "price": 5, "ts": 123.0}', risk)
    assert tick.ts == 123 and isinstance(tick.ts, int)
    assert tick.price == 5.0


def test_fee_defaults_to_zero_and_unknown_fields_are_ignored(risk) -> None:
    fill = decode("fills", changed("fills", fee=..., venue="spot"), risk)
    assert fill.fee == 0.0


def test_tick_for_a_symbol_nothing_is_priced_by_is_ignored_and_counted(risk) -> None:
    engine = Engine(risk)
    engine.apply(decode("prices", b'{"symbol": "XRP", "price": 0.5, "ts": 1}', risk),
                 Source("prices", index=0))
    assert engine.prices == {}
    assert engine.stats.unused_ticks == 1


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        (b'{"value": {}}', Reason.MISSING_FIELD),
        (b'{"topic": "trades", "value": {}}', Reason.UNKNOWN_TOPIC),
        (b'{"topic": "fills"}', Reason.MISSING_FIELD),
        (b'"fills"', Reason.NOT_OBJECT),
    ],
)
def test_malformed_replay_envelopes_are_rejected(risk, line: bytes, reason: str) -> None:
    from monitor.replay import decode_line

    with pytest.raises(Rejected) as excinfo:
        decode_line(line, risk)
    assert excinfo.value.reason == reason


def decoded_alike(topic: str, raw: bytes | None, risk, not_after_ms: int | None = None):
    """What `decode` makes of one value: the record, or the rejection's (reason, detail)."""
    try:
        return decode(topic, raw, risk, not_after_ms=not_after_ms)
    except Rejected as rejection:
        return (rejection.reason, rejection.detail)


def batch_alike(topics: list[str], raws: list[bytes | None], risk,
                not_after_ms: int | None = None) -> list:
    return [(r.reason, r.detail) if isinstance(r, Rejected) else r
            for r in decode_batch(topics, raws, risk, not_after_ms=not_after_ms)]


def test_a_batch_decodes_every_bad_value_with_decodes_reason_and_detail(risk) -> None:
    """The bad values above and the good ones interleaved in one batch: each comes out as
    `decode` makes it, in order (the batch path only ever accepts values decode accepts)."""
    topics = [t for t, _, _, _ in BAD] + list(GOOD)
    raws: list[bytes | None] = [raw for _, raw, _, _ in BAD] + [orjson.dumps(v)
                                                                for v in GOOD.values()]
    topics.append("fills")
    raws.append(None)  # a tombstone
    assert batch_alike(topics, raws, risk) == [decoded_alike(t, r, risk)
                                               for t, r in zip(topics, raws, strict=True)]


def test_a_batch_keeps_the_margin_mode_and_the_isolated_wallet_symbol(risk) -> None:
    raws = [changed("fills", margin_mode="isolated"), changed("fills", margin_mode="cross"),
            changed("ledger", kind="isolated_margin", symbol="BTC-PERP")]
    got = decode_batch(["fills", "fills", "ledger"], raws, risk)
    assert [got[0].margin_mode, got[1].margin_mode] == ["isolated", "cross"]
    assert (got[2].kind, got[2].symbol) == ("isolated_margin", "BTC-PERP")


def test_a_batch_applies_the_not_after_bound_as_decode_does(risk) -> None:
    raws = [changed("prices", ts=100), changed("prices", ts=101), changed("fills", ts=101)]
    topics = ["prices", "prices", "fills"]
    got = batch_alike(topics, raws, risk, not_after_ms=100)
    assert got[0] == PriceTick("BTC-PERP", 50_000.0, 100)
    assert [g[0] for g in got[1:]] == [Reason.TS_IN_FUTURE, Reason.TS_IN_FUTURE]


def test_a_batch_takes_a_bound_for_each_value(risk) -> None:
    raws = [changed("prices", ts=100), changed("prices", ts=101), changed("fills", ts=101)]
    got = batch_alike(["prices", "prices", "fills"], raws, risk, not_after_ms=[100, 100, 101])
    assert [type(g) for g in got] == [PriceTick, tuple, Fill]
    assert got[1][0] == Reason.TS_IN_FUTURE


FIELD_VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-2**63, max_value=2**64 - 1),
    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from(
        ["", "a", "x" * 257, "buy", "sell", "BTC-PERP", "DOGE-PERP", "USDT", "DOGE", "BTC",
         "deposit", "withdrawal", "funding", "gift", "isolated_margin", "cross", "isolated",
         "Cross"]),
    st.lists(st.integers(min_value=-9, max_value=9), max_size=2))


@given(topic=st.sampled_from(["prices", "fills", "ledger"]),
       changes=st.dictionaries(st.sampled_from(
           ["symbol", "price", "ts", "fill_id", "account", "side", "qty", "fee", "entry_id",
            "asset", "amount", "kind", "margin_mode"]), FIELD_VALUES | st.just(...),
           max_size=4),
       not_after_ms=st.none() | st.integers(min_value=0, max_value=2**63))
@settings(max_examples=400, deadline=None)
def test_a_batch_decodes_any_value_exactly_as_decode(topic: str, changes: dict,
                                                     not_after_ms: int | None) -> None:
    """Any mix of missing, ill-typed, out-of-range and good fields (... removes a field)."""
    risk = parse_config(RISK)
    raw = orjson.dumps({k: v for k, v in {**GOOD[topic], **changes}.items() if v is not ...})
    assert batch_alike([topic], [raw], risk, not_after_ms) == [
        decoded_alike(topic, raw, risk, not_after_ms)]


# Raw JSON text, not orjson's: what a producer in another language may send. Each field's
# value is one of these snippets (as bytes), so the text can hold what orjson.dumps never
# writes — numbers beyond a double, escapes, invalid UTF-8, duplicate keys.
VALUE_TEXTS = st.sampled_from([
    b"1", b"-0", b"0.0", b"-0.0", b"2.5", b"1E2", b"1e-400", b"1e400", b"-1e999",
    b"1000000000000000", b"1000000000000001", b"123.0", b"9223372036854775807",
    b"18446744073709551616", b"99999999999999999999999999999999999999", b"true", b"null",
    b'""', b'"BTC-PERP"', b'"BTC-\\u0050ERP"', b'"USDT"', b'"buy"', b'"b\\u0075y"',
    b'"sell"', b'"deposit"', b'"withdrawal"', b'"isolated_margin"', b'"isolated"',
    b'"cross"', b'"a"', b'"\xc3\xa9"', b'"\xff"', b'"\\ud800"', b'"\\ud83d\\ude00"',
    b'"\\u0000"', b'"' + b"\xc3\xa9" * 256 + b'"', b'"' + b"\xc3\xa9" * 257 + b'"',
    b"[1, {\"a\": 2}]", b"{}", b"NaN", b"01", b"1.",
])
KEYS = st.sampled_from([
    b"symbol", b"price", b"ts", b"fill_id", b"account", b"side", b"qty", b"fee", b"entry_id",
    b"asset", b"amount", b"kind", b"margin_mode", b"venue", b"sym\\u0062ol", b"",
])


@st.composite
def raw_values(draw: st.DrawFn, topic: str) -> bytes:
    """A good value of the topic as text, then fields added or written again (a later key
    wins in orjson), some with a value no encoder of ours would write."""
    fields = [(k.encode(), orjson.dumps(v)) for k, v in GOOD[topic].items()]
    for _ in range(draw(st.integers(min_value=0, max_value=3))):
        fields.insert(draw(st.integers(min_value=0, max_value=len(fields))),
                      (draw(KEYS), draw(VALUE_TEXTS)))
    space = draw(st.sampled_from([b"", b" ", b"\n\t"]))
    body = (b"," + space).join(b'"' + k + b'":' + space + v for k, v in fields)
    return b"{" + space + body + space + b"}"


@given(data=st.data(), topic=st.sampled_from(["prices", "fills", "ledger"]))
@settings(max_examples=600, deadline=None)
def test_a_batch_decodes_any_raw_text_exactly_as_decode(data: st.DataObject, topic: str) -> None:
    """Several values of one kind: once one with other fields is seen, the batch's later values
    skip msgspec's check (a speed-up only: every value still comes out as `decode` makes it)."""
    risk = parse_config(RISK)
    raws = data.draw(st.lists(raw_values(topic), min_size=1, max_size=4))
    assert batch_alike([topic] * len(raws), raws, risk) == [decoded_alike(topic, raw, risk)
                                                            for raw in raws]


@pytest.mark.parametrize("extra", [b'"venue": 1e999', b'"venue": "\xff"'])
def test_a_field_beyond_the_records_with_a_value_orjson_refuses_is_invalid_json(
        risk, extra: bytes) -> None:
    """msgspec would skip such a value; the batch's first check must not accept it."""
    raw = b'{"symbol": "BTC-PERP", "price": 5.0, "ts": 1, ' + extra + b"}"
    assert batch_alike(["prices"], [raw], risk) == [decoded_alike("prices", raw, risk)]
    assert decoded_alike("prices", raw, risk)[0] == Reason.INVALID_JSON


def test_a_str_value_with_a_lone_surrogate_is_invalid_json_in_a_batch_too(risk) -> None:
    raw = '{"symbol": "\ud800", "price": 5.0, "ts": 1}'  # a str, not bytes: not UTF-8
    assert batch_alike(["prices"], [raw], risk) == [decoded_alike("prices", raw, risk)]
    assert decoded_alike("prices", raw, risk)[0] == Reason.INVALID_JSON


def test_a_field_beyond_the_records_is_ignored_by_the_batch_as_by_decode(risk) -> None:
    raws = [changed("fills", venue="spot"), changed("prices", venue="spot"),
            changed("ledger", symbol="BTC-PERP")]
    topics = ["fills", "prices", "ledger"]
    got = batch_alike(topics, raws, risk)
    assert got == [decoded_alike(t, r, risk) for t, r in zip(topics, raws, strict=True)]
    assert got[2].symbol is None  # only an isolated_margin entry funds a position


@pytest.mark.parametrize(("topic", "fields"), [
    ("fills", {"side": "hold"}), ("fills", {"side": "BUY"}),
    ("fills", {"margin_mode": "portfolio"}), ("fills", {"margin_mode": "isolated"}),
    ("ledger", {"kind": "bonus"}), ("ledger", {"kind": "isolated_margin"}),
    ("ledger", {"kind": "isolated_margin", "symbol": "BTC-PERP"}),
    ("ledger", {"symbol": None}), ("ledger", {"kind": "withdrawal", "amount": 5.0}),
])
def test_the_batch_takes_the_sides_kinds_and_modes_decode_takes(risk, topic: str,
                                                                fields: dict[str, Any]) -> None:
    """msgspec decodes these into a record (a side, mode or kind is any string to it); the
    checks after it leave the ones `decode` refuses, or builds otherwise, to `decode`."""
    raw = changed(topic, **fields)
    assert batch_alike([topic], [raw], risk) == [decoded_alike(topic, raw, risk)]
