"""A network namespace opened once and then used only by its descriptor: checked, locked, entered.

Every step of an apply (reading the state, the restores, the netlink requests, the policy routes)
works through this one descriptor, so a path switched to another namespace after the check
(a symlink swapped while the plugin waits for the API) changes nothing. And the whole apply holds
an exclusive ``flock`` on the namespace itself, from its first read to its last write, so two
applies into one namespace (two CNI ADDs, a retried ADD, a restarted init container,
istio-clean-iptables) run one after the other instead of deciding on each other's half-written
state. The lock is taken on the namespace's nsfs inode: every process that opens the namespace,
by whatever path, locks the same object, and no lock file is written anywhere.

Commands spawned while the lock is held inherit its descriptor (see ``inherit``), so a restore
that outlives a killed parent still holds the lock until it has committed: the next apply never
reads a half-committed state.
"""

from __future__ import annotations

import fcntl
import os
import time

from .startup import TYPE_CHECKING, get_errno, libc_function

if TYPE_CHECKING:
    from collections.abc import Callable

CLONE_NEWNET = 0x40000000

# NetnsError kinds
MISSING = "missing"  # no such file
INVALID = "invalid"  # not a network namespace, or cannot be opened
OWN = "own"  # the caller's own namespace where that is refused (the CNI plugin: the node's)
BUSY = "busy"  # the lock was not free within the wait


class NetnsError(OSError):
    """The namespace cannot be used; ``kind`` is one of the constants above."""

    def __init__(self, message: str, kind: str, errno: int | None = 0) -> None:
        super().__init__(errno or 0, message)
        self.message = message
        self.kind = kind

    def __str__(self) -> str:
        return self.message


def setns(fd: int) -> None:
    """Move the calling thread into the network namespace open at ``fd``. Raises OSError."""
    call = getattr(os, "setns", None)  # Python 3.12+
    if call is not None:
        call(fd, CLONE_NEWNET)
        return
    if libc_function("setns")(fd, CLONE_NEWNET) != 0:
        err = get_errno()
        raise OSError(err, os.strerror(err))


def _identity(st: os.stat_result) -> tuple[int, int]:
    return st.st_dev, st.st_ino


class Netns:
    """An open network namespace (``path`` None: the caller's own, as it was when opened)."""

    __slots__ = ("fd", "path", "locked")

    def __init__(self, fd: int, path: str | None) -> None:
        self.fd = fd
        self.path = path
        self.locked = False

    def __repr__(self) -> str:
        return f"Netns(fd={self.fd}, path={self.path!r})"

    @property
    def label(self) -> str:
        return f"network namespace {self.path}" if self.path else "this network namespace"

    def identity(self) -> tuple[int, int]:
        return _identity(os.fstat(self.fd))

    def check_kind(self) -> None:
        """Raise NetnsError (INVALID) unless the descriptor is a namespace file."""
        nsfs = _nsfs_device()
        if nsfs is not None and os.fstat(self.fd).st_dev != nsfs:
            raise NetnsError(f"{self.label}: not a namespace file", INVALID)

    def named_by(self, path: str) -> bool:
        """Whether ``path`` still names this namespace (False once it is deleted or replaced)."""
        try:
            return _identity(os.stat(path)) == self.identity()
        except OSError:
            return False

    def lock(self, wait: float, *, sleep: Callable[[float], None] = time.sleep) -> None:
        """Take the exclusive lock, waiting up to ``wait`` seconds. Raises NetnsError (BUSY)."""
        if self.locked:
            return
        deadline = time.monotonic() + wait
        pause = 0.001
        while True:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise NetnsError(
                        f"{self.label}: another process has held its lock (the pod's xtables lock) for"
                        f" more than {wait:g}s; try again later",
                        BUSY,
                    ) from None
                sleep(min(pause, left))
                pause = min(pause * 2, 0.05)
            except OSError as e:
                raise NetnsError(f"{self.label}: cannot lock it: {e.strerror}", INVALID, e.errno) from None
        self.locked = True
        # Children spawned from now on hold the lock too, until they exit.
        os.set_inheritable(self.fd, True)

    def unlock(self) -> None:
        if not self.locked:
            return
        self.locked = False
        os.set_inheritable(self.fd, False)
        fcntl.flock(self.fd, fcntl.LOCK_UN)

    def close(self) -> None:
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            self.locked = False
            os.close(fd)

    def entered(self) -> Entered:
        """Context manager: the calling thread inside this namespace, and back afterwards."""
        return Entered(self)


class Entered:
    """The calling thread inside a namespace for a ``with`` block (see Netns.entered).

    Failing to return is fatal for the thread's later work, so it raises rather than carry on in
    the wrong namespace."""

    __slots__ = ("ns", "_home")

    def __init__(self, ns: Netns) -> None:
        self.ns = ns
        self._home: int | None = None

    def __enter__(self) -> Netns:
        ns = self.ns
        try:
            home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            raise NetnsError(
                f"cannot open this thread's network namespace: {e.strerror}", INVALID, e.errno
            ) from None
        if _identity(os.fstat(home)) == ns.identity():
            os.close(home)  # already there: nothing to undo
            return ns
        try:
            setns(ns.fd)
        except OSError as e:
            os.close(home)
            raise NetnsError(f"cannot enter {ns.label}: {e.strerror}", INVALID, e.errno) from None
        self._home = home
        return ns

    def __exit__(self, *exc: object) -> None:
        home, self._home = self._home, None
        if home is None:
            return
        try:
            setns(home)
        except OSError as e:
            raise NetnsError(
                f"cannot return from {self.ns.label}: {e.strerror}", INVALID, e.errno
            ) from None
        finally:
            os.close(home)


def _nsfs_device() -> int | None:
    """The device number of every namespace file (None without /proc: setns has the last word)."""
    try:
        return os.stat("/proc/self/ns/net").st_dev
    except OSError:
        return None


def open_netns(path: str | None, *, allow_own: bool = True, check_kind: bool = True) -> Netns:
    """Open the namespace at ``path`` (None: the calling thread's own) and check the descriptor:
    a namespace file (unless ``check_kind`` is False: the caller checks before it uses it), and
    with ``allow_own=False`` not this process's own namespace (where the CNI plugin runs, that is
    the node's). Raises NetnsError."""
    where = path or "/proc/thread-self/ns/net"
    label = f"network namespace {path}" if path else "this network namespace"
    try:
        fd = os.open(where, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError as e:
        raise NetnsError(f"{label}: {e.strerror}", MISSING, e.errno) from None
    except OSError as e:
        raise NetnsError(f"{label}: cannot open it: {e.strerror}", INVALID, e.errno) from None
    try:
        st = os.fstat(fd)
        try:
            own = os.stat("/proc/self/ns/net")
        except OSError:
            own = None  # no /proc: setns has the final word
        if check_kind and own is not None and st.st_dev != own.st_dev:
            raise NetnsError(f"{label}: not a namespace file", INVALID)
        if own is not None and not allow_own and _identity(st) == _identity(own):
            raise NetnsError(f"{label}: is the plugin's own network namespace (the node's)", OWN)
    except BaseException:
        os.close(fd)
        raise
    return Netns(fd, path)
