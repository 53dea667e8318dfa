"""Addresses on an interface of another network namespace, with one rtnetlink request each, and
whether a namespace has any nf_tables table of a family.

What ``ip -n NS addr add ::6/128 dev lo`` does, written with the standard library only, so the
common case (IPv6 enabled, no TPROXY) does not load a netlink library: an ``AF_NETLINK`` /
``NETLINK_ROUTE`` socket, ``RTM_NEWADDR`` (or ``RTM_DELADDR``) with ``IFA_LOCAL`` and
``IFA_ADDRESS``, and the kernel's acknowledgement. And what ``nft list tables ip`` asks
(``NFT_MSG_GETTABLE`` dump on a ``NETLINK_NETFILTER`` socket), so that the applier need not run
iptables-nft-save in a namespace that has no table for it to print.

The socket must belong to the target namespace: a socket stays bound to the namespace it was
created in. ``entered(netns)`` moves the calling thread into a namespace and back again (``setns``
changes only the calling thread, and the processes it spawns meanwhile start there), so the applier
can run its netlink requests and its iptables-restore children inside the pod's namespace without
an ``nsenter`` process per command. ``socket`` is startup.socket, ``_socket`` (see there).
"""

from __future__ import annotations

import errno
import os
import struct

from .startup import TYPE_CHECKING, NamedTuple, socket

if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import TypeVar

    from .netns import Netns

    T = TypeVar("T")

# linux/rtnetlink.h, linux/netlink.h, linux/if_addr.h, linux/sched.h
RTM_NEWADDR = 20
RTM_DELADDR = 21
RTM_GETADDR = 22
NLMSG_ERROR = 2
NLMSG_DONE = 3
NLM_F_REQUEST = 0x1
NLM_F_ACK = 0x4
NLM_F_DUMP = 0x300
NLM_F_EXCL = 0x200
NLM_F_CREATE = 0x400
IFA_ADDRESS = 1
IFA_LOCAL = 2
RT_SCOPE_UNIVERSE = 0
RT_SCOPE_HOST = 254
CLONE_NEWNET = 0x40000000
# linux/netfilter/nfnetlink.h, linux/netfilter/nf_tables.h, linux/netfilter.h
NETLINK_NETFILTER = 12
NFNL_SUBSYS_NFTABLES = 10
NFT_MSG_NEWTABLE = 0
NFT_MSG_GETTABLE = 1
NFPROTO_INET = 1
NFPROTO_IPV4 = 2
NFPROTO_IPV6 = 10
NFTA_TABLE_NAME = 1

_NLMSGHDR = struct.Struct("=IHHII")  # length, type, flags, sequence, port id
_IFADDRMSG = struct.Struct("=BBBBI")  # family, prefix length, flags, scope, interface index
_RTATTR = struct.Struct("=HH")  # length, type
_ERRNO = struct.Struct("=i")
_NFGENMSG = struct.Struct("=BBH")  # family, version, resource id

# Seconds to wait for the kernel's answer (it answers at once; this only bounds a broken kernel).
TIMEOUT = 10.0


class NetlinkError(OSError):
    """A request failed: ``errno`` is the kernel's (or the system call's) error number."""

    def __str__(self) -> str:
        return str(self.strerror)


def _align(n: int) -> int:
    return (n + 3) & ~3


def _attr(kind: int, data: bytes) -> bytes:
    size = _RTATTR.size + len(data)
    return _RTATTR.pack(size, kind) + data + b"\0" * (_align(size) - size)


def address_message(command: int, flags: int, seq: int, ifindex: int, iface: str) -> bytes:
    """An RTM_NEWADDR / RTM_DELADDR request for ``iface`` (an address with its prefix length,
    as ``ip addr`` writes it: ``::6/128``) on interface ``ifindex``. Raises ValueError for text
    that is not one.

    The scope is what ``ip addr add`` picks: host for 127.0.0.0/8, universe otherwise (the
    kernel sets the scope of IPv6 addresses itself).
    """
    addr, slash, bits = iface.partition("/")
    family = socket.AF_INET6 if ":" in addr else socket.AF_INET
    try:
        packed = socket.inet_pton(family, addr)
    except OSError:
        raise ValueError(f"not an address with a prefix length: {iface!r}") from None
    if not (slash and bits.isascii() and bits.isdigit() and int(bits) <= len(packed) * 8):
        raise ValueError(f"not an address with a prefix length: {iface!r}")
    scope = RT_SCOPE_HOST if family == socket.AF_INET and packed[0] == 127 else RT_SCOPE_UNIVERSE
    body = _IFADDRMSG.pack(family, int(bits), 0, scope, ifindex)
    body += _attr(IFA_LOCAL, packed) + _attr(IFA_ADDRESS, packed)
    return _NLMSGHDR.pack(_NLMSGHDR.size + len(body), command, flags | NLM_F_REQUEST, seq, 0) + body


def parse_ack(data: bytes, seq: int) -> int | None:
    """The error number of the acknowledgement of request ``seq`` in ``data`` (0: success), or
    None when ``data`` does not hold it. Raises NetlinkError for a truncated message."""
    offset = 0
    while offset + _NLMSGHDR.size <= len(data):
        length, kind, _flags, msg_seq, _pid = _NLMSGHDR.unpack_from(data, offset)
        if length < _NLMSGHDR.size or offset + length > len(data):
            raise NetlinkError(errno.EBADMSG, "truncated netlink message")
        if kind == NLMSG_ERROR and msg_seq == seq:
            if length < _NLMSGHDR.size + _ERRNO.size:
                raise NetlinkError(errno.EBADMSG, "truncated netlink error message")
            (err,) = _ERRNO.unpack_from(data, offset + _NLMSGHDR.size)
            return -err
        offset += _align(length)
    return None


def request(message: bytes, seq: int) -> int:
    """Send one request on a new NETLINK_ROUTE socket of the calling thread's namespace and wait
    for its acknowledgement; returns the kernel's error number (0: done)."""
    return _exchange(socket.NETLINK_ROUTE, "route", message, lambda data: parse_ack(data, seq))


def _exchange(protocol: int, name: str, message: bytes, answer: Callable[[bytes], T | None]) -> T:
    """Send ``message`` on a new netlink socket of ``protocol`` (``name`` for errors) of the
    calling thread's namespace, and read the kernel's datagrams until ``answer`` makes something
    of them (not None). Raises NetlinkError."""
    try:
        s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, protocol)
    except OSError as e:
        raise NetlinkError(e.errno, f"{name} netlink socket: {e.strerror}") from None
    try:
        s.settimeout(TIMEOUT)
        s.bind((0, 0))
        s.sendto(message, (0, 0))
        while True:
            try:
                # A dump answers in datagrams of up to a page or so each; 64 KiB holds any.
                data = s.recv(65536)
            except TimeoutError:
                raise NetlinkError(errno.ETIMEDOUT, "no answer from the kernel") from None
            result = answer(data)
            if result is not None:
                return result
    finally:
        s.close()


def tables_message(nfproto: int, seq: int) -> bytes:
    """A dump request for the nf_tables tables of one family (``nft list tables``)."""
    body = _NFGENMSG.pack(nfproto, 0, 0)
    kind = (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_GETTABLE
    return _NLMSGHDR.pack(_NLMSGHDR.size + len(body), kind, NLM_F_REQUEST | NLM_F_DUMP, seq, 0) + body


def parse_dump(data: bytes, seq: int, kind: int) -> tuple[list[bytes], bool]:
    """The bodies (after the netlink header) of the messages of ``kind`` that answer dump ``seq``
    in ``data``, and whether the dump ended there. Raises NetlinkError for an error answer or a
    truncated message."""
    found: list[bytes] = []
    offset = 0
    while offset + _NLMSGHDR.size <= len(data):
        length, msg_kind, _flags, msg_seq, _pid = _NLMSGHDR.unpack_from(data, offset)
        if length < _NLMSGHDR.size or offset + length > len(data):
            raise NetlinkError(errno.EBADMSG, "truncated netlink message")
        if msg_seq == seq:
            if msg_kind == NLMSG_DONE:
                return found, True
            if msg_kind == NLMSG_ERROR:
                if length < _NLMSGHDR.size + _ERRNO.size:
                    raise NetlinkError(errno.EBADMSG, "truncated netlink error message")
                (err,) = _ERRNO.unpack_from(data, offset + _NLMSGHDR.size)
                if err:
                    raise NetlinkError(-err, f"netlink dump: {os.strerror(-err)}")
                return found, True
            if msg_kind == kind:
                found.append(data[offset + _NLMSGHDR.size : offset + length])
        offset += _align(length)
    return found, False


def _dump(protocol: int, name: str, message: bytes, seq: int, kind: int) -> list[bytes]:
    """Send dump request ``message`` (see _exchange); the bodies of the answering ``kind`` messages."""
    found: list[bytes] = []

    def answer(data: bytes) -> list[bytes] | None:
        bodies, done = parse_dump(data, seq, kind)
        found.extend(bodies)
        return found if done else None

    return _exchange(protocol, name, message, answer)


def addresses_message(seq: int) -> bytes:
    """A dump request for every address of every interface, both families (``ip addr show``)."""
    body = _IFADDRMSG.pack(socket.AF_UNSPEC, 0, 0, 0, 0)
    return _NLMSGHDR.pack(_NLMSGHDR.size + len(body), RTM_GETADDR, NLM_F_REQUEST | NLM_F_DUMP, seq, 0) + body


def parse_address(body: bytes) -> tuple[int, str] | None:
    """The family and address of an RTM_NEWADDR body: the local address (IFA_LOCAL, which
    differs from IFA_ADDRESS on point-to-point links), else IFA_ADDRESS; None without either."""
    if len(body) < _IFADDRMSG.size:
        raise NetlinkError(errno.EBADMSG, "truncated address message")
    family = body[0]
    attrs: dict[int, bytes] = {}
    offset = _IFADDRMSG.size
    while offset + _RTATTR.size <= len(body):
        length, kind = _RTATTR.unpack_from(body, offset)
        if length < _RTATTR.size or offset + length > len(body):
            raise NetlinkError(errno.EBADMSG, "truncated address attribute")
        attrs[kind] = body[offset + _RTATTR.size : offset + length]
        offset += _align(length)
    packed = attrs.get(IFA_LOCAL) or attrs.get(IFA_ADDRESS)
    if packed is None or family not in (socket.AF_INET, socket.AF_INET6):
        return None
    return family, socket.inet_ntop(family, packed)


def local_addresses() -> list[str]:
    """Every address of every interface of the calling thread's namespace, as Go's
    net.InterfaceAddrs lists them: the IPv4 ones first, then the IPv6 ones, each family in
    interface order. Raises NetlinkError."""
    seq = _next_seq()
    bodies = _dump(socket.NETLINK_ROUTE, "route", addresses_message(seq), seq, RTM_NEWADDR)
    by_family: dict[int, list[str]] = {socket.AF_INET: [], socket.AF_INET6: []}
    for found in map(parse_address, bodies):
        if found is not None:
            by_family[found[0]].append(found[1])
    return by_family[socket.AF_INET] + by_family[socket.AF_INET6]


# --- policy rules and routes (what ``ip rule`` and ``ip route`` send) --------------------------

RTM_NEWROUTE = 24
RTM_DELROUTE = 25
RTM_GETROUTE = 26
RTM_NEWRULE = 32
RTM_DELRULE = 33
RTM_GETRULE = 34
FRA_PRIORITY = 6
FRA_FWMARK = 10
FRA_TABLE = 15
RTA_OIF = 4
RTA_TABLE = 15
FR_ACT_TO_TBL = 1
RTN_LOCAL = 2
RTPROT_BOOT = 3
RT_TABLE_UNSPEC = 0
_RTMSG = struct.Struct(
    "=BBBBBBBBI"
)  # family, dst/src len, tos, table, protocol|res, scope|res, type|action, flags
_U32 = struct.Struct("=I")


def _attrs(body: bytes, offset: int) -> dict[int, bytes]:
    out: dict[int, bytes] = {}
    while offset + _RTATTR.size <= len(body):
        length, kind = _RTATTR.unpack_from(body, offset)
        if length < _RTATTR.size or offset + length > len(body):
            raise NetlinkError(errno.EBADMSG, "truncated attribute")
        out[kind & 0x7FFF] = body[offset + _RTATTR.size : offset + length]
        offset += _align(length)
    return out


def _u32(attrs: dict[int, bytes], kind: int) -> int | None:
    value = attrs.get(kind)
    return _U32.unpack_from(value)[0] if value is not None and len(value) >= 4 else None


def _request(kind: int, flags: int, seq: int, body: bytes) -> bytes:
    return _NLMSGHDR.pack(_NLMSGHDR.size + len(body), kind, flags | NLM_F_REQUEST, seq, 0) + body


def _dump_family(kind: int, answer: int, family: int) -> list[bytes]:
    seq = _next_seq()
    message = _request(kind, NLM_F_DUMP, seq, _RTMSG.pack(family, 0, 0, 0, 0, 0, 0, 0, 0))
    return _dump(socket.NETLINK_ROUTE, "route", message, seq, answer)


class PolicyRule(NamedTuple):
    """One ``ip rule``: its preference, fwmark (None: no fwmark match) and table."""

    priority: int
    fwmark: int | None
    table: int


def policy_rules(family: int) -> list[PolicyRule]:
    """The calling thread's namespace's policy rules of ``family`` (AF_INET, AF_INET6)."""
    out = []
    for body in _dump_family(RTM_GETRULE, RTM_NEWRULE, family):
        if len(body) < _RTMSG.size:
            raise NetlinkError(errno.EBADMSG, "truncated rule message")
        header_table = body[4]
        attrs = _attrs(body, _RTMSG.size)
        table = _u32(attrs, FRA_TABLE)
        out.append(PolicyRule(_u32(attrs, FRA_PRIORITY) or 0, _u32(attrs, FRA_FWMARK), table or header_table))
    return out


def _rule_message(
    command: int, flags: int, seq: int, family: int, mark: int, table: int, priority: int | None
) -> bytes:
    body = _RTMSG.pack(family, 0, 0, 0, table if table < 256 else RT_TABLE_UNSPEC, 0, 0, FR_ACT_TO_TBL, 0)
    body += _attr(FRA_FWMARK, _U32.pack(mark)) + _attr(FRA_TABLE, _U32.pack(table))
    if priority is not None:
        body += _attr(FRA_PRIORITY, _U32.pack(priority))
    return _request(command, flags, seq, body)


def add_policy_rule(family: int, mark: int, table: int) -> None:
    """``ip rule add fwmark MARK lookup TABLE``: the kernel picks the preference ``ip`` would get
    (one below the first rule after the local one). Raises NetlinkError."""
    seq = _next_seq()
    err = request(
        _rule_message(RTM_NEWRULE, NLM_F_CREATE | NLM_F_EXCL | NLM_F_ACK, seq, family, mark, table, None), seq
    )
    if err:
        raise NetlinkError(err, f"adding ip rule fwmark {mark} lookup {table}: {os.strerror(err)}")


def delete_policy_rule(family: int, mark: int, table: int, priority: int) -> None:
    """``ip rule del pref PRIORITY fwmark MARK lookup TABLE``. Raises NetlinkError."""
    seq = _next_seq()
    err = request(_rule_message(RTM_DELRULE, NLM_F_ACK, seq, family, mark, table, priority), seq)
    if err and err != errno.ENOENT:
        raise NetlinkError(err, f"removing ip rule fwmark {mark} lookup {table}: {os.strerror(err)}")


class Route(NamedTuple):
    """One route: prefix length of its destination, type (RTN_*), table and output interface."""

    dst_len: int
    type: int
    table: int
    oif: int | None


def routes(family: int) -> list[Route]:
    """The calling thread's namespace's routes of ``family``, every table."""
    out = []
    for body in _dump_family(RTM_GETROUTE, RTM_NEWROUTE, family):
        if len(body) < _RTMSG.size:
            raise NetlinkError(errno.EBADMSG, "truncated route message")
        attrs = _attrs(body, _RTMSG.size)
        out.append(Route(body[1], body[7], _u32(attrs, RTA_TABLE) or body[4], _u32(attrs, RTA_OIF)))
    return out


def _local_default_message(command: int, flags: int, seq: int, family: int, table: int, oif: int) -> bytes:
    body = _RTMSG.pack(
        family, 0, 0, 0, table if table < 256 else RT_TABLE_UNSPEC, RTPROT_BOOT, RT_SCOPE_HOST, RTN_LOCAL, 0
    )
    body += _attr(RTA_TABLE, _U32.pack(table)) + _attr(RTA_OIF, _U32.pack(oif))
    return _request(command, flags, seq, body)


def add_local_default_route(family: int, table: int, oif: int) -> None:
    """``ip route add local default dev IF table TABLE``. Raises NetlinkError."""
    seq = _next_seq()
    err = request(
        _local_default_message(RTM_NEWROUTE, NLM_F_CREATE | NLM_F_EXCL | NLM_F_ACK, seq, family, table, oif),
        seq,
    )
    if err:
        raise NetlinkError(err, f"adding local default route table {table}: {os.strerror(err)}")


def delete_local_default_route(family: int, table: int, oif: int) -> None:
    """``ip route del local default dev IF table TABLE``. Raises NetlinkError."""
    seq = _next_seq()
    err = request(_local_default_message(RTM_DELROUTE, NLM_F_ACK, seq, family, table, oif), seq)
    if err and err not in (errno.ESRCH, errno.ENOENT):
        raise NetlinkError(err, f"removing local default route table {table}: {os.strerror(err)}")


def interface_index(name: str) -> int:
    """The calling thread's namespace's index of interface ``name``. Raises NetlinkError."""
    try:
        return socket.if_nametoindex(name)
    except OSError:
        raise NetlinkError(errno.ENODEV, f"no interface {name!r} in the network namespace") from None


def _nft_tables(nfproto: int) -> list[bytes]:
    seq = _next_seq()
    kind = (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWTABLE
    return _dump(NETLINK_NETFILTER, "netfilter", tables_message(nfproto, seq), seq, kind)


def nft_table_count(nfproto: int) -> int:
    """How many nf_tables tables of family ``nfproto`` the calling thread's namespace has.

    Raises NetlinkError (also when the kernel has no nf_tables)."""
    return len(_nft_tables(nfproto))


def parse_table_name(body: bytes) -> str | None:
    """The name (NFTA_TABLE_NAME) of an NFT_MSG_NEWTABLE body, None without one."""
    offset = _NFGENMSG.size
    while offset + _RTATTR.size <= len(body):
        length, kind = _RTATTR.unpack_from(body, offset)
        if length < _RTATTR.size or offset + length > len(body):
            raise NetlinkError(errno.EBADMSG, "truncated table attribute")
        if kind & 0x7FFF == NFTA_TABLE_NAME:
            return body[offset + _RTATTR.size : offset + length].split(b"\0", 1)[0].decode("utf-8", "replace")
        offset += _align(length)
    return None


def nft_table_names(nfproto: int) -> list[str]:
    """The names of the nf_tables tables of family ``nfproto`` (``nft list tables inet``) in the
    calling thread's namespace. Raises NetlinkError (also when the kernel has no nf_tables)."""
    return [name for name in map(parse_table_name, _nft_tables(nfproto)) if name is not None]


def _setns(fd: int) -> None:
    from .netns import setns  # the one binding of setns(2)

    setns(fd)


class entered:  # noqa: N801 - used like a function: ``with entered(path):``
    """Context manager: the calling thread inside the network namespace ``netns`` (no change for
    None), and back in its own namespace afterwards, whatever happened inside.

    Raises NetlinkError when the namespace cannot be entered. Failing to return is fatal for the
    thread's later work, so it raises too rather than carry on in the wrong namespace.
    """

    __slots__ = ("netns", "_home")

    def __init__(self, netns: str | None) -> None:
        self.netns = netns
        self._home: int | None = None

    def __enter__(self) -> None:
        if self.netns is None:
            return
        try:
            fd = os.open(self.netns, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            raise NetlinkError(e.errno, f"cannot open network namespace {self.netns}: {e.strerror}") from None
        try:
            home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            os.close(fd)
            raise NetlinkError(
                e.errno, f"cannot open this thread's network namespace: {e.strerror}"
            ) from None
        try:
            _setns(fd)
        except OSError as e:
            os.close(home)
            raise NetlinkError(
                e.errno, f"cannot enter network namespace {self.netns}: {e.strerror}"
            ) from None
        finally:
            os.close(fd)
        self._home = home

    def __exit__(self, *exc: object) -> None:
        home, self._home = self._home, None
        if home is None:
            return
        try:
            _setns(home)
        except OSError as e:
            raise NetlinkError(
                e.errno, f"cannot return from network namespace {self.netns}: {e.strerror}"
            ) from None
        finally:
            os.close(home)


def in_netns(netns: str | Netns | None, fn: Callable[[], T]) -> T:
    """``fn()`` run inside the network namespace ``netns``: a path, a namespace already open (the
    applier's, used by its descriptor), or None for here.

    Raises NetlinkError when the namespace cannot be entered; ``fn``'s exceptions pass through.
    """
    if netns is None or isinstance(netns, str):
        with entered(netns):
            return fn()
    from .netns import NetnsError

    try:
        inside = netns.entered()
        inside.__enter__()
    except NetnsError as e:
        raise NetlinkError(e.errno, str(e)) from None
    try:
        return fn()
    finally:
        inside.__exit__(None, None, None)


_seq = 0


def _next_seq() -> int:
    global _seq
    _seq = _seq % 0xFFFFFFFF + 1
    return _seq


def _change(command: int, flags: int, iface: str, ifname: str, netns: str | Netns | None) -> int:
    def run() -> int:
        try:
            index = socket.if_nametoindex(ifname)
        except OSError:
            raise NetlinkError(errno.ENODEV, f"no interface {ifname!r} in the network namespace") from None
        seq = _next_seq()
        return request(address_message(command, flags, seq, index, iface), seq)

    return in_netns(netns, run)


def add_address(iface: str, ifname: str = "lo", netns: str | Netns | None = None) -> bool:
    """Add ``iface`` on ``ifname``: True when added, False when it was there already.

    Raises NetlinkError."""
    err = _change(RTM_NEWADDR, NLM_F_CREATE | NLM_F_EXCL | NLM_F_ACK, iface, ifname, netns)
    if err == errno.EEXIST:
        return False
    if err:
        raise NetlinkError(err, f"adding {iface} on {ifname}: {os.strerror(err)}")
    return True


def delete_address(iface: str, ifname: str = "lo", netns: str | Netns | None = None) -> bool:
    """Remove ``iface`` from ``ifname``: True when removed, False when it was not there.

    Raises NetlinkError."""
    err = _change(RTM_DELADDR, NLM_F_ACK, iface, ifname, netns)
    if err == errno.EADDRNOTAVAIL:
        return False
    if err:
        raise NetlinkError(err, f"removing {iface} from {ifname}: {os.strerror(err)}")
    return True
