"""The checkpoint format (SPEC §6): account snapshots and control records, versioned JSON.

Pure encoding and decoding, no Kafka. A record that does not decode raises SnapshotError; the
caller adds where it was read from.

Account snapshot (key: the account id):
    {"v": 1, "seq": 7, "as_of": [[topic, partition, next_offset], ...],
     "balances": {...}, "positions": {"BTC-PERP": [qty, entry_price]}, "state": 1,
     "transitions": 4, "partition": 0}
Isolated position snapshot (SPEC §4.1; key: ISOLATED_KEY_PREFIX + the JSON array
[account, symbol], see `state_key`): the same value, its balances the wallet and its positions
that one position (or none).
Control record (key: CONTROL_KEY, one per changelog partition):
    {"v": 1, "seq": 7, "written_at": ms, "offsets": [[topic, partition, next_offset], ...],
     "prices": {"BTC": [price, ts]}, "dedupe": [[topic, partition, [[account, id], ...]], ...],
     "config": "1099e72073f623b0"}
``config`` is the fingerprint of the risk config the state was computed with (absent in
records written before it existed).
``as_of`` and ``offsets`` are the next input offsets the state reflects (Kafka's commit
convention), so a restore resumes exactly there.

Numbers of state are written as JSON numbers, or as the strings "inf", "-inf" and "nan" when not
finite (JSON has no spelling for them, and orjson would write null, which no restore can read).
Input bounds (records.MAX_MAGNITUDE) keep state finite; this keeps a checkpoint restorable even
if it were not, so that no input can turn every restart into a failure.
"""

from __future__ import annotations

import math
from collections.abc import Hashable
from dataclasses import dataclass, field
from itertools import chain
from typing import Any

import orjson

from monitor.account import Account, RiskKey, UnitKey
from monitor.margin import Position
from monitor.state import AccountState

FORMAT_VERSION = 1
CONTROL_KEY = b"\x00liqmon.control"  # no account id starts with NUL in practice
ISOLATED_KEY_PREFIX = b"\x00liqmon.isolated"  # likewise: apart from every account's key
KIND_HEADER = "liqmon.kind"

Offsets = dict[tuple[str, int | None], int]


class SnapshotError(ValueError):
    """A checkpoint record that cannot be decoded."""


@dataclass(slots=True)
class Control:
    seq: int
    written_at: int
    offsets: Offsets  # input positions of this partition's topics and of prices
    prices: dict[str, tuple[float, int]]
    dedupe: dict[tuple[str, int | None], list[Hashable]] = field(default_factory=dict)
    config: str | None = None  # risk config fingerprint; None in records older than it


def _pairs(offsets: Offsets) -> list[list[Any]]:
    return [[topic, partition, offset] for (topic, partition), offset in sorted(
        offsets.items(), key=lambda item: (item[0][0], -1 if item[0][1] is None else item[0][1]))]


def _offsets(raw: Any) -> Offsets:
    # the snapshots of one checkpoint share their offsets: parse each distinct list once
    key = tuple(map(tuple, raw))
    parsed = _OFFSETS_SEEN.get(key)
    if parsed is None:
        parsed = {(str(topic), None if partition is None else int(partition)): int(offset)
                  for topic, partition, offset in raw}
        if len(_OFFSETS_SEEN) >= 1_024:
            _OFFSETS_SEEN.clear()
        _OFFSETS_SEEN[key] = parsed
    return parsed  # shared by the snapshots that carry the same offsets: read, never change


_OFFSETS_SEEN: dict[tuple[Any, ...], Offsets] = {}


def state_key(key: RiskKey) -> bytes:
    """The `liqmon.state` record key of an account (its id) or of an isolated position. An
    account id may contain "/" or anything else, so a position's key is not built by joining
    strings: a NUL-led prefix and a JSON array, which no account key takes apart."""
    if isinstance(key, UnitKey):
        return ISOLATED_KEY_PREFIX + orjson.dumps([key.account, key.symbol])
    return key.encode()


def risk_key(raw: bytes) -> RiskKey:
    """The account or isolated position a `liqmon.state` record key names (`state_key`).
    Anything but the prefix and a [str, str] array is an account id, however odd: an input
    must not be able to make a checkpoint unreadable."""
    if raw.startswith(ISOLATED_KEY_PREFIX):
        try:
            pair = orjson.loads(raw[len(ISOLATED_KEY_PREFIX):])
        except orjson.JSONDecodeError:
            pair = None
        if (isinstance(pair, list) and len(pair) == 2
                and all(isinstance(part, str) for part in pair)):
            return UnitKey(*pair)
    return raw.decode()


def encode_account(account: Account, seq: int, as_of: Offsets) -> bytes:
    balances: dict[str, Any] = account.balances
    positions: dict[str, list[Any]] = {
        symbol: [p.qty, p.entry_price] for symbol, p in account.positions.items()}
    # One sum on the checkpoint path: finite when every term is (a sum that overflows only
    # sends the account down the careful path).
    if not math.isfinite(sum(balances.values()) + sum(q + e for q, e in positions.values())):
        balances = {asset: _number(amount) for asset, amount in balances.items()}
        positions = {symbol: [_number(x) for x in pair] for symbol, pair in positions.items()}
    return orjson.dumps({
        "v": FORMAT_VERSION,
        "seq": seq,
        "as_of": _pairs(as_of),
        "balances": balances,
        "positions": positions,
        "state": int(account.state),
        "transitions": account.transitions,
        "partition": account.partition,
    })


def decode_account(raw: bytes) -> tuple[Account, int, Offsets]:
    doc = _load(raw)
    try:
        balances = doc["balances"]
        pairs = doc["positions"]
        # A restore decodes every account: the common case (plain numbers, [qty, entry]
        # pairs) is checked in bulk, and only the rest goes through the careful path.
        if not (_PLAIN.issuperset(map(type, balances.values()))
                and _PAIRS.issuperset(map(type, pairs.values()))
                and _TWO.issuperset(map(len, pairs.values()))
                and _PLAIN.issuperset(map(type, chain.from_iterable(pairs.values())))):
            balances = {str(asset): _float(amount) for asset, amount in balances.items()}
            pairs = {str(symbol): (_float(q), _float(e)) for symbol, (q, e) in pairs.items()}
        account = Account(
            balances=balances,
            positions={symbol: Position(q, e) for symbol, (q, e) in pairs.items()},
            state=_STATES[doc["state"]],
            transitions=int(doc["transitions"]),
            partition=None if doc["partition"] is None else int(doc["partition"]),
        )
        return account, int(doc["seq"]), _offsets(doc["as_of"])
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise SnapshotError(f"account snapshot is malformed: {exc!r}") from None


def encode_control(control: Control) -> bytes:
    return orjson.dumps({
        "v": FORMAT_VERSION,
        "seq": control.seq,
        "written_at": control.written_at,
        "offsets": _pairs(control.offsets),
        "prices": {symbol: [_number(price), ts] for symbol, (price, ts) in control.prices.items()},
        # ids are (account, record id) tuples, which orjson writes as arrays itself
        "dedupe": [[topic, partition, ids]
                   for (topic, partition), ids in sorted(control.dedupe.items(),
                                                         key=lambda item: str(item[0]))],
        "config": control.config,
    })


def decode_control(raw: bytes) -> Control:
    doc = _load(raw)
    try:
        return Control(
            seq=int(doc["seq"]),
            written_at=int(doc["written_at"]),
            offsets=_offsets(doc["offsets"]),
            prices={str(s): (_float(price), int(ts)) for s, (price, ts) in doc["prices"].items()},
            dedupe={(str(topic), None if partition is None else int(partition)):
                    [(str(account), str(record_id)) for account, record_id in ids]
                    for topic, partition, ids in doc["dedupe"]},
            config=None if doc.get("config") is None else str(doc["config"]),
        )
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise SnapshotError(f"control record is malformed: {exc!r}") from None


def _load(raw: bytes) -> dict[str, Any]:
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise SnapshotError(f"not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise SnapshotError("not a JSON object")
    version = doc.get("v")
    if version != FORMAT_VERSION:
        raise SnapshotError(f"unsupported snapshot format version {version!r} "
                            f"(this liqmon reads version {FORMAT_VERSION})")
    return doc


_NON_FINITE = {"inf": math.inf, "-inf": -math.inf, "nan": math.nan}
_PLAIN = frozenset({float, int})  # JSON numbers as orjson returns them (a bool is neither)
_PAIRS = frozenset({list})
_TWO = frozenset({2})
_STATES = {int(state): state for state in AccountState}


def _number(value: float) -> float | str:
    return value if math.isfinite(value) else repr(value)  # 'inf', '-inf', 'nan'


def _float(value: Any) -> float:
    """A number of state as `_number` wrote it."""
    if isinstance(value, str):
        return _NON_FINITE[value]  # KeyError: malformed
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"not a number: {value!r}")
    return float(value)
