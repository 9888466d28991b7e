"""Checkpoints in the compacted `liqmon.state` topic, and restore from it (SPEC §6).

Changelog partition p holds the accounts and isolated positions of input partition p of
fills/ledger (keyed by account, or `snapshot.state_key` of the position; a tombstone once one may
be forgotten) and, written last in every checkpoint, a control
record with the input offsets, price table and duplicate windows the accounts correspond to. A
`reset` marker (written by --reset-state) makes a restore ignore everything before it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from monitor.account import Account, RiskKey, UnitKey
from monitor.config import RiskConfig
from monitor.engine import Engine
from monitor.errors import LiqmonError
from monitor.service.outbox import Outgoing
from monitor.service.security import PLAINTEXT, KafkaSecurity
from monitor.service.settings import Topics
from monitor.snapshot import (
    CONTROL_KEY,
    KIND_HEADER,
    Control,
    Offsets,
    SnapshotError,
    decode_account,
    decode_control,
    encode_account,
    encode_control,
    risk_key,
    state_key,
)

ACCOUNT, CONTROL, RESET = b"account", b"control", b"reset"
RESET_KEY = b"\x00liqmon.reset"


class StateCorrupt(LiqmonError):
    """A checkpoint record that cannot be decoded: the start stops rather than forget state."""

    def __init__(self, topic: str, partition: int, offset: int, detail: str) -> None:
        super().__init__(
            f"checkpoint record {topic}/{partition}@{offset} cannot be decoded ({detail}). "
            "Refusing to start with part of the state missing. To discard the checkpoints and "
            "rebuild state from the input topics, start once with --reset-state."
        )
        self.topic, self.partition, self.offset = topic, partition, offset


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
    # accounts by id and isolated positions by UnitKey: (state, seq, offsets it reflects)
    accounts: dict[RiskKey, tuple[Account, int, Offsets]] = field(default_factory=dict)
    records_read: int = 0


@dataclass
class _Latest:
    """What survives of one changelog partition: the newest record per key, undecoded."""

    values: dict[bytes, tuple[int, bytes | None]] = field(default_factory=dict)
    control: tuple[int, bytes] | None = None
    read: int = 0


@dataclass(slots=True)
class RestoreProgress:
    """How far a restore has got, for /readyz and the log."""

    records: int = 0  # changelog records read
    expected: int = 0  # records between the partitions' first and end offsets (compaction
    #                    leaves gaps, so at most this many)
    accounts: int = 0  # distinct account keys read so far


async def read_changelog(bootstrap: str, topic: str, partitions: Iterable[int],
                         client_id: str = "liqmon-restore",
                         request_timeout_ms: int = 30_000,
                         progress: Callable[[RestoreProgress], None] | None = None,
                         security: KafkaSecurity = PLAINTEXT,
                         ) -> dict[int, RestoredPartition]:
    """Read changelog partitions to their end and decode what survives of them; call
    ``progress`` after each fetched batch."""
    wanted = [TopicPartition(topic, p) for p in partitions]
    if not wanted:
        return {}
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None,
                                enable_auto_commit=False, client_id=client_id,
                                auto_offset_reset="earliest",
                                request_timeout_ms=request_timeout_ms,
                                max_partition_fetch_bytes=16 * 1024 * 1024,
                                # a long-poll on a drained partition only delays the end
                                fetch_max_wait_ms=20, **security.client_kwargs())
    await consumer.start()
    latest = {tp.partition: _Latest() for tp in wanted}
    try:
        consumer.assign(wanted)
        await consumer.seek_to_beginning(*wanted)
        # Read up to the end as of now (what this instance's predecessors wrote); an empty
        # partition is done without a fetch.
        ends = await consumer.end_offsets(wanted)
        firsts = {tp: await consumer.position(tp) for tp in wanted}
        remaining = {tp for tp in wanted if firsts[tp] < ends[tp]}
        status = RestoreProgress(expected=sum(ends[tp] - firsts[tp] for tp in wanted))
        while remaining:
            batch = await consumer.getmany(*remaining, timeout_ms=200, max_records=50_000)
            for tp, records in batch.items():
                state = latest[tp.partition]
                for record in records:
                    state.read += 1
                    kind = dict(record.headers).get(KIND_HEADER, ACCOUNT)
                    if kind == RESET:
                        latest[tp.partition] = state = _Latest(read=state.read)
                    elif kind == CONTROL:
                        state.control = (record.offset, record.value)
                    elif record.key is not None:
                        state.values[record.key] = (record.offset, record.value)
            for tp in list(remaining):
                if await consumer.position(tp) >= ends[tp]:
                    remaining.discard(tp)
            if progress is not None and batch:
                status.records = sum(state.read for state in latest.values())
                status.accounts = sum(len(state.values) for state in latest.values())
                progress(status)
    finally:
        await consumer.stop()
    return {p: _decode(topic, p, state) for p, state in latest.items()}


def _decode(topic: str, partition: int, latest: _Latest) -> RestoredPartition:
    control = None
    if latest.control is not None:
        offset, raw = latest.control
        try:
            control = decode_control(raw)
        except SnapshotError as exc:
            raise StateCorrupt(topic, partition, offset, str(exc)) from None
    restored = RestoredPartition(partition=partition, control=control, records_read=latest.read)
    for key, (offset, raw) in latest.values.items():
        if raw is None:
            continue  # tombstone: the account was forgotten
        try:
            restored.accounts[risk_key(key)] = decode_account(raw)
        except (SnapshotError, UnicodeDecodeError) as exc:
            raise StateCorrupt(topic, partition, offset, str(exc)) from None
    return restored


async def write_reset_markers(producer: AIOKafkaProducer, topic: str,
                              partitions: Iterable[int]) -> None:
    """Make every later restore ignore what the partitions hold so far (--reset-state)."""
    stamp = str(int(time.time() * 1000)).encode()
    futures = [await producer.send(topic, stamp, key=RESET_KEY, partition=p,
                                   headers=[(KIND_HEADER, RESET)]) for p in partitions]
    await asyncio.gather(*futures)


def snapshot_messages(engine: Engine, dirty: dict[RiskKey, int], seq: int,
                      as_of: dict[int, Offsets], topics: Topics) -> list[Outgoing]:
    """Snapshots (or tombstones of deleted ones) of the accounts and isolated positions in
    ``dirty`` (key → partition), each stamped with the input offsets ``as_of`` its
    partition's state reflects."""
    header = [(KIND_HEADER, ACCOUNT)]
    snapshots = []
    for key, partition in dirty.items():
        account = (engine.units.get(key) if isinstance(key, UnitKey)
                   else engine.accounts.get(key))
        value = None if account is None else encode_account(account, seq, as_of[partition])
        snapshots.append(Outgoing(topic=topics.state, key=state_key(key), value=value,
                                  headers=header, partition=partition))
    return snapshots


def controls_now(engine: Engine, seq: int, as_of: dict[int, Offsets], topics: Topics,
                 written_at_ms: int, config: str) -> dict[int, Control]:
    """The control record of each checkpointed partition — offsets, price table, duplicate
    windows, and ``config``, the fingerprint of the risk config — as they are now (copies:
    cheap to take, encoded later)."""
    prices = engine.price_table()
    return {partition: Control(
        seq=seq, written_at=written_at_ms, offsets=offsets, prices=prices, config=config,
        dedupe={(topic, partition): engine.dedupe_ids(topic, partition)
                for topic in (topics.fills, topics.ledger)})
        for partition, offsets in as_of.items()}


def control_message(partition: int, control: Control, topics: Topics) -> Outgoing:
    """A control record, to write after the snapshots have been acknowledged: a control
    record vouches for what precedes it."""
    return Outgoing(topic=topics.state, key=CONTROL_KEY, value=encode_control(control),
                    headers=[(KIND_HEADER, CONTROL)], partition=partition)


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
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, client_id="liqmon-stress",
                                **security.client_kwargs())
    await admin.start()
    try:
        described = await admin.describe_topics([topic])
    finally:
        await admin.close()
    partitions = [p["partition"] for t in described if t["topic"] == topic
                  for p in t["partitions"]]
    restored = await read_changelog(bootstrap, topic, sorted(partitions),
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
        for key, (account, _, _) in part.accounts.items():
            unknown = sorted({*account.balances} - set(config.assets)
                             | {*account.positions} - set(config.instruments))
            if isinstance(key, UnitKey) and key.symbol not in config.instruments:
                unknown.append(key.symbol)
            if unknown:
                raise UnknownToConfig(topic, key, unknown)
            engine.load_account(key, account)
    return engine


class NoCheckpoint(LiqmonError):
    def __init__(self, topic: str) -> None:
        super().__init__(f"state topic {topic!r} holds no checkpoint: does it exist, is "
                         "--topic-state right, has the fleet checkpointed yet?")


class UnknownToConfig(LiqmonError):
    """A checkpointed account holds an asset or instrument the given risk config lacks."""

    def __init__(self, topic: str, key: RiskKey, names: list[str]) -> None:
        held = (f"isolated position {key.label()!r}" if isinstance(key, UnitKey)
                else f"account {key!r}")
        super().__init__(f"{held} in {topic!r} holds {', '.join(names)}, which the risk "
                         "config does not define: give the fleet's config (--config)")
