"""Checkpoints in the compacted `liqmon.state` topic, and restore from it (SPEC §6).

Changelog partition p holds the accounts and isolated positions of input partition p of
fills/ledger (keyed by account, or `snapshot.state_key` of the position; a tombstone once one may
be forgotten), the layouts their snapshots refer to (written before them, see
`monitor.snapshot`) and, written last in every checkpoint, a control record
with the input offsets, price table and duplicate windows the accounts correspond to. A
`reset` marker (written by --reset-state) makes a restore ignore everything before it but the
layouts, and every control record after it that was not written on a restore which read it:
an instance that was running when another reset the changelog goes on checkpointing only the
accounts it changed, and its control records cannot vouch for the others (`RESET_AT_HEADER`).
Its snapshots may name a layout it wrote before the marker, in the same checkpoint: a layout is
only the names a snapshot's numbers stand for, the same whoever wrote it, so it stays.

Of the snapshots of one key, a restore keeps the newest *state*, which is not always the last
record: an instance frozen past its session timeout may have handed a chunk of snapshots to its
Kafka client before it froze, which the client sends when it wakes, after the snapshots of the
instance that took its partitions over. Every snapshot says how far its state has read (the
sum of the next offsets its ``as_of`` names, `as_of_total`; a tombstone carries both in headers),
and a later record of a key replaces the one kept only if it has read no less. A restore that
re-reads inputs from an older control record (a crash mid-checkpoint) skips, for each account,
those its snapshot or tombstone already reflects. Input offsets
go back only when an input log is replaced (truncated or re-created); the instance that reads
it from its new start first writes an `epoch` marker to the changelog partitions concerned,
after which every record ranks above all before it.
"""

from __future__ import annotations

import asyncio
import gc
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from operator import attrgetter
from typing import cast

import numpy as np
import orjson
from aiokafka import AIOKafkaProducer, TopicPartition
from aiokafka.record.default_records import DefaultRecordBatchBuilder

from monitor.account import RiskKey, UnitKey
from monitor.book.store import NotInConfig
from monitor.compiled import compiling
from monitor.compiled import jit as _jit
from monitor.config import RiskConfig
from monitor.engine import DirtyUnits, Engine
from monitor.errors import LiqmonError
from monitor.reference import ReferenceEngine
from monitor.service.log_reader import (
    Record,
    RecordBatch,
    TopicsNotFound,
    bounds,
    read_range,
    reading_client,
    records_between,
    whole_batches,
)
from monitor.service.outbox import Outgoing
from monitor.service.probe import topic_partitions
from monitor.service.security import PLAINTEXT, KafkaSecurity
from monitor.service.settings import Topics
from monitor.snapshot import (
    CONTROL_KEY,
    ISOLATED_KEY_PREFIX,
    KIND_HEADER,
    UNRANKED,
    Control,
    Layout,
    Offsets,
    SnapshotError,
    Snapshots,
    as_of_total,
    as_of_totals,
    decode_as_of,
    decode_control,
    decode_layout,
    decode_packed,
    encode_as_of,
    encode_control,
    encode_snapshots,
    risk_key,
    run_starts,
    state_key,
)

ACCOUNT, CONTROL, LAYOUT, RESET, EPOCH = (b"account", b"control", b"layout", b"reset",
                                          b"epoch")
RESET_KEY = b"\x00liqmon.reset"
EPOCH_PREFIX = b"\x00liqmon.epoch."  # + a unique id: compaction keeps every epoch marker
AS_OF_TOTAL_HEADER = "liqmon.as_of_total"  # a tombstone's `as_of_total`, in decimal
AS_OF_HEADER = "liqmon.as_of"  # a tombstone's `as_of` (`encode_as_of`)
# A control record's: the offset of the reset marker its writer's state of the partition was
# restored after (decimal; NO_RESET: none). A restore takes a control record only if this is
# the newest marker it read (or if the header is missing: written before it existed).
RESET_AT_HEADER = "liqmon.reset_at"
NO_RESET = -1
EARLIER_EPOCH = -2  # the total of a record read before an epoch marker: any later one wins
_ACCOUNT_HEADERS = [(KIND_HEADER, ACCOUNT)]  # as the client's records hold their headers
PROGRESS_EVERY = 50_000  # records between two progress reports of a restore
_HEADERS, _KEY, _VALUE, _OFFSET = (attrgetter(name)
                                   for name in ("headers", "key", "value", "offset"))


class StateCorrupt(LiqmonError):
    """A checkpoint record that cannot be decoded: the start stops rather than forget state."""

    def __init__(self, topic: str, partition: int, offset: int, detail: str) -> None:
        super().__init__(
            f"checkpoint record {topic}/{partition}@{offset} cannot be decoded ({detail}). "
            "Refusing to start with part of the state missing. To discard the checkpoints and "
            "rebuild state from the input topics, start once with --reset-state."
        )
        self.topic, self.partition, self.offset = topic, partition, offset


class StateLost(LiqmonError):
    """A changelog partition holds no checkpoint although one was written to it: the start
    stops rather than take it as a first start, dropping every account of the partition."""

    def __init__(self, topic: str, partition: int, evidence: str) -> None:
        super().__init__(
            f"{topic}/{partition} holds no checkpoint, but {evidence}: its records are gone "
            "(the topic was deleted or re-created, or the cluster rebuilt). Taking it as a "
            "first start would drop every account of the partition and publish wrong events. "
            "To rebuild the state from the input topics (if they still hold their whole "
            "history), start once with --reset-state; otherwise restore the topic first."
        )
        self.topic, self.partition = topic, partition


class ConfigChanged(LiqmonError):
    """A partition's checkpoint was written under another risk config than this instance's."""

    def __init__(self, topic: str, partition: int, checkpointed: str, configured: str) -> None:
        super().__init__(
            f"checkpoint {topic}/{partition} was written under risk config {checkpointed}, but "
            f"this instance runs risk config {configured}. Refusing to restore: one fleet would "
            "evaluate margins two ways. Give every instance the same config, or, to roll out "
            "a deliberate change, start with --accept-config-change (see README)."
        )
        self.checkpointed, self.configured = checkpointed, configured


@dataclass
class RestoredPartition:
    partition: int
    control: Control | None
    snapshots: Snapshots  # every account the partition holds, in columns
    records_read: int = 0
    # accounts the partition holds as tombstones, with the inputs each reflects (`as_of`)
    forgotten: dict[RiskKey, Offsets] = field(default_factory=dict)
    reset_at: int = NO_RESET  # offset of the newest reset marker read (`RESET_AT_HEADER`)
    # control records after it that do not vouch for it: (how many, offset of the last)
    unvouched: tuple[int, int] | None = None
    read_to: int = 0  # the partition's end offset when it was read
    # units whose newest state is not their last record: a stale one was read after it. Kafka's
    # compaction keeps a key's last record, so the restore has them written again (`stale`).
    rewrite: list[RiskKey] = field(default_factory=list)

    def vouched(self) -> RestoredPartition:
        """What a restore takes of it: everything, if a control record vouches for it; else
        no snapshot or tombstone, and the partition is rebuilt from its inputs' start.

        Snapshots no control record vouches for (written before an instance's first
        checkpoint of the partition ended, or after a reset by an instance that had not
        restored after it) are true as of their own inputs, but a rebuild re-applies every
        record from the start, and a record re-applied to a unit rebuilt beside a restored one
        would see that one as it is later: an isolated fill checks the cross account for a
        position in the same symbol."""
        if self.control is not None or not (len(self.snapshots) or self.forgotten):
            return self
        return replace(self, snapshots=Snapshots.from_accounts([]), forgotten={})

    def marks(self, positions: Offsets, prices_topic: str) -> dict[RiskKey, Offsets]:
        """Per account whose snapshot already reflects inputs beyond the read ``positions``:
        those inputs' offsets — the ones it was taken at (beyond the control record's after a
        crash mid-checkpoint) and the ticks its partition's control record had seen. Records
        re-read before them skip the account. Accounts alike share one dict."""
        s = self.snapshots
        ticks_seen = {} if self.control is None else {
            key: offset for key, offset in self.control.offsets.items()
            if key[0] == prices_topic and offset > positions.get(key, 0)}
        # where each as_of entry's input is read from, looked up for all entries at once
        known = {n << 32 | (0 if part is None else part + 1): offset
                 for n, name in enumerate(s.names)
                 for (topic, part), offset in positions.items() if topic == name}
        codes = s.as_of_topic << 32 | (s.as_of_partition.astype(np.int64) + 1)
        read_from = np.zeros(len(codes), np.int64)
        if known:
            table = np.array(sorted(known), np.int64)
            at = np.minimum(np.searchsorted(table, codes), len(table) - 1)
            found = table[at] == codes
            read_from[found] = np.array([known[c] for c in table.tolist()])[at[found]]
        beyond = np.flatnonzero(s.as_of_offset > read_from)
        marks = dict.fromkeys(s.ids, ticks_seen) if ticks_seen else {}
        if len(beyond):
            owner = np.repeat(np.arange(len(s)), s.as_of_count)[beyond]
            for k, account in zip(beyond.tolist(), owner.tolist(), strict=True):
                own = marks.get(s.ids[account])
                if own is None or own is ticks_seen:
                    own = marks[s.ids[account]] = dict(ticks_seen)
                key = (s.names[s.as_of_topic[k]], None if s.as_of_partition[k] < 0
                       else int(s.as_of_partition[k]))
                own[key] = max(own.get(key, 0), int(s.as_of_offset[k]))
        return marks

    def forgotten_marks(self, positions: Offsets) -> dict[RiskKey, Offsets]:
        """Per forgotten account whose tombstone reflects inputs beyond the read
        ``positions``: those inputs' offsets. Re-read, they would be applied to an account
        that no longer exists, and open it again with only part of its history (a
        withdrawal re-applied to nothing leaves it owing the amount)."""
        marks = {}
        for key, as_of in self.forgotten.items():
            beyond = {at: offset for at, offset in as_of.items()
                      if offset > positions.get(at, 0)}
            if beyond:
                marks[key] = beyond
        return marks


@dataclass
class _Latest:
    """What survives of one changelog partition, undecoded: account snapshots in the order
    read (those another of the same key replaces dropped now and then, see `deduplicate`),
    the newest layout record per key and the newest control record.

    Snapshots are packed as they are read: keys (each followed by a newline) and values
    appended to two byte buffers, their lengths, offsets and key hashes to arrays (nothing
    the garbage collector walks). A batch of snapshots alone goes from the fetched bytes
    straight into the buffers (`add_batch`); other batches go through the client's record
    objects (`add`). Held as a million objects until the end, keys and values were then joined
    for the decoder into as much memory again, touched for the first time: on this 2-core VM
    the join of a million values took 0.6 s in a restarting process (0.12 s done twice), and
    the whole decode 1.9 s instead of 0.9."""

    keys: bytearray = field(default_factory=bytearray)
    values: bytearray = field(default_factory=bytearray)
    # per snapshot, in read order (a batch's array each until `columns` joins them): key and
    # value lengths (-1: none, a value's being a tombstone), offset, hash of the key, and
    # `as_of_total` (or UNRANKED, EARLIER_EPOCH)
    key_len: list[np.ndarray] = field(default_factory=list)
    value_len: list[np.ndarray] = field(default_factory=list)
    offsets: list[np.ndarray] = field(default_factory=list)
    hashes: list[np.ndarray] = field(default_factory=list)
    totals: list[np.ndarray] = field(default_factory=list)
    count: int = 0  # snapshots held
    distinct: int = 0  # snapshots left by the last deduplication (each of another key)
    layouts: dict[bytes, tuple[int, bytes | None]] = field(default_factory=dict)
    control: tuple[int, bytes | None] | None = None
    read: int = 0
    reset_at: int = NO_RESET  # offset of the reset marker read last
    unvouched: tuple[int, int] | None = None  # control records not taken: count, last offset
    # per key, the newest tombstone (by `_replaces`) that says its `as_of`: its total, its
    # offset and the header, decoded only if that tombstone is the record kept
    tombstones: dict[bytes, tuple[int, int, bytes]] = field(default_factory=dict)
    # keys of which a record was read after the one kept, and had read less (`_replaces`)
    stale: set[bytes] = field(default_factory=set)

    def add(self, records: list[Record]) -> _Latest:
        """Take in a fetched batch; returns what survives after it (a new one past a reset).
        Runs of account snapshots are taken in at C speed, with no dictionary operation per
        record (at a million keys one costs ~0.3 µs, an eighth of reading the record); the
        other kinds are few."""
        state = self
        headers = list(map(_HEADERS, records))
        if headers.count(_ACCOUNT_HEADERS) == len(records):
            state._snapshots(records)
            return state
        other = list(map(_ACCOUNT_HEADERS.__ne__, headers))
        start = 0
        while (special := _find(other, start)) is not None:
            state._snapshots(records[start:special])
            state = state._other(records[special])
            start = special + 1
        state._snapshots(records[start:])
        return state

    def add_batch(self, batch: RecordBatch) -> _Latest:
        """`add` of a fetched record batch. A batch of account snapshots alone (what a
        checkpoint writes, but for its first and last batch) is parsed and packed with no
        object per record."""
        columns = batch.columns(KIND_HEADER, ACCOUNT)
        if columns is None or not columns.plain.all():
            return self.add(batch.records())
        if len(columns.offset):
            payload = columns.payload
            self._append(_slices(payload, columns.key_start, columns.key_len, True).data,
                         columns.key_len,
                         _slices(payload, columns.value_start, columns.value_len, False).data,
                         columns.value_len, columns.offset,
                         as_of_totals(payload, columns.value_start, columns.value_len))
        return self

    def _snapshots(self, records: list[Record]) -> None:
        if not records:
            return
        keys, values = list(map(_KEY, records)), list(map(_VALUE, records))
        key_bytes = b"\n".join(keys if None not in keys else [k or b"" for k in keys])
        value_bytes = b"".join(values if None not in values else [v or b"" for v in values])
        value_len = _lengths(values)
        totals = as_of_totals(value_bytes, run_starts(np.maximum(value_len, 0)), value_len)
        if None in values:  # tombstones say theirs in a header
            for k, record in enumerate(records):
                if record.value is None:
                    totals[k] = _header_total(record.headers)
                    self._tombstone(record, int(totals[k]))
        self._append(key_bytes + b"\n", _lengths(keys), value_bytes, value_len,
                     np.fromiter(map(_OFFSET, records), np.int64, len(records)), totals)

    def _tombstone(self, record: Record, total: int) -> None:
        as_of = dict(record.headers).get(AS_OF_HEADER)
        if record.key is None or as_of is None:  # written before tombstones said it
            return
        held = self.tombstones.get(record.key)
        if held is None or _replaces(total, held[0]):
            self.tombstones[record.key] = (total, record.offset, as_of)

    def _append(self, keys: bytes | memoryview, key_len: np.ndarray,
                values: bytes | memoryview, value_len: np.ndarray, offsets: np.ndarray,
                totals: np.ndarray) -> None:
        """Take in snapshots: ``keys`` each followed by a newline, ``values`` end to end."""
        self.hashes.append(_key_hashes(np.frombuffer(keys, np.uint8), key_len))
        self.keys += keys
        self.values += values
        self.key_len.append(key_len)
        self.value_len.append(value_len)
        self.offsets.append(offsets)
        self.totals.append(totals)
        self.count += len(offsets)
        self.read += len(offsets)
        if self.count > 2 * max(self.distinct, 250_000):  # memory stays bounded
            self.deduplicate()

    def _other(self, record: Record) -> _Latest:
        kind = dict(record.headers).get(KIND_HEADER, ACCOUNT)
        if kind == RESET:  # layouts stay: they only name, by their digest (see the docstring)
            return _Latest(read=self.read + 1, reset_at=record.offset, layouts=self.layouts)
        if kind == EPOCH:  # an input log was replaced: offsets from here on start again
            self.deduplicate()
            self.totals = [np.full(self.count, EARLIER_EPOCH, np.int64)]
            self.tombstones.clear()  # their offsets are of the log replaced
        elif kind == CONTROL:
            if _vouches_after(record.headers, self.reset_at):
                self.control = (record.offset, record.value)
            else:
                count = 0 if self.unvouched is None else self.unvouched[0]
                self.unvouched = (count + 1, record.offset)
        elif kind == LAYOUT:
            self.layouts[record.key] = (record.offset, record.value)
        else:
            self._snapshots([record])
            return self
        self.read += 1
        return self

    def columns(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(key lengths, value lengths, offsets, key hashes) of the snapshots held (their
        totals then in ``totals[0]``)."""
        if len(self.key_len) != 1:
            for name in ("key_len", "value_len", "offsets", "hashes", "totals"):
                parts = getattr(self, name)
                setattr(self, name, [np.concatenate(parts) if parts else np.empty(0, np.int64)])
        return self.key_len[0], self.value_len[0], self.offsets[0], self.hashes[0]

    def key(self, k: int, key_start: np.ndarray) -> bytes | None:
        """Snapshot k's key (``key_start``: `key_starts()`)."""
        length = int(self.key_len[0][k])
        if length < 0:
            return None
        return bytes(self.keys[key_start[k]:key_start[k] + length])

    def key_starts(self) -> np.ndarray:
        return run_starts(np.maximum(self.columns()[0], 0) + 1)

    def value_starts(self) -> np.ndarray:
        return run_starts(np.maximum(self.columns()[1], 0))

    def deduplicate(self) -> None:
        """Keep one snapshot of each key (and none without a key), in read order: the newest
        state (`_replaces`), which is the last read unless a later one has read less (its key
        then noted in ``stale``).

        Keys are grouped by their hash (`_key_hashes`) in numpy; records that share a hash
        are then compared, so two keys that merely collide both stay."""
        if self.count == self.distinct:
            return
        key_len, _, _, hashes = self.columns()
        totals = self.totals[0]
        ordered = np.sort(hashes)
        drop = key_len < 0
        if (ordered[1:] == ordered[:-1]).any():  # a key read twice (or a collision)
            order = np.argsort(hashes, kind="stable")  # by hash, then as read
            group_ends = np.flatnonzero(np.append(ordered[1:] != ordered[:-1], True)) + 1
            kept = _kept_of_groups(order, group_ends, totals)
            superseded = np.flatnonzero(kept != np.arange(len(kept)))
            starts = self.key_starts()
            if _same_keys(np.frombuffer(self.keys, np.uint8), starts, key_len,
                          superseded, kept[superseded]):
                last = order[group_ends - 1]  # each group's last record read
                read_twice = np.diff(group_ends, prepend=0) > 1
                stale = kept[last[kept[last] != last]].tolist()  # a group's last not kept
                renewed = last[(kept[last] == last) & read_twice].tolist()
            else:
                superseded, stale, renewed = _superseded_exactly(
                    [self.key(k, starts) for k in range(len(hashes))], totals.tolist())
            drop[superseded] = True
            if self.stale:  # a key noted before whose newest state is now its last record
                self.stale.difference_update(self.key(k, starts) for k in renewed)
            self.stale.update(key for k in stale if (key := self.key(k, starts)) is not None)
        if drop.any():
            self._keep(np.flatnonzero(~drop))
        self.count = self.distinct = len(self.key_len[0])

    def _keep(self, kept: np.ndarray) -> None:
        """Hold only these snapshots (indexes, ascending), their bytes copied run by run (an
        index per byte would take eight times the buffers' memory)."""
        key_len, value_len, offsets, hashes = self.columns()
        totals = self.totals[0]
        keys = _slices(np.frombuffer(self.keys, np.uint8), self.key_starts()[kept],
                       key_len[kept], True)
        values = _slices(np.frombuffer(self.values, np.uint8), self.value_starts()[kept],
                         value_len[kept], False)
        self.keys, self.values = bytearray(keys.data), bytearray(values.data)
        self.key_len, self.value_len = [key_len[kept]], [value_len[kept]]
        self.offsets, self.hashes = [offsets[kept]], [hashes[kept]]
        self.totals = [totals[kept]]


@_jit
def _replaces(total, kept_total):
    """Whether a snapshot (or tombstone) read after the one kept of its key replaces it: unless
    both say how far their state has read (`as_of_total`) and the later one has read less.
    That one is stale: written by an instance frozen past its session timeout, whose Kafka
    client sent it on waking, after the snapshots of the instance that took over."""
    return total < 0 or kept_total < 0 or total >= kept_total


@_jit
def _kept_of_groups(order, group_ends, totals):
    """Per snapshot, the one its group keeps (by `_replaces`, in read order): ``order`` lists
    the snapshots group by group, each in read order, group g ending before group_ends[g]."""
    kept = np.empty(order.shape[0], np.int64)
    start = 0
    for end in group_ends:
        winner = order[start]
        for j in range(start + 1, end):
            if _replaces(totals[order[j]], totals[winner]):
                winner = order[j]
        for j in range(start, end):
            kept[order[j]] = winner
        start = end
    return kept


@_jit
def _same_keys(keys, key_start, key_len, a, b):
    """Whether snapshots a[k] and b[k] hold the same key, byte for byte, for every k (a key
    length of -1: no key; equal only to none)."""
    for k in range(a.shape[0]):
        x, y = a[k], b[k]
        length = key_len[x]
        if key_len[y] != length:
            return False
        first, second = key_start[x], key_start[y]
        for j in range(max(length, 0)):
            if keys[first + j] != keys[second + j]:
                return False
    return True


@_jit
def _slices(payload, start, length, newline):
    """``payload[start[k]:start[k] + length[k]]`` for every k (length -1: none), end to end,
    each followed by a newline if ``newline``."""
    extra = 1 if newline else 0
    total = 0
    for k in range(length.shape[0]):
        total += max(length[k], 0) + extra
    out = np.empty(total, np.uint8)
    at = 0
    for k in range(length.shape[0]):
        first = start[k]
        for j in range(max(length[k], 0)):
            out[at] = payload[first + j]
            at += 1
        if newline:
            out[at] = 10
            at += 1
    return out


@_jit
def _key_hashes(keys, key_len):
    """FNV-1a of each key of ``keys`` (keys end to end, each followed by one separator byte;
    length -1: none, hashed as an empty key). Deduplication only groups by it: keys that
    share a hash are compared before one is dropped."""
    out = np.empty(key_len.shape[0], np.int64)
    at = 0
    for k in range(key_len.shape[0]):
        h = np.uint64(14695981039346656037)
        n = max(key_len[k], 0)
        for j in range(at, at + n):
            h = (h ^ np.uint64(keys[j])) * np.uint64(1099511628211)
        out[k] = np.int64(h)
        at += n + 1
    return out


def warm_up() -> None:
    """Compile (or load from numba's cache) the restore's kernels, so that the first restore
    does not pay for it; under the compile lock, as `monitor.book.warm_up`."""
    builder = DefaultRecordBatchBuilder(magic=2, compression_type=0, is_transactional=0,
                                        producer_id=-1, producer_epoch=-1, base_sequence=-1,
                                        batch_size=1 << 16)
    for offset in range(2):  # one key twice: deduplication's kernels too
        builder.append(offset, timestamp=0, key=b"k", value=b"v",
                       headers=[(KIND_HEADER, ACCOUNT)])
    with compiling():
        (batch,) = whole_batches(bytes(builder.build()))
        _Latest().add_batch(batch).deduplicate()


def _lengths(items: list[bytes | None]) -> np.ndarray:
    """len() of each, -1 for None."""
    if None not in items:
        return np.fromiter(map(len, cast(list[bytes], items)), np.int64, len(items))
    return np.array([-1 if item is None else len(item) for item in items], np.int64)


def _superseded_exactly(keys: list[bytes | None], totals: list[int]
                        ) -> tuple[np.ndarray, list[int], list[int]]:
    """Indexes of the snapshots not kept of their key; of those kept though a later one was
    read; and of those kept, read last of a key read more than once (the dictionary way, for
    the batch in which two keys share a hash)."""
    kept: dict[bytes | None, int] = {}
    first: dict[bytes | None, int] = {}
    last: dict[bytes | None, int] = {}
    superseded = []
    for k, key in enumerate(keys):
        if key not in kept:
            kept[key] = first[key] = k
        elif _replaces(totals[k], totals[kept[key]]):
            superseded.append(kept[key])
            kept[key] = k
        else:
            superseded.append(k)
        last[key] = k
    stale = sorted(k for key, k in kept.items() if last[key] != k)
    renewed = sorted(k for key, k in kept.items() if last[key] == k and first[key] != k)
    return np.array(superseded, np.int64), stale, renewed


def _header_total(headers: Sequence[tuple[str, bytes]]) -> int:
    """The `as_of_total` a tombstone's headers carry, or UNRANKED (written before they did)."""
    for name, value in headers:
        if name == AS_OF_TOTAL_HEADER:
            try:
                return int(value)
            except ValueError:
                return UNRANKED
    return UNRANKED


def _vouches_after(headers: Sequence[tuple[str, bytes]], reset_at: int) -> bool:
    """Whether a control record vouches for the partition as restored after the reset marker
    at ``reset_at``: its writer restored the partition after that marker (or, header missing,
    it was written before control records said so)."""
    for name, value in headers:
        if name == RESET_AT_HEADER:
            try:
                return int(value) == reset_at
            except ValueError:
                return False
    return True


def _find(flags: list[bool], start: int) -> int | None:
    """The first index from ``start`` whose flag is set."""
    try:
        return flags.index(True, start)
    except ValueError:
        return None


@dataclass(slots=True)
class RestoreProgress:
    """How far a restore has got, for /readyz and the log."""

    records: int = 0  # changelog records read
    expected: int = 0  # records between the partitions' first and end offsets (compaction
    #                    leaves gaps, so at most this many)
    accounts: int = 0  # accounts and isolated positions read so far (snapshots read since the
    #                   last deduplication counted as units of their own: at most this many)


# Net container allocations between young garbage collections (Python's default: 700). At 700
# the records a fetch buffers outlive a hundred young collections, reach the oldest generation
# and, while a backlog drains, bring a full pass (20-40 ms, nothing found) every half second.
# The loop makes almost no cyclic garbage (~2,000 objects in a 37 s run, start-up included), so
# waiting longer finds the same and walks far less.
YOUNG_COLLECTION_AFTER = 50_000


class Collector:
    """Python's cyclic garbage collector, paused while a restore reads or a checkpoint is
    written. Every object they allocate (a record the client builds, a message and its future)
    counts towards a collection, and each full collection walks every object alive: a third of
    the time a million records take to read, and full passes of 10-50 ms, collecting nothing,
    brought into the window of a checkpoint of 100,000 accounts. What they allocate is freed by
    reference counting, without it. Pauses nest (partitions restored at once)."""

    def __init__(self) -> None:
        self.pauses = 0
        self.was_enabled = True

    def pause(self) -> None:
        if self.pauses == 0:
            self.was_enabled = gc.isenabled()
            gc.disable()
        self.pauses += 1

    def resume(self) -> None:
        self.pauses -= 1
        if self.pauses == 0 and self.was_enabled:
            gc.enable()

    @staticmethod
    def settle() -> None:
        """How `liqmon run` sets the collector once started: what exists then (~100,000
        objects of numba, aiokafka and the rest, alive for good) is left out of every later
        full collection, each of which would otherwise walk it all (a ~20 ms pause of the loop,
        and the records waiting on it), and young collections come every
        `YOUNG_COLLECTION_AFTER` allocations."""
        gc.collect()
        gc.freeze()
        gc.set_threshold(YOUNG_COLLECTION_AFTER)


collector = Collector()


async def read_changelog(bootstrap: str, topic: str, partitions: Iterable[int],
                         client_id: str = "liqmon-restore",
                         request_timeout_ms: int = 30_000,
                         progress: Callable[[RestoreProgress], None] | None = None,
                         security: KafkaSecurity = PLAINTEXT,
                         ) -> dict[int, RestoredPartition]:
    """Read changelog partitions to their end and decode what survives of them; call
    ``progress`` every PROGRESS_EVERY records read and once at the end."""
    wanted = [TopicPartition(topic, p) for p in partitions]
    if not wanted:
        return {}
    latest = {tp.partition: _Latest() for tp in wanted}
    status = RestoreProgress()
    reported = 0

    def take(tp: TopicPartition, batch: RecordBatch) -> None:
        nonlocal reported
        before = latest[tp.partition].read
        latest[tp.partition] = latest[tp.partition].add_batch(batch)
        status.records += latest[tp.partition].read - before
        if progress is not None and status.records - reported >= PROGRESS_EVERY:
            reported = status.records
            status.accounts = sum(state.count for state in latest.values())
            progress(status)

    async with reading_client(bootstrap, client_id, request_timeout_ms, security) as client:
        collector.pause()
        try:
            # Read up to the end as of now (what this instance's predecessors wrote)
            ranges = await bounds(client, wanted, request_timeout_ms / 1000)
            status.expected = sum(end - start for start, end in ranges.values())
            await read_range(client, ranges, take, request_timeout_ms / 1000)
        finally:
            collector.resume()
    for state in latest.values():
        state.deduplicate()
    if progress is not None:
        status.records = sum(state.read for state in latest.values())
        status.accounts = sum(state.count for state in latest.values())
        progress(status)
    return {p: replace(_decode(topic, p, state), read_to=ranges[TopicPartition(topic, p)][1])
            for p, state in latest.items()}


@dataclass(frozen=True, slots=True)
class Stretch:
    """What a running owner must know of a stretch of its changelog partition: the offset of
    the last reset marker in it (NO_RESET: none), and the (offset, key) of the account and
    isolated-position records after it."""

    reset_at: int
    units: list[tuple[int, bytes]]


async def read_stretches(bootstrap: str, topic: str, ranges: dict[int, tuple[int, int]],
                         *, client_id: str, request_timeout_ms: int,
                         security: KafkaSecurity) -> dict[int, Stretch]:
    """Each changelog partition's offset range [start, end), read as a `Stretch`. On a client
    of its own: asked only when records another instance wrote may be among them
    (`Checkpointer`)."""
    read = await records_between(
        bootstrap, {TopicPartition(topic, p): bounds_of for p, bounds_of in ranges.items()},
        client_id=client_id, request_timeout_ms=request_timeout_ms, security=security)
    found = {}
    for tp, records in read.items():
        kinds = [dict(record.headers).get(KIND_HEADER, ACCOUNT) for record in records]
        resets = [k for k, kind in enumerate(kinds) if kind == RESET]
        after = resets[-1] + 1 if resets else 0
        found[tp.partition] = Stretch(
            records[resets[-1]].offset if resets else NO_RESET,
            [(record.offset, record.key)
             for record, kind in zip(records[after:], kinds[after:], strict=True)
             if kind == ACCOUNT and record.key is not None])
    return found


def _decode(topic: str, partition: int, latest: _Latest) -> RestoredPartition:
    control = None
    if latest.control is not None:
        offset, raw = latest.control
        try:
            control = decode_control(raw)
        except SnapshotError as exc:
            raise StateCorrupt(topic, partition, offset, str(exc)) from None
    layouts = {}
    for offset, raw in latest.layouts.values():
        try:
            layout = decode_layout(raw)
        except SnapshotError as exc:
            raise StateCorrupt(topic, partition, offset, str(exc)) from None
        layouts[layout.id] = layout
    _, value_len, offsets, _ = latest.columns()
    live = np.flatnonzero(value_len >= 0)  # tombstones: forgotten accounts
    key_start = latest.key_starts()
    try:
        ids = _risk_keys(latest, live, key_start)
    except UnicodeDecodeError:
        bad = next(k for k in live.tolist() if not _is_utf8(latest.key(k, key_start)))
        raise StateCorrupt(topic, partition, int(offsets[bad]),
                           "the account id is not UTF-8") from None
    try:
        snapshots = decode_packed(latest.values, latest.value_starts()[live], value_len[live],
                                  ids, layouts)
    except SnapshotError as exc:
        assert exc.index is not None
        raise StateCorrupt(topic, partition, int(offsets[live[exc.index]]), str(exc)) from None
    # Only this partition's checkpoints write here: a snapshot of another account partition
    # (a foreign writer, a copy) would replace the account its owner restores.
    elsewhere = np.flatnonzero((snapshots.partition >= 0) & (snapshots.partition != partition))
    if len(elsewhere):
        k = int(elsewhere[0])
        key = snapshots.ids[k]
        raise StateCorrupt(topic, partition, int(offsets[live[ids.index(key)]]),
                           f"the snapshot of {key!r} is of account partition "
                           f"{int(snapshots.partition[k])}, which checkpoints elsewhere")
    return RestoredPartition(partition=partition, control=control, snapshots=snapshots,
                             records_read=latest.read,
                             forgotten=_forgotten(topic, partition, latest, key_start),
                             reset_at=latest.reset_at, unvouched=latest.unvouched,
                             rewrite=[risk_key(key) for key in sorted(latest.stale)])


def _forgotten(topic: str, partition: int, latest: _Latest, key_start: np.ndarray
               ) -> dict[RiskKey, Offsets]:
    """The kept tombstones' `as_of`, by account (those written before tombstones said it:
    none)."""
    _, value_len, offsets, _ = latest.columns()
    forgotten = {}
    for k in np.flatnonzero(value_len < 0).tolist():
        key = latest.key(k, key_start)
        if key is None:
            continue
        said = latest.tombstones.get(key)
        if said is None or said[1] != int(offsets[k]):
            continue
        try:
            forgotten[risk_key(key)] = decode_as_of(said[2])
        except SnapshotError as exc:
            raise StateCorrupt(topic, partition, said[1], str(exc)) from None
    return forgotten


def _risk_keys(latest: _Latest, live: np.ndarray, key_start: np.ndarray) -> list[RiskKey]:
    """The keys of the snapshots at ``live`` as account ids (one decode of every key held,
    unless one holds the separator or one not live is not UTF-8) and, where a key is an
    isolated position's (`state_key`), its UnitKey."""
    key_len = latest.columns()[0]
    try:
        names = latest.keys.decode().split("\n")
    except UnicodeDecodeError:
        names = []
    if len(names) == len(key_start) + 1:
        names = names[:-1] if len(live) == len(key_start) else [names[k] for k in live.tolist()]
    else:  # raises UnicodeDecodeError if a live key is not UTF-8
        names = [latest.keys[key_start[k]:key_start[k] + key_len[k]].decode()
                 for k in live.tolist()]
    if ISOLATED_KEY_PREFIX not in latest.keys:
        return list(names)
    prefix = ISOLATED_KEY_PREFIX.decode()
    return [risk_key(name.encode()) if name.startswith(prefix) else name for name in names]


def _is_utf8(key: bytes | None) -> bool:
    try:
        (key or b"").decode()
    except UnicodeDecodeError:
        return False
    return True


def epoch_message(partition: int, topics: Topics, why: dict[str, object]) -> Outgoing:
    """The marker written before the first snapshot stamped with an input's new offsets, once
    its log was replaced: a restore then ranks everything after it above everything before
    it (``why``: what was replaced, for whoever reads the changelog)."""
    return Outgoing(topic=topics.state, key=EPOCH_PREFIX + uuid.uuid4().hex.encode(),
                    value=orjson.dumps(why), headers=[(KIND_HEADER, EPOCH)],
                    partition=partition)


async def write_reset_markers(producer: AIOKafkaProducer, topic: str,
                              partitions: Iterable[int]) -> None:
    """Make every later restore ignore what the partitions hold so far (--reset-state)."""
    stamp = str(int(time.time() * 1000)).encode()
    futures = [await producer.send(topic, stamp, key=RESET_KEY, partition=p,
                                   headers=[(KIND_HEADER, RESET)]) for p in partitions]
    await asyncio.gather(*futures)


def snapshot_messages(engine: Engine | ReferenceEngine, dirty: DirtyUnits, seq: int,
                      as_of: dict[int, Offsets], topics: Topics,
                      layouts_written: set[tuple[int, int]]) -> tuple[list[Outgoing],
                                                                     list[Outgoing]]:
    """Snapshots (or tombstones of deleted ones, their `as_of_total` in a header) of the
    accounts and isolated positions in ``dirty``, each to its partition, stamped with the
    input offsets ``as_of`` its partition's state reflects, encoded from the book's columns;
    and before them, to be acknowledged first, the layout record of each partition not yet
    in ``layouts_written`` ((partition, layout id) pairs of this checkpoint, updated)."""
    keys, partitions = dirty.keys, dirty.partitions.tolist()
    snapshots = engine.snapshots(keys, dirty.rows)  # those still held, in the keys' order
    held = snapshots.ids  # the rest get tombstones
    values_of: list[bytes | None] = [None] * len(keys)
    at: list[int] = []  # where each held one is in keys
    for k, key in enumerate(keys):
        if len(at) < len(held) and held[len(at)] == key:
            at.append(k)
    snapshots = snapshots.stamped(seq, [as_of[partitions[k]] for k in at])
    layout, values = encode_snapshots(snapshots)
    for k, encoded in zip(at, values, strict=True):
        values_of[k] = encoded
    unwritten = [partition for partition in sorted({partitions[k] for k in at})
                 if (partition, layout.id) not in layouts_written]
    layouts = [layout_message(partition, layout, topics) for partition in unwritten]
    layouts_written.update((partition, layout.id) for partition in unwritten)
    header = [(KIND_HEADER, ACCOUNT)]
    messages = []
    state = topics.state
    for key, partition, value in zip(keys, partitions, values_of, strict=True):
        headers = header if value is not None else [
            *header, (AS_OF_TOTAL_HEADER, str(as_of_total(as_of[partition])).encode()),
            (AS_OF_HEADER, encode_as_of(as_of[partition]))]
        # positional, and an account id encoded here: half the cost, ~100,000 per checkpoint
        messages.append(Outgoing(state, key.encode() if type(key) is str else state_key(key),
                                 value, headers, partition=partition))
    return layouts, messages


def layout_message(partition: int, layout: Layout, topics: Topics) -> Outgoing:
    return Outgoing(topic=topics.state, key=layout.key, value=layout.encoded,
                    headers=[(KIND_HEADER, LAYOUT)], partition=partition)


def controls_now(engine: Engine | ReferenceEngine, seq: int, as_of: dict[int, Offsets],
                 topics: Topics, written_at_ms: int, config: str) -> dict[int, Control]:
    """The control record of each checkpointed partition — offsets, price table, duplicate
    windows, and ``config``, the fingerprint of the risk config — as they are now (copies:
    cheap to take, encoded later)."""
    prices = engine.price_table()
    return {partition: Control(
        seq=seq, written_at=written_at_ms, offsets=offsets, prices=prices, config=config,
        dedupe={(topic, partition): engine.dedupe_ids(topic, partition)
                for topic in (topics.fills, topics.ledger)})
        for partition, offsets in as_of.items()}


def control_message(partition: int, control: Control, topics: Topics, reset_at: int,
                    limit: int) -> tuple[Outgoing, int]:
    """A control record, to write after the snapshots have been acknowledged: a control
    record vouches for what precedes it, back to the reset marker at ``reset_at`` (the one
    the partition was restored after; NO_RESET: none). With how many duplicate-window ids it
    left out to stay within ``limit`` bytes (`encoded_within`; `topics.control_record_limit`
    says how many the changelog takes)."""
    value, dropped = encoded_within(control, limit)
    return Outgoing(topic=topics.state, key=CONTROL_KEY, value=value,
                    headers=[(KIND_HEADER, CONTROL), (RESET_AT_HEADER, str(reset_at).encode())],
                    partition=partition), dropped


def encoded_within(control: Control, limit: int) -> tuple[bytes, int]:
    """The control record encoded in at most ``limit`` bytes, and how many ids of its
    duplicate windows it left out for that: the oldest of each window, in the same share.
    The windows hold 10,000 ids each and ids may be 256 characters long, so a partition's two
    windows can encode to several MB (~0.2 MB with short ids). Only a restart from the record
    has the shorter windows; the running instance keeps its own."""
    value = encode_control(control)
    kept = {key: len(ids) for key, ids in control.dedupe.items()}
    while len(value) > limit and any(kept.values()):
        share = 0.9 * limit / len(value)  # encoded size is close to proportional to the ids
        kept = {key: int(count * share) for key, count in kept.items()}
        value = encode_control(replace(control, dedupe={
            key: ids[len(ids) - kept[key]:] for key, ids in control.dedupe.items()}))
    return value, sum(len(ids) for ids in control.dedupe.values()) - sum(kept.values())


async def read_book(bootstrap: str, topic: str, config: RiskConfig,
                    security: KafkaSecurity = PLAINTEXT) -> Engine:
    """The fleet's book as its checkpoints hold it, for read-only what-ifs (`liqmon stress`):
    every account of every changelog partition, read without joining a consumer group.

    Prices: per symbol, the newest (by tick ts) entry of any partition's control record. An
    engine keeps per symbol the tick with the latest ts (older ones are stale), so this is the
    table an engine that had applied every partition's ticks would hold — the latest known
    market, which is where a what-if starts. (A restore takes the control furthest *behind*
    only so that it re-reads the ticks its accounts have not seen; a report re-reads nothing.)
    """
    # A metadata request that cannot create it: a broker that auto-creates topics would
    # give a missing one its own layout, which the fleet then refuses to start on.
    async with reading_client(bootstrap, "liqmon-stress", 30_000, security) as client:
        counts = await topic_partitions(client, [topic])
    if topic not in counts:
        raise TopicsNotFound([topic], "--topic-state")
    count = counts[topic]
    if count is None:
        raise StateTopicUnavailable(topic)
    restored = await read_changelog(bootstrap, topic, list(range(count)),
                                    client_id="liqmon-stress", security=security)
    if all(part.control is None for part in restored.values()):
        raise NoCheckpoint(topic)  # an empty book would read as "no risk": say why instead
    engine = Engine(config)
    prices: dict[str, tuple[float, int]] = {}
    for part in restored.values():
        if part.control is None:
            continue
        for symbol, (price, ts) in part.control.prices.items():
            if symbol not in prices or ts > prices[symbol][1]:
                prices[symbol] = (price, ts)
    engine.load_prices(prices)
    for part in restored.values():
        try:
            engine.load_accounts(part.snapshots)
        except NotInConfig as exc:
            raise UnknownToConfig(topic, exc.key, exc.names) from None
    return engine


class StateTopicUnavailable(LiqmonError):
    def __init__(self, topic: str) -> None:
        super().__init__(f"state topic {topic!r} lists no partitions (a leader being "
                         "elected?): try again")


class NoCheckpoint(LiqmonError):
    def __init__(self, topic: str) -> None:
        super().__init__(f"state topic {topic!r} holds no checkpoint: is --topic-state "
                         "right, has the fleet checkpointed yet?")


class UnknownToConfig(LiqmonError):
    """A checkpointed account holds an asset or instrument the given risk config lacks."""

    def __init__(self, topic: str, key: RiskKey, names: list[str]) -> None:
        held = (f"isolated position {key.label()!r}" if isinstance(key, UnitKey)
                else f"account {key!r}")
        super().__init__(f"{held} in {topic!r} holds {', '.join(names)}, which the risk "
                         "config does not define: give the fleet's config (--config)")
