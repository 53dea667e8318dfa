"""The one log sink of the four commands: istio-iptables, istio-clean-iptables, istio-cni and
install-cni.

Every record is one line in Istio's format, ``<time>\\t<level>\\t<message>``: the time in RFC 3339,
UTC, with microseconds, the level one of ``debug``, ``info``, ``warn``, ``error``; a program that
shares its log with others names itself and may add a scope, ``<time>\\t<level>\\t<program>\\t
[<scope>\\t]<message>`` (istio-cni and install-cni do). With ``--log_as_json`` a record is one JSON
object ``{"level", "time", "msg"}``. Nothing from outside (a pod name, a path, a command's output)
can end a line, add a field or drive a terminal: the scope and the message are escaped
(escape_controls), in both formats.

A command installs a ``Sink`` while it runs (set_sink): its threshold, stderr (whatever
``sys.stderr`` is at the time, unless given a stream) and, where the CNI configuration asks for
one (``log_file``), a file. The modules log through ``get_logger(name)``, which offers the calls
of ``logging.Logger`` they make; every record goes to the installed sink, formatted, and
``logging`` is never imported for it: with what it imports it would cost every pod start 5-10 ms
(istio_iptables/startup.py). Without a sink (the modules used as a library, by tests or the
benchmark) records go to ``logging`` as before, loading it only when a record can be shown
(warnings and errors; debug and info once the caller has imported ``logging``: nobody can have
configured a logger before that, and the root logger's default level is WARNING).

install-cni logs from several threads and keeps ``logging`` underneath: its handler formats with
``formatter(program)``, the same line.
"""

from __future__ import annotations

import sys
import time

from .startup import TYPE_CHECKING

if TYPE_CHECKING:
    import logging
    from collections.abc import Callable
    from typing import IO

    SinkFn = Callable[[str, str], None]

# Level names as the configuration spells them -> their number (as ``logging`` counts them).
LEVELS = {"debug": 10, "info": 20, "warn": 30, "warning": 30, "error": 40, "fatal": 50, "none": 100}
# The level of a record (the Logger method's name) -> its name in Istio's line.
_ISTIO_NAMES = {
    "debug": "debug", "info": "info", "warning": "warn", "warn": "warn", "error": "error",
    "critical": "fatal", "fatal": "fatal",
}  # fmt: skip


def level_number(name: str, default: int = 20) -> int:
    """The threshold a configured level name means (any case); ``default`` for an unknown one."""
    return LEVELS.get(name.lower(), default)


# --- formatting ------------------------------------------------------------------------------------

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


def rfc3339(created: float) -> str:
    """``created`` as UTC with microseconds, rounded as ``datetime.fromtimestamp`` rounds them
    (datetime itself is not needed for that, nor math: ``created - int(created)`` is exactly the
    fraction math.modf would give)."""
    whole = int(created)
    micros = round((created - whole) * 1e6)
    if micros >= 1_000_000:
        whole, micros = whole + 1, micros - 1_000_000
    elif micros < 0:
        whole, micros = whole - 1, micros + 1_000_000
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole)) + f".{micros:06d}Z"


def format_record(
    level: str,
    msg: str,
    created: float,
    *,
    program: str = "",
    scope: str = "",
    as_json: bool = False,
) -> str:
    """One record as its line (without the newline). ``level`` is a record level (``debug``,
    ``info``, ``warning`` or ``warn``, ``error``); ``scope`` and ``msg`` are escaped here.

    The iptables-restore document the applier logs becomes one line too, which log collectors
    keep as one record (--dry-run prints it as it is). JSON carries the same escaped text, so
    that ``jq -r .msg`` is as safe to read as the text line."""
    name = _ISTIO_NAMES.get(level, level)
    when = rfc3339(created)
    msg = escape_controls(msg)
    if as_json:
        import json

        return json.dumps({"level": name, "time": when, "msg": msg})
    head = f"{when}\t{name}\t{program}\t" if program else f"{when}\t{name}\t"
    return f"{head}{escape_controls(scope)}\t{msg}" if scope else head + msg


# --- the sink ------------------------------------------------------------------------------------


class Sink:
    """Where a command's records go while it runs: those at or above ``threshold``, as Istio's
    lines (``as_json``: JSON objects), to ``stream`` (None: whatever ``sys.stderr`` is when a
    record is written) and to ``file`` if one is given. A record that cannot be written (a
    stream closed or gone) is lost; the command goes on.

    Called as ``sink(level, msg)`` by the modules' loggers; a program logs through the methods
    (``sink.info(msg)``). ``scoped(scope)`` is the same sink with a scope field in its lines."""

    __slots__ = ("threshold", "as_json", "program", "scope", "stream", "file")

    def __init__(
        self,
        threshold: int = 20,
        *,
        as_json: bool = False,
        program: str = "",
        scope: str = "",
        stream: IO[str] | None = None,
        file: IO[str] | None = None,
    ) -> None:
        self.threshold = threshold
        self.as_json = as_json
        self.program = program
        self.scope = scope
        self.stream = stream
        self.file = file

    def scoped(self, scope: str) -> Sink:
        return Sink(
            self.threshold,
            as_json=self.as_json,
            program=self.program,
            scope=scope,
            stream=self.stream,
            file=self.file,
        )

    def __call__(self, level: str, msg: str) -> None:
        if LEVELS.get(level, 40) < self.threshold:
            return
        line = (
            format_record(
                level, msg, time.time(), program=self.program, scope=self.scope, as_json=self.as_json
            )
            + "\n"
        )
        for out in (self.stream if self.stream is not None else sys.stderr, self.file):
            if out is None:
                continue
            # logging's handlers swallow a failed write too; contextlib.suppress would be one
            # more import.
            try:
                out.write(line)
                out.flush()
            except Exception:  # noqa: BLE001, S110 - a lost record must not fail the command
                pass

    def debug(self, msg: str) -> None:
        self("debug", msg)

    def info(self, msg: str) -> None:
        self("info", msg)

    def warn(self, msg: str) -> None:
        self("warning", msg)

    warning = warn

    def error(self, msg: str) -> None:
        self("error", msg)


def open_log_file(path: str) -> tuple[IO[str] | None, str | None]:
    """``path`` opened for appending records, or None and why not (for a warning)."""
    try:
        return open(path, "a", encoding="utf-8"), None  # noqa: SIM115 - lives as long as the process
    except OSError as e:
        return None, f"cannot open log file {path}: {e.strerror}"
    except ValueError as e:  # a NUL in the path: no file has such a name
        return None, f"cannot open log file {path}: {e}"


def formatter(program: str) -> logging.Formatter:
    """A ``logging.Formatter`` writing this module's lines for ``program``: for a program that
    keeps ``logging`` underneath (install-cni logs from several threads)."""
    import logging

    class _Formatter(logging.Formatter):
        def format(self, record: logging.LogRecord) -> str:
            text = record.getMessage()
            if record.exc_info:
                text += "\n" + self.formatException(record.exc_info)
            return format_record(record.levelname.lower(), text, record.created, program=program)

    return _Formatter()


# --- the modules' loggers --------------------------------------------------------------------------

# The sink installed now (None: records go to ``logging``). A message may hold text from
# outside; a sink that writes lines passes it through escape_controls.
_sink: SinkFn | None = None


def set_sink(sink: SinkFn | None) -> SinkFn | None:
    """Send every record of these loggers to ``sink`` (``sink(level, message)``, the message
    formatted; None: back to ``logging``). Returns the sink it replaces, for a caller that
    installs one only for a while (a command called in-process by tests) to put back."""
    global _sink
    previous, _sink = _sink, sink
    return previous


def get_sink() -> SinkFn | None:
    """The sink installed now (None: records go to ``logging``)."""
    return _sink


def _to_sink(level: str, msg: str, args: tuple[object, ...]) -> bool:
    if _sink is None:
        return False
    _sink(level, msg % args if args else msg)
    return True


class Logger:
    """The calls the modules make on a ``logging.Logger``, with the same meaning."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def debug(self, msg: str, *args: object) -> None:
        if _to_sink("debug", msg, args):
            return
        logging = sys.modules.get("logging")  # not imported: nobody configured it
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
