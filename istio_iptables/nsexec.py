"""Start one iptables command inside a network namespace with user and group lookups limited to
local files.

It runs as a script (``python -I -S nsexec.py ...``): standard library only, so it starts in a few
milliseconds. Imported (the CNI plugin's launcher limits its own lookups with
``limit_lookups_to_files``), it binds libc through startup.libc_function instead of loading the
``ctypes`` package. The applier puts it in front of iptables-restore instead of ``nsenter`` when the
host's name-service configuration could reach the network (``apply.host_needs_local_lookups``).

    nsexec.py [--net PATH] [--local-lookups] -- COMMAND [ARG...]

Errors of its own are one stderr line starting with ``nsexec:`` and exit status 125 (127 when
COMMAND does not exist), so they cannot be mistaken for the command's own failure.
"""

from __future__ import annotations

import os
import sys

TYPE_CHECKING = False  # startup.TYPE_CHECKING, which a script cannot import

if TYPE_CHECKING:
    from collections.abc import Callable

if __package__:
    from .startup import get_errno, libc_function
else:  # a script: the standard library only

    def libc_function(name: str) -> Callable[..., int]:
        import ctypes

        function: Callable[..., int] = getattr(ctypes.CDLL(None, use_errno=True), name)
        return function

    def get_errno() -> int:
        import ctypes

        return ctypes.get_errno()


NSSWITCH = "/etc/nsswitch.conf"

# Every database iptables may consult, answered from /etc files only. iptables looks up
# ``--uid-owner``/``--gid-owner`` values with getpwnam()/getgrnam() even when they are numeric, so
# with an "sss", "ldap" or "systemd" source a half-built pod namespace could stall each restore.
LOCAL_NSSWITCH = "".join(
    f"{db}: files\n"
    for db in (
        "passwd",
        "group",
        "shadow",
        "gshadow",
        "hosts",
        "networks",
        "protocols",
        "services",
        "ethers",
        "rpc",
    )
)


EXIT_SETUP = 125
EXIT_NOT_FOUND = 127

_CLONE_NEWNS = 0x00020000
_CLONE_NEWNET = 0x40000000
_MS_BIND = 0x1000
_MS_REC = 0x4000
_MS_PRIVATE = 1 << 18
_MNT_DETACH = 2
# Where the files-only nsswitch.conf is staged for a moment (a tmpfs mounted over the first of
# these that exists, in the private mount namespace only, and detached again at once).
_STAGES = ("/tmp", "/run", "/dev/shm", "/mnt")


def _fail(message: str, code: int = EXIT_SETUP) -> None:
    sys.stderr.write(f"nsexec: {message}\n")
    sys.exit(code)


def _check(rc: int, what: str) -> None:
    if rc != 0:
        err = get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def limit_lookups_to_files() -> None:
    """Private mount namespace with a files-only nsswitch.conf bound over the real one.

    The file is written to a tmpfs mounted over a scratch directory in the private namespace
    only, bound over nsswitch.conf, and the tmpfs is detached again: nothing is left on any disk
    and the directory (say /run with the xtables lock) looks as before to the command.
    """
    stage = next((d for d in _STAGES if os.path.isdir(d)), None)
    if stage is None:
        raise OSError(2, "no directory to stage nsswitch.conf in")
    mount = libc_function("mount")
    _check(libc_function("unshare")(_CLONE_NEWNS), "unshare(CLONE_NEWNS)")
    _check(mount(b"none", b"/", None, _MS_REC | _MS_PRIVATE, None), "making / private")
    _check(mount(b"tmpfs", stage.encode(), b"tmpfs", 0, b"size=16k,mode=0755"), "mounting a tmpfs")
    staged = f"{stage}/nsswitch.conf"
    with open(staged, "w", encoding="utf-8") as f:
        f.write(LOCAL_NSSWITCH)
    _check(mount(staged.encode(), NSSWITCH.encode(), None, _MS_BIND, None), f"binding over {NSSWITCH}")
    _check(libc_function("umount2")(stage.encode(), _MNT_DETACH), "detaching the tmpfs")


def _exec(argv: list[str]) -> None:
    try:
        os.execvp(argv[0], argv)
    except FileNotFoundError:
        _fail(f"failed to execute {argv[0]}: No such file or directory", EXIT_NOT_FOUND)
    except OSError as e:
        _fail(f"failed to execute {argv[0]}: {e.strerror}")


def main(args: list[str]) -> None:
    net: str | None = None
    local = False
    while args and args[0] != "--":
        opt = args.pop(0)
        if opt == "--net" and args:
            net = args.pop(0)
        elif opt == "--local-lookups":
            local = True
        else:
            _fail(f"bad option {opt!r}")
    argv = args[1:]
    if not argv:
        _fail("no command given")

    ns_fd = -1
    if net is not None:
        try:
            ns_fd = os.open(net, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            _fail(f"cannot open network namespace {net}: {e.strerror}")

    if local:
        try:
            limit_lookups_to_files()
        except OSError as e:
            # Without CAP_SYS_ADMIN (an init container) this cannot be done; go on as Istio does.
            sys.stderr.write(f"nsexec: warning: lookups not limited to local files ({e.strerror})\n")

    if ns_fd >= 0:
        try:
            _check(libc_function("setns")(ns_fd, _CLONE_NEWNET), "setns")
        except OSError as e:
            _fail(f"cannot enter network namespace {net}: {e.strerror}")
        os.close(ns_fd)
    _exec(argv)


if __name__ == "__main__":
    main(sys.argv[1:])
