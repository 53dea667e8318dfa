"""DNS capture with real packets: UDP and TCP to the configured servers on port 53 land on the
DNS proxy's 15053, the proxy's own DNS does not, other servers only with --capture-all-dns."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.topology import (
    APP_UID,
    BASE_ARGS,
    DNS_CAPTURE_PORT,
    DNS_PORT,
    LINKS,
    OUTBOUND_CAPTURE_PORT,
    PROXY_UID,
    REDIRECT,
    SERVICE_A,
    V4,
    V6,
    Outcome,
    Topology,
    rules_text,
    topology,
)

pytestmark = pytest.mark.kernel

# The peer's link address is the pod's one configured DNS server (per family); SERVICE_A is
# another server, not configured.
SERVERS = f"{LINKS[0].peer_v4},{LINKS[0].peer_v6}"
CONFIGURED_SERVERS = [
    *BASE_ARGS,
    "-m",
    REDIRECT,
    "-i",
    "*",
    "-b",
    "*",
    "--redirect-dns",
    "--dns-servers",
    SERVERS,
]
CAPTURE_ALL = [*BASE_ARGS, "-m", REDIRECT, "-i", "*", "-b", "*", "--redirect-dns", "--capture-all-dns"]
PROTOS = ("udp", "tcp")


@pytest.fixture(scope="module")
def topo() -> Iterator[Topology]:
    with topology(hint="dns") as t:
        yield t


def landed_on_dns_proxy(topo: Topology, out: Outcome, dst: str) -> None:
    assert out.where == f"proxy:{DNS_CAPTURE_PORT}", out
    assert out.seen is not None
    assert out.seen.peer == out.client_local, out
    if out.seen.proto == "tcp":
        assert out.seen.orig_dst == (dst, DNS_PORT), out
    # The answer came back from the server's address (the client's socket is connected to it),
    # and the DNS proxy reported the same query over its pipe.
    assert topo.proxy.seen(out.seen.token) == out.seen


def reached_server(out: Outcome, dst: str) -> None:
    assert out.where == f"peer:{DNS_PORT}", out
    assert out.seen is not None and out.seen.local == (dst, DNS_PORT), out


@pytest.mark.parametrize("proto", PROTOS)
def test_dns_to_configured_server_is_captured(topo: Topology, backend: str, family: str, proto: str) -> None:
    topo.apply(CONFIGURED_SERVERS, backend)
    server = topo.peer_ip(family)
    out = topo.from_pod(server, DNS_PORT, family=family, uid=APP_UID, proto=proto)
    landed_on_dns_proxy(topo, out, server)


@pytest.mark.parametrize("proto", PROTOS)
def test_proxy_own_dns_is_not_captured(topo: Topology, backend: str, family: str, proto: str) -> None:
    topo.apply(CONFIGURED_SERVERS, backend)
    server = topo.peer_ip(family)
    reached_server(topo.from_pod(server, DNS_PORT, family=family, uid=PROXY_UID, proto=proto), server)


def test_dns_to_other_server_is_not_dns_captured(topo: Topology, backend: str, family: str) -> None:
    """Without --capture-all-dns only the configured servers are captured: UDP to another server
    reaches it, and TCP to it is ordinary outbound traffic (15001)."""
    topo.apply(CONFIGURED_SERVERS, backend)
    other = SERVICE_A[family]
    reached_server(topo.from_pod(other, DNS_PORT, family=family, uid=APP_UID, proto="udp"), other)
    out = topo.from_pod(other, DNS_PORT, family=family, uid=APP_UID, proto="tcp")
    assert out.where == f"proxy:{OUTBOUND_CAPTURE_PORT}", out


@pytest.mark.parametrize("proto", PROTOS)
def test_capture_all_dns(topo: Topology, backend: str, family: str, proto: str) -> None:
    topo.apply(CAPTURE_ALL, backend)
    other = SERVICE_A[family]
    out = topo.from_pod(other, DNS_PORT, family=family, uid=APP_UID, proto=proto)
    landed_on_dns_proxy(topo, out, other)
    reached_server(topo.from_pod(other, DNS_PORT, family=family, uid=PROXY_UID, proto=proto), other)


def test_servers_are_split_by_family(topo: Topology, backend: str) -> None:
    """One --dns-servers list carries both families; each family's rules name only its own."""
    topo.apply(CONFIGURED_SERVERS, backend)
    v4, v6 = rules_text(topo.pod, backend, V4), rules_text(topo.pod, backend, V6)
    assert LINKS[0].peer_v4 in v4 and LINKS[0].peer_v6 not in v4
    assert LINKS[0].peer_v6 in v6 and LINKS[0].peer_v4 not in v6
