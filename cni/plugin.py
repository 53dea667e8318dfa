"""``istio-cni``: the chained CNI plugin. For each meshed pod it installs, inside the pod's network
namespace and before its containers start, the rules the istio-init container would; every
other pod passes through untouched.

The dispatcher reads like containernetworking/plugins: protocol handling lives in
``cni.protocol``, the pod decision and Config in ``cni.pod``, the rules come from the shared
planner and applier. Nothing but the result or error JSON is ever written to stdout.

Configuration keys (the conflist entry; unknown keys are ignored):
  type                          "istio-cni"
  plugin_log_level, log_level   debug | info (default) | warn | error | none
  log_file                      also append the log to this file
  exclude_namespaces            namespaces passed through untouched (also under "kubernetes")
  pod_namespace                 the istio-cni-node DaemonSet's namespace (its pods pass when the API fails)
  native_nftables               handed to the applier
  kubernetes.kubeconfig         the kubeconfig used to read the Pod
  kubernetes.cni_bin_dir        accepted for compatibility (nothing is executed from it)
  kubernetes.api_deadline_seconds         overall time to read the Pod (default 30)
  kubernetes.api_request_timeout_seconds  time for one request (default 5)
"""

from __future__ import annotations

import os
import sys
import time

from cni.protocol import (
    ERR_DECODING_FAILURE,
    ERR_INTERNAL,
    ERR_INVALID_NETNS,
    ERR_INVALID_NETWORK_CONFIG,
    ERR_IO_FAILURE,
    ERR_PLUGIN_NOT_AVAILABLE,
    ERR_TRY_AGAIN_LATER,
    LATEST_VERSION,
    SUPPORTED_VERSIONS,
    TYPE_CHECKING,
    CniError,
    Invocation,
    NamedTuple,
    Result,
    check_version,
    config_version,
    dumps,
    parse_cni_args,
    parse_netconf,
    parse_result,
    read_environment,
    render_result,
    version_info,
)
from istio_iptables.lean import exit_now

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping
    from typing import IO, Any

    from istio_iptables.config import Config
    from istio_iptables.executor import Executor

ABOUT = "istio-cni: the chained CNI plugin that installs the mesh's traffic capture rules in meshed pods"
K8S_ARGS = frozenset({"K8S_POD_NAME", "K8S_POD_NAMESPACE", "K8S_POD_INFRA_CONTAINER_ID", "K8S_POD_UID"})
# The plugin's own node DaemonSet names its pods like this.
NODE_POD_PREFIX = "istio-cni-node-"

_LEVELS = {"debug": 10, "info": 20, "warn": 30, "warning": 30, "error": 40, "fatal": 50, "none": 100}


def _route_applier_logs(log: Log) -> None:
    """The applier's records (backend choice, drift, warnings) go to this plugin's log too."""
    from istio_iptables import lazylog

    writers = {"debug": log.debug, "info": log.info, "warning": log.warn, "error": log.error}
    lazylog.set_sink(lambda level, msg: writers[level](msg))


class Log:
    """A tiny leveled logger to stderr and, optionally, a file (the logging module costs start-up)."""

    def __init__(
        self, stream: IO[str], level: str = "info", path: str | None = None, scope: str = ""
    ) -> None:
        self.stream = stream
        self.threshold = _LEVELS.get(level.lower(), 20)
        self.scope = scope
        self.file: IO[str] | None = None
        self.file_error: str | None = None
        if path:
            try:
                self.file = open(path, "a", encoding="utf-8")  # noqa: SIM115 - lives as long as the process
            except OSError as e:
                self.file_error = f"cannot open log file {path}: {e.strerror}"

    def scoped(self, scope: str) -> Log:
        other = Log(self.stream)
        other.threshold, other.file, other.scope = self.threshold, self.file, scope
        return other

    def _write(self, level: str, value: int, msg: str) -> None:
        if value < self.threshold:
            return
        now = time.time()
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now % 1 * 1e6):06d}Z"
        scope = f"\t{self.scope}" if self.scope else ""
        line = f"{stamp}\t{level}\tistio-cni{scope}\t{msg}\n"
        for out in (self.stream, self.file):
            if out is not None:
                try:
                    out.write(line)
                    out.flush()
                except OSError:
                    pass

    def debug(self, msg: str) -> None:
        self._write("debug", 10, msg)

    def info(self, msg: str) -> None:
        self._write("info", 20, msg)

    def warn(self, msg: str) -> None:
        self._write("warn", 30, msg)

    def error(self, msg: str) -> None:
        self._write("error", 40, msg)


class PluginConf(NamedTuple):
    """This plugin's keys of the network configuration, type-checked."""

    cni_version: str
    log_level: str = "info"
    log_file: str | None = None
    kubeconfig: str = ""
    cni_bin_dir: str = ""
    exclude_namespaces: frozenset[str] = frozenset()
    pod_namespace: str = ""
    native_nftables: bool = False
    api_deadline: float = 30.0
    api_request_timeout: float = 5.0

    @classmethod
    def parse(cls, raw: Mapping[str, Any], version: str) -> PluginConf:
        kube = raw.get("kubernetes") or {}
        if not isinstance(kube, dict):
            raise _bad_key("kubernetes", kube, "an object")
        excluded = [
            *_str_list(raw, "exclude_namespaces"),
            *_str_list(kube, "exclude_namespaces", "kubernetes."),
        ]
        level = _opt_str(raw, "plugin_log_level") or _opt_str(raw, "log_level") or "info"
        if level.lower() not in _LEVELS:
            raise _bad_key("plugin_log_level", level, "one of debug, info, warn, error, none")
        return cls(
            cni_version=version,
            log_level=level,
            log_file=_opt_str(raw, "log_file") or None,
            kubeconfig=_opt_str(kube, "kubeconfig", "kubernetes."),
            cni_bin_dir=_opt_str(kube, "cni_bin_dir", "kubernetes."),
            exclude_namespaces=frozenset(excluded),
            pod_namespace=_opt_str(raw, "pod_namespace"),
            native_nftables=_opt_bool(raw, "native_nftables"),
            api_deadline=_opt_seconds(kube, "api_deadline_seconds", 30.0),
            api_request_timeout=_opt_seconds(kube, "api_request_timeout_seconds", 5.0),
        )


def _bad_key(key: str, value: Any, expected: str) -> CniError:
    return CniError(
        ERR_INVALID_NETWORK_CONFIG, f"invalid network configuration: {key} must be {expected}", repr(value)
    )


def _opt_str(d: Mapping[str, Any], key: str, prefix: str = "") -> str:
    v = d.get(key)
    if v is None:
        return ""
    if not isinstance(v, str):
        raise _bad_key(prefix + key, v, "a string")
    return v


def _opt_bool(d: Mapping[str, Any], key: str) -> bool:
    v = d.get(key, False)
    if not isinstance(v, bool):
        raise _bad_key(key, v, "true or false")
    return v


def _opt_seconds(d: Mapping[str, Any], key: str, default: float) -> float:
    v = d.get(key, default)
    if isinstance(v, bool) or not isinstance(v, int | float) or not 0 < v <= 3600:
        raise _bad_key("kubernetes." + key, v, "a number of seconds (0-3600]")
    return float(v)


def _str_list(d: Mapping[str, Any], key: str, prefix: str = "") -> list[str]:
    v = d.get(key)
    if v is None:
        return []
    if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
        raise _bad_key(prefix + key, v, "a list of strings")
    return v


# --- commands ------------------------------------------------------------------------------


class Call(NamedTuple):
    """Everything a command handler needs."""

    inv: Invocation
    raw: dict[str, Any]
    conf: PluginConf
    log: Log
    executor: Executor | None = None


def _response(call: Call) -> dict[str, Any]:
    """Chained: the prevResult in the requested version. Standalone: an empty result."""
    if "prevResult" in call.raw and call.raw["prevResult"] is not None:
        return render_result(parse_result(call.raw["prevResult"]), call.conf.cni_version)
    return render_result(Result(), call.conf.cni_version)


def _check_netns(path: str) -> None:
    """The namespace must exist and must not be the plugin's own (rules would land on the node)."""
    try:
        st = os.stat(path)
    except OSError as e:
        raise CniError(
            ERR_INVALID_NETNS, f"cannot open network namespace {path!r}", e.strerror or ""
        ) from None
    try:
        own = os.stat("/proc/self/ns/net")
    except OSError:
        return
    if (st.st_dev, st.st_ino) == (own.st_dev, own.st_ino):
        raise CniError(ERR_INVALID_NETNS, "plugin's netns and netns from CNI_NETNS should not be the same")


def cmd_add(call: Call) -> dict[str, Any]:
    response = _response(call)  # parses prevResult first: a bad one fails before anything is done
    inv, conf = call.inv, call.conf
    _check_netns(inv.netns)
    k8s = parse_cni_args(inv.args, K8S_ARGS)
    namespace, name = k8s.get("K8S_POD_NAMESPACE", ""), k8s.get("K8S_POD_NAME", "")
    log = call.log.scoped(f"pod={namespace}/{name}")
    if not namespace or not name:
        log.info("not a Kubernetes pod (no K8S_POD_NAMESPACE/K8S_POD_NAME in CNI_ARGS), passing through")
        return response
    if namespace in conf.exclude_namespaces:
        log.info("pod namespace excluded, passing through")
        return response

    pod = _read_pod(conf, namespace, name, log)
    if pod is None:
        return response

    from cni.pod import PodError, build_config, pod_info, skip_reason

    try:
        info = pod_info(pod)
    except PodError as e:
        raise CniError(ERR_INTERNAL, f"pod {namespace}/{name}: unusable Pod object", str(e)) from None
    reason = skip_reason(info)
    if reason is not None:
        log.info(f"{reason}, passing through")
        return response
    from istio_iptables.config import ConfigError

    try:
        capture = build_config(info, _pod_addresses(call))
    except ConfigError as e:
        # Nothing has been installed: the pod does not start without its rules.
        raise CniError(
            ERR_INTERNAL, f"pod {namespace}/{name}: invalid {e.source} value {e.value!r}", e.reason
        ) from None
    for note in capture.notes:
        log.warn(note)
    _install(call, capture.config, log)
    return response


def _read_pod(conf: PluginConf, namespace: str, name: str, log: Log) -> dict[str, Any] | None:
    """The Pod from the API, or None for our own istio-cni-node pod when the API cannot be used."""
    from cni.kube import KubeError, RetryPolicy, fetch_pod

    def is_node_pod() -> bool:
        return (
            name.startswith(NODE_POD_PREFIX) and bool(conf.pod_namespace) and namespace == conf.pod_namespace
        )

    if not conf.kubeconfig:
        if is_node_pod():
            log.info("no kubeconfig yet and this looks like our own istio-cni-node pod, passing through")
            return None
        raise CniError(
            ERR_INVALID_NETWORK_CONFIG, "kubernetes.kubeconfig is not set in the network configuration"
        )

    bypassed = False

    def on_failure(attempt: int, err: KubeError) -> bool:
        nonlocal bypassed
        log.debug(f"reading the pod failed (attempt {attempt}): {err}")
        # As Istio: only in this degraded state is our own istio-cni-node pod let through, so the
        # installer that would repair the credentials can always start.
        if is_node_pod():
            log.info(
                f"in a degraded state ({err}) and this looks like our own istio-cni-node pod, passing through"
            )
            bypassed = True
        return bypassed

    policy = RetryPolicy(deadline=conf.api_deadline, request_timeout=conf.api_request_timeout)
    try:
        return fetch_pod(conf.kubeconfig, namespace, name, policy, on_failure=on_failure)
    except KubeError as e:
        if bypassed:
            return None
        raise CniError(
            ERR_TRY_AGAIN_LATER, f"cannot read pod {namespace}/{name} from the Kubernetes API", str(e)
        ) from None


def _pod_addresses(call: Call) -> list[Any]:
    """The pod's addresses: from prevResult (container-side interfaces), else from the namespace."""
    import ipaddress

    raw = call.raw.get("prevResult")
    if raw:
        result = parse_result(raw)
        addrs = []
        for ip in result.ips:
            idx = ip.get("interface")
            if idx is not None and idx < len(result.interfaces) and not result.interfaces[idx].get("sandbox"):
                continue  # an address on the host side of the link
            addrs.append(ipaddress.ip_interface(ip["address"]).ip)
        if addrs:
            return addrs
    from istio_iptables.executor import RealExecutor, in_netns

    ex = call.executor or RealExecutor()
    done = ex.run(in_netns(call.inv.netns, ["ip", "-o", "addr", "show"]), timeout=10)
    if not done.ok:
        call.log.warn(f"cannot list the pod's addresses: {done.stderr.strip()}")
    found = []
    for line in done.stdout.splitlines():
        fields = line.split()
        if len(fields) >= 4 and fields[2] in ("inet", "inet6"):
            try:
                found.append(ipaddress.ip_interface(fields[3]).ip)
            except ValueError:
                continue
    if all(a.is_loopback or a.is_link_local for a in found):
        # Istio fails here; a pod without an address yet gets the IPv4 rules.
        call.log.warn("the pod has no address yet; planning IPv4 rules only")
    return found


def _install(call: Call, config: Config, log: Log) -> None:
    from istio_iptables.apply import ApplyError, apply
    from istio_iptables.config import ApplyOptions
    from istio_iptables.planner import plan

    ruleset = plan(config)
    opts = ApplyOptions(
        network_namespace=call.inv.netns,
        cni_mode=True,
        # A re-ADD into a namespace that still holds our rules (a network reload) converges.
        reconcile=True,
        native_nftables=call.conf.native_nftables,
    )
    start = time.monotonic()
    try:
        apply(ruleset, opts, call.executor)
    except ApplyError as e:
        raise CniError(
            ERR_INTERNAL,
            f"failed to install the capture rules in {call.inv.netns}",
            str(getattr(e, "message", e)),
        ) from None
    mode = config.interception_mode.value
    families = "IPv4+IPv6" if config.enable_ipv6 else "IPv4"
    log.info(
        f"installed {mode} capture rules ({families}) in {call.inv.netns} in {time.monotonic() - start:.3f}s"
    )


def cmd_del(call: Call) -> None:
    # The rules live and die with the pod's namespace; Istio's DEL does nothing either. A DEL
    # must succeed for pods we never touched and when the namespace is already gone.
    call.log.debug(f"DEL {call.inv.container_id}: nothing to release")


def cmd_check(call: Call) -> None:
    # As Istio: nothing to verify outside the namespace, and no state was kept.
    call.log.debug(f"CHECK {call.inv.container_id}: ok")


def cmd_gc(call: Call) -> None:
    attachments = call.raw.get("cni.dev/valid-attachments", [])
    if not isinstance(attachments, list):
        raise CniError(ERR_DECODING_FAILURE, "cni.dev/valid-attachments is not a list")
    # No state is kept outside pod namespaces, so there is nothing stale to collect.
    call.log.debug(f"GC: {len(attachments)} valid attachments, nothing to collect")


def cmd_status(call: Call) -> None:
    """Ready when the kubeconfig it would use for an ADD can be loaded (no request is made)."""
    if not call.conf.kubeconfig:
        raise CniError(ERR_PLUGIN_NOT_AVAILABLE, "kubernetes.kubeconfig is not set")
    from cni.kube import KubeError, load_kubeconfig, ssl_context

    try:
        ssl_context(load_kubeconfig(call.conf.kubeconfig))
    except KubeError as e:
        raise CniError(
            ERR_PLUGIN_NOT_AVAILABLE, "the Kubernetes API credentials are not usable", str(e)
        ) from None


HANDLERS: dict[str, Callable[[Call], dict[str, Any] | None]] = {
    "ADD": cmd_add,
    "DEL": cmd_del,
    "CHECK": cmd_check,
    "GC": cmd_gc,
    "STATUS": cmd_status,
}


def run(
    environ: Mapping[str, str],
    stdin: IO[bytes],
    stdout: IO[str],
    stderr: IO[str],
    executor: Executor | None = None,
) -> int:
    """One plugin invocation; returns the exit status. Only the result or error goes to stdout."""
    log = Log(stderr)
    version = LATEST_VERSION  # for an error reported before the configuration is read
    try:
        if not environ.get("CNI_COMMAND"):
            stderr.write(f"{ABOUT}\nCNI protocol versions supported: {', '.join(SUPPORTED_VERSIONS)}\n")
            return 0
        inv = read_environment(environ)
        if inv.command == "VERSION":
            stdout.write(dumps(version_info()))
            return 0
        try:
            data = stdin.read()
        except OSError as e:
            raise CniError(ERR_IO_FAILURE, "error reading from stdin", str(e)) from None
        raw = parse_netconf(data)
        requested = config_version(raw)
        if requested in SUPPORTED_VERSIONS:
            version = requested
        check_version(inv.command, requested)
        try:
            conf = PluginConf.parse(raw, version)
        except CniError:
            if inv.command == "ADD":
                raise
            # DEL and friends must not fail on a key they do not use.
            conf = PluginConf(cni_version=version)
        log = Log(stderr, conf.log_level, conf.log_file)
        if log.file_error:
            log.warn(log.file_error)
        _route_applier_logs(log)
        call = Call(inv=inv._replace(stdin=data), raw=raw, conf=conf, log=log, executor=executor)
        result = HANDLERS[inv.command](call)
        if result is not None:
            stdout.write(dumps(result))
        return 0
    except CniError as e:
        log.error(f"{e.msg}{': ' + e.details if e.details else ''}")
        stdout.write(dumps(e.to_json(version)))
        return 1
    except Exception as e:  # noqa: BLE001 - a runtime must get a CNI error, never a traceback
        import traceback

        log.error(f"internal error: {traceback.format_exc()}")
        stdout.write(
            dumps(
                CniError(ERR_INTERNAL, f"istio-cni internal error: {type(e).__name__}: {e}").to_json(version)
            )
        )
        return 1


def main() -> None:
    """Console entry point."""
    stdout = sys.stdout
    # Anything stray (a library's print) must not corrupt the result: route it to stderr.
    sys.stdout = sys.stderr
    code = run(os.environ, sys.stdin.buffer, stdout, sys.stderr)
    stdout.flush()
    exit_now(code)
