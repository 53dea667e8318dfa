"""The one seam through which every external command runs: a real executor and a recording one.

Commands are argv lists, never shell strings. ``nsenter_argv`` prefixes util-linux ``nsenter --net=PATH
--`` where only the child should run in another network namespace (the applier instead enters the
namespace itself for its run, see apply.py).

The CNI plugin and the init container import this module on every pod start, so it imports
neither ``typing`` nor ``dataclasses``, and the real executor does not use ``subprocess`` (which
loads ``signal``, ``threading``, ``selectors`` and ``locale``): it starts children with
``os.posix_spawnp`` and talks to them over pipes with ``select.poll``.
"""

from __future__ import annotations

import os
import select
import time

from .startup import SIGKILL, SIGPIPE, SIGXFSZ, TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping, Sequence
    from typing import Protocol


class Completed(NamedTuple):
    argv: tuple[str, ...]
    returncode: int
    stdout: str = ""
    stderr: str = ""

    @property
    def ok(self) -> bool:
        return self.returncode == 0


class CommandNotFound(Exception):
    def __init__(self, program: str) -> None:
        super().__init__(f"{program}: command not found")
        self.program = program


if TYPE_CHECKING:

    class Executor(Protocol):
        def run(
            self,
            argv: Sequence[str],
            *,
            stdin: str | None = None,
            env: Mapping[str, str] | None = None,
            timeout: float | None = None,
        ) -> Completed: ...

else:

    class Executor:
        """Only a type: anything with ``RealExecutor.run``'s signature (a Protocol for type
        checkers; tests pass their own)."""


def nsenter_argv(netns: str | None, argv: Sequence[str]) -> list[str]:
    """Prefix ``argv`` so it runs inside the network namespace at ``netns`` (no-op for None)."""
    if not netns:
        return list(argv)
    return ["nsenter", f"--net={netns}", "--", *argv]


# Exit status reported for a command that ran out of time (timeout(1)'s).
_TIMED_OUT = 124
# What one read takes from a pipe; the default pipe buffer is 64 KiB.
_READ = 1 << 16
# After a timeout, what is read of the output already buffered: as much as the largest pipe an
# unprivileged process may ask for holds (fs.pipe-max-size).
_DRAIN = 1 << 20


class RealExecutor:
    """Runs commands without a shell and captures their output as text: what
    ``subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=...)`` does, with
    ``os.posix_spawnp`` (one vfork-style clone in glibc) and pipes polled in this thread.

    Differences that do not matter to the commands run here: text is UTF-8 whatever the locale
    (output with bad bytes replaced and newlines untranslated; input encoded like argv, so strings
    from undecodable bytes go back as those bytes); without ``stdin`` the child reads an empty
    pipe rather than this process's stdin, as Go's os/exec gives it /dev/null; and descriptors are
    not closed in the child beyond the close-on-exec ones (every descriptor Python opens is).
    After a timeout the output is what the child wrote until then, without waiting for the end
    of output that grandchildren could hold off for ever.
    """

    def run(
        self,
        argv: Sequence[str],
        *,
        stdin: str | None = None,
        env: Mapping[str, str] | None = None,
        timeout: float | None = None,
    ) -> Completed:
        return self.start(argv, stdin=stdin, env=env, timeout=timeout).wait()

    def start(
        self,
        argv: Sequence[str],
        *,
        stdin: str | None = None,
        env: Mapping[str, str] | None = None,
        timeout: float | None = None,
    ) -> Running:
        """Start ``argv`` and return at once; ``wait()`` on the result gives what ``run`` returns.
        Several may run at the same time (the timeout counts from here). Raises CommandNotFound."""
        args = tuple(argv)
        child_env: Mapping[str, str] = os.environ
        spawn = os.posix_spawnp
        program = args[0]
        if env:
            child_env = {**os.environ, **env}
            # glibc searches this process's PATH; subprocess searches the one the child gets.
            path = child_env.get("PATH", os.defpath)
            if os.sep not in program and path != os.environ.get("PATH", os.defpath):
                found = which(program, path)
                if found is None:
                    raise CommandNotFound(program)
                program, spawn = found, os.posix_spawn
        return Running(spawn, program, args, child_env, stdin, timeout)


class Running:
    """A command started by ``RealExecutor.start`` (its whole stdin already in place); ``wait()``
    collects its output and reaps it (once)."""

    def __init__(
        self,
        spawn: Callable[..., int],
        program: str,
        args: tuple[str, ...],
        env: Mapping[str, str],
        stdin: str | None,
        timeout: float | None,
    ) -> None:
        self.args = args
        self.timeout = timeout
        self.deadline = None if timeout is None else time.monotonic() + timeout
        # Pipes are close-on-exec so that children spawned meanwhile by other threads do not
        # hold them (and keep our reads from ending); dup2 clears the flag on the copies the
        # child gets as 0, 1 and 2, and exec closes the originals there.
        self.opened: list[int] = []
        self.pid = 0
        try:
            in_r = _input(stdin, self.opened)
            self.out_r, out_w = _pipe(self.opened)
            self.err_r, err_w = _pipe(self.opened)
            try:
                self.pid = spawn(
                    program,
                    args,
                    env,
                    file_actions=[
                        (os.POSIX_SPAWN_DUP2, in_r, 0),
                        (os.POSIX_SPAWN_DUP2, out_w, 1),
                        (os.POSIX_SPAWN_DUP2, err_w, 2),
                    ],
                    # Python ignores SIGPIPE and SIGXFSZ, and ignored signals survive exec;
                    # subprocess restores both (restore_signals), so `cmd | head` works.
                    setsigdef=(SIGPIPE, SIGXFSZ),
                )
            except FileNotFoundError as e:
                raise CommandNotFound(args[0]) from e
            for fd in (in_r, out_w, err_w):
                _close(fd, self.opened)
        except BaseException:
            self._abandon()
            raise

    def wait(self) -> Completed:
        try:
            return self._wait()
        finally:
            self._abandon()

    def _wait(self) -> Completed:
        args, opened, deadline = self.args, self.opened, self.deadline
        poller = select.poll()
        chunks: dict[int, list[bytes]] = {self.out_r: [], self.err_r: []}
        reading = set(chunks)
        for fd in reading:
            poller.register(fd, select.POLLIN)
        timed_out = False
        while reading:
            wait = None
            if deadline is not None:
                # Recomputed each round: poll returns early for every event (and Python
                # retries it after a signal with what is left).
                left = deadline - time.monotonic()
                if left <= 0:
                    timed_out = True
                    break
                wait = left * 1000
            for fd, _ in poller.poll(wait):
                chunk = os.read(fd, _READ)
                if chunk:
                    chunks[fd].append(chunk)
                else:
                    poller.unregister(fd)
                    reading.discard(fd)
                    _close(fd, opened)

        returncode = None
        if not timed_out:
            returncode = _reap(self.pid) if deadline is None else _reap_by(self.pid, deadline)
        if returncode is None:
            os.kill(self.pid, SIGKILL)
            _reap(self.pid)
            self.pid = 0
            for fd, _ in poller.poll(0):
                if fd in reading:
                    chunks[fd].append(os.read(fd, _DRAIN))
            out, err = _text(chunks[self.out_r]), _text(chunks[self.err_r])
            return Completed(args, _TIMED_OUT, out, err + f"\ntimed out after {self.timeout}s")
        self.pid = 0
        return Completed(args, returncode, _text(chunks[self.out_r]), _text(chunks[self.err_r]))

    def _abandon(self) -> None:
        """Leave neither a running child nor a zombie nor an open pipe behind (after an
        interruption - KeyboardInterrupt, MemoryError... - or once reaped)."""
        pid, self.pid = self.pid, 0
        try:
            if pid:
                try:
                    os.kill(pid, SIGKILL)
                finally:
                    _reap(pid)
        finally:
            opened, self.opened = self.opened, []
            for fd in opened:
                os.close(fd)


def _input(stdin: str | None, opened: list[int]) -> int:
    """What the child reads as its stdin, recorded in ``opened``: the whole of ``stdin`` in an
    anonymous in-memory file, or an empty pipe.

    The input is complete before the child exists, so nothing the parent does afterwards (or a
    SIGKILL that ends it) can cut the child's input short: an iptables-restore that commits each
    table at its COMMIT line while it reads would otherwise commit the tables read so far and drop
    the rest. It also never waits for a child that has not read its input yet.
    """
    if not stdin:
        read_end, write_end = _pipe(opened)
        _close(write_end, opened)
        return read_end
    fd = os.memfd_create("stdin", os.MFD_CLOEXEC)
    opened.append(fd)
    data = memoryview(stdin.encode("utf-8", "surrogateescape"))
    sent = 0
    while sent < len(data):
        sent += os.write(fd, data[sent:])
    os.lseek(fd, 0, os.SEEK_SET)
    if fd <= 2:  # only with this process's stdin, stdout or stderr closed (see _pipe)
        import fcntl

        moved = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 3)
        opened.append(moved)
        _close(fd, opened)
        fd = moved
    return fd


def _pipe(opened: list[int]) -> tuple[int, int]:
    """A close-on-exec pipe whose ends are above 2, recorded in ``opened`` (to be closed).

    Only with this process's stdin, stdout or stderr closed can a pipe end be 0, 1 or 2, and
    then the child's dup2 onto 0, 1 and 2 could overwrite it before using it: such ends move up.
    """
    ends = os.pipe2(os.O_CLOEXEC)
    opened += ends
    if min(ends) > 2:
        return ends
    import fcntl

    moved = []
    for fd in ends:
        moved.append(fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 3))
        opened.append(moved[-1])
    # The low ends go at once: a second write end left open here would keep the child's output
    # from ever reaching end-of-file.
    for fd in ends:
        _close(fd, opened)
    return moved[0], moved[1]


def _close(fd: int, opened: list[int]) -> None:
    opened.remove(fd)
    os.close(fd)


def _reap(pid: int) -> int:
    """Wait for the child; its exit status, or minus the signal that killed it."""
    try:
        _, status = os.waitpid(pid, 0)
    except ChildProcessError:
        # SIGCHLD ignored (inherited from whoever started us): the kernel reaped it already and
        # its status is lost; subprocess reports 0 then too.
        return 0
    return os.waitstatus_to_exitcode(status)


def _reap_by(pid: int, deadline: float) -> int | None:
    """Like ``_reap``, but None when the child still runs at ``deadline``.

    Its pipes have reached end-of-file, but it closes its files a moment before it can be
    reaped, so often it is not quite done yet: its pidfd becomes readable when it is. Where
    pidfds are missing (Linux before 5.3, or a seccomp filter that refuses them) this checks
    with growing pauses, as subprocess does when it waits with a timeout.
    """
    try:
        done, status = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return 0
    if done:
        return os.waitstatus_to_exitcode(status)
    try:
        pidfd = os.pidfd_open(pid)
    except OSError:
        pass
    else:
        try:
            poller = select.poll()
            poller.register(pidfd, select.POLLIN)
            if not poller.poll(max(deadline - time.monotonic(), 0) * 1000):
                return None
        finally:
            os.close(pidfd)
        return _reap(pid)
    pause = 0.0001
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return None
        time.sleep(min(pause, left))
        pause = min(pause * 2, 0.05)
        try:
            done, status = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            return 0
        if done:
            return os.waitstatus_to_exitcode(status)


def _text(chunks: list[bytes]) -> str:
    return b"".join(chunks).decode("utf-8", "replace")


def which(name: str, path: str | None = None) -> str | None:
    """The first executable ``name`` on ``path`` (default: this process's PATH, where an empty
    PATH finds nothing), as ``shutil.which`` finds it on Linux (shutil itself loads the
    compression modules at import; this runs on every pod start)."""
    if os.sep in name:
        return name if _executable(name) else None
    if path is None:
        path = os.environ.get("PATH", os.defpath)
        if not path:
            return None
    seen: set[str] = set()
    for directory in path.split(os.pathsep):
        if directory in seen:
            continue
        seen.add(directory)
        candidate = os.path.join(directory, name)
        if _executable(candidate):
            return candidate
    return None


def _executable(path: str) -> bool:
    return os.path.exists(path) and os.access(path, os.X_OK) and not os.path.isdir(path)


class RecordingExecutor:
    """Records every call; answers from ``responder`` (default: success with no output)."""

    def __init__(
        self,
        responder: Callable[[tuple[str, ...], str | None], Completed] | None = None,
        calls: list[tuple[tuple[str, ...], str | None, dict[str, str]]] | None = None,
    ) -> None:
        self.responder = responder
        self.calls: list[tuple[tuple[str, ...], str | None, dict[str, str]]] = [] if calls is None else calls

    def __repr__(self) -> str:
        return f"RecordingExecutor(responder={self.responder!r}, calls={self.calls!r})"

    def run(
        self,
        argv: Sequence[str],
        *,
        stdin: str | None = None,
        env: Mapping[str, str] | None = None,
        timeout: float | None = None,
    ) -> Completed:
        key = tuple(argv)
        self.calls.append((key, stdin, dict(env or {})))
        if self.responder is not None:
            return self.responder(key, stdin)
        return Completed(key, 0)
