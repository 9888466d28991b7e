"""How many records a loop turn applies (`monitor.service.pacing`): as many as its budget
allows at the cost just seen, so that no turn holds the loop past a heartbeat."""

from __future__ import annotations

import itertools
import time
from typing import Any

import orjson
import pytest

from monitor.config import parse_config
from monitor.service import runner
from monitor.service.pacing import CAREFUL_LIMIT, TurnPacer
from tests.support.kafka import RunningMonitor, fresh_settings, produce, wait_processed
from tests.support.risk import RISK


def test_a_turn_takes_the_whole_batch_while_records_are_cheap() -> None:
    pacer = TurnPacer(5_000, budget=0.2)
    pacer.took(5_000, 0.05)  # 10 µs a record: well within the budget
    assert pacer.limit == 5_000


def test_a_turn_that_overran_its_budget_cuts_the_next_to_fit_it() -> None:
    # The catch-up after a restore: 5,000 ticks, each re-valuing every holder, in 55 s.
    # At 11 ms a record, 0.2 s holds 18 of them.
    pacer = TurnPacer(5_000, budget=0.2)
    pacer.took(5_000, 55.0)
    assert pacer.limit == 18


def test_the_limit_doubles_back_once_a_full_batch_fits_the_budget() -> None:
    pacer = TurnPacer(5_000, budget=0.2)
    pacer.took(5_000, 55.0)
    limits = []
    for _ in range(10):
        pacer.took(pacer.limit, 0.01)  # the backlog of slow ticks is over
        limits.append(pacer.limit)
    assert limits == [36, 72, 144, 288, 576, 1_152, 2_304, 4_608, 5_000, 5_000]


def test_a_partial_batch_within_the_budget_leaves_the_limit_as_it_is() -> None:
    # fewer records than the limit were ready: nothing says more would fit
    pacer = TurnPacer(5_000, budget=0.2)
    pacer.took(5_000, 1.0)
    assert pacer.limit == 1_000
    pacer.took(300, 0.01)
    pacer.took(0, 0.0)
    assert pacer.limit == 1_000


def test_a_restore_starts_again_from_a_few_records_and_doubles_back() -> None:
    # The first turn after a restore would take 5,000 ticks that each re-value every holder
    # (3-8 s at 100,000 accounts) before any batch showed the cost: it takes 64.
    pacer = TurnPacer(5_000, budget=0.2)
    pacer.careful()
    assert pacer.limit == CAREFUL_LIMIT == 64
    pacer.took(64, 0.001)
    assert pacer.limit == 128
    pacer.took(10, 1.0)  # already cut further: careful does not raise it
    pacer.careful()
    assert pacer.limit == 2


def test_one_record_slower_than_the_budget_still_takes_one() -> None:
    pacer = TurnPacer(5_000, budget=0.2)
    pacer.took(1, 0.5)
    assert pacer.limit == 1


@pytest.mark.asyncio(loop_scope="session")
async def test_the_loop_takes_fewer_records_after_a_batch_that_held_it_too_long(
        broker, monkeypatch: pytest.MonkeyPatch) -> None:
    """Records made to cost 1 ms each: a turn of more than 200 held the loop past the
    budget, so the next takes at most what 0.2 s allows. Without pacing the loop took each
    backlog (3,000 records, then 1,000) in a turn or two."""
    settings = fresh_settings(broker.bootstrap)
    t = settings.topics
    ticks = [(t.prices, b"BTC-PERP", orjson.dumps({"symbol": "BTC-PERP", "price": 50_000 + n,
                                                  "ts": n + 1})) for n in range(4_000)]
    ends = await produce(broker.bootstrap, ticks[:3_000])
    sizes: list[int] = []
    apply_batch = runner.Monitor.apply_batch

    def costly(self: runner.Monitor, batch: Any, engine: Any, *args: Any, **kwargs: Any) -> Any:
        sizes.append(len(batch))
        time.sleep(0.001 * len(batch))
        return apply_batch(self, batch, engine, *args, **kwargs)

    monkeypatch.setattr(runner.Monitor, "apply_batch", costly)
    async with RunningMonitor(settings, parse_config(RISK)) as monitor:
        await wait_processed(monitor, ends)
        # a second backlog, fetched at once: turns of at most what 0.2 s allows take it
        await wait_processed(monitor, await produce(broker.bootstrap, ticks[3_000:]))
    after_long = [later for earlier, later in itertools.pairwise(sizes)
                  if earlier > 200]
    assert after_long, f"no turn held the loop past its budget: {sizes}"
    assert max(after_long) <= 200, sizes


@pytest.mark.asyncio(loop_scope="session")
async def test_the_loop_starts_carefully_after_a_restore(broker) -> None:
    """Nothing to apply yet: the limit the restore set is the one the first records meet."""
    async with RunningMonitor(fresh_settings(broker.bootstrap), parse_config(RISK)) as monitor:
        assert monitor._pacer.limit == CAREFUL_LIMIT
