"""TPROXY policy routing and loopback addresses, set through netlink in the target namespace.

Per PolicyRoute: ``ip rule add fwmark MARK lookup TABLE`` and ``ip route add local default dev lo
table TABLE``; plus the Ruleset's loopback addresses (``::6/128`` when IPv6 is enabled). Each is
one standard-library netlink request (netlink.py), as ``ip`` sends it: no netlink library to load
on a pod's start (pyroute2 cost a TPROXY pod about 100 ms, and the self-contained plugin would
carry it and the asyncio and multiprocessing packages it imports). Adding is idempotent (what
exists is left alone) and returns what it added, so a failed apply can take back exactly that.
"""

from __future__ import annotations

from . import netlink
from .logsink import get_logger
from .ruleset import Family, PolicyRoute
from .startup import TYPE_CHECKING, NamedTuple, socket

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence
    from typing import TypeVar

    from .netns import Netns

    T = TypeVar("T")

log = get_logger(__name__)

_AF = {Family.V4: socket.AF_INET, Family.V6: socket.AF_INET6}
_DEFAULT = {Family.V4: "0.0.0.0/0", Family.V6: "::/0"}


class RoutesError(Exception):
    pass


class Added(NamedTuple):
    """One thing apply_routes added: ("rule" | "route", PolicyRoute) or ("address", "::6/128")."""

    kind: str
    route: PolicyRoute | None = None
    address: str | None = None


def _rules(r: PolicyRoute) -> list[netlink.PolicyRule]:
    return [
        rule
        for rule in netlink.policy_rules(_AF[r.family])
        if rule.table == r.table and rule.fwmark == r.mark
    ]


def _local_default(r: PolicyRoute, lo: int) -> list[netlink.Route]:
    return [
        route
        for route in netlink.routes(_AF[r.family])
        if route.table == r.table
        and route.dst_len == 0
        and route.type == netlink.RTN_LOCAL
        and route.oif == lo
    ]


def _inside(netns: str | Netns | None, fn: Callable[[], T]) -> T:
    return netlink.in_netns(netns, fn)


def apply_routes(
    routes: Sequence[PolicyRoute], addresses: Sequence[str], netns: str | Netns | None
) -> list[Added]:
    """Add what is missing; returns what was added (for ``undo``). Raises RoutesError."""
    added: list[Added] = []
    try:
        for iface in addresses:
            if netlink.add_address(iface, "lo", netns):
                added.append(Added("address", address=iface))
                log.info("added %s on lo", iface)
        if routes:
            _inside(netns, lambda: _add_routes(routes, added))
    except netlink.NetlinkError as e:
        undo(added, netns)
        raise RoutesError(str(e)) from e
    return added


def _add_routes(routes: Sequence[PolicyRoute], added: list[Added]) -> None:
    lo = netlink.interface_index("lo")
    for r in routes:
        if not _rules(r):
            netlink.add_policy_rule(_AF[r.family], r.mark, r.table)
            added.append(Added("rule", route=r))
            log.info("added ip rule (IPv%d) fwmark %d lookup %d", r.family.value, r.mark, r.table)
        if not _local_default(r, lo):
            netlink.add_local_default_route(_AF[r.family], r.table, lo)
            added.append(Added("route", route=r))
            log.info("added local default route dev lo table %d (IPv%d)", r.table, r.family.value)


def undo(added: Sequence[Added], netns: str | Netns | None) -> None:
    """Take back what apply_routes added (best effort: this runs on a failure path)."""
    routing = [item for item in added if item.kind != "address"]

    def take_back() -> None:
        lo = netlink.interface_index("lo")
        for item in reversed(routing):
            try:
                _remove_route(lo, item)
            except netlink.NetlinkError as e:
                log.warning("could not take back %s: %s", item, e)

    if routing:
        try:
            _inside(netns, take_back)
        except netlink.NetlinkError as e:
            log.warning("could not take back policy routing: %s", e)
    for item in reversed(added):
        if item.kind == "address" and item.address is not None:
            try:
                netlink.delete_address(item.address, "lo", netns)
            except netlink.NetlinkError as e:
                log.warning("could not take back %s: %s", item, e)


def _remove_route(lo: int, item: Added) -> list[str]:
    r = item.route
    removed: list[str] = []
    if r is None:
        return removed
    if item.kind == "rule":
        for rule in _rules(r):
            netlink.delete_policy_rule(_AF[r.family], r.mark, r.table, rule.priority)
            removed.append(f"ip rule fwmark {r.mark} lookup {r.table} (IPv{r.family.value})")
    elif item.kind == "route":
        for _ in _local_default(r, lo):
            netlink.delete_local_default_route(_AF[r.family], r.table, lo)
            removed.append(f"local default route table {r.table} (IPv{r.family.value})")
    return removed


def remove_routes(
    routes: Sequence[PolicyRoute], addresses: Sequence[str], netns: str | Netns | None
) -> list[str]:
    """Remove the rules, routes and addresses if present; returns what was removed. Raises RoutesError."""

    def remove() -> list[str]:
        lo = netlink.interface_index("lo")
        removed: list[str] = []
        for r in routes:
            removed += _remove_route(lo, Added("rule", route=r))
            removed += _remove_route(lo, Added("route", route=r))
        return removed

    try:
        removed = _inside(netns, remove) if routes else []
        for iface in addresses:
            if netlink.delete_address(iface, "lo", netns):
                removed.append(f"{iface} on lo")
    except netlink.NetlinkError as e:
        raise RoutesError(str(e)) from e
    return removed
