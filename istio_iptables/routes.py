"""TPROXY policy routing and loopback addresses, set through netlink in the target namespace.

Per PolicyRoute: ``ip rule add fwmark MARK lookup TABLE`` and ``ip route add local default dev lo
table TABLE``, through pyroute2; plus the Ruleset's loopback addresses (``::6/128`` when IPv6 is
enabled), through one standard-library netlink request each (netlink.py), so that only TPROXY pods
load pyroute2. Adding is idempotent (what exists is left alone) and returns what it added, so a
failed apply can take back exactly that. pyroute2 is imported only here, and only for routes.
"""

from __future__ import annotations

import _socket as socket
import errno
import os

from . import netlink
from .lazylog import get_logger
from .lean import TYPE_CHECKING, NamedTuple
from .ruleset import Family, PolicyRoute

if TYPE_CHECKING:
    from collections.abc import Sequence
    from typing import Any

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


class _ipr:  # noqa: N801 - used like a function: ``with _ipr(netns) as ipr:``
    """A pyroute2 IPRoute of the namespace at ``netns`` (this one for None)."""

    def __init__(self, netns: str | None) -> None:
        self.netns = netns
        self.fd: int | None = None
        self.ipr: Any = None

    def __enter__(self) -> Any:
        from pyroute2 import IPRoute  # deferred: pyroute2 is heavy and only TPROXY needs it

        if self.netns is None:
            self.ipr = IPRoute()
            return self.ipr
        try:
            self.fd = os.open(self.netns, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            raise RoutesError(f"cannot open network namespace {self.netns}: {e.strerror}") from e
        try:
            # An open fd, and flags=0: pyroute2 must never create a namespace that is not there.
            self.ipr = IPRoute(netns=self.fd, flags=0)
        except BaseException:
            os.close(self.fd)
            self.fd = None
            raise
        return self.ipr

    def __exit__(self, *exc: object) -> None:
        try:
            if self.ipr is not None:
                self.ipr.close()
        finally:
            if self.fd is not None:
                os.close(self.fd)
                self.fd = None


def _lo(ipr: Any) -> int:
    found = ipr.link_lookup(ifname="lo")
    if not found:
        raise RoutesError("no 'lo' interface in the target namespace")
    return int(found[0])


def _rules(ipr: Any, r: PolicyRoute) -> list[Any]:
    out = []
    for msg in ipr.get_rules(family=_AF[r.family]):
        table = msg.get_attr("FRA_TABLE") or msg.get("table")
        if table == r.table and msg.get_attr("FRA_FWMARK") == r.mark:
            out.append(msg)
    return out


def _local_default(ipr: Any, r: PolicyRoute, lo: int) -> list[Any]:
    return [
        m
        for m in ipr.get_routes(family=_AF[r.family], table=r.table)
        if m.get("dst_len") == 0 and m.get("type") == 2 and m.get_attr("RTA_OIF") == lo  # RTN_LOCAL
    ]


def _default_pref(ipr: Any, family: Family) -> int:
    """The preference ``ip rule add`` gets without ``pref``: one below the first rule after local."""
    prefs = sorted(int(m.get_attr("FRA_PRIORITY") or 0) for m in ipr.get_rules(family=_AF[family]))
    return prefs[1] - 1 if len(prefs) > 1 and prefs[1] > 0 else 0


def _netlink_errno(e: Exception) -> int | None:
    code = getattr(e, "code", None)
    return code if isinstance(code, int) else None


def apply_routes(routes: Sequence[PolicyRoute], addresses: Sequence[str], netns: str | None) -> list[Added]:
    """Add what is missing; returns what was added (for ``undo``). Raises RoutesError."""
    added: list[Added] = []
    try:
        for iface in addresses:
            if netlink.add_address(iface, "lo", netns):
                added.append(Added("address", address=iface))
                log.info("added %s on lo", iface)
        if routes:
            _add_routes(routes, netns, added)
    except RoutesError:
        undo(added, netns)
        raise
    except netlink.NetlinkError as e:
        undo(added, netns)
        raise RoutesError(str(e)) from e
    except Exception as e:  # netlink errors carry errno codes; report them uniformly
        undo(added, netns)
        raise RoutesError(f"policy routing: {e}") from e
    return added


def _add_routes(routes: Sequence[PolicyRoute], netns: str | None, added: list[Added]) -> None:
    with _ipr(netns) as ipr:
        lo = _lo(ipr)
        for r in routes:
            if not _rules(ipr, r):
                pref = _default_pref(ipr, r.family)
                ipr.rule("add", family=_AF[r.family], fwmark=r.mark, table=r.table, priority=pref)
                added.append(Added("rule", route=r))
                log.info("added ip rule (IPv%d) fwmark %d lookup %d", r.family.value, r.mark, r.table)
            if not _local_default(ipr, r, lo):
                ipr.route(
                    "add", family=_AF[r.family], dst=_DEFAULT[r.family], table=r.table,
                    type="local", scope="host", proto="boot", oif=lo,
                )  # fmt: skip
                added.append(Added("route", route=r))
                log.info("added local default route dev lo table %d (IPv%d)", r.table, r.family.value)


def undo(added: Sequence[Added], netns: str | None) -> None:
    """Take back what apply_routes added (best effort: this runs on a failure path)."""
    routing = [item for item in added if item.kind != "address"]
    if routing:
        try:
            with _ipr(netns) as ipr:
                lo = _lo(ipr)
                for item in reversed(routing):
                    try:
                        _remove_route(ipr, lo, item)
                    except Exception as e:
                        log.warning("could not take back %s: %s", item, e)
        except Exception as e:
            log.warning("could not take back policy routing: %s", e)
    for item in reversed(added):
        if item.kind == "address" and item.address is not None:
            try:
                netlink.delete_address(item.address, "lo", netns)
            except Exception as e:
                log.warning("could not take back %s: %s", item, e)


def _remove_route(ipr: Any, lo: int, item: Added) -> None:
    if item.kind == "rule" and item.route is not None:
        for msg in _rules(ipr, item.route):
            ipr.rule("del", **_rule_key(msg, item.route))
    elif item.kind == "route" and item.route is not None:
        r = item.route
        fam, dst = _AF[r.family], _DEFAULT[r.family]
        ipr.route("del", family=fam, dst=dst, table=r.table, type="local", scope="host", oif=lo)


def _rule_key(msg: Any, r: PolicyRoute) -> dict[str, Any]:
    return {
        "family": _AF[r.family],
        "fwmark": r.mark,
        "table": r.table,
        "priority": int(msg.get_attr("FRA_PRIORITY") or 0),
    }


def remove_routes(routes: Sequence[PolicyRoute], addresses: Sequence[str], netns: str | None) -> list[str]:
    """Remove the rules, routes and addresses if present; returns what was removed. Raises RoutesError."""
    removed: list[str] = []
    try:
        if routes:
            with _ipr(netns) as ipr:
                lo = _lo(ipr)
                for r in routes:
                    for msg in _rules(ipr, r):
                        ipr.rule("del", **_rule_key(msg, r))
                        removed.append(f"ip rule fwmark {r.mark} lookup {r.table} (IPv{r.family.value})")
                    for _ in _local_default(ipr, r, lo):
                        _remove_route(ipr, lo, Added("route", route=r))
                        removed.append(f"local default route table {r.table} (IPv{r.family.value})")
        for iface in addresses:
            if netlink.delete_address(iface, "lo", netns):
                removed.append(f"{iface} on lo")
    except RoutesError:
        raise
    except netlink.NetlinkError as e:
        raise RoutesError(str(e)) from e
    except Exception as e:
        if _netlink_errno(e) == errno.ENOENT:
            return removed
        raise RoutesError(f"policy routing: {e}") from e
    return removed
