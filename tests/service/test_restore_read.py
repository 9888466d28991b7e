"""What a restore keeps of the changelog records it reads (SPEC §6): the newest snapshot of
every account (the last read, unless it has read less of the inputs than one read before
it), the newest layout and control record, nothing from before a reset marker.

The records are the Kafka client's own record objects, parsed from record batches as a fetch
returns them (monitor.service.log_reader); the reading itself, against the broker, is in
tests/service/test_durability.py.
"""

from __future__ import annotations

import gc
import struct
from typing import Any

import numpy as np
import pytest
from aiokafka.errors import CorruptRecordException
from aiokafka.record.default_records import DefaultRecordBatchBuilder
from aiokafka.record.memory_records import MemoryRecords
from aiokafka.record.util import calc_crc32c
from hypothesis import given, settings
from hypothesis import strategies as st

from monitor.account import Account, UnitKey
from monitor.service import changelog
from monitor.service.changelog import (
    ACCOUNT,
    AS_OF_HEADER,
    AS_OF_TOTAL_HEADER,
    CONTROL,
    EPOCH,
    LAYOUT,
    NO_RESET,
    RESET,
    RESET_AT_HEADER,
    StateCorrupt,
    _Latest,
)
from monitor.service.log_reader import RecordBatch, whole_batches
from monitor.snapshot import KIND_HEADER, encode_account, encode_as_of, state_key

_offsets = iter(range(1_000_000))


def record(key: bytes | None, value: bytes | None, kind: bytes | None = ACCOUNT,
           extra: tuple[tuple[str, bytes], ...] = ()) -> Any:
    """A one-record batch at the next offset, parsed as a fetch's bytes are."""
    builder = DefaultRecordBatchBuilder(magic=2, compression_type=0, is_transactional=0,
                                        producer_id=-1, producer_epoch=-1, base_sequence=-1,
                                        batch_size=1 << 20)
    builder.append(0, timestamp=0, key=key, value=value,
                   headers=([] if kind is None else [(KIND_HEADER, kind)]) + list(extra))
    raw = bytearray(builder.build())
    struct.pack_into(">q", raw, 0, next(_offsets))  # the base offset, set by the broker
    (parsed,) = MemoryRecords(bytes(raw)).next_batch()
    return parsed


def kept(latest: _Latest) -> dict[bytes | None, bytes | None]:
    """The snapshots held after deduplication, key to value (None: a tombstone), in order."""
    latest.deduplicate()
    _, value_len, _, _ = latest.columns()
    key_start, value_start = latest.key_starts(), latest.value_starts()
    keys = [latest.key(k, key_start) for k in range(len(value_len))]
    values = [None if value_len[k] < 0 else
              bytes(latest.values[value_start[k]:value_start[k] + value_len[k]])
              for k in range(len(value_len))]
    assert len(set(keys)) == len(keys)
    return dict(zip(keys, values, strict=True))


def test_the_newest_snapshot_of_each_account_is_kept_in_the_order_read() -> None:
    latest = _Latest().add([record(b"a", b"1"), record(b"b", b"1"), record(b"a", b"2")])
    latest = latest.add([record(b"c", b"1"), record(b"b", None)])  # b forgotten: tombstone
    assert list(kept(latest).items()) == [(b"a", b"2"), (b"c", b"1"), (b"b", None)]
    assert latest.read == 5


def test_control_and_layout_records_among_snapshots_are_told_apart() -> None:
    latest = _Latest().add([record(b"a", b"1"), record(b"\x00layout", b"L1", LAYOUT),
                            record(b"b", b"1"), record(b"\x00control", b"C1", CONTROL),
                            record(b"\x00control", b"C2", CONTROL), record(b"c", b"1", None)])
    assert kept(latest) == {b"a": b"1", b"b": b"1", b"c": b"1"}  # no header: a snapshot
    assert latest.control is not None and latest.control[1] == b"C2"
    assert [value for _, value in latest.layouts.values()] == [b"L1"]
    assert latest.read == 6


def test_a_reset_marker_forgets_everything_before_it_in_the_same_batch() -> None:
    latest = _Latest().add([record(b"a", b"1"), record(b"\x00control", b"C1", CONTROL),
                            record(b"\x00reset", b"now", RESET), record(b"b", b"1")])
    assert kept(latest) == {b"b": b"1"}
    assert (latest.control, latest.read) == (None, 4)


def test_a_snapshot_after_a_reset_reads_with_a_layout_written_before_it() -> None:
    """An instance checkpointing while another starts with --reset-state: its layout goes
    before the marker, the rest of its snapshots after it (a chaos drill's restart stopped
    on one, 'refers to layout …, which the changelog partition does not hold')."""
    latest = _Latest().add([record(LAYOUT_RECORD.key, LAYOUT_RECORD.encoded, LAYOUT),
                            record(b"\x00reset", b"now", RESET), record(b"late", SNAPSHOT)])
    latest.deduplicate()
    assert list(changelog._decode("state", 0, latest).snapshots.ids) == ["late"]


def control(value: bytes, reset_at: int | None) -> Any:
    """A control record naming the reset marker its writer restored after (None: one
    written before control records named it)."""
    said = () if reset_at is None else ((RESET_AT_HEADER, str(reset_at).encode()),)
    return record(b"\x00control", value, CONTROL, said)


def test_a_control_record_naming_the_reset_marker_read_last_is_taken() -> None:
    marker = record(b"\x00reset", b"now", RESET)
    latest = _Latest().add([record(b"a", b"1"), marker, record(b"b", b"1"),
                            control(b"C1", marker.offset)])
    assert latest.control is not None and latest.control[1] == b"C1"
    assert (latest.reset_at, latest.unvouched) == (marker.offset, None)


def test_a_control_record_of_a_writer_restored_before_the_last_reset_vouches_for_nothing(
) -> None:
    """Instance A restored after its own reset marker; B's reset came later. A's checkpoints
    since hold only the accounts it changed: its control record is not taken."""
    first = record(b"\x00reset", b"A", RESET)
    latest = _Latest().add([first, record(b"a", b"1"), control(b"C1", first.offset)])
    second = record(b"\x00reset", b"B", RESET)
    stale = control(b"C2", first.offset)
    latest = latest.add([second, record(b"b", b"2"), stale])
    assert latest.control is None
    assert latest.unvouched == (1, stale.offset)
    assert kept(latest) == {b"b": b"2"}  # its snapshots are still true, as of their inputs


def test_a_control_record_vouching_for_the_reset_stays_taken_after_one_that_does_not(
) -> None:
    marker = record(b"\x00reset", b"B", RESET)
    vouching = control(b"C1", marker.offset)
    latest = _Latest().add([marker, record(b"a", b"1"), vouching, control(b"C2", NO_RESET),
                            control(b"C3", marker.offset - 1)])
    assert latest.control == (vouching.offset, b"C1")
    assert latest.unvouched is not None and latest.unvouched[0] == 2


def test_with_no_reset_marker_read_only_a_control_record_naming_none_is_taken(
) -> None:
    latest = _Latest().add([record(b"a", b"1"), control(b"C1", NO_RESET)])
    assert latest.control is not None and latest.control[1] == b"C1"
    assert _Latest().add([record(b"a", b"1"), control(b"C2", 7)]).control is None


def test_a_control_record_written_before_they_named_their_reset_marker_is_taken() -> None:
    latest = _Latest().add([record(b"\x00reset", b"now", RESET), record(b"a", b"1"),
                            control(b"C1", None)])
    assert latest.control is not None and latest.control[1] == b"C1"


def test_a_snapshot_without_a_key_is_dropped() -> None:
    assert kept(_Latest().add([record(None, b"1"), record(b"a", b"1")])) == {b"a": b"1"}


def test_keys_that_share_a_hash_are_still_told_apart(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(changelog, "_key_hashes",  # every key collides
                        lambda keys, key_len: np.full(len(key_len), 7, np.int64))
    latest = _Latest().add([record(b"a", b"1"), record(b"b", b"1"), record(b"a", b"2"),
                            record(b"c", b"1")])
    assert list(kept(latest).items()) == [(b"b", b"1"), (b"a", b"2"), (b"c", b"1")]


def test_keys_that_share_a_hash_and_a_length_are_compared_to_the_last_byte(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(changelog, "_key_hashes",
                        lambda keys, key_len: np.full(len(key_len), 7, np.int64))
    latest = _Latest().add([record(b"acct-1", b"1"), record(b"acct-2", b"1")])
    assert list(kept(latest).items()) == [(b"acct-1", b"1"), (b"acct-2", b"1")]


def test_memory_stays_bounded_by_deduplicating_as_it_reads() -> None:
    # 600,000 snapshots of 1,000 accounts: duplicates are dropped while reading, not at the end
    latest = _Latest()
    for batch in range(12):
        latest = latest.add([record(f"a{n % 1_000}".encode(), b"%d" % batch)
                             for n in range(50_000)])
        assert latest.count <= 500_000
    assert kept(latest) == {f"a{n}".encode(): b"11" for n in range(1_000)}


LAYOUT_RECORD, SNAPSHOT = encode_account(Account(balances={"USDT": 10.0}, partition=0), 1,
                                         {("fills", 0): 3})


def stamped(usdt: float, fills: int, ledger: int, prices: int) -> bytes:
    """A snapshot holding ``usdt`` whose state has read fills/0, ledger/0 and prices up to
    these (next) offsets: its as_of total is their sum."""
    return encode_account(Account(balances={"USDT": usdt}, partition=0), 1,
                          {("fills", 0): fills, ("ledger", 0): ledger, ("prices", None): prices}
                          )[1]


def tombstone(key: bytes, total: int, as_of: bytes | None = None) -> Any:
    """A tombstone saying how far its state had read (and, given ``as_of``, exactly what)."""
    said = [] if as_of is None else [(AS_OF_HEADER, as_of)]
    return record(key, None, ACCOUNT, [(AS_OF_TOTAL_HEADER, str(total).encode()), *said])


FORGOTTEN_AT = {("fills", 0): 20, ("ledger", 0): 15, ("prices", None): 10}


def forgotten(latest: _Latest) -> dict:
    """What the restore of ``latest`` holds as forgotten: account → the inputs reflected."""
    latest.deduplicate()
    return changelog._forgotten("liqmon.state", 0, latest, latest.key_starts())


def test_the_tombstone_kept_says_which_inputs_its_forgotten_account_reflects() -> None:
    latest = _Latest().add([record(b"a", stamped(9.0, 10, 10, 10)),
                            tombstone(b"a", 45, encode_as_of(FORGOTTEN_AT))])
    assert forgotten(latest) == {"a": FORGOTTEN_AT}


def test_a_forgotten_isolated_position_is_named_by_its_unit() -> None:
    key = state_key(UnitKey("a", "BTC-PERP"))
    latest = _Latest().add([tombstone(key, 45, encode_as_of(FORGOTTEN_AT))])
    assert forgotten(latest) == {UnitKey("a", "BTC-PERP"): FORGOTTEN_AT}


def test_an_account_opened_again_after_its_tombstone_is_not_forgotten() -> None:
    latest = _Latest().add([tombstone(b"a", 45, encode_as_of(FORGOTTEN_AT)),
                            record(b"a", stamped(7.0, 30, 15, 10))])
    assert forgotten(latest) == {}


def test_a_tombstone_that_does_not_say_its_inputs_marks_nothing() -> None:
    # written before tombstones said it: kept, as before, with nothing to skip
    latest = _Latest().add([tombstone(b"a", 45, encode_as_of(FORGOTTEN_AT)), tombstone(b"a", 50)])
    assert kept(latest) == {b"a": None}
    assert forgotten(latest) == {}


def test_a_tombstone_with_a_malformed_as_of_stops_the_restore_naming_it() -> None:
    bad = tombstone(b"a", 45, b"[[1]]")
    with pytest.raises(StateCorrupt, match=rf"liqmon.state/0@{bad.offset} .*as_of header"):
        forgotten(_Latest().add([bad]))


def test_a_snapshot_that_has_read_less_than_the_one_kept_is_stale_and_not_kept() -> None:
    # A frozen instance's chunk, sent when it woke: read after the newer state its successor
    # wrote, but reflecting 40 + 12 + 900 = 952 inputs where the one kept reflects 1,000.
    newer, stale = stamped(250.0, 60, 20, 920), stamped(100.0, 40, 12, 900)
    latest = _Latest().add([record(b"a", newer), record(b"b", SNAPSHOT), record(b"a", stale)])
    assert kept(latest) == {b"a": newer, b"b": SNAPSHOT}
    # compaction would keep a's last record, the stale one: a is to be written again
    assert latest.stale == {b"a"}


def test_a_later_snapshot_that_has_read_as_much_or_more_replaces_the_one_kept() -> None:
    first, same, further = stamped(1.0, 5, 5, 5), stamped(2.0, 5, 5, 5), stamped(3.0, 4, 5, 7)
    latest = _Latest().add([record(b"a", first), record(b"a", same)])
    assert (kept(latest), latest.stale) == ({b"a": same}, set())
    # 16 > 15 in total, though fills went back from 5 to 4 (another order of the same inputs)
    assert kept(_Latest().add([record(b"a", first), record(b"a", further)])) == {b"a": further}


def test_a_stale_snapshot_read_after_a_tombstone_does_not_bring_the_account_back() -> None:
    latest = _Latest().add([record(b"a", stamped(9.0, 10, 10, 10)), tombstone(b"a", 40),
                            record(b"a", stamped(9.0, 12, 10, 10))])
    assert (kept(latest), latest.stale) == ({b"a": None}, {b"a"})


def test_an_account_opened_again_after_its_tombstone_is_kept() -> None:
    reopened = stamped(7.0, 20, 15, 10)
    latest = _Latest().add([tombstone(b"a", 40), record(b"a", reopened)])
    assert kept(latest) == {b"a": reopened}


def test_after_an_epoch_marker_the_next_snapshot_replaces_one_read_before_it() -> None:
    # the fills log was re-created: its offsets start again from 0
    before, after = stamped(5.0, 5_000, 10, 10), stamped(6.0, 3, 10, 10)
    latest = _Latest().add([record(b"a", before), record(b"a", stamped(1.0, 1, 1, 1)),
                            record(b"\x00liqmon.epoch.1", b"{}", EPOCH),
                            record(b"a", after), record(b"a", stamped(2.0, 1, 10, 10))])
    assert kept(latest) == {b"a": after}
    assert latest.read == 5


def test_records_that_do_not_say_how_far_they_read_replace_and_are_replaced_in_log_order(
        ) -> None:
    old_json = b'{"v": 1, "seq": 1, "as_of": [], "balances": {}, "positions": {}}'
    ranked = stamped(1.0, 50, 50, 50)
    assert kept(_Latest().add([record(b"a", ranked), record(b"a", old_json)])) == {
        b"a": old_json}
    assert kept(_Latest().add([record(b"a", old_json), record(b"a", stamped(2.0, 1, 1, 1))]
                              )) == {b"a": stamped(2.0, 1, 1, 1)}
    # a tombstone written before tombstones carried their total
    assert kept(_Latest().add([record(b"a", ranked), record(b"a", None)])) == {b"a": None}
    assert kept(_Latest().add([record(b"a", None), record(b"a", ranked)])) == {b"a": ranked}


def test_a_stale_snapshot_is_not_kept_across_deduplications_while_reading() -> None:
    newer = stamped(3.0, 100, 100, 100)
    latest = _Latest().add([record(b"a", newer)])
    latest.deduplicate()
    latest = latest.add([record(b"a", stamped(1.0, 1, 1, 1)), record(b"b", SNAPSHOT)])
    assert (kept(latest), latest.stale) == ({b"a": newer, b"b": SNAPSHOT}, {b"a"})


def test_a_key_noted_stale_is_cleared_once_a_newer_state_is_read_last() -> None:
    # a(920) then a stale a(900): noted; then a(990), the newest and last: nothing to rewrite
    latest = _Latest().add([record(b"a", stamped(1.0, 0, 0, 920)),
                            record(b"a", stamped(2.0, 0, 0, 900))])
    latest.deduplicate()
    assert latest.stale == {b"a"}
    latest = latest.add([record(b"b", SNAPSHOT), record(b"a", stamped(3.0, 0, 0, 990))])
    assert (kept(latest)[b"a"], latest.stale) == (stamped(3.0, 0, 0, 990), set())


def test_keys_that_share_a_hash_are_cleared_alike(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(changelog, "_key_hashes",
                        lambda keys, key_len: np.full(len(key_len), 7, np.int64))
    latest = _Latest().add([record(b"a", stamped(1.0, 0, 0, 920)),
                            record(b"a", stamped(2.0, 0, 0, 900)), record(b"b", SNAPSHOT)])
    latest.deduplicate()
    assert latest.stale == {b"a"}
    latest = latest.add([record(b"a", stamped(3.0, 0, 0, 990))])
    assert (kept(latest)[b"a"], latest.stale) == (stamped(3.0, 0, 0, 990), set())


def test_keys_that_share_a_hash_keep_the_newest_state_each(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(changelog, "_key_hashes",
                        lambda keys, key_len: np.full(len(key_len), 7, np.int64))
    newer = stamped(3.0, 100, 100, 100)
    latest = _Latest().add([record(b"a", newer), record(b"b", SNAPSHOT),
                            record(b"a", stamped(1.0, 1, 1, 1)), record(b"b", None)])
    assert list(kept(latest).items()) == [(b"a", newer), (b"b", None)]
    assert latest.stale == {b"a"}


def restored_ids(*keys_and_values: tuple[bytes, bytes | None]) -> list[object]:
    latest = _Latest().add([record(LAYOUT_RECORD.key, LAYOUT_RECORD.encoded, LAYOUT),
                            *(record(key, value) for key, value in keys_and_values)])
    latest.deduplicate()
    return list(changelog._decode("state", 0, latest).snapshots.ids)


def test_account_ids_are_read_back_whatever_they_hold() -> None:
    isolated = state_key(UnitKey("acct-9", "BTC-PERP"))
    assert restored_ids((b"a\nb", SNAPSHOT), (b"plain", SNAPSHOT), (isolated, SNAPSHOT),
                        ("caf\u00e9".encode(), SNAPSHOT)) == [
        "a\nb", "plain", UnitKey("acct-9", "BTC-PERP"), "caf\u00e9"]


def test_the_restored_partition_names_the_units_to_write_again() -> None:
    isolated = state_key(UnitKey("acct-9", "BTC-PERP"))
    newer, stale = stamped(250.0, 60, 20, 920), stamped(100.0, 40, 12, 900)
    layout, _ = encode_account(Account(balances={"USDT": 1.0}, partition=0), 1,
                               {("fills", 0): 1, ("ledger", 0): 1, ("prices", None): 1})
    latest = _Latest().add([record(layout.key, layout.encoded, LAYOUT),
                            record(b"a", newer), record(isolated, newer), record(b"b", newer),
                            record(b"a", stale), record(isolated, stale)])
    latest.deduplicate()
    assert sorted(map(str, changelog._decode("state", 0, latest).rewrite)) == sorted(
        map(str, ["a", UnitKey("acct-9", "BTC-PERP")]))


def test_an_account_id_that_is_not_utf8_stops_the_restore_naming_its_offset() -> None:
    bad = record(b"\xff\xfe", SNAPSHOT)
    latest = _Latest().add([record(LAYOUT_RECORD.key, LAYOUT_RECORD.encoded, LAYOUT),
                            record(b"fine", SNAPSHOT), bad])
    latest.deduplicate()
    with pytest.raises(StateCorrupt, match="the account id is not UTF-8") as excinfo:
        changelog._decode("state", 0, latest)
    assert f"state/0@{bad.offset}" in str(excinfo.value)


def test_a_snapshot_of_another_account_partition_stops_the_restore_naming_it() -> None:
    """Partition 0's changelog holds a snapshot of an account of partition 1 (a copy, or a
    foreign writer): restored, it would replace the account partition 0 holds."""
    _, elsewhere = encode_account(Account(balances={"USDT": 10.0}, partition=1), 1,
                                  {("fills", 1): 3})
    bad = record(b"acct-1", elsewhere)
    latest = _Latest().add([record(LAYOUT_RECORD.key, LAYOUT_RECORD.encoded, LAYOUT),
                            record(b"fine", SNAPSHOT), bad])
    latest.deduplicate()
    with pytest.raises(StateCorrupt, match=rf"^checkpoint record state/0@{bad.offset} cannot be "
                       r"decoded \(the snapshot of 'acct-1' is of account partition 1, which "
                       r"checkpoints elsewhere\)"):
        changelog._decode("state", 0, latest)


def test_a_snapshot_that_names_no_partition_is_restored_where_it_is() -> None:
    """JSON snapshots of early versions may name none."""
    _, nowhere = encode_account(Account(balances={"USDT": 10.0}, partition=None), 1,
                                {("fills", 0): 3})
    assert restored_ids((b"old", nowhere)) == ["old"]


def test_a_forgotten_account_whose_id_is_not_utf8_does_not_stop_the_restore() -> None:
    assert restored_ids((b"\xff", SNAPSHOT), (b"fine", SNAPSHOT), (b"\xff", None)) == ["fine"]


def batch_of(records: list[tuple[bytes | None, bytes | None, list]], base_offset: int,
             codec: int = 0) -> RecordBatch:
    """(key, value, headers) records as one batch at ``base_offset``, as a fetch returns it."""
    builder = DefaultRecordBatchBuilder(magic=2, compression_type=codec, is_transactional=0,
                                        producer_id=-1, producer_epoch=-1, base_sequence=-1,
                                        batch_size=1 << 24)
    for delta, (key, value, headers) in enumerate(records):
        builder.append(delta, timestamp=1_700_000_000_000 + delta, key=key, value=value,
                       headers=headers)
    raw = bytearray(builder.build())
    struct.pack_into(">q", raw, 0, base_offset)
    (batch,) = whole_batches(bytes(raw))
    return batch


def packed(latest: _Latest) -> tuple:
    latest.deduplicate()
    _, _, offsets, _ = latest.columns()
    return (kept(latest), offsets.tolist(), latest.totals[0].tolist(), latest.read,
            latest.control, latest.layouts)


HEADERS = st.sampled_from([
    [(KIND_HEADER, ACCOUNT)], [], [(KIND_HEADER, LAYOUT)], [(KIND_HEADER, CONTROL)],
    [(KIND_HEADER, ACCOUNT), ("trace", b"x")], [(KIND_HEADER, None)], [(KIND_HEADER, b"acc")],
    [("kinds", ACCOUNT)]])
STAMPED = st.sampled_from([stamped(1.0, 5, 5, 5), stamped(2.0, 1, 1, 1),
                           stamped(3.0, 9, 9, 9)])
RECORDS = st.lists(st.tuples(st.none() | st.binary(max_size=12) | st.sampled_from([b"a", b"b\n"]),
                             st.none() | st.binary(max_size=300) | STAMPED, HEADERS),
                   min_size=1, max_size=40)


@settings(max_examples=150, deadline=None)
@given(records=RECORDS, plain=st.booleans(), codec=st.sampled_from([0, 1, 2, 3, 4]),
       skip=st.integers(0, 50))
def test_a_batch_parsed_into_columns_keeps_what_the_clients_records_keep(
        records, plain: bool, codec: int, skip: int) -> None:
    if plain:  # the usual batch: account snapshots alone, parsed with no object per record
        records = [(key, value, [(KIND_HEADER, ACCOUNT)]) for key, value, _ in records]
    start = 1_000 + min(skip, len(records) - 1)  # a read may begin inside a batch
    batch, same = batch_of(records, 1_000, codec), batch_of(records, 1_000, codec)
    batch.start = same.start = start
    assert packed(_Latest().add_batch(batch)) == packed(_Latest().add(same.records()))


def test_snapshots_alone_are_read_as_columns_whatever_the_compression() -> None:
    for codec in (0, 1, 2, 3, 4):
        batch = batch_of([(b"a", b"1", [(KIND_HEADER, ACCOUNT)]),
                          (None, None, [(KIND_HEADER, ACCOUNT)])], 7, codec)
        columns = batch.columns(KIND_HEADER, ACCOUNT)
        assert columns is not None
        assert columns.offset.tolist() == [7, 8]
        assert columns.key_len.tolist() == [1, -1] and columns.value_len.tolist() == [1, -1]
        assert columns.plain.all()


@pytest.mark.parametrize(("at", "spoilt"), [
    (61, b"\x7e"),  # the first record's length: beyond the batch
    (57, struct.pack(">i", 2**31 - 1)),  # the record count: more than the bytes could hold
])
def test_a_batch_the_compiled_parser_cannot_read_goes_to_the_clients_which_says_why(
        at: int, spoilt: bytes) -> None:
    batch = batch_of([(b"a", b"1", [(KIND_HEADER, ACCOUNT)])], 0)
    raw = bytearray(batch.raw)
    raw[at:at + len(spoilt)] = spoilt
    struct.pack_into(">I", raw, 17, calc_crc32c(bytes(raw[21:])))  # checksum made good again
    (bad,) = whole_batches(bytes(raw))
    assert bad.columns(KIND_HEADER, ACCOUNT) is None
    with pytest.raises(CorruptRecordException):
        _Latest().add_batch(bad)


def test_the_garbage_collector_is_paused_while_restores_read_and_back_after_the_last() -> None:
    collector = changelog.Collector()
    collector.pause()
    collector.pause()  # a second restore reading at the same time
    assert not gc.isenabled()
    collector.resume()
    assert not gc.isenabled()
    collector.resume()
    assert gc.isenabled()


def test_a_collector_paused_by_someone_else_stays_paused() -> None:
    collector = changelog.Collector()
    gc.disable()
    try:
        collector.pause()
        collector.resume()
        assert not gc.isenabled()
    finally:
        gc.enable()
