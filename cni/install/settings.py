"""install-cni's settings: flags over the environment variables Istio's installer reads over
defaults, validated once (``parse_settings``), and the names every part shares. SettingsError is
an unusable value (the message names the flag or variable); NotReady is why a pass did not set
the node up, retried on the next one."""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("install-cni")

PLUGIN_TYPE = "istio-cni"
PLUGIN_FILENAME = "istio-cni"
# The file extensions libcni (kubelet, containerd, CRI-O) loads from the net dir, in its order:
# every matching file name, sorted, the first usable one is the node's network.
CONF_EXTENSIONS = (".conf", ".conflist", ".json")
SERVICE_ACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"

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
        node_name=environ.get("KUBERNETES_NODE_NAME") or environ.get("NODE_NAME") or "",
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
    )
    from cni.install.conflist import plugin_entry  # conflist imports this module

    plugin_entry(settings)  # a bad entry template fails here, before anything is written
    return settings
