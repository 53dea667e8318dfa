"""Loggers for the modules on the apply path that load ``logging`` only when a record can be shown.

The CNI plugin runs the applier on every pod start without ever configuring ``logging`` (it has its
own small logger), so importing the module there only costs start-up time. Nobody can configure a
logger without importing ``logging`` first, so while it is not imported, debug and info records
would be dropped anyway (the root logger's default level is WARNING); warnings and errors load it
and go through it as before (to the configured handlers, or to ``logging.lastResort`` on stderr).
Once ``logging`` is imported, every call is passed on unchanged.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

# An embedding program with its own logger (the CNI plugin) routes the applier's records here:
# sink(level, message) with level one of "debug", "info", "warning", "error".
_sink: Callable[[str, str], None] | None = None


def set_sink(sink: Callable[[str, str], None] | None) -> None:
    """Send every record of these loggers to ``sink`` instead of ``logging``."""
    global _sink
    _sink = sink


def _to_sink(level: str, msg: str, args: tuple[object, ...]) -> bool:
    if _sink is None:
        return False
    _sink(level, msg % args if args else msg)
    return True


class Logger:
    """The calls the applier makes on a ``logging.Logger``, with the same meaning."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def debug(self, msg: str, *args: object) -> None:
        if _to_sink("debug", msg, args):
            return
        logging = sys.modules.get("logging")
        if logging is not None:
            logging.getLogger(self.name).debug(msg, *args, stacklevel=2)

    def info(self, msg: str, *args: object) -> None:
        if _to_sink("info", msg, args):
            return
        logging = sys.modules.get("logging")
        if logging is not None:
            logging.getLogger(self.name).info(msg, *args, stacklevel=2)

    def warning(self, msg: str, *args: object) -> None:
        if _to_sink("warning", msg, args):
            return
        import logging

        logging.getLogger(self.name).warning(msg, *args, stacklevel=2)

    def error(self, msg: str, *args: object) -> None:
        if _to_sink("error", msg, args):
            return
        import logging

        logging.getLogger(self.name).error(msg, *args, stacklevel=2)


def get_logger(name: str) -> Logger:
    return Logger(name)
