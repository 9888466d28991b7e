"""What a restore decides from the checkpoints it read (SPEC §6), without a broker: the
restored partitions are `RestoredPartition`s built in memory, as `read_changelog` returns
them. Two price partitions; account partition 3 is the one gained."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import structlog
from aiokafka import AIOKafkaConsumer, TopicPartition
from structlog.testing import capture_logs

from monitor.account import Account
from monitor.config import fingerprint, parse_config
from monitor.engine import Engine
from monitor.events import Source
from monitor.records import Fill, LedgerEntry
from monitor.service import restorer as restorer_module
from monitor.service.changelog import NO_RESET, ConfigChanged, RestoredPartition, StateLost
from monitor.service.checkpointer import Checkpointer
from monitor.service.clients import Clients, stop_consumer
from monitor.service.metrics import Metrics
from monitor.service.positions import Positions
from monitor.service.restorer import (
    CatchUpWatch,
    Restorer,
    SplitAssignment,
    caught_up_together,
    resume_offsets,
    staying,
)
from monitor.service.settings import ServiceSettings
from monitor.service.topics import create_topics
from monitor.snapshot import Control, Offsets, Snapshots
from tests.support.clock import Clock
from tests.support.kafka import fresh_settings
from tests.support.risk import RISK

SETTINGS = ServiceSettings(config_path=Path("risk.toml"))
CONFIG = parse_config(RISK)
OURS = fingerprint(CONFIG)
THEIRS = "0123456789abcdef"  # another risk config's fingerprint


async def no_catch_up(batch: Sequence[Any], engine: Engine) -> None:
    raise AssertionError("these tests replay nothing")


def make(settings: ServiceSettings = SETTINGS, processed: Offsets | None = None) -> Restorer:
    """A restorer whose instance has applied inputs up to ``processed``."""
    metrics = Metrics()
    engine = Engine(CONFIG)
    positions = Positions(settings.topics, max_skew_ms=5, max_wait=0.5, max_stall=10.0,
                          metrics=metrics)
    for (topic, partition), offset in (processed or {}).items():
        assert partition is not None
        positions.seek(TopicPartition(topic, partition), offset)
    checkpointer = Checkpointer(engine, positions, settings, metrics, OURS)
    return Restorer(settings, CONFIG, engine, positions, checkpointer, Clients(settings),
                    metrics, OURS, structlog.get_logger("liqmon"), lambda: None, no_catch_up)


def control(offsets: Offsets, seq: int = 1, prices: dict | None = None,
            config: str | None = OURS, dedupe: dict | None = None) -> Control:
    return Control(seq=seq, written_at=0, offsets=offsets, prices=prices or {},
                   dedupe=dedupe or {}, config=config)


def partition(number: int, checkpoint: Control | None,
              accounts: Sequence[tuple[str, Account, Offsets]] = ()) -> RestoredPartition:
    snapshots = Snapshots.from_accounts([(key, account, 1, as_of)
                                         for key, account, as_of in accounts])
    return RestoredPartition(partition=number, control=checkpoint, snapshots=snapshots)


# -- which partitions -------------------------------------------------------------------------

def test_only_account_partitions_not_held_yet_are_gained() -> None:
    restorer = make()
    restorer.positions.owned.add(1)
    assigned = {TopicPartition(topic, p) for topic in ("fills", "ledger") for p in (0, 1, 2)}
    assert restorer.gained(assigned) == [0, 2]


def test_fills_and_ledger_partitions_assigned_apart_are_refused() -> None:
    with pytest.raises(SplitAssignment, match="must be a liqmon instance"):
        make().gained({TopicPartition("fills", 0), TopicPartition("ledger", 1)})


# -- the risk config --------------------------------------------------------------------------

def test_state_checkpointed_under_this_config_is_restored_without_a_word() -> None:
    with capture_logs() as logs:
        make().check_config({3: partition(3, control({}, config=OURS))})
    assert logs == []


def test_state_checkpointed_before_fingerprints_existed_is_restored_without_a_word() -> None:
    with capture_logs() as logs:
        make().check_config({3: partition(3, control({}, config=None)), 4: partition(4, None)})
    assert logs == []


def test_state_checkpointed_under_another_config_is_refused_naming_both() -> None:
    restored = {3: partition(3, control({}, config=THEIRS))}
    with pytest.raises(ConfigChanged, match=r"liqmon\.state/3") as refused:
        make().check_config(restored)
    assert (refused.value.checkpointed, refused.value.configured) == (THEIRS, OURS)


def test_accept_config_change_restores_another_configs_state_with_a_warning() -> None:
    restorer = make(replace(SETTINGS, accept_config_change=True))
    with capture_logs() as logs:
        restorer.check_config({3: partition(3, control({}, config=THEIRS))})
    assert [(log["log_level"], log["partition"], log["checkpointed"], log["configured"])
            for log in logs] == [("warning", 3, THEIRS, OURS)]


# -- the first assignment: prices -------------------------------------------------------------

AHEAD = control({("prices", 0): 500, ("prices", 1): 300, ("fills", 3): 70}, seq=9,
                prices={"BTC": (61_000.0, 2_000)})  # 800 ticks seen
BEHIND = control({("prices", 0): 400, ("prices", 1): 350, ("fills", 4): 20}, seq=7,
                 prices={"BTC": (60_000.0, 1_500)})  # 750 ticks seen


def test_the_price_table_and_offsets_come_from_the_control_record_furthest_behind() -> None:
    restorer = make()
    resume = restorer.load_prices([partition(3, AHEAD), partition(4, BEHIND)], 2)
    assert restorer.engine.prices == {"BTC": 60_000.0}
    assert resume == {TopicPartition("prices", 0): 400, TopicPartition("prices", 1): 350}


def test_the_checkpoint_sequence_continues_after_the_newest_restored() -> None:
    restorer = make()
    restorer.load_prices([partition(3, AHEAD), partition(4, BEHIND)], 2)
    assert restorer.checkpointer.seq == 9


def test_without_a_checkpoint_every_price_partition_starts_where_start_says() -> None:
    restorer = make()
    resume = restorer.load_prices([partition(3, None), partition(4, None)], 2)
    assert resume == {TopicPartition("prices", 0): None, TopicPartition("prices", 1): None}
    assert (restorer.engine.prices, restorer.checkpointer.seq) == ({}, 0)


def test_a_price_partition_the_checkpoint_never_read_starts_where_start_says() -> None:
    # prices grew from two partitions to three since the checkpoint
    resume = make().load_prices([partition(3, AHEAD)], 3)
    assert resume == {TopicPartition("prices", 0): 500, TopicPartition("prices", 1): 300,
                      TopicPartition("prices", 2): None}


# -- a partition's own inputs -----------------------------------------------------------------

def test_a_partitions_fills_and_ledger_resume_at_its_checkpointed_offsets() -> None:
    checkpoint = control({("prices", 0): 500, ("fills", 3): 70, ("ledger", 3): 12})
    assert make().resume_at(partition(3, checkpoint)) == {
        TopicPartition("fills", 3): 70, TopicPartition("ledger", 3): 12}


def test_a_partition_never_checkpointed_resumes_where_start_says() -> None:
    assert make().resume_at(partition(3, None)) == {
        TopicPartition("fills", 3): None, TopicPartition("ledger", 3): None}


def test_snapshots_no_control_record_vouches_for_are_not_taken() -> None:
    """Written after a reset by an instance that had not restored after it (or before a
    first checkpoint ended): the partition is rebuilt from its inputs' start instead, each
    unit seeing the others as they were at each record."""
    alice = Account(balances={"USDT": 250.0}, partition=3)
    unvouched = replace(partition(3, None, [("alice", alice, {("fills", 3): 9})]),
                        forgotten={"bob": {("fills", 3): 4}})
    taken = unvouched.vouched()
    assert (len(taken.snapshots), taken.forgotten) == (0, {})


def test_snapshots_a_control_record_vouches_for_are_taken() -> None:
    alice = Account(balances={"USDT": 250.0}, partition=3)
    vouched = partition(3, control({("fills", 3): 7}), [("alice", alice, {("fills", 3): 9})])
    assert vouched.vouched() is vouched


# -- caught up or behind on prices ------------------------------------------------------------

APPLIED = {("prices", 0): 500, ("prices", 1): 300}  # where this instance is in the prices


def test_a_partition_never_checkpointed_is_behind_on_prices() -> None:
    assert make(processed=APPLIED).behind_on_prices(partition(3, None))


def test_a_partition_checkpointed_before_a_tick_this_instance_applied_is_behind() -> None:
    checkpoint = control({("prices", 0): 500, ("prices", 1): 299})
    assert make(processed=APPLIED).behind_on_prices(partition(3, checkpoint))


def test_a_partition_checkpointed_where_this_instance_is_in_the_prices_is_not_behind() -> None:
    checkpoint = control({("prices", 0): 500, ("prices", 1): 300})
    assert not make(processed=APPLIED).behind_on_prices(partition(3, checkpoint))


def test_a_partition_checkpointed_ahead_of_this_instance_in_the_prices_is_not_behind() -> None:
    # its last owner had read further; the ticks in between are still to come here
    checkpoint = control({("prices", 0): 510, ("prices", 1): 300})
    assert not make(processed=APPLIED).behind_on_prices(partition(3, checkpoint))


def test_on_a_first_assignment_a_partition_without_a_checkpoint_beside_one_with_is_caught_up(
) -> None:
    """Partition 4 was checkpointed at 750 ticks, 3 never (or only by an instance that had not
    restored after the last reset): the prices resume at 4's offsets, which 3 is behind."""
    restorer = make(processed={("prices", 0): 400, ("prices", 1): 350})  # BEHIND's, loaded
    restored = {3: partition(3, None), 4: partition(4, BEHIND)}
    assert restorer.to_catch_up([3, 4], restored, first=True) == {3}


def test_on_a_first_assignment_without_any_checkpoint_nothing_is_caught_up() -> None:
    """The prices start where --start says, as every partition does."""
    restorer = make(processed={("prices", 0): 0, ("prices", 1): 0})
    restored = {3: partition(3, None), 4: partition(4, None)}
    assert restorer.to_catch_up([3, 4], restored, first=True) == set()


def test_a_later_assignment_catches_up_the_partitions_behind_on_prices() -> None:
    restorer = make(processed=APPLIED)
    ahead = control({("prices", 0): 510, ("prices", 1): 300})
    restored = {3: partition(3, None), 4: partition(4, ahead)}
    assert restorer.to_catch_up([3, 4], restored, first=False) == {3}


def test_control_records_a_restore_did_not_take_are_named_in_a_warning() -> None:
    restored = {3: replace(partition(3, None), reset_at=40, unvouched=(2, 95)),
                4: partition(4, BEHIND)}
    with capture_logs() as logs:
        make().say_unvouched(restored)
    assert [(log["log_level"], log["partition"], log["reset_at"], log["ignored_control_records"],
             log["last_ignored_at"]) for log in logs] == [("warning", 3, 40, 2, 95)]


def test_restored_accounts_whose_ids_inputs_can_no_longer_carry_are_named() -> None:
    """Checkpointed before such ids were refused: their records are dead-lettered now."""
    accounts = [(name, Account(balances={"USDT": 1.0}, partition=3), {})
                for name in ("master/sub", "sub/BTC-PERP", "alice")]
    with capture_logs() as logs:
        make().say_refused_ids({3: partition(3, BEHIND, accounts)})
    assert [(log["log_level"], log["accounts"], log["examples"]) for log in logs] == [
        ("warning", 1, ["sub/BTC-PERP"])]


# -- a changelog that lost its records ------------------------------------------------------

# -- where partitions resume ---------------------------------------------------------------------

FILLS, LEDGER, PRICES = (TopicPartition(topic, 0) for topic in ("fills", "ledger", "prices"))


def test_a_partition_resumes_at_its_checkpoint_or_where_start_says() -> None:
    starts, ends = {FILLS: 0, LEDGER: 0, PRICES: 10}, {PRICES: 900}
    checkpointed = {FILLS: 120, LEDGER: 0, PRICES: None}
    assert resume_offsets(checkpointed, starts, ends, "earliest") == (
        {FILLS: 120, LEDGER: 0, PRICES: 10}, {})
    assert resume_offsets(checkpointed, starts, ends, "latest") == (
        {FILLS: 120, LEDGER: 0, PRICES: 900}, {})


def test_a_checkpoint_the_log_now_starts_after_resumes_at_the_start_and_says_what_was_lost(
        ) -> None:
    # retention deleted ledger/0 up to 95; the checkpoint had applied it up to 40
    resume, lost = resume_offsets({FILLS: 120, LEDGER: 40}, {FILLS: 0, LEDGER: 95}, {},
                                  "earliest")
    assert (resume, lost) == ({FILLS: 120, LEDGER: 95}, {LEDGER: 40})


async def test_input_records_deleted_before_they_were_applied_are_logged_and_counted(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The embedded broker deletes no records (no retention, no DeleteRecords): the log
    bounds it would answer after retention deleted ledger/0 up to 95 stand in for it."""
    async def after_retention(consumer: Any, checkpointed: Any, start: str) -> tuple[dict, dict]:
        return {FILLS: 0, LEDGER: 95}, {}

    monkeypatch.setattr(restorer_module, "_log_bounds", after_retention)
    restorer = make()
    with capture_logs() as logs:
        resume = await restorer.starting_at(None, {FILLS: 120, LEDGER: 40}, "earliest")
    assert resume == {FILLS: 120, LEDGER: 95}
    (said,) = [log for log in logs if log["log_level"] == "error"]
    assert said["event"].startswith("input records deleted before they were applied")
    assert (said["topic"], said["partition"], said["applied_to"], said["log_start"],
            said["records_at_most"]) == ("ledger", 0, 40, 95, 55)
    assert restorer.metrics.registry.get_sample_value(
        "liqmon_input_records_lost_total", {"topic": "ledger", "partition": "0"}) == 55
    with capture_logs() as again:  # the restore taken again (a rebalance): said once
        await restorer.starting_at(None, {FILLS: 120, LEDGER: 40}, "earliest")
    assert again == []
    assert restorer.metrics.registry.get_sample_value(
        "liqmon_input_records_lost_total", {"topic": "ledger", "partition": "0"}) == 55


async def test_ticks_deleted_before_they_were_applied_are_a_warning_not_counted(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A lost tick only skips a price: no reconciliation to ask for."""
    async def after_retention(consumer: Any, checkpointed: Any, start: str) -> tuple[dict, dict]:
        return {PRICES: 5_000}, {}

    monkeypatch.setattr(restorer_module, "_log_bounds", after_retention)
    restorer = make()
    with capture_logs() as logs:
        assert await restorer.starting_at(None, {PRICES: 4_000}, "earliest") == {PRICES: 5_000}
        await restorer.starting_at(None, {PRICES: 3_000}, "earliest", say_lost=False)
    assert [(log["log_level"], log["records_at_most"]) for log in logs] == [("warning", 1_000)]
    assert logs[0]["event"].startswith("ticks deleted before they were applied")
    assert restorer.metrics.registry.get_sample_value(
        "liqmon_input_records_lost_total", {"topic": "prices", "partition": "0"}) is None


def committed_offsets(offsets: dict[tuple[str, int], int]):
    """The group's committed offset of an input partition, as `AIOKafkaConsumer.committed`
    answers (None: none committed)."""
    async def committed(tp: TopicPartition) -> int | None:
        return offsets.get((tp.topic, tp.partition))
    return committed


@pytest.mark.kafka
async def test_the_prices_are_positioned_once_though_the_first_restore_was_abandoned(
        broker) -> None:
    """A first restore positioned the prices at its oldest checkpoint (400), took some
    partitions and was abandoned for a rebalance; the next assignment gained none. Taken as
    a first restore again, it put the prices where --start says, behind what the kept
    accounts had seen: the ticks read again were stale to the engine, and partitions gained
    later, no longer behind on prices, were installed and applied against newer prices (a
    chaos drill: 184 accounts unlike replay's)."""
    settings = fresh_settings(broker.bootstrap)
    await create_topics(settings)
    prices = settings.topics.prices
    restorer = make(settings)
    consumer = AIOKafkaConsumer(bootstrap_servers=broker.bootstrap)
    await consumer.start()
    try:
        checkpointed = control({(prices, 0): 400})
        await restorer.restore_prices([partition(4, checkpointed)], consumer, 1)
        assert restorer.positions.prices() == {TopicPartition(prices, 0): 400}
        await restorer.restore([], {}, prices=consumer, accounts=consumer,
                               price_partitions=1)
        assert restorer.positions.prices() == {TopicPartition(prices, 0): 400}
    finally:
        await stop_consumer(consumer)


async def test_no_checkpoint_where_the_group_committed_offsets_stops_the_start() -> None:
    """Only a checkpoint commits: the changelog lost partition 3's records."""
    committed = committed_offsets({("fills", 3): 733, ("ledger", 3): 120})
    with pytest.raises(StateLost, match=r"^liqmon.state/3 holds no checkpoint, but group "
                                        r"'liqmon' has committed offsets for fills/3 \(733\) "
                                        r"and ledger/3 \(120\), which only a checkpoint "
                                        r"commits: .* start once with --reset-state"):
        await make().refuse_lost_state([3], {3: partition(3, None)}, committed)


async def test_no_checkpoint_of_a_partition_this_instance_checkpointed_stops_it() -> None:
    """A cluster rebuilt under a running instance: the group has no offsets any more."""
    restorer = make()
    restorer.checkpointer.restored_after(3, NO_RESET, read_to=80, checkpointed=True)
    with pytest.raises(StateLost, match="this instance read or wrote a checkpoint of it"):
        await restorer.refuse_lost_state([3], {3: partition(3, None)}, committed_offsets({}))


async def test_no_checkpoint_and_no_committed_offsets_is_a_first_start() -> None:
    await make().refuse_lost_state([3], {3: partition(3, None)}, committed_offsets({}))


async def test_a_reset_marker_without_a_checkpoint_is_a_rebuild_not_a_loss() -> None:
    """--reset-state wrote the marker: the partition is rebuilt from its inputs' start."""
    committed = committed_offsets({("fills", 3): 733})
    await make().refuse_lost_state([3], {3: replace(partition(3, None), reset_at=40)},
                                   committed)


async def test_a_checkpointed_partition_is_restored_whatever_the_group_committed() -> None:
    committed = committed_offsets({("fills", 3): 733})
    await make().refuse_lost_state([3], {3: partition(3, BEHIND)}, committed)


# -- loading a partition ----------------------------------------------------------------------

AT_CONTROL = {("prices", 0): 500, ("fills", 3): 70, ("ledger", 3): 12}


def install(restorer: Restorer, restored: RestoredPartition, positions: Offsets) -> None:
    """What `Restorer.install` does once the consumers are positioned at ``positions``."""
    for (topic, number), offset in positions.items():
        assert number is not None
        restorer.positions.seek(TopicPartition(topic, number), offset)
    restorer.load_partition(restorer.engine, restored, restorer.positions.offsets())


def test_a_restored_partitions_accounts_are_loaded() -> None:
    restorer = make()
    alice = Account(balances={"USDT": 250.0}, partition=3)
    install(restorer, partition(3, control(AT_CONTROL), [("alice", alice, AT_CONTROL)]),
            AT_CONTROL)
    assert restorer.engine.accounts["alice"].balances == {"USDT": 250.0}


def test_a_restored_partitions_duplicate_windows_are_loaded() -> None:
    restorer = make()
    checkpoint = control(AT_CONTROL, dedupe={("fills", 3): [("alice", "f-1")]})
    install(restorer, partition(3, checkpoint), AT_CONTROL)
    fill = Fill(fill_id="f-1", account="alice", symbol="BTC-PERP", side="buy", qty=0.1,
                price=60_000.0, fee=0.0, ts=1)
    restorer.engine.apply(fill, Source("fills", 3, 70))  # sent again after the checkpoint
    assert (restorer.engine.stats.duplicates, "alice" in restorer.engine.accounts) == (1, False)


def snapshot_after_the_control_record() -> Restorer:
    """A crash mid-checkpoint: alice's snapshot (250 USDT) reflects ledger up to 15, the
    control record 12. Restored and positioned at the control record."""
    restorer = make()
    alice = Account(balances={"USDT": 250.0}, partition=3)
    reflected = {**AT_CONTROL, ("ledger", 3): 15}
    install(restorer, partition(3, control(AT_CONTROL), [("alice", alice, reflected)]),
            AT_CONTROL)
    return restorer


def test_a_snapshot_newer_than_its_control_record_skips_the_inputs_it_reflects() -> None:
    restorer = snapshot_after_the_control_record()
    for offset in (12, 13, 14, 15):  # re-read from the control record's offset
        restorer.engine.apply(LedgerEntry(f"d-{offset}", "alice", "USDT", 1.0, "deposit", 1),
                              Source("ledger", 3, offset))
    assert restorer.engine.accounts["alice"].balances == {"USDT": 251.0}  # only 15 applies


def forgotten_after_the_control_record() -> Restorer:
    """A crash mid-checkpoint: alice, emptied by a withdrawal at ledger/3@12, was tombstoned
    reflecting ledger up to 13, and the control record (ledger 12) was never written after it.
    Restored and positioned at the control record."""
    restorer = make()
    restored = replace(partition(3, control(AT_CONTROL)),
                       forgotten={"alice": {**AT_CONTROL, ("ledger", 3): 13}})
    install(restorer, restored, AT_CONTROL)
    return restorer


def test_an_account_forgotten_after_its_control_record_skips_the_inputs_its_tombstone_reflects(
        ) -> None:
    restorer = forgotten_after_the_control_record()
    engine = restorer.engine
    # re-read: the withdrawal her tombstone reflects, then a deposit after it
    engine.apply(LedgerEntry("w-12", "alice", "USDT", -250.0, "withdrawal", 1),
                 Source("ledger", 3, 12))
    assert "alice" not in engine.accounts  # not opened again owing 250
    engine.apply(LedgerEntry("d-13", "alice", "USDT", 40.0, "deposit", 1), Source("ledger", 3, 13))
    assert engine.accounts["alice"].balances == {"USDT": 40.0}


def test_a_forgotten_accounts_marks_go_with_its_partition_when_it_is_handed_over() -> None:
    restorer = forgotten_after_the_control_record()
    restorer.engine.drop_partition(3)
    # nothing left to wait for: fills and ledger take the fast path again
    assert restorer.engine._caught_up_from == {}


def test_marks_of_an_account_emptied_after_its_restore_go_with_its_partition() -> None:
    restorer = snapshot_after_the_control_record()
    restorer.engine.apply(LedgerEntry("w-15", "alice", "USDT", -250.0, "withdrawal", 1),
                          Source("ledger", 3, 15))  # past her snapshot: emptied, forgotten
    assert "alice" not in restorer.engine.accounts
    restorer.engine.drop_partition(3)
    assert restorer.engine._caught_up_from == {}


def test_partitions_checkpointed_at_one_price_point_are_caught_up_together() -> None:
    """After a crash, the dead instance's partitions were all checkpointed together: their
    ticks are applied again once. A partition checkpointed at another point of the price
    stream, or with another price table, goes on its own; those never checkpointed go
    together."""
    at_400 = control({("prices", 0): 400, ("fills", 3): 7, ("ledger", 3): 2})
    also_400 = control({("prices", 0): 400, ("fills", 5): 70, ("ledger", 5): 9})
    at_410 = control({("prices", 0): 410, ("fills", 6): 1, ("ledger", 6): 1})
    other_table = control({("prices", 0): 400}, prices={"BTC-PERP": (1.0, 1)})
    parts = [partition(3, at_400), partition(4, None), partition(5, also_400),
             partition(6, at_410), partition(7, None), partition(8, other_table)]
    assert caught_up_together(parts, "prices") == {
        3: [3, 5], 5: [3, 5], 4: [4, 7], 7: [4, 7], 6: [6], 8: [8]}


def test_a_catch_up_of_several_partitions_is_described_naming_them() -> None:
    catching_up = CatchUpWatch([3, 5], 10.0, structlog.get_logger("liqmon"), Metrics())
    assert catching_up.describe() == ("catching up account partitions 3, 5: 0 records "
                                      "replayed")


# -- a catch-up that stops making progress ----------------------------------------------------

FILLS_3, PRICES_0 = TopicPartition("fills", 3), TopicPartition("prices", 0)


def watch(max_stall: float = 10.0) -> tuple[CatchUpWatch, Metrics, Clock]:
    clock, metrics = Clock(), Metrics()
    return (CatchUpWatch([3], max_stall, structlog.get_logger("liqmon"), metrics, clock),
            metrics, clock)


def stalled_gauge(metrics: Metrics, tp: TopicPartition) -> float | None:
    return metrics.registry.get_sample_value(
        "liqmon_input_stalled", {"topic": tp.topic, "partition": str(tp.partition)})


def test_a_catch_up_without_progress_for_the_stall_timeout_names_what_it_waits_for() -> None:
    catching_up, metrics, clock = watch(max_stall=10.0)
    read = {FILLS_3: 40, PRICES_0: 500}
    with capture_logs() as logs:
        catching_up.observe(read, 25, {FILLS_3: (40, 90)})
        clock.now = 9.9
        catching_up.observe(read, 25, {FILLS_3: (40, 90)})
        assert logs == [] and stalled_gauge(metrics, FILLS_3) is None
        clock.now = 10.0
        catching_up.observe(read, 25, {FILLS_3: (40, 90)})
    assert [(log["log_level"], log["partitions"], log["records_replayed"], log["waiting_on"])
            for log in logs] == [("error", [3], 25, [{"topic": "fills", "partition": 3,
                                                     "read_to": 40, "end": 90}])]
    assert stalled_gauge(metrics, FILLS_3) == 1
    assert catching_up.describe() == (
        "catching up account partition 3: 25 records replayed; stalled for 10 s waiting for "
        "fills/3 (read to 40, end 90), which the broker does not deliver")


def test_a_catch_up_that_reads_or_applies_anything_starts_its_stall_clock_again() -> None:
    catching_up, metrics, clock = watch(max_stall=10.0)
    catching_up.observe({FILLS_3: 40}, 25, {FILLS_3: (40, 90)})
    clock.now = 8.0
    catching_up.observe({FILLS_3: 41}, 25, {FILLS_3: (41, 90)})  # a record read
    clock.now = 16.0
    catching_up.observe({FILLS_3: 41}, 26, {FILLS_3: (41, 90)})  # a record applied
    clock.now = 25.9
    catching_up.observe({FILLS_3: 41}, 26, {FILLS_3: (41, 90)})
    assert catching_up.stalled == {} and stalled_gauge(metrics, FILLS_3) is None


def test_a_stalled_catch_up_that_moves_on_says_so_and_clears_its_gauges() -> None:
    catching_up, metrics, clock = watch(max_stall=10.0)
    catching_up.observe({FILLS_3: 40}, 25, {FILLS_3: (40, None)})
    clock.now = 12.0
    catching_up.observe({FILLS_3: 40}, 25, {FILLS_3: (40, None)})
    assert "fills/3 (read to 40, end unknown)" in catching_up.describe()
    clock.now = 30.0
    with capture_logs() as logs:
        catching_up.observe({FILLS_3: 41}, 25, {FILLS_3: (41, None)})
    assert [(log["event"], log["stalled_seconds"]) for log in logs] == [
        ("catch-up delivers again", 30.0)]
    assert stalled_gauge(metrics, FILLS_3) is None
    assert catching_up.describe() == "catching up account partition 3: 25 records replayed"


def test_a_catch_ups_end_leaves_the_gauge_of_a_partition_the_loop_holds_stalled() -> None:
    catching_up, metrics, clock = watch(max_stall=10.0)
    waiting = {FILLS_3: (40, 90), PRICES_0: (500, 700)}
    catching_up.observe({FILLS_3: 40, PRICES_0: 500}, 25, waiting)
    clock.now = 10.0
    catching_up.observe({FILLS_3: 40, PRICES_0: 500}, 25, waiting)
    catching_up.clear(keep={PRICES_0})  # stopped while the loop also has prices/0 stalled
    assert (stalled_gauge(metrics, FILLS_3), stalled_gauge(metrics, PRICES_0)) == (None, 1)


# -- partitions kept in memory through a rebalance --------------------------------------------

def test_partitions_the_next_generation_gives_back_stay_where_they_were() -> None:
    assert staying({0, 1, 2}, revoked_in=7, assigned_in=8, assigned={0, 2, 3}) == [0, 2]


def test_kept_partitions_are_restored_afresh_after_a_generation_without_this_instance() -> None:
    # generation 8 went by without it: another instance may have processed them then
    assert staying({0, 1, 2}, revoked_in=7, assigned_in=9, assigned={0, 1, 2}) == []


def test_kept_partitions_are_restored_afresh_once_the_group_expelled_this_instance() -> None:
    assert staying({0, 1}, revoked_in=-1, assigned_in=0, assigned={0, 1}) == []


def test_the_embedded_brokers_first_generation_zero_counts_as_a_generation() -> None:
    assert staying({0, 1}, revoked_in=0, assigned_in=1, assigned={0}) == [0]
