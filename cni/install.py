"""``install-cni``: puts the ``istio-cni`` plugin on a node and keeps it there. Writes the plugin
executable and its kubeconfig, inserts the plugin's entry into the node's CNI configuration,
puts the entry back whenever another installer rewrites the file, reports readiness over HTTP,
and on SIGTERM takes the entry away, leaving the file as the primary plugin wrote it.

Settings come from flags or from the environment variables Istio's installer reads (the README
has the table). Only the standard library is used.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import logging
import os
import signal
import socket
import socketserver
import stat
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

log = logging.getLogger("install-cni")

PLUGIN_TYPE = "istio-cni"
PLUGIN_FILENAME = "istio-cni"
# The file extensions libcni (kubelet, containerd, CRI-O) loads from the net dir, in its order:
# every matching file name, sorted, the first usable one is the node's network.
CONF_EXTENSIONS = (".conf", ".conflist", ".json")
STANDALONE_NAME = "YYY-istio-cni.conflist"
STANDALONE_NETWORK = "istio-cni"
STANDALONE_VERSION = "0.3.1"
SERVICE_ACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"

_TRUE = {"1", "true", "yes", "on", "y"}
# Seconds a plugin run needs at most from the exec of the launcher to its version's lock.
SWITCH_GRACE = 30.0
_FALSE = {"0", "false", "no", "off", "n", ""}
_LOG_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warn": logging.WARNING, "error": logging.ERROR}


class SettingsError(Exception):
    """A flag or environment variable has an unusable value; the message names it."""


class NotReady(Exception):
    """Why the node is not (yet) set up; retried on the next pass."""


# --- settings -------------------------------------------------------------------------------


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
        help="the built self-contained plugin (scripts/build-plugin --template) [PLUGIN_TEMPLATE] "
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
    plugin_entry(settings)  # a bad entry template fails here, before anything is written
    return settings


# --- files ----------------------------------------------------------------------------------


def read_or_none(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class ChangedMeanwhile(Exception):
    """The file changed between our read and our write; the next pass starts again."""


def atomic_write(
    path: Path, data: bytes, mode: int, *, if_unchanged: bytes | None = None, through_links: bool = False
) -> None:
    """Writes beside ``path`` then renames over it: a reader sees the old file or the new one,
    never a part. The temporary name has no CNI extension, so no runtime ever loads it.
    With ``if_unchanged``, gives up (ChangedMeanwhile) when ``path`` no longer holds those bytes,
    so an update another installer made since we read the file is not overwritten.
    With ``through_links``, a symlink at ``path`` stays and the file it leads to is replaced
    (written beside that file, so the rename stays within one directory)."""
    if through_links:
        path = link_target(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fchmod(fd, mode)  # the umask must not narrow or the old file's mode leak
            os.fsync(fd)
        finally:
            os.close(fd)
        if if_unchanged is not None and read_or_none(path) != if_unchanged:
            raise ChangedMeanwhile(f"{path} changed while it was being updated; starting again")
        os.rename(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def link_target(path: Path) -> Path:
    """The file ``path`` leads to through any symlinks (``path`` itself when it is none). A
    network configuration may be a link to a file its owner keeps elsewhere and keeps updating;
    renaming over the link would turn it into a file of our own that those updates miss."""
    return Path(os.path.realpath(path)) if path.is_symlink() else path


def remove_file(path: Path) -> bool:
    try:
        path.unlink()
    except FileNotFoundError:
        return False
    _fsync_dir(path.parent)
    return True


def _file_mode(path: Path, default: int = 0o644) -> int:
    try:
        return stat.S_IMODE(path.stat().st_mode)
    except OSError:
        return default


# --- the CNI configuration ------------------------------------------------------------------


class ConfError(Exception):
    """A network configuration file that cannot be used; the message says why."""


def conf_files(net_dir: Path) -> list[Path]:
    """The network configuration files in the runtime's order (libcni: sorted by name)."""
    try:
        names = sorted(os.listdir(net_dir))
    except FileNotFoundError:
        return []
    return [net_dir / n for n in names if n.endswith(CONF_EXTENSIONS) and not (net_dir / n).is_dir()]


def parse_conf(raw: bytes, path: Path) -> dict[str, Any]:
    """The file's JSON object: a list (``.conflist``) or a single plugin (``.conf``, ``.json``)."""
    try:
        doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise ConfError(f"{path}: not valid JSON: {e}") from None
    if not isinstance(doc, dict):
        raise ConfError(f"{path}: not a JSON object")
    if path.suffix == ".conflist":
        plugins = doc.get("plugins")
        if not isinstance(plugins, list) or not plugins or not all(isinstance(p, dict) for p in plugins):
            raise ConfError(f"{path}: a .conflist needs a non-empty 'plugins' list of objects")
        for i, p in enumerate(plugins):
            if not isinstance(p.get("type"), str) or not p["type"]:
                raise ConfError(f"{path}: plugins[{i}] has no 'type'")
    elif not isinstance(doc.get("type"), str) or not doc["type"]:
        raise ConfError(f"{path}: a single-plugin configuration needs a 'type' (is it a conflist?)")
    return doc


def dump_conf(doc: Mapping[str, Any]) -> bytes:
    return (json.dumps(doc, indent=2, ensure_ascii=False) + "\n").encode("utf-8")


def is_ours(plugin: Any) -> bool:
    return isinstance(plugin, dict) and plugin.get("type") == PLUGIN_TYPE


def with_entry(conflist: dict[str, Any], entry: dict[str, Any]) -> dict[str, Any]:
    """The conflist with exactly one istio-cni entry, equal to ``entry``: an existing one is
    replaced where it stands, otherwise the entry goes last. Everything else is kept as it was."""
    plugins = list(conflist["plugins"])
    positions = [i for i, p in enumerate(plugins) if is_ours(p)]
    if positions:
        plugins[positions[0]] = entry
        plugins = [p for i, p in enumerate(plugins) if i not in positions[1:]]
    else:
        plugins.append(entry)
    return {**conflist, "plugins": plugins}


def without_entry(conflist: dict[str, Any]) -> dict[str, Any]:
    return {**conflist, "plugins": [p for p in conflist["plugins"] if not is_ours(p)]}


def conflist_from_conf(conf: dict[str, Any]) -> dict[str, Any]:
    """A single-plugin configuration as a one-plugin list, as libcni's ConfListFromConf makes it:
    the network keeps its name and version, the plugin keeps every key."""
    out: dict[str, Any] = {}
    if "cniVersion" in conf:
        out["cniVersion"] = conf["cniVersion"]
    out["name"] = conf.get("name", "")
    out["plugins"] = [conf]
    return out


def _render_template(template: str, settings: Settings) -> dict[str, Any]:
    values = {
        "__LOG_LEVEL__": settings.log_level,
        "__KUBECONFIG_FILENAME__": settings.kubeconfig_filename,
        "__KUBECONFIG_FILEPATH__": settings.host_kubeconfig_path,
        "__CNI_BIN_DIR__": settings.host_bin_dir,
        "__KUBERNETES_NODE_NAME__": settings.node_name,
        "__POD_NAMESPACE__": settings.pod_namespace,
    }
    for key, value in values.items():
        template = template.replace(key, json.dumps(value)[1:-1])
    try:
        doc = json.loads(template)
    except ValueError as e:
        raise SettingsError(f"CNI_NETWORK_CONFIG: not valid JSON: {e}") from None
    if not isinstance(doc, dict) or doc.get("type") != PLUGIN_TYPE:
        raise SettingsError(f'CNI_NETWORK_CONFIG: must be a JSON object with "type": "{PLUGIN_TYPE}"')
    return doc


def plugin_entry(settings: Settings) -> dict[str, Any]:
    """The istio-cni entry as it goes into a conflist (no name or cniVersion: the list's apply)."""
    if settings.network_config:
        doc = _render_template(settings.network_config, settings)
        if settings.native_nftables:
            doc["native_nftables"] = True
        return {k: v for k, v in doc.items() if k not in ("cniVersion", "name")}
    entry: dict[str, Any] = {"type": PLUGIN_TYPE, "log_level": settings.log_level}
    if settings.native_nftables:
        entry["native_nftables"] = True
    if settings.plugin_log_file:
        entry["log_file"] = settings.plugin_log_file
    entry["pod_namespace"] = settings.pod_namespace
    entry["kubernetes"] = {
        "kubeconfig": settings.host_kubeconfig_path,
        "cni_bin_dir": settings.host_bin_dir,
        "exclude_namespaces": list(settings.exclude_namespaces),
    }
    return entry


def standalone_conf(settings: Settings, name: str) -> bytes:
    """The plugin as a network of its own, for Multus to call by name."""
    entry = plugin_entry(settings)
    network, version = STANDALONE_NETWORK, STANDALONE_VERSION
    if settings.network_config:
        doc = _render_template(settings.network_config, settings)
        network, version = str(doc.get("name", network)), str(doc.get("cniVersion", version))
    if name.endswith(".conflist"):
        return dump_conf({"cniVersion": version, "name": network, "plugins": [entry]})
    return dump_conf({"cniVersion": version, "name": network, **entry})


def render_kubeconfig(server: str, ca: bytes, token: str) -> bytes:
    """The plugin's kubeconfig. JSON (a YAML subset) so the plugin reads it with the stdlib."""
    doc = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": "local",
                "cluster": {"server": server, "certificate-authority-data": base64.b64encode(ca).decode()},
            }
        ],
        "users": [{"name": PLUGIN_TYPE, "user": {"token": token}}],
        "contexts": [{"name": "istio-cni-context", "context": {"cluster": "local", "user": PLUGIN_TYPE}}],
        "current-context": "istio-cni-context",
    }
    return (json.dumps(doc, indent=2) + "\n").encode()


# --- the installer --------------------------------------------------------------------------


@dataclass
class Installation:
    """What we changed in the net dir, to undo it exactly."""

    dest: Path  # the file holding our entry
    written: bytes | None  # what we last wrote there (None: the entry was there before us)
    before: bytes | None  # dest as it was before we first wrote it (None: it did not exist)
    source: Path | None = None  # a single-plugin file we turned into ``dest`` and removed
    source_before: bytes = b""


@dataclass
class Status:
    ready: bool = False
    detail: str = "starting"
    heartbeat: float = field(default_factory=time.monotonic)


class Installer:
    """One pass of ``reconcile()`` makes the node's files right (executable, kubeconfig, entry, in
    that order: the entry only points at a plugin that is there); ``cleanup()`` undoes it."""

    def __init__(self, settings: Settings, archive: bytes, template: Path | None = None) -> None:
        self.settings = settings
        self.archive = archive
        # The self-contained plugin's template (None: the zipapp ``archive``).
        self.template = template
        self._switched: dict[Path, float] = {}
        self.entry = plugin_entry(settings)
        self.status = Status()
        self.installation: Installation | None = None
        self._bin_stats: dict[Path, tuple[int, int, int]] = {}
        self._last_error = ""
        self._preempted_by: Path | None = None

    # executable

    def _ensure_executables(self) -> None:
        if self.template is not None:
            self._ensure_self_contained(self.template)
            return
        for d in self.settings.bin_dirs:
            path = d / PLUGIN_FILENAME
            try:
                st = path.stat()
                sig = (st.st_ino, st.st_size, st.st_mtime_ns)
                if self._bin_stats.get(path) == sig:
                    continue
                if st.st_size == len(self.archive) and path.read_bytes() == self.archive:
                    if stat.S_IMODE(st.st_mode) != 0o755:
                        path.chmod(0o755)
                    self._bin_stats[path] = sig
                    continue
            except FileNotFoundError:
                pass
            except OSError as e:
                raise NotReady(f"cannot read {path}: {e.strerror}") from None
            try:
                atomic_write(path, self.archive, 0o755)
                st = path.stat()
            except OSError as e:
                raise NotReady(f"cannot write the plugin executable {path}: {e.strerror}") from None
            self._bin_stats[path] = (st.st_ino, st.st_size, st.st_mtime_ns)
            log.info("wrote the plugin executable %s (%d bytes)", path, len(self.archive))

    def _ensure_self_contained(self, template: Path) -> None:
        from cni import selfcontained as sc

        host_dirs = self.settings.host_bin_dirs or (self.settings.host_bin_dir,) * len(self.settings.bin_dirs)
        for d, node_dir in zip(self.settings.bin_dirs, host_dirs, strict=True):
            try:
                version, wrote = sc.install(template, d, node_dir)
            except (OSError, sc.BuildError) as e:
                raise NotReady(f"cannot install the plugin into {d}: {e}") from None
            if wrote or d not in self._switched:
                self._switched[d] = time.monotonic()
            if wrote:
                log.info(
                    "installed the self-contained plugin %s into %s (for %s on the node)",
                    version,
                    d,
                    node_dir,
                )
            self._prune(d, version)

    def _prune(self, d: Path, current: str, grace: float = SWITCH_GRACE) -> None:
        """Remove the versions other than ``current`` that no run can still use: none holds its
        lock, and the launcher has pointed at ``current`` for longer than a run needs to start
        (a run that exec'd the old launcher just before the switch takes its lock within that)."""
        from cni import selfcontained as sc

        if time.monotonic() - self._switched.get(d, 0.0) < grace:
            return
        for version in sc.installed_versions(d):
            if version != current and sc.remove_version(d, version):
                log.info("removed the plugin version %s from %s (no run uses it)", version, d)

    # kubeconfig

    def _ensure_kubeconfig(self) -> None:
        s = self.settings
        try:
            token = s.token_file.read_text(encoding="utf-8").strip()
        except OSError as e:
            raise NotReady(
                f"cannot read the service account token {s.token_file}: {e.strerror} "
                "(is this running in a pod?)"
            ) from None
        try:
            ca = s.ca_file.read_bytes()
        except OSError as e:
            raise NotReady(f"cannot read the API server CA {s.ca_file}: {e.strerror}") from None
        if not token:
            raise NotReady(f"the service account token {s.token_file} is empty")
        want = render_kubeconfig(s.server, ca, token)
        path = s.kubeconfig_path
        try:
            current = read_or_none(path)
            if current == want and _file_mode(path) == s.kubeconfig_mode:
                return
            atomic_write(path, want, s.kubeconfig_mode)
        except OSError as e:
            raise NotReady(f"cannot write the kubeconfig {path}: {e.strerror}") from None
        verb = "wrote" if current is None else "refreshed"
        log.info("%s the kubeconfig %s (server %s)", verb, path, s.server)

    # the entry

    def _target(self) -> Path:
        """The file to chain into: the named one, or the first the runtime would load."""
        s = self.settings
        files = conf_files(s.net_dir)
        if s.conf_name:
            path = s.net_dir / s.conf_name
            if not path.exists():
                # As Istio: a .conf we converted earlier is now its .conflist, and vice versa.
                other = path.with_suffix(".conflist" if path.suffix != ".conflist" else ".conf")
                if other.exists():
                    path = other
                else:
                    raise NotReady(f"waiting for the CNI configuration {path} to be written")
            first = files[0] if files else path
            if first != path and first != self._preempted_by:
                log.warning("%s is preempted by %s: the runtime loads that one first", path, first)
            self._preempted_by = first
            return path
        if not files:
            raise NotReady(f"waiting for a CNI network configuration in {s.net_dir}")
        return files[0]

    def _ensure_chained(self) -> Path:
        target = self._target()
        try:
            raw = target.read_bytes()
        except FileNotFoundError:
            raise NotReady(f"{target} disappeared; looking again") from None
        try:
            doc = parse_conf(raw, target)
        except ConfError as e:
            raise NotReady(f"{e}; left unchanged, waiting for it to be fixed") from None

        inst = self.installation
        if inst is not None and target not in (inst.dest, inst.source):
            log.info("the node's network configuration is now %s (was %s)", target, inst.dest)
            self._revert(inst)
            inst = self.installation = None

        if target.suffix == ".conflist":
            new = with_entry(doc, self.entry)
            if new == doc:
                if inst is None:  # already in place from an earlier run: we cannot know the original
                    self.installation = Installation(dest=target, written=None, before=None)
                return target
            data = dump_conf(new)
            atomic_write(target, data, _file_mode(target), if_unchanged=raw, through_links=True)
            if inst is not None and raw == inst.written:
                inst.written = data
            else:
                restorable = not any(is_ours(p) for p in doc["plugins"])
                self.installation = Installation(target, data if restorable else None, raw)
                if inst is not None:
                    log.warning("%s was rewritten without the istio-cni entry; putting it back", target)
            log.info("inserted the istio-cni entry into %s", target)
            return target

        if doc["type"] == PLUGIN_TYPE:
            raise NotReady(f"{target} is istio-cni's own network, not a primary network to chain into")
        dest = target.with_suffix(".conflist")
        data = dump_conf(with_entry(conflist_from_conf(doc), self.entry))
        dest_now = read_or_none(dest)
        if inst is None or dest_now != inst.written:
            inst = self.installation = Installation(dest, None, dest_now)
        inst.source, inst.source_before = target, raw
        atomic_write(dest, data, _file_mode(target), through_links=True)
        inst.written = data
        # The .conf sorts first and would shadow the list: the runtime must see the list alone.
        if read_or_none(target) != raw:
            raise ChangedMeanwhile(f"{target} changed while it was being converted; starting again")
        remove_file(target)
        log.info("converted %s into %s with the istio-cni entry", target, dest)
        return dest

    def _ensure_standalone(self) -> Path:
        s = self.settings
        dest = s.net_dir / (s.conf_name or STANDALONE_NAME)
        data = standalone_conf(s, dest.name)
        current = read_or_none(dest)
        if current == data:
            if self.installation is None:
                self.installation = Installation(dest, data, None)
            return dest
        atomic_write(dest, data, 0o644)
        if self.installation is None or current != self.installation.written:
            self.installation = Installation(dest, data, None if current is None else current)
        else:
            self.installation.written = data
        log.info("wrote the standalone istio-cni network %s", dest)
        return dest

    def _revert(self, inst: Installation) -> None:
        """Undo one installation: the original bytes when the file is still as we left it (checked
        again just before the rename, as on insertion), else just our entry out of whatever is
        there now. A symlinked file keeps its link; the file it leads to gets the bytes."""
        current = read_or_none(inst.dest)
        if current is None:
            return
        if inst.written is not None and current == inst.written:
            if inst.source is not None and not inst.source.exists():
                atomic_write(inst.source, inst.source_before, _file_mode(inst.dest))
                log.info("restored %s", inst.source)
            try:
                if inst.before is None:
                    if read_or_none(inst.dest) != inst.written:
                        raise ChangedMeanwhile(str(inst.dest))
                    remove_file(inst.dest)
                    log.info("removed %s", inst.dest)
                else:
                    atomic_write(
                        inst.dest,
                        inst.before,
                        _file_mode(inst.dest),
                        if_unchanged=inst.written,
                        through_links=True,
                    )
                    log.info("restored %s as it was before the istio-cni entry was inserted", inst.dest)
                return
            except ChangedMeanwhile:
                log.info(
                    "%s changed while it was being restored; only the istio-cni entry is taken out", inst.dest
                )
        remove_entry_from(inst.dest)

    def reconcile(self) -> None:
        """One pass; raises NotReady with the reason when the node is not set up."""
        s = self.settings
        self._ensure_executables()
        self._ensure_kubeconfig()
        try:
            dest = self._ensure_chained() if s.chained else self._ensure_standalone()
        except ChangedMeanwhile as e:
            raise NotReady(str(e)) from None
        except OSError as e:
            raise NotReady(f"cannot update the CNI configuration: {e}") from None
        self.status.detail = (
            f"istio-cni entry in place in {dest}; executable in "
            f"{', '.join(str(d) for d in s.bin_dirs)}; kubeconfig {s.kubeconfig_path}"
        )

    def step(self) -> None:
        """reconcile() with the outcome recorded for the health endpoints and logged once."""
        try:
            self.reconcile()
        except NotReady as e:
            self.status.ready = False
            self.status.detail = f"not ready: {e}"
            if str(e) != self._last_error:
                log.error("%s", e)
                self._last_error = str(e)
        else:
            if not self.status.ready:
                log.info("ready: %s", self.status.detail)
            self.status.ready = True
            self._last_error = ""
        self.status.heartbeat = time.monotonic()

    def cleanup(self) -> None:
        """Takes the entry away (first, so no pod start calls a plugin being removed), then,
        when configured, the executable and the kubeconfig."""
        self.status.ready = False
        self.status.detail = "shutting down"
        inst, self.installation = self.installation, None
        if inst is not None:
            try:
                self._revert(inst)
            except (OSError, ConfError, ChangedMeanwhile) as e:
                log.error("could not remove the istio-cni entry from %s: %s", inst.dest, e)
        if self.settings.cleanup_files:
            remove_files(self.settings)


def remove_entry_from(path: Path) -> bool:
    """Removes every istio-cni entry from the conflist at ``path`` (and the file, when nothing
    else is left in it). True when the file changed. A file that keeps changing under us is
    read again a few times, then left as it is (ChangedMeanwhile)."""
    for _ in range(3):
        try:
            return _remove_entry_once(path)
        except ChangedMeanwhile:
            continue
    raise ChangedMeanwhile(f"{path} kept changing while the istio-cni entry was being removed")


def _remove_entry_once(path: Path) -> bool:
    raw = read_or_none(path)
    if raw is None:
        return False
    try:
        doc = parse_conf(raw, path)
    except ConfError as e:
        log.error("%s; left unchanged", e)
        return False
    if path.suffix != ".conflist":
        if doc["type"] == PLUGIN_TYPE:
            remove_file(path)
            log.info("removed %s", path)
            return True
        return False
    if not any(is_ours(p) for p in doc["plugins"]):
        return False
    rest = without_entry(doc)
    if rest["plugins"]:
        atomic_write(path, dump_conf(rest), _file_mode(path), if_unchanged=raw, through_links=True)
        log.info("removed the istio-cni entry from %s", path)
    else:
        remove_file(path)
        log.info("removed %s (it held only the istio-cni entry)", path)
    return True


def remove_files(settings: Settings) -> None:
    from cni.selfcontained import SUPPORT_DIR, remove_all

    for path in (settings.kubeconfig_path, *(d / PLUGIN_FILENAME for d in settings.bin_dirs)):
        try:
            if remove_file(path):
                log.info("removed %s", path)
        except OSError as e:
            log.error("could not remove %s: %s", path, e.strerror)
    for d in settings.bin_dirs:
        if (d / SUPPORT_DIR).exists():
            remove_all(d)
            log.info("removed every version of the plugin from %s", d / SUPPORT_DIR)


def uninstall(settings: Settings) -> bool:
    """Without the state of the installer that inserted it: every istio-cni entry out of every
    network configuration in the net dir, then the kubeconfig and the executables. False when
    an entry could not be removed (logged)."""
    ok = True
    for path in conf_files(settings.net_dir):
        try:
            remove_entry_from(path)
        except (OSError, ChangedMeanwhile) as e:
            log.error("could not remove the istio-cni entry from %s: %s", path, e)
            ok = False
    remove_files(settings)
    return ok


# --- health endpoints -----------------------------------------------------------------------


class _HealthServer(ThreadingHTTPServer):
    daemon_threads = True

    def server_bind(self) -> None:
        if self.address_family == socket.AF_INET6:
            # Dual stack: kubelet probes the pod's address, IPv4 or IPv6.
            with contextlib.suppress(OSError):
                self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        # Not HTTPServer.server_bind: its socket.getfqdn() of the bind address is a reverse DNS
        # lookup, which waits for the resolver's timeout (10 s) where the pod's DNS cannot be
        # reached yet, as on a node whose network this installer is still setting up.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = str(self.server_address[0]), int(self.server_address[1])


class _HealthServer6(_HealthServer):
    address_family = socket.AF_INET6


def _bind(address: str, port: int, handler: type[BaseHTTPRequestHandler]) -> ThreadingHTTPServer:
    """All addresses (IPv4 and IPv6 where the kernel has it) for "", else the one given."""
    if address in ("", "::") or ":" in address:
        try:
            return _HealthServer6((address or "::", port), handler)
        except OSError:
            if address:
                raise
    return _HealthServer((address or "0.0.0.0", port), handler)


def serve_health(status: Status, address: str, port: int, stale_after: float) -> ThreadingHTTPServer:
    """/readyz: 200 while the entry is in place. /healthz: 200 while the watch loop runs (a stuck
    installer is restarted; a missing entry is not a reason to restart it). Both say why."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - the http.server API
            path = self.path.split("?", 1)[0]
            if path == "/readyz":
                ok = status.ready
                body = status.detail
            elif path == "/healthz":
                age = time.monotonic() - status.heartbeat
                ok = age <= stale_after
                body = ("alive; " if ok else f"stuck: no check for {age:.0f}s; ") + status.detail
            else:
                self.send_error(404)
                return
            data = (body + "\n").encode()
            self.send_response(200 if ok else 503)
            self.send_header("Content-Type", "text/plain; charset=utf-8")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the http.server API
            log.debug("health: " + format, *args)

    server = _bind(address, port, Handler)
    threading.Thread(target=server.serve_forever, name="health", daemon=True).start()
    return server


def check(settings: Settings) -> int:
    """``--check``: the running installer's /readyz answer."""
    import urllib.error
    import urllib.request

    host = settings.health_address or "127.0.0.1"
    if host in ("0.0.0.0", "::"):
        host = "127.0.0.1"
    url = f"http://{host}:{settings.health_port}/readyz"
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            print(resp.read().decode().strip())
            return 0
    except urllib.error.HTTPError as e:
        print(e.read().decode().strip())
    except OSError as e:
        print(f"no answer from {url}: {e}")
    return 1


# --- main -----------------------------------------------------------------------------------


@contextlib.contextmanager
def _stop_on_signals(stop: threading.Event) -> Iterator[None]:
    def handler(signum: int, frame: object) -> None:
        log.info("received %s; cleaning up", signal.Signals(signum).name)
        stop.set()

    old = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def run(settings: Settings, stop: threading.Event) -> int:
    """Installs, watches until ``stop`` is set, cleans up."""
    where = (
        f"net dir {settings.net_dir} (node: {settings.host_net_dir}), bin dirs "
        + ", ".join(
            f"{d} (node: {n})" for d, n in zip(settings.bin_dirs, settings.host_bin_dirs, strict=False)
        )
        + (", chained" if settings.chained else ", standalone (Multus)")
    )
    if settings.interpreter:
        from cni.bundle import build_archive

        archive = build_archive(settings.interpreter)
        log.info(
            "built the plugin executable (%d bytes, interpreter %r); %s",
            len(archive),
            settings.interpreter,
            where,
        )
        installer = Installer(settings, archive)
    else:
        from cni.selfcontained import BuildError, template_version

        try:
            version = template_version(settings.plugin_template)
        except BuildError as e:
            raise SettingsError(
                f"PLUGIN_TEMPLATE: {e} (build it with scripts/build-plugin --template DIR, or set "
                "PLUGIN_INTERPRETER to install a zipapp for the node's own Python)"
            ) from None
        log.info("the self-contained plugin %s from %s; %s", version, settings.plugin_template, where)
        installer = Installer(settings, b"", settings.plugin_template)
    server = serve_health(
        installer.status,
        settings.health_address,
        settings.health_port,
        stale_after=max(30.0, 10 * settings.poll_interval),
    )
    log.info("serving /readyz and /healthz on %s:%d", settings.health_address or "*", server.server_port)
    try:
        while not stop.is_set():
            installer.step()
            stop.wait(settings.poll_interval)
    finally:
        installer.cleanup()
        server.shutdown()
        server.server_close()
    log.info("done")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = (args.log_level or os.environ.get("LOG_LEVEL", "info")).strip().lower()
    logging.basicConfig(
        level=_LOG_LEVELS.get("warn" if level == "warning" else level, logging.INFO),
        format="%(asctime)s\t%(levelname)s\tinstall-cni\t%(message)s",
        stream=sys.stderr,
    )
    try:
        settings = parse_settings(args, os.environ)
    except SettingsError as e:
        log.error("%s", e)
        return 2
    if args.check:
        return check(settings)
    if args.uninstall:
        return 0 if uninstall(settings) else 1
    stop = threading.Event()
    with _stop_on_signals(stop):
        try:
            return run(settings, stop)
        except (SettingsError, RuntimeError, OSError) as e:
            log.error("%s", e)
            return 1


if __name__ == "__main__":
    sys.exit(main())
