"""What the benchmark serves and feeds: a kubeconfig with a bearer token, meshed Pod objects as a
sidecar injector leaves them, and the CNI configuration (the PKI and the API server are
tests.support's)."""

from __future__ import annotations

import ipaddress
import json
import secrets
from pathlib import Path
from typing import Any

from tests.support import kubeconfig, plugin

NAMESPACE = "bench"
POD_IPV4 = "10.244.1.5"
POD_IPV6 = "fd00:10:244:1::5"
CIDRS_ANNOTATION = "traffic.sidecar.istio.io/excludeOutboundIPRanges"
PROXY_ARGS = [
    "proxy",
    "sidecar",
    "--domain",
    "$(POD_NAMESPACE).svc.cluster.local",
    "--proxyLogLevel=warning",
    "--proxyComponentLogLevel=misc:error",
    "--log_output_level=default:info",
]


KUBECONFIG_SOURCE = "cni.install.kubeconfig.render_kubeconfig"


def write_kubectl_kubeconfig(path: Path, server: str, ca_file: Path, token: str) -> None:
    """An ordinary YAML kubeconfig, as ``kubectl config view --raw`` prints one (keys sorted, the
    CA inline, ``preferences: {}``): what users point ``kubernetes.kubeconfig`` at."""
    path.write_text(kubeconfig.yaml_kubeconfig("kubectl-config-view", server, ca_file, token))
    path.chmod(0o600)


def write_kubeconfig(path: Path, server: str, ca_file: Path, token: str) -> None:
    """The kubeconfig install-cni writes for the plugin (its own renderer when it has one): the
    service-account token and the cluster CA inline."""
    global KUBECONFIG_SOURCE
    try:
        from cni.install.kubeconfig import render_kubeconfig

        data = render_kubeconfig(server, ca_file.read_bytes(), token)
    except (ImportError, AttributeError, TypeError):
        KUBECONFIG_SOURCE = "bench (cni.install.kubeconfig.render_kubeconfig unavailable)"
        kubeconfig.write_kubeconfig(path, server, ca_data=ca_file, token=token, fmt="json")
        return
    path.write_bytes(data)
    path.chmod(0o600)


def new_token() -> str:
    return secrets.token_urlsafe(32)


def meshed_pod(name: str, annotations: dict[str, str] | None = None) -> dict[str, Any]:
    """A Pod as the sidecar injector leaves it in CNI mode: an application container, the
    ``istio-proxy`` sidecar (uid/gid 1337, dual stack on), the ``istio-validation`` init container
    and the injector's status annotation."""
    status = {
        "initContainers": ["istio-validation"],
        "containers": ["istio-proxy"],
        "volumes": ["workload-socket", "credential-socket", "workload-certs", "istio-envoy", "istio-data",
                    "istio-podinfo", "istio-token", "istiod-ca-cert"],
        "imagePullSecrets": None,
        "revision": "default",
    }  # fmt: skip
    ann = {
        "sidecar.istio.io/status": json.dumps(status, separators=(",", ":")),
        "kubectl.kubernetes.io/default-container": "app",
        "prometheus.io/path": "/stats/prometheus",
        "prometheus.io/port": "15020",
        "prometheus.io/scrape": "true",
        "istio.io/rev": "default",
    }
    ann.update(annotations or {})
    proxy_env = [
        {"name": "PILOT_CERT_PROVIDER", "value": "istiod"},
        {"name": "CA_ADDR", "value": "istiod.istio-system.svc:15012"},
        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.name"}}},
        {"name": "POD_NAMESPACE",
         "valueFrom": {"fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.namespace"}}},
        {"name": "INSTANCE_IP", "valueFrom": {"fieldRef": {"apiVersion": "v1", "fieldPath": "status.podIP"}}},
        {"name": "SERVICE_ACCOUNT",
         "valueFrom": {"fieldRef": {"apiVersion": "v1", "fieldPath": "spec.serviceAccountName"}}},
        {"name": "PROXY_CONFIG", "value": "{}\n"},
        {"name": "ISTIO_META_POD_PORTS", "value": '[{"containerPort":8080,"protocol":"TCP"}]'},
        {"name": "ISTIO_META_APP_CONTAINERS", "value": "app"},
        {"name": "ISTIO_META_CLUSTER_ID", "value": "Kubernetes"},
        {"name": "ISTIO_META_INTERCEPTION_MODE", "value": "REDIRECT"},
        {"name": "ISTIO_META_MESH_ID", "value": "cluster.local"},
        {"name": "TRUST_DOMAIN", "value": "cluster.local"},
        {"name": "ISTIO_DUAL_STACK", "value": "true"},
    ]  # fmt: skip
    proxy = {
        "name": "istio-proxy",
        "image": "docker.io/istio/proxyv2:1.24.0",
        "args": PROXY_ARGS,
        "ports": [{"containerPort": 15090, "name": "http-envoy-prom", "protocol": "TCP"}],
        "env": proxy_env,
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
            "privileged": False,
            "readOnlyRootFilesystem": True,
            "runAsGroup": 1337,
            "runAsNonRoot": True,
            "runAsUser": 1337,
        },
        "readinessProbe": {"httpGet": {"path": "/healthz/ready", "port": 15021}, "periodSeconds": 15},
    }  # fmt: skip
    return {
        "kind": "Pod",
        "apiVersion": "v1",
        "metadata": {
            "name": name,
            "namespace": NAMESPACE,
            "uid": "0f4e1c3a-2b7d-4c59-9a8e-" + secrets.token_hex(6),
            "resourceVersion": "123456",
            "labels": {"app": "productpage", "version": "v1", "security.istio.io/tlsMode": "istio",
                       "service.istio.io/canonical-name": "productpage"},
            "annotations": ann,
        },
        "spec": {
            "serviceAccountName": "bookinfo-productpage",
            "nodeName": "node-1",
            "initContainers": [
                {"name": "istio-validation", "image": "docker.io/istio/proxyv2:1.24.0",
                 "args": ["istio-iptables", "--run-validation", "--skip-rule-apply"],
                 "securityContext": {"runAsUser": 1337, "runAsGroup": 1337}},
            ],
            "containers": [
                {"name": "app", "image": "docker.io/istio/examples-bookinfo-productpage-v1:1.20.2",
                 "ports": [{"containerPort": 9080, "protocol": "TCP"}]},
                proxy,
            ],
        },
        "status": {"phase": "Pending", "podIP": POD_IPV4,
                   "podIPs": [{"ip": POD_IPV4}, {"ip": POD_IPV6}]},
    }  # fmt: skip


def excluded_cidrs(count: int) -> list[str]:
    """``count`` distinct IPv4 /24 ranges (10.0.0.0/24, 10.0.1.0/24, ...)."""
    return [str(ipaddress.IPv4Network((0x0A000000 + (i << 8), 24))) for i in range(count)]


def prev_result(netns_path: str) -> dict[str, Any]:
    """What a primary plugin (bridge + host-local) hands on: one interface, an IPv4 and an IPv6 address."""
    return {
        "cniVersion": "1.0.0",
        "interfaces": [
            {"name": "cni0", "mac": "62:8a:1e:7c:0d:11"},
            {"name": "veth4c1d2e3f", "mac": "a6:5b:3f:0e:9a:21"},
            {"name": "eth0", "mac": "0a:58:0a:f4:01:05", "sandbox": netns_path},
        ],
        "ips": [
            {"interface": 2, "address": f"{POD_IPV4}/24", "gateway": "10.244.1.1"},
            {"interface": 2, "address": f"{POD_IPV6}/64", "gateway": "fd00:10:244:1::1"},
        ],
        "routes": [{"dst": "0.0.0.0/0", "gw": "10.244.1.1"}, {"dst": "::/0", "gw": "fd00:10:244:1::1"}],
        "dns": {},
    }


def cni_config(
    kubeconfig: Path, netns_path: str, *, log_level: str = "info", native_nftables: bool = False
) -> dict[str, Any]:
    """The plugin's conflist entry as the runtime passes it on ADD (with ``prevResult``);
    ``native_nftables`` adds ``"native_nftables": true``."""
    conf: dict[str, Any] = {
        "cniVersion": "1.0.0",
        "name": "k8s-pod-network",
        "type": "istio-cni",
        "log_level": log_level,
        "plugin_log_level": log_level,
        "kubernetes": {
            "kubeconfig": str(kubeconfig),
            "cni_bin_dir": "/opt/cni/bin",
            "exclude_namespaces": ["istio-system", "kube-system"],
        },
        "prevResult": prev_result(netns_path),
    }
    if native_nftables:
        conf["native_nftables"] = True
    return conf


def cni_env(command: str, netns_path: str, pod: str, container_id: str, cni_path: str) -> dict[str, str]:
    """The environment a runtime (kubelet via CRI) gives a CNI plugin: little more than CNI_* and PATH."""
    return plugin.cni_env(
        command,
        container_id=container_id,
        netns=netns_path,
        args=f"IgnoreUnknown=1;K8S_POD_NAMESPACE={NAMESPACE};K8S_POD_NAME={pod};"
        f"K8S_POD_INFRA_CONTAINER_ID={container_id};K8S_POD_UID=0f4e1c3a",
        cni_path=cni_path,
        path="/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    )


def container_id() -> str:
    return secrets.token_hex(32)
