"""The demo's live view and its start (the run itself: test_process)."""

from __future__ import annotations

import asyncio
import io
import socket
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from rich.console import Console

from monitor import demo
from monitor.demo import Demo, DemoView, plan_summary
from monitor.service.settings import ServiceSettings


def test_plan_summary_names_closes_and_partial_reductions_in_order() -> None:
    plan = {"steps": [
        {"symbol": "ETH-PERP", "side": "buy", "qty": 40.0, "close": True},
        {"symbol": "BTC-PERP", "side": "sell", "qty": 0.0250000001, "close": False},
    ]}
    assert plan_summary(plan) == "close ETH-PERP, sell 0.025 BTC-PERP"


def starting() -> Any:
    """What `Demo._until_ready` reads of a demo and a monitor (no broker: only the waiting)."""
    return (SimpleNamespace(console=Console(file=io.StringIO())),
            SimpleNamespace(ready=asyncio.Event()))


async def test_the_demo_starts_once_the_monitor_is_ready() -> None:
    the_demo, monitor = starting()
    run = asyncio.create_task(asyncio.sleep(3600))  # a monitor that keeps running
    asyncio.get_running_loop().call_later(0.05, monitor.ready.set)
    await Demo._until_ready(the_demo, monitor, run)
    run.cancel()


async def test_the_demo_raises_what_stopped_the_monitor_before_it_was_ready() -> None:
    the_demo, monitor = starting()

    async def broken() -> None:
        raise OSError("the broker went away")

    with pytest.raises(OSError, match="the broker went away"):
        await Demo._until_ready(the_demo, monitor, asyncio.create_task(broken()))


async def test_the_demo_gives_up_when_the_monitor_is_never_ready(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(demo, "READY_TIMEOUT", 0.05)
    the_demo, monitor = starting()
    run = asyncio.create_task(asyncio.sleep(3600))
    with pytest.raises(TimeoutError, match="not ready within"):
        await Demo._until_ready(the_demo, monitor, run)
    run.cancel()


async def test_the_demo_says_so_when_the_monitor_stops_quietly_before_it_was_ready() -> None:
    the_demo, monitor = starting()
    with pytest.raises(RuntimeError, match="stopped before it was ready"):
        await Demo._until_ready(the_demo, monitor, asyncio.create_task(asyncio.sleep(0)))


async def test_a_check_kafka_cannot_answer_is_reported_not_raised(risk) -> None:
    """The run is over when the demo checks its events against replay: a broker gone by then
    is said in one line (`liqmon demo` exits 1 with it), not a traceback."""
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    view = DemoView(accounts=1, duration=1.0, seed=7)
    the_demo = SimpleNamespace(broker=SimpleNamespace(bootstrap=f"127.0.0.1:{port}"),
                               config=risk, view=view)
    await Demo._check(the_demo, ServiceSettings(config_path=Path("risk.toml")))
    assert view.check is None
    assert view.check_error is not None
    assert view.check_error.startswith(
        f"the check could not read the topics from 127.0.0.1:{port}")
