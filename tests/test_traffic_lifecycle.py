"""Applying, re-applying, drift, --reconcile and cleanup, checked on what the kernel holds:
every rule of both iptables backends and families, the whole nftables ruleset, the policy rules
and the TPROXY route table, in a namespace where someone else's rules (and, for the native
nftables backend, tables) were there first."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from tests.support.netns import NetNS
from tests.support.topology import (
    APP_PORT,
    BACKENDS,
    BASE_ARGS,
    FAMILIES,
    MODES,
    OUTBOUND_CAPTURE_PORT,
    PEER_PORT,
    SERVICE_A,
    TPROXY,
    TPROXY_TABLE,
    V4,
    V6,
    add_foreign_rules,
    apply_rules,
    clean_rules,
    has_istio_rules,
    namespace_state,
    policy_rules,
    route_table,
    rules_text,
    topology,
)

pytestmark = pytest.mark.kernel

COMBOS = [(b, m) for b in BACKENDS for m in MODES]
IDS = [f"{b}-{m}" for b, m in COMBOS]


def config(mode: str) -> list[str]:
    return [*BASE_ARGS, "-m", mode, "-i", "*", "-b", "*"]


def other_config(mode: str) -> list[str]:
    """A different configuration: other inbound ports, other outbound ranges."""
    return [*BASE_ARGS, "-m", mode, "-i", f"{SERVICE_A[V4]}/32,{SERVICE_A[V6]}/128", "-b", str(APP_PORT)]


def prepared_pod(netns: Callable[..., NetNS], backend: str) -> NetNS:
    ns = netns("pod")
    add_foreign_rules(ns, backend)
    return ns


def ok(proc: Any) -> None:
    assert proc.returncode == 0, f"{proc.args} exited {proc.returncode}:\n{proc.stderr}"


def istio_policy_rules(ns: NetNS) -> list[str]:
    return [r for f in FAMILIES for r in policy_rules(ns, f) if f"lookup {TPROXY_TABLE}" in r]


@pytest.mark.parametrize(("backend", "mode"), COMBOS, ids=IDS)
def test_apply_twice_changes_nothing(netns: Callable[..., NetNS], backend: str, mode: str) -> None:
    ns = prepared_pod(netns, backend)
    ok(apply_rules(ns, config(mode), backend, check=False))
    first = namespace_state(ns)
    ok(apply_rules(ns, config(mode), backend, check=False))
    assert namespace_state(ns) == first
    # The rules went to the chosen backend, for both families, and nowhere else: the iptables
    # backends' tables hold none of ours when nftables is used, and no native table of ours
    # appears when an iptables backend is.
    for family in FAMILIES:
        assert has_istio_rules(ns, backend, family), first
        for other in BACKENDS:
            if other != backend:
                assert "istio" not in rules_text(ns, other, family).lower(), other
    expected_routes = 2 if mode == TPROXY else 0
    assert len(istio_policy_rules(ns)) == expected_routes, first


@pytest.mark.parametrize(("backend", "mode"), COMBOS, ids=IDS)
def test_drift_is_reported_and_reconcile_fixes_it(
    netns: Callable[..., NetNS], backend: str, mode: str
) -> None:
    ns = prepared_pod(netns, backend)
    ok(apply_rules(ns, config(mode), backend, check=False))
    applied = namespace_state(ns)

    drift = apply_rules(ns, other_config(mode), backend, check=False)
    assert drift.returncode == 1, f"exit {drift.returncode}, expected 1 (drift)\n{drift.stderr}"
    assert drift.stderr.strip(), "drift must be explained on stderr"
    assert namespace_state(ns) == applied, "a refused apply must leave the rules as they were"

    ok(apply_rules(ns, [*other_config(mode), "--reconcile"], backend, check=False))
    # Reconciled: exactly what a first apply of the new configuration gives.
    fresh = prepared_pod(netns, backend)
    ok(apply_rules(fresh, other_config(mode), backend, check=False))
    assert namespace_state(ns) == namespace_state(fresh)


@pytest.mark.parametrize(("backend", "mode"), COMBOS, ids=IDS)
def test_cleanup_restores_the_namespace(netns: Callable[..., NetNS], backend: str, mode: str) -> None:
    ns = prepared_pod(netns, backend)
    before = namespace_state(ns)
    ok(apply_rules(ns, config(mode), backend, check=False))
    ok(clean_rules(ns, config(mode), backend, check=False))
    after = namespace_state(ns)
    assert "istio" not in after.lower(), after
    assert istio_policy_rules(ns) == []
    assert all(route_table(ns, f) == [] for f in FAMILIES), after
    # Everything else, the foreign rules included, is as it was.
    assert after == before
    assert "FOREIGN" in rules_text(ns, backend, V4)


@pytest.mark.parametrize(("backend", "mode"), COMBOS, ids=IDS)
def test_cleanup_releases_traffic(backend: str, mode: str) -> None:
    """After cleanup, real packets take the direct paths again, both ways, both families."""
    with topology(hint="clean") as t:
        ok(apply_rules(t.pod, config(mode), backend, check=False))
        for family in FAMILIES:
            out = t.from_pod(t.peer_ip(family), PEER_PORT, family=family)
            assert out.where == f"proxy:{OUTBOUND_CAPTURE_PORT}", out
        ok(clean_rules(t.pod, config(mode), backend, check=False))
        for family in FAMILIES:
            out = t.from_pod(t.peer_ip(family), PEER_PORT, family=family)
            assert out.where == f"peer:{PEER_PORT}", out
            out = t.from_peer(t.pod_ip(family), APP_PORT, family=family)
            assert out.where == f"app:{APP_PORT}", out


@pytest.mark.parametrize("backend", BACKENDS)
def test_cleanup_of_a_clean_namespace_is_harmless(netns: Callable[..., NetNS], backend: str) -> None:
    ns = prepared_pod(netns, backend)
    before = namespace_state(ns)
    ok(clean_rules(ns, config(TPROXY), backend, check=False))
    assert namespace_state(ns) == before
