"""The CNI protocol, independent of what the plugin does: the environment and stdin a runtime
passes, version negotiation, result conversion between spec versions, and the error object.

This module is on every ``istio-cni`` start, so it imports only ``json`` at module level (besides
``os``, loaded with the interpreter, and ``istio_iptables.logsink``, which needs nothing more than
``istio_iptables.startup``): no ``typing`` (NamedTuple classes come from
``istio_iptables.startup``), no ``dataclasses`` (it pulls in ``inspect``), and ``ipaddress`` only
where an address is read.
"""

from __future__ import annotations

import json
import os

from istio_iptables.logsink import shown
from istio_iptables.startup import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    import ipaddress
    from collections.abc import Mapping
    from typing import Any

SUPPORTED_VERSIONS = ("0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0")
LATEST_VERSION = SUPPORTED_VERSIONS[-1]
# What a configuration without ``cniVersion`` means (libcni's decoder says the same).
IMPLICIT_VERSION = "0.1.0"

# Well-known error codes (SPEC.md, "Error codes").
ERR_INCOMPATIBLE_VERSION = 1
ERR_UNSUPPORTED_FIELD = 2
ERR_UNKNOWN_CONTAINER = 3
ERR_INVALID_ENVIRONMENT = 4
ERR_IO_FAILURE = 5
ERR_DECODING_FAILURE = 6
ERR_INVALID_NETWORK_CONFIG = 7
ERR_INVALID_NETNS = 8
ERR_TRY_AGAIN_LATER = 11
ERR_PLUGIN_NOT_AVAILABLE = 50
ERR_LIMITED_CONNECTIVITY = 51
ERR_INTERNAL = 999

COMMANDS = ("ADD", "DEL", "CHECK", "VERSION", "STATUS", "GC")

# Environment variables each command requires (as containernetworking/cni's skel requires them).
_REQUIRED_ENV: dict[str, tuple[str, ...]] = {
    "ADD": ("CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_PATH"),
    "CHECK": ("CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_PATH"),
    "DEL": ("CNI_CONTAINERID", "CNI_IFNAME", "CNI_PATH"),
    "GC": ("CNI_PATH",),
    "STATUS": ("CNI_PATH",),
    "VERSION": (),
}

# Lowest spec version that defines each command.
_MIN_VERSION = {"CHECK": "0.4.0", "GC": "1.1.0", "STATUS": "1.1.0"}

# ``[a-zA-Z0-9][a-zA-Z0-9_.\-]*``: container IDs and network names (skel's regular expression).
_ID_FIRST = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789")
_ID_CHARS = _ID_FIRST | frozenset("_.-")


def _valid_id(s: str) -> bool:
    return bool(s) and s[0] in _ID_FIRST and all(c in _ID_CHARS for c in s)


def _is_text(s: str) -> bool:
    """False when ``s`` holds a surrogate: os.environ's stand-in for a byte that is not UTF-8, or
    an unpaired ``\\ud800``-style escape in JSON."""
    if s.isascii():
        return True
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


class CniError(Exception):
    """A failure reported to the runtime as the CNI error object."""

    def __init__(self, code: int, msg: str, details: str = "") -> None:
        super().__init__(f"{msg}: {details}" if details else msg)
        self.code = code
        self.msg = msg
        self.details = details

    def to_json(self, cni_version: str) -> dict[str, Any]:
        out: dict[str, Any] = {"cniVersion": cni_version, "code": self.code, "msg": self.msg}
        if self.details:
            out["details"] = self.details
        return out


class Invocation(NamedTuple):
    """One plugin call: the CNI_* environment and the raw network configuration."""

    command: str
    container_id: str = ""
    netns: str = ""
    ifname: str = ""
    args: str = ""
    path: str = ""
    stdin: bytes = b""


def read_environment(environ: Mapping[str, str]) -> Invocation:
    """The command and its CNI_* variables, checked as the reference skeleton checks them.

    Raises CniError 4 for a missing or invalid variable or an unknown command. Stdin is read by
    the caller (never for VERSION, so a plugin run by hand does not wait on a terminal).
    """
    command = environ.get("CNI_COMMAND", "")
    if not command:
        raise CniError(ERR_INVALID_ENVIRONMENT, "required env variables [CNI_COMMAND] missing")
    if command not in COMMANDS:
        raise CniError(ERR_INVALID_ENVIRONMENT, f"unknown CNI_COMMAND: {command}")
    missing = [name for name in _REQUIRED_ENV[command] if not environ.get(name)]
    if missing:
        raise CniError(ERR_INVALID_ENVIRONMENT, f"required env variables [{','.join(missing)}] missing")
    for name in _PASSED_ON:
        _check_os_text(name, environ.get(name, ""))
    inv = Invocation(
        command=command,
        container_id=environ.get("CNI_CONTAINERID", ""),
        netns=environ.get("CNI_NETNS", ""),
        ifname=environ.get("CNI_IFNAME", ""),
        args=environ.get("CNI_ARGS", ""),
        path=environ.get("CNI_PATH", ""),
    )
    if command in ("ADD", "CHECK", "DEL"):
        validate_container_id(inv.container_id)
        validate_ifname(inv.ifname)
    return inv


# The variables whose values end up in paths, messages and log lines.
_PASSED_ON = ("CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_ARGS", "CNI_PATH")


def _check_os_text(name: str, value: str) -> None:
    """A process environment holds no NUL, and os.environ holds no surrogate that os.fsencode
    cannot turn back into the bytes it came from; a caller's mapping might (run() is also called
    in-process), and os.stat() or open() would then fail with a ValueError, not an OSError."""
    if "\0" in value:
        raise CniError(ERR_INVALID_ENVIRONMENT, f"invalid {name}", "contains a NUL character")
    if not value.isascii():
        try:
            os.fsencode(value)
        except UnicodeEncodeError:
            why = f"holds a character no environment variable can carry: {shown(value)}"
            raise CniError(ERR_INVALID_ENVIRONMENT, f"invalid {name}", why) from None


def validate_container_id(cid: str) -> None:
    if not _valid_id(cid):
        raise CniError(ERR_INVALID_ENVIRONMENT, "invalid characters in containerID", cid)


def validate_ifname(name: str) -> None:
    """Linux interface name rules, as the spec states them for CNI_IFNAME."""
    if not name:
        raise CniError(ERR_INVALID_ENVIRONMENT, "interface name is empty")
    if len(name) > 15:
        raise CniError(
            ERR_INVALID_ENVIRONMENT,
            "interface name is too long",
            "interface name should be less than 16 characters",
        )
    if name in (".", ".."):
        raise CniError(ERR_INVALID_ENVIRONMENT, "interface name is . or ..")
    if any(c == "/" or c == ":" or c.isspace() for c in name):
        raise CniError(ERR_INVALID_ENVIRONMENT, "interface name contains / or : or whitespace characters")


# A network configuration is a few levels deep (prevResult's interfaces are at the fourth). The
# decoder's own limit is Python's recursion limit, which is not a fixed depth: near it the
# document decodes but the first repr() of a value in an error message recurses too deep. Below
# this depth every later step is safe.
MAX_DEPTH = 64


def _undecodable(conf: Any) -> str | None:
    """Why a decoded document cannot be used (None: it can): nested deeper than MAX_DEPTH, or a
    string (or key) holding an unpaired UTF-16 surrogate (from an escape such as ``\\ud800``),
    which is not text: no log file and no path given to the OS could hold it. Walked without
    recursion."""
    todo: list[tuple[Any, int]] = [(conf, 1)]
    while todo:
        value, depth = todo.pop()
        if isinstance(value, str):
            if not _is_text(value):
                return f"a string holds an unpaired surrogate: {shown(value)}"
            continue
        if isinstance(value, dict):
            items: list[Any] = [*value, *value.values()]
        elif isinstance(value, list):
            items = value
        else:
            continue
        if depth > MAX_DEPTH:
            return f"nested deeper than {MAX_DEPTH} levels"
        todo.extend((item, depth + 1) for item in items)
    return None


def parse_netconf(data: bytes) -> dict[str, Any]:
    """The network configuration from stdin: a JSON object with a valid ``name``."""
    try:
        conf = json.loads(data)
    except ValueError as e:
        # JSONDecodeError, UnicodeDecodeError, and a number of more digits than int() converts.
        raise CniError(ERR_DECODING_FAILURE, "error unmarshalling network config", str(e)) from None
    except RecursionError:
        deep = f"nested deeper than {MAX_DEPTH} levels"
        raise CniError(ERR_DECODING_FAILURE, "error unmarshalling network config", deep) from None
    if not isinstance(conf, dict):
        raise CniError(ERR_DECODING_FAILURE, "error unmarshalling network config", "not a JSON object")
    why = _undecodable(conf)
    if why is not None:
        raise CniError(ERR_DECODING_FAILURE, "error unmarshalling network config", why)
    name = conf.get("name")
    if not name:
        raise CniError(ERR_INVALID_NETWORK_CONFIG, "missing network name")
    if not isinstance(name, str) or not _valid_id(name):
        raise CniError(ERR_INVALID_NETWORK_CONFIG, "invalid characters found in network name", str(name))
    return conf


def config_version(conf: Mapping[str, Any]) -> str:
    """The spec version the configuration asks for (``0.1.0`` when it names none)."""
    v = conf.get("cniVersion", "")
    if not isinstance(v, str):
        raise CniError(ERR_DECODING_FAILURE, "cniVersion is not a string", repr(v))
    return v or IMPLICIT_VERSION


# Versions are only compared with the few of _MIN_VERSION, so a component is capped here rather
# than converted: int() refuses more than 4300 digits with a ValueError of its own.
_COMPONENT_DIGITS = 9


def _version_component(p: str) -> int:
    significant = p.lstrip("0")
    if len(significant) > _COMPONENT_DIGITS:
        return 10**_COMPONENT_DIGITS
    return int(significant) if significant else 0


def _version_tuple(v: str) -> tuple[int, int, int]:
    parts = v.split(".")
    # As libcni's pattern (\d+)\.(\d+)\.(\d+) would (Go's \d): ASCII digits only, no signs or spaces.
    if len(parts) != 3 or not all(p.isascii() and p.isdigit() for p in parts):
        raise CniError(ERR_DECODING_FAILURE, f"invalid version {shown(v)}: expected MAJOR.MINOR.PATCH")
    major, minor, patch = (_version_component(p) for p in parts)
    return major, minor, patch


def check_version(command: str, version: str) -> None:
    """Raises CniError 1 unless this plugin speaks ``version`` and the version defines ``command``."""
    minimum = _MIN_VERSION.get(command)
    if minimum is not None and _version_tuple(version) < _version_tuple(minimum):
        raise CniError(
            ERR_INCOMPATIBLE_VERSION,
            f"config version does not allow {command}",
            f"config is {shown(version)}",
        )
    if version not in SUPPORTED_VERSIONS:
        raise CniError(
            ERR_INCOMPATIBLE_VERSION,
            "incompatible CNI versions",
            f"config is {shown(version)}, plugin supports {list(SUPPORTED_VERSIONS)}",
        )


def version_info() -> dict[str, Any]:
    """The VERSION answer."""
    return {"cniVersion": LATEST_VERSION, "supportedVersions": list(SUPPORTED_VERSIONS)}


# --- CNI_ARGS ------------------------------------------------------------------------------


def parse_cni_args(raw: str, known: frozenset[str]) -> dict[str, str]:
    """``K=V;K=V`` pairs, with libcni's rules: a malformed pair is an error; keys outside ``known``
    are an error unless ``IgnoreUnknown`` is true. A repeated key keeps its last value."""
    if not raw:
        return {}
    out: dict[str, str] = {}
    unknown: list[str] = []
    ignore_unknown = False
    for pair in raw.split(";"):
        kv = pair.split("=")
        if len(kv) != 2:
            raise CniError(ERR_INVALID_ENVIRONMENT, "invalid CNI_ARGS", f"ARGS: invalid pair {pair!r}")
        key, value = kv
        if key == "IgnoreUnknown":
            low = value.lower()
            if low in ("1", "true"):
                ignore_unknown = True
            elif low in ("0", "false"):
                ignore_unknown = False
            else:
                raise CniError(
                    ERR_INVALID_ENVIRONMENT, "invalid CNI_ARGS", f"IgnoreUnknown: invalid boolean {value!r}"
                )
        elif key in known:
            if not _is_text(value):
                # Bytes that are not UTF-8 (os.environ keeps them as surrogates): no Kubernetes name
                # is made of them, and they could not be put in an API request.
                why = f"{key}: not UTF-8: {shown(value)}"
                raise CniError(ERR_INVALID_ENVIRONMENT, "invalid CNI_ARGS", why)
            out[key] = value
        else:
            unknown.append(pair)
    if unknown and not ignore_unknown:
        raise CniError(ERR_INVALID_ENVIRONMENT, "invalid CNI_ARGS", f"ARGS: unknown args {unknown}")
    return out


# --- Results -------------------------------------------------------------------------------

_ROUTE_KEYS_V1_1 = ("mtu", "advmss", "priority", "table", "scope")
_DNS_KEYS = ("nameservers", "domain", "search", "options")


def _bad_result(why: str) -> CniError:
    return CniError(ERR_DECODING_FAILURE, "could not parse prevResult", why)


def _obj(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _bad_result(f"{what} is not an object")
    return value


def _list(value: Any, what: str) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise _bad_result(f"{what} is not a list")
    return value


def _str(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise _bad_result(f"{what} is not a string")
    return value


def _int(value: Any, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise _bad_result(f"{what} is not an integer")
    return value


def _copy(src: dict[str, Any], dst: dict[str, Any], keys: tuple[str, ...], kind: type, what: str) -> None:
    for k in keys:
        v = src.get(k)
        if v is not None and v != "":
            if kind is int:
                _int(v, f"{what}.{k}")
            elif not isinstance(v, kind):
                raise _bad_result(f"{what}.{k} has the wrong type")
            dst[k] = v


class Result(NamedTuple):
    """A CNI result in a version-neutral form (the fields of spec 1.1.0)."""

    interfaces: tuple[dict[str, Any], ...] = ()
    ips: tuple[dict[str, Any], ...] = ()
    routes: tuple[dict[str, Any], ...] = ()
    dns: dict[str, Any] | None = None

    def addresses(self) -> list[ipaddress.IPv4Interface | ipaddress.IPv6Interface]:
        import ipaddress

        return [ipaddress.ip_interface(ip["address"]) for ip in self.ips]


def parse_result(raw: Any) -> Result:
    """A prevResult of any supported version (0.3.x and 0.4.0 carry ``version`` in each ip)."""
    import ipaddress

    obj = _obj(raw, "prevResult")
    interfaces = []
    for i, it in enumerate(_list(obj.get("interfaces"), "interfaces")):
        it = _obj(it, f"interfaces[{i}]")
        out: dict[str, Any] = {"name": _str(it.get("name", ""), f"interfaces[{i}].name")}
        _copy(it, out, ("mac", "sandbox", "socketPath", "pciID"), str, f"interfaces[{i}]")
        _copy(it, out, ("mtu",), int, f"interfaces[{i}]")
        interfaces.append(out)
    ips = []
    for i, ip in enumerate(_list(obj.get("ips"), "ips")):
        ip = _obj(ip, f"ips[{i}]")
        addr = _str(ip.get("address"), f"ips[{i}].address")
        try:
            iface = ipaddress.ip_interface(addr)
        except ValueError:
            raise _bad_result(f"ips[{i}].address {addr!r} is not an address with a prefix length") from None
        if "/" not in addr:
            raise _bad_result(f"ips[{i}].address {addr!r} has no prefix length")
        version = ip.get("version")
        if version not in (None, "4", "6"):
            raise _bad_result(f'ips[{i}].version {version!r} is not "4" or "6"')
        out = {"address": addr}
        if ip.get("interface") is not None:
            idx = _int(ip["interface"], f"ips[{i}].interface")
            if idx < 0:
                raise _bad_result(f"ips[{i}].interface is negative")
            out["interface"] = idx
        if ip.get("gateway"):
            gw = _str(ip["gateway"], f"ips[{i}].gateway")
            try:
                gwa = ipaddress.ip_address(gw)
            except ValueError:
                raise _bad_result(f"ips[{i}].gateway {gw!r} is not an address") from None
            if gwa.version != iface.version:
                raise _bad_result(f"ips[{i}].gateway {gw!r} is not of the address's family")
            out["gateway"] = gw
        ips.append(out)
    routes = []
    for i, rt in enumerate(_list(obj.get("routes"), "routes")):
        rt = _obj(rt, f"routes[{i}]")
        dst = _str(rt.get("dst"), f"routes[{i}].dst")
        try:
            ipaddress.ip_network(dst, strict=False)
        except ValueError:
            raise _bad_result(f"routes[{i}].dst {dst!r} is not a CIDR") from None
        out = {"dst": dst}
        if rt.get("gw"):
            gw = _str(rt["gw"], f"routes[{i}].gw")
            try:
                ipaddress.ip_address(gw)
            except ValueError:
                raise _bad_result(f"routes[{i}].gw {gw!r} is not an address") from None
            out["gw"] = gw
        _copy(rt, out, _ROUTE_KEYS_V1_1, int, f"routes[{i}]")
        routes.append(out)
    dns: dict[str, Any] | None = None
    if obj.get("dns") is not None:
        d = _obj(obj["dns"], "dns")
        dns = {}
        for k in ("nameservers", "search", "options"):
            if d.get(k):
                items = _list(d[k], f"dns.{k}")
                dns[k] = [_str(x, f"dns.{k}[]") for x in items]
        if d.get("domain"):
            dns["domain"] = _str(d["domain"], "dns.domain")
    return Result(tuple(interfaces), tuple(ips), tuple(routes), dns)


def render_result(result: Result, version: str) -> dict[str, Any]:
    """The result as spec ``version`` defines it: 0.3.x/0.4.0 give each ip a ``version``; only 1.1.0
    carries the interface and route fields 1.1.0 added. Key order follows libcni's output."""
    legacy = version.startswith("0.")
    v11 = version == "1.1.0"
    out: dict[str, Any] = {"cniVersion": version}
    if result.interfaces:
        ifaces = []
        for it in result.interfaces:
            keys = (
                ("name", "mac", "mtu", "sandbox", "socketPath", "pciID")
                if v11
                else ("name", "mac", "sandbox")
            )
            ifaces.append({k: it[k] for k in keys if k in it})
        out["interfaces"] = ifaces
    if result.ips:
        ips = []
        for ip in result.ips:
            entry: dict[str, Any] = {}
            if legacy:
                import ipaddress

                entry["version"] = str(ipaddress.ip_interface(ip["address"]).version)
            entry.update({k: ip[k] for k in ("interface", "address", "gateway") if k in ip})
            ips.append(entry)
        out["ips"] = ips
    if result.routes:
        route_keys = ("dst", "gw", *_ROUTE_KEYS_V1_1) if v11 else ("dst", "gw")
        out["routes"] = [{k: rt[k] for k in route_keys if k in rt} for rt in result.routes]
    out["dns"] = {k: result.dns[k] for k in _DNS_KEYS if result.dns and k in result.dns}
    return out


def dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":")) + "\n"
