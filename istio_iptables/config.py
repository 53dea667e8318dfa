"""Typed, validated configuration for the planner (Config) and for applying rules (ApplyOptions).

Everything is parsed and validated once, here; errors name the option or variable and the value.
"""

from __future__ import annotations

from .startup import TYPE_CHECKING, Enum, NamedTuple

# ``ipaddress`` (with the functools and collections it loads, about 5 ms) is imported only where
# an address or range is actually parsed: the default command line of a pod start has none.
if TYPE_CHECKING:
    import ipaddress

    IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
    IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class ConfigError(ValueError):
    """Bad input: ``source`` is the option or environment variable (or annotation) that carried it."""

    def __init__(self, source: str, value: str, reason: str) -> None:
        super().__init__(f"invalid value {shown(value)} for {source}: {reason}")
        self.source = source
        self.value = value
        self.reason = reason


class InterceptionMode(Enum):
    REDIRECT = "REDIRECT"
    TPROXY = "TPROXY"


class PortSpec(NamedTuple):
    """A port list that may also be the wildcard ``*`` (inbound ports to capture)."""

    wildcard: bool = False
    ports: tuple[int, ...] = ()

    @property
    def empty(self) -> bool:
        return not self.wildcard and not self.ports


class CidrSpec(NamedTuple):
    """A CIDR list that may also be the wildcard ``*`` (outbound ranges to capture)."""

    wildcard: bool = False
    cidrs: tuple[IPNetwork, ...] = ()

    def of_version(self, version: int) -> tuple[IPNetwork, ...]:
        return tuple(c for c in self.cidrs if c.version == version)

    @property
    def has_loopback(self) -> bool:
        return any(c.network_address.is_loopback for c in self.cidrs)


class OwnerGroups(NamedTuple):
    """Which groups' outbound traffic is captured: all (``*``), only ``values``, or all but ``values``."""

    except_: bool = True
    values: tuple[str, ...] = ()


class Config(NamedTuple):
    """Everything the planner needs. Defaults are Istio's."""

    proxy_port: int = 15001
    inbound_capture_port: int = 15006
    inbound_tunnel_port: int = 15008
    proxy_uids: tuple[str, ...] = ("1337",)
    proxy_gids: tuple[str, ...] = ("1337",)
    interception_mode: InterceptionMode = InterceptionMode.REDIRECT
    inbound_ports: PortSpec = PortSpec()
    inbound_ports_exclude: tuple[int, ...] = ()
    exclude_interfaces: tuple[str, ...] = ()
    outbound_ip_ranges_include: CidrSpec = CidrSpec()
    outbound_ip_ranges_exclude: tuple[IPNetwork, ...] = ()
    outbound_ports_include: tuple[int, ...] = ()
    outbound_ports_exclude: tuple[int, ...] = ()
    kube_virt_interfaces: tuple[str, ...] = ()
    tproxy_mark: int = 1337
    tproxy_route_table: int = 133
    redirect_dns: bool = False
    capture_all_dns: bool = False
    dns_servers_v4: tuple[ipaddress.IPv4Address, ...] = ()
    dns_servers_v6: tuple[ipaddress.IPv6Address, ...] = ()
    drop_invalid: bool = False
    enable_ipv6: bool = False
    owner_groups: OwnerGroups = OwnerGroups()
    # Canonical text (host bits masked), as parse_ipv4_loopback_cidr returns it.
    host_ipv4_loopback_cidr: str = "127.0.0.1/32"


class ApplyOptions(NamedTuple):
    """How rules are applied (or not). None of this changes which rules are planned."""

    dry_run: bool = False
    skip_rule_apply: bool = False
    run_validation: bool = False
    iptables_probe_port: int = 15002
    probe_timeout: float = 5.0
    network_namespace: str | None = None
    cni_mode: bool = False
    reconcile: bool = False
    cleanup_only: bool = False
    force_apply: bool = False
    native_nftables: bool = False
    force_iptables_binary: str | None = None
    # --explain PACKET (None: not given), --live, --explain-format: walk a packet instead.
    explain: str | None = None
    explain_live: bool = False
    explain_format: str = "text"


# ---------------------------------------------------------------------------------------------
# Parsing: option, environment and annotation strings -> the typed values above. Every parser
# takes the ``source`` (the flag, variable or annotation that carried the text) so its
# ConfigError can name it. Lists follow Istio's split: comma-separated, empty items (and here
# also surrounding spaces) ignored, so "6000,7000," and "6000, 7000" both mean 6000 and 7000.

# No ``re`` here: these parsers run on every pod start, and ``re`` (with ``enum``) is a large
# share of the start-up imports. The small grammars below are checked by hand.
from .logsink import get_logger, shown  # noqa: E402

_GO_TRUE = frozenset({"1", "t", "T", "TRUE", "true", "True"})
_GO_FALSE = frozenset({"0", "f", "F", "FALSE", "false", "False"})
_ASCII_LETTERS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")
# POSIX-portable user and group names (useradd's default rule): [A-Za-z_][A-Za-z0-9_.-]*, and a
# trailing '$' for machine accounts. Numbers and a-b ranges are checked before this rule.
_OWNER_FIRST = _ASCII_LETTERS | {"_"}
_OWNER_REST = _OWNER_FIRST | frozenset("0123456789.-")


def _is_digits(s: str) -> bool:
    """``[0-9]+`` in full (str.isdigit alone also accepts other scripts' digits)."""
    return s.isascii() and s.isdigit()


# int() refuses text of more than 4300 digits (sys.get_int_max_str_digits) with a ValueError of its
# own, and converting thousands of digits only to find them out of range is wasted work. Every
# bound checked here is below 10**20, so a number with more significant digits is "too large"
# without being converted. Leading zeros count for nothing, as in Go's strconv.
_DIGITS_MAX = 20
_TOO_LARGE = 10**_DIGITS_MAX


def _decimal(s: str) -> int | None:
    """The value of ``[0-9]+`` (``_TOO_LARGE`` when it has more than ``_DIGITS_MAX`` significant
    digits), or None when ``s`` is anything else."""
    if not _is_digits(s):
        return None
    significant = s.lstrip("0")
    if len(significant) > _DIGITS_MAX:
        return _TOO_LARGE
    return int(significant) if significant else 0


def _is_prefix_length(s: str) -> bool:
    """``0|[1-9][0-9]{0,2}``: a prefix length as written, without leading zeros."""
    return _is_digits(s) and len(s) <= 3 and (s == "0" or s[0] != "0")


def _is_owner_name(s: str) -> bool:
    name = s[:-1] if s.endswith("$") else s
    return bool(name) and name[0] in _OWNER_FIRST and all(c in _OWNER_REST for c in name[1:])


_OWNER_NAME_MAX = 32
# The kernel keeps uid/gid (u32)-1 as "no id"; iptables' owner match rejects it.
_MAX_ID = 2**32 - 2
_MAX_U32 = 2**32 - 1
# Routing tables the kernel reserves: 253 default, 254 main, 255 local (0 is "unspecified").
_RESERVED_TABLES = frozenset({0, 253, 254, 255})
MAX_OWNER_GROUPS_INCLUDE = 64
# Linux dev_valid_name: 1..15 bytes (IFNAMSIZ 16 with the NUL), not "." or "..", no '/', ':' or
# whitespace. We also refuse what iptables-restore would tokenize or treat as an option or an
# inversion (quotes, backslash, '#', a leading '-' or '!') and anything but printable ASCII.
_IFNAME_FORBIDDEN = frozenset("/:\"'\\#")
_IFNAME_MAX = 15

_DURATION_UNITS = {
    "ns": 1e-9,
    "us": 1e-6,
    "\u00b5s": 1e-6,  # micro sign
    "\u03bcs": 1e-6,  # Greek mu
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
}
# Two-letter units first: "ms" is milliseconds, not minutes followed by "s".
_DURATION_UNIT_ORDER = ("ns", "us", "\u00b5s", "\u03bcs", "ms", "s", "m", "h")
# Go's time.Duration is int64 nanoseconds: ParseDuration refuses anything longer, and so do we
# (float() would read a number of any length, thousands of digits as infinity).
_DURATION_MAX = (2**63 - 1) / 1e9
_DURATION_MAX_TEXT = "2562047h47m16.854775807s"

_log = get_logger(__name__)


def split_list(s: str) -> list[str]:
    """Istio's ``config.Split``: comma-separated items, empty (or blank) items dropped, items trimmed."""
    return [item.strip() for item in s.split(",") if item.strip()]


def parse_bool(source: str, s: str) -> bool:
    """A boolean spelled as Go's strconv.ParseBool accepts it (1, t, true, TRUE, True, 0, f, ...)."""
    v = s.strip()
    if v in _GO_TRUE:
        return True
    if v in _GO_FALSE:
        return False
    raise ConfigError(source, s, "expected true or false")


def _port(source: str, whole: str, item: str) -> int:
    label = "" if item == whole.strip() else f"{shown(item)}: "
    port = _decimal(item)
    if port is None:
        raise ConfigError(source, whole, f"{label}not a port number (1-65535)")
    if not 1 <= port <= 65535:
        raise ConfigError(source, whole, f"{label}port out of range (1-65535)")
    return port


def parse_port(source: str, s: str) -> int:
    """One TCP port, 1..65535, in decimal."""
    return _port(source, s, s.strip())


def _listed(source: str, s: str, what: str) -> list[str]:
    """The items of a list where ``*`` is not allowed (``what`` names what to list instead)."""
    if s.strip() == "*":
        raise ConfigError(source, s, f"a wildcard is not allowed here, list the {what}")
    return split_list(s)


def _wildcard_or_listed(source: str, s: str) -> list[str] | None:
    """None for ``*`` given alone, else the items of the list (``*`` among them is an error)."""
    if s.strip() == "*":
        return None
    items = split_list(s)
    if "*" in items:
        raise ConfigError(source, s, "'*' must be given alone")
    return items


def parse_port_list(source: str, s: str) -> tuple[int, ...]:
    """A comma-separated list of ports (possibly empty); ``*`` is not allowed here."""
    return tuple(_port(source, s, item) for item in _listed(source, s, "ports"))


def parse_port_spec(source: str, s: str) -> PortSpec:
    """``*`` (every port), or a list of ports; empty means none."""
    items = _wildcard_or_listed(source, s)
    if items is None:
        return PortSpec(wildcard=True)
    return PortSpec(ports=tuple(_port(source, s, item) for item in items))


def _cidr(source: str, whole: str, item: str) -> IPNetwork:
    # Go's netip.ParsePrefix: ADDRESS/BITS, no zone, no netmask form, no bare address. Host bits
    # may be set; iptables masks them, so we keep the masked network (the same kernel state, and
    # one spelling in rendered rules).
    addr, slash, bits = item.partition("/")
    if not slash:
        raise ConfigError(source, whole, f"{shown(item)} is not a CIDR range (ADDRESS/PREFIX)")
    if "%" in addr:
        raise ConfigError(source, whole, f"{shown(item)}: a zone is not allowed in a CIDR range")
    import ipaddress

    try:
        ip = ipaddress.ip_address(addr)
    except ValueError:
        raise ConfigError(source, whole, f"{shown(item)} is not a CIDR range (bad address)") from None
    if not _is_prefix_length(bits) or int(bits) > ip.max_prefixlen:
        raise ConfigError(source, whole, f"{shown(item)}: the prefix length must be 0-{ip.max_prefixlen}")
    return ipaddress.ip_network(f"{ip}/{bits}", strict=False)


def parse_cidr(source: str, s: str) -> IPNetwork:
    """One CIDR range, IPv4 or IPv6 (host bits allowed, masked)."""
    return _cidr(source, s, s.strip())


def parse_cidr_list(source: str, s: str) -> tuple[IPNetwork, ...]:
    """A comma-separated list of CIDR ranges, IPv4 and IPv6 mixed; ``*`` is not allowed here."""
    return tuple(_cidr(source, s, item) for item in _listed(source, s, "CIDR ranges"))


def parse_cidr_spec(source: str, s: str) -> CidrSpec:
    """``*`` (every destination), or a list of CIDR ranges; empty means none."""
    items = _wildcard_or_listed(source, s)
    if items is None:
        return CidrSpec(wildcard=True)
    return CidrSpec(cidrs=tuple(_cidr(source, s, item) for item in items))


def _ipv4(addr: str) -> int | None:
    """A dotted-quad IPv4 address as ipaddress (and Go's netip) read it - four decimal octets,
    0-255, no leading zeros - or None when ``addr`` is anything else."""
    parts = addr.split(".")
    if len(parts) != 4:
        return None
    value = 0
    for p in parts:
        if not _is_digits(p) or len(p) > 3 or (len(p) > 1 and p[0] == "0") or int(p) > 255:
            return None
        value = value << 8 | int(p)
    return value


def parse_ipv4_loopback_cidr(source: str, s: str) -> str:
    """Istio's ValidateIPv4LoopbackCidr: an IPv4 range in 127.0.0.0/8 with a prefix of 8 to 32.
    Returns the range's canonical text (host bits masked), e.g. ``127.0.0.0/8`` for ``127.0.0.1/8``."""
    item = s.strip()
    addr, slash, bits = item.partition("/")
    ip = _ipv4(addr)
    if not slash or ip is None or not _is_prefix_length(bits) or int(bits) > 32:
        # Not a well-formed IPv4 range: let the general CIDR parser say what is wrong with it.
        net = _cidr(source, s, item)
        if net.version != 4:
            raise ConfigError(source, s, "an IPv6 range is not allowed here, IPv4 only")
        raise AssertionError(f"unreachable: {item!r} parses as {net}")  # pragma: no cover
    if ip >> 24 != 127:
        raise ConfigError(source, s, "not an IPv4 loopback range (127.0.0.0/8)")
    prefix = int(bits)
    if not 8 <= prefix <= 32:
        raise ConfigError(source, s, "the prefix length must be 8-32")
    net_ip = ip & ~((1 << (32 - prefix)) - 1)
    return f"{net_ip >> 24}.{net_ip >> 16 & 255}.{net_ip >> 8 & 255}.{net_ip & 255}/{prefix}"


def _interface(source: str, whole: str, name: str) -> str:
    problem = None
    if len(name) > _IFNAME_MAX:
        problem = f"longer than {_IFNAME_MAX} characters"
    elif name in (".", ".."):
        problem = "not a valid interface name"
    elif any(c in _IFNAME_FORBIDDEN or not ("!" <= c <= "~") for c in name):
        problem = "contains a character not allowed in an interface name"
    elif name[0] in "-!":
        problem = "an interface name cannot start with '-' or '!'"
    if problem:
        raise ConfigError(source, whole, f"interface {shown(name)}: {problem}")
    return name


def parse_interface_list(source: str, s: str) -> tuple[str, ...]:
    """A comma-separated list of Linux interface names (a trailing '+' is iptables' wildcard)."""
    return tuple(_interface(source, s, item) for item in split_list(s))


def parse_mode(source: str, s: str) -> InterceptionMode:
    """REDIRECT or TPROXY; empty means REDIRECT (Istio's default)."""
    v = s.strip()
    if v in ("", "REDIRECT"):
        return InterceptionMode.REDIRECT
    if v == "TPROXY":
        return InterceptionMode.TPROXY
    raise ConfigError(source, s, "expected REDIRECT or TPROXY")


def _owner(source: str, whole: str, item: str) -> str:
    lo, dash, hi = item.partition("-")
    first = _decimal(lo)
    last = _decimal(hi) if dash else first
    if first is not None and last is not None:
        if last > _MAX_ID:
            raise ConfigError(source, whole, f"id {shown(item)} out of range (0-{_MAX_ID})")
        if first > last:
            raise ConfigError(source, whole, f"range {shown(item)} is reversed")
        return f"{first}-{last}" if dash else str(first)
    if len(item) <= _OWNER_NAME_MAX and _is_owner_name(item):
        return item
    raise ConfigError(source, whole, f"{shown(item)} is not a numeric id, an id range or a valid name")


def parse_owner_list(source: str, s: str) -> tuple[str, ...]:
    """Users or groups for iptables' owner match: ids (0..2^32-2), ranges ``a-b`` or names.

    Names are passed through as they are (iptables resolves them when the rules are loaded),
    never looked up here.
    """
    items = split_list(s)
    if "*" in items:
        reason = "a wildcard is not allowed here" if items == ["*"] else "'*' must be given alone"
        raise ConfigError(source, s, reason)
    return tuple(_owner(source, s, item) for item in items)


def parse_owner_groups(
    include: str,
    exclude: str,
    *,
    include_source: str = "ISTIO_OUTBOUND_OWNER_GROUPS",
    exclude_source: str = "ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE",
) -> OwnerGroups:
    """Istio's ParseInterceptFilter: include ``*`` captures every group except ``exclude``;
    any other include captures only those groups (at most 64), and exclude does not apply."""
    excluded = parse_owner_list(exclude_source, exclude)
    if include.strip() == "*":
        return OwnerGroups(except_=True, values=excluded)
    included = parse_owner_list(include_source, include)
    if len(included) > MAX_OWNER_GROUPS_INCLUDE:
        raise ConfigError(
            include_source,
            include,
            f"at most {MAX_OWNER_GROUPS_INCLUDE} groups can be captured, got {len(included)}",
        )
    if excluded:
        _log.warning("%s is ignored: it applies only when %s is '*'", exclude_source, include_source)
    return OwnerGroups(except_=False, values=included)


def parse_mark(source: str, s: str) -> int:
    """A packet mark, 1..2^32-1, in decimal (0 would be "no mark")."""
    mark = _decimal(s.strip())
    if mark is None or not 1 <= mark <= _MAX_U32:
        raise ConfigError(source, s, f"expected a mark from 1 to {_MAX_U32}")
    return mark


def parse_route_table(source: str, s: str) -> int:
    """A policy-routing table id, 1..2^32-1 except the kernel's 253, 254 and 255."""
    table = _decimal(s.strip())
    if table is None or not 1 <= table <= _MAX_U32:
        raise ConfigError(source, s, f"expected a routing table number from 1 to {_MAX_U32}")
    if table in _RESERVED_TABLES:
        raise ConfigError(source, s, "tables 253, 254 and 255 are reserved (default, main, local)")
    return table


def parse_duration(source: str, s: str) -> float:
    """A Go duration ("5s", "1m30s", "250ms", "0") as seconds; negative values are refused."""
    v = s.strip()
    if v == "0":
        return 0.0
    rest = v[1:] if v[:1] == "+" else v
    total = 0.0
    pos = 0
    while pos < len(rest):
        # One ``[0-9]*(\.[0-9]*)?`` number, then one unit.
        start = pos
        while pos < len(rest) and "0" <= rest[pos] <= "9":
            pos += 1
        if pos < len(rest) and rest[pos] == ".":
            pos += 1
            while pos < len(rest) and "0" <= rest[pos] <= "9":
                pos += 1
        number = rest[start:pos]
        unit = next((u for u in _DURATION_UNIT_ORDER if rest.startswith(u, pos)), None)
        if unit is None or number in ("", "."):
            raise ConfigError(source, s, "expected a duration such as 5s, 1m30s or 500ms")
        total += float(number) * _DURATION_UNITS[unit]
        pos += len(unit)
    if not rest:
        raise ConfigError(source, s, "expected a duration such as 5s, 1m30s or 500ms")
    if total > _DURATION_MAX:
        raise ConfigError(source, s, f"duration out of range (at most {_DURATION_MAX_TEXT})")
    return total


def parse_dns_servers(
    source: str, s: str
) -> tuple[tuple[ipaddress.IPv4Address, ...], tuple[ipaddress.IPv6Address, ...]]:
    """A comma-separated list of IPv4 and IPv6 addresses, split by family (order kept)."""
    items = split_list(s)
    if not items:
        return (), ()
    import ipaddress

    v4: list[ipaddress.IPv4Address] = []
    v6: list[ipaddress.IPv6Address] = []
    for item in items:
        if "%" in item:
            raise ConfigError(source, s, f"{shown(item)}: a zone is not allowed in a DNS server address")
        try:
            ip = ipaddress.ip_address(item)
        except ValueError:
            raise ConfigError(source, s, f"{shown(item)} is not an IP address") from None
        if isinstance(ip, ipaddress.IPv4Address):
            v4.append(ip)
        else:
            v6.append(ip)
    return tuple(v4), tuple(v6)


def parse_iptables_binary(source: str, s: str) -> str | None:
    """Istio's --force-iptables-binary: empty (detect), ``legacy`` or ``nft``.

    The binary names ``iptables-legacy`` and ``iptables-nft`` are accepted too, since that is how
    operators usually name the variants.
    """
    v = s.strip()
    if v == "":
        return None
    v = v.removeprefix("iptables-")
    if v in ("legacy", "nft"):
        return v
    raise ConfigError(source, s, "expected legacy or nft (or iptables-legacy, iptables-nft)")
