"""Network namespaces for the tests and the benchmark: create and delete them, run commands inside
them, join two of them with a veth pair; ``Namespaces``, the benchmark's batches of them. Plain
functions and classes; the fixtures live in tests/conftest.py."""

from __future__ import annotations

import contextlib
import ipaddress
import os
import secrets
import signal
import subprocess
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

NETNS_DIR = Path("/var/run/netns")
DEFAULT_TIMEOUT = 30.0

_TRUE_WORDS = {"1", "true", "yes", "on", "y"}


def ci_enabled(environ: Mapping[str, str] | None = None) -> bool:
    """True when the CI environment variable holds a true value (CI=true, CI=1, ...)."""
    env = os.environ if environ is None else environ
    return env.get("CI", "").strip().lower() in _TRUE_WORDS


def unique_name(prefix: str = "t", hint: str = "") -> str:
    """A name unlikely to collide with anyone else's on this machine: ``t-<hint>-<random>``."""
    parts = [prefix, hint, secrets.token_hex(4)]
    return "-".join(p for p in parts if p)


def _check(argv: Sequence[str], proc: subprocess.CompletedProcess[str]) -> None:
    if proc.returncode != 0:
        raise RuntimeError(
            f"{' '.join(argv)} exited {proc.returncode}: {(proc.stderr or proc.stdout or '').strip()}"
        )


def run(
    argv: Sequence[str],
    *,
    check: bool = True,
    input: str | None = None,
    timeout: float | None = DEFAULT_TIMEOUT,
    env: Mapping[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Runs argv (no shell), capturing text output; raises RuntimeError with stderr if check fails.
    ``timeout=None``: waits however long it takes."""
    proc = subprocess.run(
        list(argv),
        input=input,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=None if env is None else dict(env),
        check=False,
    )
    if check:
        _check(argv, proc)
    return proc


def exec_argv(ns: NetNS | str, argv: Sequence[str]) -> list[str]:
    """The argv that runs argv inside the namespace: ``ip netns exec NAME ...``."""
    name = ns.name if isinstance(ns, NetNS) else ns
    return ["ip", "netns", "exec", name, *argv]


def run_in(ns: NetNS | str, argv: Sequence[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    """Runs argv inside a named network namespace and waits for it (keywords as for ``run``)."""
    return run(exec_argv(ns, argv), **kwargs)


def popen_in(ns: NetNS | str, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
    """Starts argv inside a named network namespace (for listeners); the caller waits or kills it."""
    return subprocess.Popen(exec_argv(ns, argv), **kwargs)


@dataclass(frozen=True)
class NetNS:
    """A named network namespace (``ip netns``); ``path`` is what setns/nsenter/--network-namespace take."""

    name: str

    @property
    def path(self) -> str:
        return netns_path(self.name)

    def run(self, argv: Sequence[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
        return run_in(self, argv, **kwargs)

    def popen(self, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
        return popen_in(self, argv, **kwargs)


def netns_path(name: str) -> str:
    """Where ``ip netns`` keeps the namespace called ``name``."""
    return str(NETNS_DIR / name)


def create_netns(hint: str = "") -> NetNS:
    """Creates a uniquely named namespace with ``lo`` up."""
    ns = NetNS(unique_name("t", hint))
    run(["ip", "netns", "add", ns.name])
    try:
        run(["ip", "-n", ns.name, "link", "set", "lo", "up"])
    except BaseException:
        delete_netns(ns)
        raise
    return ns


def delete_netns(ns: NetNS | str) -> None:
    """Kills what still runs inside the namespace, then deletes it. Never raises for a missing one."""
    name = ns.name if isinstance(ns, NetNS) else ns
    pids = run(["ip", "netns", "pids", name], check=False).stdout.split()
    for pid in pids:
        if pid.isdigit() and int(pid) != os.getpid():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)
    run(["ip", "netns", "del", name], check=False)


@dataclass(frozen=True)
class VethPair:
    """The two ends of a veth pair: ``ifname_a`` inside ``ns_a``, ``ifname_b`` inside ``ns_b``."""

    ns_a: NetNS
    ifname_a: str
    ns_b: NetNS
    ifname_b: str


def add_addresses(ns: NetNS | str, ifname: str, addrs: Iterable[str]) -> None:
    """Adds ``ADDR/PREFIX`` addresses (IPv4 or IPv6) to an interface; IPv6 ones skip DAD (``nodad``)."""
    for a in addrs:
        iface = ipaddress.ip_interface(a)
        argv = ["ip", "addr", "add", str(iface), "dev", ifname]
        if iface.version == 6:
            argv.append("nodad")
        run_in(ns, argv)


def veth_pair(
    ns_a: NetNS,
    ns_b: NetNS,
    *,
    addrs_a: Iterable[str] = (),
    addrs_b: Iterable[str] = (),
    ifname_a: str = "eth0",
    ifname_b: str = "eth0",
    wait: bool = True,
) -> VethPair:
    """Joins two namespaces with a veth pair created directly inside them (no name is ever used in
    the root namespace), turns DAD off on both ends, adds the addresses (``"10.1.0.2/24"``,
    ``"fd00:1::2/64"``), brings both ends up and, unless wait=False, waits until no IPv6 address on
    them is tentative."""
    run(["ip", "link", "add", ifname_a, "netns", ns_a.name, "type", "veth",
         "peer", "name", ifname_b, "netns", ns_b.name])  # fmt: skip
    pair = VethPair(ns_a, ifname_a, ns_b, ifname_b)
    for ns, ifname, addrs in ((ns_a, ifname_a, addrs_a), (ns_b, ifname_b, addrs_b)):
        # No DAD on a point-to-point test link, so the link-local address is usable at once too.
        run_in(ns, ["sysctl", "-qw", f"net.ipv6.conf.{ifname}.accept_dad=0"], check=False)
        add_addresses(ns, ifname, addrs)
        run_in(ns, ["ip", "link", "set", ifname, "up"])
    if wait:
        wait_ipv6_ready(ns_a, ifname_a)
        wait_ipv6_ready(ns_b, ifname_b)
    return pair


def wait_ipv6_ready(ns: NetNS | str, ifname: str | None = None, timeout: float = 10.0) -> None:
    """Waits until no IPv6 address (on ifname, or any interface) is tentative, i.e. duplicate address
    detection is over: the link-local address does DAD even when the others were added ``nodad``,
    and a tentative address cannot be bound. Raises TimeoutError after timeout seconds."""
    argv = ["ip", "-6", "addr", "show", "tentative"]
    if ifname:
        argv += ["dev", ifname]
    deadline = time.monotonic() + timeout
    while True:
        out = run_in(ns, argv).stdout
        if "inet6" not in out:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"IPv6 addresses still tentative after {timeout}s:\n{out}")
        time.sleep(0.05)


@contextlib.contextmanager
def flocked(path: str | Path) -> Iterator[None]:
    """``path`` flock-ed (exclusive) by this process for the block: every other open file of it,
    in this process or another, waits. (A ``flock PATH sleep`` helper would leave its sleep
    holding the lock after being killed.)"""
    import fcntl

    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


# Group names Istio's owner-group test cases use, which a plain Debian machine does not have.
EXTRA_GROUPS = {"java": 30001, "ftp": 30002}

_BIND_GROUP_FILE = (
    "import os, subprocess, sys\n"
    "subprocess.run(['mount', '--bind', sys.argv[1], '/etc/group'], check=True)\n"
    "os.execvp(sys.argv[2], sys.argv[2:])\n"
)


def with_extra_groups(argv: Sequence[str], directory: Path, groups: Mapping[str, int] = EXTRA_GROUPS) -> list[str]:
    """``argv`` run in a private mount namespace whose /etc/group also has ``groups`` (a copy in
    ``directory`` bound over it; the machine's file is untouched), so that the names resolve."""
    import sys

    copy = directory / "group"
    text = Path("/etc/group").read_text()
    copy.write_text(text + "".join(f"{name}:x:{gid}:\n" for name, gid in groups.items() if f"\n{name}:" not in text))
    return ["unshare", "--mount", "--propagation", "private", sys.executable, "-c", _BIND_GROUP_FILE, str(copy), *argv]


def netns_unavailable_reason() -> str | None:
    """None when this process can create a network namespace (root, ``ip netns add`` works);
    otherwise why not."""
    if os.geteuid() != 0:
        return "needs root to create network namespaces"
    try:
        ns = create_netns("probe")
    except FileNotFoundError:
        return "the ip command (iproute2) is not installed"
    except (RuntimeError, subprocess.TimeoutExpired) as e:
        return f"cannot create a network namespace: {e}"
    delete_netns(ns)
    return None


class Namespaces:
    """The benchmark's namespaces: ``bench-<run id>-<n>``, created and deleted in batches (one
    ``ip -batch`` each) and remembered until deleted, so that an interrupted run leaves none."""

    def __init__(self) -> None:
        self.prefix = f"bench-{secrets.token_hex(3)}-"
        self._count = 0
        self.live: set[str] = set()

    path = staticmethod(netns_path)

    def _batch(self, verb: str, names: list[str]) -> None:
        if not names:
            return
        script = "".join(f"netns {verb} {n}\n" for n in names)
        p = run(["ip", "-force", "-batch", "-"], input=script, check=False, timeout=None)
        if p.returncode != 0 and verb == "add":
            raise RuntimeError(f"ip netns add failed: {p.stderr.strip()}")

    def create(self, count: int = 1) -> list[str]:
        names = []
        for _ in range(count):
            self._count += 1
            names.append(f"{self.prefix}{self._count}")
        self.live.update(names)
        self._batch("add", names)
        return names

    def create_one(self) -> str:
        return self.create(1)[0]

    def delete(self, names: list[str]) -> None:
        self._batch("del", names)
        self.live.difference_update(names)

    def delete_all(self) -> None:
        """Deletes every namespace of this run, including any the registry missed."""
        names = set(self.live)
        if NETNS_DIR.is_dir():
            names.update(n for n in os.listdir(NETNS_DIR) if n.startswith(self.prefix))
        self.delete(sorted(names))
