"""structlog set-up: JSON lines in production, a readable console on a terminal (SPEC §8).

liqmon's own lines go straight from structlog to stderr, rendered by orjson: a cascade logs
one line per event, and through the stdlib's logging (a LogRecord, a formatter, a handler
lock) and the stdlib's json each line cost ~110 µs of the processing loop; this way ~25 µs.
The stdlib's lines (aiokafka's) are rendered to the same format by a handler of their own.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import orjson
import structlog

# numpy scalars (a margin ratio) as numbers, not strings; anything else orjson cannot encode
# as its str()
_ORJSON_OPTIONS = orjson.OPT_NON_STR_KEYS | orjson.OPT_SERIALIZE_NUMPY


def _json_text(obj: Any, **kwargs: Any) -> str:
    return orjson.dumps(obj, **kwargs).decode()


def configure_logging(level: str = "info", json: bool | None = None) -> None:
    """Route structlog and the stdlib (aiokafka logs there) to stderr in one format."""
    if json is None:
        json = not sys.stderr.isatty()
    numeric = logging.getLevelNamesMapping().get(level.upper())
    if numeric is None:
        raise ValueError(f"unknown log level {level!r} (debug, info, warning, error)")
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
