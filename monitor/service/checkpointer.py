"""Checkpoints (SPEC §6): the changed accounts of this instance's partitions and the input
offsets their state reflects, written to the compacted changelog behind the loop.

`Checkpointer` decides what a checkpoint holds and in which order it is written; it writes
through a `CheckpointSink` — in the service `KafkaSink`: the pipeline whose events must be
acknowledged first, the producer, the consumer group's committed offsets — so that the rules
can be checked against a sink of plain Python objects.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Protocol

import numpy as np
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import CommitFailedError, KafkaError
from structlog.stdlib import BoundLogger

from monitor.account import RiskKey
from monitor.engine import DirtyUnits, Engine
from monitor.reference import ReferenceEngine
from monitor.service.changelog import (
    NO_RESET,
    Stretch,
    collector,
    control_message,
    controls_now,
    read_stretches,
    snapshot_messages,
)
from monitor.service.delivery import Pipeline
from monitor.service.metrics import Metrics
from monitor.service.outbox import Outgoing
from monitor.service.positions import Positions
from monitor.service.settings import ServiceSettings
from monitor.service.tasks import cancel_and_wait
from monitor.service.topics import control_record_limit
from monitor.snapshot import Control, Offsets, risk_key

CHECKPOINT_CHUNK = 256  # snapshots encoded at a time
# A checkpoint's turn (between two batches of the loop) may work for up to this share of the
# time the loop took to apply its last batch, and always does a chunk. At a modest rate a
# batch takes well under a millisecond: a chunk a turn, so that a tick waits for one chunk at
# most. Draining a backlog, batches take tens of milliseconds, and at a chunk a turn a
# checkpoint begun in a backlog hardly moved until the backlog was drained (the bench's,
# 1,000,000 accounts: 78,000 dirty, 2 s into a 7 s drain, done 0.9 s after it). So do live
# batches at tens of thousands of records a second; there a chunk a turn made checkpoints
# 2.5x slower and the ticks' p99 no better (bench, half the sustained rate).
CHECKPOINT_SHARE = 0.5
NEVER = float("-inf")
# What a fence commits for an input partition whose changelog partition has no control record
# yet: what the group reads back as no committed offset at all (Kafka stores any number).
NO_OFFSET = -1
# How long a checkpoint waits for the changelog's end offsets (`_follow_resets`) before it
# goes on without looking: the next one looks again, and a stop in an outage is not held up.
ENDS_TIMEOUT = 1.0
# Bytes of control records delivered together (`Checkpointer._write_controls`): held in memory
# meanwhile, ~0.1-1 MB each.
CONTROLS_AT_ONCE = 8 * 1024 * 1024
# Seconds between two warnings that control records' duplicate windows were cut (said once a
# checkpoint: every checkpoint cuts them while the ids stay long).
WINDOWS_CUT_LOG_INTERVAL = 600.0


class CheckpointSink(Protocol):
    """Where a checkpoint goes, and what it waits for."""

    async def deliver(self, messages: Sequence[Outgoing]) -> list[tuple[int, int]]:
        """Produce changelog records; return once every one is acknowledged, with the
        (partition, offset) each was written at."""

    def mark(self) -> int:
        """A point in the stream of event batches: everything handed over so far."""

    async def settled(self, mark: int) -> None:
        """Return once every event batch handed over before ``mark`` is acknowledged."""

    async def commit(self, offsets: dict[TopicPartition, int]) -> None:
        """Record checkpointed input offsets where lag tooling looks for them."""

    async def fence(self, offsets: dict[TopicPartition, int]) -> bool:
        """Whether the group still counts this instance as the owner of its partitions, asked
        now (``offsets``: what the checkpoint vouches for, a commit being the question)."""

    async def changelog_ends(self, partitions: Sequence[int]) -> dict[int, int] | None:
        """The end offsets of these changelog partitions now (None: not known now)."""

    async def read_stretches(self, ranges: dict[int, tuple[int, int]]
                             ) -> dict[int, Stretch] | None:
        """Each changelog partition's offset range [start, end), read as a `Stretch`
        (None: not read now)."""

    def lost_records(self, partition: int, end: int, written_to: int) -> None:
        """Say that a changelog partition ends at ``end``, before ``written_to``, the end of
        the records this instance saw acknowledged there."""

    def written_by_others(self, partition: int, units: int) -> None:
        """Say that records another instance wrote to a changelog partition this one owns
        name ``units`` units, written again in the checkpoint under way."""

    def windows_cut(self, partition: int, dropped: int, kept: int, limit: int) -> None:
        """Say that a control record of ``partition`` left out the ``dropped`` oldest ids of
        its duplicate windows, keeping ``kept``, to fit the changelog's record size
        (``limit`` bytes)."""


class NotOwner(Exception):
    """The group no longer vouches for this instance: what the checkpoint has not written yet
    must not be written (see `Checkpointer.checkpoint`)."""


class KafkaSink:
    """The service's `CheckpointSink`: the pipeline of events, the producer behind it (acks=all,
    retried), and the group consumer's committed offsets."""

    def __init__(self, pipeline: Pipeline, group: AIOKafkaConsumer, log: BoundLogger,
                 commit_timeout: float, probe: AIOKafkaConsumer | None = None,
                 settings: ServiceSettings | None = None) -> None:
        self._pipeline = pipeline
        self._group = group
        self.log = log
        self._commit_timeout = commit_timeout
        self._probe = probe  # asks the changelog's end offsets (`changelog_ends`)
        self._settings = settings  # where `read_stretches` reads the changelog
        # the last `fence` got no answer (the broker away), rather than a no
        self.unanswered = False
        self._cut_said_at = NEVER  # when `windows_cut` last said so

    async def deliver(self, messages: Sequence[Outgoing]) -> list[tuple[int, int]]:
        return await self._pipeline.delivery.deliver(messages)

    def mark(self) -> int:
        return self._pipeline.mark()

    async def settled(self, mark: int) -> None:
        await self._pipeline.settled(mark)

    async def commit(self, offsets: dict[TopicPartition, int]) -> None:
        """Mirror checkpointed offsets into the consumer group, for lag tooling. The
        changelog, not the group, is where a restart resumes from."""
        offsets = self._assigned(offsets)
        if not offsets:
            return
        try:
            await self._commit_in_time(offsets)
        except (KafkaError, TimeoutError) as exc:  # the next checkpoint commits again
            self.log.warning("offset commit failed, will retry", error=repr(exc))

    async def fence(self, offsets: dict[TopicPartition, int]) -> bool:
        """A commit of ``offsets`` as the question: the group coordinator accepts one only
        from a member of its current generation, so it refuses an instance it has replaced
        (one frozen or cut off past its session timeout), whatever that instance believes
        it owns. No answer in time proves nothing either."""
        self.unanswered = False
        offsets = self._assigned(offsets)
        if not offsets:
            self.log.warning("checkpoint not written: none of its partitions is assigned here")
            return False
        try:
            await self._commit_in_time(offsets)
        except CommitFailedError as exc:
            self.log.warning("checkpoint not written: the group has replaced this instance "
                             "(no heartbeat within its session timeout: the process frozen or "
                             "throttled, the network cut, or the event loop held up); the "
                             "rebalance says which partitions it keeps", error=repr(exc))
            return False
        except (KafkaError, TimeoutError) as exc:
            self.log.warning("checkpoint not written: the group did not confirm that this "
                             "instance still owns its partitions, will retry",
                             error=repr(exc))
            self.unanswered = True
            return False
        return True

    async def changelog_ends(self, partitions: Sequence[int]) -> dict[int, int] | None:
        if self._probe is None or self._settings is None:
            return None
        tps = [TopicPartition(self._settings.topics.state, p) for p in partitions]
        try:
            async with asyncio.timeout(min(ENDS_TIMEOUT, self._commit_timeout)):
                ends = await self._probe.end_offsets(tps)
        except (KafkaError, TimeoutError):  # asked again at the next checkpoint
            return None
        return {tp.partition: end for tp, end in ends.items()}

    async def read_stretches(self, ranges: dict[int, tuple[int, int]]
                             ) -> dict[int, Stretch] | None:
        s = self._settings
        if s is None:
            return None
        try:
            found = await read_stretches(
                s.bootstrap, s.topics.state, ranges, client_id=f"{s.client_id}-reset-check",
                request_timeout_ms=s.request_timeout_ms, security=s.security)
        except KafkaError as exc:  # read again at the next checkpoint
            self.log.warning("could not read what another instance wrote to the changelog, "
                             "will retry", partitions=sorted(ranges), error=repr(exc))
            return None
        for partition, stretch in sorted(found.items()):
            if stretch.reset_at != NO_RESET:
                self.log.warning(
                    "the changelog was reset (--reset-state) by another instance while this "
                    "one ran: every account of the partition is checkpointed again after the "
                    "reset", topic=s.topics.state, partition=partition,
                    reset_at=stretch.reset_at)
        return found

    def lost_records(self, partition: int, end: int, written_to: int) -> None:
        self.log.warning(
            "the changelog lost records this instance wrote (its topic was deleted and "
            "re-created, or truncated): every account of the partition is checkpointed again",
            topic=None if self._settings is None else self._settings.topics.state,
            partition=partition, end=end, written_to=written_to)

    def written_by_others(self, partition: int, units: int) -> None:
        self.log.warning(
            "the changelog holds records this instance did not see acknowledged since it last "
            "looked (a frozen instance's late snapshots, or a write of its own retried): the "
            "units they name are written again, so that compaction keeps this instance's "
            "states",
            topic=None if self._settings is None else self._settings.topics.state,
            partition=partition, units=units)

    def windows_cut(self, partition: int, dropped: int, kept: int, limit: int) -> None:
        now = time.monotonic()
        if now - self._cut_said_at < WINDOWS_CUT_LOG_INTERVAL:
            return
        self._cut_said_at = now
        self.log.warning(
            "duplicate windows cut to fit a control record: a restart from it recognises "
            "only the newest ids as duplicates (long fill or entry ids)", partition=partition,
            ids_kept=kept, ids_left_out=dropped, limit_bytes=limit)

    def _assigned(self, offsets: dict[TopicPartition, int]) -> dict[TopicPartition, int]:
        assigned = self._group.assignment()
        return {tp: o for tp, o in offsets.items() if tp in assigned}

    async def _commit_in_time(self, offsets: dict[TopicPartition, int]) -> None:
        """Commit, or raise TimeoutError after the commit timeout. aiokafka retries a
        retriable error (a request timed out, the coordinator moved) without end, and every
        checkpoint, the final one included, commits under the loop's lock: a commit the broker
        does not answer must not hold the loop, or a stop, there."""
        async with asyncio.timeout(self._commit_timeout):
            await self._group.commit(offsets)


class Checkpointer:
    """What goes into a checkpoint, when, and in which order.

    It keeps what a checkpoint needs besides the engine (which knows what changed, and where
    each changed unit lives) and the input positions: ``seq`` (the last checkpoint's sequence
    number), and how many records were applied since, and when, the last checkpoint covering
    every owned partition was taken.
    """

    def __init__(self, engine: Engine | ReferenceEngine, positions: Positions,
                 settings: ServiceSettings, metrics: Metrics, fingerprint: str) -> None:
        self.engine = engine
        self.positions = positions
        self.settings = settings
        self.metrics = metrics
        self.fingerprint = fingerprint
        self.seq = 0
        # per account partition, the reset marker its state follows (`restored_after`)
        self.reset_at: dict[int, int] = {}
        # account partitions this process has read or written a control record of: their
        # changelog cannot be empty unless its records were lost (`Restorer.refuse_lost_state`)
        self.checkpointed: set[int] = set()
        # Per account partition: the changelog offset before which every record is known to
        # be this instance's own or has been looked through for reset markers, and how many
        # records it has written there since (`_follow_resets`).
        self._verified_to: dict[int, int] = {}
        self._written: Counter[int] = Counter()
        # where this instance's records went since its last look at each changelog partition
        self._own: dict[int, OffsetRuns] = {}
        self.since_checkpoint = 0  # records applied since the last checkpoint began
        self.last_checkpoint = time.monotonic()  # when it began (the next is due from then)
        # When the oldest applied record no checkpoint holds was applied (None: none), and
        # the same of those the checkpoint being written holds, and how many it holds: what a
        # crash now would re-process (`age`), until a checkpoint holding them is written.
        self.unsaved_since: float | None = None
        self._saving_since: float | None = None
        self._being_saved = 0
        self.last_batch_seconds = 0.0  # how long the loop took to apply its last batch
        self._writing: asyncio.Task[bool] | None = None  # a checkpoint written behind the loop
        # how long a yes from `CheckpointSink.fence` stands: well inside the session timeout,
        # before which the group cannot give the partitions to another instance
        self._fence_lasts = settings.session_timeout_ms / 2000
        self._fenced_at = NEVER  # monotonic time the standing yes was asked
        # bytes a control record's value may take on the changelog (`ChangelogCheck`), set
        # once the start has asked the broker
        self.control_record_limit = control_record_limit(None)

    # -- what the loop and a restore tell it ------------------------------------------------------

    def applied(self, records: int, seconds: float = 0.0) -> None:
        """The loop applied this many more records, in ``seconds``."""
        self._unsaved(records)
        self.last_batch_seconds = seconds

    def _unsaved(self, records: int, since: float | None = None) -> None:
        """``records`` more applied, the first of them at ``since`` (now if not given)."""
        self.since_checkpoint += records
        if records:
            since = time.monotonic() if since is None else since
            if self.unsaved_since is None or since < self.unsaved_since:
                self.unsaved_since = since

    def resume(self, seq: int) -> None:
        """A restore read checkpoints up to ``seq``: the next one follows it."""
        self.seq = seq

    def restored_after(self, partition: int, reset_at: int, read_to: int, *,
                       checkpointed: bool = False) -> None:
        """A partition was restored from its changelog partition read up to ``read_to``, after
        the reset marker at ``reset_at`` (NO_RESET: none): its control records vouch for what
        follows that marker, and only that. ``checkpointed``: from a control record."""
        if checkpointed:
            self.checkpointed.add(partition)
        self.reset_at[partition] = reset_at
        self._verified_to[partition] = read_to
        self._written[partition] = 0
        self._own.pop(partition, None)

    def include(self, keys: Sequence[RiskKey], partition: int, records: int,
                since: float) -> None:
        """Risk units of ``partition`` changed outside the loop (by a catch-up's private
        engine, applying ``records`` from ``since`` on): the next checkpoint writes them,
        those forgotten as tombstones in ``partition``, and is due as if the loop had applied
        the records."""
        self.engine.mark_dirty(keys, partition=partition)
        self._unsaved(records, since)

    # -- when -------------------------------------------------------------------------------------

    def due(self) -> bool:
        if self.since_checkpoint >= self.settings.checkpoint_records:
            return True
        elapsed = time.monotonic() - self.last_checkpoint
        return self.since_checkpoint > 0 and elapsed >= self.settings.checkpoint_interval

    def age(self) -> float:
        """Seconds since the oldest applied record that no checkpoint written holds was
        applied (0: none): a checkpoint being written, or one that failed, saved nothing yet,
        and time with nothing applied (a rebalance, an idle input) is no record's age."""
        pending = [t for t in (self.unsaved_since, self._saving_since) if t is not None]
        return time.monotonic() - min(pending) if pending else 0.0

    def poll(self, sink: CheckpointSink) -> None:
        """Between two batches of the loop: raise what made the checkpoint written behind it
        fail, if one did; start the next one, as a task, if one is due."""
        if self._writing is not None and self._writing.done():
            written, self._writing = self._writing, None
            written.result()  # raise what made it fail
        if self._writing is None and self.due():
            self._writing = asyncio.create_task(self.checkpoint(set(self.positions.owned), sink))

    async def finish(self) -> None:
        """Wait for the checkpoint being written (a rebalance or a stop needs the state
        it took out of the dirty set written, or back in it)."""
        if self._writing is not None:
            writing, self._writing = self._writing, None
            await writing

    async def give_up(self) -> None:
        """Cancel the checkpoint being written and forget it, its accounts left dirty: the
        group has replaced this instance, and the word a checkpoint needs will not come."""
        if self._writing is not None:
            writing, self._writing = self._writing, None
            await cancel_and_wait(writing)

    async def abandon(self, within: float | None = None) -> None:
        """Cancel the checkpoint being written (cut short by a failure or the shutdown
        timeout); wait at most ``within`` seconds for it to end."""
        if self._writing is not None:
            await cancel_and_wait(self._writing, within=within)

    # -- what, in which order ---------------------------------------------------------------------

    async def checkpoint(self, partitions: set[int], sink: CheckpointSink) -> bool:
        """Write the changed accounts of these partitions, then their control records; False
        if the group did not vouch for this instance (below), and nothing more was written.

        What the control records vouch for — offsets, price table, duplicate windows — is
        captured at once; the snapshots are then encoded and produced a chunk at a time, so
        that the loop goes on applying records in between (run as a task it never blocks).
        A chunk is stamped with the offsets its state reflects when it is encoded, and is
        produced only once the events of those inputs are acknowledged; the control records
        go last. So nothing in the changelog runs ahead of what was published: at-least-once,
        never lossy (an account snapshot newer than its control record skips the re-read
        inputs it already reflects).

        Nothing is written without the group's word that this instance still owns its
        partitions (`CheckpointSink.fence`), asked first and again whenever the last yes is
        older than half the session timeout. An instance frozen past its session (a long
        pause, a throttled container, a stopped VM) wakes with a checkpoint due and accounts
        that are stale: the group gave its partitions to another instance, which restored them
        and moved on. Its snapshots, written now, would be the newest of those accounts, and
        the next restore of them would start from a state older than its offsets say. Without
        the word, the checkpoint stops where it is and its accounts stay dirty: the rebalance
        that follows says which partitions stay, and those handed over are dropped.
        """
        if not partitions:
            if not self.positions.owned:  # nothing to write: due again an interval on
                self.last_checkpoint = time.monotonic()
                if not (len(self.engine.accounts) or self.engine.units):
                    # a standby: ticks applied, nothing to save (partitions kept through a
                    # rebalance are not owned while the group decides, but their accounts
                    # are here, unsaved)
                    self.since_checkpoint = 0
                    self.unsaved_since = None
            return True
        collector.pause()  # its ~100,000 messages and futures would bring on full collections
        self._fenced_at = NEVER
        try:
            await self._checkpoint(partitions, sink)
        except NotOwner:
            return False  # the sink said why; what was written before was still true
        finally:
            collector.resume()
        return True

    async def _owner(self, sink: CheckpointSink, offsets: dict[TopicPartition, int]) -> None:
        """Raise NotOwner unless the group's last yes (`fence`) still stands or it says yes
        again now. The question commits the checkpoint's offsets, but NO_OFFSET for those of
        a partition that has no control record yet: committed offsets must mean that one was
        written (`Restorer.refuse_lost_state`), and a crash before it is not a lost
        changelog."""
        if time.monotonic() - self._fenced_at < self._fence_lasts:
            return
        asked = time.monotonic()
        if not await sink.fence({tp: offset if tp.partition in self.checkpointed else NO_OFFSET
                                 for tp, offset in offsets.items()}):
            raise NotOwner
        self._fenced_at = asked

    async def _follow_resets(self, sink: CheckpointSink, partitions: set[int]) -> None:
        """Take in a reset another instance wrote to these partitions' changelog since this
        one restored them (--reset-state left set on a fleet): every account of such a
        partition goes into the checkpoint about to be taken, whose control record then names
        that reset. Otherwise its checkpoints would hold only the accounts it changes, and a
        restore, finding none that vouches for the reset, would rebuild the partition from
        its inputs' start. And the units named by records written there since (a frozen
        predecessor's late snapshots, older than the states held here) go into it too:
        Kafka's compaction keeps a key's last record, and a restore after it would start
        from the older state.

        Only this instance writes to the changelog partitions it owns, so a partition whose
        end is where this instance's own records since the last look put it holds nothing
        else; one that has more (a reset, a frozen predecessor's late snapshots, a marker of
        the loop's, a record written twice by a retry) is read over that stretch.

        One that ends before the end seen at the last look has lost records every replica had
        acknowledged: the topic was deleted and re-created while this instance ran (or a
        leader without them was elected). It holds only what was written since, so every
        account of the partition goes into this checkpoint too, and the new log is read from
        its start for reset markers. Otherwise a restart would restore only the accounts
        changed since, and vouched for by a control record. The end seen last, not that plus
        what was written since: the embedded broker reports a log's end as its last batch's
        first offset + 1, short of a batch of snapshots a checkpoint stopped after (its
        control record, a batch of one, otherwise comes last)."""
        watched = sorted(p for p in partitions if p in self._verified_to)
        if not watched:
            return
        ends = await sink.changelog_ends(watched)
        if ends is None:
            return  # looked at again next time, over a longer stretch
        for p, end in ends.items():
            if end < self._verified_to[p]:
                sink.lost_records(p, end, self._verified_to[p] + self._written[p])
                self.engine.mark_partition_dirty(p)
                self.reset_at[p] = NO_RESET
                self._verified_to[p], self._written[p] = 0, 0
                self._own.pop(p, None)
        unexplained = {p: (self._verified_to[p], end) for p, end in ends.items()
                       if end != self._verified_to[p] + self._written[p]}
        stretches = await sink.read_stretches(unexplained) if unexplained else {}
        if stretches is None:
            ends = {p: end for p, end in ends.items() if p not in unexplained}
            stretches = {}
        for p, stretch in stretches.items():
            if stretch.reset_at > self.reset_at.get(p, NO_RESET):
                self.reset_at[p] = stretch.reset_at
                self.engine.mark_partition_dirty(p)
            # Compaction keeps a key's last record: it must be this owner's state, not what
            # another instance wrote late (held units get a snapshot, others a tombstone).
            own = self._own.get(p, OffsetRuns())
            theirs = _unit_keys(key for offset, key in stretch.units if offset not in own)
            if theirs:
                sink.written_by_others(p, len(theirs))
                self.engine.mark_dirty(theirs, partition=p)
        for p, end in ends.items():
            self._verified_to[p], self._written[p] = end, 0
            # the embedded broker may answer an end inside this instance's last batch
            self._own.setdefault(p, OffsetRuns()).drop_below(end)

    async def _checkpoint(self, partitions: set[int], sink: CheckpointSink) -> None:
        started = time.monotonic()
        t = self.settings.topics
        await self._follow_resets(sink, partitions)
        taken = self.engine.take_dirty()
        as_of = self.as_of(partitions)
        seq = self.seq + 1
        controls = controls_now(self.engine, seq, as_of, t, int(time.time() * 1000),
                                self.fingerprint)
        vouched = sink.mark()
        whole = partitions >= self.positions.owned
        if whole:
            self._being_saved, self.since_checkpoint = self.since_checkpoint, 0
            self._saving_since, self.unsaved_since = self.unsaved_since, None
            self.last_checkpoint = time.monotonic()
        vouched_offsets = self._input_offsets(as_of)
        try:
            # Which of them this checkpoint writes (a hand-over waits for this checkpoint, so
            # no partition changes owner meanwhile); the others stay dirty.
            ours = np.isin(taken.partitions, sorted(partitions))
            mine = taken if ours.all() else taken.subset(np.flatnonzero(ours))
            if mine is not taken:
                others = taken.subset(np.flatnonzero(~ours))
                self.engine.mark_dirty(others.keys, others.rows)
            await self._write_snapshots(sink, mine, seq, vouched_offsets)
            await sink.settled(vouched)
            await self._write_controls(sink, controls, vouched_offsets)
        except BaseException:
            self.engine.mark_dirty(taken.keys, taken.rows)
            if whole:  # still to save: due again an interval after this attempt began
                self.since_checkpoint += self._being_saved
                if self._saving_since is not None:
                    self.unsaved_since = min(self._saving_since,
                                             self.unsaved_since or self._saving_since)
                self._being_saved, self._saving_since = 0, None
            raise
        if whole:
            self._being_saved, self._saving_since = 0, None
        self.seq = seq
        self.metrics.checkpoint_duration.observe(time.monotonic() - started)
        self.metrics.last_checkpoint.set(time.time())
        await sink.commit(vouched_offsets)

    async def _write_controls(self, sink: CheckpointSink, controls: dict[int, Control],
                              vouched_offsets: dict[TopicPartition, int]) -> None:
        """The control records, once the snapshots are acknowledged: encoded one at a time,
        each followed by a pause as long as it took (with ~20,000 window ids one took ~15 ms
        on the loop before they were zstd frames, ~2 ms now; back to back, the ticks arriving
        meanwhile waited for all of them), and delivered together, `CONTROLS_AT_ONCE` bytes
        at most: one acknowledgement to wait for, not one per partition (one at a time, a
        checkpoint of 128 partitions took 4 s, near the interval)."""
        t = self.settings.topics
        lot: list[tuple[int, Outgoing]] = []
        size = 0
        for partition, control in controls.items():
            encoding = time.monotonic()
            message, dropped = control_message(partition, control, t,
                                               self.reset_at.get(partition, NO_RESET),
                                               self.control_record_limit)
            if dropped:
                sink.windows_cut(partition, dropped, sum(map(len, control.dedupe.values()))
                                 - dropped, self.control_record_limit)
            encoded = len(message.value or b"")
            if lot and size + encoded > CONTROLS_AT_ONCE:
                await self._deliver_controls(sink, lot, vouched_offsets)
                lot, size = [], 0
            lot.append((partition, message))
            size += encoded
            await asyncio.sleep(time.monotonic() - encoding)
        if lot:
            await self._deliver_controls(sink, lot, vouched_offsets)

    async def _deliver_controls(self, sink: CheckpointSink, lot: list[tuple[int, Outgoing]],
                                vouched_offsets: dict[TopicPartition, int]) -> None:
        await self._owner(sink, vouched_offsets)
        self._count_written(await sink.deliver([message for _, message in lot]))
        self.checkpointed.update(partition for partition, _ in lot)

    async def _write_snapshots(self, sink: CheckpointSink, mine: DirtyUnits, seq: int,
                               vouched_offsets: dict[TopicPartition, int]) -> None:
        """Snapshots of ``mine``, a turn's work at a time (`_encode`: a chunk live, more
        while the loop drains a backlog), each lot produced once the events of what it
        reflects are acknowledged, the next lot encoded meanwhile. One lot is in
        flight at a time, so a layout is acknowledged before any snapshot after it. Waiting
        for each chunk before encoding the next (two round trips, each several turns of a
        loop draining a backlog), a checkpoint begun during a backlog made next to no
        progress until it was drained."""
        ids = mine.keys
        written: set[tuple[int, int]] = set()  # (partition, layout id) written this time
        encoded = 0  # ids[:encoded] are encoded
        layouts: list[Outgoing] = []  # the next lot, gathered while one is produced
        snapshots: list[Outgoing] = []
        mark = 0  # the pipeline's mark when the newest of them was encoded
        producing: asyncio.Task[None] | None = None
        in_flight = 0, 0  # where in ids the lot being produced starts and ends
        try:
            while encoded < len(ids) or producing is not None or encoded > in_flight[1]:
                # a turn's work at most waits while a lot is produced: live, a chunk (the
                # producer also carries the events); draining a backlog, a turn's budget
                gathering = encoded < len(ids) and (producing is None or encoded == in_flight[1])
                if gathering:
                    more_layouts, more_snapshots, encoded = self._encode(mine, encoded, seq,
                                                                         written)
                    layouts += more_layouts
                    snapshots += more_snapshots
                    mark = sink.mark()
                if producing is not None and producing.done():
                    producing.result()  # raise what made it fail
                    producing = None
                if producing is None and encoded > in_flight[1]:
                    producing = asyncio.create_task(
                        self._produce(sink, layouts, snapshots, mark, vouched_offsets))
                    in_flight, layouts, snapshots = (in_flight[1], encoded), [], []
                if gathering:
                    await asyncio.sleep(0)  # a turn of the loop, then more
                elif producing is not None:
                    await asyncio.wait([producing])
        finally:
            if producing is not None:
                await cancel_and_wait(producing)

    def _encode(self, mine: DirtyUnits, start: int, seq: int, written: set[tuple[int, int]]
                ) -> tuple[list[Outgoing], list[Outgoing], int]:
        """The snapshots of ``mine`` from ``start`` on that one turn's budget encodes (a chunk
        at least), and the layouts they need not yet in ``written``; where they end."""
        t = self.settings.topics
        layouts: list[Outgoing] = []
        snapshots: list[Outgoing] = []
        began, budget, end = time.perf_counter(), self._turn_budget(), start
        while end < len(mine) and (end == start or time.perf_counter() - began < budget):
            chunk = mine.slice(end, end + CHECKPOINT_CHUNK)
            # those handed over meanwhile: the checkpoint before the hand-over wrote them
            owned = np.isin(chunk.partitions, sorted(self.positions.owned))
            if not owned.all():
                chunk = chunk.subset(np.flatnonzero(owned))
            chunk_layouts, chunk_snapshots = snapshot_messages(
                self.engine, chunk, seq, self.as_of(set(chunk.partitions.tolist())), t,
                written)
            layouts += chunk_layouts
            snapshots += chunk_snapshots
            end += CHECKPOINT_CHUNK
        return layouts, snapshots, min(end, len(mine))

    async def _produce(self, sink: CheckpointSink, layouts: list[Outgoing],
                       snapshots: list[Outgoing], mark: int,
                       vouched_offsets: dict[TopicPartition, int]) -> None:
        """One lot of snapshots, once the events of what they reflect are acknowledged."""
        await sink.settled(mark)
        await self._owner(sink, vouched_offsets)
        if layouts:  # acknowledged first: no snapshot is ever without its layout
            self._count_written(await sink.deliver(layouts))
        self._count_written(await sink.deliver(snapshots))

    def _count_written(self, written: list[tuple[int, int]]) -> None:
        """Changelog records of this instance acknowledged at (partition, offset): how many
        per partition, and where (`_follow_resets` tells its own records from others')."""
        for partition, offset in written:
            self._written[partition] += 1
            if partition in self._verified_to:  # looked at: kept until the next look
                self._own.setdefault(partition, OffsetRuns()).add(offset)

    def _turn_budget(self) -> float:
        """Seconds of checkpoint work one turn of the loop may take (`CHECKPOINT_SHARE`)."""
        return CHECKPOINT_SHARE * self.last_batch_seconds

    def _input_offsets(self, as_of: dict[int, Offsets]) -> dict[TopicPartition, int]:
        """The fills and ledger offsets a checkpoint vouches for: what it commits."""
        prices = self.settings.topics.prices
        return {TopicPartition(topic, p): offset for p, offsets in as_of.items()
                for (topic, _), offset in offsets.items() if topic != prices}

    def as_of(self, partitions: set[int]) -> dict[int, Offsets]:
        """Per account partition: the input offsets its state reflects now (its own fills and
        ledger, and every price partition)."""
        t = self.settings.topics
        processed = self.positions.processed
        prices = {(tp.topic, tp.partition): offset for tp, offset in processed.items()
                  if tp.topic == t.prices}
        as_of: dict[int, Offsets] = {}
        for partition in partitions:
            offsets = dict(prices)
            for topic in (t.fills, t.ledger):
                tp = TopicPartition(topic, partition)
                if tp in processed:
                    offsets[(topic, partition)] = processed[tp]
            as_of[partition] = offsets
        return as_of


def _unit_keys(keys: Iterable[bytes]) -> list[RiskKey]:
    """The units changelog record keys name, each once; a key that is not UTF-8 is none of
    liqmon's (a stray producer's) and names none."""
    units: dict[RiskKey, None] = {}
    for key in keys:
        try:
            units[risk_key(key)] = None
        except UnicodeDecodeError:
            continue
    return list(units)


class OffsetRuns:
    """Offsets of one partition as runs [start, end): a checkpoint's records are written
    batch after batch, so a million offsets take a few runs, not a set of a million ints."""

    def __init__(self) -> None:
        self._starts: list[int] = []
        self._ends: list[int] = []

    def add(self, offset: int) -> None:
        if self._ends and self._ends[-1] == offset:
            self._ends[-1] = offset + 1
        else:  # acknowledged in order but for retries: a run of its own
            self._starts.append(offset)
            self._ends.append(offset + 1)

    def __contains__(self, offset: int) -> bool:
        return any(start <= offset < end
                   for start, end in zip(self._starts, self._ends, strict=True))

    def drop_below(self, offset: int) -> None:
        kept = [(max(start, offset), end) for start, end in zip(self._starts, self._ends,
                                                                strict=True) if end > offset]
        self._starts = [start for start, _ in kept]
        self._ends = [end for _, end in kept]
