"""What a checkpoint writes, and in which order (SPEC §6), without a broker: the checkpointer
writes through a sink of our own that records every call.

Accounts are made by applying ledger entries, so they belong to the partition their entries
came from: alice and carol to partition 0, bob to partition 1.
"""

from __future__ import annotations

import asyncio
import gc
import random
import time
from collections.abc import Iterable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, cast

import pytest
import structlog
from aiokafka import AIOKafkaConsumer, TopicPartition

from monitor.config import parse_config
from monitor.engine import Engine
from monitor.events import Source
from monitor.records import LedgerEntry
from monitor.service import checkpointer as checkpointer_module
from monitor.service.changelog import (
    AS_OF_HEADER,
    AS_OF_TOTAL_HEADER,
    NO_RESET,
    RESET_AT_HEADER,
    Stretch,
    encoded_within,
)
from monitor.service.checkpointer import (
    CHECKPOINT_CHUNK,
    NO_OFFSET,
    Checkpointer,
    KafkaSink,
    OffsetRuns,
)
from monitor.service.delivery import DeliveryFailed, Pipeline
from monitor.service.metrics import Metrics
from monitor.service.outbox import Outgoing
from monitor.service.positions import Positions
from monitor.service.settings import ServiceSettings
from monitor.service.topics import control_record_limit
from monitor.snapshot import (
    KIND_HEADER,
    Control,
    decode_as_of,
    decode_control,
    decode_layout,
    decode_snapshots,
)
from tests.service.test_log_reader import topic_with
from tests.support.risk import RISK

SETTINGS = ServiceSettings(config_path=Path("risk.toml"), checkpoint_records=100,
                           checkpoint_interval=5.0)
TOPICS = SETTINGS.topics
FINGERPRINT = "0123456789abcdef"
# next offset to apply: two price partitions, and fills and ledger of account partitions 0, 1
PROCESSED = {("prices", 0): 120, ("prices", 1): 80, ("fills", 0): 7, ("ledger", 0): 3,
             ("fills", 1): 9, ("ledger", 1): 4}


def kind(message: Outgoing) -> str:
    return dict(message.headers)[KIND_HEADER].decode()


class Recorder:
    """A checkpoint's sink in memory: every call, in order. ``submitted``: event batches
    handed to the pipeline so far; a deliver of records of kind ``refuse`` raises; ``owner``:
    the group's answers to `fence`, in turn (the last one repeated)."""

    def __init__(self, submitted: int = 0, refuse: str | None = None,
                 owner: Sequence[bool] = (True,)) -> None:
        self.calls: list[tuple[str, Any]] = []
        self.submitted = submitted
        self.refuse = refuse
        self.owner = list(owner)

    async def deliver(self, messages: Sequence[Outgoing]) -> list[tuple[int, int]]:
        self.calls.append(("deliver", list(messages)))
        if self.refuse in {kind(m) for m in messages}:
            raise DeliveryFailed(TOPICS.state, RuntimeError("refused"))
        return [(cast(int, m.partition), -1) for m in messages]  # offsets it does not model

    def mark(self) -> int:
        return self.submitted

    async def settled(self, mark: int) -> None:
        self.calls.append(("settled", mark))

    async def commit(self, offsets: dict[TopicPartition, int]) -> None:
        self.calls.append(("commit", offsets))

    async def fence(self, offsets: dict[TopicPartition, int]) -> bool:
        self.calls.append(("fence", offsets))
        return self.owner.pop(0) if len(self.owner) > 1 else self.owner[0]

    async def changelog_ends(self, partitions: Sequence[int]) -> dict[int, int] | None:
        return None  # a changelog it does not model (`Changelog` does)

    async def read_stretches(self, ranges: dict[int, tuple[int, int]]
                             ) -> dict[int, Stretch] | None:
        raise AssertionError("asked without changelog ends")

    def lost_records(self, partition: int, end: int, written_to: int) -> None:
        self.calls.append(("lost_records", (partition, end, written_to)))

    def written_by_others(self, partition: int, units: int) -> None:
        self.calls.append(("written_by_others", (partition, units)))

    def windows_cut(self, partition: int, dropped: int, kept: int, limit: int) -> None:
        self.calls.append(("windows_cut", (partition, dropped, kept, limit)))

    def steps(self) -> list[str]:
        """The calls in short: "deliver account×2" delivered two account records."""
        out = []
        for name, arg in self.calls:
            if name == "deliver":
                kinds = sorted({kind(m) for m in arg})
                out.append(f"deliver {'+'.join(kinds)}×{len(arg)}")
            elif name == "settled":
                out.append(f"settled {arg}")
            else:
                out.append(name)
        return out

    def delivered(self, of_kind: str) -> list[Outgoing]:
        return [m for name, arg in self.calls if name == "deliver" for m in arg
                if kind(m) == of_kind]


class Turns(Recorder):
    """The loop hands another event batch over between any two looks at the pipeline."""

    def mark(self) -> int:
        self.submitted += 1
        return self.submitted


class SlowEvents(Recorder):
    """Each lot of snapshots, and the control records, wait ``seconds`` for the events they
    reflect."""

    def __init__(self, seconds: float, owner: Sequence[bool] = (True,)) -> None:
        super().__init__(owner=owner)
        self.seconds = seconds

    async def settled(self, mark: int) -> None:
        await asyncio.sleep(self.seconds)
        await super().settled(mark)


class Changelog(Recorder):
    """A sink over a changelog whose partitions each end at offset 10 when restored: what is
    delivered goes at their ends, as do the records another instance writes (`foreign`: a
    reset marker, or a unit's record). ``readable``: whether `read_stretches` can read now."""

    def __init__(self) -> None:
        super().__init__()
        self.ends = {0: 10, 1: 10}
        self.resets: dict[int, list[int]] = {0: [], 1: []}
        self.units: dict[int, list[tuple[int, bytes]]] = {0: [], 1: []}  # others' records
        self.readable = True
        self.read: list[dict[int, tuple[int, int]]] = []  # what `read_stretches` was asked

    async def deliver(self, messages: Sequence[Outgoing]) -> list[tuple[int, int]]:
        await super().deliver(messages)
        written = []
        for message in messages:
            assert message.partition is not None
            written.append((message.partition, self.ends[message.partition]))
            self.ends[message.partition] += 1
            if kind(message) == "account":  # read back by `read_stretches` as any unit's
                self.units[message.partition].append((written[-1][1], message.key))
        return written

    def recreate(self, partition: int) -> None:
        """The topic is deleted and created again: the partition's log starts over, empty."""
        self.ends[partition] = 0
        self.resets[partition] = []
        self.units[partition] = []

    def foreign(self, partition: int, reset: bool = False, unit: str | bytes | None = None
                ) -> int:
        """Another instance writes a record (a reset marker, or ``unit``'s snapshot); its
        offset."""
        at = self.ends[partition]
        self.ends[partition] += 1
        if reset:
            self.resets[partition].append(at)
        if unit is not None:
            self.units[partition].append((at, unit if isinstance(unit, bytes)
                                          else unit.encode()))
        return at

    async def changelog_ends(self, partitions: Sequence[int]) -> dict[int, int] | None:
        return {p: self.ends[p] for p in partitions}

    async def read_stretches(self, ranges: dict[int, tuple[int, int]]
                             ) -> dict[int, Stretch] | None:
        self.read.append(ranges)
        if not self.readable:
            return None
        found = {}
        for p, (start, end) in ranges.items():
            reset_at = max((at for at in self.resets[p] if start <= at < end), default=NO_RESET)
            found[p] = Stretch(reset_at, [(at, key) for at, key in self.units[p]
                                          if max(start, reset_at) <= at < end])
        return found


def make(owned: Iterable[int] = (0, 1), session_timeout_ms: int = SETTINGS.session_timeout_ms
         ) -> tuple[Checkpointer, Engine]:
    engine = Engine(parse_config(RISK))
    positions = Positions(TOPICS, max_skew_ms=5, max_wait=0.5, max_stall=10.0, metrics=Metrics())
    for (topic, partition), offset in PROCESSED.items():
        positions.seek(TopicPartition(topic, partition), offset)
    positions.owned.update(owned)
    settings = replace(SETTINGS, session_timeout_ms=session_timeout_ms)
    return Checkpointer(engine, positions, settings, Metrics(), FINGERPRINT), engine


def deposit(engine: Engine, account: str, amount: float, partition: int, offset: int) -> None:
    """A ledger entry of ``amount`` USDT (a withdrawal when negative) read from ledger
    ``partition`` at ``offset``."""
    kind = "deposit" if amount > 0 else "withdrawal"
    engine.apply(LedgerEntry(f"{account}-{offset}", account, "USDT", amount, kind, 1),
                 Source(TOPICS.ledger, partition, offset))


def more_than_a_chunk(engine: Engine) -> None:
    """``CHECKPOINT_CHUNK`` + 44 accounts of partition 0, a deposit each."""
    for n in range(CHECKPOINT_CHUNK + 44):
        deposit(engine, f"acct-{n:03}", 10.0, 0, n)


def snapshots_written(recorder: Recorder) -> dict[str, tuple[int, dict]]:
    """Account id → (seq, as_of) of every snapshot delivered, decoded with its layout."""
    layouts = {layout.id: layout for layout in
               (decode_layout(m.value) for m in recorder.delivered("layout"))}
    accounts = recorder.delivered("account")
    decoded = decode_snapshots([m.value for m in accounts], [m.key.decode() for m in accounts],
                               layouts)
    return {key: (seq, as_of) for key, _, seq, as_of in decoded.accounts()}


def restored_at_ten(checkpointer: Checkpointer) -> None:
    """Partitions 0 and 1 restored with no reset marker, their changelog read up to 10."""
    for partition in (0, 1):
        checkpointer.restored_after(partition, NO_RESET, read_to=10)


def alice_changed_since_the_restore(*also: tuple[str, int]) -> tuple[Checkpointer, Engine]:
    """alice and carol (partition 0), and ``also`` (account, partition), restored as
    `restored_at_ten` says; then alice alone changes."""
    checkpointer, engine = make()
    for account, partition in (("alice", 0), ("carol", 0), *also):
        deposit(engine, account, 100.0, partition, 1)
    restored_at_ten(checkpointer)
    engine.take_dirty()  # checkpointed before the restore
    deposit(engine, "alice", 5.0, 0, 2)
    return checkpointer, engine


def reset_named(changelog: Changelog, partition: int) -> int:
    """The reset marker the partition's last control record names."""
    (control,) = [m for m in changelog.delivered("control") if m.partition == partition][-1:]
    return int(dict(control.headers)[RESET_AT_HEADER])


async def test_a_reset_another_instance_wrote_has_every_account_of_the_partition_written_again(
        ) -> None:
    """alice and carol live in partition 0, bob in 1; only alice changed. Another instance
    reset the changelog at 0@10 and 1@10 since this one restored them."""
    checkpointer, _ = alice_changed_since_the_restore(("bob", 1))
    changelog = Changelog()
    assert (changelog.foreign(0, reset=True), changelog.foreign(1, reset=True)) == (10, 10)
    await checkpointer.checkpoint({0, 1}, changelog)
    assert sorted(snapshots_written(changelog)) == ["alice", "bob", "carol"]
    assert (reset_named(changelog, 0), reset_named(changelog, 1)) == (10, 10)
    assert changelog.read == [{0: (10, 11), 1: (10, 11)}]


async def test_a_changelog_holding_only_its_own_records_is_not_read() -> None:
    checkpointer, engine = make()
    deposit(engine, "alice", 100.0, 0, 1)
    restored_at_ten(checkpointer)
    changelog = Changelog()
    await checkpointer.checkpoint({0, 1}, changelog)
    deposit(engine, "alice", 5.0, 0, 2)
    await checkpointer.checkpoint({0, 1}, changelog)
    assert changelog.read == []
    assert list(snapshots_written(changelog)) == ["alice"]
    assert reset_named(changelog, 0) == NO_RESET


async def test_another_instances_records_without_a_reset_names_no_reset() -> None:
    checkpointer, _ = alice_changed_since_the_restore()
    changelog = Changelog()
    changelog.foreign(0)
    await checkpointer.checkpoint({0, 1}, changelog)
    assert changelog.read == [{0: (10, 11)}]
    assert list(snapshots_written(changelog)) == ["alice"]
    assert reset_named(changelog, 0) == NO_RESET


async def test_a_late_snapshot_another_instance_wrote_has_its_unit_written_again() -> None:
    """A frozen predecessor's client sends carol's snapshot, of a state older than the one
    held here, after this instance restored her; compaction would keep it, her last record.
    The next checkpoint writes carol again, after it, with alice who changed."""
    checkpointer, _ = alice_changed_since_the_restore()
    changelog = Changelog()
    changelog.foreign(0, unit="carol")
    await checkpointer.checkpoint({0, 1}, changelog)
    assert sorted(snapshots_written(changelog)) == ["alice", "carol"]
    assert ("written_by_others", (0, 1)) in changelog.calls


async def test_its_own_records_in_a_stretch_another_record_made_it_read_are_not_written_again(
        ) -> None:
    """The first checkpoint writes alice; then a record that names no unit lands (another
    instance's epoch marker, say), so the next look reads the stretch, alice's own snapshot
    in it. Nothing changed since: nothing is written again, and no warning."""
    checkpointer, _ = alice_changed_since_the_restore()
    changelog = Changelog()
    await checkpointer.checkpoint({0, 1}, changelog)
    changelog.foreign(0)
    before = len(changelog.delivered("account"))
    await checkpointer.checkpoint({0, 1}, changelog)
    assert changelog.read == [{0: (10, 14)}]  # alice's layout and snapshot, its control, the marker
    assert len(changelog.delivered("account")) == before
    assert "written_by_others" not in changelog.steps()


def test_own_offsets_are_kept_as_runs_and_dropped_below_a_look() -> None:
    runs = OffsetRuns()
    for offset in (10, 11, 12, 20):
        runs.add(offset)
    assert [o for o in range(9, 22) if o in runs] == [10, 11, 12, 20]
    runs.drop_below(12)
    assert [o for o in range(9, 22) if o in runs] == [12, 20]


async def test_a_late_record_whose_key_is_not_utf8_names_no_unit() -> None:
    """A stray producer's record in the changelog: not liqmon's, and no reason to stop."""
    checkpointer, _ = alice_changed_since_the_restore()
    changelog = Changelog()
    changelog.foreign(0, unit=b"\xff\xfe")
    await checkpointer.checkpoint({0, 1}, changelog)
    assert list(snapshots_written(changelog)) == ["alice"]


async def test_a_late_snapshot_of_a_unit_not_held_here_is_followed_by_its_tombstone() -> None:
    """dave was forgotten here (or never held): the predecessor's late snapshot of him
    would bring him back after compaction. The next checkpoint writes his tombstone."""
    checkpointer, _ = alice_changed_since_the_restore()
    changelog = Changelog()
    changelog.foreign(0, unit="dave")
    await checkpointer.checkpoint({0, 1}, changelog)
    (tombstone,) = [m for m in changelog.delivered("account") if m.value is None]
    assert (tombstone.key, tombstone.partition) == (b"dave", 0)


async def test_a_stretch_that_could_not_be_read_is_read_at_the_next_checkpoint() -> None:
    checkpointer, engine = alice_changed_since_the_restore()
    changelog = Changelog()
    changelog.foreign(0, reset=True)
    changelog.readable = False
    await checkpointer.checkpoint({0, 1}, changelog)
    assert reset_named(changelog, 0) == NO_RESET  # not known yet
    changelog.readable = True
    deposit(engine, "alice", 5.0, 0, 3)
    await checkpointer.checkpoint({0, 1}, changelog)
    # from where it was last sure, over the first checkpoint's own records too
    assert changelog.read[-1] == {0: (10, 14)}
    assert reset_named(changelog, 0) == 10
    assert sorted(snapshots_written(changelog)) == ["alice", "carol"]


async def test_a_changelog_re_created_while_running_has_every_account_written_again() -> None:
    """alice and carol live in partition 0; only alice changed since the restore, when the
    changelog ended at 10. The topic is re-created: its partition 0 now ends at 0, before
    the records this instance wrote. carol goes into the checkpoint too, and the partition's
    control record names no reset."""
    checkpointer, _ = alice_changed_since_the_restore()
    changelog = Changelog()
    changelog.recreate(0)
    await checkpointer.checkpoint({0, 1}, changelog)
    assert sorted(snapshots_written(changelog)) == ["alice", "carol"]
    assert ("lost_records", (0, 0, 10)) in changelog.calls
    assert reset_named(changelog, 0) == NO_RESET


async def test_records_lost_after_a_checkpoint_of_its_own_are_found_by_the_next() -> None:
    """The re-created log already holds 3 of the 5 records the last checkpoint wrote (the
    topic went in the middle of it): it ends at 3, before 15."""
    checkpointer, engine = alice_changed_since_the_restore()
    changelog = Changelog()
    await checkpointer.checkpoint({0, 1}, changelog)
    written = changelog.ends[0]
    changelog.recreate(0)
    changelog.ends[0] = 3
    deposit(engine, "alice", 5.0, 0, 3)
    await checkpointer.checkpoint({0, 1}, changelog)
    assert ("lost_records", (0, 3, written)) in changelog.calls
    assert sorted(snapshots_written(changelog)) == ["alice", "carol"]


async def test_an_end_short_of_the_last_batch_written_is_no_loss() -> None:
    """The embedded broker reports a log's end as its last batch's first offset + 1: after a
    checkpoint that stopped before its control record (the group said no), that is short of
    the snapshots written, with nothing lost."""
    checkpointer, engine = alice_changed_since_the_restore()
    changelog = Changelog()
    await checkpointer.checkpoint({0, 1}, changelog)
    changelog.ends[0] -= 1  # as if the last record were the second of its batch
    deposit(engine, "alice", 5.0, 0, 3)
    await checkpointer.checkpoint({0, 1}, changelog)
    assert not [call for call in changelog.calls if call[0] == "lost_records"]
    assert list(snapshots_written(changelog)) == ["alice"]


async def test_a_reset_marker_in_the_re_created_changelog_is_named() -> None:
    """Another instance reset the new log (its first record): read from the log's start."""
    checkpointer, _ = alice_changed_since_the_restore()
    changelog = Changelog()
    changelog.recreate(0)
    assert changelog.foreign(0, reset=True) == 0
    await checkpointer.checkpoint({0, 1}, changelog)
    assert changelog.read == [{0: (0, 1)}]
    assert reset_named(changelog, 0) == 0


async def test_a_lot_waits_for_the_events_then_writes_its_layout_then_its_snapshots() -> None:
    checkpointer, engine = make()
    deposit(engine, "alice", 100.0, 0, 1)
    recorder = Recorder()
    await checkpointer.checkpoint({0}, recorder)
    assert recorder.steps()[:4] == ["settled 0", "fence", "deliver layout×1",
                                    "deliver account×1"]


async def test_each_lot_waits_for_the_events_handed_over_before_it_was_encoded() -> None:
    """Control records vouch for what was handed over when the checkpoint began (mark 1),
    and do not wait for batches handed over since; each lot's snapshots reflect what was
    applied when it was encoded (marks 2 and 3)."""
    checkpointer, engine = make()
    more_than_a_chunk(engine)
    recorder = Turns()
    await checkpointer.checkpoint({0}, recorder)
    assert recorder.steps() == [
        "settled 2", "fence", "deliver layout×1", "deliver account×256", "settled 3",
        "deliver account×44", "settled 1", "deliver control×1", "commit"]


async def test_control_records_go_last_once_the_events_handed_over_before_are_settled() -> None:
    checkpointer, engine = make()
    deposit(engine, "alice", 100.0, 0, 1)
    recorder = Recorder(submitted=3)  # three event batches in flight when it begins
    await checkpointer.checkpoint({0, 1}, recorder)
    # both partitions' control records in one delivery: one acknowledgement to wait for
    assert recorder.steps()[-3:] == ["settled 3", "deliver control×2", "commit"]


async def test_control_records_go_in_lots_of_at_most_8_mib(monkeypatch) -> None:
    """Each is encoded alone (~2 ms on the loop with full windows) and held until its lot
    goes: a lot bounds that memory. Here a lot holds one record, the second waits."""
    checkpointer, engine = make()
    deposit(engine, "alice", 100.0, 0, 1)
    monkeypatch.setattr(checkpointer_module, "CONTROLS_AT_ONCE", 1)
    recorder = Recorder()
    await checkpointer.checkpoint({0, 1}, recorder)
    assert recorder.steps()[-3:] == ["deliver control×1", "deliver control×1", "commit"]
    assert [m.partition for m in recorder.delivered("control")] == [0, 1]


async def test_a_layout_is_written_once_per_partition_however_many_chunks() -> None:
    checkpointer, engine = make()
    more_than_a_chunk(engine)
    recorder = Recorder()
    await checkpointer.checkpoint({0}, recorder)
    assert recorder.steps() == [
        "settled 0", "fence", "deliver layout×1", "deliver account×256", "settled 0",
        "deliver account×44", "settled 0", "deliver control×1", "commit"]


async def test_a_lot_holds_as_many_chunks_as_half_the_loops_last_batch_took_to_apply(
        ) -> None:
    """Draining a backlog, a batch takes tens of milliseconds: a lot of one chunk a turn fell
    behind the accounts the loop changed meanwhile."""
    checkpointer, engine = make()
    more_than_a_chunk(engine)
    checkpointer.applied(500, seconds=10.0)  # a budget of 5 s a turn
    recorder = Recorder()
    await checkpointer.checkpoint({0}, recorder)
    assert recorder.steps() == [
        "settled 0", "fence", "deliver layout×1", "deliver account×300", "settled 0",
        "deliver control×1", "commit"]


async def test_a_lot_refused_fails_the_checkpoint_with_the_next_lot_encoded_and_unwritten(
        ) -> None:
    checkpointer, engine = make()
    more_than_a_chunk(engine)
    recorder = Recorder(refuse="account")
    with pytest.raises(DeliveryFailed):
        await checkpointer.checkpoint({0}, recorder)
    assert recorder.steps() == ["settled 0", "fence", "deliver layout×1", "deliver account×256"]
    assert len(engine.take_dirty()) == CHECKPOINT_CHUNK + 44  # all written again next time


async def test_a_checkpoint_cancelled_while_a_lot_is_produced_leaves_no_task_behind() -> None:
    checkpointer, engine = make()
    more_than_a_chunk(engine)
    recorder = SlowEvents(seconds=0.2)
    writing = asyncio.create_task(checkpointer.checkpoint({0}, recorder))
    await asyncio.sleep(0.05)  # the first lot waits for its events, the second is encoded
    writing.cancel()
    with pytest.raises(asyncio.CancelledError):
        await writing
    assert asyncio.all_tasks() == {asyncio.current_task()}
    assert recorder.steps() == []
    assert len(engine.take_dirty()) == CHECKPOINT_CHUNK + 44


async def test_only_the_checkpointed_partitions_accounts_are_written_the_others_stay_dirty(
        ) -> None:
    checkpointer, engine = make()
    deposit(engine, "alice", 100.0, 0, 1)
    deposit(engine, "bob", 50.0, 1, 1)
    recorder = Recorder()
    await checkpointer.checkpoint({0}, recorder)
    assert [m.key for m in recorder.delivered("account")] == [b"alice"]
    assert engine.take_dirty().keys == ["bob"]


async def test_accounts_of_a_partition_no_longer_owned_are_not_written() -> None:
    # partition 1 was handed over: the checkpoint written before the hand-over has bob
    checkpointer, engine = make(owned={0})
    deposit(engine, "alice", 100.0, 0, 1)
    deposit(engine, "bob", 50.0, 1, 1)
    recorder = Recorder()
    await checkpointer.checkpoint({0, 1}, recorder)
    assert [m.key for m in recorder.delivered("account")] == [b"alice"]


async def test_snapshots_and_control_records_carry_the_offsets_the_state_reflects() -> None:
    checkpointer, engine = make()
    deposit(engine, "alice", 100.0, 0, 1)
    recorder = Recorder()
    await checkpointer.checkpoint({0}, recorder)
    reflected = {("prices", 0): 120, ("prices", 1): 80, ("fills", 0): 7, ("ledger", 0): 3}
    (control,) = recorder.delivered("control")
    assert decode_control(control.value).offsets == reflected
    assert snapshots_written(recorder) == {"alice": (1, reflected)}


async def test_the_group_commit_holds_the_checkpointed_fills_and_ledger_offsets_not_prices(
        ) -> None:
    checkpointer, engine = make()
    deposit(engine, "alice", 100.0, 0, 1)
    recorder = Recorder()
    await checkpointer.checkpoint({0}, recorder)
    assert recorder.calls[-1] == ("commit", {TopicPartition("fills", 0): 7,
                                             TopicPartition("ledger", 0): 3})


async def test_a_control_record_holds_the_price_table_windows_and_config_fingerprint() -> None:
    checkpointer, engine = make()
    engine.load_prices({"BTC": (61_000.0, 1_700)})
    deposit(engine, "alice", 100.0, 0, 1)
    recorder = Recorder()
    await checkpointer.checkpoint({0}, recorder)
    control = decode_control(recorder.delivered("control")[0].value)
    assert (control.prices, control.config) == ({"BTC": (61_000.0, 1_700)}, FINGERPRINT)
    assert control.dedupe == {("fills", 0): [], ("ledger", 0): [("alice", "alice-1")]}


async def test_a_forgotten_account_is_tombstoned_in_the_partition_it_lived_in() -> None:
    checkpointer, engine = make()
    deposit(engine, "carol", 100.0, 0, 1)
    deposit(engine, "carol", -100.0, 0, 2)  # emptied, no position, no event: forgotten
    recorder = Recorder()
    await checkpointer.checkpoint({0}, recorder)
    (tombstone,) = recorder.delivered("account")
    assert (tombstone.key, tombstone.value, tombstone.partition) == (b"carol", None, 0)
    assert engine.take_dirty().keys == []
    # how far partition 0's state has read: prices 120 + 80, fills/0 7, ledger/0 3
    headers = dict(tombstone.headers)
    assert headers[AS_OF_TOTAL_HEADER] == b"210"
    assert decode_as_of(headers[AS_OF_HEADER]) == {
        ("prices", 0): 120, ("prices", 1): 80, ("fills", 0): 7, ("ledger", 0): 3}


class LoopEmptiesCarol(Recorder):
    """Once carol's snapshot is written, the loop applies a withdrawal that empties her."""

    def __init__(self, engine: Engine, checkpointer: Checkpointer) -> None:
        super().__init__()
        self.engine, self.checkpointer = engine, checkpointer

    async def deliver(self, messages: Sequence[Outgoing]) -> list[tuple[int, int]]:
        written = await super().deliver(messages)
        if any(m.key == b"carol" for m in messages):
            deposit(self.engine, "carol", -100.0, 0, 2)  # emptied: forgotten
        return written


async def test_an_account_emptied_while_its_snapshot_is_written_is_tombstoned_next_time(
        ) -> None:
    checkpointer, engine = make()
    deposit(engine, "carol", 100.0, 0, 1)
    await checkpointer.checkpoint({0}, LoopEmptiesCarol(engine, checkpointer))
    recorder = Recorder()
    await checkpointer.checkpoint({0}, recorder)
    (tombstone,) = recorder.delivered("account")
    assert (tombstone.key, tombstone.value, tombstone.partition) == (b"carol", None, 0)


async def test_a_forgotten_account_of_a_partition_not_checkpointed_waits_for_its_checkpoint(
        ) -> None:
    checkpointer, engine = make()
    deposit(engine, "bob", 100.0, 1, 1)
    deposit(engine, "bob", -100.0, 1, 2)  # forgotten, in partition 1
    recorder = Recorder()
    await checkpointer.checkpoint({0}, recorder)  # partition 0 only (a hand-over)
    assert recorder.delivered("account") == []
    recorder = Recorder()
    await checkpointer.checkpoint({1}, recorder)
    (tombstone,) = recorder.delivered("account")
    assert (tombstone.key, tombstone.value, tombstone.partition) == (b"bob", None, 1)


class CollectorWatch(Recorder):
    """Notes whether the garbage collector runs while each message is delivered."""

    def __init__(self, refuse: str | None = None) -> None:
        super().__init__(refuse=refuse)
        self.collecting: list[bool] = []

    async def deliver(self, messages: Sequence[Outgoing]) -> list[tuple[int, int]]:
        self.collecting.append(gc.isenabled())
        return await super().deliver(messages)


async def test_the_garbage_collector_is_paused_while_a_checkpoint_is_written() -> None:
    checkpointer, engine = make()
    deposit(engine, "alice", 100.0, 0, 1)
    watch = CollectorWatch()
    assert gc.isenabled()
    await checkpointer.checkpoint({0}, watch)
    assert watch.collecting == [False, False, False]  # layout, snapshot, control record
    assert gc.isenabled()


async def test_the_garbage_collector_runs_again_after_a_failed_checkpoint() -> None:
    checkpointer, engine = make()
    deposit(engine, "alice", 100.0, 0, 1)
    with pytest.raises(DeliveryFailed):
        await checkpointer.checkpoint({0}, CollectorWatch(refuse="account"))
    assert gc.isenabled()


async def test_each_checkpoint_takes_the_next_sequence_number() -> None:
    checkpointer, engine = make()
    checkpointer.resume(41)  # what a restore read
    deposit(engine, "alice", 100.0, 0, 1)
    recorder = Recorder()
    await checkpointer.checkpoint({0}, recorder)
    assert decode_control(recorder.delivered("control")[0].value).seq == 42
    assert checkpointer.seq == 42


async def test_accounts_are_put_back_in_the_dirty_set_when_their_snapshots_fail() -> None:
    checkpointer, engine = make()
    deposit(engine, "alice", 100.0, 0, 1)
    with pytest.raises(DeliveryFailed):
        await checkpointer.checkpoint({0}, Recorder(refuse="account"))
    assert engine.take_dirty().keys == ["alice"]


async def test_a_failed_checkpoint_writes_no_control_record_and_commits_nothing() -> None:
    checkpointer, engine = make()
    deposit(engine, "alice", 100.0, 0, 1)
    recorder = Recorder(refuse="account")
    with pytest.raises(DeliveryFailed):
        await checkpointer.checkpoint({0}, recorder)
    assert recorder.steps() == ["settled 0", "fence", "deliver layout×1", "deliver account×1"]
    assert checkpointer.seq == 0


async def test_accounts_are_put_back_when_the_control_records_fail() -> None:
    checkpointer, engine = make()
    deposit(engine, "alice", 100.0, 0, 1)
    with pytest.raises(DeliveryFailed):
        await checkpointer.checkpoint({0}, Recorder(refuse="control"))
    assert engine.take_dirty().keys == ["alice"]


async def test_a_standby_has_nothing_to_save_and_no_checkpoint_age() -> None:
    """An instance the group gave no partition applies ticks all the same: nothing of them
    awaits a checkpoint (LiqmonCheckpointStale fired on every standby)."""
    checkpointer, _ = make(owned=())
    checkpointer.applied(10)
    checkpointer.last_checkpoint -= 120
    assert checkpointer.due()
    await checkpointer.checkpoint(set(), Recorder())
    assert (checkpointer.age(), checkpointer.due()) == (0.0, False)


async def test_checkpointing_no_partition_of_an_owner_leaves_its_age() -> None:
    checkpointer, _ = make(owned=(0,))
    two_minutes_unsaved(checkpointer)
    await checkpointer.checkpoint(set(), Recorder())
    assert checkpointer.age() >= 120


def two_minutes_unsaved(checkpointer: Checkpointer) -> None:
    """Ten records applied, the first two minutes ago, after the last checkpoint began."""
    checkpointer.applied(10)
    checkpointer.last_checkpoint -= 120
    assert checkpointer.unsaved_since is not None
    checkpointer.unsaved_since -= 120


async def test_accounts_kept_through_a_rebalance_keep_their_checkpoint_age() -> None:
    """While the group decides, a kept partition is not owned but its accounts are here:
    taken for a standby, the age read 0 all through a group wait (a helper's fleet, 29 s of
    unsaved records after a broker freeze)."""
    checkpointer, engine = make(owned=())
    deposit(engine, "alice", 100.0, 0, 1)
    two_minutes_unsaved(checkpointer)
    assert await checkpointer.checkpoint(set(), Recorder())
    assert checkpointer.age() >= 120
    assert not checkpointer.due()  # nothing to write until an interval on


async def test_the_age_is_the_oldest_unsaved_records_not_the_time_since_the_checkpoint(
        ) -> None:
    """A record applied after an idle spell (a rebalance, a quiet input) is not that old:
    the age jumped to the spell's length (a rebalance of over a minute would fire
    LiqmonCheckpointStale by itself). Here a second of nothing after a checkpoint."""
    checkpointer, engine = make(owned=(0,))
    deposit(engine, "alice", 100.0, 0, 1)
    checkpointer.applied(1)
    assert await checkpointer.checkpoint({0}, Recorder())
    await asyncio.sleep(1.0)
    assert checkpointer.age() == 0.0
    checkpointer.applied(1)
    assert 0.0 < checkpointer.age() < 0.5  # the record's age, not the second before it


async def test_a_checkpoint_the_group_did_not_vouch_for_leaves_its_records_due_and_aged(
        ) -> None:
    """Refused with the broker away, it zeroed the count and the age: the age read 0 with
    nothing saved (LiqmonCheckpointStale could not fire), and no checkpoint came until the
    next input, so a crash re-published what followed the last one (a helper: 76 events)."""
    checkpointer, engine = make(owned=(0,))
    deposit(engine, "alice", 100.0, 0, 1)
    two_minutes_unsaved(checkpointer)
    assert await checkpointer.checkpoint({0}, Recorder(owner=[False])) is False
    assert checkpointer.since_checkpoint == 10
    assert checkpointer.age() >= 120
    assert not checkpointer.due()  # tried again an interval (5 s) after this attempt
    checkpointer.last_checkpoint -= 5
    assert checkpointer.due()


async def test_a_failed_checkpoint_leaves_its_records_to_the_next() -> None:
    checkpointer, engine = make(owned=(0,))
    deposit(engine, "alice", 100.0, 0, 1)
    two_minutes_unsaved(checkpointer)
    with pytest.raises(DeliveryFailed):
        await checkpointer.checkpoint({0}, Recorder(refuse="account"))
    assert (checkpointer.since_checkpoint, checkpointer.age() >= 120) == (10, True)


async def test_the_age_runs_on_while_a_checkpoint_is_written_and_restarts_once_it_is() -> None:
    checkpointer, engine = make(owned=(0,))
    deposit(engine, "alice", 100.0, 0, 1)
    two_minutes_unsaved(checkpointer)
    writing = asyncio.create_task(checkpointer.checkpoint({0}, SlowEvents(0.2)))
    await asyncio.sleep(0.05)
    assert not writing.done()
    assert checkpointer.age() >= 120  # nothing is saved until it is written
    assert await writing
    assert checkpointer.age() == 0.0
    checkpointer.applied(1)
    assert 0.0 < checkpointer.age() < 5  # the new record's, not the two minutes before


async def test_giving_up_a_checkpoint_being_written_leaves_its_accounts_dirty_and_due(
        ) -> None:
    """What a revocation does once the group has replaced the instance: the checkpoint
    being written waits for a word that will not come, and the rejoin with it."""
    checkpointer, engine = make(owned=(0,))
    deposit(engine, "alice", 100.0, 0, 1)
    two_minutes_unsaved(checkpointer)
    checkpointer.poll(SlowEvents(60.0))  # due: written behind the loop, held up
    await asyncio.sleep(0.05)
    await asyncio.wait_for(checkpointer.give_up(), timeout=5)
    checkpointer.poll(Recorder())  # nothing left to raise; not due before an interval
    assert engine.take_dirty().keys == ["alice"]
    assert (checkpointer.since_checkpoint, checkpointer.age() >= 120) == (10, True)


def test_a_checkpoint_is_due_after_checkpoint_records_records() -> None:
    checkpointer, _ = make()
    checkpointer.applied(99)
    assert not checkpointer.due()
    checkpointer.applied(1)
    assert checkpointer.due()


def test_a_checkpoint_is_due_after_the_interval_only_when_records_are_pending() -> None:
    checkpointer, _ = make()
    checkpointer.last_checkpoint = time.monotonic() - 6.0  # the interval is 5 s
    assert not checkpointer.due()
    checkpointer.applied(1)
    assert checkpointer.due()


async def test_only_a_checkpoint_of_every_owned_partition_restarts_the_count() -> None:
    checkpointer, _ = make(owned={0, 1})
    checkpointer.applied(60)
    await checkpointer.checkpoint({0}, Recorder())
    assert checkpointer.since_checkpoint == 60
    await checkpointer.checkpoint({0, 1}, Recorder())
    assert checkpointer.since_checkpoint == 0


def test_a_catch_up_makes_a_checkpoint_due_as_the_records_it_applied_would() -> None:
    """After a failover's catch-up the new owner wrote nothing until the next input came
    (a helper: over 30 s with none, and liqmon_checkpoint_age_seconds 0): the changelog's
    control record and the group's offsets stayed the dead owner's."""
    checkpointer, _ = make()
    checkpointer.last_checkpoint -= 6.0  # the interval is 5 s
    assert not checkpointer.due()
    checkpointer.include(["dave"], 1, 66_684, since=time.monotonic() - 30)  # took 30 s
    assert checkpointer.due()
    assert checkpointer.age() >= 30  # from the first record it applied


async def test_changes_of_a_catch_up_are_written_by_the_next_checkpoint_of_their_partition(
        ) -> None:
    checkpointer, engine = make()
    deposit(engine, "erin", 100.0, 1, 1)  # held here; dave was forgotten in the catch-up
    engine.take_dirty()
    checkpointer.include(["dave", "erin"], 1, 2, time.monotonic())
    recorder = Recorder()
    await checkpointer.checkpoint({1}, recorder)
    assert sorted((m.key, m.value is None, m.partition)
                  for m in recorder.delivered("account")) == [(b"dave", True, 1),
                                                              (b"erin", False, 1)]


async def sink_of_a_group(bootstrap: str, group_id: str
                          ) -> tuple[KafkaSink, AIOKafkaConsumer, TopicPartition]:
    """A `KafkaSink` whose group consumer is started and assigned a partition of a topic of
    two records, with short timeouts; no pipeline (a commit delivers nothing)."""
    topic = await topic_with(bootstrap, {0: [[b"a"], [b"b"]]})
    tp = TopicPartition(topic, 0)
    group = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=group_id,
                             enable_auto_commit=False, request_timeout_ms=200,
                             retry_backoff_ms=50)
    await group.start()
    group.assign([tp])
    sink = KafkaSink(cast(Pipeline, None), group, structlog.get_logger(), commit_timeout=1.0)
    return sink, group, tp


async def test_no_offset_in_a_fence_reads_back_as_no_committed_offset(broker) -> None:
    """What a restore asks the group (`Restorer.refuse_lost_state`) after a crash between a
    first checkpoint's fence and its control record: nothing committed."""
    sink, group, tp = await sink_of_a_group(broker.bootstrap, "first-fence")
    try:
        assert await sink.fence({tp: NO_OFFSET})
        assert await group.committed(tp) is None
        await sink.commit({tp: 1})
        assert await group.committed(tp) == 1
    finally:
        await group.stop()


async def test_an_offset_commit_the_broker_does_not_answer_is_given_up_with_a_warning(
        own_broker) -> None:
    # aiokafka would retry it without end, holding the checkpoint (and a stop) behind it
    sink, group, tp = await sink_of_a_group(own_broker.bootstrap, "commits")
    try:
        await sink.commit({tp: 1})  # answered
        own_broker.pause()
        with structlog.testing.capture_logs() as logs:
            await asyncio.wait_for(sink.commit({tp: 2}), timeout=10)
    finally:
        own_broker.resume()
        await group.stop()
    assert [entry["event"] for entry in logs] == ["offset commit failed, will retry"]


async def test_a_checkpoint_the_group_does_not_vouch_for_writes_nothing_and_keeps_its_accounts(
        ) -> None:
    checkpointer, engine = make()
    deposit(engine, "alice", 100.0, 0, 1)
    recorder = Recorder(owner=[False])
    # no error: the rebalance sorts it out
    assert await checkpointer.checkpoint({0}, recorder) is False
    assert recorder.steps() == ["settled 0", "fence"]
    assert checkpointer.seq == 0
    assert engine.take_dirty().keys == ["alice"]


async def test_the_question_commits_no_offset_for_a_partition_never_checkpointed() -> None:
    """A crash after it, before the first control record, must not leave the group holding
    offsets only a checkpoint commits (a restart would take the changelog for lost)."""
    checkpointer, engine = make()
    deposit(engine, "alice", 100.0, 0, 1)
    recorder = Recorder(owner=[False])
    await checkpointer.checkpoint({0}, recorder)
    assert recorder.calls[1] == ("fence", {TopicPartition("fills", 0): NO_OFFSET,
                                           TopicPartition("ledger", 0): NO_OFFSET})


async def test_the_question_commits_the_checkpoint_offsets_once_one_was_written() -> None:
    checkpointer, engine = make()
    deposit(engine, "alice", 100.0, 0, 1)
    checkpointer.restored_after(0, NO_RESET, read_to=10, checkpointed=True)
    recorder = Recorder(owner=[False])
    await checkpointer.checkpoint({0}, recorder)
    assert recorder.calls[1] == ("fence", {TopicPartition("fills", 0): 7,
                                           TopicPartition("ledger", 0): 3})


async def test_the_group_is_asked_again_once_its_word_is_older_than_half_the_session() -> None:
    checkpointer, engine = make(session_timeout_ms=100)  # a yes stands 50 ms
    more_than_a_chunk(engine)
    recorder = SlowEvents(seconds=0.06)
    await checkpointer.checkpoint({0}, recorder)
    assert recorder.steps() == [
        "settled 0", "fence", "deliver layout×1", "deliver account×256", "settled 0", "fence",
        "deliver account×44", "settled 0", "fence", "deliver control×1", "commit"]


async def test_when_the_group_stops_vouching_mid_checkpoint_the_rest_is_not_written() -> None:
    checkpointer, engine = make(session_timeout_ms=100)
    more_than_a_chunk(engine)
    recorder = SlowEvents(seconds=0.06, owner=[True, False])
    await checkpointer.checkpoint({0}, recorder)
    assert recorder.steps() == [
        "settled 0", "fence", "deliver layout×1", "deliver account×256", "settled 0", "fence"]
    assert checkpointer.seq == 0  # no control record vouches for the chunk written
    assert len(engine.take_dirty()) == CHECKPOINT_CHUNK + 44  # all written again next time


async def test_the_groups_word_is_not_taken_for_partitions_not_assigned_here() -> None:
    group = AIOKafkaConsumer(group_id="never-started")  # assigned nothing
    sink = KafkaSink(cast(Pipeline, None), group, structlog.get_logger(), commit_timeout=1.0)
    with structlog.testing.capture_logs() as logs:
        assert await sink.fence({TopicPartition("fills", 0): 7}) is False
    assert [entry["event"] for entry in logs] == [
        "checkpoint not written: none of its partitions is assigned here"]


async def test_a_group_that_does_not_answer_does_not_vouch(own_broker) -> None:
    sink, group, tp = await sink_of_a_group(own_broker.bootstrap, "fence")
    try:
        assert await sink.fence({tp: 1}) is True
        own_broker.pause()
        with structlog.testing.capture_logs() as logs:
            assert await asyncio.wait_for(sink.fence({tp: 1}), timeout=10) is False
    finally:
        own_broker.resume()
        await group.stop()
    assert [entry["event"] for entry in logs] == [
        "checkpoint not written: the group did not confirm that this instance still owns its "
        "partitions, will retry"]


# -- the control record's size ---------------------------------------------------------------------

LIMIT = control_record_limit(None)  # 1,032,204 bytes: Kafka's default max.message.bytes, less room


def long_ids(count: int, seed: int, length: int = 64) -> list[tuple[str, str]]:
    """(account, entry id) pairs of ``length`` random hex characters each (zstd gets them to
    about half)."""
    rng = random.Random(seed)
    return [(rng.randbytes(length // 2).hex(), rng.randbytes(length // 2).hex())
            for _ in range(count)]


def test_a_control_record_within_the_limit_is_written_whole() -> None:
    control = Control(seq=1, written_at=0, offsets={}, prices={},
                      dedupe={("ledger", 0): long_ids(100, 1)})
    value, dropped = encoded_within(control, LIMIT)
    assert dropped == 0
    assert decode_control(value).dedupe == control.dedupe


def test_a_control_record_over_the_limit_keeps_the_newest_ids_of_each_window_alike() -> None:
    """Two full windows of 64-character ids: ~2.8 MB of JSON, ~1.5 MB framed. The record
    keeps the same share of each window, the newest ids, within the limit."""
    fills, ledger = long_ids(10_000, 1), long_ids(10_000, 2)
    control = Control(seq=1, written_at=0, offsets={}, prices={},
                      dedupe={("fills", 0): fills, ("ledger", 0): ledger})
    value, dropped = encoded_within(control, LIMIT)
    kept = decode_control(value).dedupe
    assert len(value) <= LIMIT
    assert 0 < len(kept["fills", 0]) == len(kept["ledger", 0]) < 10_000
    assert kept["fills", 0] == fills[-len(kept["fills", 0]):]
    assert kept["ledger", 0] == ledger[-len(kept["ledger", 0]):]
    assert dropped == 20_000 - 2 * len(kept["fills", 0])
    assert len(value) > 0.8 * LIMIT  # not cut far below what fits


async def test_a_checkpoint_with_long_ids_cuts_the_record_s_windows_not_the_engine_s() -> None:
    """A Kafka broker refuses a record over the topic's max.message.bytes (1 MB by default)
    for good, and the instance would stop at every checkpoint. One full window of 128-character
    ids, ~2.6 MB of JSON: the control record holds fewer ids instead, and the sink is told how
    many it left out."""
    checkpointer, engine = make(owned=(0,))
    for n, (account, entry_id) in enumerate(long_ids(10_000, 3, length=128)):
        engine.apply(LedgerEntry(entry_id, account, "USDT", 1.0, "deposit", 1),
                     Source(TOPICS.ledger, 0, n))
    recorder = Recorder()
    await checkpointer.checkpoint({0}, recorder)
    (control,) = recorder.delivered("control")
    kept = decode_control(control.value).dedupe["ledger", 0]
    assert len(control.value) <= LIMIT
    assert ("windows_cut", (0, 10_000 - len(kept), len(kept), LIMIT)) in recorder.calls
    assert kept == engine.dedupe_ids(TOPICS.ledger, 0)[-len(kept):]
    assert len(engine.dedupe_ids(TOPICS.ledger, 0)) == 10_000  # the running window stays whole


def test_windows_cut_is_said_once_in_ten_minutes() -> None:
    sink = KafkaSink(cast(Pipeline, None), cast(AIOKafkaConsumer, None), structlog.get_logger(),
                     commit_timeout=1.0)
    with structlog.testing.capture_logs() as logs:
        sink.windows_cut(0, 6_000, 4_000, LIMIT)
        sink.windows_cut(1, 6_100, 3_900, LIMIT)
    (line,) = logs
    assert line["log_level"] == "warning"
    assert line == {**line, "partition": 0, "ids_left_out": 6_000, "ids_kept": 4_000,
                    "limit_bytes": LIMIT}
