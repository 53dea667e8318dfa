"""Loggers for the modules on the apply path that load ``logging`` only when a record can be shown.

The CNI plugin runs the applier on every pod start without ever configuring ``logging`` (it has its
own small logger), so importing the module there only costs start-up time. Nobody can configure a
logger without importing ``logging`` first, so while it is not imported, debug and info records
would be dropped anyway (the root logger's default level is WARNING); warnings and errors load it
and go through it as before (to the configured handlers, or to ``logging.lastResort`` on stderr).
Once ``logging`` is imported, every call is passed on unchanged.

A program with its own log format installs a sink (``set_sink``) instead: then every record goes
to it, formatted, and ``logging`` is not involved at all.
"""

from __future__ import annotations

import sys

from .lean import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Callable

    Sink = Callable[[str, str], None]

# An embedding program with its own logger (the CNI plugin, the istio-iptables command while it
# runs) routes the records here: sink(level, message) with level one of "debug", "info",
# "warning", "error" and the message already formatted.
_sink: Sink | None = None


def set_sink(sink: Sink | None) -> Sink | None:
    """Send every record of these loggers to ``sink`` instead of ``logging`` (None: back to
    ``logging``). Returns the sink it replaces, for a caller that installs one only for a while
    (the istio-iptables command, called in-process by tests) to put back."""
    global _sink
    previous, _sink = _sink, sink
    return previous


def get_sink() -> Sink | None:
    """The sink installed now (None: records go to ``logging``)."""
    return _sink


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
