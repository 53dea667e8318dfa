"""install-cni's settings: flags over the environment variables Istio's installer reads over
defaults, validated once (``parse_settings``), and the names every part shares. SettingsError is
an unusable value (the message names the flag or variable); NotReady is why a pass did not set
the node up, retried on the next one."""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("install-cni")

PLUGIN_TYPE = "istio-cni"
PLUGIN_FILENAME = "istio-cni"
# The file extensions libcni (kubelet, containerd, CRI-O) loads from the net dir, in its order:
# every matching file name, sorted, the first usable one is the node's network.
CONF_EXTENSIONS = (".conf", ".conflist", ".json")
SERVICE_ACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
STATS_SOCKET_NAME = "plugin-stats.sock"  # cni.addstats.SOCKET_NAME

_TRUE = {"1", "true", "yes", "on", "y"}
_FALSE = {"0", "false", "no", "off", "n", ""}
_LOG_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warn": logging.WARNING, "error": logging.ERROR}


class SettingsError(Exception):
    """A flag or environment variable has an unusable value; the message names it."""


class NotReady(Exception):
    """Why the node is not (yet) set up; retried on the next pass."""


@dataclass(frozen=True)
class Settings:
    net_dir: Path  # where this process reads and writes the CNI configuration
    host_net_dir: str  # the same directory as the node sees it (written into the entry)
    bin_dirs: tuple[Path, ...]  # where this process writes the executable
    host_bin_dir: str  # the node's CNI bin dir (written into the entry)
    conf_name: str = ""
    chained: bool = True
    # "": the self-contained plugin from plugin_template; a path: a zipapp run by the node's Python.
    interpreter: str = ""
    plugin_template: Path = Path("/opt/istio-cni/plugin")
    host_bin_dirs: tuple[str, ...] = ()  # each bin dir as the node sees it (bin_dirs' order)
    network_config: str = ""  # an entry template (Istio's CNI_NETWORK_CONFIG placeholders)
    log_level: str = "info"
    plugin_log_file: str = ""
    exclude_namespaces: tuple[str, ...] = ("istio-system",)
    pod_namespace: str = "istio-system"
    node_name: str = ""
    kubeconfig_filename: str = "ZZZ-istio-cni-kubeconfig"
    kubeconfig_mode: int = 0o600
    token_file: Path = Path(SERVICE_ACCOUNT_DIR, "token")
    ca_file: Path = Path(SERVICE_ACCOUNT_DIR, "ca.crt")
    server: str = ""
    health_address: str = ""
    health_port: int = 8000
    poll_interval: float = 1.0
    cleanup_files: bool = False
    native_nftables: bool = False
    # --- the node agent (cni/agent): Istio's repair controller's settings and names ---------
    repair_enabled: bool = True
    repair_repair_pods: bool = True
    repair_delete_pods: bool = False
    repair_label_pods: bool = False
    repair_label_key: str = "cni.istio.io/uninitialized"
    repair_label_value: str = "true"
    repair_sidecar_annotation: str = "sidecar.istio.io/status"
    repair_init_container_name: str = "istio-validation"
    repair_init_termination_msg: str = ""
    repair_init_exit_code: int = 126
    repair_label_selectors: str = ""
    repair_field_selectors: str = ""
    # Ours: also look into the namespace of every running meshed pod (catches pods that never
    # restart their validation container).
    repair_check_running: bool = True
    # Where pinned pod namespaces are (containerd and CRI-O pin them in /var/run/netns) and the
    # node's /proc, as this process sees them.
    netns_dirs: tuple[str, ...] = ("/host/var/run/netns",)
    host_proc: str = "/host/proc"
    startup_taint: str = "cni.istio.io/not-ready"
    monitoring_port: int = 15014
    agent_run_dir: str = "/var/run/istio-cni"  # on the node (written into the entry)
    mounted_agent_run_dir: Path = Path("/var/run/istio-cni")  # the same, as this process sees it

    @property
    def stats_socket(self) -> str:
        """The plugin's datagram socket as the node sees it (empty: none)."""
        return os.path.join(self.agent_run_dir, STATS_SOCKET_NAME) if self.agent_run_dir else ""

    @property
    def repair_mode(self) -> str:
        """What is done to a broken pod, in Istio's order of precedence ("": only detected)."""
        if self.repair_repair_pods:
            return "repair"
        if self.repair_delete_pods:
            return "delete"
        if self.repair_label_pods:
            return "label"
        return ""

    @property
    def kubeconfig_path(self) -> Path:
        return self.net_dir / self.kubeconfig_filename

    @property
    def host_kubeconfig_path(self) -> str:
        return os.path.join(self.host_net_dir, self.kubeconfig_filename)


def _bool(source: str, value: str) -> bool:
    v = value.strip().lower()
    if v in _TRUE:
        return True
    if v in _FALSE:
        return False
    raise SettingsError(f"{source}: {value!r} is not a boolean (true or false)")


def _list(value: str) -> tuple[str, ...]:
    return tuple(p.strip() for p in value.split(",") if p.strip())


def _shown(value: str) -> str:
    """A setting's value for a message: whole when short, else its start and its length."""
    return repr(value) if len(value) <= 60 else f"{value[:60]!r}... ({len(value)} characters)"


def _digits(value: str, allowed: str, most: int) -> int | None:
    """``value`` (blanks around it aside) as a number of at most ``most`` significant digits,
    all from ``allowed``; else None. int() alone would take signs, underscores and other
    scripts' digits (a port the plugin's URL parser then refuses), and raise past 4,300 digits."""
    text = value.strip()
    if not text or text.strip(allowed) or len(text.lstrip("0")) > most:
        return None
    return int(text.lstrip("0") or "0", len(allowed))


def _port(source: str, value: str, *, zero: bool = False) -> int:
    port = _digits(value, "0123456789", 5)
    if port is None or not (0 if zero else 1) <= port <= 65535:
        raise SettingsError(f"{source}: {_shown(value)} is not a port number")
    return port


def _mode(source: str, value: str) -> int:
    mode = _digits(value.strip().removeprefix("0o"), "01234567", 4)
    if mode is None or not 0 <= mode <= 0o777:
        raise SettingsError(f"{source}: {_shown(value)} is not an octal file mode such as 0600")
    if mode & 0o077:
        log.warning("%s %s lets other users read the plugin's credentials", source, oct(mode))
    return mode


_LABEL_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.")
_DNS_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-.")


def _label_name(text: str) -> bool:
    """A label value or the name part of a key: at most 63 of ``[A-Za-z0-9-_.]``, alphanumeric
    at both ends (Kubernetes' IsQualifiedName / IsValidLabelValue)."""
    return (
        0 < len(text) <= 63
        and set(text) <= _LABEL_NAME_CHARS
        and text[0].isascii()
        and text[0].isalnum()
        and text[-1].isascii()
        and text[-1].isalnum()
    )


def _qualified_key(source: str, value: str, what: str) -> str:
    """A label or taint key: ``[prefix/]name``, the prefix a DNS subdomain."""
    prefix, slash, name = value.rpartition("/")
    ok = _label_name(name) and (
        not slash
        or (
            0 < len(prefix) <= 253
            and set(prefix) <= _DNS_CHARS
            and all(p and p[0].isalnum() and p[-1].isalnum() for p in prefix.split("."))
        )
    )
    if not ok:
        raise SettingsError(f"{source}: {_shown(value)} is not a valid {what} ([prefix/]name)")
    return value


def _selector(source: str, value: str) -> str:
    if any(not c.isprintable() for c in value) or not value.isascii():
        raise SettingsError(f"{source}: {_shown(value)} is not a selector (printable ASCII)")
    return value.strip()


def _agent_settings(get: Callable[..., tuple[str, str]], environ: Mapping[str, str]) -> dict[str, object]:
    """The node agent's settings (Istio's variable names where Istio has them)."""
    out: dict[str, object] = {}
    for field, env, default in (
        ("repair_enabled", "REPAIR_ENABLED", "true"),
        ("repair_repair_pods", "REPAIR_REPAIR_PODS", "true"),
        ("repair_delete_pods", "REPAIR_DELETE_PODS", "false"),
        ("repair_label_pods", "REPAIR_LABEL_PODS", "false"),
        ("repair_check_running", "REPAIR_CHECK_RUNNING_PODS", "true"),
    ):
        out[field] = _bool(*get(field, env, default))
    source, key = get("repair_label_key", "REPAIR_BROKEN_POD_LABEL_KEY", "cni.istio.io/uninitialized")
    out["repair_label_key"] = _qualified_key(source, key.strip(), "label key")
    source, value = get("repair_label_value", "REPAIR_BROKEN_POD_LABEL_VALUE", "true")
    value = value.strip()
    if value and not _label_name(value):
        raise SettingsError(f"{source}: {_shown(value)} is not a valid label value")
    out["repair_label_value"] = value
    source, annotation = get(
        "repair_sidecar_annotation", "REPAIR_SIDECAR_ANNOTATION", "sidecar.istio.io/status"
    )
    annotation = annotation.strip()
    out["repair_sidecar_annotation"] = annotation and _qualified_key(source, annotation, "annotation key")
    source, name = get("repair_init_container_name", "REPAIR_INIT_CONTAINER_NAME", "istio-validation")
    name = name.strip()
    ends = name[:1] + name[-1:]
    if name and not (len(name) <= 63 and set(name) <= _DNS_CHARS and not set(ends) & set("-.")):
        raise SettingsError(f"{source}: {_shown(name)} is not a container name")
    out["repair_init_container_name"] = name
    out["repair_init_termination_msg"] = get(
        "repair_init_termination_msg", "REPAIR_INIT_CONTAINER_TERMINATION_MESSAGE", ""
    )[1]
    source, code = get("repair_init_exit_code", "REPAIR_INIT_CONTAINER_EXIT_CODE", "126")
    number = _digits(code, "0123456789", 3)
    if number is None or number > 255:
        raise SettingsError(f"{source}: {_shown(code)} is not an exit code (0-255; 0: any)")
    out["repair_init_exit_code"] = number
    out["repair_label_selectors"] = _selector(*get("repair_label_selectors", "REPAIR_LABEL_SELECTORS", ""))
    out["repair_field_selectors"] = _selector(*get("repair_field_selectors", "REPAIR_FIELD_SELECTORS", ""))
    source, dirs = get("netns_dirs", "MOUNTED_NETNS_DIRS", "/host/var/run/netns")
    netns_dirs = _list(dirs)
    for d in netns_dirs:
        if not d.startswith("/"):
            raise SettingsError(f"{source}: {_shown(d)} is not an absolute path")
    out["netns_dirs"] = netns_dirs
    source, proc = get("host_proc", "HOST_PROC", "/host/proc")
    proc = proc.strip()
    if proc and not proc.startswith("/"):
        raise SettingsError(f"{source}: {_shown(proc)} is not an absolute path")
    out["host_proc"] = proc
    source, taint = get("startup_taint", "STARTUP_TAINT", "cni.istio.io/not-ready")
    taint = taint.strip()
    out["startup_taint"] = taint and _qualified_key(source, taint, "taint key")
    out["monitoring_port"] = _port(*get("monitoring_port", "MONITORING_PORT", "15014"), zero=True)
    source, run_dir = get("agent_run_dir", "CNI_AGENT_RUN_DIR", "/var/run/istio-cni")
    run_dir = run_dir.strip()
    if run_dir and not run_dir.startswith("/"):
        raise SettingsError(f"{source}: {_shown(run_dir)} is not an absolute path")
    out["agent_run_dir"] = run_dir
    source, mounted = get("mounted_agent_run_dir", "MOUNTED_CNI_AGENT_RUN_DIR", run_dir)
    if mounted.strip() and not mounted.strip().startswith("/"):
        raise SettingsError(f"{source}: {_shown(mounted)} is not an absolute path")
    out["mounted_agent_run_dir"] = Path(mounted.strip() or run_dir or "/var/run/istio-cni")
    return out


def _bin_dirs(mounted: Sequence[str], host_bin_dir: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The bin dirs to write into and each one as the node sees it: ``MOUNTED=NODE``, or for the
    first the node's CNI_BIN_DIR and for the others the path without the DaemonSet's ``/host``."""
    paths: list[str] = []
    nodes: list[str] = []
    for i, entry in enumerate(mounted):
        path, sep, node = entry.partition("=")
        if not sep:
            node = host_bin_dir if i == 0 else (path[len("/host") :] if path.startswith("/host/") else path)
        if not path.startswith("/") or not node.startswith("/"):
            raise SettingsError(
                f"MOUNTED_CNI_BIN_DIRS: {entry!r} is not an absolute path (or PATH=NODE_PATH)"
            )
        paths.append(path)
        nodes.append(node)
    return tuple(paths), tuple(nodes)


def _server_url(environ: Mapping[str, str]) -> str:
    host = environ.get("KUBERNETES_SERVICE_HOST", "").strip()
    port = environ.get("KUBERNETES_SERVICE_PORT", "").strip()
    protocol = environ.get("KUBERNETES_SERVICE_PROTOCOL", "").strip() or "https"
    if not host or not port:
        raise SettingsError(
            "KUBERNETES_SERVICE_HOST and KUBERNETES_SERVICE_PORT must be set (kubelet sets them in every pod)"
        )
    if protocol != "https":
        raise SettingsError(f"KUBERNETES_SERVICE_PROTOCOL: {protocol!r}; the plugin only talks https")
    number = _port("KUBERNETES_SERVICE_PORT", port)
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"  # an IPv6 address
    return f"https://{host}:{number}"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="install-cni",
        description="Install the istio-cni plugin on this node and keep it installed until SIGTERM. "
        "Every flag has an environment variable (in brackets); a flag wins over its variable.",
    )
    a = p.add_argument
    a("--cni-net-dir", help="the node's CNI configuration directory [CNI_NET_DIR] (default /etc/cni/net.d)")
    a(
        "--mounted-cni-net-dir",
        help="the same directory as this process sees it [MOUNTED_CNI_NET_DIR] (default: --cni-net-dir)",
    )
    a(
        "--cni-conf-name",
        help="configuration file to chain into instead of the runtime's first one; "
        "in Multus mode, the file to write [CNI_CONF_NAME]",
    )
    chain = p.add_mutually_exclusive_group()
    chain.add_argument(
        "--chained",
        dest="chained",
        action="store_const",
        const="true",
        help="chain the plugin into the node's network [CHAINED_CNI_PLUGIN=true] (default)",
    )
    chain.add_argument(
        "--multus",
        "--standalone",
        dest="chained",
        action="store_const",
        const="false",
        help="write a standalone network for Multus instead [CHAINED_CNI_PLUGIN=false]",
    )
    a(
        "--cni-bin-dir",
        help="the node's CNI bin directory, written into the entry [CNI_BIN_DIR] (default /opt/cni/bin)",
    )
    a(
        "--mounted-cni-bin-dir",
        action="append",
        help="directory to write the executable into, as this "
        "process sees it; repeatable [MOUNTED_CNI_BIN_DIRS, comma-separated] (default: --cni-bin-dir)",
    )
    a(
        "--plugin-interpreter",
        help="install a zipapp run by this Python of the node's (e.g. '/usr/bin/python3 -S') instead "
        "of the self-contained plugin [PLUGIN_INTERPRETER] (default: unset, self-contained)",
    )
    a(
        "--plugin-template",
        help="the built self-contained plugin (scripts/build-plugin --template-only) [PLUGIN_TEMPLATE] "
        "(default /opt/istio-cni/plugin, where the installer image has it)",
    )
    a("--cni-network-config", help="JSON template of the entry [CNI_NETWORK_CONFIG]")
    a(
        "--native-nftables",
        metavar="BOOL",
        help="have the plugin install native nftables rules instead of iptables ones: writes "
        '"native_nftables": true into the entry [NATIVE_NFTABLES] (default false)',
    )
    a("--cni-network-config-file", help="file holding the entry template [CNI_NETWORK_CONFIG_FILE]")
    a(
        "--log-level",
        help="debug, info, warn or error, for this process and the plugin [LOG_LEVEL] (default info)",
    )
    a("--plugin-log-file", help="file on the node the plugin also logs to [PLUGIN_LOG_FILE]")
    a(
        "--exclude-namespaces",
        help="comma-separated namespaces the plugin leaves alone "
        "[EXCLUDED_NAMESPACES] (default: this pod's namespace)",
    )
    a("--pod-namespace", help="this pod's namespace [POD_NAMESPACE] (default istio-system)")
    a(
        "--kubeconfig-filename",
        help="name of the plugin's kubeconfig in the net dir [KUBECONFIG_FILENAME] "
        "(default ZZZ-istio-cni-kubeconfig)",
    )
    a("--kubeconfig-mode", help="octal mode of the kubeconfig [KUBECONFIG_MODE] (default 0600)")
    a(
        "--service-account-dir",
        help="where the service account token and CA are mounted "
        f"[SERVICE_ACCOUNT_DIR] (default {SERVICE_ACCOUNT_DIR})",
    )
    a("--kube-ca-file", help="CA bundle of the API server [KUBE_CA_FILE] (default: the service account's)")
    a("--health-address", help="address of the /readyz and /healthz server [HEALTH_ADDRESS] (default: all)")
    a("--health-port", help="its port; 0 picks a free one [HEALTH_PORT] (default 8000)")
    a("--poll-interval", help="seconds between checks of the installed files [POLL_INTERVAL] (default 1)")
    a(
        "--cleanup-files",
        dest="cleanup_files",
        action="store_const",
        const="true",
        help="on SIGTERM also remove the executable and the kubeconfig [CLEANUP_FILES]",
    )
    a("--uninstall", action="store_true", help="remove the entry, executable and kubeconfig now, and exit")
    a(
        "--check",
        action="store_true",
        help="ask the running installer's /readyz, print the answer, exit 0 when ready",
    )
    return p


def parse_settings(args: argparse.Namespace, environ: Mapping[str, str]) -> Settings:
    """Flags over environment over defaults, validated once."""

    def get(flag: str, env: str, default: str = "") -> tuple[str, str]:
        value = getattr(args, flag, None)
        if value is not None:
            return "--" + flag.replace("_", "-"), value
        if env in environ:
            return env, environ[env]
        return env, default

    host_net_dir = get("cni_net_dir", "CNI_NET_DIR", "/etc/cni/net.d")[1]
    net_dir = get("mounted_cni_net_dir", "MOUNTED_CNI_NET_DIR", host_net_dir)[1]
    host_bin_dir = get("cni_bin_dir", "CNI_BIN_DIR", "/opt/cni/bin")[1]
    if args.mounted_cni_bin_dir:
        mounted = tuple(args.mounted_cni_bin_dir)
    else:
        mounted = _list(environ.get("MOUNTED_CNI_BIN_DIRS", "")) or (host_bin_dir,)
    bin_dirs, host_bin_dirs = _bin_dirs(mounted, host_bin_dir)
    for source, value in (("CNI_NET_DIR", host_net_dir), ("CNI_BIN_DIR", host_bin_dir)):
        if not value.startswith("/"):
            raise SettingsError(f"{source}: {value!r} is not an absolute path")

    chained = _bool(*get("chained", "CHAINED_CNI_PLUGIN", "true"))
    conf_name = get("cni_conf_name", "CNI_CONF_NAME")[1].strip()
    if "/" in conf_name:
        raise SettingsError(f"CNI_CONF_NAME: {conf_name!r} must be a file name, not a path")
    if conf_name and not conf_name.endswith(CONF_EXTENSIONS):
        raise SettingsError(f"CNI_CONF_NAME: {conf_name!r} must end in one of {', '.join(CONF_EXTENSIONS)}")

    source, level = get("log_level", "LOG_LEVEL", "info")
    level = level.strip().lower() or "info"
    if level == "warning":
        level = "warn"
    if level not in _LOG_LEVELS:
        raise SettingsError(f"{source}: {level!r} is not one of {', '.join(_LOG_LEVELS)}")

    template = get("cni_network_config", "CNI_NETWORK_CONFIG")[1]
    source, template_file = get("cni_network_config_file", "CNI_NETWORK_CONFIG_FILE")
    if template_file and not template:
        try:
            template = Path(template_file).read_text(encoding="utf-8")
        except OSError as e:
            raise SettingsError(f"{source}: cannot read {template_file}: {e.strerror}") from None

    if _bool("SKIP_TLS_VERIFY", environ.get("SKIP_TLS_VERIFY", "false")):
        raise SettingsError("SKIP_TLS_VERIFY=true is not supported: the plugin always verifies the server")

    pod_namespace = get("pod_namespace", "POD_NAMESPACE", "istio-system")[1].strip() or "istio-system"
    source, excluded = get("exclude_namespaces", "EXCLUDED_NAMESPACES")
    exclude = _list(excluded) if source in environ or source.startswith("--") else (pod_namespace,)

    sa_dir = Path(get("service_account_dir", "SERVICE_ACCOUNT_DIR", SERVICE_ACCOUNT_DIR)[1])
    ca_file = get("kube_ca_file", "KUBE_CA_FILE")[1] or str(sa_dir / "ca.crt")
    filename = get("kubeconfig_filename", "KUBECONFIG_FILENAME", "ZZZ-istio-cni-kubeconfig")[1]
    if not filename or "/" in filename or filename.endswith(CONF_EXTENSIONS):
        raise SettingsError(
            f"KUBECONFIG_FILENAME: {filename!r} must be a file name that the runtime does not load "
            f"as a network (no {', '.join(CONF_EXTENSIONS)} extension)"
        )

    source, interpreter = get("plugin_interpreter", "PLUGIN_INTERPRETER", "")
    interpreter = interpreter.strip()
    if interpreter and (not interpreter.startswith("/") or "\n" in interpreter):
        raise SettingsError(f"{source}: {interpreter!r} must be an absolute path to the node's Python")
    plugin_template = Path(get("plugin_template", "PLUGIN_TEMPLATE", "/opt/istio-cni/plugin")[1])
    if not interpreter and not (args.check or args.uninstall):
        from cni.selfcontained import BuildError, check_bin_dir

        for node_dir in host_bin_dirs:
            try:
                check_bin_dir(node_dir)
            except BuildError as e:
                raise SettingsError(str(e)) from None

    source, interval_s = get("poll_interval", "POLL_INTERVAL", "1")
    try:
        interval = float(interval_s)
    except ValueError:
        interval = -1.0
    if not 0.01 <= interval <= 300:
        raise SettingsError(f"{source}: {_shown(interval_s)} is not a number of seconds in [0.01, 300]")

    settings = Settings(
        net_dir=Path(net_dir),
        host_net_dir=host_net_dir,
        bin_dirs=tuple(Path(d) for d in bin_dirs),
        host_bin_dir=host_bin_dir,
        host_bin_dirs=host_bin_dirs,
        plugin_template=plugin_template,
        conf_name=conf_name,
        chained=chained,
        interpreter=interpreter,
        network_config=template,
        log_level=level,
        plugin_log_file=get("plugin_log_file", "PLUGIN_LOG_FILE")[1].strip(),
        exclude_namespaces=exclude,
        pod_namespace=pod_namespace,
        node_name=(
            environ.get("KUBERNETES_NODE_NAME")
            or environ.get("NODE_NAME")
            or environ.get("REPAIR_NODE_NAME")
            or ""
        ).strip(),
        kubeconfig_filename=filename,
        kubeconfig_mode=_mode(*get("kubeconfig_mode", "KUBECONFIG_MODE", "0600")),
        token_file=sa_dir / "token",
        ca_file=Path(ca_file),
        server="" if args.check or args.uninstall else _server_url(environ),
        health_address=get("health_address", "HEALTH_ADDRESS")[1].strip(),
        health_port=_port(*get("health_port", "HEALTH_PORT", "8000"), zero=True),
        poll_interval=interval,
        cleanup_files=_bool(*get("cleanup_files", "CLEANUP_FILES", "false")),
        native_nftables=_bool(*get("native_nftables", "NATIVE_NFTABLES", "false")),
        **_agent_settings(get, environ),  # type: ignore[arg-type]
    )
    from cni.install.conflist import plugin_entry  # conflist imports this module

    plugin_entry(settings)  # a bad entry template fails here, before anything is written
    return settings
