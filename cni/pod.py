"""What the plugin learns from the Pod: whether Istio's sidecar mode would capture its traffic,
and if so the capture Config, built from its annotations and its istio-proxy container as
Istio's CNI plugin builds it.

Annotation values are untrusted: each one goes through the same validating parsers as the
``istio-iptables`` flags, and a bad one raises ConfigError naming the annotation and the value.
"""

from __future__ import annotations

from istio_iptables.startup import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    import ipaddress
    from collections.abc import Iterable, Mapping
    from typing import Any

    from istio_iptables.config import Config

ISTIO_INIT = "istio-init"
ISTIO_PROXY = "istio-proxy"

ANN_INJECT = "sidecar.istio.io/inject"
LABEL_INJECT = "sidecar.istio.io/inject"
ANN_STATUS = "sidecar.istio.io/status"
ANN_INTERCEPTION_MODE = "sidecar.istio.io/interceptionMode"
ANN_INCLUDE_OUTBOUND_IP_RANGES = "traffic.sidecar.istio.io/includeOutboundIPRanges"
ANN_EXCLUDE_OUTBOUND_IP_RANGES = "traffic.sidecar.istio.io/excludeOutboundIPRanges"
ANN_INCLUDE_INBOUND_PORTS = "traffic.sidecar.istio.io/includeInboundPorts"
ANN_EXCLUDE_INBOUND_PORTS = "traffic.sidecar.istio.io/excludeInboundPorts"
ANN_INCLUDE_OUTBOUND_PORTS = "traffic.sidecar.istio.io/includeOutboundPorts"
ANN_EXCLUDE_OUTBOUND_PORTS = "traffic.sidecar.istio.io/excludeOutboundPorts"
ANN_EXCLUDE_INTERFACES = "traffic.sidecar.istio.io/excludeInterfaces"
ANN_KUBEVIRT_INTERFACES = "traffic.sidecar.istio.io/kubevirtInterfaces"  # deprecated name
ANN_REROUTE_VIRTUAL_INTERFACES = "istio.io/reroute-virtual-interfaces"
ANN_STATUS_PORT = "status.sidecar.istio.io/port"

# Istio's CNI defaults for absent annotations.
DEFAULT_STATUS_PORT = 15020
# Always excluded from inbound capture: the proxy's status port, Envoy's health check port and
# its Prometheus port ("to sync with the non-CNI injection template", in Istio's words).
ALWAYS_EXCLUDED_INBOUND = (15020, 15021, 15090)
DEFAULT_UID = "1337"
DEFAULT_GID = "1337"

ENV_DISABLE_ENVOY = "DISABLE_ENVOY"
ENV_DNS_CAPTURE = "ISTIO_META_DNS_CAPTURE"
ENV_DUAL_STACK = "ISTIO_DUAL_STACK"
ENV_INVALID_DROP = "INVALID_DROP"

_GO_TRUE = frozenset({"1", "t", "T", "TRUE", "true", "True"})
_GO_FALSE = frozenset({"0", "f", "F", "FALSE", "false", "False"})


class PodError(ValueError):
    """The API returned something that is not a usable Pod."""


def go_bool(s: str) -> bool | None:
    """Go's strconv.ParseBool (no trimming): True, False, or None when it would fail."""
    if s in _GO_TRUE:
        return True
    if s in _GO_FALSE:
        return False
    return None


class PodInfo(NamedTuple):
    """The few facts about a Pod that Istio's sidecar-mode CNI plugin looks at."""

    namespace: str
    name: str
    containers: frozenset[str]  # init containers and containers: the sidecar may be a native one
    labels: Mapping[str, str] = {}
    annotations: Mapping[str, str] = {}
    proxy_env: Mapping[str, str] = {}
    proxy_type: str = ""
    proxy_uid: int | None = None
    proxy_gid: int | None = None


def _str_map(value: Any, what: str) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise PodError(f"{what} is not a map of strings")
    return value


def _opt_int(value: Any, what: str) -> int | None:
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool):
        raise PodError(f"{what} is not an integer")
    return value


def pod_info(pod: Mapping[str, Any]) -> PodInfo:
    """Reads a Pod object as the API server returns it (apiVersion v1, kind Pod)."""
    meta = pod.get("metadata")
    spec = pod.get("spec")
    if not isinstance(meta, dict) or not isinstance(spec, dict):
        raise PodError("the Pod has no metadata or spec")
    names: set[str] = set()
    env: dict[str, str] = {}
    proxy_type = ""
    uid = gid = None
    for kind in ("initContainers", "containers"):
        containers = spec.get(kind) or []
        if not isinstance(containers, list):
            raise PodError(f"spec.{kind} is not a list")
        for c in containers:
            if not isinstance(c, dict) or not isinstance(c.get("name"), str):
                raise PodError(f"spec.{kind} holds a container without a name")
            names.add(c["name"])
            if c["name"] != ISTIO_PROXY:
                continue
            for e in c.get("env") or []:
                if not isinstance(e, dict) or not isinstance(e.get("name"), str):
                    raise PodError("istio-proxy has a malformed env entry")
                # As Istio: only literal values count; valueFrom reads as empty.
                value = e.get("value", "")
                env[e["name"]] = value if isinstance(value, str) else ""
            args = c.get("args") or []
            if isinstance(args, list) and len(args) >= 2 and args[0] == "proxy" and isinstance(args[1], str):
                proxy_type = args[1]
            sc = c.get("securityContext")
            if isinstance(sc, dict):
                uid = _opt_int(sc.get("runAsUser"), "istio-proxy securityContext.runAsUser")
                gid = _opt_int(sc.get("runAsGroup"), "istio-proxy securityContext.runAsGroup")
    return PodInfo(
        namespace=str(meta.get("namespace", "")),
        name=str(meta.get("name", "")),
        containers=frozenset(names),
        labels=_str_map(meta.get("labels"), "metadata.labels"),
        annotations=_str_map(meta.get("annotations"), "metadata.annotations"),
        proxy_env=env,
        proxy_type=proxy_type,
        proxy_uid=uid,
        proxy_gid=gid,
    )


def skip_reason(pi: PodInfo) -> str | None:
    """Why Istio's sidecar mode leaves this pod alone (None: it is captured). Istio's order."""
    if ISTIO_INIT in pi.containers:
        return "excluded due to being already injected with istio-init container"
    if go_bool(pi.proxy_env.get(ENV_DISABLE_ENVOY, "")) is True:
        return "excluded due to DISABLE_ENVOY on istio-proxy"
    if ISTIO_PROXY not in pi.containers:
        return f"excluded because it does not have istio-proxy container (have {sorted(pi.containers)})"
    if pi.proxy_type not in ("", "sidecar"):
        return f"excluded because it has proxy type {pi.proxy_type}"
    inject = pi.labels[LABEL_INJECT] if LABEL_INJECT in pi.labels else pi.annotations.get(ANN_INJECT, "")
    if inject and go_bool(inject) is False:
        return "excluded due to inject-disabled annotation"
    if ANN_STATUS not in pi.annotations:
        return "excluded due to not containing sidecar annotation"
    return None


def ipv6_enabled(
    addresses: Iterable[ipaddress.IPv4Address | ipaddress.IPv6Address], dual_stack: bool
) -> bool:
    """Istio's rule from the pod's own addresses (loopback and link-local ignored): without dual
    stack its first address decides, and the kernel lists IPv4 addresses before IPv6 ones, so
    IPv6 rules only for an IPv6-only pod; with dual stack, any IPv6 address."""
    import ipaddress

    usable = []
    for a in addresses:
        if isinstance(a, ipaddress.IPv6Address) and a.ipv4_mapped is not None:
            a = a.ipv4_mapped
        if a.is_loopback or a.is_link_local or a.is_multicast:
            continue
        usable.append(a)
    has6 = any(a.version == 6 for a in usable)
    if dual_stack:
        return has6
    return has6 and not any(a.version == 4 for a in usable)


class Capture(NamedTuple):
    """The Config for a pod, plus what was decided on the way (for the log)."""

    config: Config
    notes: tuple[str, ...] = ()


def _dedup(ports: Iterable[int]) -> tuple[int, ...]:
    return tuple(dict.fromkeys(ports))


def _env_bool(pi: PodInfo, name: str, notes: list[str]) -> bool:
    if name not in pi.proxy_env:
        return False
    v = go_bool(pi.proxy_env[name])
    if v is None:
        notes.append(f"cannot parse {name}={pi.proxy_env[name]!r} on istio-proxy, using false")
        return False
    return v


def build_config(
    pi: PodInfo, addresses: Iterable[ipaddress.IPv4Address | ipaddress.IPv6Address] = ()
) -> Capture:
    """The capture Config Istio's CNI plugin would hand to istio-iptables for this pod.

    Raises ConfigError (naming the annotation and its value) for any invalid annotation.
    """
    # Imported here: the Config machinery is only needed for pods that are captured.
    from istio_iptables.config import (
        Config,
        ConfigError,
        parse_cidr_list,
        parse_cidr_spec,
        parse_interface_list,
        parse_mode,
        parse_port,
        parse_port_list,
        parse_port_spec,
    )

    ann = pi.annotations
    notes: list[str] = []

    mode_text = ann.get(ANN_INTERCEPTION_MODE, "REDIRECT")
    if not mode_text.strip():
        raise ConfigError(ANN_INTERCEPTION_MODE, mode_text, "expected REDIRECT or TPROXY")
    mode = parse_mode(ANN_INTERCEPTION_MODE, mode_text)

    include_cidrs = parse_cidr_spec(
        ANN_INCLUDE_OUTBOUND_IP_RANGES, ann.get(ANN_INCLUDE_OUTBOUND_IP_RANGES, "*")
    )
    exclude_cidrs = parse_cidr_list(
        ANN_EXCLUDE_OUTBOUND_IP_RANGES, ann.get(ANN_EXCLUDE_OUTBOUND_IP_RANGES, "")
    )
    include_inbound = parse_port_spec(ANN_INCLUDE_INBOUND_PORTS, ann.get(ANN_INCLUDE_INBOUND_PORTS, "*"))
    exclude_inbound = list(
        parse_port_list(
            ANN_EXCLUDE_INBOUND_PORTS, ann.get(ANN_EXCLUDE_INBOUND_PORTS, str(DEFAULT_STATUS_PORT))
        )
    )
    # Istio's injector folds the status port into excludeInboundPorts; do the same when only the
    # status-port annotation says it (0 means the status server is off).
    if ANN_STATUS_PORT in ann and ann[ANN_STATUS_PORT].strip() != "0":
        exclude_inbound.append(parse_port(ANN_STATUS_PORT, ann[ANN_STATUS_PORT]))
    exclude_inbound.extend(ALWAYS_EXCLUDED_INBOUND)
    include_outbound = parse_port_list(ANN_INCLUDE_OUTBOUND_PORTS, ann.get(ANN_INCLUDE_OUTBOUND_PORTS, ""))
    exclude_outbound = parse_port_list(
        ANN_EXCLUDE_OUTBOUND_PORTS, ann.get(ANN_EXCLUDE_OUTBOUND_PORTS, str(DEFAULT_STATUS_PORT))
    )
    exclude_ifaces = parse_interface_list(ANN_EXCLUDE_INTERFACES, ann.get(ANN_EXCLUDE_INTERFACES, ""))
    # reroute-virtual-interfaces replaces the deprecated kubevirtInterfaces when both are set.
    # Istio once passed these through unvalidated (istio#58836); here they are interface names.
    if ANN_REROUTE_VIRTUAL_INTERFACES in ann:
        virt = parse_interface_list(ANN_REROUTE_VIRTUAL_INTERFACES, ann[ANN_REROUTE_VIRTUAL_INTERFACES])
    else:
        virt = parse_interface_list(ANN_KUBEVIRT_INTERFACES, ann.get(ANN_KUBEVIRT_INTERFACES, ""))

    uid = str(pi.proxy_uid) if pi.proxy_uid else DEFAULT_UID
    gid = str(pi.proxy_gid) if pi.proxy_gid else DEFAULT_GID
    for what, value in (("runAsUser", pi.proxy_uid), ("runAsGroup", pi.proxy_gid)):
        if value is not None and not 0 <= value <= 2**32 - 2:
            raise ConfigError(f"istio-proxy securityContext.{what}", str(value), "not a valid id")

    dns = _env_bool(pi, ENV_DNS_CAPTURE, notes)
    dual_stack = _env_bool(pi, ENV_DUAL_STACK, notes)
    drop_invalid = _env_bool(pi, ENV_INVALID_DROP, notes)

    config = Config(
        proxy_uids=(uid,),
        proxy_gids=(gid,),
        interception_mode=mode,
        inbound_ports=include_inbound,
        inbound_ports_exclude=_dedup(exclude_inbound),
        exclude_interfaces=exclude_ifaces,
        outbound_ip_ranges_include=include_cidrs,
        outbound_ip_ranges_exclude=exclude_cidrs,
        outbound_ports_include=include_outbound,
        outbound_ports_exclude=exclude_outbound,
        kube_virt_interfaces=virt,
        # The CNI plugin captures DNS to any server: it cannot read the pod's resolv.conf.
        redirect_dns=dns,
        capture_all_dns=dns,
        drop_invalid=drop_invalid,
        enable_ipv6=ipv6_enabled(addresses, dual_stack),
    )
    return Capture(config, tuple(notes))
