"""A small CRI client: the ``runtime.v1`` RuntimeService and ImageService calls kubelet makes,
over a containerd socket, with the messages of ``cri_runtime_v1.proto`` (kubelet's field
numbers) compiled by grpcio-tools when this module is first imported.

``pb`` is the generated message module; ``CRIClient`` wraps the RPCs the tests need and builds
the requests the way kubelet fills them for a pod (``sandbox_config``, ``container_config``)."""

from __future__ import annotations

import atexit
import importlib
import json
import shutil
import sys
import tempfile
import threading
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import grpc

PROTO = Path(__file__).resolve().with_name("cri_runtime_v1.proto")
_lock = threading.Lock()
_modules: tuple[ModuleType, ModuleType] | None = None


def _compile() -> tuple[ModuleType, ModuleType]:
    """The generated message and service modules, compiled from PROTO into a private temporary
    directory of this process (removed at exit): nothing generated is kept in the tree."""
    global _modules
    with _lock:
        if _modules is not None:
            return _modules
        from grpc_tools import protoc

        out = Path(tempfile.mkdtemp(prefix="cri-proto-"))
        atexit.register(shutil.rmtree, out, True)
        args = ["protoc", f"-I{PROTO.parent}", f"--python_out={out}", f"--grpc_python_out={out}", PROTO.name]
        if protoc.main(args) != 0:
            raise RuntimeError(f"grpc_tools.protoc could not compile {PROTO}")
        sys.path.insert(0, str(out))
        try:
            stem = PROTO.stem
            _modules = (importlib.import_module(f"{stem}_pb2"), importlib.import_module(f"{stem}_pb2_grpc"))
        finally:
            sys.path.remove(str(out))
        return _modules


pb, pb_grpc = _compile()

# Kubelet's own labels on every sandbox and container (what crictl and kubectl show).
POD_NAME_LABEL = "io.kubernetes.pod.name"
POD_NAMESPACE_LABEL = "io.kubernetes.pod.namespace"
POD_UID_LABEL = "io.kubernetes.pod.uid"
CONTAINER_NAME_LABEL = "io.kubernetes.container.name"


class CRIError(Exception):
    """An RPC failed; ``code`` is the gRPC status code, ``details`` the runtime's message."""

    def __init__(self, method: str, err: grpc.RpcError) -> None:
        self.method = method
        self.code = err.code() if hasattr(err, "code") else None
        self.details = err.details() if hasattr(err, "details") else str(err)
        super().__init__(f"{method}: {self.code}: {self.details}")


def sandbox_config(
    name: str,
    namespace: str,
    uid: str,
    *,
    attempt: int = 0,
    labels: Mapping[str, str] | None = None,
    annotations: Mapping[str, str] | None = None,
    log_directory: str = "",
    cgroup_parent: str = "",
    host_network: bool = False,
    dns_servers: Sequence[str] = ("127.0.0.1",),
) -> Any:
    """A PodSandboxConfig as kubelet builds it for a pod: metadata (name, namespace, uid),
    hostname, kubelet's labels, the pod's annotations, its log directory, the network namespace
    (the pod's own, or the node's for hostNetwork), seccomp unconfined as kubelet's default, and
    the pod's resolv.conf: kubelet names the cluster's DNS service; here by default a loopback
    address, so that a lookup in a test pod fails at once and sends nothing off the machine (the
    runtime would otherwise copy the node's resolv.conf)."""
    all_labels = {POD_NAME_LABEL: name, POD_NAMESPACE_LABEL: namespace, POD_UID_LABEL: uid, **(labels or {})}
    ns_mode = pb.NODE if host_network else pb.POD
    return pb.PodSandboxConfig(
        metadata=pb.PodSandboxMetadata(name=name, uid=uid, namespace=namespace, attempt=attempt),
        hostname="" if host_network else name[:63],
        log_directory=log_directory,
        dns_config=pb.DNSConfig(servers=list(dns_servers)) if dns_servers else None,
        labels=all_labels,
        annotations=dict(annotations or {}),
        linux=pb.LinuxPodSandboxConfig(
            cgroup_parent=cgroup_parent,
            security_context=pb.LinuxSandboxSecurityContext(
                namespace_options=pb.NamespaceOption(network=ns_mode, pid=pb.CONTAINER, ipc=pb.POD),
                seccomp=pb.SecurityProfile(profile_type=pb.SecurityProfile.Unconfined),
            ),
        ),
    )


def container_config(
    name: str,
    image: str,
    *,
    command: Sequence[str] = (),
    args: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
    mounts: Iterable[tuple[str, str, bool]] = (),
    run_as_user: int | None = None,
    run_as_group: int | None = None,
    add_caps: Sequence[str] = (),
    drop_caps: Sequence[str] = (),
    readonly_rootfs: bool = False,
    no_new_privs: bool = False,
    seccomp_runtime_default: bool = False,
    host_network: bool = False,
    attempt: int = 0,
    pod_labels: Mapping[str, str] | None = None,
) -> Any:
    """A ContainerConfig as kubelet builds it from a container of the pod spec: command (the
    image's entrypoint when empty) and args, environment, bind mounts (host path, container path,
    read-only), the security context (user, group, capabilities as named in the pod spec, read-only
    root, no_new_privs for allowPrivilegeEscalation=false), and the log path under the sandbox's
    log directory."""
    sc = pb.LinuxContainerSecurityContext(
        capabilities=pb.Capability(add_capabilities=list(add_caps), drop_capabilities=list(drop_caps)),
        namespace_options=pb.NamespaceOption(network=pb.NODE if host_network else pb.POD, pid=pb.CONTAINER),
        readonly_rootfs=readonly_rootfs,
        no_new_privs=no_new_privs,
        seccomp=pb.SecurityProfile(
            profile_type=pb.SecurityProfile.RuntimeDefault
            if seccomp_runtime_default
            else pb.SecurityProfile.Unconfined
        ),
    )
    if run_as_user is not None:
        sc.run_as_user.value = run_as_user
    if run_as_group is not None:
        sc.run_as_group.value = run_as_group
    labels = {**(pod_labels or {}), CONTAINER_NAME_LABEL: name}
    return pb.ContainerConfig(
        metadata=pb.ContainerMetadata(name=name, attempt=attempt),
        image=pb.ImageSpec(image=image),
        command=list(command),
        args=list(args),
        envs=[pb.KeyValue(key=k, value=v) for k, v in (env or {}).items()],
        mounts=[pb.Mount(host_path=h, container_path=c, readonly=ro) for h, c, ro in mounts],
        labels=labels,
        log_path=f"{name}/{attempt}.log",
        linux=pb.LinuxContainerConfig(security_context=sc),
    )


class CRIClient:
    """The RuntimeService and ImageService of one runtime socket, called as kubelet calls them
    (unix socket, a deadline on every call)."""

    def __init__(self, socket_path: str | Path, *, timeout: float = 60.0) -> None:
        self.timeout = timeout
        self.channel = grpc.insecure_channel(f"unix://{socket_path}")
        self.runtime = pb_grpc.RuntimeServiceStub(self.channel)
        self.images = pb_grpc.ImageServiceStub(self.channel)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> CRIClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, stub: Any, method: str, request: Any, timeout: float | None = None) -> Any:
        try:
            return getattr(stub, method)(request, timeout=timeout or self.timeout)
        except grpc.RpcError as e:
            raise CRIError(method, e) from None

    # --- RuntimeService -----------------------------------------------------------------------

    def version(self) -> Any:
        return self._call(self.runtime, "Version", pb.VersionRequest(version="v1"))

    def status(self, *, verbose: bool = False) -> Any:
        return self._call(self.runtime, "Status", pb.StatusRequest(verbose=verbose))

    def cni_config(self) -> dict[str, Any]:
        """The CNI configuration the runtime has loaded (containerd's verbose Status)."""
        info = self.status(verbose=True).info
        return dict(json.loads(info.get("cniconfig", "{}")))

    def run_pod_sandbox(self, config: Any, *, runtime_handler: str = "", timeout: float | None = None) -> str:
        req = pb.RunPodSandboxRequest(config=config, runtime_handler=runtime_handler)
        return str(self._call(self.runtime, "RunPodSandbox", req, timeout).pod_sandbox_id)

    def stop_pod_sandbox(self, sandbox_id: str) -> None:
        self._call(self.runtime, "StopPodSandbox", pb.StopPodSandboxRequest(pod_sandbox_id=sandbox_id))

    def remove_pod_sandbox(self, sandbox_id: str) -> None:
        self._call(self.runtime, "RemovePodSandbox", pb.RemovePodSandboxRequest(pod_sandbox_id=sandbox_id))

    def pod_sandbox_status(self, sandbox_id: str, *, verbose: bool = False) -> Any:
        req = pb.PodSandboxStatusRequest(pod_sandbox_id=sandbox_id, verbose=verbose)
        return self._call(self.runtime, "PodSandboxStatus", req)

    def list_pod_sandbox(self, labels: Mapping[str, str] | None = None) -> list[Any]:
        req = pb.ListPodSandboxRequest(filter=pb.PodSandboxFilter(label_selector=dict(labels or {})))
        return list(self._call(self.runtime, "ListPodSandbox", req).items)

    def netns_path(self, sandbox_id: str) -> str:
        """The sandbox's network namespace file: PodSandboxStatus(verbose) info["info"] ->
        runtimeSpec.linux.namespaces[type=network].path (what ``crictl inspectp`` shows)."""
        info = json.loads(self.pod_sandbox_status(sandbox_id, verbose=True).info["info"])
        for ns in info["runtimeSpec"]["linux"]["namespaces"]:
            if ns["type"] == "network":
                return str(ns.get("path", ""))
        return ""

    def pod_ip(self, sandbox_id: str) -> str:
        return str(self.pod_sandbox_status(sandbox_id).status.network.ip)

    def create_container(self, sandbox_id: str, config: Any, sandbox: Any) -> str:
        req = pb.CreateContainerRequest(pod_sandbox_id=sandbox_id, config=config, sandbox_config=sandbox)
        return str(self._call(self.runtime, "CreateContainer", req).container_id)

    def start_container(self, container_id: str) -> None:
        self._call(self.runtime, "StartContainer", pb.StartContainerRequest(container_id=container_id))

    def stop_container(self, container_id: str, timeout: int = 10) -> None:
        req = pb.StopContainerRequest(container_id=container_id, timeout=timeout)
        self._call(self.runtime, "StopContainer", req, timeout + self.timeout)

    def remove_container(self, container_id: str) -> None:
        self._call(self.runtime, "RemoveContainer", pb.RemoveContainerRequest(container_id=container_id))

    def container_status(self, container_id: str) -> Any:
        req = pb.ContainerStatusRequest(container_id=container_id)
        return self._call(self.runtime, "ContainerStatus", req).status

    def list_containers(self, sandbox_id: str = "") -> list[Any]:
        req = pb.ListContainersRequest(filter=pb.ContainerFilter(pod_sandbox_id=sandbox_id))
        return list(self._call(self.runtime, "ListContainers", req).containers)

    def exec_sync(self, container_id: str, cmd: Sequence[str], *, timeout: int = 30) -> tuple[int, str, str]:
        """Runs cmd in the container as its own user (kubelet's exec probes); (exit code, stdout,
        stderr)."""
        req = pb.ExecSyncRequest(container_id=container_id, cmd=list(cmd), timeout=timeout)
        r = self._call(self.runtime, "ExecSync", req, timeout + self.timeout)
        return int(r.exit_code), r.stdout.decode(errors="replace"), r.stderr.decode(errors="replace")

    # --- ImageService -------------------------------------------------------------------------

    def image_status(self, image: str) -> Any:
        req = pb.ImageStatusRequest(image=pb.ImageSpec(image=image))
        return self._call(self.images, "ImageStatus", req).image

    def list_images(self) -> list[Any]:
        return list(self._call(self.images, "ListImages", pb.ListImagesRequest()).images)
