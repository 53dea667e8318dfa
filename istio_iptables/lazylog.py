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
# "warning", "error" and the message already formatted. A message may hold text from outside
# (names, paths, a command's output): a sink that writes lines passes it through escape_controls.
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


# The characters a log record meets most (an iptables-restore document has a newline per rule)
# are escaped by str.translate, in C; only what is left (rare) goes through the loop below.
_ESCAPES = str.maketrans({"\n": "\\n", "\r": "\\r", "\t": "\\t", "\x1b": "\\x1b"})


def escape_controls(text: str) -> str:
    """``text`` with every character that is not printable written as an escape sequence.

    Log lines are one record each, and their fields are separated by tabs: a value that came from
    outside (a pod name, a path) must not end the line, add a field, or drive the terminal that
    shows the log. What is escaped is what repr() escapes (C0 controls with tab, newline and ESC,
    DEL, C1 controls, the Unicode line and paragraph separators, format characters such as
    bidirectional overrides, surrogates, unassigned and private-use code points), but backslashes
    and quotes stay as they are: this keeps lines readable, not reversible.
    """
    if text.isprintable():
        return text
    text = text.translate(_ESCAPES)
    if text.isprintable():
        return text
    out = []
    for ch in text:
        if ch.isprintable():
            out.append(ch)
        else:
            code = ord(ch)
            out.append(
                f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"
            )
    return "".join(out)


# A value is quoted in full up to this length; a longer one (a pasted file, thousands of digits)
# is shown by its start and its length, so that a message stays readable.
_SHOWN_MAX = 120
_SHOWN_HEAD = 40


def shown(value: str) -> str:
    """``value`` quoted for a message (as repr() quotes it), shortened when it is long."""
    if len(value) <= _SHOWN_MAX:
        return repr(value)
    return f"{value[:_SHOWN_HEAD]!r}... ({len(value)} characters)"


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
