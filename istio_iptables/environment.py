"""What istio-iptables learns from the machine rather than from its options: the proxy's uid
(from ENVOY_USER), whether the pod has IPv6 (from its addresses) and the DNS servers (from
resolv.conf). ``Machine`` is the seam; tests pass their own.
"""

from __future__ import annotations

from .logsink import get_logger
from .startup import TYPE_CHECKING

# ``ipaddress`` is imported where addresses are read (IPv6 detection, DNS servers), not here.
if TYPE_CHECKING:
    import ipaddress
    from collections.abc import Iterable, Sequence
    from typing import Protocol

    from .netns import Netns

    IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

DEFAULT_RESOLV_CONF = "/etc/resolv.conf"
_log = get_logger(__name__)


class DetectionError(Exception):
    """The machine could not tell us something we need (and no option gave it)."""


if TYPE_CHECKING:

    class Machine(Protocol):
        """What load() asks the machine (a Protocol for type checkers; tests pass their own)."""

        def user_uid(self, name: str) -> str | None:
            """The numeric uid of user ``name`` as a string, or None when there is no such user."""
            ...

        def local_addresses(self, netns: str | None) -> list[IPAddress]:
            """Every address of every interface (of ``netns`` when given), in Go's order: all IPv4
            addresses first, then all IPv6 ones, each family in interface order."""
            ...

        def nameservers(self, path: str) -> list[str]:
            """The ``nameserver`` entries of a resolv.conf file, as written; raises OSError."""
            ...

else:
    Machine = object  # only a type: what load() asks the machine; tests pass their own


class RealMachine:
    """The machine we run on.

    A namespace it is asked about is opened once and kept (``namespace``), so that the command
    that detected IPv6 in a namespace applies its rules to that same namespace, whatever its path
    names by then; ``close`` lets go of them.
    """

    def __init__(self) -> None:
        self._namespaces: dict[str, Netns] = {}

    def namespace(self, path: str) -> Netns:
        """The namespace at ``path``, opened on first use. Raises netns.NetnsError."""
        ns = self._namespaces.get(path)
        if ns is None:
            from .netns import open_netns

            ns = self._namespaces[path] = open_netns(path)
        return ns

    def close(self) -> None:
        namespaces, self._namespaces = self._namespaces, {}
        for ns in namespaces.values():
            ns.close()

    def user_uid(self, name: str) -> str | None:
        import pwd

        try:
            return str(pwd.getpwnam(name).pw_uid)
        except (KeyError, ValueError):
            return None

    def local_addresses(self, netns: str | None) -> list[IPAddress]:
        """Read from the kernel over netlink, as Istio's Go code reads them: no ``ip`` binary
        needed (the init container's image has none) and no process spent."""
        import ipaddress  # only when the addresses are detected

        from . import netlink
        from .netns import NetnsError

        try:
            found = netlink.in_netns(self.namespace(netns) if netns else None, netlink.local_addresses)
        except (netlink.NetlinkError, NetnsError) as e:
            raise DetectionError(f"cannot list local addresses: {e}") from None
        return [ipaddress.ip_address(a) for a in found]

    def nameservers(self, path: str) -> list[str]:
        with open(path, encoding="utf-8", errors="replace") as f:
            return nameservers_from_resolv_conf(f.read())


def _unmap(addr: IPAddress) -> IPAddress:
    mapped: IPAddress | None = getattr(addr, "ipv4_mapped", None)  # IPv6 only
    return addr if mapped is None else mapped


def _usable(addr: IPAddress) -> bool:
    """Go: !IsLoopback && !IsLinkLocalUnicast && !IsLinkLocalMulticast."""
    if addr.is_loopback or addr.is_link_local:
        return False
    if addr.version == 4:
        return int(addr) >> 8 != 0xE00000  # 224.0.0.0/24
    return int(addr) >> 112 != 0xFF02  # ff02::/16


def detect_ipv6(addresses: Iterable[IPAddress], dual_stack: bool) -> bool:
    """Istio's getLocalIP: without dual-stack the first usable address decides (IPv6 -> True);
    with dual-stack, True when any usable address is IPv6. No usable address is an error."""
    found = False
    for addr in map(_unmap, addresses):
        if not _usable(addr):
            continue
        found = True
        if addr.version == 6 or not dual_stack:
            return addr.version == 6
    if not found:
        raise DetectionError(
            "no valid local IP address found to decide on IPv6 (pass --enable-ipv6 or --no-enable-ipv6)"
        )
    return False


def nameservers_from_resolv_conf(text: str) -> list[str]:
    """``nameserver X`` entries (the first word after the keyword), as Go's miekg/dns reads them."""
    servers = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) > 1 and fields[0] == "nameserver":
            servers.append(fields[1])
    return servers


def split_nameservers(
    servers: Sequence[str],
) -> tuple[tuple[ipaddress.IPv4Address, ...], tuple[ipaddress.IPv6Address, ...]]:
    """Istio's IPsSplitV4V6: unparsable entries are skipped; a zone is dropped (a rule cannot carry it)."""
    import ipaddress

    v4: list[ipaddress.IPv4Address] = []
    v6: list[ipaddress.IPv6Address] = []
    for s in servers:
        text, _, zone = s.partition("%")
        try:
            ip = ipaddress.ip_address(text)
        except ValueError:
            _log.debug("ignoring unparsable nameserver %r", s)
            continue
        if isinstance(ip, ipaddress.IPv4Address):
            if zone:  # netip.ParseAddr refuses a zone on an IPv4 address
                _log.debug("ignoring unparsable nameserver %r", s)
                continue
            v4.append(ip)
        else:
            if zone:
                _log.debug("dropping zone %r of nameserver %s", zone, text)
            v6.append(ip)
    return tuple(v4), tuple(v6)
