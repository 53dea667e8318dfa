"""Every inclusion and exclusion option shown with real packets: for each, one packet that the
option sends one way and a packet that takes the other path."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.topology import (
    APP_PORT,
    APP_PORT_2,
    APP_UID,
    BASE_ARGS,
    FAMILIES,
    INBOUND_CAPTURE_PORT,
    MODES,
    OUTBOUND_CAPTURE_PORT,
    PEER_PORT,
    PEER_PORT_2,
    REDIRECT,
    SERVICE_A,
    SERVICE_B,
    V4,
    V6,
    VIRT_RANGE,
    VIRT_VIA_LINK,
    Outcome,
    Topology,
    topology,
)

pytestmark = pytest.mark.kernel

OUTBOUND = f"proxy:{OUTBOUND_CAPTURE_PORT}"
# Mode before family, so both families share one apply.
MODE_FAMILY = [(m, f) for m in MODES for f in FAMILIES]
MODE_FAMILY_IDS = [f"{m}-{f}" for m, f in MODE_FAMILY]
INBOUND = f"proxy:{INBOUND_CAPTURE_PORT}"


@pytest.fixture(scope="module")
def topo() -> Iterator[Topology]:
    with topology(links=2, hint="options") as t:
        yield t


def host_cidrs(addrs: dict[str, str]) -> str:
    """The addresses of both families as host CIDRs: ``10.20.0.1/32,fd00:20::1/128``."""
    return f"{addrs[V4]}/32,{addrs[V6]}/128"


def captured_outbound(out: Outcome, dst: str, port: int) -> None:
    assert out.where == OUTBOUND, out
    assert out.seen is not None and out.seen.orig_dst == (dst, port), out


def reached_peer(out: Outcome, dst: str, port: int) -> None:
    assert out.where == f"peer:{port}", out
    assert out.seen is not None and out.seen.local == (dst, port), out


def captured_inbound(out: Outcome, dst: str, port: int) -> None:
    assert out.where == INBOUND, out
    assert out.seen is not None
    # REDIRECT: the original destination; TPROXY: the socket is bound to it.
    assert (dst, port) in (out.seen.orig_dst, out.seen.local), out


def reached_app(out: Outcome, dst: str, port: int) -> None:
    assert out.where == f"app:{port}", out
    assert out.seen is not None and out.seen.local == (dst, port), out


# ---------------------------------------------------------------- inbound ports (-b, -d)


@pytest.mark.parametrize(("mode", "family"), MODE_FAMILY, ids=MODE_FAMILY_IDS)
def test_inbound_ports_include(topo: Topology, backend: str, family: str, mode: str) -> None:
    """-b 8080: 8080 is captured, 8081 goes straight to the app."""
    topo.apply([*BASE_ARGS, "-m", mode, "-i", "*", "-b", str(APP_PORT)], backend)
    pod = topo.pod_ip(family)
    captured_inbound(topo.from_peer(pod, APP_PORT, family=family), pod, APP_PORT)
    reached_app(topo.from_peer(pod, APP_PORT_2, family=family), pod, APP_PORT_2)


@pytest.mark.parametrize(("mode", "family"), MODE_FAMILY, ids=MODE_FAMILY_IDS)
def test_inbound_ports_exclude(topo: Topology, backend: str, family: str, mode: str) -> None:
    """-b '*' -d 8081: 8081 goes straight to the app, 8080 is captured."""
    topo.apply([*BASE_ARGS, "-m", mode, "-i", "*", "-b", "*", "-d", str(APP_PORT_2)], backend)
    pod = topo.pod_ip(family)
    reached_app(topo.from_peer(pod, APP_PORT_2, family=family), pod, APP_PORT_2)
    captured_inbound(topo.from_peer(pod, APP_PORT, family=family), pod, APP_PORT)


# ---------------------------------------------------------------- outbound ranges (-i, -x)


def test_outbound_cidr_include(topo: Topology, backend: str, family: str) -> None:
    """-i SERVICE_A: traffic to it is captured; to SERVICE_B or the peer's link address it is not."""
    topo.apply([*BASE_ARGS, "-m", REDIRECT, "-b", "*", "-i", host_cidrs(SERVICE_A)], backend)
    a, b, peer = SERVICE_A[family], SERVICE_B[family], topo.peer_ip(family)
    captured_outbound(topo.from_pod(a, PEER_PORT, family=family), a, PEER_PORT)
    reached_peer(topo.from_pod(b, PEER_PORT, family=family), b, PEER_PORT)
    reached_peer(topo.from_pod(peer, PEER_PORT, family=family), peer, PEER_PORT)


def test_outbound_cidr_exclude(topo: Topology, backend: str, family: str) -> None:
    """-i '*' -x SERVICE_B: traffic to SERVICE_B is not captured; to SERVICE_A it is."""
    topo.apply([*BASE_ARGS, "-m", REDIRECT, "-b", "*", "-i", "*", "-x", host_cidrs(SERVICE_B)], backend)
    a, b = SERVICE_A[family], SERVICE_B[family]
    reached_peer(topo.from_pod(b, PEER_PORT, family=family), b, PEER_PORT)
    captured_outbound(topo.from_pod(a, PEER_PORT, family=family), a, PEER_PORT)


# ---------------------------------------------------------------- outbound ports (-o, -q)


def test_outbound_port_exclude(topo: Topology, backend: str, family: str) -> None:
    """-i '*' -o 9000: port 9000 is not captured, 8000 is."""
    topo.apply([*BASE_ARGS, "-m", REDIRECT, "-b", "*", "-i", "*", "-o", str(PEER_PORT_2)], backend)
    peer = topo.peer_ip(family)
    reached_peer(topo.from_pod(peer, PEER_PORT_2, family=family), peer, PEER_PORT_2)
    captured_outbound(topo.from_pod(peer, PEER_PORT, family=family), peer, PEER_PORT)


def test_outbound_port_include(topo: Topology, backend: str, family: str) -> None:
    """-i '' -q 9000: only port 9000 is captured, 8000 is not."""
    topo.apply([*BASE_ARGS, "-m", REDIRECT, "-b", "*", "-i", "", "-q", str(PEER_PORT_2)], backend)
    peer = topo.peer_ip(family)
    captured_outbound(topo.from_pod(peer, PEER_PORT_2, family=family), peer, PEER_PORT_2)
    reached_peer(topo.from_pod(peer, PEER_PORT, family=family), peer, PEER_PORT)


# ---------------------------------------------------------------- interfaces (-c, -k)


def test_exclude_interface(topo: Topology, backend: str, family: str) -> None:
    """-c eth1: nothing through eth1 is captured, in either direction; eth0 still is."""
    topo.apply([*BASE_ARGS, "-m", REDIRECT, "-i", "*", "-b", "*", "-c", "eth1"], backend)
    peer1, pod1 = topo.peer_ip(family, link=1), topo.pod_ip(family, link=1)
    peer0, pod0 = topo.peer_ip(family), topo.pod_ip(family)
    reached_peer(topo.from_pod(peer1, PEER_PORT, family=family), peer1, PEER_PORT)
    reached_app(topo.from_peer(pod1, APP_PORT, family=family), pod1, APP_PORT)
    captured_outbound(topo.from_pod(peer0, PEER_PORT, family=family), peer0, PEER_PORT)
    captured_inbound(topo.from_peer(pod0, APP_PORT, family=family), pod0, APP_PORT)


def test_kube_virt_interface(topo: Topology, backend: str, family: str) -> None:
    """-k eth1 -i RANGE: a packet arriving on eth1 for RANGE is outbound (15001); the same kind
    of packet arriving on eth0 is ordinary inbound (15006)."""
    ranges = f"{VIRT_RANGE[V4]},{VIRT_RANGE[V6]}"
    topo.apply([*BASE_ARGS, "-m", REDIRECT, "-b", "*", "-i", ranges, "-k", "eth1"], backend)
    via_eth1, via_eth0 = VIRT_VIA_LINK[1][family], VIRT_VIA_LINK[0][family]
    captured_outbound(topo.from_peer(via_eth1, PEER_PORT, family=family), via_eth1, PEER_PORT)
    captured_inbound(topo.from_peer(via_eth0, PEER_PORT, family=family), via_eth0, PEER_PORT)


# ---------------------------------------------------------------- owner groups (environment)


def test_outbound_owner_groups_include(topo: Topology, backend: str, family: str) -> None:
    """ISTIO_OUTBOUND_OWNER_GROUPS=2000: only gid 2000's traffic is captured."""
    env = {"ISTIO_OUTBOUND_OWNER_GROUPS": "2000"}
    topo.apply([*BASE_ARGS, "-m", REDIRECT, "-b", "*", "-i", "*"], backend, env)
    peer = topo.peer_ip(family)
    captured_outbound(topo.from_pod(peer, PEER_PORT, family=family, uid=APP_UID, gid=2000), peer, PEER_PORT)
    reached_peer(topo.from_pod(peer, PEER_PORT, family=family, uid=APP_UID, gid=APP_UID), peer, PEER_PORT)


def test_outbound_owner_groups_exclude(topo: Topology, backend: str, family: str) -> None:
    """ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE=2001: gid 2001's traffic is not captured, others' is."""
    env = {"ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE": "2001"}
    topo.apply([*BASE_ARGS, "-m", REDIRECT, "-b", "*", "-i", "*"], backend, env)
    peer = topo.peer_ip(family)
    reached_peer(topo.from_pod(peer, PEER_PORT, family=family, uid=APP_UID, gid=2001), peer, PEER_PORT)
    captured_outbound(
        topo.from_pod(peer, PEER_PORT, family=family, uid=APP_UID, gid=APP_UID), peer, PEER_PORT
    )
