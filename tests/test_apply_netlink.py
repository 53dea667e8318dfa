"""Loopback addresses through the standard-library netlink requests (istio_iptables.netlink):
the messages byte by byte, the kernel's answers, and real namespaces."""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from istio_iptables import netlink as nl
from tests.support.netns import NetNS

V6 = "::6/128"
V4 = "127.0.0.6/32"


def _attrs(data: bytes) -> dict[int, bytes]:
    out = {}
    offset = 0
    while offset < len(data):
        length, kind = struct.unpack_from("=HH", data, offset)
        out[kind] = data[offset + 4 : offset + length]
        offset += (length + 3) & ~3
    return out


# --- messages ---------------------------------------------------------------------------------


def test_new_address_message_is_what_ip_addr_add_sends() -> None:
    msg = nl.address_message(nl.RTM_NEWADDR, nl.NLM_F_CREATE | nl.NLM_F_EXCL | nl.NLM_F_ACK, 7, 1, V6)
    length, kind, flags, seq, pid = struct.unpack_from("=IHHII", msg)
    assert (length, kind, seq, pid) == (len(msg), nl.RTM_NEWADDR, 7, 0)
    assert flags == nl.NLM_F_REQUEST | nl.NLM_F_ACK | nl.NLM_F_CREATE | nl.NLM_F_EXCL
    family, prefixlen, ifa_flags, scope, index = struct.unpack_from("=BBBBI", msg, 16)
    assert (family, prefixlen, ifa_flags, scope, index) == (socket.AF_INET6, 128, 0, nl.RT_SCOPE_UNIVERSE, 1)
    attrs = _attrs(msg[24:])
    packed = ipaddress.ip_interface(V6).ip.packed
    assert attrs == {nl.IFA_LOCAL: packed, nl.IFA_ADDRESS: packed}
    assert len(msg) % 4 == 0


def test_ipv4_loopback_address_gets_host_scope_and_delete_has_no_create_flags() -> None:
    msg = nl.address_message(nl.RTM_DELADDR, nl.NLM_F_ACK, 9, 3, V4)
    _, kind, flags, _, _ = struct.unpack_from("=IHHII", msg)
    assert kind == nl.RTM_DELADDR and flags == nl.NLM_F_REQUEST | nl.NLM_F_ACK
    family, prefixlen, _, scope, index = struct.unpack_from("=BBBBI", msg, 16)
    assert (family, prefixlen, scope, index) == (socket.AF_INET, 32, nl.RT_SCOPE_HOST, 3)
    assert _attrs(msg[24:])[nl.IFA_LOCAL] == bytes([127, 0, 0, 6])
    other = nl.address_message(nl.RTM_NEWADDR, 0, 1, 3, "10.0.0.1/24")
    assert struct.unpack_from("=BBBBI", other, 16)[1:4] == (24, 0, nl.RT_SCOPE_UNIVERSE)


@pytest.mark.parametrize(
    "text", ["::6", "::6/129", "10.0.0.1/33", "10.0.0.1/x", "fe80::1%lo/64", "nope/8", ""]
)
def test_address_text_that_is_not_an_address_with_a_prefix_is_refused(text: str) -> None:
    with pytest.raises(ValueError, match="not an address with a prefix length"):
        nl.address_message(nl.RTM_NEWADDR, 0, 1, 1, text)


def _error(seq: int, err: int) -> bytes:
    body = struct.pack("=i", err) + struct.pack("=IHHII", 16, nl.RTM_NEWADDR, 0, seq, 0)
    return struct.pack("=IHHII", 16 + len(body), nl.NLMSG_ERROR, 0, seq, 99) + body


def test_acknowledgements_are_matched_by_sequence() -> None:
    assert nl.parse_ack(_error(5, 0), 5) == 0
    assert nl.parse_ack(_error(5, -errno.EEXIST), 5) == errno.EEXIST
    assert nl.parse_ack(_error(4, -errno.EPERM), 5) is None
    assert nl.parse_ack(_error(4, -errno.EPERM) + _error(5, -errno.EACCES), 5) == errno.EACCES
    assert nl.parse_ack(b"", 5) is None


def test_truncated_answers_are_errors() -> None:
    whole = _error(5, 0)
    with pytest.raises(nl.NetlinkError):
        nl.parse_ack(struct.pack("=IHHII", 200, nl.NLMSG_ERROR, 0, 5, 0), 5)
    with pytest.raises(nl.NetlinkError):
        nl.parse_ack(struct.pack("=IHHII", 18, nl.NLMSG_ERROR, 0, 5, 0) + b"\0\0", 5)
    with pytest.raises(nl.NetlinkError):
        nl.parse_ack(struct.pack("=IHHII", 4, nl.NLMSG_ERROR, 0, 5, 0) + whole, 5)


def test_table_dump_request_is_what_nft_list_tables_sends() -> None:
    msg = nl.tables_message(nl.NFPROTO_IPV6, 11)
    length, kind, flags, seq, pid = struct.unpack_from("=IHHII", msg)
    assert (length, seq, pid) == (len(msg), 11, 0) == (20, 11, 0)
    assert kind == (nl.NFNL_SUBSYS_NFTABLES << 8) | nl.NFT_MSG_GETTABLE
    assert flags == nl.NLM_F_REQUEST | nl.NLM_F_DUMP
    assert struct.unpack_from("=BBH", msg, 16) == (nl.NFPROTO_IPV6, 0, 0)


_TABLE = (nl.NFNL_SUBSYS_NFTABLES << 8) | nl.NFT_MSG_NEWTABLE


def _msg(kind: int, seq: int, payload: bytes = b"\0\0\0\0") -> bytes:
    return struct.pack("=IHHII", 16 + len(payload), kind, 2, seq, 0) + payload


def test_dump_answers_are_collected_until_done() -> None:
    a, b = b"\1\0\0\0", b"\2\0\0\0"
    assert nl.parse_dump(_msg(_TABLE, 3, a) + _msg(_TABLE, 3, b), 3, _TABLE) == ([a, b], False)
    assert nl.parse_dump(_msg(_TABLE, 3, a) + _msg(nl.NLMSG_DONE, 3), 3, _TABLE) == ([a], True)
    assert nl.parse_dump(_msg(_TABLE, 2) + _msg(nl.NLMSG_DONE, 3), 3, _TABLE) == ([], True)
    assert nl.parse_dump(_msg(nl.NLMSG_DONE, 3), 3, _TABLE) == ([], True)
    with pytest.raises(nl.NetlinkError) as e:
        nl.parse_dump(_error(3, -errno.EOPNOTSUPP), 3, _TABLE)
    assert e.value.errno == errno.EOPNOTSUPP
    with pytest.raises(nl.NetlinkError):
        nl.parse_dump(_msg(_TABLE, 3)[:-2], 3, _TABLE)


def test_address_dump_request_is_what_ip_addr_show_sends() -> None:
    msg = nl.addresses_message(5)
    length, kind, flags, seq, pid = struct.unpack_from("=IHHII", msg)
    assert (length, kind, flags, seq, pid) == (24, nl.RTM_GETADDR, nl.NLM_F_REQUEST | nl.NLM_F_DUMP, 5, 0)
    assert struct.unpack_from("=BBBBI", msg, 16) == (socket.AF_UNSPEC, 0, 0, 0, 0)


def test_address_messages_give_the_local_address_first() -> None:
    def body(family: int, *attrs: tuple[int, bytes]) -> bytes:
        out = struct.pack("=BBBBI", family, 24, 0, 0, 2)
        for kind, data in attrs:
            size = 4 + len(data)
            out += struct.pack("=HH", size, kind) + data + b"\0" * (((size + 3) & ~3) - size)
        return out

    local, peer = bytes([10, 0, 0, 1]), bytes([10, 0, 0, 2])
    v6 = ipaddress.ip_address("fd00::5").packed
    assert nl.parse_address(body(socket.AF_INET, (nl.IFA_ADDRESS, peer), (nl.IFA_LOCAL, local))) == (
        socket.AF_INET,
        "10.0.0.1",
    )
    assert nl.parse_address(body(socket.AF_INET6, (nl.IFA_ADDRESS, v6))) == (socket.AF_INET6, "fd00::5")
    assert nl.parse_address(body(socket.AF_INET, (8, b"lo\0"))) is None
    with pytest.raises(nl.NetlinkError):
        nl.parse_address(body(socket.AF_INET, (nl.IFA_LOCAL, local))[:-2])


# --- what the kernel's answers mean -------------------------------------------------------------


@pytest.fixture
def answer(monkeypatch: pytest.MonkeyPatch) -> Callable[[int], list[bytes]]:
    """Make every request get ``err`` back; returns the requests sent."""
    sent: list[bytes] = []

    def set_answer(err: int) -> list[bytes]:
        def request(message: bytes, seq: int) -> int:
            sent.append(message)
            return err

        monkeypatch.setattr(nl, "request", request)
        monkeypatch.setattr(nl.socket, "if_nametoindex", lambda name: 1)
        return sent

    return set_answer


def test_add_is_idempotent(answer: Callable[[int], list[bytes]]) -> None:
    sent = answer(0)
    assert nl.add_address(V6) is True
    assert struct.unpack_from("=IHH", sent[0])[1] == nl.RTM_NEWADDR
    answer(errno.EEXIST)
    assert nl.add_address(V6) is False


def test_delete_of_an_absent_address_is_not_an_error(answer: Callable[[int], list[bytes]]) -> None:
    sent = answer(0)
    assert nl.delete_address(V6) is True
    assert struct.unpack_from("=IHH", sent[0])[1] == nl.RTM_DELADDR
    answer(errno.EADDRNOTAVAIL)
    assert nl.delete_address(V6) is False


def test_other_answers_are_errors_naming_the_address(answer: Callable[[int], list[bytes]]) -> None:
    answer(errno.EACCES)
    with pytest.raises(nl.NetlinkError, match=r"adding ::6/128 on lo: Permission denied") as e:
        nl.add_address(V6)
    assert e.value.errno == errno.EACCES
    with pytest.raises(nl.NetlinkError, match=r"removing ::6/128 from lo"):
        nl.delete_address(V6)


def test_sequence_numbers_differ_between_requests(answer: Callable[[int], list[bytes]]) -> None:
    sent = answer(0)
    nl.add_address(V6)
    nl.add_address(V6)
    assert struct.unpack_from("=IHHI", sent[0])[3] != struct.unpack_from("=IHHI", sent[1])[3]


# --- entering a namespace -----------------------------------------------------------------------


def test_without_a_namespace_the_function_runs_here() -> None:
    assert nl.in_netns(None, lambda: 42) == 42


def test_a_missing_namespace_is_reported(tmp_path: Path) -> None:
    with pytest.raises(nl.NetlinkError, match="cannot open network namespace") as e:
        nl.in_netns(str(tmp_path / "gone"), lambda: 1)
    assert e.value.errno == errno.ENOENT


def test_a_file_that_is_not_a_namespace_is_refused(tmp_path: Path) -> None:
    f = tmp_path / "plain"
    f.write_text("")
    with pytest.raises(nl.NetlinkError, match="cannot enter network namespace"):
        nl.in_netns(str(f), lambda: 1)


def test_the_calling_thread_enters_and_returns_also_when_the_function_fails(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[tuple[int, int]] = []

    def fake_setns(fd: int) -> None:
        calls.append((threading.get_ident(), os.fstat(fd).st_ino))

    monkeypatch.setattr(nl, "_setns", fake_setns)
    target = os.stat("/proc/self/ns/net").st_ino
    home = os.stat("/proc/thread-self/ns/net").st_ino
    me = threading.get_ident()
    assert nl.in_netns("/proc/self/ns/net", lambda: len(calls)) == 1
    assert calls == [(me, target), (me, home)]

    def fail() -> int:
        raise ValueError("inside")

    calls.clear()
    with pytest.raises(ValueError, match="inside"):
        nl.in_netns("/proc/self/ns/net", fail)
    assert calls == [(me, target), (me, home)]
    fds = len(os.listdir("/proc/self/fd"))
    for _ in range(20):
        nl.in_netns("/proc/self/ns/net", lambda: None)
    assert len(os.listdir("/proc/self/fd")) == fds


def test_entering_a_missing_namespace_is_an_error_and_changes_nothing(tmp_path: Path) -> None:
    before = os.stat("/proc/thread-self/ns/net").st_ino
    with pytest.raises(nl.NetlinkError, match="cannot open network namespace"):
        nl.in_netns(str(tmp_path / "gone"), lambda: None)
    assert os.stat("/proc/thread-self/ns/net").st_ino == before


def test_netlink_module_uses_the_standard_library_only() -> None:
    code = (
        "import sys\n"
        "import istio_iptables.netlink\n"
        "bad = [m for m in ('pyroute2', 'click', 'asyncio') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(nl.__file__).parent.parent)


# --- the kernel ---------------------------------------------------------------------------------


def _lo(ns: NetNS) -> str:
    return ns.run(["ip", "-o", "addr", "show", "dev", "lo"]).stdout


def _own_netns() -> str:
    return os.readlink("/proc/thread-self/ns/net")


@pytest.mark.kernel
def test_address_added_once_and_removed_in_the_namespace_only(netns: Callable[..., NetNS]) -> None:
    ns = netns("nl")
    here = _own_netns()
    host_before = subprocess.run(["ip", "-o", "addr", "show", "dev", "lo"], capture_output=True, text=True)
    assert nl.add_address(V6, "lo", ns.path) is True
    assert nl.add_address(V6, "lo", ns.path) is False
    lines = [ln for ln in _lo(ns).splitlines() if "::6/128" in ln]
    assert len(lines) == 1 and "inet6 ::6/128" in lines[0]
    assert _own_netns() == here, "the calling thread must stay where it was"
    host_after = subprocess.run(["ip", "-o", "addr", "show", "dev", "lo"], capture_output=True, text=True)
    assert host_after.stdout == host_before.stdout
    assert nl.delete_address(V6, "lo", ns.path) is True
    assert nl.delete_address(V6, "lo", ns.path) is False
    assert "::6/128" not in _lo(ns)


@pytest.mark.kernel
def test_ipv4_address_with_host_scope_through_a_proc_path(netns: Callable[..., NetNS]) -> None:
    ns = netns("nl4")
    sleeper = ns.popen(["sleep", "30"])
    try:
        path = f"/proc/{sleeper.pid}/ns/net"
        # The launcher enters the namespace after it starts: wait until the process is inside.
        deadline = time.monotonic() + 10
        while os.stat(path).st_ino != os.stat(ns.path).st_ino:
            assert time.monotonic() < deadline, "the process never entered the namespace"
            time.sleep(0.01)
        assert nl.add_address(V4, "lo", path) is True
        assert "inet 127.0.0.6/32 scope host lo" in _lo(ns)
        assert nl.delete_address(V4, "lo", path) is True
        assert "127.0.0.6" not in _lo(ns)
    finally:
        sleeper.kill()
        sleeper.wait()


@pytest.mark.kernel
def test_kernel_refusals_are_reported(netns: Callable[..., NetNS]) -> None:
    ns = netns("nlerr")
    with pytest.raises(nl.NetlinkError, match="no interface 'nope0'") as e:
        nl.add_address(V6, "nope0", ns.path)
    assert e.value.errno == errno.ENODEV
    ns.run(["sysctl", "-q", "-w", "net.ipv6.conf.lo.disable_ipv6=1"])
    with pytest.raises(nl.NetlinkError, match=r"adding ::6/128 on lo") as e2:
        nl.add_address(V6, "lo", ns.path)
    assert e2.value.errno != 0
    assert "::6" not in _lo(ns)


@pytest.mark.kernel
def test_nft_tables_are_counted_per_family_in_the_namespace(netns: Callable[..., NetNS]) -> None:
    ns = netns("nft")

    def count() -> tuple[int, int]:
        return nl.nft_table_count(nl.NFPROTO_IPV4), nl.nft_table_count(nl.NFPROTO_IPV6)

    assert nl.in_netns(ns.path, count) == (0, 0)
    ns.run(["iptables-nft", "-t", "nat", "-A", "OUTPUT", "-j", "RETURN"])
    assert nl.in_netns(ns.path, count) == (1, 0)
    ns.run(["ip6tables-nft", "-t", "filter", "-A", "INPUT", "-j", "RETURN"])
    ns.run(["ip6tables-nft", "-t", "mangle", "-A", "OUTPUT", "-j", "RETURN"])
    assert nl.in_netns(ns.path, count) == (1, 2)


# --- routes.py: addresses, policy rules and routes through these requests ---------------------------


def _record_addresses(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, object]]:
    """Make address requests succeed without a kernel; returns the requests made."""
    from istio_iptables import routes

    calls: list[tuple[str, object]] = []

    def recorder(what: str) -> Callable[[object, str, str | None], bool]:
        def request(iface: object, ifname: str, netns: str | None) -> bool:
            calls.append((what, iface))
            return True

        return request

    monkeypatch.setattr(routes.netlink, "add_address", recorder("add"))
    monkeypatch.setattr(routes.netlink, "delete_address", recorder("del"))
    return calls


def test_loopback_addresses_alone_make_no_routing_request(monkeypatch: pytest.MonkeyPatch) -> None:
    from istio_iptables import routes

    calls = _record_addresses(monkeypatch)

    def no_routing(family: int) -> list[object]:
        raise AssertionError("policy rules read without routes")

    monkeypatch.setattr(routes.netlink, "policy_rules", no_routing)
    added = routes.apply_routes([], [V6], "/var/run/netns/x")
    assert [a.kind for a in added] == ["address"] and calls == [("add", V6)]
    assert routes.remove_routes([], [V6], "/var/run/netns/x") == ["::6/128 on lo"]


def test_a_failed_route_takes_back_the_address_added_before(monkeypatch: pytest.MonkeyPatch) -> None:
    from istio_iptables import routes
    from istio_iptables.ruleset import Family, PolicyRoute

    calls = _record_addresses(monkeypatch)

    def failing_routes(rs: object, added: list[object]) -> None:
        raise nl.NetlinkError(errno.EPERM, "adding ip rule fwmark 1337 lookup 133: Operation not permitted")

    monkeypatch.setattr(routes, "_add_routes", failing_routes)
    with pytest.raises(routes.RoutesError, match="Operation not permitted"):
        routes.apply_routes([PolicyRoute(Family.V6, 1337, 133)], [V6], None)
    assert calls == [("add", V6), ("del", V6)]


def test_an_address_the_kernel_refuses_is_a_routes_error(monkeypatch: pytest.MonkeyPatch) -> None:
    from istio_iptables import routes

    def refuse(i: object, n: str, ns: str | None) -> bool:
        raise nl.NetlinkError(errno.EACCES, "adding ::6/128 on lo: Permission denied")

    monkeypatch.setattr(routes.netlink, "add_address", refuse)
    with pytest.raises(routes.RoutesError, match=r"^adding ::6/128 on lo: Permission denied$"):
        routes.apply_routes([], [V6], None)
