"""The options of istio-iptables and istio-clean-iptables, defined once (names, shorthands,
environment variables, defaults, help) and resolved into a Config and ApplyOptions by ``load``.

Precedence is Istio's: command line, then environment (a later variable in ``env`` wins, as
Istio's additional variables do), then the default. ``--help`` and the docs/options.md table are both
generated from ``OPTIONS``. No click here: the CNI plugin imports this package too.
"""

from __future__ import annotations

import os

from . import config as c
from .config import ApplyOptions, Config, ConfigError, OwnerGroups
from .environment import (
    DEFAULT_RESOLV_CONF,
    DetectionError,
    Machine,
    RealMachine,
    detect_ipv6,
    split_nameservers,
)
from .startup import TYPE_CHECKING, Enum, NamedTuple

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping
    from typing import Any

# The stdlib logging levels, by number (the commands log without importing ``logging``).
DEBUG, INFO, WARNING, ERROR, CRITICAL = 10, 20, 30, 40, 50

DEFAULT_ENVOY_USER = "istio-proxy"
DEFAULT_PROXY_UID = "1337"


class Kind(Enum):
    """What an option's text holds; ``metavar`` is how --help and docs/options.md show it."""

    PORT = "PORT"
    PORT_LIST = "PORTS"
    PORT_SPEC = "PORTS|*"
    GROUPS = "IDS|NAMES|*"
    CIDR_LIST = "CIDRS"
    CIDR_SPEC = "CIDRS|*"
    LOOPBACK_CIDR = "CIDR"
    INTERFACES = "IFACES"
    OWNERS = "IDS|NAMES"
    MODE = "REDIRECT|TPROXY"
    MARK = "MARK"
    TABLE = "TABLE"
    BOOL = "BOOL"
    DURATION = "DURATION"
    PATH = "PATH"
    NAME = "NAME"
    BINARY = "legacy|nft"
    ADDRESSES = "ADDRS"
    LOG_LEVELS = "LEVELS"
    TEXT = "TEXT"
    PACKET = "PACKET"
    EXPLAIN_FORMAT = "text|json"

    @property
    def metavar(self) -> str:
        return self.value


class OptionDef(NamedTuple):
    """One option: ``name`` is the long flag without dashes (None for an environment-only
    setting); ``env`` lists its variables, later ones winning; ``default`` is the text a missing
    option stands for ("" included); ``apply_only`` marks options that only matter when rules are
    applied (they change nothing in a --dry-run); ``ours`` marks additions to Istio's options."""

    name: str | None
    short: str | None
    env: tuple[str, ...]
    default: str
    kind: Kind
    help: str
    apply_only: bool = False
    ours: bool = False
    default_doc: str | None = None
    negation: str | None = None

    @property
    def key(self) -> str:
        """How ``load``'s ``values`` name this option: the long name, or the variable for env-only ones."""
        return self.name if self.name is not None else self.env[0]

    @property
    def flag(self) -> str:
        return f"--{self.name}" if self.name is not None else self.env[0]

    @property
    def shown_default(self) -> str:
        if self.default_doc is not None:
            return self.default_doc
        if self.kind is Kind.BOOL:
            return self.default or "false"
        return f'"{self.default}"' if self.default == "" else self.default


def _o(
    name: str | None,
    short: str | None,
    env: str | tuple[str, ...] | None,
    default: str,
    kind: Kind,
    help: str,
    **kw: Any,
) -> OptionDef:
    if env is None:
        envs: tuple[str, ...] = ()
    elif isinstance(env, str):
        envs = (env,)
    else:
        envs = env
    return OptionDef(name, short, envs, default, kind, help, **kw)


# Istio binds each flag to the variable named after it (upper case, '-' -> '_'), except
# --envoy-port; some have an additional older variable that wins over the first.
OPTIONS: tuple[OptionDef, ...] = (
    _o("envoy-port", "p", None, "15001", Kind.PORT,
       "Envoy port to which all outbound TCP traffic is redirected."),
    _o("inbound-capture-port", "z", "INBOUND_CAPTURE_PORT", "15006", Kind.PORT,
       "Port to which all inbound TCP traffic to the pod is redirected."),
    _o("inbound-tunnel-port", "e", "INBOUND_TUNNEL_PORT", "15008", Kind.PORT,
       "Istio tunnel port for inbound TCP traffic (never redirected)."),
    _o("proxy-uid", "u", "PROXY_UID", "", Kind.OWNERS,
       "Comma-separated uids (or user names) whose traffic is not redirected: the proxy's.",
       default_doc="uid of $ENVOY_USER, else 1337"),
    _o("proxy-gid", "g", "PROXY_GID", "", Kind.OWNERS,
       "Comma-separated gids (or group names) whose traffic is not redirected.",
       default_doc="same as --proxy-uid"),
    _o("istio-inbound-interception-mode", "m", "ISTIO_INBOUND_INTERCEPTION_MODE", "", Kind.MODE,
       'How inbound connections are redirected to Envoy: REDIRECT or TPROXY ("" means REDIRECT).'),
    _o("istio-inbound-ports", "b", "ISTIO_INBOUND_PORTS", "", Kind.PORT_SPEC,
       "Comma-separated inbound ports redirected to Envoy; '*' redirects every port; empty disables "
       "inbound capture."),
    _o("istio-local-exclude-ports", "d", "ISTIO_LOCAL_EXCLUDE_PORTS", "", Kind.PORT_LIST,
       "Comma-separated inbound ports excluded from redirection (only with --istio-inbound-ports '*')."),
    _o("istio-exclude-interfaces", "c", "ISTIO_EXCLUDE_INTERFACES", "", Kind.INTERFACES,
       "Comma-separated interfaces whose traffic (inbound and outbound) is never captured."),
    _o("istio-service-cidr", "i", "ISTIO_SERVICE_CIDR", "", Kind.CIDR_SPEC,
       "Comma-separated CIDR ranges (IPv4 and IPv6) whose outbound traffic is redirected to Envoy; "
       "'*' redirects all outbound traffic; empty disables outbound capture."),
    _o("istio-service-exclude-cidr", "x", "ISTIO_SERVICE_EXCLUDE_CIDR", "", Kind.CIDR_LIST,
       "Comma-separated CIDR ranges excluded from outbound redirection."),
    _o("istio-outbound-ports", "q", "ISTIO_OUTBOUND_PORTS", "", Kind.PORT_LIST,
       "Comma-separated outbound ports always redirected to Envoy."),
    _o("istio-local-outbound-ports-exclude", "o", "ISTIO_LOCAL_OUTBOUND_PORTS_EXCLUDE", "", Kind.PORT_LIST,
       "Comma-separated outbound ports never redirected to Envoy."),
    _o("kube-virt-interfaces", "k", "KUBE_VIRT_INTERFACES", "", Kind.INTERFACES,
       "Comma-separated virtual interfaces whose inbound traffic (from a VM) is treated as outbound."),
    _o("istio-inbound-tproxy-mark", "t", "ISTIO_INBOUND_TPROXY_MARK", "1337", Kind.MARK,
       "Packet mark used for TPROXY inbound capture."),
    _o("istio-inbound-tproxy-route-table", "r", "ISTIO_INBOUND_TPROXY_ROUTE_TABLE", "133", Kind.TABLE,
       "Routing table that delivers TPROXY-marked packets locally."),
    _o("dry-run", "n", "DRY_RUN", "false", Kind.BOOL,
       "Print the rules (iptables-restore documents) instead of applying them."),
    _o("iptables-probe-port", None, "IPTABLES_PROBE_PORT", "15002", Kind.PORT,
       "Port the validation probe listens on.", apply_only=True),
    _o("probe-timeout", None, "PROBE_TIMEOUT", "5s", Kind.DURATION,
       "Timeout of the validation probe.", apply_only=True),
    _o("skip-rule-apply", None, "SKIP_RULE_APPLY", "false", Kind.BOOL,
       "Do not apply any rule (with --run-validation: only validate).", apply_only=True),
    _o("run-validation", None, "RUN_VALIDATION", "false", Kind.BOOL,
       "Check that redirection works; exits 126 when it does not.", apply_only=True),
    _o("redirect-dns", None, ("REDIRECT_DNS", "ISTIO_META_DNS_CAPTURE"), "false", Kind.BOOL,
       "Capture DNS traffic to the agent (port 15053)."),
    _o("drop-invalid", None, ("DROP_INVALID", "INVALID_DROP"), "false", Kind.BOOL,
       "Drop packets conntrack considers INVALID instead of letting them reset connections."),
    _o("dual-stack", None, ("DUAL_STACK", "ISTIO_DUAL_STACK"), "false", Kind.BOOL,
       "Enable IPv4 and IPv6 redirection for dual-stack pods (IPv6 rules when any IPv6 address exists)."),
    _o("capture-all-dns", None, "CAPTURE_ALL_DNS", "false", Kind.BOOL,
       "With --redirect-dns, capture all DNS traffic on port 53, not only to the resolv.conf servers."),
    _o("network-namespace", None, "NETWORK_NAMESPACE", "", Kind.PATH,
       "Network namespace (path) the rules are applied in; also where IPv6 is detected.",
       apply_only=True),
    _o("cni-mode", None, "CNI_MODE", "false", Kind.BOOL,
       "Run as the CNI plugin does (pod-scoped iptables lock).", apply_only=True),
    _o("reconcile", None, "RECONCILE", "false", Kind.BOOL,
       "Replace existing, different Istio rules instead of failing.", apply_only=True),
    _o("cleanup-only", None, "CLEANUP_ONLY", "false", Kind.BOOL,
       "Remove Istio's rules and chains without creating new ones.", apply_only=True),
    _o("force-apply", None, "FORCE_APPLY", "false", Kind.BOOL,
       "Apply the rules even if they appear to be in place already.", apply_only=True),
    _o("native-nftables", None, "NATIVE_NFTABLES", "false", Kind.BOOL,
       "Write native nftables rules (inet tables istio-proxy-nat, -mangle, -raw) instead of iptables rules."),
    _o("force-iptables-binary", None, "FORCE_IPTABLES_BINARY", "", Kind.BINARY,
       "Use this iptables variant instead of detecting it: legacy or nft.", apply_only=True),
    # Additions: make a dry-run reproducible on any machine.
    _o("enable-ipv6", None, "ENABLE_INBOUND_IPV6", "", Kind.BOOL,
       "Write IPv6 rules (or not) instead of deciding from the pod's addresses.",
       ours=True, default_doc="detected", negation="no-enable-ipv6"),
    _o("dns-servers", None, "DNS_SERVERS", "", Kind.ADDRESSES,
       "Comma-separated DNS servers (IPv4 and IPv6) to capture with --redirect-dns; when given, even "
       "empty, resolv.conf is not read.", ours=True, default_doc="from resolv.conf"),
    _o("resolv-conf", None, None, DEFAULT_RESOLV_CONF, Kind.PATH,
       "File the DNS servers are read from.", ours=True),
    # Additions: explain where a packet goes (docs/explain.md); nothing is applied then.
    _o("explain", None, None, "", Kind.PACKET,
       "Print which rules this packet hits and its verdict instead of applying rules: 'out|in tcp|udp "
       "SRC:PORT -> DST:PORT [uid=N gid=N oif=NAME iif=NAME mark=N]' (see docs/explain.md).",
       ours=True, default_doc="none"),
    _o("live", None, None, "false", Kind.BOOL,
       "With --explain: walk the rules the namespace (--network-namespace) holds, not the planned ones.",
       ours=True),
    _o("explain-format", None, None, "text", Kind.EXPLAIN_FORMAT,
       "With --explain: print the walk as text or as one JSON document.", ours=True),
    # Istio's logging flags (the sidecar injector passes --log_output_level and --log_as_json).
    _o("log_output_level", None, None, "default:info", Kind.LOG_LEVELS,
       "Minimum level of log messages: [scope:]level,... with level debug, info, warn, error, "
       "fatal or none."),
    _o("log_as_json", None, None, "false", Kind.BOOL, "Write log messages as JSON."),
    _o("log_target", None, None, "stderr", Kind.TEXT,
       "Accepted for compatibility; log messages always go to stderr."),
    _o("log_caller", None, None, "", Kind.TEXT, "Accepted for compatibility; ignored."),
    _o("log_stacktrace_level", None, None, "default:none", Kind.LOG_LEVELS,
       "Accepted for compatibility; ignored."),
    # Environment-only settings (no flag in Istio either).
    _o(None, None, "ISTIO_OUTBOUND_OWNER_GROUPS", "*", Kind.GROUPS,
       "Comma-separated groups (gids or names) whose outbound traffic is redirected; '*' means all "
       "(at most 64 otherwise)."),
    _o(None, None, "ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE", "", Kind.OWNERS,
       "Comma-separated groups whose outbound traffic is not redirected (only when "
       "ISTIO_OUTBOUND_OWNER_GROUPS is '*')."),
    _o(None, None, "ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR", "127.0.0.1/32", Kind.LOOPBACK_CIDR,
       "IPv4 loopback range that identifies outbound traffic meant for the application (in "
       "127.0.0.0/8, prefix 8-32)."),
    _o(None, None, "ENVOY_USER", DEFAULT_ENVOY_USER, Kind.NAME,
       "User whose uid is the default --proxy-uid (1337 when there is no such user)."),
)  # fmt: skip

BY_KEY: dict[str, OptionDef] = {o.key: o for o in OPTIONS}
BY_SHORT: dict[str, OptionDef] = {o.short: o for o in OPTIONS if o.short}
FLAGS: tuple[OptionDef, ...] = tuple(o for o in OPTIONS if o.name is not None)
ENV_ONLY: tuple[OptionDef, ...] = tuple(o for o in OPTIONS if o.name is None)

_LOG_LEVELS = {
    "debug": DEBUG,
    "info": INFO,
    "warn": WARNING,
    "error": ERROR,
    "fatal": CRITICAL,
    "none": CRITICAL + 10,
}


def parse_log_levels(source: str, s: str) -> int:
    """Istio's ``--log_output_level``: ``[scope:]level,...``; the default (or ``all``) scope's
    level is the one we use, other scopes are accepted and ignored."""
    level = INFO
    for item in c.split_list(s):
        parts = item.split(":")
        if len(parts) > 2 or parts[-1] not in _LOG_LEVELS:
            levels = ", ".join(_LOG_LEVELS)
            raise ConfigError(source, s, f"{c.shown(item)}: expected [scope:]level, level one of {levels}")
        if len(parts) == 1 or parts[0] in ("default", "all"):
            level = _LOG_LEVELS[parts[-1]]
    return level


def _text(source: str, s: str) -> str:
    if "\0" in s:
        raise ConfigError(source, s, "contains a NUL character")
    return s


def _explain_format(source: str, s: str) -> str:
    if s.strip() not in ("text", "json"):
        raise ConfigError(source, s, "expected text or json")
    return s.strip()


_PARSERS: dict[Kind, Callable[[str, str], Any]] = {
    Kind.PORT: c.parse_port,
    Kind.PORT_LIST: c.parse_port_list,
    Kind.PORT_SPEC: c.parse_port_spec,
    Kind.CIDR_LIST: c.parse_cidr_list,
    Kind.CIDR_SPEC: c.parse_cidr_spec,
    Kind.LOOPBACK_CIDR: c.parse_ipv4_loopback_cidr,
    Kind.INTERFACES: c.parse_interface_list,
    Kind.OWNERS: c.parse_owner_list,
    Kind.GROUPS: lambda source, s: s,  # parsed with its exclude list by parse_owner_groups
    Kind.MODE: c.parse_mode,
    Kind.MARK: c.parse_mark,
    Kind.TABLE: c.parse_route_table,
    Kind.BOOL: c.parse_bool,
    Kind.DURATION: c.parse_duration,
    Kind.PATH: _text,
    Kind.NAME: _text,
    Kind.BINARY: c.parse_iptables_binary,
    Kind.ADDRESSES: c.parse_dns_servers,
    Kind.LOG_LEVELS: parse_log_levels,
    Kind.TEXT: _text,
    Kind.PACKET: _text,  # read by packet.parse_packet, only when --explain is given
    Kind.EXPLAIN_FORMAT: _explain_format,
}


class Raw(NamedTuple):
    """An option's text and where it came from (``explicit``: command line or environment)."""

    text: str
    source: str
    explicit: bool


def resolve(opt: OptionDef, values: Mapping[str, str], env: Mapping[str, str]) -> Raw:
    """Command line, then environment (later variables first), then the default."""
    if opt.key in values and opt.name is not None:
        return Raw(values[opt.key], opt.flag, True)
    for var in reversed(opt.env):
        if var in env:
            text = env[var]
            # Istio sets flags from the environment ignoring parse errors, so an empty boolean
            # variable leaves the flag as it was; the same here (other bad values are errors).
            if opt.kind is Kind.BOOL and text.strip() == "":
                continue
            return Raw(text, var, True)
    return Raw(opt.default, opt.flag, False)


class LogSettings(NamedTuple):
    level: int = INFO
    json: bool = False


def log_settings(values: Mapping[str, str], env: Mapping[str, str] | None = None) -> LogSettings:
    """The logging options, validated (the command line also goes through ``load``)."""
    env = {} if env is None else env
    level = resolve(BY_KEY["log_output_level"], values, env)
    as_json = resolve(BY_KEY["log_as_json"], values, env)
    return LogSettings(parse_log_levels(level.source, level.text), c.parse_bool(as_json.source, as_json.text))


def load(
    values: Mapping[str, str],
    env: Mapping[str, str] | None = None,
    machine: Machine | None = None,
) -> tuple[Config, ApplyOptions]:
    """Resolve and validate every option, then derive what the machine decides (proxy uid from
    ENVOY_USER, IPv6, DNS servers) unless an option already says it.

    ``values`` maps long option names (``"envoy-port"``) to their command-line text; ``env``
    defaults to os.environ. Raises ConfigError naming the first bad option or variable, or
    environment.DetectionError when the machine cannot answer.
    """
    env = os.environ if env is None else env
    unknown = sorted(set(values) - {o.name for o in FLAGS})
    if unknown:
        raise ValueError(f"unknown options: {', '.join(unknown)}")

    raw = {o.key: resolve(o, values, env) for o in OPTIONS}
    parsed: dict[str, Any] = {}
    for o in OPTIONS:
        r = raw[o.key]
        if o.kind is Kind.OWNERS and r.text.strip() == "" and o.key in ("proxy-uid", "proxy-gid"):
            parsed[o.key] = None  # derived below, as Istio does for an empty value
        elif o.kind is Kind.BOOL and not r.explicit and r.text == "":
            parsed[o.key] = None  # tri-state: decided below
        else:
            parsed[o.key] = _PARSERS[o.kind](r.source, r.text)
        if o.key in ("proxy-uid", "proxy-gid") and parsed[o.key] == ():
            raise ConfigError(r.source, r.text, "names no user or group")

    inc, exc = raw["ISTIO_OUTBOUND_OWNER_GROUPS"], raw["ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE"]
    owner_groups: OwnerGroups = c.parse_owner_groups(
        inc.text, exc.text, include_source=inc.source, exclude_source=exc.source
    )

    # Everything is valid: only now ask the machine. (--explain --live walks what a namespace
    # holds: nothing planned from the machine is used then.)
    live = raw["explain"].explicit and parsed["live"]
    machine = RealMachine() if machine is None else machine
    proxy_uids: tuple[str, ...] = parsed["proxy-uid"] or ()
    if not proxy_uids:
        user = raw["ENVOY_USER"].text
        proxy_uids = (machine.user_uid(user) or DEFAULT_PROXY_UID,)
    proxy_gids: tuple[str, ...] = parsed["proxy-gid"] or proxy_uids

    netns = parsed["network-namespace"] or None
    enable_ipv6: bool | None = parsed["enable-ipv6"]
    if enable_ipv6 is None:
        enable_ipv6 = False if live else detect_ipv6(machine.local_addresses(netns), parsed["dual-stack"])

    redirect_dns: bool = parsed["redirect-dns"]
    capture_all_dns: bool = parsed["capture-all-dns"]
    dns_v4: tuple[Any, ...] = ()
    dns_v6: tuple[Any, ...] = ()
    if redirect_dns and not capture_all_dns and not live:
        if raw["dns-servers"].explicit:
            dns_v4, dns_v6 = parsed["dns-servers"]
        else:
            path = parsed["resolv-conf"] or DEFAULT_RESOLV_CONF
            try:
                servers = machine.nameservers(path)
            except OSError as e:
                raise DetectionError(f"failed to load {path}: {e.strerror or e}") from None
            dns_v4, dns_v6 = split_nameservers(servers)

    cfg = Config(
        proxy_port=parsed["envoy-port"],
        inbound_capture_port=parsed["inbound-capture-port"],
        inbound_tunnel_port=parsed["inbound-tunnel-port"],
        proxy_uids=proxy_uids,
        proxy_gids=proxy_gids,
        interception_mode=parsed["istio-inbound-interception-mode"],
        inbound_ports=parsed["istio-inbound-ports"],
        inbound_ports_exclude=parsed["istio-local-exclude-ports"],
        exclude_interfaces=parsed["istio-exclude-interfaces"],
        outbound_ip_ranges_include=parsed["istio-service-cidr"],
        outbound_ip_ranges_exclude=parsed["istio-service-exclude-cidr"],
        outbound_ports_include=parsed["istio-outbound-ports"],
        outbound_ports_exclude=parsed["istio-local-outbound-ports-exclude"],
        kube_virt_interfaces=parsed["kube-virt-interfaces"],
        tproxy_mark=parsed["istio-inbound-tproxy-mark"],
        tproxy_route_table=parsed["istio-inbound-tproxy-route-table"],
        redirect_dns=redirect_dns,
        capture_all_dns=capture_all_dns,
        dns_servers_v4=dns_v4,
        dns_servers_v6=dns_v6,
        drop_invalid=parsed["drop-invalid"],
        enable_ipv6=enable_ipv6,
        owner_groups=owner_groups,
        host_ipv4_loopback_cidr=parsed["ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR"],
    )
    opts = ApplyOptions(
        dry_run=parsed["dry-run"],
        skip_rule_apply=parsed["skip-rule-apply"],
        run_validation=parsed["run-validation"],
        iptables_probe_port=parsed["iptables-probe-port"],
        probe_timeout=parsed["probe-timeout"],
        network_namespace=netns,
        cni_mode=parsed["cni-mode"],
        reconcile=parsed["reconcile"],
        cleanup_only=parsed["cleanup-only"],
        force_apply=parsed["force-apply"],
        native_nftables=parsed["native-nftables"],
        force_iptables_binary=parsed["force-iptables-binary"],
        explain=raw["explain"].text if raw["explain"].explicit else None,
        explain_live=parsed["live"],
        explain_format=parsed["explain-format"],
    )
    return cfg, opts


def markdown_table() -> str:
    """The option reference of docs/options.md, generated from OPTIONS."""

    def cell(s: str) -> str:
        return s.replace("|", "\\|")

    def code(s: str) -> str:
        return f"`{cell(s)}`"

    lines = [
        "| Option | Short | Environment | Default | Value | Description |",
        "|---|---|---|---|---|---|",
    ]
    for o in FLAGS:
        names = code(f"--{o.name}") + (f" / {code('--' + o.negation)}" if o.negation else "")
        notes = o.help
        if o.apply_only:
            notes += " *Acts only when rules are applied.*"
        if o.ours:
            notes += " *(Not in Istio.)*"
        lines.append(
            "| "
            + " | ".join(
                [
                    names,
                    code(f"-{o.short}") if o.short else "",
                    ", ".join(code(v) for v in o.env),
                    cell(o.shown_default) if o.default_doc else code(o.shown_default),
                    code(o.kind.metavar),
                    cell(notes),
                ]
            )
            + " |"
        )
    lines += ["", "Settings read only from the environment, as in Istio:", ""]
    lines += ["| Variable | Default | Value | Description |", "|---|---|---|---|"]
    for o in ENV_ONLY:
        lines.append(
            f"| {code(o.env[0])} | {code(o.shown_default)} | {code(o.kind.metavar)} | {cell(o.help)} |"
        )
    return "\n".join(lines) + "\n"
