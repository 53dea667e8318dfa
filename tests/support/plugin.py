"""Running the CNI plugin as a runtime does (CNI_* environment, configuration on stdin, result or
error JSON on stdout), and what a runtime hands it: CNI_ARGS, the conflist entry, a prevResult."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class PluginRun:
    """One execution of the plugin: exit status, stdout (the result or error JSON) and stderr."""

    code: int
    stdout: str
    stderr: str

    @property
    def json(self) -> Any:
        return json.loads(self.stdout)


CONTAINER_ID = "5d6a1f0e8c7b4a39b2d1c0f9e8d7c6b5a4f3e2d1c0b9a8f7e6d5c4b3a2f1e0d9"


def cni_env(
    command: str,
    *,
    container_id: str = CONTAINER_ID,
    netns: str = "",
    ifname: str = "eth0",
    args: str = "",
    cni_path: str = "/opt/cni/bin",
    path: str | None = None,
) -> dict[str, str]:
    """The environment libcni gives a plugin: the CNI_* variables and PATH (``path``, else this
    process's), nothing of the runtime's own."""
    return {
        "PATH": path if path is not None else os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
        "CNI_COMMAND": command,
        "CNI_CONTAINERID": container_id,
        "CNI_NETNS": netns,
        "CNI_IFNAME": ifname,
        "CNI_ARGS": args,
        "CNI_PATH": cni_path,
    }


def run_plugin(
    exe: Path | str,
    command: str,
    conf: Mapping[str, Any] | bytes | None,
    *,
    netns: str = "",
    container_id: str = CONTAINER_ID,
    ifname: str = "eth0",
    args: str = "",
    cni_path: str = "/opt/cni/bin",
    extra_env: Mapping[str, str | None] | None = None,
    timeout: float = 120,
) -> PluginRun:
    """Runs the plugin executable with the CNI_* environment and the configuration on stdin, as
    libcni does (a minimal environment: the runtime does not pass its own). ``extra_env`` adds
    variables; a None value removes one."""
    environ: dict[str, str | None] = {
        **cni_env(command, container_id=container_id, netns=netns, ifname=ifname, args=args, cni_path=cni_path),
        **(extra_env or {}),
    }
    data = conf if isinstance(conf, bytes) else (b"" if conf is None else json.dumps(conf).encode())
    p = subprocess.run(
        [str(exe)],
        input=data,
        env={k: v for k, v in environ.items() if v is not None},
        capture_output=True,
        timeout=timeout,
        check=False,
    )
    return PluginRun(p.returncode, p.stdout.decode(), p.stderr.decode())


def k8s_args(namespace: str, name: str, *, extra: str = "IgnoreUnknown=1") -> str:
    """CNI_ARGS as kubelet (containerd, CRI-O) passes them."""
    return (
        f"{extra};K8S_POD_NAMESPACE={namespace};K8S_POD_NAME={name};K8S_POD_INFRA_CONTAINER_ID=5d6a1f0e8c7b"
    )


def netconf(
    kubeconfig: Path | str | None,
    *,
    version: str = "1.0.0",
    prev_result: Mapping[str, Any] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """The plugin's entry of a conflist as the runtime hands it over (with name and cniVersion)."""
    conf: dict[str, Any] = {"cniVersion": version, "name": "k8s-pod-network", "type": "istio-cni"}
    kube: dict[str, Any] = {"cni_bin_dir": "/opt/cni/bin", "exclude_namespaces": ["istio-system"]}
    if kubeconfig is not None:
        kube["kubeconfig"] = str(kubeconfig)
    kube.update(extra.pop("kubernetes", {}))
    conf["kubernetes"] = kube
    conf.update(extra)
    if prev_result is not None:
        conf["prevResult"] = dict(prev_result)
    return conf


def prev_result(
    version: str, address: str = "10.244.1.5/24", netns: str = "/var/run/netns/cni-x"
) -> dict[str, Any]:
    """A bridge plugin's result (host bridge, host veth, pod eth0) in the given spec version."""
    gw = "10.244.1.1" if ":" not in address else "fd00:10:244:1::1"
    ip: dict[str, Any] = {"interface": 2, "address": address, "gateway": gw}
    if version.startswith("0."):
        ip = {"version": "6" if ":" in address else "4", **ip}
    return {
        "cniVersion": version,
        "interfaces": [
            {"name": "cni0", "mac": "ae:4f:ff:0e:4a:f4"},
            {"name": "veth1a2b3c4d", "mac": "2a:9e:10:33:ab:01"},
            {"name": "eth0", "mac": "5e:d6:72:3a:f4:1c", "sandbox": netns},
        ],
        "ips": [ip],
        "routes": [{"dst": "0.0.0.0/0" if ":" not in address else "::/0"}],
        "dns": {},
    }
