"""The executor seam: the real executor against real processes (output, status, stdin, timeouts,
environment, descriptors and signal dispositions of the child), and the recording one."""

from __future__ import annotations

import os
import select
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from istio_iptables import executor as ex
from istio_iptables.executor import CommandNotFound, Completed, RealExecutor, RecordingExecutor, nsenter_argv

REPO_ROOT = Path(__file__).resolve().parent.parent
# Bounds every run that could hang if the executor deadlocked: the test then fails with 124.
SAFETY = 60.0


def run(argv: list[str], **kw: object) -> Completed:
    kw.setdefault("timeout", SAFETY)
    return RealExecutor().run(argv, **kw)  # type: ignore[arg-type]


def open_fds() -> set[int]:
    return {int(fd) for fd in os.listdir("/proc/self/fd")}


def gone(pid: int) -> bool:
    """Whether ``pid`` was reaped: not our child any more, and no process (zombie or not) left."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return not os.path.exists(f"/proc/{pid}")
    return False


def script(path: Path, body: str) -> Path:
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(0o755)
    return path


# --- output and status -----------------------------------------------------------------------


def test_stdout_stderr_and_exit_status_are_captured() -> None:
    res = run(["sh", "-c", "echo out; echo err >&2; printf more; exit 3"])
    assert res == Completed(
        ("sh", "-c", "echo out; echo err >&2; printf more; exit 3"), 3, "out\nmore", "err\n"
    )
    assert not res.ok
    assert run(["true"]).ok and run(["true"]) == Completed(("true",), 0, "", "")


def test_argv_is_recorded_as_a_tuple_and_passed_verbatim() -> None:
    args = ["printf", "%s|", "a b", "", "$HOME", "*", "'q'"]
    res = run(args)
    assert res.argv == tuple(args)
    assert res.stdout == "a b||$HOME|*|'q'|"


@pytest.mark.parametrize("timeout", [None, SAFETY])
@pytest.mark.parametrize("signum", [15, 9])
def test_a_child_killed_by_a_signal_reports_minus_the_signal(signum: int, timeout: float | None) -> None:
    assert run(["sh", "-c", f"kill -{signum} $$"], timeout=timeout).returncode == -signum
    assert run(["sh", "-c", "exit 300"], timeout=timeout).returncode == 300 % 256


def test_output_is_utf8_text_with_bad_bytes_replaced() -> None:
    assert run(["cat"], stdin="héllo ✓\n").stdout == "héllo ✓\n"
    assert run(["printf", "a\\377b"]).stdout == "a\ufffdb"
    # A string that came from undecodable bytes (argv, environment) goes back as those bytes.
    assert run(["od", "-An", "-tx1"], stdin="a\udcffb").stdout.split() == ["61", "ff", "62"]


def test_large_output_on_both_streams() -> None:
    res = run(["sh", "-c", "head -c 3000000 /dev/zero; head -c 2000000 /dev/zero >&2"])
    assert (len(res.stdout), len(res.stderr)) == (3_000_000, 2_000_000)


# --- stdin -----------------------------------------------------------------------------------


def within(seconds: float, fn: Callable[[], Completed]) -> Completed:
    """``fn()``, or a failure when it has not returned after ``seconds`` (a deadlocked write
    blocks where no timeout of the executor's own can end it)."""
    results: list[Completed] = []
    t = threading.Thread(target=lambda: results.append(fn()), daemon=True)
    t.start()
    t.join(seconds)
    assert results, f"no result after {seconds}s"
    return results[0]


def test_megabytes_of_stdin_echoed_back_do_not_deadlock() -> None:
    # Far more than a pipe holds in either direction: the child blocks writing unless it is read
    # while its stdin is still being written.
    doc = "".join(f"-A ISTIO_OUTPUT -d 10.{i % 256}.0.0/16 -j RETURN\n" for i in range(50_000))
    assert len(doc) > 2 << 20
    res = within(SAFETY, lambda: run(["cat"], stdin=doc))
    assert res.returncode == 0 and res.stdout == doc
    both = within(SAFETY, lambda: run(["tee", "/dev/stderr"], stdin=doc))
    assert both.stdout == doc and both.stderr == doc


def test_a_child_that_does_not_read_its_stdin() -> None:
    doc = "x" * (2 << 20)
    res = run(["sh", "-c", "echo early; exit 3"], stdin=doc)
    assert (res.returncode, res.stdout) == (3, "early\n")
    assert run(["head", "-c", "3"], stdin=doc) == Completed(("head", "-c", "3"), 0, "xxx", "")


def test_without_stdin_the_child_reads_end_of_file() -> None:
    # Not this process's stdin, which the CNI plugin's caller writes its request to.
    assert run(["wc", "-c"]).stdout.strip() == "0"
    assert run(["wc", "-c"], stdin="").stdout.strip() == "0"


# --- programs --------------------------------------------------------------------------------


def test_a_missing_program_raises_command_not_found(tmp_path: Path) -> None:
    for name in ("no-such-program-here", str(tmp_path / "nope")):
        with pytest.raises(CommandNotFound) as e:
            run([name, "x"])
        assert e.value.program == name
        assert str(e.value) == f"{name}: command not found"


def test_a_program_that_cannot_be_executed_raises_oserror(tmp_path: Path) -> None:
    plain = tmp_path / "plain"
    plain.write_text("#!/bin/sh\n")
    with pytest.raises(PermissionError):
        run([str(plain)])
    with pytest.raises(OSError) as e:
        run([str(tmp_path)])
    assert not isinstance(e.value, CommandNotFound)


def test_argv0_with_a_slash_is_used_as_is(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tool = script(tmp_path / "tool", "echo tool $1")
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    assert run([str(tool), "abs"]).stdout == "tool abs\n"
    monkeypatch.chdir(tmp_path)
    assert run(["./tool", "rel"]).stdout == "tool rel\n"
    with pytest.raises(CommandNotFound):
        run(["tool"])


def test_bare_names_are_searched_on_path_in_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first, second = tmp_path / "a", tmp_path / "b"
    first.mkdir()
    second.mkdir()
    script(second / "tool", "echo second")
    monkeypatch.setenv("PATH", f"{first}:{second}:/usr/bin:/bin")
    assert run(["tool"]).stdout == "second\n"
    script(first / "tool", "echo first")
    assert run(["tool"]).stdout == "first\n"


def test_a_path_given_in_env_is_searched_like_subprocess_does(tmp_path: Path) -> None:
    script(tmp_path / "only-here", "echo found $X")
    res = run(["only-here"], env={"PATH": f"{tmp_path}:/usr/bin:/bin", "X": "1"})
    assert res.stdout == "found 1\n"
    assert (
        subprocess.run(
            ["only-here"],
            env={**os.environ, "PATH": f"{tmp_path}:/bin", "X": "1"},
            capture_output=True,
            text=True,
        ).stdout
        == res.stdout
    )
    (tmp_path / "adir").mkdir()
    for name in ("absent", "adir"):
        with pytest.raises(CommandNotFound):
            run([name], env={"PATH": str(tmp_path)})


# --- environment -----------------------------------------------------------------------------


def test_env_is_merged_over_this_process_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EXEC_KEEP", "kept")
    monkeypatch.setenv("EXEC_OVER", "old")
    show = ["sh", "-c", 'echo "$EXEC_KEEP $EXEC_OVER $EXEC_NEW"']
    assert run(show).stdout == "kept old \n"
    assert run(show, env={}).stdout == "kept old \n"
    assert run(show, env={"EXEC_OVER": "new", "EXEC_NEW": "added"}).stdout == "kept new added\n"
    assert os.environ["EXEC_OVER"] == "old" and "EXEC_NEW" not in os.environ


# --- timeouts --------------------------------------------------------------------------------


def test_a_timeout_kills_and_reaps_the_child_and_keeps_its_output() -> None:
    start = time.monotonic()
    res = run(["sh", "-c", "echo $$; echo partial >&2; exec sleep 30"], timeout=0.5)
    assert time.monotonic() - start < 10
    assert res.returncode == 124 and not res.ok
    assert res.stderr == "partial\n\ntimed out after 0.5s"
    assert gone(int(res.stdout))


def test_a_timeout_while_stdin_cannot_be_written() -> None:
    # sleep never reads: writing the rest of the document must not block past the deadline.
    start = time.monotonic()
    res = run(["sleep", "30"], stdin="x" * (2 << 20), timeout=0.5)
    assert res.returncode == 124 and time.monotonic() - start < 10


def test_a_timeout_does_not_wait_for_grandchildren_holding_the_pipes() -> None:
    start = time.monotonic()
    res = run(["sh", "-c", "sleep 30 & echo $!; wait"], timeout=0.5)
    try:
        assert res.returncode == 124 and time.monotonic() - start < 10
    finally:
        os.kill(int(res.stdout), 9)


@pytest.fixture(params=["pidfd", "no-pidfd"])
def pidfds(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Both ways of waiting for a child past the end of its output: with a pidfd, and without
    (older kernels, seccomp filters that refuse pidfd_open)."""
    if request.param == "no-pidfd":

        def refused(pid: int, flags: int = 0) -> int:
            raise OSError(38, "Function not implemented")

        monkeypatch.setattr(os, "pidfd_open", refused)
    return str(request.param)


def test_a_timeout_holds_after_the_child_closes_its_output(tmp_path: Path, pidfds: str) -> None:
    pidfile = tmp_path / "pid"
    before = open_fds()
    start = time.monotonic()
    res = run(["sh", "-c", f"echo $$ > {pidfile}; echo bye; exec >&- 2>&-; exec sleep 30"], timeout=0.5)
    assert time.monotonic() - start < 10
    assert res == Completed(res.argv, 124, "bye\n", "\ntimed out after 0.5s")
    assert gone(int(pidfile.read_text()))
    assert open_fds() == before


def test_a_child_that_exits_after_closing_its_output(pidfds: str) -> None:
    res = run(["sh", "-c", "echo bye; exec >&- 2>&-; sleep 0.3; exit 5"], timeout=SAFETY)
    assert (res.returncode, res.stdout) == (5, "bye\n")
    for _ in range(20):
        assert run(["sh", "-c", "echo $$; exit 7"]).returncode == 7


def test_no_timeout_waits_for_the_child() -> None:
    assert RealExecutor().run(["sh", "-c", "sleep 0.3; echo done"]).stdout == "done\n"


# --- processes and descriptors ---------------------------------------------------------------


def test_children_are_reaped() -> None:
    pids = [int(run(["sh", "-c", "echo $$"]).stdout) for _ in range(5)]
    pids.append(int(run(["sh", "-c", "echo $$; kill -9 $$"]).stdout))
    assert all(gone(pid) for pid in pids)


def test_no_descriptor_leaks_on_any_path(tmp_path: Path) -> None:
    before = open_fds()
    for _ in range(30):
        run(["sh", "-c", "echo out; echo err >&2"], stdin="in")
        run(["cat"], stdin="y" * 200_000)
        run(["sh", "-c", "exit 1"])
        with pytest.raises(CommandNotFound):
            run(["no-such-program-here"])
        with pytest.raises(PermissionError):
            run([str(tmp_path)])
    run(["sleep", "30"], stdin="z" * 200_000, timeout=0.1)
    assert open_fds() == before


def test_the_child_gets_only_its_three_pipes() -> None:
    # Pipe ends are close-on-exec: a child started meanwhile by another thread does not hold them.
    inheritable = {fd for fd in open_fds() if _inheritable(fd)}
    listed = run(["sh", "-c", "ls /proc/$$/fd"]).stdout.split()
    assert {0, 1, 2} <= {int(fd) for fd in listed}
    assert {int(fd) for fd in listed} - {0, 1, 2} <= inheritable


def _inheritable(fd: int) -> bool:
    try:
        return os.get_inheritable(fd)
    except OSError:  # the directory listing /proc/self/fd, closed again
        return False


def test_concurrent_runs_in_threads() -> None:
    doc = "line\n" * 100_000
    results: list[Completed] = []

    def worker() -> None:
        results.extend(run(["cat"], stdin=doc) for _ in range(3))

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 12 and all(r.ok and r.stdout == doc for r in results)


# --- started together, waited for in turn ------------------------------------------------------


def test_started_commands_run_at_the_same_time(tmp_path: Path) -> None:
    # Each waits for the other's file: only if both run at once do both finish before the timeout.
    wait_for = "touch {d}/{me}; while [ ! -e {d}/{other} ]; do sleep 0.01; done; echo {me}"
    a = RealExecutor().start(["sh", "-c", wait_for.format(d=tmp_path, me="a", other="b")], timeout=10)
    b = RealExecutor().start(["sh", "-c", wait_for.format(d=tmp_path, me="b", other="a")], timeout=10)
    assert (a.wait(), b.wait()) == (Completed(a.args, 0, "a\n", ""), Completed(b.args, 0, "b\n", ""))


def test_started_commands_with_large_stdin_waited_in_either_order() -> None:
    # More input than a pipe holds: the rest is fed while waiting, whichever is waited for first.
    before = open_fds()
    docs = ["a" * 300_000, "b" * 200_000, "c" * 5]
    running = [RealExecutor().start(["cat"], stdin=d, timeout=SAFETY) for d in docs]
    assert [r.wait().stdout for r in reversed(running)] == list(reversed(docs))
    assert open_fds() == before


def test_the_timeout_of_a_started_command_counts_from_its_start() -> None:
    r = RealExecutor().start(["sleep", "30"], timeout=0.3)
    time.sleep(0.5)
    t = time.monotonic()
    res = r.wait()
    assert res.returncode == 124 and time.monotonic() - t < 0.25
    assert "timed out after 0.3s" in res.stderr


def test_start_raises_command_not_found_and_leaves_nothing_open() -> None:
    before = open_fds()
    with pytest.raises(CommandNotFound):
        RealExecutor().start(["no-such-program-here"])
    assert open_fds() == before


def test_an_exception_while_waiting_kills_and_reaps_the_child(monkeypatch: pytest.MonkeyPatch) -> None:
    spawned: list[int] = []
    real_spawn = os.posix_spawnp

    def spawn(*args: object, **kw: object) -> int:
        pid = real_spawn(*args, **kw)  # type: ignore[arg-type]
        spawned.append(pid)
        return pid

    class Interrupted:
        def register(self, fd: int, events: int) -> None:
            pass

        def poll(self, timeout: float | None = None) -> list[tuple[int, int]]:
            raise KeyboardInterrupt

    before = open_fds()
    monkeypatch.setattr(os, "posix_spawnp", spawn)
    monkeypatch.setattr(select, "poll", Interrupted)
    with pytest.raises(KeyboardInterrupt):
        RealExecutor().run(["sleep", "30"], stdin="x")
    assert len(spawned) == 1 and gone(spawned[0])
    assert open_fds() == before


def test_closed_standard_descriptors_in_this_process(tmp_path: Path) -> None:
    # With 0, 1 and 2 closed the pipes are created there; the child must still get them right.
    out = tmp_path / "out"
    code = (
        "import os, sys\n"
        "from istio_iptables.executor import RealExecutor\n"
        "for fd in (0, 1, 2):\n"
        "    os.close(fd)\n"
        "a = RealExecutor().run(['cat'], stdin='in\\n')\n"
        "b = RealExecutor().run(['sh', '-c', 'echo out; echo err >&2; exit 4'])\n"
        f"open({str(out)!r}, 'w').write(repr((a.stdout, b.returncode, b.stdout, b.stderr)))\n"
    )
    res = run([sys.executable, "-I", "-c", code])
    assert res.returncode == 0, res.stderr
    assert out.read_text() == repr(("in\n", 4, "out\n", "err\n"))


def _ignored_signals(status: str) -> int:
    return next(int(line.split()[1], 16) for line in status.splitlines() if line.startswith("SigIgn:"))


def test_the_child_gets_default_sigpipe_and_sigxfsz() -> None:
    # Python ignores both, and ignored signals survive exec: `iptables-save | head` would then see
    # EPIPE errors instead of ending quietly.
    pipe, xfsz = 1 << (13 - 1), 1 << (25 - 1)
    assert _ignored_signals(run(["cat", "/proc/self/status"]).stdout) & (pipe | xfsz) == 0
    # The check can fail: without restoring them, a child inherits both ignored.
    raw = subprocess.run(["cat", "/proc/self/status"], capture_output=True, text=True, restore_signals=False)
    assert _ignored_signals(raw.stdout) & (pipe | xfsz) == pipe | xfsz
    # And a pipeline ends quietly when its reader stops.
    assert run(["sh", "-c", "yes | head -n1"]) == Completed(("sh", "-c", "yes | head -n1"), 0, "y\n", "")


# --- module --------------------------------------------------------------------------------------


def test_running_a_command_loads_neither_subprocess_nor_typing_nor_dataclasses() -> None:
    code = (
        "import sys\n"
        "from istio_iptables.executor import RealExecutor, Executor\n"
        "assert RealExecutor().run(['true']).ok\n"
        "heavy = ('subprocess', 'signal', 'threading', 'selectors', 'locale', 'typing', 'dataclasses', 'inspect')\n"
        "bad = [m for m in heavy if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-I", "-c", code], check=True, cwd=REPO_ROOT)


def test_completed_is_an_immutable_record() -> None:
    c = Completed(("x",), 0)
    assert (c.stdout, c.stderr, c.ok) == ("", "", True)
    assert Completed(("x",), 2, "o", "e") == Completed(argv=("x",), returncode=2, stdout="o", stderr="e")
    assert not c._replace(returncode=1).ok
    with pytest.raises(AttributeError):
        c.returncode = 1  # type: ignore[misc]


def test_nsenter_argv() -> None:
    assert nsenter_argv(None, ("ip", "a")) == ["ip", "a"]
    assert nsenter_argv("", ["ip"]) == ["ip"]
    assert nsenter_argv("/var/run/netns/p", ["ip", "a"]) == ["nsenter", "--net=/var/run/netns/p", "--", "ip", "a"]


def test_recording_executor_records_and_answers() -> None:
    rec = RecordingExecutor()
    assert rec.run(["a", "b"], stdin="doc", env={"K": "v"}, timeout=3) == Completed(("a", "b"), 0)
    rec.run(("c",))
    assert rec.calls == [(("a", "b"), "doc", {"K": "v"}), (("c",), None, {})]
    assert RecordingExecutor().calls == [] and RecordingExecutor().calls is not RecordingExecutor().calls

    seen: list[tuple[tuple[str, ...], str | None]] = []

    def responder(argv: tuple[str, ...], stdin: str | None) -> Completed:
        seen.append((argv, stdin))
        return Completed(argv, 1, "", "no")

    for made in (RecordingExecutor(responder=responder), RecordingExecutor(responder)):
        assert made.run(["z"], stdin="s") == Completed(("z",), 1, "", "no")
        assert len(made.calls) == 1
    assert seen == [(("z",), "s"), (("z",), "s")]


def test_executor_is_importable_at_run_time() -> None:
    assert isinstance(ex.Executor, type)
