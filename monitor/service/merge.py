"""Event-time ordering across input partitions (SPEC §6).

Kafka orders records only within a partition. Left to fetch order, the interleaving of prices,
fills and ledger differs from run to run and from `liqmon replay`'s. The merge releases buffered
records in (Kafka timestamp, topic rank, partition, offset) order, and releases a record r only
when every other partition is known to hold nothing that sorts before it:

- it has a buffered record that sorts after r, or
- it answered a request sent at wall-clock time S with its end offset, and everything before
  that end offset has been buffered, with S after both r's arrival here and r's timestamp plus
  ``max_skew_ms``. Then every record of that partition still unseen was appended after r was
  (so a producer that waited for one record's acknowledgement before sending the next is
  always seen in order, however old its timestamps, as long as they go forward), and
  after r's timestamp plus the skew (so producers whose clocks and in-flight time are within
  ``max_skew_ms`` are too).

Such a request is a *probe* (`probed`), or a fetch of the partition's consumer (`fetched`): a
consumer has one fetch of a partition out at a time, sent once the answer before was handled,
so the answer after one stamped T was asked for after T, and its high watermark is an end.
Answers are stamped in whole ms (rounded down), so a record arrives at its answer's stamp + 1.
A consumer's fetches from one broker are answered one after another, too: on r's own
*connection* (consumer and broker), an answer stamped in a later ms than r's was asked for
after r's was handled, so after r arrived. It proves the partition for r (with a request sent
after r's timestamp plus the skew) however close the two stamps: a fill held back by silent
ledger partitions goes out with their next answer, not a probe's round trip after it. When a
partition's leader moves, its consumer may have fetches out to both brokers for a moment, and
the leader the caller names may already be the new one for an answer from the old: so an
answer proves something only as the third in a row on one connection (the caller's label of
a connection changes with every metadata update of the consumer, so a leader that moved away
and back in between starts the row again: `clients.fetched_from`).

A broker may report the end as the last batch's first offset + 1 (the embedded broker does).
A fetch returns whole record batches, but the consumer hands a batch over in parts when it
reaches its records limit, so its position alone can stop inside the last batch, past such an
end. So a probe proves nothing either while the consumer has not handed over everything up to
the high watermark its last fetch reported (`fetched`). A partition just positioned (`seek`:
a start, a rebalance, a replaced log) may be positioned inside a batch, and the consumer's high
watermark may be of a fetch from before, or missing: until a fetch answered after the seek
reports one, no probe proves it.

This is Kafka Streams' `max.task.idle.ms` rule (KIP-695: wait until the partition's lag is known
to be zero) with Flink's bounded out-of-orderness. A high watermark from the last fetch says
nothing about what was appended since; that is why a probe must be sent after the fact.

``max_wait`` bounds how long the merge holds everything back for a partition that cannot be
probed (a broker that does not answer for it while others do): past it, records are released in
the best order known and counted as forced. When *no* broker answers, such a release buys
nothing: its events cannot be published until a broker is back, and by then a probe can prove
the order; it would only apply records in a worse one. So a forced release also needs Kafka to
have answered a request sent after ``max_wait`` ran out (the caller's broker watch, asked at
once: ``awaiting_kafka``), and, since the watch notices an outage only after its request times
out (or, in a process frozen through its start, only by an answer it held up), the wait starts
over when it finds Kafka back or an answer came late (``restart_wait``). An answer that comes
promptly can still be the first sign that an outage ended: the probes it held up come back
with it, a few ms apart. So a probe of a partition holding the head back that was out when the
answer was seen holds the release for up to ``HELD_UP_PROBES`` more; by then it has come back,
or it is of a partition the broker does not answer for. Both bounds count the
time the loop was turning, not the time the process was held still: a gap between two takes
counts at most ``most_per_turn`` (a healthy loop takes every 0.2 s at least). A process frozen
for seconds (SIGSTOP, a throttled container) would otherwise wake to find every wait over, and
release what it holds before the probes it asks for then could answer: records out of order,
with the broker well all along. A loop whose every turn is slower than ``most_per_turn`` still
forces, after proportionally longer. Nor do the bounds count while the caller's watch finds no
broker answering (``take``'s ``counting``).

A partition whose probe found records not yet read is waited for as long as reading them takes,
as Kafka Streams does (it enforces processing only once a partition's lag is known to be zero):
those records exist and may sort first, and the consumer brings them. On a backlog, a consumer
can hand over other partitions' records for well over ``max_wait`` before it reaches them. That
wait has a bound too, ``max_stall``, counted from the partition's last progress (or from the
answer that found the records, or from the caller resuming a partition it paused, if later;
a partition the caller has paused cannot stall, `paused`): a
partition whose records the broker reports but no
fetch returns (a broker fault; the embedded broker's answers come back empty once a partition
holds many small batches, which the loop mends by widening its fetch wait, `clients.FetchWait`)
is declared *stalled* and holds nobody back until it delivers again. What goes out meanwhile is
counted as forced, as it may not be in replay's order. A stalled partition is not probed: it
would only answer what is known already.

"Read" counts what the consumer skips as well as what it hands over (`read_to`): transaction
markers, and batches a compaction emptied, take offsets no record is ever delivered at.

What the proof cannot cover is counted: a record released after one that sorts after it and
bears on it is *late* (`late`). Records of the topics named ``co_partitioned`` (fills and
ledger, keyed by account) bear only on records of the same partition number and on those of
the other topics (prices), which bear on every record: the order between two account
partitions changes nothing replay computes, and a partition gained in a rebalance, whose
backlog sorts before what the instance applied of its other partitions, is not late for that.

A record stamped ahead of its arrival here can be proven in order only once the wall clock
reaches its timestamp, and holds every later record of its partition back until then. For a
few ms (clocks a little apart) that is right; for a producer whose clock runs minutes ahead it
would freeze the partition for minutes. So a record stamped further ahead of its arrival than
``max_wait`` is placed at its arrival + ``max_wait`` instead, which bounds what it holds back
as ``max_wait`` bounds a silent partition, and counted (`ahead`): replay, sorting by
timestamp, applies it later.

A late record reached the merge after that one had gone out, because it spent longer than
``max_skew_ms`` between its timestamp and its append (a producer that batches or lingers, a
clock behind the others), because it is stamped earlier than its own partition's predecessor,
or because it waited behind a forced release. Replay of the same records sorted applies it
earlier; live results may differ from replay's.
"""

from __future__ import annotations

import heapq
import math
import time
from collections import deque
from collections.abc import Callable, Collection, Hashable, Iterable, Sequence
from typing import Any

from aiokafka import TopicPartition

Record = Any  # aiokafka ConsumerRecord: .timestamp, .offset, .key, .value
NEVER = float("-inf")
FIRST = (-(1 << 63), 0, 0, 0)  # sorts before every record's key
MOST_PER_TURN = 0.25  # seconds a gap between two takes counts, at most, towards the bounds
HELD_UP_PROBES = 0.5  # seconds a forced release waits for probes out when Kafka was seen to answer
MAX_ANSWERS = 16  # answers kept per partition while it is read up to none of them (see `_answer`)


class TimestampMerge:
    def __init__(self, rank: Callable[[str], int], max_skew_ms: int = 5,
                 max_wait: float = 0.5, max_stall: float = 10.0,
                 clock: Callable[[], float] = time.monotonic,
                 co_partitioned: Collection[str] = (),
                 most_per_turn: float = MOST_PER_TURN) -> None:
        self._rank = rank  # tie-break between topics at equal timestamps
        self._co_partitioned = frozenset(co_partitioned)
        self.max_skew_ms = max_skew_ms
        self.max_wait = max_wait
        self.max_stall = max_stall
        self._clock = clock  # seconds, for the two bounds
        self.most_per_turn = most_per_turn
        self._last_take: float | None = None  # clock time of the last take
        self._uncounted = 0.0  # seconds the bounds do not count (see ``take``), in all
        # per partition: (record, wall-clock ms at which it reached the merge)
        self._buffers: dict[TopicPartition, deque[tuple[Record, float]]] = {}
        self.fetched_to: dict[TopicPartition, int] = {}  # next offset not yet buffered
        # a partition holds no unseen record appended before proven[tp] (wall-clock ms)
        self.proven: dict[TopicPartition, float] = {}
        # ... nor one appended before any record its connection received before the fetch
        # answer stamped received[tp] (wall-clock ms, see `fetched`)
        self.received: dict[TopicPartition, float] = {}
        # the connection each partition is fetched on, its last fetch answer's stamp, and how
        # many answers in a row came on that connection
        self._connection: dict[TopicPartition, Hashable] = {}
        self._answered_at: dict[TopicPartition, float] = {}
        self._in_a_row: dict[TopicPartition, int] = {}
        # answers, of probes and fetches: (end offset, the send time it proves, the fetch
        # stamp it proves on its connection) once buffered up to that end
        self._probed: dict[TopicPartition, list[tuple[int, float, float]]] = {}
        self._blocked_since: float | None = None
        # the record held (its sort key) and the clock time it was first held: a record that
        # arrives sorting before the one held goes out without proof only once Kafka has
        # answered a request sent after it was held (`_waited_enough`)
        self._held_head: tuple[int, int, int, int] | None = None
        self._held_head_since = NEVER
        # clock time max_wait ran out, while waiting for Kafka to answer a request sent since
        self._wait_over_at: float | None = None
        # probes out, per partition: their send times (wall-clock ms), until answered or failed
        self._out: dict[TopicPartition, set[float]] = {}
        # once Kafka answered a request sent after max_wait ran out: the clock time that was
        # seen, and the probes out then (held up by an outage that answer may be the end of)
        self._answer_seen_at: float | None = None
        self._out_when_answered: dict[TopicPartition, set[float]] = {}
        # clock time a partition's read position last moved, and since when a probe has
        # found records of it not read yet: the later of the two starts its stall clock
        self._progress: dict[TopicPartition, float] = {}
        self._unread_since: dict[TopicPartition, float] = {}
        # the high watermark each partition's consumer last fetched (`fetched`); infinite
        # until a fetch answered after the partition was positioned reports one, and the
        # wall-clock ms it was positioned at (`seek`)
        self._fetched_end: dict[TopicPartition, float] = {}
        self._positioned_at: dict[TopicPartition, float] = {}
        self._paused: set[TopicPartition] = set()  # fetching paused by the caller (`paused`)
        # stalled partitions (see the module's doc): (read up to, end the broker reported,
        # seconds without progress when declared)
        self.stalled: dict[TopicPartition, tuple[int, int, float]] = {}
        self.forced = 0  # records released by max_wait, not by proof of order
        self.forced_past_stalled = 0  # records released while a stalled partition held them
        # the partitions such records were released without a proof from (until the caller
        # reports and clears it): after the forced take nothing may be blocked any more
        self.forced_on: set[TopicPartition] = set()
        # records released after one that sorts after them (see the module's doc), per topic;
        # since the caller last cleared them, the most any was behind (ms of timestamp) and
        # the longest from its timestamp to its arrival here (a --max-skew that long would
        # have held the records it followed until it came: the fetch included, so an upper
        # bound on what is needed)
        self.late: dict[str, int] = {}
        self.late_by_ms = 0
        self.late_arrival_ms = 0.0
        # records placed at their arrival (see the module's doc), per topic; since the caller
        # last cleared it, the furthest ahead of its arrival any was stamped (ms)
        self.ahead: dict[str, int] = {}
        self.ahead_by_ms = 0
        # the greatest sort key released: of all records, of those of the other topics, and
        # of the co-partitioned topics' records by partition number
        self._last_out = FIRST
        self._last_shared_out = FIRST
        self._last_out_of: dict[int, tuple[int, int, int, int]] = {}
        self.blocked_on: list[TopicPartition] = []  # after take(): who held the head back
        self.head_needs: float | None = None  # after take(): probe time the head waits for
        # after take(): the held head's arrival, timestamp + skew and connection
        self._head: tuple[float, float, Hashable] | None = None
        self._active: list[TopicPartition] = []  # after take(): the partitions it was given

    def add(self, tp: TopicPartition, records: Sequence[Record],
            arrived_ms: float | None = None) -> None:
        """Buffer a partition's fetched records. Those before its position (`fetched_to`)
        are ignored: they are buffered already, or were applied before the partition was
        sought there. (The loop drops whole fetches taken before a seek, see
        `Positions.sought_since`; this keeps any other overlap from being applied twice.)"""
        position = self.fetched_to.get(tp)
        if records and position is not None and records[0].offset < position:
            records = [r for r in records if r.offset >= position]
        if not records:
            return
        arrived = time.time() * 1000 if arrived_ms is None else arrived_ms
        self._buffers.setdefault(tp, deque()).extend((r, arrived) for r in records)
        self.fetched_to[tp] = records[-1].offset + 1
        self._progressed(tp)
        self._settle_probe(tp)

    def fetched(self, tp: TopicPartition, records: Sequence[Record], position: int | None,
                fetched_end: int | None, fetched_end_at_ms: int | None,
                arrived_ms: float | None = None, connection: Hashable = None) -> None:
        """What one fetch of the partition's consumer handed over: its records (`add`), its
        position after them (`read_to`), and the high watermark its consumer last fetched
        with the wall-clock ms that fetch was answered at (whole ms, rounded down), if known.
        Until the consumer has handed over everything before that end, it holds records no
        probe's answer may be trusted to count. That end is taken first: the records alone
        may reach an end a probe reported inside a batch they are part of. An end answered
        before the partition was last positioned is of another position (or log), and is not
        taken.

        The answer is a probe's too (the module's doc): ``connection`` names the consumer
        and broker the partition is fetched from (None: unknown). The records arrived when
        it was answered, unless ``arrived_ms`` says otherwise."""
        if (tp in self.fetched_to and fetched_end is not None and fetched_end_at_ms is not None
                and fetched_end_at_ms > self._positioned_at.get(tp, NEVER)):
            self._fetched_end[tp] = fetched_end
            before = self._answered_at.get(tp)
            if before is None or fetched_end_at_ms > before:
                self._answered_at[tp] = fetched_end_at_ms
                in_a_row = (self._in_a_row.get(tp, 0) + 1
                            if self._connection.get(tp, connection) == connection else 1)
                self._in_a_row[tp] = in_a_row
                self._connection[tp] = connection
                if before is not None and in_a_row >= 3:
                    self._answer(tp, fetched_end, before,
                                 fetched_end_at_ms if connection is not None else NEVER)
            if arrived_ms is None:
                arrived_ms = fetched_end_at_ms + 1  # after it was answered, whatever the ms
        self.add(tp, records, arrived_ms)
        if position is not None:
            self.read_to(tp, position)
        self._settle_probe(tp)  # the end alone may be what an answer waited for

    def asked(self, sent_at_ms: float, tps: Iterable[TopicPartition]) -> None:
        """A probe of ``tps`` went out at wall-clock ``sent_at_ms``: out until `probed` or
        `unanswered` says it came back."""
        for tp in tps:
            self._out.setdefault(tp, set()).add(sent_at_ms)

    def unanswered(self, sent_at_ms: float, tps: Iterable[TopicPartition]) -> None:
        """The probe sent at ``sent_at_ms`` failed, or its answer left ``tps`` out."""
        for tp in tps:
            self._back(tp, sent_at_ms)

    def _back(self, tp: TopicPartition, sent_at_ms: float) -> None:
        out = self._out.get(tp)
        if out is not None:
            out.discard(sent_at_ms)
            if not out:
                del self._out[tp]

    def probed(self, sent_at_ms: float, ends: dict[TopicPartition, int]) -> None:
        """End offsets asked for at wall-clock ``sent_at_ms`` (taken before the request)."""
        for tp, end in ends.items():
            self._back(tp, sent_at_ms)
            self._answer(tp, end, sent_at_ms, NEVER)

    def _answer(self, tp: TopicPartition, end: int, sent_at_ms: float,
                received_ms: float) -> None:
        """The partition ended at ``end`` when a request sent at or after ``sent_at_ms`` was
        answered, a fetch answered at ``received_ms`` on its connection (NEVER: a probe's
        answer, or a connection not known). Kept until the partition is read up to it.
        Through a long catch-up (a fetch's answer on every turn, the end moving on as
        producers append) the answers not read up to would pile up: past ``MAX_ANSWERS`` the
        newest replaces the last kept, which only proves some of them later."""
        if tp not in self.fetched_to or tp in self.stalled:  # dropped meanwhile, or stalled
            return
        answers = self._probed.setdefault(tp, [])
        if not answers:
            self._unread_since[tp] = self._turning()
        answer = (end, sent_at_ms, received_ms)
        if len(answers) < MAX_ANSWERS:
            answers.append(answer)
        else:
            answers[-1] = answer
        self._settle_probe(tp)

    def read_to(self, tp: TopicPartition, position: int) -> None:
        """The partition's consumer has handed over everything before ``position`` (its
        position right after a fetch), records and what it skips alike."""
        if tp in self.fetched_to and position > self.fetched_to[tp]:
            self.fetched_to[tp] = position
            self._progressed(tp)
            self._settle_probe(tp)

    def paused(self, tp: TopicPartition) -> None:
        """The caller paused the partition's fetching (its buffer is full) until `resumed`.
        Meanwhile it cannot progress, so it is never declared stalled: its buffer may drain
        in one take before the caller sees that it may resume it, and its next record then
        holds the others back until its consumer fetches again."""
        self._paused.add(tp)

    def is_paused(self, tp: TopicPartition) -> bool:
        """Between `paused` and `resumed` (or `drop`)."""
        return tp in self._paused

    def resumed(self, tp: TopicPartition) -> None:
        """The caller resumes the partition's fetching: its stall clock starts now, or a stall
        counted from before the pause would be declared the moment its buffer drains,
        before its consumer could fetch once."""
        self._paused.discard(tp)
        if tp in self.fetched_to:
            self._progressed(tp)

    def _progressed(self, tp: TopicPartition) -> None:
        self._progress[tp] = self._turning()
        self.stalled.pop(tp, None)  # it delivers again: it holds records back as before

    def _settle_probe(self, tp: TopicPartition) -> None:
        probes = self._probed.get(tp)
        if not probes:
            return
        fetched_to = self.fetched_to.get(tp, 0)
        if fetched_to < self._fetched_end.get(tp, 0):
            return  # the consumer holds records of it not handed over yet (the module's doc)
        proved = [(sent, received) for end, sent, received in probes if fetched_to >= end]
        if proved:
            newest = max(sent for sent, _ in proved)
            latest = max(received for _, received in proved)
            self.proven[tp] = max(self.proven.get(tp, NEVER), newest)
            if latest > NEVER:
                self.received[tp] = max(self.received.get(tp, NEVER), latest)
            # an older answer with a greater end than a newer one's is of a log since cut
            # back (an unclean leader election): it will never be read up to
            self._probed[tp] = [(end, sent, received) for end, sent, received in probes
                                if fetched_to < end and (sent > newest or received > latest)]

    def _unread(self, tp: TopicPartition) -> bool:
        """Did a probe find records of the partition that are not read yet?"""
        return bool(self._probed.get(tp))

    def to_probe(self) -> list[TopicPartition]:
        """Partitions that do not prove the held head, nor will once read up to an answer
        they have: a new probe (sent at or after ``head_needs``) is needed. Those with
        records buffered are included, so that once their records go out they need not be
        probed again."""
        needs, head = self.head_needs, self._head
        if needs is None or head is None:
            return []
        return [tp for tp in self._active if not self._proves(tp, *head)
                and tp not in self.stalled
                and not any(sent >= needs for _, sent, _ in self._probed.get(tp, ()))]

    def _proves(self, tp: TopicPartition, arrived: float, after_skew: float,
                connection: Hashable) -> bool:
        """Does the partition hold nothing unseen that sorts before a record that arrived at
        ``arrived`` (wall-clock ms) on ``connection``, stamped ``after_skew`` − max_skew_ms?"""
        return _proof(*self._proofs_of(tp), arrived, after_skew, connection)

    def _proofs_of(self, tp: TopicPartition) -> tuple[float, float, Hashable]:
        """The send time the partition is proven to, what proves it for records received on
        its connection (that, or its fetch answers' stamp), and that connection."""
        proven = self.proven.get(tp, NEVER)
        connection = self._connection.get(tp)
        own = proven if connection is None else max(proven, self.received.get(tp, NEVER))
        return proven, own, connection

    def seek(self, tp: TopicPartition, offset: int, at_ms: float | None = None) -> None:
        """The consumer was moved, at wall-clock ``at_ms`` (now if not given): forget what was
        buffered or proved for this partition. ``offset`` may be inside a batch, so until a
        fetch answered after this reports its high watermark, no probe proves it."""
        self._forget_read(tp)
        self.fetched_to[tp] = offset
        self._fetched_end[tp] = math.inf
        self._positioned_at[tp] = time.time() * 1000 if at_ms is None else at_ms
        self._progressed(tp)
        self._unblock()  # a partition positioned anew gets the whole max_wait

    def _forget_read(self, tp: TopicPartition) -> None:
        """What was buffered, proved or answered for the partition: true of where its
        consumer stood, not of where it stands next."""
        self._buffers.pop(tp, None)
        self._probed.pop(tp, None)
        self.proven.pop(tp, None)
        self.received.pop(tp, None)
        self._answered_at.pop(tp, None)
        self._in_a_row.pop(tp, None)

    def restart_wait(self) -> None:
        """The caller took nothing for a while (the loop held still through a rebalance), so
        no probe was asked for: ``max_wait`` counts again from now."""
        self._unblock()

    def drop(self, tps: Iterable[TopicPartition]) -> None:
        """Forget partitions handed over: if one comes back, its records are late only
        against what is applied from then on."""
        for tp in tps:
            if tp.topic in self._co_partitioned:
                self._last_out_of.pop(tp.partition, None)
            self._forget_read(tp)
            self._connection.pop(tp, None)
            self.fetched_to.pop(tp, None)
            self._progress.pop(tp, None)
            self._unread_since.pop(tp, None)
            self._fetched_end.pop(tp, None)
            self._positioned_at.pop(tp, None)
            self._paused.discard(tp)
            self.stalled.pop(tp, None)

    def buffered(self, tp: TopicPartition | None = None) -> int:
        if tp is not None:
            return len(self._buffers.get(tp, ()))
        return sum(len(buffer) for buffer in self._buffers.values())

    def take(self, limit: int, partitions: Iterable[TopicPartition],
             exhausted: Callable[[TopicPartition, int], bool] | None = None,
             counting: bool = True, kafka_answered: float = math.inf,
             ) -> list[tuple[TopicPartition, Record]]:
        """Up to ``limit`` records in (timestamp, topic rank, partition, offset) order.

        ``partitions`` are those that may deliver records. ``exhausted(tp, next_offset)``, if
        given, says a partition will deliver nothing more (a bounded read that reached its
        end): it never holds anyone back. After the call, ``blocked_on`` lists the partitions
        without buffered records that hold the head back, and ``head_needs`` the wall-clock
        time after which a probe of them must be sent.

        Towards ``max_wait`` and ``max_stall`` the time since the last take counts at most
        ``most_per_turn``, and not at all if ``counting`` is false (no broker answers).
        ``kafka_answered`` is the clock time the newest request Kafka answered was sent: once
        ``max_wait`` runs out, records go out without proof only after one sent since
        (``awaiting_kafka`` says the merge waits for that).
        """
        now = self._clock()
        if self._last_take is not None:
            gap = now - self._last_take
            self._uncounted += max(0.0, gap - self.most_per_turn) if counting else gap
        self._last_take = now
        skew = self.max_skew_ms
        ahead_limit = self.max_wait * 1000  # ms a record may be stamped ahead of its arrival
        partitions = self._active = list(partitions)
        silent = [tp for tp in partitions if not self._buffers.get(tp) and tp not in self.stalled
                  and not (exhausted and exhausted(tp, self.fetched_to.get(tp, 0)))]
        # (sort key: placed timestamp, rank, partition, offset; the partition; its buffer)
        heap: list[tuple[int, int, int, int, TopicPartition, deque[tuple[Record, float]]]] = []
        for tp, buffer in self._buffers.items():
            if buffer:
                head, arrived = buffer[0]
                placed = (head.timestamp if head.timestamp <= arrived + ahead_limit
                          else int(arrived + ahead_limit))
                heap.append((placed, self._rank(tp.topic), tp.partition, head.offset, tp,
                             buffer))
        heapq.heapify(heap)
        connections = self._connection
        # the least proofs among partitions with nothing buffered bound what may go out
        least = self._least(silent)
        # what a stalled partition proves, were it not skipped: releases past it count
        stalled_least = self._least(tp for tp in self.stalled if tp in partitions)
        out: list[tuple[TopicPartition, Record]] = []
        co_partitioned, last_out_of = self._co_partitioned, self._last_out_of
        while heap and len(out) < limit:
            entry = heap[0]
            timestamp, tp, buffer = entry[0], entry[4], entry[5]
            arrived, after_skew = buffer[0][1], timestamp + skew
            least_proven = least.proven  # sent after both, for every partition: the usual case
            if ((least_proven < arrived or least_proven < after_skew) and not least.prove(
                    arrived, after_skew, connection := connections.get(tp))):
                holding = [other for other in silent
                           if not self._proves(other, arrived, after_skew, connection)]
                unread = [other for other in holding if self._unread(other)]
                if unread:
                    if not self._stall(unread):
                        self._unblock()  # waiting for the consumer, not the broker
                        break
                    silent = [other for other in silent if other not in self.stalled]
                    least = self._least(silent)
                    for other in unread:
                        self._add_to(stalled_least, other)
                    continue  # the head again, without the stalled partitions
                # a record sorting before the one held (not one after it, as the records
                # behind a head released without proof are): held since now
                if self._held_head is None or entry[:4] < self._held_head:
                    self._held_head, self._held_head_since = entry[:4], self._clock()
                if not self._waited_enough(kafka_answered, holding):
                    break
                self.forced += 1
                self.forced_on.update(holding)
            else:
                if self._blocked_since is not None:
                    # proven: the next head that must wait waits the whole max_wait, not
                    # what is left of this one's (out of an outage, at once)
                    self._unblock()
                if self.stalled and not stalled_least.prove(arrived, after_skew,
                                                            connections.get(tp)):
                    self.forced_past_stalled += 1
            key = entry[:4]
            record, arrived = buffer.popleft()
            if key[0] != record.timestamp:  # stamped ahead: placed at its arrival
                self.ahead[tp.topic] = self.ahead.get(tp.topic, 0) + 1
                self.ahead_by_ms = max(self.ahead_by_ms, round(record.timestamp - arrived))
            if tp.topic in co_partitioned:
                own = last_out_of.get(tp.partition, FIRST)
                bound = own if own > self._last_shared_out else self._last_shared_out
                if key > own:
                    last_out_of[tp.partition] = key
            else:
                bound = self._last_out
                if key > self._last_shared_out:
                    self._last_shared_out = key
            if key < bound:
                self._count_late(tp.topic, bound[0] - key[0], arrived - key[0])
            if key > self._last_out:
                self._last_out = key
            out.append((tp, record))
            if buffer:
                head, arrived = buffer[0]
                placed = (head.timestamp if head.timestamp <= arrived + ahead_limit
                          else int(arrived + ahead_limit))
                # one sift: the partition's next record takes its last one's place
                heapq.heapreplace(heap, (placed, key[1], key[2], head.offset, tp, buffer))
                continue
            heapq.heappop(heap)
            if not (exhausted and exhausted(tp, self.fetched_to[tp])):
                silent.append(tp)  # it may hold records earlier than the other heads
                self._add_to(least, tp)
        if heap:
            timestamp, tp, buffer = heap[0][0], heap[0][4], heap[0][5]
            head = self._head = (buffer[0][1], timestamp + skew, connections.get(tp))
            self.head_needs = max(head[0], head[1])
            self.blocked_on = [tp for tp in silent if not self._proves(tp, *head)]
        else:
            self.head_needs = self._head = None
            self.blocked_on = []
        if out or not heap:
            self._unblock()
        return out

    def _least(self, tps: Iterable[TopicPartition]) -> _Least:
        least = _Least()
        for tp in tps:
            self._add_to(least, tp)
        return least

    def _add_to(self, least: _Least, tp: TopicPartition) -> None:
        least.add(*self._proofs_of(tp))

    def _count_late(self, topic: str, behind_ms: int, arrival_ms: float) -> None:
        self.late[topic] = self.late.get(topic, 0) + 1
        self.late_by_ms = max(self.late_by_ms, behind_ms)
        self.late_arrival_ms = max(self.late_arrival_ms, arrival_ms)

    def _stall(self, unread: list[TopicPartition]) -> bool:
        """Declare stalled those of ``unread`` (partitions holding the head back with records a
        probe found) that have not moved for ``max_stall``; whether all of them are now."""
        now = self._turning()
        for tp in unread:
            if tp in self._paused:
                continue
            since = max(self._progress.get(tp, NEVER), self._unread_since.get(tp, NEVER))
            if now - since >= self.max_stall:
                end = max(end for end, _, _ in self._probed.pop(tp))
                self.stalled[tp] = (self.fetched_to.get(tp, 0), end, now - since)
        return all(tp in self.stalled for tp in unread)

    def _turning(self) -> float:
        """Clock time less the time the bounds do not count (``take``)."""
        return self._clock() - self._uncounted

    def _unblock(self) -> None:
        self._blocked_since = None
        self._held_head = None
        self._wait_over_at = None
        self._answer_seen_at = None
        self._out_when_answered = {}

    def _waited_enough(self, kafka_answered: float, holding: list[TopicPartition]) -> bool:
        """``max_wait`` ran out, Kafka answered a request sent since and since the head was
        first held (unless max_wait is 0: no wait at all), and no probe of the ``holding``
        partitions that was out when that answer was seen is still out, unless it has been
        for ``HELD_UP_PROBES`` since. While no broker answers, records released without
        proof could not be published before a probe proves their order; it would only apply
        them in a worse one. An answer may be the end of an outage the watch never saw,
        whose held-up probes are answered with it: a release then would go out a few ms
        before the proof. And a head that arrived after the requests answered so far were
        sent (the max_wait running since an older head was first held) is not proven by
        their answers: the next answer may prove it."""
        now = self._turning()
        if self._blocked_since is None:
            self._blocked_since = now
            return self.max_wait <= 0
        if now - self._blocked_since < self.max_wait:
            return False
        if self._wait_over_at is None:
            self._wait_over_at = self._clock()
        if kafka_answered < self._wait_over_at or kafka_answered <= self._held_head_since:
            return False
        if self._answer_seen_at is None:
            self._answer_seen_at = self._clock()
            self._out_when_answered = {tp: set(sent) for tp, sent in self._out.items()}
        if self._clock() - self._answer_seen_at >= HELD_UP_PROBES:
            return True
        return not any(self._out_when_answered.get(tp, set()) & self._out.get(tp, set())
                       for tp in holding)

    @property
    def awaiting_kafka(self) -> bool:
        """``max_wait`` ran out and a release without proof waits for Kafka to answer a request
        sent since (the caller's broker watch, told to ask at once)."""
        return self._wait_over_at is not None


def _proof(proven: float, own: float, at: Hashable, arrived: float, after_skew: float,
           connection: Hashable) -> bool:
    """Do proofs (`TimestampMerge._proofs_of`) of a partition fetched on ``at`` cover a record
    that arrived at ``arrived`` on ``connection``, stamped ``after_skew`` − max_skew_ms? A probe
    or fetch sent after both does; on the record's own connection, a fetch answered after it
    does, with one sent after ``after_skew`` (the module's doc)."""
    return proven >= after_skew and (
        own if at == connection and at is not None else proven) >= arrived


class _Least:
    """The least proofs among some partitions: whether every one of them proves a record
    (`TimestampMerge._proves`) in a few comparisons, per connection rather than per partition."""

    __slots__ = ("_by_connection", "proven")

    def __init__(self) -> None:
        self.proven = math.inf  # the least send time proven, over all
        # per connection: [the least send time proven, the least of what proves records
        # received on it]
        self._by_connection: dict[Hashable, list[float]] = {}

    def add(self, proven: float, own: float, connection: Hashable) -> None:
        self.proven = min(self.proven, proven)
        least = self._by_connection.get(connection)
        if least is None:
            self._by_connection[connection] = [proven, own]
        else:
            least[0] = min(least[0], proven)
            least[1] = min(least[1], own)

    def prove(self, arrived: float, after_skew: float, connection: Hashable) -> bool:
        if self.proven >= arrived and self.proven >= after_skew:
            return True
        return all(_proof(proven, own, key, arrived, after_skew, connection)
                   for key, (proven, own) in self._by_connection.items())
