"""The service's asyncio tasks: ending them for sure, and saying where each one waits.

A cancellation can be lost on Python 3.11: `asyncio.wait_for` returns the awaited result,
instead of raising, when that result arrives in the same step as the cancellation of the
task awaiting it. A task that loops around such a call then goes on for ever, and whoever
awaited it after cancelling it waits for ever too: the broker watch did, and a stop never
finished. The service's own code bounds its waits with `asyncio.timeout`, which keeps the
cancellation; and, for any await it does not control, a cancellation is asked again, a
moment later, for as long as the task runs.

A task that hangs says nothing; `log_task_stacks` (SIGUSR1) logs the await each one is in.
A Kafka request the service stopped waiting for, failing later, says one line
(`abandoned_kafka_failures`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from aiokafka.errors import KafkaError
from structlog.stdlib import BoundLogger

RECANCEL_AFTER = 0.5  # seconds a cancelled task has to end before it is cancelled again


async def cancel_and_wait(*tasks: asyncio.Future[Any], within: float | None = None
                          ) -> set[asyncio.Future[Any]]:
    """Cancel the tasks and wait for them to end, cancelling those still running again every
    RECANCEL_AFTER seconds; give up after ``within`` seconds (None: never). Returns the tasks
    still running then. What an ended task raised is read (and dropped), so that asyncio
    does not log it as never retrieved."""
    loop = asyncio.get_running_loop()
    deadline = None if within is None else loop.time() + within
    running = {task for task in tasks if not task.done()}
    while running:
        for task in running:
            task.cancel()
        wait = RECANCEL_AFTER if deadline is None else min(RECANCEL_AFTER,
                                                           deadline - loop.time())
        if wait <= 0:
            break
        _, running = await asyncio.wait(running, timeout=wait)
    for task in tasks:
        if task.done() and not task.cancelled():
            task.exception()
    return running


def await_chain(task: asyncio.Task[Any]) -> list[str]:
    """Where a task is, from its coroutine down the chain of awaits to the innermost one,
    as "file:line in function". `Task.get_stack` stops at the outermost frame of a
    suspended coroutine, which says only which task it is, not what it waits for."""
    chain: list[str] = []
    awaited: Any = task.get_coro()
    while awaited is not None:
        frame = getattr(awaited, "cr_frame", None) or getattr(awaited, "gi_frame", None)
        if frame is None:  # a future's own iterator: the chain ends in it
            break
        chain.append(f"{frame.f_code.co_filename}:{frame.f_lineno} in {frame.f_code.co_name}")
        awaited = getattr(awaited, "cr_await", None) or getattr(awaited, "gi_yieldfrom", None)
    return chain


def log_task_stacks(log: BoundLogger) -> None:
    """One line per asyncio task of the process with the await it is in (`liqmon run` does
    it on SIGUSR1): for an instance gone quiet, where it hangs, without stopping it."""
    tasks = sorted(asyncio.all_tasks(), key=lambda task: task.get_name())
    for task in tasks:
        log.warning("task stack (SIGUSR1)", task=task.get_name(), awaiting=await_chain(task))


def abandoned_kafka_failures(log: BoundLogger
                             ) -> Callable[[asyncio.AbstractEventLoop, dict[str, Any]], None]:
    """The loop's exception handler. aiokafka shields some requests (a group commit) from the
    cancellation of whoever awaits them: when the service gives up on one at its timeout (a
    broker that does not answer), the request goes on, and if it fails later nobody reads
    its error, which asyncio then logged as an error with aiokafka's traceback, to an operator
    watching an outage. Such a failure is one warning line; anything else goes to asyncio's
    own handler."""
    def handle(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        error = context.get("exception")
        if (context.get("message") == "Task exception was never retrieved"
                and isinstance(error, KafkaError)):
            future = context.get("future")
            log.warning("a kafka request given up on earlier failed", error=repr(error),
                        request=getattr(getattr(future, "get_coro", lambda: None)(),
                                        "__qualname__", None))
            return
        loop.default_exception_handler(context)
    return handle
