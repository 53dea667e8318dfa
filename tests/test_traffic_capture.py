"""Real packets through a captured pod, for IPv4 and IPv6, both iptables backends and native
nftables, and both REDIRECT and TPROXY inbound interception: outbound lands on 15001 with its
original destination, the proxy's own traffic is untouched, inbound lands on 15006, inbound
passthrough and loopback traffic behave as in Istio."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from tests.support.topology import (
    APP_GID,
    APP_PORT,
    APP_PORT_2,
    APP_UID,
    BACKENDS,
    BASE_ARGS,
    INBOUND_CAPTURE_PORT,
    LOOPBACK,
    MODES,
    OUTBOUND_CAPTURE_PORT,
    PASSTHROUGH_SOURCE,
    PEER_PORT,
    PROXY_GID,
    PROXY_UID,
    TPROXY,
    TPROXY_MARK,
    TPROXY_TABLE,
    V6,
    Topology,
    has_address,
    has_istio_rules,
    policy_rules,
    route_table,
    rules_text,
    topology,
)

pytestmark = pytest.mark.kernel


@dataclass(frozen=True)
class Captured:
    topo: Topology
    backend: str
    mode: str


@pytest.fixture(scope="module")
def topo() -> Iterator[Topology]:
    with topology(hint="capture") as t:
        yield t


@pytest.fixture(
    scope="module",
    params=[(b, m) for b in BACKENDS for m in MODES],
    ids=[f"{b}-{m}" for b in BACKENDS for m in MODES],
)
def pod(request: pytest.FixtureRequest, topo: Topology) -> Captured:
    """The pod with Istio's usual sidecar configuration: capture all outbound, all inbound."""
    backend, mode = request.param
    topo.apply([*BASE_ARGS, "-m", mode, "-i", "*", "-b", "*"], backend)
    return Captured(topo, backend, mode)


def test_app_outbound_is_captured_with_original_destination(pod: Captured, family: str) -> None:
    t = pod.topo
    out = t.from_pod(t.peer_ip(family), PEER_PORT, family=family, uid=APP_UID)
    assert out.where == f"proxy:{OUTBOUND_CAPTURE_PORT}", out
    assert out.seen is not None
    assert out.seen.orig_dst == (t.peer_ip(family), PEER_PORT), out
    assert out.seen.peer == out.client_local, out
    # The proxy reported the same connection over its pipe.
    assert t.proxy.seen(out.seen.token) == out.seen


@pytest.mark.parametrize(
    ("uid", "gid"),
    [(PROXY_UID, PROXY_GID), (PROXY_UID, APP_GID), (APP_UID, PROXY_GID)],
    ids=["proxy-uid-and-gid", "proxy-uid", "proxy-gid"],
)
def test_proxy_own_traffic_reaches_peer_untouched(pod: Captured, family: str, uid: int, gid: int) -> None:
    t = pod.topo
    out = t.from_pod(t.peer_ip(family), PEER_PORT, family=family, uid=uid, gid=gid)
    assert out.where == f"peer:{PEER_PORT}", out
    assert out.seen is not None
    assert out.seen.local == (t.peer_ip(family), PEER_PORT), out
    assert out.seen.peer == out.client_local, out


def test_inbound_is_captured(pod: Captured, family: str) -> None:
    t = pod.topo
    out = t.from_peer(t.pod_ip(family), APP_PORT, family=family)
    assert out.where == f"proxy:{INBOUND_CAPTURE_PORT}", out
    assert out.seen is not None
    # The proxy sees the peer's real address, in both modes.
    assert out.seen.peer == out.client_local, out
    assert out.seen.peer[0] == t.peer_ip(family), out
    if pod.mode == TPROXY:
        # A transparent socket is bound to the original destination itself.
        assert out.seen.local == (t.pod_ip(family), APP_PORT), out
    else:
        assert out.seen.orig_dst == (t.pod_ip(family), APP_PORT), out


def test_inbound_passthrough_source_reaches_app(pod: Captured, family: str) -> None:
    """The proxy forwards inbound traffic to the app from 127.0.0.6 / ::6: not captured again."""
    t = pod.topo
    source = PASSTHROUGH_SOURCE[family]
    if family == V6:
        assert has_address(t.pod, "lo", source), "::6/128 is not on lo after applying with IPv6 enabled"
    out = t.from_pod(t.pod_ip(family), APP_PORT, family=family, uid=PROXY_UID, src=source)
    assert out.where == f"app:{APP_PORT}", out
    assert out.seen is not None
    assert out.seen.peer[0] == source, out


LOOPBACK_CASES = {
    # name: (uid, destination ("pod" or "loopback"), port, where it must land)
    "app-to-own-pod-ip": (APP_UID, "pod", APP_PORT_2, f"app:{APP_PORT_2}"),
    "app-to-loopback": (APP_UID, "loopback", APP_PORT_2, f"app:{APP_PORT_2}"),
    "proxy-to-loopback": (PROXY_UID, "loopback", APP_PORT, f"app:{APP_PORT}"),
    # The proxy calling its own pod's IP goes through inbound capture, as in Istio.
    "proxy-to-own-pod-ip": (PROXY_UID, "pod", APP_PORT, f"proxy:{INBOUND_CAPTURE_PORT}"),
}


@pytest.mark.parametrize("case", list(LOOPBACK_CASES))
def test_loopback_traffic(pod: Captured, family: str, case: str) -> None:
    t = pod.topo
    uid, dest, port, where = LOOPBACK_CASES[case]
    dst = t.pod_ip(family) if dest == "pod" else LOOPBACK[family]
    out = t.from_pod(dst, port, family=family, uid=uid)
    assert out.where == where, out
    assert out.seen is not None
    if out.seen.tag == "proxy":
        assert out.seen.orig_dst == (dst, port), out


def test_policy_routing_only_for_tproxy(pod: Captured, family: str) -> None:
    t = pod.topo
    fwmark_rules = [r for r in policy_rules(t.pod, family) if f"lookup {TPROXY_TABLE}" in r]
    routes = route_table(t.pod, family)
    if pod.mode == TPROXY:
        assert len(fwmark_rules) == 1, fwmark_rules
        assert f"fwmark {hex(TPROXY_MARK)}" in fwmark_rules[0], fwmark_rules
        assert any(r.startswith("local default dev lo") for r in routes), routes
    else:
        assert fwmark_rules == [], fwmark_rules
        assert routes == [], routes


def test_rules_are_in_the_chosen_backend_only(pod: Captured, family: str) -> None:
    t = pod.topo
    assert has_istio_rules(t.pod, pod.backend, family), rules_text(t.pod, pod.backend, family)
    for other in BACKENDS:
        if other != pod.backend:
            assert "istio" not in rules_text(t.pod, other, family).lower(), other
