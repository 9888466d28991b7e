"""A fleet of `liqmon run` processes in one consumer group, on the embedded broker, and what
it left in the changelog: for the scale-out tests and the chaos drill (tests/chaos.py)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import replace

from monitor.account import RiskKey
from monitor.engine import Engine
from monitor.service.broker import free_port
from monitor.service.changelog import read_changelog
from monitor.service.metrics import scrape_input_offsets
from monitor.service.settings import ServiceSettings
from tests.support.changelog import snapshot_history
from tests.support.compare import state_of
from tests.support.kafka import MonitorProcess, fresh_settings, run_args

PARTITIONS = 4


class Instance(MonitorProcess):
    def __init__(self, settings: ServiceSettings, checkpoint_interval: float = 0.2,
                 merge_wait: float = 5.0, extra: Sequence[str] = ()) -> None:
        self.port = free_port()
        super().__init__(run_args(
            settings, "--group", settings.group, "--metrics-port", str(self.port),
            "--session-timeout", "2", "--checkpoint-interval", str(checkpoint_interval),
            "--merge-wait", str(merge_wait), "--log-level", "info", *extra))

    def positions(self) -> dict[tuple[str, int], int]:
        """liqmon_input_offset of this instance: what it has applied, per partition."""
        return scrape_input_offsets(self.port)

    def owned(self, settings: ServiceSettings) -> set[int]:
        return {p for (topic, p) in self.positions() if topic == settings.topics.fills}


async def settled(instances: list[Instance], settings: ServiceSettings,
                  timeout: float = 60) -> None:
    """Until the live instances own every account partition exactly once between them."""
    deadline = time.monotonic() + timeout
    while True:
        owned = [await asyncio.to_thread(i.owned, settings) for i in instances]
        if sorted(p for parts in owned for p in parts) == list(range(PARTITIONS)) and all(owned):
            return
        assert time.monotonic() < deadline, f"group did not settle: {owned}"
        await asyncio.sleep(0.2)


async def consumed(instances: list[Instance], settings: ServiceSettings,
                   ends: dict[tuple[str, int], int], timeout: float = 60) -> None:
    """Until every instance applied all prices up to the ends, and some instance applied
    each account partition up to its end."""
    deadline = time.monotonic() + timeout
    while True:
        seen = [await asyncio.to_thread(i.positions) for i in instances]
        if all(
            all(p.get(key, -1) >= end for p in seen) if key[0] == settings.topics.prices
            else max(p.get(key, -1) for p in seen) >= end
            for key, end in ends.items()
        ):
            return
        assert time.monotonic() < deadline, f"not consumed: {ends} vs {seen}"
        await asyncio.sleep(0.02)


async def final_state(settings: ServiceSettings, config) -> dict:
    """The accounts a restore of the whole changelog takes as checkpointed: those of the
    partitions a control record vouches for (`RestoredPartition.vouched`); a partition
    without one would be rebuilt from its inputs, and shows here as holding nothing."""
    restored = await read_changelog(settings.bootstrap, settings.topics.state,
                                    range(PARTITIONS))
    engine = Engine(config)
    for part in restored.values():
        engine.load_accounts(part.vouched().snapshots)
    return state_of(engine)["accounts"]


async def start(settings: ServiceSettings, checkpoint_interval: float = 0.2,
                merge_wait: float = 5.0, extra: Sequence[str] = ()) -> Instance:
    """A `liqmon run` process of the fleet, once it consumes (``extra``: more options)."""
    instance = Instance(settings, checkpoint_interval, merge_wait, extra)
    await instance.start()
    await asyncio.wait_for(instance.consuming.wait(), timeout=60)
    return instance


def multi_partition(broker) -> ServiceSettings:
    return replace(fresh_settings(broker.bootstrap), partitions=PARTITIONS)


async def snapshots_going_back(settings: ServiceSettings) -> list[tuple[int, int, RiskKey]]:
    """(partition, offset, key) of every changelog snapshot after its partition's last reset
    marker that reflects fewer of its partition's inputs than an earlier one of the same
    account: written by an instance that no longer owned the partition. (Before a reset, a
    rebuild's snapshots reflect fewer inputs than those of the state it replaces.)"""
    t = settings.topics
    newest: dict[tuple[int, RiskKey], int] = {}
    going_back = []
    for partition, at, key, _, as_of in await snapshot_history(settings.bootstrap, t.state,
                                                               since_reset=True):
        inputs = sum(offset for (topic, _), offset in as_of.items() if topic != t.prices)
        if inputs < newest.get((partition, key), 0):
            going_back.append((partition, at, key))
        newest[(partition, key)] = max(newest.get((partition, key), 0), inputs)
    return going_back
