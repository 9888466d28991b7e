"""Restore (SPEC §6): the account partitions the group hands this instance are read back from
the changelog, installed, and their inputs resume right after the checkpointed offsets.

On the first assignment the price table and the price offsets come from the restored control
records. A partition gained later, whose last owner checkpointed at an earlier point of the
price stream than this instance has reached, is caught up first: its records are replayed
with the ticks in between, on a private engine, as a single instance would have applied them.

`Restorer` makes these decisions on `RestoredPartition`s (changelog.py) and the shared
`Positions`; reading the changelog, seeking the consumers and the catch-up's reader are the
thin parts that need the broker.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import Awaitable, Callable, Collection, Hashable, Mapping, Sequence

from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from aiokafka.errors import KafkaError, KafkaTimeoutError, RequestTimedOutError
from structlog.stdlib import BoundLogger

from monitor.account import RiskKey, UnitKey
from monitor.config import RiskConfig, instrument_after_slash
from monitor.engine import DirtyUnits, Engine
from monitor.errors import LiqmonError
from monitor.reference import ReferenceEngine
from monitor.service.changelog import (
    NO_RESET,
    ConfigChanged,
    RestoredPartition,
    RestoreProgress,
    StateLost,
    read_changelog,
)
from monitor.service.checkpointer import Checkpointer
from monitor.service.clients import Clients, position_now, stop_consumer
from monitor.service.merge import TimestampMerge
from monitor.service.metrics import Metrics
from monitor.service.pacing import TurnPacer
from monitor.service.positions import Positions
from monitor.service.settings import ServiceSettings
from monitor.snapshot import Offsets

READ_RETRY_INTERVAL = 1.0  # seconds between reads of the changelog while the broker is away

# Applies records to an engine and delivers their events and dead letters (acknowledged when
# it returns): what the loop does to a batch, done by a catch-up to its private engine.
Replay = Callable[[Sequence[tuple[TopicPartition, ConsumerRecord]], Engine], Awaitable[None]]


class SplitAssignment(LiqmonError):
    """The group gave this instance an account partition's fills without its ledger (or the
    reverse): an instance of the group uses an assignor that does not keep them together
    (liqmon's and the range assignor do)."""


class RestoreAbandoned(Exception):
    """A restore under way gave up the partitions it had not taken yet: the instance is
    stopping, or the group began another rebalance (the message says which)."""


def staying(kept: Collection[int], revoked_in: int, assigned_in: int,
            assigned: Collection[int]) -> list[int]:
    """Which account partitions kept in memory through a rebalance (revoked in group
    generation ``revoked_in``, checkpointed) go on where they were under the assignment of
    generation ``assigned_in``: those it gives back, if it is the very next generation. Any
    generation between the two may have given them to another instance, whose work the
    memory here lacks. A generation of -1 is aiokafka's "none" (the group expelled this
    instance)."""
    if revoked_in < 0 or assigned_in != revoked_in + 1:
        return []
    return sorted(set(kept) & set(assigned))


class CatchUpWatch:
    """Says when a catch-up stops making progress, and what it waits for.

    A catch-up reads every partition it needs to its end however long that takes: releasing
    records early would apply them in another order than the first pass and publish events
    with its ids but other contents. It also holds the loop (one batch or rebalance step at a
    time), so a partition the broker stops serving stops every account's monitoring. That must
    not be silent: after ``max_stall`` seconds without a record read or applied, the partitions
    not read to their end are reported stalled — an error line, `liqmon_input_stalled` 1 for
    each, and /readyz's reason — and reported again when the catch-up moves on.
    """

    def __init__(self, partitions: Sequence[int], max_stall: float, log: BoundLogger,
                 metrics: Metrics, clock: Callable[[], float] = time.monotonic) -> None:
        self.partitions = list(partitions)  # the account partitions being caught up
        self.max_stall = max_stall
        self.applied = 0  # records replayed so far
        # partitions reported stalled: (read up to, the end the catch-up reads to)
        self.stalled: dict[TopicPartition, tuple[int, int | None]] = {}
        self._log = log
        self._metrics = metrics
        self._clock = clock
        self._read: dict[TopicPartition, int] = {}
        self._since = clock()  # when the catch-up last read or applied anything
        self._quiet_for = 0.0

    def observe(self, read: Mapping[TopicPartition, int], applied: int,
                unread: Mapping[TopicPartition, tuple[int, int | None]]) -> None:
        """After each step: how far each partition is read, the records applied so far, and
        the partitions not read to their end yet as (read up to, end; None: not known)."""
        now = self._clock()
        self._quiet_for = now - self._since
        if read != self._read or applied != self.applied:
            if self.stalled:
                self._log.info("catch-up delivers again", partitions=self.partitions,
                               stalled_seconds=round(self._quiet_for, 1))
                self.clear()
            self._read, self.applied, self._since, self._quiet_for = dict(read), applied, now, 0
            return
        if not self.stalled and unread and self._quiet_for >= self.max_stall:
            self.stalled = dict(unread)
            self._log.error(
                "catch-up stalled: the partitions it must read to their end deliver nothing; "
                "the catch-up, and the loop behind it, wait for them",
                partitions=self.partitions, records_replayed=applied,
                seconds_without_progress=round(self._quiet_for, 1),
                waiting_on=[{"topic": tp.topic, "partition": tp.partition, "read_to": read_to,
                             "end": end} for tp, (read_to, end) in sorted(unread.items())])
            for tp in self.stalled:
                self._metrics.input_stalled.labels(tp.topic, str(tp.partition)).set(1)

    def clear(self, keep: Collection[TopicPartition] = ()) -> None:
        """Remove the stalled gauges this watch set, but those of ``keep`` (partitions the
        loop's merge holds stalled: their gauge is the loop's)."""
        for tp in self.stalled.keys() - set(keep):
            with contextlib.suppress(KeyError):
                self._metrics.input_stalled.remove(tp.topic, str(tp.partition))
        self.stalled = {}

    def describe(self) -> str:
        """What the catch-up is doing, for /readyz."""
        which = (f"partition {self.partitions[0]}" if len(self.partitions) == 1 else
                 f"partitions {', '.join(map(str, self.partitions))}")
        said = f"catching up account {which}: {self.applied:,} records replayed"
        if not self.stalled:
            return said
        waiting = ", ".join(f"{tp.topic}/{tp.partition} (read to {read_to}, end "
                            f"{'unknown' if end is None else end})"
                            for tp, (read_to, end) in sorted(self.stalled.items()))
        return (f"{said}; stalled for {self._quiet_for:.0f} s waiting for {waiting}, which the "
                "broker does not deliver")


class Restorer:
    """Restores the account partitions the group assigns to this instance.

    ``abandon`` says why a restore under way should give up the partitions it has not taken
    yet (`RestoreAbandoned`), or None: it is asked between partitions, as the changelog is
    read and as a catch-up replays. ``replay`` is how a catch-up applies and delivers
    records (see `Replay`). The accounts it restores go into ``engine``; the positions it
    seeks, and the partitions it takes, into ``positions``; the checkpoint sequence it read,
    and what a catch-up changed, to ``checkpointer``. ``catching_up`` watches the catch-up
    under way, if any (`CatchUpWatch`).
    """

    def __init__(self, settings: ServiceSettings, config: RiskConfig,
                 engine: Engine | ReferenceEngine, positions: Positions,
                 checkpointer: Checkpointer, clients: Clients, metrics: Metrics,
                 fingerprint: str, log: BoundLogger, abandon: Callable[[], str | None],
                 replay: Replay, pacer: TurnPacer | None = None) -> None:
        self.settings = settings
        self.config = config
        self.engine = engine
        self.positions = positions
        self.checkpointer = checkpointer
        self.clients = clients
        self.metrics = metrics
        # input partitions and the checkpointed offsets found deleted, said (`starting_at`)
        self._lost_said: set[tuple[TopicPartition, int]] = set()
        self.fingerprint = fingerprint
        self.log = log
        self._abandon = abandon
        self._replay = replay
        # how many records a catch-up applies at a time (``replay`` tells it what they cost)
        self._pacer = pacer or TurnPacer(settings.max_batch_records)
        self.catching_up: CatchUpWatch | None = None
        self.prices_positioned = False  # by `restore_prices`, once per process

    def gained(self, assigned: set[TopicPartition]) -> list[int]:
        """The account partitions of an assignment that are not held yet. The group must
        assign fills p and ledger p together (`monitor.service.assignor`)."""
        t = self.settings.topics
        fills = {tp.partition for tp in assigned if tp.topic == t.fills}
        ledger = {tp.partition for tp in assigned if tp.topic == t.ledger}
        if fills != ledger:
            raise SplitAssignment(
                f"the group assigned fills partitions {sorted(fills)} but ledger partitions "
                f"{sorted(ledger)}: every member of group {self.settings.group!r} must be a "
                "liqmon instance (whose assignors keep an account's fills and ledger together)"
            )
        return sorted(fills - self.positions.owned)

    async def read(self, partitions: list[int], progress: Callable[[RestoreProgress], None]
                   ) -> dict[int, RestoredPartition]:
        """What the changelog holds for these partitions (``progress`` as it reads). A broker
        out of reach is waited for, the read starting again each `READ_RETRY_INTERVAL`,
        until it answers or the restore is abandoned: nothing is taken before the whole read,
        and the instance lives on through the outage as it does when consuming."""
        s = self.settings

        def reading(status: RestoreProgress) -> None:
            self._give_up_if_asked()
            progress(status)

        while True:
            try:
                return await read_changelog(s.bootstrap, s.topics.state, partitions,
                                            client_id=f"{s.client_id}-restore",
                                            request_timeout_ms=s.request_timeout_ms,
                                            progress=reading, security=s.security)
            except KafkaError as exc:
                if not exc.retriable:
                    raise
                self.log.warning("restore could not read the changelog, retrying",
                                 partitions=partitions, error=repr(exc))
            await asyncio.sleep(READ_RETRY_INTERVAL)
            self._give_up_if_asked()

    def _give_up_if_asked(self) -> None:
        reason = self._abandon()
        if reason is not None:
            raise RestoreAbandoned(reason)

    async def restore(self, gained: list[int], restored: dict[int, RestoredPartition], *,
                      prices: AIOKafkaConsumer, accounts: AIOKafkaConsumer,
                      price_partitions: int) -> tuple[int, int, int]:
        """Take the gained partitions, read from the changelog as ``restored``: the price
        table and price positions too, the first time (an attempt abandoned after that, for a
        rebalance, may have taken partitions that go on from there). Returns how many cross
        accounts and isolated positions were restored (as `liqmon_accounts` and
        `liqmon_isolated_positions_by_state` count them) and how many records a catch-up
        replayed."""
        first = not self.prices_positioned
        self.check_config(restored)
        await self.refuse_lost_state(gained, restored, accounts.committed)
        self.say_unvouched(restored)
        restored = {partition: part.vouched() for partition, part in restored.items()}
        self.say_refused_ids(restored)
        if first:
            await self.restore_prices(list(restored.values()), prices, price_partitions)
        behind = self.to_catch_up(gained, restored, first)
        # where the partitions installed as checkpointed resume, asked of the broker at once
        # for those never checkpointed: one by one, 128 partitions took 3.6 s
        resume = await self.starting_at(accounts, {
            tp: offset for partition in gained if partition not in behind
            for tp, offset in self.resume_at(restored[partition]).items()},
            self.settings.start)
        together = caught_up_together([restored[partition] for partition in gained
                                       if partition in behind], self.settings.topics.prices)
        restored_units = isolated = replayed = 0
        for partition in gained:
            self._give_up_if_asked()
            if partition in self.positions.owned:
                continue  # caught up with an earlier one
            if partition in behind:
                taken = together[partition]
                replayed += await self.catch_up([restored[p] for p in taken], accounts)
            else:
                taken = [partition]
                self.install(restored[partition], accounts, resume)
            for p in taken:
                self.checkpointer.restored_after(p, restored[p].reset_at, restored[p].read_to,
                                                 checkpointed=restored[p].control is not None)
                self.write_again(restored[p])
                self.positions.owned.add(p)
                keys = restored[p].snapshots.ids
                restored_units += len(keys)
                isolated += sum(isinstance(key, UnitKey) for key in keys)
        # File the restored accounts in the band index before saying ready, or the
        # first record after it would wait for that (~1.7 s per million accounts).
        self.engine.index_restored()
        return restored_units - isolated, isolated, replayed

    def write_again(self, restored: RestoredPartition) -> None:
        """Have the next checkpoint write the units whose newest state the changelog holds
        before an older one (a frozen instance's late snapshots, `RestoredPartition.rewrite`):
        Kafka's compaction keeps a key's last record, and would leave the older state for
        the restore after it."""
        if not restored.rewrite:
            return
        self.log.warning("the changelog holds older states of some units after their newest "
                         "(another instance's late snapshots): they are written again at the "
                         "next checkpoint, so that compaction keeps the newest",
                         topic=self.settings.topics.state, partition=restored.partition,
                         units=len(restored.rewrite))
        self.checkpointer.include(restored.rewrite, restored.partition, len(restored.rewrite),
                                  time.monotonic())

    def check_config(self, restored: dict[int, RestoredPartition]) -> None:
        """Refuse state checkpointed under another risk config (another instance of the
        fleet runs it, or the config changed), unless the operator said the change is meant:
        its events would differ from the ones already published for the same records."""
        for partition, part in sorted(restored.items()):
            theirs = None if part.control is None else part.control.config
            if theirs is None or theirs == self.fingerprint:
                continue  # no checkpoint yet, or one written before fingerprints existed
            if not self.settings.accept_config_change:
                raise ConfigChanged(self.settings.topics.state, partition, theirs,
                                    self.fingerprint)
            self.log.warning("restoring state checkpointed under another risk config "
                             "(--accept-config-change)", partition=partition,
                             checkpointed=theirs, configured=self.fingerprint)

    async def refuse_lost_state(self, gained: list[int], restored: dict[int, RestoredPartition],
                                committed: Callable[[TopicPartition], Awaitable[int | None]]
                                ) -> None:
        """Stop (`StateLost`) rather than take a gained partition whose changelog holds no
        control record and no reset marker as a first start, when a checkpoint of it was
        written: this process read or wrote one, or the group has committed offsets for its
        inputs (``committed``: the group's offset of an input partition, None if none), which
        only a checkpoint commits. Its records were lost, and the first start it would look
        like drops every account of the partition (and, with --start latest, the inputs
        between). --reset-state writes a marker, which a rebuild from the inputs then
        follows."""
        t = self.settings.topics
        for partition in gained:
            part = restored[partition]
            if part.control is not None or part.reset_at != NO_RESET:
                continue
            if partition in self.checkpointer.checkpointed:
                raise StateLost(t.state, partition, "this instance read or wrote a checkpoint "
                                                    "of it since it started")
            found = [(tp, offset) for tp in (TopicPartition(t.fills, partition),
                                             TopicPartition(t.ledger, partition))
                     if (offset := await committed(tp)) is not None]
            if found:
                offsets = " and ".join(f"{tp.topic}/{tp.partition} ({offset:,})"
                                       for tp, offset in found)
                raise StateLost(t.state, partition, f"group {self.settings.group!r} has "
                                f"committed offsets for {offsets}, which only a checkpoint "
                                "commits")

    def say_refused_ids(self, restored: dict[int, RestoredPartition]) -> None:
        """Warn of restored accounts whose id inputs may no longer carry (one ending in '/'
        and an instrument, checkpointed by a version before that was refused: records.py):
        every record of theirs is dead-lettered from now on, and they hold what they hold."""
        instruments = self.config.instruments
        refused = [key for part in restored.values() for key in part.snapshots.ids
                   if isinstance(key, str) and "/" in key
                   and instrument_after_slash(key, instruments) is not None]
        if refused:
            self.log.warning(
                "restored accounts whose id ends in '/' and an instrument: their records are "
                "dead-lettered (bad_identifier) from now on, as their event ids would be "
                "another account's isolated position's; move them to another id upstream",
                accounts=len(refused), examples=sorted(refused)[:5])

    def say_unvouched(self, restored: dict[int, RestoredPartition]) -> None:
        """Warn of control records a restore does not take: written after a reset marker by
        an instance whose state of the partition predates it (its checkpoints since hold only
        the accounts it changed). The partition is restored from the newest control record
        that vouches for the marker instead, if any, else rebuilt from its inputs' start."""
        for partition, part in sorted(restored.items()):
            if part.unvouched is None:
                continue
            count, last = part.unvouched
            self.log.warning(
                "checkpoints written after a reset by an instance that had not restored after "
                "it are ignored (was --reset-state given while other instances ran?); the "
                "partition is restored without them", topic=self.settings.topics.state,
                partition=partition, reset_at=part.reset_at, ignored_control_records=count,
                last_ignored_at=last, restored_from="its inputs' start" if part.control is None
                else "the last control record after the reset")

    # -- the first assignment: prices ---------------------------------------------------------

    async def restore_prices(self, restored: list[RestoredPartition],
                             consumer: AIOKafkaConsumer, price_partitions: int) -> None:
        """Load the price table (`load_prices`) and position every price partition."""
        targets = self.load_prices(restored, price_partitions)
        consumer.assign(list(targets))
        for tp, offset in (await self.starting_at(consumer, targets, self.settings.start)).items():
            self._position(consumer, tp, offset)
        # Once: a first restore abandoned after this (a rebalance began) may have taken some
        # partitions, whose accounts have seen the ticks from here. Positioned again for the
        # next attempt's partitions alone (or, with none, where --start says), the prices
        # went back, the ticks read again were stale to the engine, and the partitions gained
        # next, no longer behind, were installed and applied against newer prices (a drill).
        self.prices_positioned = True

    def load_prices(self, restored: list[RestoredPartition],
                    price_partitions: int) -> dict[TopicPartition, int | None]:
        """Price table and price offsets from the control record furthest behind in the
        price stream, so that every restored partition re-reads the ticks it has not seen
        (accounts that have seen them skip them). Loads the table into the engine, continues
        the checkpoint sequence after the newest read, and returns the offset each price
        partition resumes at (None: never checkpointed, where --start says)."""
        topic = self.settings.topics.prices
        controls = [r.control for r in restored if r.control is not None]
        oldest = min(controls, key=lambda c: sum(
            offset for (name, _), offset in c.offsets.items() if name == topic),
            default=None)
        if oldest is not None:
            self.engine.load_prices(oldest.prices)
            self.checkpointer.resume(max(c.seq for c in controls))
        return {TopicPartition(topic, p): None if oldest is None
                else oldest.offsets.get((topic, p)) for p in range(price_partitions)}

    # -- a partition taken as checkpointed ----------------------------------------------------

    def install(self, restored: RestoredPartition, consumer: AIOKafkaConsumer,
                resume: dict[TopicPartition, int]) -> None:
        """Load one partition's accounts and duplicate windows; seek its inputs where
        ``resume`` says (`starting_at`)."""
        for tp in self.resume_at(restored):
            self._position(consumer, tp, resume[tp])
        self.load_partition(self.engine, restored, self.positions.offsets())

    def resume_at(self, restored: RestoredPartition) -> dict[TopicPartition, int | None]:
        """Where a partition's fills and ledger resume: the offsets of its control record
        (None: never checkpointed, where --start says)."""
        t = self.settings.topics
        partition, control = restored.partition, restored.control
        return {TopicPartition(topic, partition): None if control is None
                else control.offsets.get((topic, partition)) for topic in (t.fills, t.ledger)}

    def load_partition(self, engine: Engine | ReferenceEngine, restored: RestoredPartition,
                       positions: Offsets) -> None:
        """Install a partition's duplicate windows and accounts in ``engine``; accounts whose
        snapshot or tombstone reflects inputs beyond ``positions`` skip them when re-read."""
        control = restored.control
        if control is not None:
            for (topic, p), ids in control.dedupe.items():
                engine.load_dedupe_ids(topic, p, ids)
        engine.load_accounts(restored.snapshots,
                             restored.marks(positions, self.settings.topics.prices))
        engine.mark_forgotten(restored.partition, restored.forgotten_marks(positions))

    # -- a partition gained behind this instance: catch-up ------------------------------------

    def to_catch_up(self, gained: list[int], restored: dict[int, RestoredPartition],
                    first: bool) -> set[int]:
        """The gained partitions to catch up rather than install as checkpointed: those
        `behind_on_prices`. On a first assignment (asked once its price positions are set)
        the price positions are those of the checkpoint furthest behind, so only a partition
        without a checkpoint can be behind them, and if none has one, the prices start where
        --start says, as the partitions do: nothing to catch up."""
        if first and all(part.control is None for part in restored.values()):
            return set()
        return {partition for partition in gained if self.behind_on_prices(restored[partition])}

    def behind_on_prices(self, restored: RestoredPartition) -> bool:
        """Did this partition's last owner checkpoint at an earlier point of the price stream
        than this instance has reached? Then its records must be replayed with the ticks
        in between, as they were the first time."""
        if restored.control is None:
            return True
        prices = self.settings.topics.prices
        return any(restored.control.offsets.get((prices, tp.partition), 0) < offset
                   for tp, offset in self.positions.prices().items())

    async def catch_up(self, parts: list[RestoredPartition], consumer: AIOKafkaConsumer) -> int:
        """Bring gained partitions checkpointed at one point of the price stream
        (`caught_up_together`) up to where this instance is, in the order a single instance
        would have applied their records; position their inputs in ``consumer``.

        A private engine holds the partitions' accounts and the price table of their last
        checkpoint; the ticks between that checkpoint and this instance's position are
        merged by timestamp with the partitions' own records, up to the last record this
        instance applied. Events come out with the ids the first pass gave them. Then the
        accounts join the main engine and the partitions join the main merge. The ticks are
        read and applied once for them all: one catch-up per partition re-applied them as
        many times (16 partitions a survivor took over after a kill -9: 5.2 s).
        """
        s, t = self.settings, self.settings.topics
        began = time.monotonic()  # what it applies is unsaved from here on
        control = parts[0].control  # the price point all of them were checkpointed at
        price_ends = self.positions.prices()
        own_part = {TopicPartition(topic, part.partition): part
                    for part in parts for topic in (t.fills, t.ledger)}
        own = list(own_part)
        reader = self.clients.catch_up_reader()
        await reader.start()
        private = Engine(self.config)
        # No forced release: every partition still read here holds records up to a known end,
        # so waiting for them is always right; releasing early would apply records in another
        # order than the first pass and publish events with its ids but other contents.
        merge = TimestampMerge(rank=self.positions.rank, max_skew_ms=s.max_skew_ms,
                               max_wait=math.inf, max_stall=math.inf)
        reached: dict[TopicPartition, int] = {}  # next offset to apply, per partition read
        applied = 0
        watch = self.catching_up = CatchUpWatch([part.partition for part in parts],
                                                s.max_stall, self.log, self.metrics)
        try:
            reader.assign([*price_ends, *own])
            # never checkpointed: every tick since the start of the price stream matters
            reached.update(await self.starting_at(reader, {
                tp: None if control is None else control.offsets.get((tp.topic, tp.partition))
                for tp in price_ends}, "earliest", say_lost=False))
            reached.update(await self.starting_at(reader, {
                tp: None if part.control is None
                else part.control.offsets.get((tp.topic, tp.partition))
                for tp, part in own_part.items()}, s.start))
            for tp, offset in reached.items():
                reader.seek(tp, offset)
                merge.seek(tp, offset)
            if control is not None:
                private.load_prices(control.prices)
            read_at = {(tp.topic, tp.partition): o for tp, o in reached.items()}
            for part in parts:
                self.load_partition(private, part, read_at)
            stopped: set[TopicPartition] = set()

            def done_with(tp: TopicPartition, next_offset: int) -> bool:
                if tp in price_ends:
                    return next_offset >= price_ends[tp]
                highwater = reader.highwater(tp)
                return tp in stopped or (highwater is not None and next_offset >= highwater)

            def read_up_to(tp: TopicPartition) -> int:
                return merge.fetched_to.get(tp, reached[tp])

            def ticks_pending() -> bool:
                """Does the merge hold, or still await, ticks this instance applied? A
                gained partition's record the merge hands over before them sorts before
                them, so it is applied here: the main loop, which has applied them, would
                apply it after them. The frontier alone does not say so: it is the key of
                the last record the loop applied, which can sort before ticks it applied
                (that record came late), and is unset until the loop applies one (the price
                positions came from a restore)."""
                return any(merge.buffered(tp) or not done_with(tp, read_up_to(tp))
                           for tp in price_ends)

            def finished(tp: TopicPartition) -> bool:
                """Read to its end (what the reader skips counts: a partition may end in
                a transaction marker, which no record is handed over at), all applied."""
                return done_with(tp, read_up_to(tp)) and not merge.buffered(tp)

            while not all(finished(tp) for tp in reached):
                self._give_up_if_asked()  # nothing of this partition is taken over
                # no more than a turn takes: what is read waits in the merge meanwhile
                batch = await reader.getmany(timeout_ms=200, max_records=self._pacer.limit)
                for tp, records in batch.items():
                    if tp in price_ends:
                        merge.add(tp, [r for r in records if r.offset < price_ends[tp]])
                    elif tp not in stopped:
                        merge.add(tp, records)
                for tp in reached:
                    if (position := position_now(reader, tp)) is not None:
                        merge.read_to(tp, position)
                active = [tp for tp in reached if not done_with(tp, reached[tp])]
                ready = []
                taken = merge.take(self._pacer.limit, active, done_with)
                # ticks this instance applied are still to come after the record at n if one
                # follows in this batch or the merge holds or awaits one
                ticks_after = max((n for n, (tp, _) in enumerate(taken) if tp in price_ends),
                                  default=-1)
                ticks_later = ticks_pending()
                for n, (tp, record) in enumerate(taken):
                    if tp in stopped:
                        continue
                    if tp in own and n > ticks_after and not ticks_later and (
                            self.positions.frontier is None
                            or self.positions.key(tp, record) > self.positions.frontier):
                        stopped.add(tp)  # from here on the main loop takes over
                        reached[tp] = record.offset
                        merge.drop([tp])
                        continue
                    ready.append((tp, record))
                await self._replay(ready, private)
                for tp, record in ready:
                    reached[tp] = record.offset + 1
                applied += len(ready)
                watch.observe(
                    {tp: read_up_to(tp) for tp in reached}, applied,
                    {tp: (read_up_to(tp), price_ends.get(tp, reader.highwater(tp)))
                     for tp in reached if not done_with(tp, read_up_to(tp))})
        finally:
            watch.clear(keep=self.positions.merge.stalled)
            self.catching_up = None
            await stop_consumer(reader)
        for tp in own:
            consumer.seek(tp, reached[tp])
            self.positions.seek(tp, reached[tp])
        offsets = self.positions.offsets()
        marks: dict[RiskKey, Offsets] = {}
        for part in parts:
            marks.update(part.marks(offsets, t.prices))
        held: list[RiskKey] = [*private.accounts, *private.units]
        self.engine.load_accounts(private.snapshots(held),
                                  {key: m for key, m in marks.items()
                                   if key in private.accounts or key in private.units})
        for part in parts:
            # whatever the catch-up made of them since, their tombstones reflect these inputs
            self.engine.mark_forgotten(part.partition, part.forgotten_marks(offsets))
            for topic in (t.fills, t.ledger):
                self.engine.load_dedupe_ids(topic, part.partition,
                                            private.dedupe_ids(topic, part.partition))
        counted = applied  # the records once, with the first partition's units
        for partition, keys in _by_partition(private.take_dirty(), parts).items():
            self.checkpointer.include(keys, partition, counted, began)
            counted = 0
        return applied

    async def starting_at(self, consumer: AIOKafkaConsumer,
                          checkpointed: dict[TopicPartition, int | None], start: str,
                          say_lost: bool = True) -> dict[TopicPartition, int]:
        """Where each partition resumes: at its checkpointed offset, or, never checkpointed
        (None), where ``start`` says; the broker asked where they all start (and, for
        `latest`, end) in one request each: one by one, 128 partitions took 3.6 s.

        A checkpointed offset the log now starts after: the topic's retention deleted records
        before this instance applied them (the fleet away, or behind, for longer than it).
        Nothing can bring them back; the consumer would jump to the log's start without a
        word, so it is said (once per partition and offset: a restore may be taken again),
        and reading goes on from there. Fills and ledger entries lost leave balances and
        positions wrong: an error, counted. Ticks lost only skip prices (and the events they
        would have caused): a warning. ``say_lost`` False: a catch-up's reader, positioned at
        a point of the price stream this instance has applied beyond."""
        resume, lost = resume_offsets(checkpointed, *await _log_bounds(consumer, checkpointed,
                                                                       start), start)
        for tp, applied_to in sorted(lost.items()):
            if not say_lost or (tp, applied_to) in self._lost_said:
                continue
            self._lost_said.add((tp, applied_to))
            where = {"topic": tp.topic, "partition": tp.partition, "applied_to": applied_to,
                     "log_start": resume[tp], "records_at_most": resume[tp] - applied_to}
            if tp.topic == self.settings.topics.prices:
                self.log.warning("ticks deleted before they were applied (the topic's retention "
                                 "ran out while they waited): prices go on from the log's "
                                 "start", **where)
                continue
            self.log.error("input records deleted before they were applied (the topic's "
                           "retention ran out while they waited): the state misses them",
                           **where)
            self.metrics.input_records_lost.labels(tp.topic, str(tp.partition)).inc(
                resume[tp] - applied_to)
        return resume

    def _position(self, consumer: AIOKafkaConsumer, tp: TopicPartition, offset: int) -> None:
        """Seek the consumer and the merge to ``offset``, together: records the consumer
        fetched before are stale to the merge from here on (`Positions.seek`)."""
        consumer.seek(tp, offset)
        self.positions.seek(tp, offset)


def caught_up_together(parts: list[RestoredPartition], prices: str) -> dict[int, list[int]]:
    """For each of these partitions to catch up, those caught up with it in one pass (itself
    included, in the order given): the partitions checkpointed at the same point of the price
    stream (``prices``), with the same price table, share the ticks to apply again, as do all
    those never checkpointed. After a crash, all of the dead instance's partitions were
    checkpointed together."""
    groups: dict[Hashable, list[int]] = {}
    for part in parts:
        control = part.control
        point = None if control is None else (
            tuple(sorted((key, offset) for key, offset in control.offsets.items()
                         if key[0] == prices)),
            tuple(sorted(control.prices.items())))
        groups.setdefault(point, []).append(part.partition)
    return {partition: group for group in groups.values() for partition in group}


def _by_partition(dirty: DirtyUnits, parts: list[RestoredPartition]) -> dict[int, list[RiskKey]]:
    """A catch-up's changed units by the partition each lives in: its row's, or the one it
    was forgotten in; one the engine knows none for (-1) goes to the partition whose
    snapshots or tombstones held it, else to the first."""
    home = {key: part.partition for part in parts
            for key in (*part.snapshots.ids, *part.forgotten)}
    found: dict[int, list[RiskKey]] = {part.partition: [] for part in parts}
    for key, partition in zip(dirty.keys, dirty.partitions.tolist(), strict=True):
        found.setdefault(home.get(key, parts[0].partition) if partition < 0 else partition,
                         []).append(key)
    return found


async def _log_bounds(consumer: AIOKafkaConsumer, checkpointed: dict[TopicPartition, int | None],
                      start: str) -> tuple[dict[TopicPartition, int], dict[TopicPartition, int]]:
    """Where these partitions' logs start, and, under --start latest, where those never
    checkpointed end. A broker that does not answer in time raises `RequestTimedOutError`:
    retriable, so the restore is taken again (aiokafka's own `KafkaTimeoutError` says it is
    not, and the instance would stop)."""
    unknown = [tp for tp, offset in checkpointed.items() if offset is None]
    try:
        starts = await consumer.beginning_offsets(list(checkpointed)) if checkpointed else {}
        ends = await consumer.end_offsets(unknown) if unknown and start != "earliest" else {}
    except KafkaTimeoutError as exc:
        raise RequestTimedOutError(f"the broker did not say where {len(checkpointed)} "
                                   "partitions start in time") from exc
    return starts, ends


def resume_offsets(checkpointed: dict[TopicPartition, int | None],
                   starts: dict[TopicPartition, int], ends: dict[TopicPartition, int],
                   start: str) -> tuple[dict[TopicPartition, int], dict[TopicPartition, int]]:
    """Where each partition resumes (`Restorer.starting_at`), and the checkpointed offsets
    that the log now ``starts`` after, by partition: records deleted before they were
    applied, skipped."""
    resume: dict[TopicPartition, int] = {}
    lost: dict[TopicPartition, int] = {}
    for tp, offset in checkpointed.items():
        if offset is None:
            resume[tp] = starts[tp] if start == "earliest" else ends[tp]
        elif offset < starts[tp]:
            resume[tp], lost[tp] = starts[tp], offset
        else:
            resume[tp] = offset
    return resume, lost
