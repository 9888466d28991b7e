"""structlog set-up: JSON lines in production, a readable console on a terminal (SPEC §8).

liqmon's own lines go straight from structlog to stderr, rendered by orjson: a cascade logs
one line per event, and through the stdlib's logging (a LogRecord, a formatter, a handler
lock) and the stdlib's json each line cost ~110 µs of the processing loop; this way ~25 µs.
The stdlib's lines (aiokafka's) are rendered to the same format by a handler of their own,
each repeated line at most once every 30 s (`RepeatFilter`).
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable
from typing import Any

import orjson
import structlog

from monitor.service.settings import LOG_LEVELS

# numpy scalars (a margin ratio) as numbers, not strings; anything else orjson cannot encode
# goes out as its repr() (structlog's fallback)
_ORJSON_OPTIONS = orjson.OPT_NON_STR_KEYS | orjson.OPT_SERIALIZE_NUMPY


REPEAT_WINDOW = 30.0  # seconds: a library's line repeated within it is held back


def _json_text(obj: Any, **kwargs: Any) -> str:
    return orjson.dumps(obj, **kwargs).decode()


class RepeatFilter(logging.Filter):
    """Lets a library's line through once per ``window`` seconds per logger, level and message
    template; the next one let through says how many were held back meanwhile.

    With the broker away, aiokafka logs every failed connection attempt, metadata refresh,
    fetch and coordinator lookup at error level: ~120 lines a second, which buried liqmon's
    own `kafka unreachable` (said every 30 s) and cost the loop their formatting."""

    def __init__(self, window: float = REPEAT_WINDOW,
                 clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self._window = window
        self._clock = clock
        # (logger, level, template) -> (when last let through, how many held back since)
        self._seen: dict[tuple[str, int, str], tuple[float, int]] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        key = (record.name, record.levelno, str(record.msg))
        now = self._clock()
        last = self._seen.get(key)
        if last is not None and now - last[0] < self._window:
            self._seen[key] = (last[0], last[1] + 1)
            return False
        self._seen[key] = (now, 0)
        if last is not None and last[1]:
            record.msg = (f"{record.getMessage()} ({last[1]} more like it in the last "
                          f"{now - last[0]:.0f} s)")
            record.args = None
        return True


def configure_logging(level: str = "info", json: bool | None = None) -> None:
    """Route structlog and the stdlib (aiokafka logs there) to stderr in one format."""
    if json is None:
        json = not sys.stderr.isatty()
    numeric = logging.getLevelNamesMapping().get(level.upper())
    if numeric is None:
        raise ValueError(f"unknown log level {level!r} ({', '.join(LOG_LEVELS)})")
    shared: list[structlog.types.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    if json:
        foreign: structlog.types.Processor = structlog.processors.JSONRenderer(
            serializer=_json_text, option=_ORJSON_OPTIONS)
        binary = getattr(sys.stderr, "buffer", None)  # absent where stderr was replaced
        factory: Any = (structlog.PrintLoggerFactory(sys.stderr) if binary is None
                        else structlog.BytesLoggerFactory(binary))
        own: list[structlog.types.Processor] = [
            structlog.processors.format_exc_info,
            foreign if binary is None else structlog.processors.JSONRenderer(
                serializer=orjson.dumps, option=_ORJSON_OPTIONS)]
    else:
        own = [structlog.dev.set_exc_info, structlog.dev.ConsoleRenderer()]
        factory = structlog.PrintLoggerFactory(sys.stderr)
        foreign = structlog.dev.ConsoleRenderer()
    structlog.configure(
        processors=[*shared, *own],
        logger_factory=factory,
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        # configured once per process, before any line; a lazy logger re-binds on every call
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(RepeatFilter())
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info if json else structlog.dev.set_exc_info,
            foreign,
        ],
    ))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(numeric)
    # aiokafka narrates every reconnect at INFO/ERROR; we log outages ourselves, once, clearly.
    logging.getLogger("aiokafka").setLevel(max(numeric, logging.WARNING))
