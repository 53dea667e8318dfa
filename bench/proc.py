"""Start a process and measure it: wall time from spawn to exit, exit status, output and peak RSS
(``wait4`` resource usage). Children run in their own process group so nothing is left behind."""

from __future__ import annotations

import contextlib
import os
import selectors
import signal
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

# Every child still running, so an interrupted run can kill them all (by process group).
_LIVE: dict[int, Child] = {}


@dataclass(frozen=True)
class Result:
    argv: tuple[str, ...]
    returncode: int
    seconds: float
    stdout: bytes
    stderr: bytes
    maxrss_kib: int
    cpu_seconds: float
    timed_out: bool = False

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out

    def describe(self) -> str:
        """A one-line reason for a failure: exit status and the end of stderr (or stdout)."""
        what = "timed out" if self.timed_out else f"exit {self.returncode}"
        text = (self.stderr or self.stdout).decode(errors="replace").strip().splitlines()
        tail = " | ".join(text[-3:])
        return f"{self.argv[0]}: {what}" + (f": {tail[:400]}" if tail else "")


def _memfd(name: str, data: bytes = b"") -> int:
    fd = os.memfd_create(name, os.MFD_CLOEXEC)
    if data:
        os.write(fd, data)
        os.lseek(fd, 0, os.SEEK_SET)
    return fd


def _read_all(fd: int) -> bytes:
    os.lseek(fd, 0, os.SEEK_SET)
    chunks = []
    while chunk := os.read(fd, 1 << 20):
        chunks.append(chunk)
    return b"".join(chunks)


class Child:
    """A spawned process. stdin is served from an in-memory file and stdout/stderr go to in-memory
    files, so no pipe needs draining and many children can run at once without threads."""

    def __init__(
        self, argv: Sequence[str], *, stdin: bytes = b"", env: Mapping[str, str] | None = None
    ) -> None:
        self.argv = tuple(argv)
        self._fds = [_memfd("stdin", stdin), _memfd("stdout"), _memfd("stderr")]
        actions = [(os.POSIX_SPAWN_DUP2, fd, i) for i, fd in enumerate(self._fds)]
        self.started = time.perf_counter()
        try:
            self.pid = os.posix_spawnp(
                self.argv[0], self.argv, dict(os.environ if env is None else env),
                file_actions=actions, setpgroup=0,
            )  # fmt: skip
        except BaseException:
            self._close()
            raise
        _LIVE[self.pid] = self
        self.pidfd = os.pidfd_open(self.pid)

    def _close(self) -> None:
        for fd in self._fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._fds = []

    def reap(self, *, timed_out: bool = False) -> Result:
        """Collects the exited child (blocks until it has exited)."""
        _, status, ru = os.wait4(self.pid, 0)
        ended = time.perf_counter()
        _LIVE.pop(self.pid, None)
        os.close(self.pidfd)
        out, err = _read_all(self._fds[1]), _read_all(self._fds[2])
        self._close()
        return Result(
            self.argv, os.waitstatus_to_exitcode(status), ended - self.started, out, err,
            ru.ru_maxrss, ru.ru_utime + ru.ru_stime, timed_out,
        )  # fmt: skip

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)

    def wait(self, timeout: float) -> Result:
        sel = selectors.DefaultSelector()
        sel.register(self.pidfd, selectors.EVENT_READ)
        try:
            ready = sel.select(timeout)
        finally:
            sel.close()
        if not ready:
            self.kill()
            return self.reap(timed_out=True)
        return self.reap()


def run(
    argv: Sequence[str], *, stdin: bytes = b"", env: Mapping[str, str] | None = None, timeout: float = 60.0
) -> Result:
    """Runs argv to completion and measures it."""
    return Child(argv, stdin=stdin, env=env).wait(timeout)


def run_all(children: Sequence[Child], timeout: float) -> list[Result]:
    """Waits for children started together; each one's time runs from its own spawn to its exit."""
    results: dict[int, Result] = {}
    sel = selectors.DefaultSelector()
    for c in children:
        sel.register(c.pidfd, selectors.EVENT_READ, c)
    deadline = time.monotonic() + timeout
    try:
        while len(results) < len(children):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            for key, _ in sel.select(remaining):
                done: Child = key.data
                sel.unregister(done.pidfd)
                results[done.pid] = done.reap()
    finally:
        sel.close()
    for c in children:
        if c.pid not in results:
            c.kill()
            results[c.pid] = c.reap(timed_out=True)
    return [results[c.pid] for c in children]


def kill_all() -> None:
    """Kills and reaps every child still running (used on interruption)."""
    for c in list(_LIVE.values()):
        c.kill()
        with contextlib.suppress(ChildProcessError, OSError):
            c.reap(timed_out=True)
