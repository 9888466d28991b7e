"""Input records (SPEC §2): decode raw JSON into typed records, or reject with a reason.

Decoding is pure: it reads nothing but the message and the risk config, and a rejection never
touches state. Each rejection carries a stable ``reason`` code (used as a metric label and a
dead-letter header) and a human ``detail`` naming the field and the rule it breaks.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from itertools import repeat
from typing import Annotated, Any, Final, TypeVar

import msgspec
import orjson

from monitor.config import (
    MAX_ID_LENGTH,
    MAX_MAGNITUDE,
    MIN_MAGNITUDE,
    RiskConfig,
    instrument_after_slash,
)

T = TypeVar("T")

PRICES: Final = "prices"
FILLS: Final = "fills"
LEDGER: Final = "ledger"
INPUT_KINDS: Final = (PRICES, FILLS, LEDGER)

SIDES: Final = frozenset({"buy", "sell"})
LEDGER_KINDS: Final = frozenset({"deposit", "withdrawal", "funding", "transfer", "adjustment",
                                 "isolated_margin"})
ISOLATED_MARGIN: Final = "isolated_margin"  # moves collateral to or from an isolated wallet
CROSS: Final = "cross"
ISOLATED: Final = "isolated"
MARGIN_MODES: Final = (CROSS, ISOLATED)

# Kafka timestamps are int64 milliseconds; anything larger cannot be re-encoded.
MAX_TS: Final = 2**63 - 1

# liqmon's own keys in its state topic (an isolated position's, the control records') begin
# with NUL, so that no account id can name one: an account id may not contain it.
NUL: Final = "\x00"


class Reason:
    """Stable rejection codes. They are metric label values and dead-letter headers."""

    INVALID_JSON: Final = "invalid_json"
    NOT_OBJECT: Final = "not_object"
    MISSING_FIELD: Final = "missing_field"
    WRONG_TYPE: Final = "wrong_type"
    NON_FINITE: Final = "non_finite"
    OUT_OF_RANGE: Final = "out_of_range"
    UNKNOWN_INSTRUMENT: Final = "unknown_instrument"
    UNKNOWN_ASSET: Final = "unknown_asset"
    UNKNOWN_KIND: Final = "unknown_kind"
    UNKNOWN_SIDE: Final = "unknown_side"
    UNKNOWN_TOPIC: Final = "unknown_topic"  # replay envelopes only
    BAD_IDENTIFIER: Final = "bad_identifier"  # empty, longer than MAX_ID_LENGTH, or an
    #                    account holding NUL or ending in '/' and an instrument (SPEC §4.1 ids)
    WRONG_SIGN: Final = "wrong_sign"  # a deposit not > 0, a withdrawal not < 0
    TOO_LARGE: Final = "too_large"  # finite, but beyond MAX_MAGNITUDE
    TS_IN_FUTURE: Final = "ts_in_future"  # the service only: ts beyond --max-future
    UNKNOWN_MARGIN_MODE: Final = "unknown_margin_mode"  # not "cross" or "isolated"
    NOT_SETTLE_ASSET: Final = "not_settle_asset"  # isolated_margin in another asset than
    #                                               the instrument settles in
    # Raised by the engine, not the decoder: it depends on the position the account holds.
    MARGIN_MODE_CONFLICT: Final = "margin_mode_conflict"  # a fill in the other mode than
    #                                                       its open position's

    ALL: Final = (
        INVALID_JSON, NOT_OBJECT, MISSING_FIELD, WRONG_TYPE, NON_FINITE, OUT_OF_RANGE,
        UNKNOWN_INSTRUMENT, UNKNOWN_ASSET, UNKNOWN_KIND, UNKNOWN_SIDE, UNKNOWN_TOPIC,
        BAD_IDENTIFIER, WRONG_SIGN, TOO_LARGE, TS_IN_FUTURE, UNKNOWN_MARGIN_MODE,
        NOT_SETTLE_ASSET, MARGIN_MODE_CONFLICT,
    )


class Rejected(Exception):
    """An input record that breaks SPEC §2. It is dead-lettered, counted, and never applied."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


# SPEC §2's bounds that need no config or clock, as msgspec checks them while it decodes a
# value straight into a record (`decode_batch`'s first check). Building a record by hand
# checks nothing: the decoders below do.
_Id = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_ID_LENGTH)]
_Positive = Annotated[float, msgspec.Meta(ge=MIN_MAGNITUDE, le=MAX_MAGNITUDE)]
_Signed = Annotated[float, msgspec.Meta(ge=-MAX_MAGNITUDE, le=MAX_MAGNITUDE)]
_Ts = Annotated[int, msgspec.Meta(ge=0)]


# Records are msgspec Structs rather than dataclasses: a value decodes straight into one,
# where a copy into a dataclass cost half again as much as the decoding (~0.45 µs a fill).
# They hold strings and numbers only, so the garbage collector need not track them (gc=False).
class PriceTick(msgspec.Struct, forbid_unknown_fields=True, gc=False):
    symbol: _Id
    price: _Positive
    ts: _Ts


class Fill(msgspec.Struct, kw_only=True, forbid_unknown_fields=True, gc=False):
    """Built by keyword only: ``fee`` may be left out of a value, ``ts`` may not."""

    fill_id: _Id
    account: _Id
    symbol: _Id
    side: str  # "buy" or "sell"
    qty: _Positive
    price: _Positive
    fee: _Signed = 0.0
    ts: _Ts
    margin_mode: str = CROSS  # SPEC §4.1: the mode of the position the fill trades

    @property
    def signed_qty(self) -> float:
        return self.qty if self.side == "buy" else -self.qty


class LedgerEntry(msgspec.Struct, forbid_unknown_fields=True, gc=False):
    entry_id: _Id
    account: _Id
    asset: _Id
    amount: _Signed
    kind: str
    ts: _Ts
    symbol: str | None = None  # the isolated position an isolated_margin entry funds


InputRecord = PriceTick | Fill | LedgerEntry


def decode(topic_kind: str, raw: bytes | str | None, config: RiskConfig, *,
           not_after_ms: int | None = None) -> InputRecord:
    """Decode one message value of input topic kind ``prices``/``fills``/``ledger``.

    With ``not_after_ms`` (the service: the record's Kafka timestamp, or the wall clock if
    that is earlier, plus --max-future), a record whose ``ts`` is later is rejected: one tick
    from the future would make every later tick of its symbol stale. None checks nothing
    (replay takes its clock from the records).
    """
    if raw is None:
        raise Rejected(Reason.INVALID_JSON, "the message has no value (a null/tombstone record)")
    return decode_json(raw, lambda document: from_document(topic_kind, document, config,
                                                            not_after_ms=not_after_ms))


def ts_bounds(kafka_timestamps: Iterable[int], now_ms: int, max_future_ms: int) -> list[int]:
    """The latest ``ts`` each record may carry in the service (`decode`'s ``not_after_ms``):
    ``max_future_ms`` past its Kafka timestamp, or past the clock if that is earlier (or
    absent, -1). The Kafka timestamp does not move: read again after a restart, when the
    clock has moved on, or by `liqmon replay --bootstrap`, a record is judged as it was the
    first time (unless it was stamped ahead of the clock)."""
    return [(stamp if 0 <= stamp < now_ms else now_ms) + max_future_ms
            for stamp in kafka_timestamps]


def decode_batch(kinds: Sequence[str], raws: Sequence[bytes | str | None], config: RiskConfig,
                 *, not_after_ms: int | Sequence[int] | None = None
                 ) -> list[InputRecord | Rejected]:
    """`decode` over a fetched batch: one decoded record or rejection per value, in order;
    ``not_after_ms`` is `decode`'s, for every value or one per value.

    A value is decoded by the first of three checks that accepts it: msgspec decodes and
    checks a value holding its kind's fields and no other in one pass of compiled code
    (`_shaped_fill`); orjson's parse and one expression per kind take the values with other
    fields too (`_plain_fill`); `decode` finds the exact reason for the rest. The first two
    accept only values `decode` accepts, and build the record it builds, so rejections,
    reasons and details are `decode`'s."""
    bounds: Iterable[int | None] = (
        repeat(not_after_ms, len(raws)) if not_after_ms is None or isinstance(not_after_ms, int)
        else not_after_ms)
    loads, rejected_json = orjson.loads, orjson.JSONDecodeError
    out: list[InputRecord | Rejected] = []
    append = out.append
    # Kinds whose values in this batch hold fields beyond msgspec's shapes (a producer that
    # adds its own): the rest of the batch skips the first check, which would fail on each
    # (~1 µs a value for nothing).
    beyond: set[str] = set()
    for kind, raw, not_after in zip(kinds, raws, bounds, strict=True):
        record: InputRecord | None = None
        if raw is not None and (checks := _CHECKS.get(kind)) is not None:
            latest = MAX_TS if not_after is None else min(not_after, MAX_TS)
            shaped, plain = checks
            if kind not in beyond:
                record = shaped(raw, config, latest)
            if record is None:
                try:
                    doc = loads(raw)
                except rejected_json:
                    doc = None
                if type(doc) is dict and (record := plain(doc, config, latest)) is not None:
                    beyond.add(kind)
        if record is None:
            try:
                record = decode(kind, raw, config, not_after_ms=not_after)
            except Rejected as rejection:
                append(rejection)
                continue
        append(record)
    return out


# The first check of `decode_batch`: msgspec decodes a value into its record, checking the
# bounds the record's annotations carry and that it has no field beyond the record's. A value
# with other fields goes on to orjson's check: msgspec skips an unknown field's value more
# leniently than orjson parses it (a number beyond a double, invalid UTF-8 are accepted
# there), and `decode` has the last word on every value. What depends on the config or the
# clock (a configured symbol or asset, ts ≤ latest, a deposit's sign) and the enumerations
# (side, margin mode, ledger kind) are checked in Python after. An isolated_margin entry
# (rare, and checked against its instrument) takes `decode`'s path.
_decode_tick = msgspec.json.Decoder(PriceTick).decode
_decode_fill = msgspec.json.Decoder(Fill).decode
_decode_ledger = msgspec.json.Decoder(LedgerEntry).decode
_PLAIN_LEDGER_KINDS: Final = LEDGER_KINDS - {ISOLATED_MARGIN}
# msgspec.ValidationError is a DecodeError; a str value with a lone surrogate fails to
# encode as UTF-8 before msgspec sees it (orjson calls that invalid JSON)
_NOT_SHAPED = (msgspec.DecodeError, UnicodeEncodeError)


def _shaped_tick(raw: bytes | str, config: RiskConfig, latest: int) -> PriceTick | None:
    try:
        tick = _decode_tick(raw)
    except _NOT_SHAPED:
        return None
    return tick if tick.ts <= latest else None


def _shaped_fill(raw: bytes | str, config: RiskConfig, latest: int) -> Fill | None:
    try:
        fill = _decode_fill(raw)
    except _NOT_SHAPED:
        return None
    if (fill.symbol in config.instruments and fill.ts <= latest and fill.side in SIDES
            and fill.margin_mode in MARGIN_MODES and NUL not in fill.account
            and "/" not in fill.account):
        return fill
    return None


def _shaped_ledger(raw: bytes | str, config: RiskConfig, latest: int) -> LedgerEntry | None:
    try:
        entry = _decode_ledger(raw)
    except _NOT_SHAPED:
        return None
    kind, amount = entry.kind, entry.amount
    if (entry.symbol is None and kind in _PLAIN_LEDGER_KINDS and entry.asset in config.assets
            and entry.ts <= latest and NUL not in entry.account
            and "/" not in entry.account
            and (kind != "deposit" or amount > 0) and (kind != "withdrawal" or amount < 0)):
        return entry
    return None


# The plain-record checks accept only values `decode` accepts as they are:
# numbers are floats or ints (never bools) within the bounds (NaN and infinities fail every
# comparison), ids non-empty strings of at most MAX_ID_LENGTH characters (an account without
# NUL or '/': one with '/' takes decode's path, which checks what follows it), ts an int
# within [0, latest]; a margin mode cross or isolated. An isolated_margin entry always takes
# decode's path. Written out inline: a function call per field would cost as much as the
# check.
_FLOAT, _INT, _STR = float, int, str


def _plain_tick(doc: dict[str, Any], config: RiskConfig, latest: int) -> PriceTick | None:
    symbol, price, ts = doc.get("symbol"), doc.get("price"), doc.get("ts")
    if (type(symbol) is _STR and 0 < len(symbol) <= MAX_ID_LENGTH
            and (type(price) is _FLOAT or type(price) is _INT)
            and MIN_MAGNITUDE <= price <= MAX_MAGNITUDE
            and type(ts) is _INT and 0 <= ts <= latest):
        return PriceTick(symbol, float(price), ts)
    return None


def _plain_fill(doc: dict[str, Any], config: RiskConfig, latest: int) -> Fill | None:
    get = doc.get
    fill_id, account, symbol, side = get("fill_id"), get("account"), get("symbol"), get("side")
    qty, price, fee, ts = get("qty"), get("price"), get("fee", 0.0), get("ts")
    margin_mode = get("margin_mode", CROSS)
    if (type(fill_id) is _STR and 0 < len(fill_id) <= MAX_ID_LENGTH
            and type(account) is _STR and 0 < len(account) <= MAX_ID_LENGTH
            and NUL not in account and "/" not in account
            and type(symbol) is _STR and 0 < len(symbol) <= MAX_ID_LENGTH
            and symbol in config.instruments and (side == "buy" or side == "sell")
            and (type(qty) is _FLOAT or type(qty) is _INT)
            and MIN_MAGNITUDE <= qty <= MAX_MAGNITUDE
            and (type(price) is _FLOAT or type(price) is _INT)
            and MIN_MAGNITUDE <= price <= MAX_MAGNITUDE
            and (type(fee) is _FLOAT or type(fee) is _INT)
            and -MAX_MAGNITUDE <= fee <= MAX_MAGNITUDE
            and type(ts) is _INT and 0 <= ts <= latest
            and margin_mode in MARGIN_MODES):
        return Fill(fill_id=fill_id, account=account, symbol=symbol, side=side, qty=float(qty),
                    price=float(price), fee=float(fee), ts=ts, margin_mode=margin_mode)
    return None


def _plain_ledger(doc: dict[str, Any], config: RiskConfig, latest: int) -> LedgerEntry | None:
    get = doc.get
    entry_id, account, asset, amount = get("entry_id"), get("account"), get("asset"), get("amount")
    kind, ts = get("kind"), get("ts")
    if (type(entry_id) is _STR and 0 < len(entry_id) <= MAX_ID_LENGTH
            and type(account) is _STR and 0 < len(account) <= MAX_ID_LENGTH
            and NUL not in account and "/" not in account
            and type(asset) is _STR and 0 < len(asset) <= MAX_ID_LENGTH
            and asset in config.assets
            and type(kind) is _STR and kind in LEDGER_KINDS and kind != ISOLATED_MARGIN
            and (type(amount) is _FLOAT or type(amount) is _INT)
            and -MAX_MAGNITUDE <= amount <= MAX_MAGNITUDE
            and type(ts) is _INT and 0 <= ts <= latest
            and (kind != "deposit" or amount > 0) and (kind != "withdrawal" or amount < 0)):
        return LedgerEntry(entry_id, account, asset, float(amount), kind, ts)
    return None


# Each kind's two checks: msgspec's shape (the value's bytes), then orjson's document.
_CHECKS: Final[Mapping[str, tuple[Callable[[bytes | str, RiskConfig, int], InputRecord | None],
                                  Callable[[dict[str, Any], RiskConfig, int],
                                           InputRecord | None]]]] = {
    PRICES: (_shaped_tick, _plain_tick),
    FILLS: (_shaped_fill, _plain_fill),
    LEDGER: (_shaped_ledger, _plain_ledger),
}


def decode_json(raw: bytes | str, interpret: Callable[[Any], T]) -> T:
    """Parse JSON with orjson and hand the document to ``interpret`` (which validates it).

    orjson refuses numbers that overflow a double (``1e400``) as a syntax error. The standard
    library reads them as infinity, so on failure we ask it for a second opinion: when its
    document breaks a field rule, that rejection names the field, which helps whoever has to
    fix the producer. Only the error path pays for this.
    """
    try:
        document = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        if isinstance(raw, bytes):  # orjson calls bytes that are not UTF-8 "surrogates"
            try:
                raw.decode()
            except UnicodeDecodeError as bad:
                raise Rejected(Reason.INVALID_JSON, f"not UTF-8: byte 0x{raw[bad.start]:02x} "
                                                    f"at offset {bad.start}") from None
        try:
            lenient = json.loads(raw)
        except (ValueError, RecursionError):
            raise Rejected(Reason.INVALID_JSON, str(exc)) from None
        interpret(lenient)  # raises the precise rejection when there is one
        raise Rejected(Reason.INVALID_JSON, str(exc)) from None
    return interpret(document)


def from_document(topic_kind: str, document: Any, config: RiskConfig, *,
                  not_after_ms: int | None = None) -> InputRecord:
    """Validate an already-parsed JSON value as a record of the given input kind."""
    if not isinstance(document, dict):
        raise Rejected(Reason.NOT_OBJECT, f"{topic_kind} value must be a JSON object, "
                                          f"got {_json_type(document)}")
    record: InputRecord
    if topic_kind == PRICES:
        record = _tick(document, config)
    elif topic_kind == FILLS:
        record = _fill(document, config)
    elif topic_kind == LEDGER:
        record = _ledger(document, config)
    else:
        raise Rejected(Reason.UNKNOWN_TOPIC,
                       f"topic must be one of {', '.join(INPUT_KINDS)}, got {topic_kind!r}")
    if not_after_ms is not None and record.ts > not_after_ms:
        raise Rejected(Reason.TS_IN_FUTURE, f"ts: {record.ts} is more than --max-future "
                                            f"ahead of the record's Kafka timestamp (or of "
                                            f"the clock, if that is earlier): latest "
                                            f"accepted {not_after_ms}")
    return record


def _tick(doc: dict[str, Any], config: RiskConfig) -> PriceTick:
    return PriceTick(
        symbol=_identifier(doc, "symbol"),
        price=_positive(doc, "price"),
        ts=_ts(doc),
    )


def _fill(doc: dict[str, Any], config: RiskConfig) -> Fill:
    fill_id = _identifier(doc, "fill_id")
    account = _account(doc, config)
    symbol = _identifier(doc, "symbol")
    side = _string(doc, "side")
    qty = _positive(doc, "qty")
    price = _positive(doc, "price")
    fee = _bounded(doc, "fee") if "fee" in doc else 0.0
    ts = _ts(doc)
    margin_mode = _string(doc, "margin_mode") if "margin_mode" in doc else CROSS
    if symbol not in config.instruments:
        raise Rejected(Reason.UNKNOWN_INSTRUMENT, f"symbol: {symbol!r} is not a configured "
                                                  f"instrument")
    if side not in SIDES:
        raise Rejected(Reason.UNKNOWN_SIDE,
                       f"side: must be \"buy\" or \"sell\", got {_shown(side)}")
    if margin_mode not in MARGIN_MODES:
        raise Rejected(Reason.UNKNOWN_MARGIN_MODE, f"margin_mode: must be \"cross\" or "
                                                   f"\"isolated\", got {_shown(margin_mode)}")
    return Fill(fill_id=fill_id, account=account, symbol=symbol, side=side, qty=qty,
                price=price, fee=fee, ts=ts, margin_mode=margin_mode)


def _ledger(doc: dict[str, Any], config: RiskConfig) -> LedgerEntry:
    entry_id = _identifier(doc, "entry_id")
    account = _account(doc, config)
    asset = _identifier(doc, "asset")
    amount = _bounded(doc, "amount")
    kind = _string(doc, "kind")
    ts = _ts(doc)
    if asset not in config.assets:
        raise Rejected(Reason.UNKNOWN_ASSET, f"asset: {asset!r} is not a configured asset")
    if kind not in LEDGER_KINDS:
        kinds = ", ".join(sorted(LEDGER_KINDS))
        raise Rejected(Reason.UNKNOWN_KIND, f"kind: must be one of {kinds}, got {_shown(kind)}")
    # SPEC §2: money comes in by deposit and goes out by withdrawal; the other kinds are signed.
    if kind == "deposit" and not amount > 0:
        raise Rejected(Reason.WRONG_SIGN, f"amount: a deposit must be > 0, got {amount!r}")
    if kind == "withdrawal" and not amount < 0:
        raise Rejected(Reason.WRONG_SIGN, f"amount: a withdrawal must be < 0, got {amount!r}")
    if kind != ISOLATED_MARGIN:
        return LedgerEntry(entry_id=entry_id, account=account, asset=asset, amount=amount,
                           kind=kind, ts=ts)
    # SPEC §4.1: the wallet of (account, symbol) holds the instrument's settle asset only.
    symbol = _identifier(doc, "symbol")
    instrument = config.instruments.get(symbol)
    if instrument is None:
        raise Rejected(Reason.UNKNOWN_INSTRUMENT, f"symbol: {symbol!r} is not a configured "
                                                  f"instrument")
    if asset != instrument.settle:
        raise Rejected(Reason.NOT_SETTLE_ASSET, f"asset: an isolated wallet of {symbol!r} "
                                                f"holds {instrument.settle!r}, got {asset!r}")
    return LedgerEntry(entry_id=entry_id, account=account, asset=asset, amount=amount,
                       kind=kind, ts=ts, symbol=symbol)


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


def _field(doc: dict[str, Any], name: str) -> Any:
    try:
        return doc[name]
    except KeyError:
        raise Rejected(Reason.MISSING_FIELD, f"{name}: required field is missing") from None


def _string(doc: dict[str, Any], name: str) -> str:
    value = _field(doc, name)
    if not isinstance(value, str):
        raise Rejected(Reason.WRONG_TYPE, f"{name}: must be a string, got {_json_type(value)}")
    return value


def _identifier(doc: dict[str, Any], name: str) -> str:
    value = _string(doc, name)
    if not value:
        raise Rejected(Reason.BAD_IDENTIFIER, f"{name}: must not be empty")
    if len(value) > MAX_ID_LENGTH:
        raise Rejected(Reason.BAD_IDENTIFIER, f"{name}: must be at most {MAX_ID_LENGTH} "
                                              f"characters, got {len(value)}")
    return value


def _account(doc: dict[str, Any], config: RiskConfig) -> str:
    account = _identifier(doc, "account")
    if NUL in account:
        raise Rejected(Reason.BAD_IDENTIFIER, "account: must not contain NUL (U+0000), which "
                                              "begins liqmon's own keys in its state topic")
    symbol = instrument_after_slash(account, config.instruments)
    if symbol is not None:
        owner = account[:len(account) - len(symbol) - 1]
        raise Rejected(Reason.BAD_IDENTIFIER,
                       f"account: must not end in '/' and an instrument ({symbol!r}): its "
                       f"event ids would be those of the isolated {symbol} position of "
                       f"account {_shown(owner)} (account/symbol:counter:type, SPEC §4.1)")
    return account


def _shown(value: str) -> str:
    """A string as a rejection detail shows it: long ones cut, so log lines stay short."""
    return repr(value) if len(value) <= 40 else f"{value[:20]!r}…({len(value)} characters)"


def _finite(doc: dict[str, Any], name: str) -> float:
    value = _field(doc, name)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise Rejected(Reason.WRONG_TYPE, f"{name}: must be a number, got {_json_type(value)}")
    try:
        number = float(value)
    except OverflowError:  # an integer literal beyond the range of a double
        number = math.inf
    if not math.isfinite(number):
        raise Rejected(Reason.NON_FINITE, f"{name}: must be finite, got {_abbreviated(value)}")
    return number


def _abbreviated(value: int | float) -> str:
    text = repr(value)
    return text if len(text) <= 40 else f"{text[:20]}…({len(text)} digits)"


def _bounded(doc: dict[str, Any], name: str) -> float:
    number = _finite(doc, name)
    if abs(number) > MAX_MAGNITUDE:
        raise Rejected(Reason.TOO_LARGE, f"{name}: must be within ±{MAX_MAGNITUDE:g}, "
                                         f"got {number!r}")
    return number


def _positive(doc: dict[str, Any], name: str) -> float:
    number = _finite(doc, name)
    if number <= 0:
        raise Rejected(Reason.OUT_OF_RANGE, f"{name}: must be > 0, got {number!r}")
    if number < MIN_MAGNITUDE:
        raise Rejected(Reason.OUT_OF_RANGE, f"{name}: must be at least {MIN_MAGNITUDE:g} "
                                            f"(smaller figures underflow the margins), got "
                                            f"{number!r}")
    if number > MAX_MAGNITUDE:
        raise Rejected(Reason.TOO_LARGE, f"{name}: must be at most {MAX_MAGNITUDE:g}, "
                                         f"got {number!r}")
    return number


def _ts(doc: dict[str, Any]) -> int:
    value = _field(doc, "ts")
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise Rejected(Reason.WRONG_TYPE, f"ts: must be an integer, got {_json_type(value)}")
    if isinstance(value, float):
        if not math.isfinite(value):
            raise Rejected(Reason.NON_FINITE, f"ts: must be finite, got {value!r}")
        if not value.is_integer():
            raise Rejected(Reason.WRONG_TYPE, f"ts: must be an integer, got {value!r}")
        value = int(value)
    if not 0 <= value <= MAX_TS:
        raise Rejected(Reason.OUT_OF_RANGE, f"ts: must be in [0, 2^63-1] ms, got {value}")
    return value
