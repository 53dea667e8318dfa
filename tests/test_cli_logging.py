"""How istio-iptables and istio-clean-iptables log: Istio's line (or JSON) on stderr, at the level
--log_output_level asks for, the applier's records included; through a logsink.Sink that is in
place only while a command runs, so ``logging`` is never imported for it and in-process callers
find ``logging`` and their own sink as they left them."""

from __future__ import annotations

import io
import ipaddress
import json
import logging
import math
import re
import subprocess
import sys
from collections.abc import Iterator, Mapping
from contextlib import redirect_stderr, redirect_stdout
from datetime import UTC, datetime
from pathlib import Path

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from istio_iptables import cli, logsink
from istio_iptables.cli import PROG_CLEAN, PROG_IPTABLES
from istio_iptables.options import LogSettings
from test_options import FakeMachine

ROOT = Path(__file__).resolve().parent.parent
BIN = ROOT / ".venv" / "bin"

CLASSIC = ["-p", "15001", "-z", "15006", "-u", "1337", "-m", "REDIRECT", "-i", "*", "-x", "", "-b", "*"]
PINNED = ["--no-enable-ipv6", "--dns-servers="]
STAMP = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z"
LINE = re.compile(rf"{STAMP}\t(debug|info|warn|error)\t(.*)")
OWNER_ENV = {"ISTIO_OUTBOUND_OWNER_GROUPS": "5", "ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE": "6"}
OWNER_WARNING = (
    "ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE is ignored: it applies only when ISTIO_OUTBOUND_OWNER_GROUPS is '*'"
)
DRY_RUN_INFO = "running in dry-run mode, no rule changes will be made"


def invoke(
    argv: list[str],
    env: dict[str, str] | None = None,
    machine: FakeMachine | None = None,
    prog: str = PROG_IPTABLES,
) -> tuple[int, str]:
    """Exit status and stderr of one in-process run."""
    err = io.StringIO()
    with redirect_stdout(io.StringIO()), redirect_stderr(err):
        code = cli.run(prog, argv, env=env or {}, machine=machine or FakeMachine())
    return code, err.getvalue()


def records(err: str) -> list[tuple[str, str]]:
    """(level, message) of every stderr line, each of which must be an Istio log line."""
    out = []
    for line in err.splitlines():
        m = LINE.fullmatch(line)
        assert m, f"not an Istio log line: {line!r}"
        out.append((m[1], m[2]))
    return out


@pytest.fixture
def recording_sink() -> Iterator[list[tuple[str, str]]]:
    """A sink installed as an embedding program (the CNI plugin) would, taken out after the test."""
    seen: list[tuple[str, str]] = []
    previous = logsink.set_sink(lambda level, msg: seen.append((level, msg)))
    yield seen
    logsink.set_sink(previous)


# --- format and level ----------------------------------------------------------------------------


def test_dry_run_logs_istio_lines() -> None:
    code, err = invoke([*CLASSIC, *PINNED, "--dry-run"])
    assert code == 0
    got = records(err)
    assert [lvl for lvl, _ in got] == ["info", "info"]
    assert got[0][1].startswith("Istio iptables variables: PROXY_PORT=15001 ")
    assert got[1] == ("info", DRY_RUN_INFO)


@pytest.mark.parametrize(
    ("level", "want"),
    [
        ("default:debug", ["debug", "warn", "info", "info"]),
        ("debug", ["debug", "warn", "info", "info"]),
        (None, ["warn", "info", "info"]),
        ("default:info", ["warn", "info", "info"]),
        ("warn", ["warn"]),
        ("other:debug,all:warn", ["warn"]),
        ("error", []),
        ("fatal", []),
        ("none", []),
    ],
)
def test_level_filter(level: str | None, want: list[str]) -> None:
    # A debug record from deep inside (nameserver parsing), a warning from the command itself.
    machine = FakeMachine(resolv="nameserver bogus\nnameserver 10.96.0.10\n")
    argv = [*CLASSIC, "--no-enable-ipv6", "--redirect-dns", "--dry-run", "extra"]
    if level is not None:
        argv.append(f"--log_output_level={level}")
    code, err = invoke(argv, machine=machine)
    assert code == 0
    got = records(err)
    assert [lvl for lvl, _ in got] == want
    assert ("debug", "ignoring unparsable nameserver 'bogus'") in got or "debug" not in want
    assert ("warn", "ignoring positional argument 'extra'") in got or "warn" not in want


@pytest.mark.parametrize(
    ("threshold", "shown"),
    [
        (10, ["debug", "info", "warn", "error"]),
        (20, ["info", "warn", "error"]),
        (30, ["warn", "error"]),
        (40, ["error"]),
        (50, []),
        (60, []),
    ],
)
def test_sink_filters_by_level(threshold: int, shown: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    sink = logsink.Sink(threshold)
    for level in ("debug", "info", "warning", "error"):
        sink(level, f"a {level} record")
    got = records(capsys.readouterr().err)
    assert got == [(lvl, f"a {'warning' if lvl == 'warn' else lvl} record") for lvl in shown]


def test_json_lines() -> None:
    code, err = invoke([*CLASSIC, *PINNED, "--dry-run", "false", "--log_as_json"], env=OWNER_ENV)
    assert code == 0
    lines = [json.loads(line) for line in err.splitlines()]
    assert [list(o) for o in lines] == [["level", "time", "msg"]] * len(lines)
    assert all(re.fullmatch(STAMP, o["time"]) for o in lines)
    assert [(o["level"], o["msg"]) for o in lines][:2] == [
        ("warn", OWNER_WARNING),
        ("warn", "ignoring positional argument 'false'"),
    ]
    assert [o["level"] for o in lines[2:]] == ["info", "info"]
    assert lines[-1]["msg"] == DRY_RUN_INFO


def test_json_lines_follow_the_level() -> None:
    code, err = invoke([*CLASSIC, *PINNED, "--dry-run", "--log_as_json=true", "--log_output_level=warn", "x"])
    assert code == 0
    assert [json.loads(line)["level"] for line in err.splitlines()] == ["warn"]


@pytest.mark.parametrize("as_json", [False, True])
def test_multi_line_message_is_one_escaped_record(as_json: bool, capsys: pytest.CaptureFixture[str]) -> None:
    # The applier logs its iptables-restore documents: one record, one line, in both formats,
    # and JSON carries the same escaped text (jq -r .msg must not print raw newlines either).
    logsink.Sink(20, as_json=as_json)("info", "applying:\n* nat\nCOMMIT")
    (line,) = capsys.readouterr().err.splitlines()
    msg = json.loads(line)["msg"] if as_json else records(line)[0][1]
    assert msg == "applying:\\n* nat\\nCOMMIT"


# --- no value can forge a record -----------------------------------------------------------------

FORGED = "\n2026-01-01T00:00:00Z\tinfo\tforged"
ANSI = "\x1b[31m"
HOSTILE_PATH = f"/var/run/netns/x{FORGED}{ANSI}\r\x85\u2028\x7f"


@pytest.mark.parametrize("as_json", [False, True])
def test_a_logged_value_cannot_forge_records(as_json: bool) -> None:
    # The namespace path is logged as given (with the other variables) before anything uses it.
    argv = [*CLASSIC, *PINNED, "--dry-run", f"--network-namespace={HOSTILE_PATH}"]
    code, err = invoke([*argv, f"--log_as_json={str(as_json).lower()}"])
    assert code == 0
    lines = err.splitlines()
    assert len(lines) == 2, err
    msgs = [json.loads(line)["msg"] for line in lines] if as_json else [m for _, m in records(err)]
    assert all(line.replace("\t", " ").isprintable() for line in lines)  # tabs only between fields
    assert msgs[0].endswith(f"NETWORK_NAMESPACE={logsink.escape_controls(HOSTILE_PATH)}")
    assert "x\\n2026-01-01T00:00:00Z\\tinfo\\tforged\\x1b[31m\\r\\x85\\u2028\\x7f" in msgs[0]
    assert msgs[1] == DRY_RUN_INFO


def test_an_error_message_cannot_forge_records() -> None:
    argv = [*CLASSIC, *PINNED, "--native-nftables", f"--network-namespace={HOSTILE_PATH}"]
    code, err = invoke(argv)
    assert code == 1
    *logged, last = err.splitlines()
    records("\n".join(logged))
    assert last.isprintable() and last.startswith("Error: network namespace /var/run/netns/x ")
    assert "forged\\x1b[31m" in last


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("plain text, quotes ' \" and \\ stay", "plain text, quotes ' \" and \\ stay"),
        ("a\nb\r\tc", "a\\nb\\r\\tc"),
        ("\x00\x1b[31m\x7f", "\\x00\\x1b[31m\\x7f"),
        ("\x85\x9b", "\\x85\\x9b"),  # C1: NEL, CSI
        ("\u2028\u2029", "\\u2028\\u2029"),
        ("\u202eevil\u2066", "\\u202eevil\\u2066"),  # bidirectional overrides
        ("\udcff", "\\udcff"),  # a byte that was not UTF-8, as os.environ keeps it
        ("\U000e0001", "\\U000e0001"),
        ("é ü 日本 \U0001f600", "é ü 日本 \U0001f600"),
    ],
)
def test_escape_controls(text: str, want: str) -> None:
    assert logsink.escape_controls(text) == want


@given(st.text())
def test_escaped_text_is_one_printable_line(text: str) -> None:
    escaped = logsink.escape_controls(text)
    assert escaped.isprintable() and len(escaped.splitlines()) <= 1
    assert escaped == text or not text.isprintable()


# --- the applier's records -----------------------------------------------------------------------


@pytest.mark.parametrize("backend", [[], ["--native-nftables"]], ids=["iptables", "nftables"])
def test_configuration_warnings_show_in_istio_format_before_the_error(backend: list[str]) -> None:
    # The configuration's warning (config.py) while loading, then the applier refuses the
    # namespace: the records through the command's sink, then the one-line error.
    argv = [*CLASSIC, *PINNED, *backend, "--network-namespace=/nonexistent/netns"]
    code, err = invoke(argv, env=OWNER_ENV)
    assert code == 1
    *lines, last = err.splitlines()
    assert last == "Error: network namespace /nonexistent/netns: No such file or directory"
    got = records("\n".join(lines))
    assert got[0] == ("warn", OWNER_WARNING)
    assert got[1][0] == "info" and got[1][1].startswith("Istio iptables variables: ")
    assert len(got) == 2


def test_clean_logs_through_the_sink() -> None:
    code, err = invoke([*CLASSIC, *PINNED, "--dry-run", "--log_output_level=warn", "y"], prog=PROG_CLEAN)
    assert code == 0
    assert records(err) == [("warn", "ignoring positional argument 'y'")]


# --- the sink is the command's only while it runs -----------------------------------------------


def test_set_sink_returns_the_previous_sink() -> None:
    def first(level: str, msg: str) -> None: ...

    def second(level: str, msg: str) -> None: ...

    outer = logsink.get_sink()
    try:
        assert logsink.set_sink(first) is outer
        assert logsink.set_sink(second) is first
        assert logsink.get_sink() is second
        assert logsink.set_sink(first) is second
    finally:
        logsink.set_sink(outer)
    assert logsink.get_sink() is outer


@pytest.mark.parametrize(
    "argv",
    [
        [*CLASSIC, *PINNED, "--dry-run", "extra"],  # success, with a warning
        [*CLASSIC, *PINNED, "--native-nftables", "--network-namespace=/nonexistent/netns"],  # apply error
        ["--bogus"],  # usage error, before the logging options are read
        ["--log_output_level=loud"],  # bad logging option
        ["-p", "99999", "--dry-run"],  # bad option after the logging options are read
        ["--help"],
    ],
)
def test_previous_sink_is_back_after_run(argv: list[str], recording_sink: list[tuple[str, str]]) -> None:
    sink = logsink.get_sink()
    invoke(argv)
    assert logsink.get_sink() is sink
    assert recording_sink == []  # the command's records went to stderr, not to the embedder's sink


def test_previous_sink_is_back_after_run_raises(recording_sink: list[tuple[str, str]]) -> None:
    class Broken(FakeMachine):
        def local_addresses(self, netns: str | None) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
            raise RuntimeError("boom")

    sink = logsink.get_sink()
    with pytest.raises(RuntimeError, match="boom"):
        invoke([*CLASSIC, "--dns-servers=", "--dry-run"], machine=Broken())
    assert logsink.get_sink() is sink


def test_no_sink_is_left_behind() -> None:
    assert logsink.get_sink() is None
    invoke([*CLASSIC, *PINNED, "--dry-run"])
    assert logsink.get_sink() is None


def test_parse_puts_the_previous_sink_back(recording_sink: list[tuple[str, str]]) -> None:
    sink = logsink.get_sink()
    err = io.StringIO()
    with redirect_stderr(err):
        got = cli.parse(PROG_IPTABLES, [*CLASSIC, *PINNED, "extra"], {}, FakeMachine())
    assert not isinstance(got, int)
    assert logsink.get_sink() is sink
    assert [lvl for lvl, _ in records(err.getvalue())] == ["warn", "info"]
    assert recording_sink == []


def test_records_before_the_logging_options_go_where_they_went(
    monkeypatch: pytest.MonkeyPatch, recording_sink: list[tuple[str, str]]
) -> None:
    # Until the logging options are read, the command has no sink of its own: a record then goes to
    # whatever the caller had (here an embedder's sink; without one, the modules' loggers' usual way).
    read = cli.log_settings

    def log_settings(values: Mapping[str, str], env: Mapping[str, str] | None = None) -> LogSettings:
        logsink.get_logger("istio_iptables.options").warning("while reading the logging options")
        return read(values, env)

    monkeypatch.setattr(cli, "log_settings", log_settings)
    code, err = invoke([*CLASSIC, *PINNED, "--dry-run"])
    assert code == 0
    assert recording_sink == [("warning", "while reading the logging options")]
    assert "while reading" not in err


def test_logging_is_left_as_it_was(caplog: pytest.LogCaptureFixture) -> None:
    # A command's records never reach logging's handlers (before, the command had its own handler
    # that did not propagate); after it, the loggers' records reach them as they always did.
    caplog.set_level(logging.DEBUG)
    code, err = invoke([*CLASSIC, *PINNED, "--dry-run", "extra"], env=OWNER_ENV)
    assert code == 0
    assert len(records(err)) == 4
    assert caplog.records == []
    logsink.get_logger("istio_iptables.apply").info("after the run")
    logsink.get_logger("istio_iptables").warning("and the command's logger %s", "too")
    assert [(r.name, r.levelname, r.getMessage()) for r in caplog.records] == [
        ("istio_iptables.apply", "INFO", "after the run"),
        ("istio_iptables", "WARNING", "and the command's logger too"),
    ]


# --- one sink for every command -------------------------------------------------------------------

PROGRAM_LINE = re.compile(rf"{STAMP}\t(debug|info|warn|error)\tistio-cni\t(?:(pod=[^\t]*)\t)?([^\t]*)")


def test_a_program_names_itself_and_a_scope_in_its_lines(tmp_path: Path) -> None:
    # istio-cni's lines (and install-cni's): the program, then the scope when there is one; the
    # file gets the same lines as the stream.
    stream = io.StringIO()
    file, why = logsink.open_log_file(str(tmp_path / "plugin.log"))
    assert file is not None and why is None
    log = logsink.Sink(logsink.level_number("INFO"), program="istio-cni", stream=stream, file=file)
    log.debug("hidden")
    log.info("plain")
    log.scoped("pod=ns/web\tx\n").warn("scoped\n2026-01-01T00:00:00Z\tinfo\tforged")
    file.close()
    lines = stream.getvalue().splitlines()
    assert lines == (tmp_path / "plugin.log").read_text().splitlines()
    got = [PROGRAM_LINE.fullmatch(line) for line in lines]
    assert all(got), lines
    assert [m.groups() for m in got if m] == [
        ("info", None, "plain"),
        ("warn", "pod=ns/web\\tx\\n", "scoped\\n2026-01-01T00:00:00Z\\tinfo\\tforged"),
    ]


def test_an_unopenable_log_file_says_why() -> None:
    assert logsink.open_log_file("/nonexistent/dir/x.log") == (
        None,
        "cannot open log file /nonexistent/dir/x.log: No such file or directory",
    )
    file, why = logsink.open_log_file("/tmp/a\0b")
    assert file is None and why is not None and why.startswith("cannot open log file /tmp/a\0b: ")


def test_a_logging_handler_writes_the_same_line() -> None:
    # install-cni keeps logging underneath (it logs from threads); its handler formats this way.
    logger = logging.getLogger("test-logsink-formatter")
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logsink.formatter("install-cni"))
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.warning("wrote %s", "/etc/cni/net.d/x\n.conflist")
        logger.error("failed")
    finally:
        logger.removeHandler(handler)
    line = re.compile(rf"{STAMP}\t(warn|error)\tinstall-cni\t(.*)")
    got = [line.fullmatch(text) for text in stream.getvalue().splitlines()]
    assert [m.groups() if m else None for m in got] == [
        ("warn", "wrote /etc/cni/net.d/x\\n.conflist"),
        ("error", "failed"),
    ]


# --- the time stamp -----------------------------------------------------------------------------


def _rfc3339_with_modf(created: float) -> str:
    """The previous implementation, with math.modf."""
    import time

    frac, whole = math.modf(created)
    micros = round(frac * 1e6)
    if micros >= 1_000_000:
        whole, micros = whole + 1, micros - 1_000_000
    elif micros < 0:
        whole, micros = whole - 1, micros + 1_000_000
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole)) + f".{micros:06d}Z"


@given(st.floats(min_value=-2e9, max_value=4e9, allow_nan=False))
@example(1_700_000_000.9999996)
@example(1_700_000_000.0000005)
@example(1_700_000_000.0000015)
@example(0.0)
@example(-0.5)
@example(-1e-7)
def test_rfc3339(created: float) -> None:
    assert logsink.rfc3339(created) == _rfc3339_with_modf(created)


@pytest.mark.parametrize("created", [1_700_000_000.123456, 1_700_000_000.9999996, 86_400.5, 1e9 + 0.25])
def test_rfc3339_as_datetime(created: float) -> None:
    want = datetime.fromtimestamp(created, tz=UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    assert logsink.rfc3339(created) == want


# --- no logging on the way -----------------------------------------------------------------------


def test_a_run_does_not_import_logging() -> None:
    # Warnings included: without a sink, the loggers would load logging for them. -S: no
    # site-packages, whose pytest and hypothesis plugins would bring logging along (so would the
    # test helpers: the real machine is used, the options leave it nothing to look up).
    code = (
        "import io, sys\n"
        f"sys.path.insert(0, {str(ROOT)!r})\n"
        "from istio_iptables import cli\n"
        f"argv = {[*CLASSIC, *PINNED, '--dry-run', 'extra']!r}\n"
        f"env = {OWNER_ENV!r}\n"
        "sys.stdout = io.StringIO()\n"
        "for prog in (cli.PROG_IPTABLES, cli.PROG_CLEAN):\n"
        "    assert cli.run(prog, argv, env=env) == 0\n"
        "    assert cli.run(prog, argv + ['--log_as_json', '--log_output_level=debug'], env=env) == 0\n"
        "assert 'logging' not in sys.modules, 'logging imported'\n"
        "assert 'click' not in sys.modules, 'click imported'\n"
    )
    p = subprocess.run(
        [sys.executable, "-S", "-c", code], capture_output=True, text=True, check=False, cwd=ROOT
    )
    assert p.returncode == 0, p.stderr
    lines = p.stderr.splitlines()
    assert len(lines) == 16, p.stderr  # four runs: two warnings and two infos each
    warnings = [line for line in lines if "\twarn\t" in line or '"level": "warn"' in line]
    assert len(warnings) == 8, p.stderr


@pytest.mark.skipif(not (BIN / "istio-iptables").exists(), reason="console scripts not installed")
@pytest.mark.parametrize("script", ["istio-iptables", "istio-clean-iptables"])
def test_console_script_dry_run_does_not_import_logging(script: str) -> None:
    p = subprocess.run(
        [
            sys.executable,
            "-X",
            "importtime",
            str(BIN / script),
            *CLASSIC,
            "-d",
            "15090,15021,15020",
            "--dry-run",
            "x",
        ],
        capture_output=True,
        text=True,
        check=False,
        env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", **OWNER_ENV},
    )
    assert p.returncode == 0, p.stderr
    imported = {
        line.rsplit("|", 1)[1].strip() for line in p.stderr.splitlines() if line.startswith("import time:")
    }
    assert "istio_iptables.cli" in imported
    assert "logging" not in imported
    shown = [line for line in p.stderr.splitlines() if not line.startswith("import time:")]
    assert [lvl for lvl, _ in records("\n".join(shown))] == ["warn", "warn", "info", "info"]
