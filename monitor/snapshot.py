"""The checkpoint format (SPEC §6): account snapshots, their layouts, and control records.

Pure encoding and decoding, no Kafka. A record that does not decode raises SnapshotError (with
the index of the record in a batch); the caller adds where it was read from.

**Account snapshot** (key: the account id), format 2: binary, made for the book's columns, so
that a restore decodes a changelog partition in a few numpy passes (`decode_snapshots`) and the
book installs it in as many (`Book.install_many`). Little-endian, packed:

    header (38 bytes)  magic "LQ", version u8 = 2 (every later format starts with the same
                       three bytes), state u8, partition i32 (-1: none), transitions i64,
                       seq i64, layout u64, then the counts: balances u16, positions u16,
                       as_of u16
    balances           (name u16, amount f64) per balance
    positions          (name u16, qty f64, entry price f64) per position, in opening order
    as_of              (topic u16, partition i32 (-1: none), next offset i64) per input

A name is an index into the names of the record's *layout*, a record of its own in the same
changelog partition (key `LAYOUT_PREFIX` + id, JSON `{"v": 2, "names": [...]}`; the id is a
digest of the names): the checkpoint's assets, instruments and input topics, written (and
acknowledged) before any snapshot that refers to it, and again by every checkpoint that writes
snapshots, so compaction keeps a layout at least as long as the snapshots that use it.
Records name assets and instruments by name, never by a position in the risk config, so a
config change (`--accept-config-change`) reads old snapshots correctly. Decoding needs no
per-name lookup: fixed-width entries are gathered for a whole batch at once. A field added per
account or per position later is a new version with its own header and entry layouts beside
these; version 2 records keep decoding as they are.

**Format 1**, JSON, written before format 2, is still read, so an upgrade needs no
--reset-state (a changelog holding both restores; the next checkpoint of an account rewrites
it in format 2):
    {"v": 1, "seq": 7, "as_of": [[topic, partition, next_offset], ...],
     "balances": {...}, "positions": {"BTC-PERP": [qty, entry_price]}, "state": 1,
     "transitions": 4, "partition": 0}
with the numbers that are not finite as the strings "inf", "-inf" and "nan".

**Tombstone** (a null value; key: as its snapshots'): an account or position forgotten. It
carries its partition's `as_of_total` in the header `liqmon.as_of_total` (decimal), as a
snapshot carries it in its ``as_of``: a restore keeps, of each key, the record whose state has
read the most (see `monitor.service.changelog`). And its ``as_of`` itself in the header
`liqmon.as_of` (`encode_as_of`: JSON, as a control record's offsets), so that a restore
re-reading inputs from an older control record skips those the tombstone reflects.

**Isolated position snapshot** (SPEC §4.1; key: ISOLATED_KEY_PREFIX + the JSON array
[account, symbol], see `state_key`): an account snapshot of either format, its balances the
wallet and its positions that one position (or none).

**Control record** (key: CONTROL_KEY, one per changelog partition), JSON:
    {"v": 1, "seq": 7, "written_at": ms, "offsets": [[topic, partition, next_offset], ...],
     "prices": {"BTC": [price, ts]}, "dedupe": [[topic, partition, [[account, id], ...]], ...],
     "config": "1099e72073f623b0"}
``config`` is the fingerprint of the risk config the state was computed with (absent in
records written before it existed).

``as_of`` and ``offsets`` are the next input offsets the state reflects (Kafka's commit
convention), so a restore resumes exactly there.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import cramjam
import numpy as np
import orjson

from monitor.account import Account, RiskKey, UnitKey
from monitor.compiled import jit
from monitor.margin import Position
from monitor.state import AccountState

JSON_VERSION = 1  # control records, layouts' envelope, and account snapshots before format 2
SNAPSHOT_VERSION = 2
MAGIC = b"LQ"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"  # how a zstd frame begins: a control record since zstd
CONTROL_KEY = b"\x00liqmon.control"  # no account id starts with NUL in practice
ISOLATED_KEY_PREFIX = b"\x00liqmon.isolated"  # likewise: apart from every account's key
LAYOUT_PREFIX = b"\x00liqmon.layout."
KIND_HEADER = "liqmon.kind"

Offsets = dict[tuple[str, int | None], int]
# `as_of_total` of a record that does not say (a tombstone or a format 1 snapshot written
# before totals were compared): it replaces, and is replaced by, the records around it in
# log order, as every record did before
UNRANKED = -1

_HEAD = np.dtype([("magic", "S2"), ("version", "u1"), ("state", "u1"), ("partition", "<i4"),
                  ("transitions", "<i8"), ("seq", "<i8"), ("layout", "<u8"),
                  ("balances", "<u2"), ("positions", "<u2"), ("as_of", "<u2")])
_BALANCE = np.dtype([("name", "<u2"), ("amount", "<f8")])
_POSITION = np.dtype([("name", "<u2"), ("qty", "<f8"), ("entry", "<f8")])
_AS_OF = np.dtype([("topic", "<u2"), ("partition", "<i4"), ("offset", "<i8")])
_COUNTS_AT = _HEAD.itemsize - 6  # the header ends with the three counts, u16 each
_OFFSET_AT = _AS_OF.itemsize - 8  # an as_of entry ends with the offset, i64
_MAGIC_FIRST, _MAGIC_SECOND = MAGIC  # as numbers, for compiled code
_MAX_U16 = 0xFFFF
_STATES = tuple(AccountState)


class SnapshotError(ValueError):
    """A checkpoint record that cannot be decoded; ``index``: which record of a batch."""

    def __init__(self, message: str, index: int | None = None) -> None:
        super().__init__(message)
        self.index = index


@dataclass(slots=True)
class Control:
    seq: int
    written_at: int
    offsets: Offsets  # input positions of this partition's topics and of prices
    prices: dict[str, tuple[float, int]]
    dedupe: dict[tuple[str, int | None], list[Hashable]] = field(default_factory=dict)
    config: str | None = None  # risk config fingerprint; None in records older than it


@dataclass(frozen=True)
class Layout:
    """The names the snapshots of a checkpoint refer to by number."""

    names: tuple[str, ...]

    @cached_property
    def encoded(self) -> bytes:
        return orjson.dumps({"v": SNAPSHOT_VERSION, "names": list(self.names)})

    @cached_property
    def id(self) -> int:
        return _digest(self.names)

    @property
    def key(self) -> bytes:
        return LAYOUT_PREFIX + self.id.to_bytes(8, "little").hex().encode()


def _digest(names: Sequence[str]) -> int:
    return int.from_bytes(hashlib.blake2b(orjson.dumps(list(names)), digest_size=8).digest(),
                          "little")


def decode_layout(raw: bytes | None) -> Layout:
    doc = _load(raw)
    names = doc.get("names")
    if doc.get("v") != SNAPSHOT_VERSION or not isinstance(names, list) \
            or not all(isinstance(name, str) for name in names):
        raise SnapshotError(f"layout record is malformed: {doc!r:.200}")
    return Layout(tuple(names))


@dataclass(slots=True)
class Snapshots:
    """Account snapshots as columns: what a checkpoint encodes and a restore installs.

    One entry per account in ``ids``, ``state``, ``transitions``, ``partition`` (-1: none) and
    ``seq``. Balances, positions and as_of inputs are runs of entries, account after account
    (``*_count`` of them each; positions in the order they were opened), naming assets,
    instruments and topics by their index in ``names``.
    """

    ids: list[RiskKey]  # account ids, and UnitKeys of isolated positions
    state: np.ndarray  # int8
    transitions: np.ndarray  # int64
    partition: np.ndarray  # int32
    seq: np.ndarray  # int64
    names: list[str]
    bal_count: np.ndarray  # int64, per account
    bal_name: np.ndarray  # int64, per balance
    bal_amount: np.ndarray  # float64
    pos_count: np.ndarray
    pos_name: np.ndarray
    pos_qty: np.ndarray
    pos_entry: np.ndarray
    as_of_count: np.ndarray
    as_of_topic: np.ndarray  # int64, index into names
    as_of_partition: np.ndarray  # int32 (-1: none)
    as_of_offset: np.ndarray  # int64

    def __len__(self) -> int:
        return len(self.ids)

    @classmethod
    def from_accounts(cls, entries: Sequence[tuple[RiskKey, Account, int, Offsets]],
                      names: Sequence[str] = ()) -> Snapshots:
        """Columns of (account id, account, seq, as_of) entries (the accounts' own order);
        ``names`` come first in the names, others as met."""
        numbers: dict[str, int] = {}
        name_id = numbers.setdefault
        for name in names:
            name_id(name, len(numbers))
        bal_name: list[int] = []
        bal_amount: list[float] = []
        pos_name: list[int] = []
        pos_qty: list[float] = []
        pos_entry: list[float] = []
        for _, account, _, _ in entries:
            for asset, amount in account.balances.items():
                bal_name.append(name_id(asset, len(numbers)))
                bal_amount.append(amount)
            for symbol, position in account.positions.items():
                pos_name.append(name_id(symbol, len(numbers)))
                pos_qty.append(position.qty)
                pos_entry.append(position.entry_price)
        accounts = [account for _, account, _, _ in entries]
        as_of = _as_of_columns([as_of for _, _, _, as_of in entries],
                               lambda name: name_id(name, len(numbers)))
        return cls(
            ids=[account_id for account_id, _, _, _ in entries],
            state=np.array([int(a.state) for a in accounts], np.int8),
            transitions=np.array([a.transitions for a in accounts], np.int64),
            partition=np.array([-1 if a.partition is None else a.partition
                                for a in accounts], np.int32),
            seq=np.array([seq for _, _, seq, _ in entries], np.int64),
            names=list(numbers),
            bal_count=np.array([len(a.balances) for a in accounts], np.int64),
            bal_name=np.array(bal_name, np.int64), bal_amount=np.array(bal_amount, np.float64),
            pos_count=np.array([len(a.positions) for a in accounts], np.int64),
            pos_name=np.array(pos_name, np.int64), pos_qty=np.array(pos_qty, np.float64),
            pos_entry=np.array(pos_entry, np.float64),
            as_of_count=as_of[0], as_of_topic=as_of[1], as_of_partition=as_of[2],
            as_of_offset=as_of[3])

    def stamped(self, seq: int, as_of: Sequence[Offsets]) -> Snapshots:
        """These snapshots as a checkpoint writes them: with its ``seq`` and, per account,
        the input offsets its state reflects (accounts of one partition share one dict).
        The input topics join ``names`` in sorted order, so that every chunk of a checkpoint
        has the same layout."""
        topics = sorted({topic for offsets in {id(o): o for o in as_of}.values()
                         for topic, _ in offsets})
        names = [*self.names, *topics]
        index = {topic: len(self.names) + n for n, topic in enumerate(topics)}
        count, topic, partition, offset = _as_of_columns(as_of, index.__getitem__)
        return Snapshots(
            ids=self.ids, state=self.state, transitions=self.transitions,
            partition=self.partition, seq=np.full(len(self.ids), seq, np.int64), names=names,
            bal_count=self.bal_count, bal_name=self.bal_name, bal_amount=self.bal_amount,
            pos_count=self.pos_count, pos_name=self.pos_name, pos_qty=self.pos_qty,
            pos_entry=self.pos_entry, as_of_count=count, as_of_topic=topic,
            as_of_partition=partition, as_of_offset=offset)

    @classmethod
    def concat(cls, parts: Sequence[Snapshots]) -> Snapshots:
        """One batch of several; each part's names keep their own numbers, shifted."""
        if len(parts) == 1:
            return parts[0]
        shifts = np.cumsum([0, *(len(p.names) for p in parts)])

        def joined(column: str, shift: bool = False) -> np.ndarray:
            arrays = [getattr(p, column) + (shifts[n] if shift else 0)
                      for n, p in enumerate(parts)]
            return np.concatenate(arrays) if arrays else np.empty(0, np.int64)

        return cls(
            ids=[i for p in parts for i in p.ids], state=joined("state"),
            transitions=joined("transitions"), partition=joined("partition"),
            seq=joined("seq"), names=[n for p in parts for n in p.names],
            bal_count=joined("bal_count"), bal_name=joined("bal_name", True),
            bal_amount=joined("bal_amount"), pos_count=joined("pos_count"),
            pos_name=joined("pos_name", True), pos_qty=joined("pos_qty"),
            pos_entry=joined("pos_entry"), as_of_count=joined("as_of_count"),
            as_of_topic=joined("as_of_topic", True), as_of_partition=joined("as_of_partition"),
            as_of_offset=joined("as_of_offset"))

    def accounts(self) -> Iterator[tuple[RiskKey, Account, int, Offsets]]:
        """(account id, account, seq, as_of) one at a time, for reading, not restoring."""
        names = self.names
        bal, pos, as_of = (np.cumsum(np.concatenate(([0], c))).tolist()
                           for c in (self.bal_count, self.pos_count, self.as_of_count))
        bal_name, bal_amount = self.bal_name.tolist(), self.bal_amount.tolist()
        pos_name, qty, entry = self.pos_name.tolist(), self.pos_qty.tolist(), \
            self.pos_entry.tolist()
        topic, partition, offset = (self.as_of_topic.tolist(), self.as_of_partition.tolist(),
                                    self.as_of_offset.tolist())
        for n, account_id in enumerate(self.ids):
            part = int(self.partition[n])
            account = Account(
                balances={names[bal_name[k]]: bal_amount[k] for k in range(bal[n], bal[n + 1])},
                positions={names[pos_name[k]]: Position(qty[k], entry[k])
                           for k in range(pos[n], pos[n + 1])},
                state=_STATES[self.state[n]], transitions=int(self.transitions[n]),
                partition=None if part < 0 else part)
            offsets = {(names[topic[k]], None if partition[k] < 0 else partition[k]): offset[k]
                       for k in range(as_of[n], as_of[n + 1])}
            yield account_id, account, int(self.seq[n]), offsets


def _as_of_columns(as_of: Sequence[Offsets], name_id: Callable[[str], int]
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per-account as_of dicts as (count, topic, partition, offset) columns; a dict shared by
    many accounts (those of one partition in one checkpoint) is read once."""
    seen: dict[int, int] = {}
    topic: list[int] = []
    partition: list[int] = []
    offset: list[int] = []
    bounds = [0]
    which = []
    for offsets in as_of:
        template = seen.get(id(offsets))
        if template is None:
            template = seen[id(offsets)] = len(bounds) - 1
            for (name, part), next_offset in offsets.items():
                topic.append(name_id(name))
                partition.append(-1 if part is None else part)
                offset.append(next_offset)
            bounds.append(len(topic))
        which.append(template)
    edges = np.array(bounds, np.int64)
    chosen = np.array(which, np.int64)
    count = edges[chosen + 1] - edges[chosen]
    pick = _gather_runs(edges[chosen], count)
    return (count, np.array(topic, np.int64)[pick], np.array(partition, np.int32)[pick],
            np.array(offset, np.int64)[pick])


# -- format 2: columns <-> bytes ----------------------------------------------------------------

def encode_snapshots(snapshots: Snapshots) -> tuple[Layout, list[bytes]]:
    """Every account's record, and the layout they refer to (write it first)."""
    s = snapshots
    n = len(s)
    if len(s.names) > _MAX_U16 + 1 or max(
            (int(c.max()) for c in (s.bal_count, s.pos_count, s.as_of_count) if n), default=0
            ) > _MAX_U16:
        raise ValueError(f"snapshots too large for format {SNAPSHOT_VERSION}: more than "
                         f"{_MAX_U16} names or entries of one kind in one account")
    layout = Layout(tuple(s.names))
    if not n:  # a checkpoint chunk whose accounts were all forgotten: tombstones only
        return layout, []
    nb, npos, na = s.bal_count, s.pos_count, s.as_of_count
    length = _HEAD.itemsize + _BALANCE.itemsize * nb + _POSITION.itemsize * npos \
        + _AS_OF.itemsize * na
    start = run_starts(length)
    out = np.zeros(int(length.sum()), np.uint8)
    head = np.zeros(n, _HEAD)
    head["magic"], head["version"], head["layout"] = MAGIC, SNAPSHOT_VERSION, layout.id
    head["state"], head["partition"] = s.state, s.partition
    head["transitions"], head["seq"] = s.transitions, s.seq
    head["balances"], head["positions"], head["as_of"] = nb, npos, na
    _scatter(out, start, head)
    cursor = start + _HEAD.itemsize
    for dtype, count, columns in (
            (_BALANCE, nb, {"name": s.bal_name, "amount": s.bal_amount}),
            (_POSITION, npos, {"name": s.pos_name, "qty": s.pos_qty, "entry": s.pos_entry}),
            (_AS_OF, na, {"topic": s.as_of_topic, "partition": s.as_of_partition,
                          "offset": s.as_of_offset})):
        entries = np.empty(int(count.sum()), dtype)
        for name, column in columns.items():
            entries[name] = column
        _scatter(out, _entry_positions(cursor, count, dtype.itemsize), entries)
        cursor = cursor + dtype.itemsize * count
    data = out.tobytes()
    bounds = np.append(start, len(data)).tolist()
    return layout, [data[bounds[k]:bounds[k + 1]] for k in range(n)]


def decode_snapshots(values: Sequence[bytes], ids: Sequence[RiskKey],
                     layouts: Mapping[int, Layout]) -> Snapshots:
    """Columns of account snapshot records of either format; ``ids``: their account ids,
    ``layouts``: by id, those the format 2 records may refer to."""
    length = np.fromiter(map(len, values), np.int64, len(values))
    return decode_packed(b"".join(values), run_starts(length), length, ids, layouts)


def decode_packed(buffer: bytes | bytearray, start: np.ndarray, length: np.ndarray,
                  ids: Sequence[RiskKey], layouts: Mapping[int, Layout]) -> Snapshots:
    """`decode_snapshots` of records held back to back in one buffer: record k is
    ``length[k]`` bytes from ``start[k]`` (a restore packs them so as it reads)."""
    n = len(length)
    if n == 0:
        return Snapshots.from_accounts([])
    blob = np.frombuffer(buffer, np.uint8)
    last = max(len(blob) - 1, 0)

    def byte(at: np.ndarray) -> np.ndarray:  # 0 past the end (an empty or short record)
        return blob[np.minimum(at, last)] if len(blob) else np.zeros(len(at), np.uint8)

    first = byte(start)
    binary = (length >= 3) & (first == MAGIC[0]) & (byte(start + 1) == MAGIC[1])
    text = (length > 0) & (first == ord("{"))
    unknown = ~(binary | text)

    def raw(k: int) -> bytes:
        return bytes(blob[start[k]:start[k] + length[k]])

    if unknown.any():
        k = int(np.argmax(unknown))
        raise SnapshotError(f"neither a JSON nor a binary snapshot (starts {raw(k)[:8]!r})", k)
    version = np.where(binary, byte(start + 2), SNAPSHOT_VERSION)
    if (version != SNAPSHOT_VERSION).any():
        k = int(np.argmax(version != SNAPSHOT_VERSION))
        raise SnapshotError(f"unsupported snapshot format version {version[k]} (this liqmon "
                            f"reads versions {JSON_VERSION} and {SNAPSHOT_VERSION})", k)
    if not text.any():
        return _decode_binary(blob, start, length, list(ids), layouts, np.arange(n))
    parts = []
    where = np.flatnonzero(binary)
    if len(where):
        parts.append(_decode_binary(blob, start[where], length[where],
                                    [ids[k] for k in where.tolist()], layouts, where))
    entries = []
    for k in np.flatnonzero(text).tolist():
        try:
            account, seq, as_of = _decode_json_account(raw(k))
        except SnapshotError as exc:
            raise SnapshotError(str(exc), k) from None
        entries.append((ids[k], account, seq, as_of))
    parts.append(Snapshots.from_accounts(entries))
    return Snapshots.concat(parts)


def _decode_binary(blob: np.ndarray, start: np.ndarray, length: np.ndarray, ids: list[RiskKey],
                   layouts: Mapping[int, Layout], where: np.ndarray) -> Snapshots:
    """Format 2 records, every one checked: ``where`` maps them to the caller's indexes."""
    def fail(bad: np.ndarray, message: Callable[[int], str]) -> None:
        if bad.any():
            k = int(np.argmax(bad))
            raise SnapshotError(message(k), int(where[k]))

    fail(length < _HEAD.itemsize,
         lambda k: f"truncated: {length[k]} bytes, shorter than a snapshot header")
    head = _gather(blob, _HEAD, start)
    nb, npos, na = (head[c].astype(np.int64) for c in ("balances", "positions", "as_of"))
    expected = _HEAD.itemsize + _BALANCE.itemsize * nb + _POSITION.itemsize * npos \
        + _AS_OF.itemsize * na
    fail(length != expected, lambda k: f"truncated or corrupt: {length[k]} bytes where its "
                                       f"header makes {expected[k]}")
    fail(head["state"] > max(_STATES), lambda k: f"state {head['state'][k]} is not a state")
    layout_ids = head["layout"]
    if (layout_ids == layout_ids[0]).all():  # the usual case: one layout
        used, which = layout_ids[:1], np.zeros(len(ids), np.int64)
    else:
        used, which = np.unique(layout_ids, return_inverse=True)
    missing = [n for n, layout_id in enumerate(used.tolist()) if layout_id not in layouts]
    fail(np.isin(which, missing), lambda k: f"refers to layout {int(layout_ids[k]):016x}, "
                                            "which the changelog partition does not hold")
    names: list[str] = []
    bases, sizes = [], []
    for layout_id in used.tolist():  # every layout used, one list of names
        bases.append(len(names))
        sizes.append(len(layouts[layout_id].names))
        names.extend(layouts[layout_id].names)
    base, size = np.array(bases, np.int64)[which], np.array(sizes, np.int64)[which]
    cursor = start + _HEAD.itemsize
    columns = []
    for dtype, count, named in ((_BALANCE, nb, "name"), (_POSITION, npos, "name"),
                                (_AS_OF, na, "topic")):
        entries = _gather(blob, dtype, _entry_positions(cursor, count, dtype.itemsize))
        cursor = cursor + dtype.itemsize * count
        name = entries[named].astype(np.int64)
        if len(used) == 1:  # one layout: its names are the first, no per-entry lookup
            beyond = name >= sizes[0]
        else:
            owner = np.repeat(np.arange(len(ids)), count)
            beyond = name >= size[owner]
            name += base[owner]
        if beyond.any():
            first_bad = np.repeat(np.arange(len(ids)), count)[beyond].min()
            fail(np.arange(len(ids)) == first_bad,
                 lambda k: f"names entry beyond its layout of {size[k]} names")
        if named == "name":  # one balance per asset, one position per instrument
            repeated = _repeated(name, count, len(names))
            if repeated is not None:
                fail(np.arange(len(ids)) == repeated,
                     lambda k: "names an asset or an instrument twice")
        columns.append((entries, name))
    (balances, bal_name), (positions, pos_name), (as_of, as_of_topic) = columns
    return Snapshots(
        ids=ids, state=head["state"].astype(np.int8), transitions=head["transitions"],
        partition=head["partition"], seq=head["seq"], names=names,
        bal_count=nb, bal_name=bal_name, bal_amount=balances["amount"],
        pos_count=npos, pos_name=pos_name, pos_qty=positions["qty"],
        pos_entry=positions["entry"], as_of_count=na, as_of_topic=as_of_topic,
        as_of_partition=as_of["partition"], as_of_offset=as_of["offset"])


def as_of_total(as_of: Offsets) -> int:
    """How far a state has read its inputs, as one number: the sum of the next offsets its
    ``as_of`` names. Every input applied raises it, so of two states of one account the
    newer has the larger (or the same) total, whichever instance wrote it; only a replaced
    input log (truncated or re-created) makes offsets go back."""
    return sum(as_of.values())


def encode_as_of(as_of: Offsets) -> bytes:
    """A tombstone's ``as_of``, for a header (it has no value to carry it): JSON
    [[topic, partition, next_offset], ...], as a control record's offsets."""
    return orjson.dumps(_pairs(as_of))


def decode_as_of(raw: bytes) -> Offsets:
    """The offsets `encode_as_of` wrote; SnapshotError if they are not that."""
    try:
        return dict(_offsets(orjson.loads(raw)))
    except (orjson.JSONDecodeError, TypeError, ValueError) as exc:
        raise SnapshotError(f"a tombstone's as_of header is malformed: {exc!r}") from None


def as_of_totals(buffer: bytes | bytearray | np.ndarray, start: np.ndarray,
                 length: np.ndarray) -> np.ndarray:
    """`as_of_total` of each format 2 snapshot held back to back in ``buffer`` (record k:
    ``length[k]`` bytes from ``start[k]``), read from the bytes with no layout: the offsets
    alone are summed. UNRANKED for a tombstone (length -1), a record of format 1, and one
    whose header does not match its length (its decode says why)."""
    blob = buffer if isinstance(buffer, np.ndarray) else np.frombuffer(buffer, np.uint8)
    return _as_of_totals(blob, start, length, _COUNTS_AT, _HEAD.itemsize, _BALANCE.itemsize,
                         _POSITION.itemsize, _AS_OF.itemsize, _OFFSET_AT)


@jit
def _as_of_totals(blob, start, length, counts_at, head, balance, position, as_of, offset_at):
    """`as_of_totals` in one compiled pass (numpy's took ~0.09 s a million snapshots, a
    third of reading them)."""
    out = np.full(length.shape[0], UNRANKED, np.int64)
    for k in range(length.shape[0]):
        at, size = start[k], length[k]
        if size < head or blob[at] != _MAGIC_FIRST or blob[at + 1] != _MAGIC_SECOND \
                or blob[at + 2] != SNAPSHOT_VERSION:
            continue
        counts = at + counts_at
        balances = np.int64(blob[counts]) | np.int64(blob[counts + 1]) << 8
        positions = np.int64(blob[counts + 2]) | np.int64(blob[counts + 3]) << 8
        entries = np.int64(blob[counts + 4]) | np.int64(blob[counts + 5]) << 8
        if head + balance * balances + position * positions + as_of * entries != size:
            continue
        total = np.int64(0)
        for entry in range(at + size - as_of * entries, at + size, as_of):
            value = np.uint64(0)
            for j in range(8):
                value |= np.uint64(blob[entry + offset_at + j]) << np.uint64(8 * j)
            total += np.int64(value)
        out[k] = total
    return out


def _repeated(name: np.ndarray, count: np.ndarray, names: int) -> int | None:
    """The first account that names something twice among its entries (runs of ``count``
    entries each), if any. Each entry is compared with the ones up to 7 before it in one
    pass over all entries per distance (cheap, contiguous), then, for the few accounts with
    longer runs, with those further back among the entries that deep into their run."""
    if len(name) < 2:
        return None
    key = np.repeat(np.arange(len(count)) * names, count) + name  # same account, same name
    same = np.zeros(len(key), bool)
    longest = int(count.max())
    for back in range(1, min(longest, 8)):
        same[back:] |= key[back:] == key[:-back]
    if longest > 8:
        rank = np.arange(len(key)) - np.repeat(run_starts(count), count)
        deeper = np.flatnonzero(rank >= 8)
        for back in range(8, longest):
            same[deeper] |= key[deeper] == key[deeper - back]
            deeper = deeper[rank[deeper] > back]
    if not same.any():
        return None
    return int(key[np.argmax(same)] // names)


def _gather(buffer: np.ndarray, dtype: np.dtype, positions: np.ndarray) -> np.ndarray:
    """Items of ``dtype`` read at these byte positions of ``buffer``, in one indexing
    operation (as raw bytes: numpy copies a structured item field by field, ~5× slower)."""
    return _items(buffer, dtype.itemsize)[positions].view(dtype)


def _scatter(buffer: np.ndarray, positions: np.ndarray, items: np.ndarray) -> None:
    """Write ``items`` at these byte positions of ``buffer``."""
    _items(buffer, items.dtype.itemsize)[positions] = items.view(f"V{items.dtype.itemsize}")


def _items(buffer: np.ndarray, width: int) -> np.ndarray:
    """``buffer`` seen as ``width``-byte items starting at every byte (item i at byte i)."""
    return np.ndarray((len(buffer) - width + 1,), f"V{width}", buffer=buffer, strides=(1,))


def run_starts(count: np.ndarray) -> np.ndarray:
    """Exclusive running total: where each run begins (runs of ``count[k]`` back to back)."""
    out = np.zeros(len(count), np.int64)
    np.cumsum(count[:-1], out=out[1:])
    return out


def _gather_runs(first: np.ndarray, count: np.ndarray) -> np.ndarray:
    """Indexes first[k], first[k] + 1, … (count[k] of them) for every k, concatenated."""
    total = int(count.sum())
    return np.repeat(first - run_starts(count), count) + np.arange(total)


def _entry_positions(cursor: np.ndarray, count: np.ndarray, width: int) -> np.ndarray:
    """Byte positions of count[k] entries of ``width`` bytes from cursor[k], for every k:
    entry e (of all, in order) of run k is at cursor[k] + width·(e − first entry of k)."""
    return np.repeat(cursor - width * run_starts(count), count) \
        + width * np.arange(int(count.sum()))


# -- format 1 (JSON, read only) and control records ---------------------------------------------

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


def _decode_json_account(raw: bytes) -> tuple[Account, int, Offsets]:
    doc = _load(raw)
    if doc.get("v") != JSON_VERSION:
        raise SnapshotError(f"unsupported snapshot format version {doc.get('v')!r} (this "
                            f"liqmon reads versions {JSON_VERSION} and {SNAPSHOT_VERSION})")
    try:
        balances = {str(asset): _float(amount) for asset, amount in doc["balances"].items()}
        pairs = {str(symbol): (_float(q), _float(e)) for symbol, (q, e) in
                 doc["positions"].items()}
        account = Account(
            balances=balances,
            positions={symbol: Position(q, e) for symbol, (q, e) in pairs.items()},
            state=_STATE_OF[doc["state"]],
            transitions=_whole(doc["transitions"], 64),
            partition=None if doc["partition"] is None else _whole(doc["partition"], 32),
        )
        as_of = _offsets(doc["as_of"])
        for offset in as_of.values():
            _whole(offset, 64)
        return account, _whole(doc["seq"], 64), as_of
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise SnapshotError(f"account snapshot is malformed: {exc!r}") from None


def _whole(value: Any, bits: int) -> int:
    """A whole number that fits the signed ``bits``-bit column a restore puts it in (the
    numpy conversion raises OverflowError, far from the record, otherwise)."""
    number = int(value)
    if not -(1 << (bits - 1)) <= number < 1 << (bits - 1):
        raise ValueError(f"{number} does not fit {bits} bits")
    return number


def encode_account(account: Account, seq: int, as_of: Offsets,
                   account_id: str = "") -> tuple[Layout, bytes]:
    """One account's record (format 2) and its layout; a checkpoint encodes in batches."""
    layout, (value,) = encode_snapshots(
        Snapshots.from_accounts([(account_id, account, seq, as_of)]))
    return layout, value


def decode_account(raw: bytes, layouts: Mapping[int, Layout] | None = None
                   ) -> tuple[Account, int, Offsets]:
    """One account record of either format; a restore decodes in batches."""
    ((_, account, seq, as_of),) = decode_snapshots([raw], [""], layouts or {}).accounts()
    return account, seq, as_of


def encode_control(control: Control) -> bytes:
    """The control record: JSON in a zstd frame (level 1). Its duplicate windows make it large
    (~640 KB of JSON for ~20,000 ids a partition), and the producer compresses every batch
    again on the event loop: lz4 at level 9 took ~13 ms over the JSON (to 40 % of its size),
    ~2.5 ms over the frame, which zstd makes in ~2 ms (a quarter of the JSON's size)."""
    return bytes(cramjam.zstd.compress(_control_json(control), level=1))


def _control_json(control: Control) -> bytes:
    return orjson.dumps({
        "v": JSON_VERSION,
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


def decode_control(raw: bytes | None) -> Control:
    """A control record of either encoding: plain JSON (before zstd frames) or framed."""
    if raw is not None and raw[:4] == ZSTD_MAGIC:
        try:
            raw = bytes(cramjam.zstd.decompress(raw))
        except cramjam.DecompressionError as exc:
            raise SnapshotError(f"control record: a corrupt zstd frame ({exc})") from None
    doc = _load(raw)
    if doc.get("v") != JSON_VERSION:
        raise SnapshotError(f"unsupported control record version {doc.get('v')!r} (this "
                            f"liqmon reads version {JSON_VERSION})")
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


def _load(raw: bytes | None) -> dict[str, Any]:
    if raw is None:
        raise SnapshotError("no value (a tombstone)")
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise SnapshotError(f"not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise SnapshotError("not a JSON object")
    return doc


_NON_FINITE = {"inf": math.inf, "-inf": -math.inf, "nan": math.nan}
_STATE_OF = {int(state): state for state in AccountState}


def _number(value: float) -> float | str:
    return value if math.isfinite(value) else repr(value)  # 'inf', '-inf', 'nan'


def _float(value: Any) -> float:
    """A number of state as `_number` wrote it."""
    if isinstance(value, str):
        return _NON_FINITE[value]  # KeyError: malformed
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"not a number: {value!r}")
    return float(value)
