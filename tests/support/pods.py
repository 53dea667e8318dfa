"""Pod objects shaped as kube-apiserver returns them for GET, built from a few parameters, from
the conformance cases' pod descriptions, or as Istio's injector leaves a meshed pod."""

from __future__ import annotations

import datetime
import uuid
from collections.abc import Iterable, Mapping
from typing import Any

PROXY_IMAGE = "docker.io/istio/proxyv2:1.24.0"


def _container(name: str, image: str = "docker.io/library/app:1") -> dict[str, Any]:
    return {
        "name": name,
        "image": image,
        "resources": {},
        "terminationMessagePath": "/dev/termination-log",
        "terminationMessagePolicy": "File",
        "imagePullPolicy": "IfNotPresent",
    }


def pod_object(
    name: str,
    namespace: str,
    *,
    annotations: Mapping[str, str] | None = None,
    labels: Mapping[str, str] | None = None,
    init_containers: Iterable[str] = (),
    containers: Iterable[str] = ("app",),
    proxy_container: str = "istio-proxy",
    proxy_env: Mapping[str, str] | None = None,
    proxy_security_context: Mapping[str, Any] | None = None,
    proxy_args: Iterable[str] | None = None,
) -> dict[str, Any]:
    """A Pod as kube-apiserver returns it for GET (apiVersion v1, kind Pod, metadata, spec, status).

    The proxy container (wherever it is listed) gets the environment, security context and args
    given; like an injected sidecar it also has fieldRef variables, which carry no literal value.
    """

    def build(cname: str) -> dict[str, Any]:
        c = _container(cname)
        if cname != proxy_container:
            return c
        c["image"] = PROXY_IMAGE
        c["args"] = list(proxy_args) if proxy_args is not None else []
        env: list[dict[str, Any]] = [{"name": k, "value": v} for k, v in (proxy_env or {}).items()]
        env += [
            {
                "name": "POD_NAME",
                "valueFrom": {"fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.name"}},
            },
            {
                "name": "POD_NAMESPACE",
                "valueFrom": {"fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.namespace"}},
            },
        ]
        c["env"] = env
        c["ports"] = [{"containerPort": 15090, "name": "http-envoy-prom", "protocol": "TCP"}]
        if proxy_security_context is not None:
            c["securityContext"] = dict(proxy_security_context)
        return c

    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    meta: dict[str, Any] = {
        "name": name,
        "namespace": namespace,
        "uid": str(uuid.uuid4()),
        "resourceVersion": "4242",
        "creationTimestamp": now,
    }
    if labels:
        meta["labels"] = dict(labels)
    if annotations:
        meta["annotations"] = dict(annotations)
    spec: dict[str, Any] = {
        "volumes": [
            {
                "name": "kube-api-access",
                "projected": {"sources": [{"serviceAccountToken": {"path": "token"}}]},
            }
        ],
        "containers": [build(c) for c in containers],
        "restartPolicy": "Always",
        "terminationGracePeriodSeconds": 30,
        "dnsPolicy": "ClusterFirst",
        "serviceAccountName": "default",
        "serviceAccount": "default",
        "nodeName": "node-1",
        "securityContext": {},
        "schedulerName": "default-scheduler",
        "priority": 0,
        "enableServiceLinks": True,
        "preemptionPolicy": "PreemptLowerPriority",
    }
    inits = list(init_containers)
    if inits:
        spec["initContainers"] = [build(c) for c in inits]
    return {
        "kind": "Pod",
        "apiVersion": "v1",
        "metadata": meta,
        "spec": spec,
        "status": {
            "phase": "Pending",
            "conditions": [
                {"type": "PodScheduled", "status": "True", "lastProbeTime": None, "lastTransitionTime": now}
            ],
            "qosClass": "BestEffort",
        },
    }


def pod_from_case(
    pod: Mapping[str, Any], *, name: str | None = None, namespace: str | None = None
) -> dict[str, Any]:
    """The Pod object for a conformance case's ``pod`` description (cni_cases.json)."""
    return pod_object(
        name or pod["name"],
        namespace or pod["namespace"],
        annotations=pod.get("annotations") or {},
        labels=pod.get("labels") or {},
        init_containers=pod.get("init_containers") or [],
        containers=pod.get("containers") or [],
        proxy_container=pod.get("proxy_container", "istio-proxy"),
        proxy_env=pod.get("proxy_env") or {},
        proxy_security_context=pod.get("proxy_security_context"),
        proxy_args=pod.get("proxy_args"),
    )


def meshed_pod(name: str, namespace: str, **kw: Any) -> dict[str, Any]:
    """An injected pod as Istio's injector leaves it with the CNI enabled (no istio-init)."""
    annotations = {"sidecar.istio.io/status": '{"containers":["istio-proxy"]}', **kw.pop("annotations", {})}
    kw.setdefault("containers", ("app", "istio-proxy"))
    kw.setdefault("init_containers", ("istio-validation",))
    kw.setdefault("proxy_args", ("proxy", "sidecar", "--domain", f"{namespace}.svc.cluster.local"))
    kw.setdefault("proxy_security_context", {"runAsUser": 1337, "runAsGroup": 1337, "runAsNonRoot": True})
    return pod_object(name, namespace, annotations=annotations, **kw)
