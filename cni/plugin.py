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
  native_nftables               true: install native nftables rules (Istio's nativeNftables)
  kubernetes.kubeconfig         the kubeconfig used to read the Pod
  kubernetes.cni_bin_dir        accepted for compatibility (nothing is executed from it)
  kubernetes.api_deadline_seconds         overall time to read the Pod (default 30)
  kubernetes.api_request_timeout_seconds  time for one request (default 5)
"""

from __future__ import annotations

import os
import sys
import time

from cni import addstats
from cni.protocol import (
    ERR_DECODING_FAILURE,
    ERR_INTERNAL,
    ERR_INVALID_NETNS,
    ERR_INVALID_NETWORK_CONFIG,
    ERR_IO_FAILURE,
    ERR_PLUGIN_NOT_AVAILABLE,
    ERR_TRY_AGAIN_LATER,
    ERR_UNKNOWN_CONTAINER,
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
from istio_iptables import logsink
from istio_iptables.startup import exit_now

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping
    from typing import IO, Any

    from istio_iptables.config import Config
    from istio_iptables.executor import Executor
    from istio_iptables.logsink import Sink
    from istio_iptables.netns import Netns

ABOUT = "istio-cni: the chained CNI plugin that installs the mesh's traffic capture rules in meshed pods"
K8S_ARGS = frozenset({"K8S_POD_NAME", "K8S_POD_NAMESPACE", "K8S_POD_INFRA_CONTAINER_ID", "K8S_POD_UID"})
# The plugin's own node DaemonSet names its pods like this.
NODE_POD_PREFIX = "istio-cni-node-"

PROGRAM = "istio-cni"  # the program field of its log lines


def _open_log(stderr: IO[str], conf: PluginConf) -> Sink:
    """The plugin's log at the configured level: stderr and, when the configuration names one,
    a file (istio_iptables.logsink: Istio's lines, the ``logging`` module costs start-up)."""
    file, why = logsink.open_log_file(conf.log_file) if conf.log_file else (None, None)
    log = logsink.Sink(logsink.level_number(conf.log_level), program=PROGRAM, stream=stderr, file=file)
    if why:
        log.warn(why)
    return log


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
        if level.lower() not in logsink.LEVELS:
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
    log: Sink
    executor: Executor | None = None


def _response(call: Call) -> dict[str, Any]:
    """Chained: the prevResult in the requested version. Standalone: an empty result."""
    if "prevResult" in call.raw and call.raw["prevResult"] is not None:
        return render_result(parse_result(call.raw["prevResult"]), call.conf.cni_version)
    return render_result(Result(), call.conf.cni_version)


def _open_netns(path: str) -> Netns:
    """CNI_NETNS, opened once: it must exist and must not be the plugin's own namespace (rules
    would land on the node). Every later step uses this descriptor, never the path again, so a
    path switched to another namespace meanwhile changes nothing. Whether it is a namespace file
    at all is checked when it is used (a pass-through pod never enters it)."""
    from istio_iptables.netns import MISSING, OWN, NetnsError, open_netns

    try:
        return open_netns(path, allow_own=False, check_kind=False)
    except NetnsError as e:
        if e.kind == MISSING:
            raise CniError(
                ERR_UNKNOWN_CONTAINER, f"cannot open network namespace {path!r}", os.strerror(e.errno or 2)
            ) from None
        if e.kind == OWN:
            raise CniError(
                ERR_INVALID_NETNS, "plugin's netns and netns from CNI_NETNS should not be the same"
            ) from None
        raise CniError(ERR_INVALID_NETNS, f"cannot open network namespace {path!r}", str(e)) from None


def cmd_add(call: Call) -> dict[str, Any]:
    response = _response(call)  # parses prevResult first: a bad one fails before anything is done
    ns = _open_netns(call.inv.netns)
    try:
        _add(call, ns)
    finally:
        ns.close()
    return response


def _add(call: Call, ns: Netns) -> None:
    inv, conf = call.inv, call.conf
    k8s = parse_cni_args(inv.args, K8S_ARGS)
    namespace, name = k8s.get("K8S_POD_NAMESPACE", ""), k8s.get("K8S_POD_NAME", "")
    log = call.log.scoped(f"pod={namespace}/{name}")
    if not namespace or not name:
        log.info("not a Kubernetes pod (no K8S_POD_NAMESPACE/K8S_POD_NAME in CNI_ARGS), passing through")
        return
    if namespace in conf.exclude_namespaces:
        log.info("pod namespace excluded, passing through")
        return

    pod = _read_pod(conf, namespace, name, log)
    if pod is None:
        return

    from cni.pod import PodError, build_config, pod_info, skip_reason

    try:
        info = pod_info(pod)
    except PodError as e:
        raise CniError(ERR_INTERNAL, f"pod {namespace}/{name}: unusable Pod object", str(e)) from None
    reason = skip_reason(info)
    if reason is not None:
        log.info(f"{reason}, passing through")
        return
    from istio_iptables.config import ConfigError

    try:
        capture = build_config(info, _pod_addresses(call, ns))
    except ConfigError as e:
        # Nothing has been installed: the pod does not start without its rules.
        value = logsink.shown(e.value)
        what = f"pod {namespace}/{name}: invalid {e.source} value {value}"
        raise CniError(ERR_INTERNAL, what, e.reason) from None
    for note in capture.notes:
        log.warn(note)
    _install(call, capture.config, log, ns)


def _read_pod(conf: PluginConf, namespace: str, name: str, log: Sink) -> dict[str, Any] | None:
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


def _pod_addresses(call: Call, ns: Netns) -> list[Any]:
    """The pod's addresses: from prevResult (container-side interfaces), else from the namespace,
    read over netlink as istio-iptables reads them: every IPv4 address, then every IPv6 one (Go's
    net.InterfaceAddrs order, which Istio's plugin sees), so without dual stack an address of
    each family means IPv4 rules."""
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
    from istio_iptables import netlink
    from istio_iptables.netns import NetnsError

    try:
        ns.check_kind()
        listed = netlink.in_netns(ns, netlink.local_addresses)
    except (NetnsError, netlink.NetlinkError) as e:
        call.log.warn(f"cannot list the pod's addresses: {e}")
        listed = []
    found = [ipaddress.ip_address(a) for a in listed]
    if all(a.is_loopback or a.is_link_local for a in found):
        # Istio fails here; a pod without an address yet gets the IPv4 rules.
        call.log.warn("the pod has no address yet; planning IPv4 rules only")
    return found


# Seconds an ADD waits for a pod namespace that another apply holds (a retried ADD), and for a
# busy xtables lock: Istio's --wait=30.
LOCK_WAIT = 30

# What a runtime should make of each way applying can fail (ApplyError kinds).
_APPLY_CODES = {
    "lock": ERR_TRY_AGAIN_LATER,  # another apply into this pod, or a held xtables lock
    "netns": ERR_UNKNOWN_CONTAINER,  # the namespace went away meanwhile
    "binary-missing": ERR_PLUGIN_NOT_AVAILABLE,  # the node (or bundle) lacks iptables
}


def _install(call: Call, config: Config, log: Sink, ns: Netns) -> None:
    from istio_iptables.apply import ApplyError, apply
    from istio_iptables.config import ApplyOptions

    opts = ApplyOptions(
        network_namespace=call.inv.netns,
        cni_mode=True,
        # A re-ADD into a namespace that still holds our rules (a network reload) converges.
        reconcile=True,
        native_nftables=call.conf.native_nftables,
    )
    start = time.monotonic()
    where = f"failed to install the capture rules in {call.inv.netns}"
    from istio_iptables.netns import NetnsError

    try:
        ns.check_kind()
    except NetnsError as e:
        raise CniError(ERR_INVALID_NETNS, where, str(e)) from None
    try:
        if opts.native_nftables:
            from istio_iptables.nft_apply import apply_nft
            from istio_iptables.planner import plan_nft

            apply_nft(plan_nft(config), opts, call.executor, netns=ns, lock_wait=LOCK_WAIT)
        else:
            from istio_iptables.planner import plan

            apply(plan(config), opts, call.executor, netns=ns, lock_wait=LOCK_WAIT)
    except ApplyError as e:
        raise CniError(_APPLY_CODES.get(e.kind, ERR_INTERNAL), where, str(getattr(e, "message", e))) from None
    mode = config.interception_mode.value
    families = "IPv4+IPv6" if config.enable_ipv6 else "IPv4"
    if opts.native_nftables:
        families += ", nftables"
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
    stdin: IO[bytes] | None,
    stdout: IO[str] | None,
    stderr: IO[str],
    executor: Executor | None = None,
) -> int:
    """One plugin invocation; returns the exit status. Only the result or error goes to stdout,
    as one JSON document written when the call is done (``stdin`` or ``stdout`` None: the runtime
    closed it)."""
    log = logsink.Sink(program=PROGRAM, stream=stderr)
    version = LATEST_VERSION  # for an error reported before the configuration is read
    previous_sink = logsink.get_sink()
    code, doc = 0, None
    started, raw = time.monotonic(), None
    try:
        if not environ.get("CNI_COMMAND"):
            try:  # noqa: SIM105 - contextlib.suppress would be one more import
                stderr.write(f"{ABOUT}\nCNI protocol versions supported: {', '.join(SUPPORTED_VERSIONS)}\n")
            except (OSError, ValueError):
                pass
            return 0
        inv = read_environment(environ)
        if inv.command == "VERSION":
            doc = version_info()
        else:
            if stdin is None:
                raise CniError(ERR_IO_FAILURE, "error reading from stdin", "stdin is closed")
            try:
                data = stdin.read()
            except (OSError, ValueError) as e:  # ValueError: a stream closed meanwhile
                raise CniError(ERR_IO_FAILURE, "error reading from stdin", str(e)) from None
            raw = parse_netconf(data)
            requested = config_version(raw)
            if requested in SUPPORTED_VERSIONS:
                version = requested
            check_version(inv.command, requested)
            try:
                conf = PluginConf.parse(raw, version)
                if "\0" in conf.kubeconfig:
                    # No file has such a name; open() would say so with a ValueError, not OSError.
                    raise _bad_key("kubernetes.kubeconfig", conf.kubeconfig, "a file path")
            except CniError:
                if inv.command == "ADD":
                    raise
                # DEL and friends must not fail on a key they do not use.
                conf = PluginConf(cni_version=version)
            log = _open_log(stderr, conf)
            # The applier's records (backend choice, drift, warnings) go to this log too.
            logsink.set_sink(log)
            call = Call(inv=inv._replace(stdin=data), raw=raw, conf=conf, log=log, executor=executor)
            doc = HANDLERS[inv.command](call)
    except CniError as e:
        log.error(f"{e.msg}{': ' + e.details if e.details else ''}")
        code, doc = 1, e.to_json(version)
    except Exception as e:  # noqa: BLE001 - a runtime must get a CNI error, never a traceback
        import traceback

        log.error(f"internal error: {traceback.format_exc()}")
        code = 1
        doc = CniError(ERR_INTERNAL, f"istio-cni internal error: {type(e).__name__}: {e}").to_json(version)
    finally:
        # In-process callers (tests) find the applier's records going where they went before.
        logsink.set_sink(previous_sink)
    if doc is not None:
        try:
            if stdout is None:
                raise OSError("stdout is closed")
            stdout.write(dumps(doc))
            stdout.flush()
        except (OSError, ValueError) as e:
            # The runtime gets no answer: a failure, and nothing more that could be written there.
            log.error(f"cannot write the {'error' if code else 'result'} to stdout: {e}")
            return 1
    # The node agent's count and latency of ADDs and DELs: one datagram, never waited on.
    addstats.record(environ.get("CNI_COMMAND", ""), code, time.monotonic() - started, raw)
    return code


def main() -> None:
    """Console entry point."""
    # A runtime may start the plugin with a standard stream closed (Python has None there then):
    # a closed stdin fails the commands that read it, a closed stdout every command that answers
    # (the answer cannot be delivered); the log meant for a closed stderr is dropped.
    stdin = sys.stdin.buffer if sys.stdin is not None else None
    stdout = sys.stdout
    if sys.stderr is None:
        sys.stderr = open(os.devnull, "w")  # noqa: SIM115 - lives as long as the process
    # Anything stray (a library's print) must not corrupt the result: route it to stderr.
    sys.stdout = sys.stderr
    code = run(os.environ, stdin, stdout, sys.stderr)
    exit_now(code)
