"""Rebalances on the embedded broker, monitors in the test's process (SPEC §6)."""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace

import pytest
import structlog

import monitor.service.restorer
from monitor.config import load_config
from monitor.service.changelog import RestoreProgress, read_changelog
from monitor.service.runner import Monitor
from monitor.service.settings import ServiceSettings
from monitor.service.topics import create_topics
from tests.support.kafka import fresh_settings
from tests.support.paths import REPO

pytestmark = pytest.mark.asyncio(loop_scope="session")
CONFIG = load_config(REPO / "examples" / "risk.toml")
SLOW = "slow-instance"  # client id of the instance whose changelog reads are slow


@pytest.fixture
def reads(monkeypatch) -> list[str]:
    """The client id of every changelog read, in order."""
    clients: list[str] = []

    async def read(bootstrap, topic, partitions, client_id="", **options):
        clients.append(client_id)
        return await read_changelog(bootstrap, topic, partitions, client_id=client_id,
                                    **options)

    monkeypatch.setattr(monitor.service.restorer, "read_changelog", read)
    return clients


@pytest.fixture
def slow_reads(monkeypatch) -> list[float]:
    """Changelog reads by the instance whose client id is SLOW take 5 s longer, reporting
    progress as a long read does, without holding the event loop (a large state topic, a
    slow broker). Returns the times they began."""
    began: list[float] = []

    async def read(bootstrap, topic, partitions, client_id="", progress=None, **options):
        if client_id.startswith(SLOW):
            began.append(time.monotonic())
            for _ in range(50):
                await asyncio.sleep(0.1)
                if progress is not None:
                    progress(RestoreProgress())
        return await read_changelog(bootstrap, topic, partitions, client_id=client_id,
                                    progress=progress, **options)

    monkeypatch.setattr(monitor.service.restorer, "read_changelog", read)
    return began


async def run_all(instances: list[Monitor], settle: float) -> None:
    """Start each instance once the one before is ready; all ready, then ``settle`` s."""
    tasks = []
    try:
        for instance in instances:
            tasks.append(asyncio.create_task(instance.run()))
            await asyncio.wait_for(instance.ready.wait(), timeout=60)
        await asyncio.sleep(settle)
        deadline = time.monotonic() + 30
        while not all(instance.ready.is_set() for instance in instances):
            assert time.monotonic() < deadline, "not every instance is ready again"
            await asyncio.sleep(0.05)
    finally:
        for instance in instances:
            instance.request_stop()
        await asyncio.wait_for(asyncio.gather(*tasks), timeout=30)


def owned_once_each(instances: list[Monitor], partitions: int) -> bool:
    owned = [instance._positions.owned for instance in instances]
    return sorted(p for parts in owned for p in parts) == list(range(partitions))


def slow(settings: ServiceSettings) -> ServiceSettings:
    return replace(settings, client_id=SLOW)


async def test_a_restore_longer_than_the_session_timeout_happens_once(broker, slow_reads):
    """aiokafka sends no heartbeat while its assignment callback runs. A restore done there
    that outlasts --session-timeout gets the instance expelled: the group rebalances, the
    instance restores again, is expelled again, for ever — while the other instance hands its
    partitions back and forth. Restored beside the heartbeats, it happens once."""
    settings = fresh_settings(broker.bootstrap, partitions=4)  # session timeout 2 s
    await create_topics(settings)
    first, second = Monitor(settings, CONFIG), Monitor(slow(settings), CONFIG)
    await run_all([first, second], settle=4 * settings.session_timeout_ms / 1000)
    assert len(slow_reads) == 1
    assert first._positions.owned and second._positions.owned
    assert owned_once_each([first, second], 4)


async def test_a_restore_under_way_gives_up_when_the_group_rebalances_again(broker,
                                                                            slow_reads):
    """A third instance joins while the second is still reading the changelog: the second
    gives its restore up at once (its partitions are being revoked) rather than hold the
    rebalance up, then restores what the new assignment gives it. No partition ends up owned
    twice or by nobody."""
    settings = fresh_settings(broker.bootstrap, partitions=4)
    await create_topics(settings)
    first, second, third = (Monitor(settings, CONFIG), Monitor(slow(settings), CONFIG),
                            Monitor(settings, CONFIG))
    tasks = [asyncio.create_task(first.run())]
    with structlog.testing.capture_logs() as logs:
        try:
            await asyncio.wait_for(first.ready.wait(), timeout=30)
            tasks.append(asyncio.create_task(second.run()))
            while not slow_reads:
                await asyncio.sleep(0.05)
            tasks.append(asyncio.create_task(third.run()))
            await asyncio.wait_for(
                asyncio.gather(second.ready.wait(), third.ready.wait()), timeout=60)
            await asyncio.sleep(2 * settings.session_timeout_ms / 1000)
            assert owned_once_each([first, second, third], 4)
        finally:
            for instance in (first, second, third):
                instance.request_stop()
            await asyncio.wait_for(asyncio.gather(*tasks), timeout=30)
    assert "restore abandoned: the group is rebalancing again" in [
        entry["event"] for entry in logs]
    assert len(slow_reads) == 2  # the one given up, and the new assignment's


async def test_partitions_an_instance_keeps_through_a_rebalance_are_not_restored_again(
        broker, reads):
    """With aiokafka every rebalance revokes every partition. Those the next generation gives
    back stay in memory, checkpointed for whoever might have taken them, and go on where they
    were: only the partitions that move are restored."""
    settings = fresh_settings(broker.bootstrap, partitions=4)
    await create_topics(settings)
    first, second = Monitor(replace(settings, client_id="first"), CONFIG), \
        Monitor(replace(settings, client_id="second"), CONFIG)
    with structlog.testing.capture_logs() as logs:
        await run_all([first, second], settle=2 * settings.session_timeout_ms / 1000)
    assert reads == ["first-restore", "second-restore"]  # first restored once, at its start
    assert owned_once_each([first, second], 4) and first._positions.owned
    kept = [entry["partitions"] for entry in logs
            if entry["event"] == "partitions kept through the rebalance"]
    assert kept == [sorted(first._positions.owned)]
    kept_here = len(first._positions.owned)
    assert outcomes(first) == {"restored": 4, "kept": kept_here, "handed_over": 4 - kept_here}
    assert outcomes(second) == {"restored": 4 - kept_here, "kept": 0, "handed_over": 0}


async def test_an_instance_is_not_ready_while_its_group_rebalances(broker) -> None:
    """A second instance joins: the first's partitions are revoked and nothing is applied
    until the group's next assignment. /readyz says so meanwhile, then is 200 again."""
    settings = fresh_settings(broker.bootstrap, partitions=4)
    await create_topics(settings)
    first, second = Monitor(settings, CONFIG), Monitor(settings, CONFIG)
    reasons: list[str] = []
    clear = first.ready.clear

    def not_ready() -> None:
        if first.ready.is_set():
            reasons.append(first.not_ready_because())
        clear()

    first.ready.clear = not_ready  # type: ignore[method-assign]
    await run_all([first, second], settle=0)
    assert reasons[0] == f"waiting for consumer group {settings.group} to assign partitions (0 s)"
    assert reasons[-1] == "stopping"
    assert owned_once_each([first, second], 4)


def outcomes(instance: Monitor) -> dict[str, float | None]:
    """liqmon_rebalance_partitions_total of an instance, by outcome."""
    return {outcome: instance.metrics.registry.get_sample_value(
        "liqmon_rebalance_partitions_total", {"outcome": outcome})
        for outcome in ("restored", "kept", "handed_over")}



async def test_a_revocation_during_the_final_checkpoint_writes_nothing_after_it(broker) -> None:
    """SIGTERM while the group rebalances (another instance just left): the revocation comes
    while the final checkpoint holds the loop's lock, and waits for it. It then finds its
    partitions covered by that checkpoint: before, it wrote one of its own while the clients
    closed, and the instance could exit 1 on `ProducerClosed` after a clean stop."""
    from aiokafka import TopicPartition

    settings = fresh_settings(broker.bootstrap, partitions=2)
    await create_topics(settings)
    instance = Monitor(settings, CONFIG)
    revoked = {TopicPartition(settings.topics.fills, p) for p in range(2)}
    revoking: list[asyncio.Task[None]] = []
    final_seq: list[int] = []
    checkpoint = instance._checkpoint

    async def final_checkpoint_meets_a_revocation(partitions: set[int]) -> bool:
        if instance._stopping.is_set() and not revoking:
            revoking.append(asyncio.create_task(instance.on_revoked(revoked)))
            await asyncio.sleep(0.1)  # the revocation is under way: it waits for the lock
            final_seq.append(instance._checkpointer.seq + 1)
        return await checkpoint(partitions)

    instance._checkpoint = final_checkpoint_meets_a_revocation  # type: ignore[method-assign]
    task = asyncio.create_task(instance.run())
    try:
        await asyncio.wait_for(instance.ready.wait(), timeout=30)
        instance.request_stop()
        await asyncio.wait_for(task, timeout=30)  # a clean stop: run() raises nothing
        await asyncio.gather(*revoking)
        assert revoking and instance._checkpointer.seq == final_seq[0]  # no checkpoint after it
    finally:
        instance.request_stop()
        await asyncio.gather(task, *revoking, return_exceptions=True)
