"""Ending background tasks for sure (monitor/service/tasks.py)."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import unittest.mock
from typing import Any

import structlog
from aiokafka.errors import KafkaConnectionError

from monitor.service.tasks import abandoned_kafka_failures, cancel_and_wait


async def refuse_cancellation_until(release: asyncio.Event) -> None:
    """A task that swallows every cancellation until ``release`` is set."""
    while not release.is_set():
        try:
            await asyncio.sleep(0.01)
        except asyncio.CancelledError:
            continue


async def test_a_task_whose_wait_for_lost_the_cancellation_still_ends() -> None:
    """The broker watch's shape: a loop around `asyncio.wait_for`. Cancelled in the step in
    which the awaited future completes, Python 3.11's wait_for returns its result instead of
    raising, and the loop goes on to its next lap: one cancel() left such a task running and
    a stop waiting on it for ever. Asked again, it ends."""
    answer = asyncio.get_running_loop().create_future()
    laps = 0

    async def watch() -> None:
        nonlocal laps
        while True:
            await asyncio.wait_for(answer, timeout=5)
            laps += 1
            await asyncio.sleep(0.05)

    task = asyncio.create_task(watch())
    await asyncio.sleep(0)  # the task waits on the answer
    answer.set_result(None)  # the answer arrives in the same step as the cancellation
    assert await cancel_and_wait(task, within=10) == set()
    assert task.cancelled()


async def test_a_task_that_refuses_every_cancellation_is_given_up_after_the_bound() -> None:
    release = asyncio.Event()
    task = asyncio.create_task(refuse_cancellation_until(release))
    await asyncio.sleep(0)
    assert await cancel_and_wait(task, within=1.2) == {task}
    assert not task.done()
    release.set()
    await task


async def test_what_an_ended_task_raised_is_read_not_logged_as_never_retrieved() -> None:
    loop = asyncio.get_running_loop()
    reported: list[dict[str, Any]] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _, context: reported.append(context))
    try:
        async def fails() -> None:
            raise ValueError("bad")

        task: asyncio.Task[None] | None = asyncio.create_task(fails())
        await asyncio.sleep(0)
        assert task is not None and task.done()
        assert await cancel_and_wait(task) == set()
        task = None
        gc.collect()
    finally:
        loop.set_exception_handler(previous)
    assert reported == []


async def test_tasks_already_ended_and_none_at_all_need_no_wait() -> None:
    done = asyncio.create_task(asyncio.sleep(0))
    await done
    assert await cancel_and_wait(done) == set()
    assert await cancel_and_wait() == set()


async def test_closing_steps_share_one_close_timeout(monkeypatch) -> None:
    """A restore that will not end (it refuses cancellation) is given up with a warning once
    CLOSE_TIMEOUT has run out, and leaves nothing of it to the steps after it: the stop stays
    within --shutdown-timeout + CLOSE_TIMEOUT whichever step is slow."""
    import structlog

    import monitor.service.runner as runner
    from monitor.config import load_config
    from monitor.service.runner import Monitor
    from tests.support.kafka import fresh_settings
    from tests.support.paths import REPO

    monkeypatch.setattr(runner, "CLOSE_TIMEOUT", 1.0)
    release = asyncio.Event()
    with structlog.testing.capture_logs() as logs:  # the monitor binds its logger at once
        instance = Monitor(fresh_settings("127.0.0.1:9"),
                           load_config(REPO / "examples" / "risk.toml"))
        restoring = instance._restoring_task = asyncio.create_task(
            refuse_cancellation_until(release))
        await asyncio.sleep(0)  # under way
        try:
            await instance._close()
        finally:
            release.set()
            with contextlib.suppress(asyncio.CancelledError):
                await restoring
    assert [e["event"] for e in logs] == ["restore abandoned: not ended in time"]
    assert instance._close_left() == 0.0


async def test_a_kafka_request_given_up_on_that_fails_later_is_one_warning_line() -> None:
    """aiokafka shields a commit from the cancellation of the service's timeout: its failure
    during an outage was logged by asyncio as an error with aiokafka's traceback."""
    loop = asyncio.get_running_loop()
    before = loop.get_exception_handler()
    loop.set_exception_handler(abandoned_kafka_failures(structlog.get_logger()))
    unexpected: list[dict[str, Any]] = []
    try:
        async def commit() -> None:
            raise KafkaConnectionError("Connection at 127.0.0.1:9092 closed")

        async def bug() -> None:
            raise ValueError("a bug of ours")

        with structlog.testing.capture_logs() as logs, \
                unittest.mock.patch.object(loop, "default_exception_handler",
                                           unexpected.append):
            for work in (commit, bug):
                task = loop.create_task(work())
                await asyncio.wait([task])
                del task  # never retrieved: asyncio reports it when the task goes
                gc.collect()
    finally:
        loop.set_exception_handler(before)
    assert logs == [{"event": "a kafka request given up on earlier failed", "log_level": "warning",
                     "error": "KafkaConnectionError('Connection at 127.0.0.1:9092 closed')",
                     "request": "test_a_kafka_request_given_up_on_that_fails_later_is_one_"
                                "warning_line.<locals>.commit"}]
    assert [type(context["exception"]) for context in unexpected] == [ValueError]
