"""Structured logging: one event name per event, key-value fields.

Every process calls :func:`configure` once at start; library code only calls
:func:`get_logger`.
"""

from __future__ import annotations

import logging
import sys
from typing import Literal, TextIO, cast

import structlog

LogFormat = Literal["console", "json"]


def configure(level: str = "info", fmt: LogFormat = "console", process: str | None = None) -> None:
    """Set up structlog for this process; logs go to stderr so stdout stays for results."""
    renderer: structlog.typing.Processor
    if fmt == "json":
        renderer = structlog.processors.JSONRenderer()
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    processors: list[structlog.typing.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    if process:
        structlog.contextvars.bind_contextvars(process=process)
    structlog.configure(
        processors=[*processors, structlog.processors.format_exc_info, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]
        ),
        # One write per event, newline included: print() makes two, and with unbuffered
        # stderr (PYTHONUNBUFFERED, common in containers) the line processes share on one
        # pipe gets another process's line spliced in between.
        logger_factory=structlog.WriteLoggerFactory(file=cast(TextIO, _CurrentStderr())),
        cache_logger_on_first_use=False,
    )


class _CurrentStderr:
    """Writes to whatever ``sys.stderr`` is at the time of writing.

    Test runners and daemons swap ``sys.stderr``; a logger holding the old object
    would write to a closed file.
    """

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


def get_logger(name: str) -> structlog.typing.FilteringBoundLogger:
    """A logger bound to a component name (``component=<name>`` in every event)."""
    # Stay lazy: module-level loggers are created at import, before configure() runs,
    # and must still follow the level, format and target configured later.
    logger: structlog.typing.FilteringBoundLogger = structlog.get_logger(component=name)
    return logger
