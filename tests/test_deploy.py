"""The deployment files in deploy/: every manifest loads, and the facts that matter hold. The
paths install-cni writes are the host paths the DaemonSet mounts, RBAC is minimal, the images
the manifests name are the ones deploy/build-images builds, the DaemonSet runs everywhere with
probes on the installer's endpoints, and the example pod's init container has the classic
options, which our own CLI parses."""

from __future__ import annotations

import configparser
import json
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from cni.install.conflist import plugin_entry, standalone_conf
from cni.install.settings import build_parser, parse_settings

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "kubernetes"
MULTUS = DEPLOY / "kubernetes-multus"
CLASSIC_ARGS = ["-p", "15001", "-z", "15006", "-u", "1337", "-m", "REDIRECT", "-i", "*", "-x", "", "-b", "*"]
CLASSIC_ARGS += ["-d", "15090,15021,15020"]
VERSION = configparser.ConfigParser()
VERSION.read(ROOT / "setup.cfg")


def load_all(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def manifests(directory: Path = K8S) -> dict[tuple[str, str], dict[str, Any]]:
    """The base's resources as kustomize would list them, keyed by (kind, name)."""
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    out = {}
    for res in kustomization["resources"]:
        for doc in load_all(directory / res):
            out[(doc["kind"], doc["metadata"]["name"])] = doc
    return out


def merge_by_name(base: list[dict[str, Any]], patch: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Strategic-merge of a list whose merge key is ``name`` (volumes, containers), one level."""
    by_name = {p["name"]: p for p in patch}
    merged = [{**item, **by_name.pop(item["name"], {})} for item in base]
    return merged + list(by_name.values())


def multus_manifests() -> dict[tuple[str, str], dict[str, Any]]:
    """The Multus overlay applied to the base (its two patches touch ConfigMap data and volumes)."""
    base = manifests()
    overlay = yaml.safe_load((MULTUS / "kustomization.yaml").read_text())
    assert overlay["resources"][0] == "../kubernetes"
    out = dict(base)
    for res in overlay["resources"][1:]:
        for doc in load_all(MULTUS / res):
            out[(doc["kind"], doc["metadata"]["name"])] = doc
    for patch in overlay["patches"]:
        doc = yaml.safe_load((MULTUS / patch["path"]).read_text())
        key = (doc["kind"], doc["metadata"]["name"])
        target = out[key]
        if doc["kind"] == "ConfigMap":
            target = {**target, "data": {**target["data"], **doc["data"]}}
        else:
            spec = target["spec"]["template"]["spec"]
            pspec = doc["spec"]["template"]["spec"]
            assert set(pspec) == {"volumes"}, "the test merges volumes only"
            spec = {**spec, "volumes": merge_by_name(spec["volumes"], pspec["volumes"])}
            target = {
                **target,
                "spec": {**target["spec"], "template": {**target["spec"]["template"], "spec": spec}},
            }
        out[key] = target
    return out


def container(ds: dict[str, Any], name: str = "install-cni") -> dict[str, Any]:
    return next(c for c in ds["spec"]["template"]["spec"]["containers"] if c["name"] == name)


def installer_environment(objs: dict[tuple[str, str], dict[str, Any]]) -> dict[str, str]:
    """The installer's environment in a pod: the ConfigMap, the fieldRefs, what kubelet adds."""
    ds = objs[("DaemonSet", "istio-cni-node")]
    c = container(ds)
    env: dict[str, str] = {}
    for src in c["envFrom"]:
        env.update(objs[("ConfigMap", src["configMapRef"]["name"])]["data"])
    fields = {"metadata.namespace": ds["metadata"]["namespace"], "spec.nodeName": "worker-1"}
    for e in c.get("env", []):
        env[e["name"]] = e["value"] if "value" in e else fields[e["valueFrom"]["fieldRef"]["fieldPath"]]
    env.update(KUBERNETES_SERVICE_HOST="10.96.0.1", KUBERNETES_SERVICE_PORT="443")
    return env


def host_path_of(ds: dict[str, Any], mount_path: str) -> str:
    """The host directory the installer sees at ``mount_path`` (a hostPath mount, exactly)."""
    spec = ds["spec"]["template"]["spec"]
    mounts = [m for m in container(ds)["volumeMounts"] if m["mountPath"] == mount_path]
    assert len(mounts) == 1, f"nothing is mounted at {mount_path}"
    assert not mounts[0].get("readOnly") and not mounts[0].get("subPath")
    volume = next(v for v in spec["volumes"] if v["name"] == mounts[0]["name"])
    return str(volume["hostPath"]["path"])


# --- every file loads -------------------------------------------------------------------------


ALL_YAML = sorted(DEPLOY.rglob("*.yaml"))


@pytest.mark.parametrize("path", ALL_YAML, ids=[str(p.relative_to(DEPLOY)) for p in ALL_YAML])
def test_manifest_loads(path: Path) -> None:
    docs = load_all(path)
    assert docs
    for doc in docs:
        assert doc.get("apiVersion") and doc.get("kind"), path
        if doc["kind"] not in ("Kustomization",):
            assert doc["metadata"]["name"]


def test_kustomization_lists_every_base_manifest() -> None:
    listed = set(yaml.safe_load((K8S / "kustomization.yaml").read_text())["resources"])
    assert listed == {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}


def test_no_kustomization_loads_a_directory_that_contains_it() -> None:
    # kustomize refuses a resource directory that holds the kustomization loading it ("cycle
    # detected: candidate root ... contains visited root"), so `kubectl apply -k` would fail.
    found = sorted(DEPLOY.rglob("kustomization.yaml"))
    assert K8S / "kustomization.yaml" in found and MULTUS / "kustomization.yaml" in found
    for path in found:
        here = path.parent.resolve()
        for res in yaml.safe_load(path.read_text()).get("resources", []):
            target = (here / res).resolve()
            assert target.exists(), f"{path}: {res} does not exist"
            if target.is_dir():
                assert (target / "kustomization.yaml").exists(), f"{path}: {res} is no kustomization"
                assert not here.is_relative_to(target), f"{path}: {res} contains {here}"


def test_namespaced_objects_are_in_the_namespace() -> None:
    objs = manifests()
    ns = next(name for kind, name in objs if kind == "Namespace")
    for (kind, _), doc in objs.items():
        if kind not in ("Namespace", "ClusterRole", "ClusterRoleBinding"):
            assert doc["metadata"]["namespace"] == ns


# --- paths ------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["chained", "multus"])
def test_installer_writes_into_the_mounted_host_paths(variant: str) -> None:
    objs = manifests() if variant == "chained" else multus_manifests()
    ds = objs[("DaemonSet", "istio-cni-node")]
    s = parse_settings(build_parser().parse_args([]), installer_environment(objs))
    assert s.chained is (variant == "chained")
    # The net dir: the installer writes at MOUNTED_CNI_NET_DIR, which is CNI_NET_DIR on the node.
    assert host_path_of(ds, str(s.net_dir)) == s.host_net_dir
    assert s.host_net_dir == ("/etc/cni/net.d" if variant == "chained" else "/etc/cni/multus/net.d")
    # The kubeconfig path in the plugin's entry is where the installer writes it, seen from the node.
    entry = plugin_entry(s)
    host_kc = Path(entry["kubernetes"]["kubeconfig"])
    assert host_kc.parent == Path(host_path_of(ds, str(s.kubeconfig_path.parent)))
    assert host_kc.name == s.kubeconfig_path.name
    # Every bin dir the executable goes to is the node's CNI bin dir.
    assert s.bin_dirs
    for d in s.bin_dirs:
        assert (
            host_path_of(ds, str(d)) == s.host_bin_dir == entry["kubernetes"]["cni_bin_dir"] == "/opt/cni/bin"
        )
    assert s.exclude_namespaces == ("istio-system", "kube-system")
    assert s.pod_namespace == "istio-system"
    assert s.kubeconfig_mode == 0o600


def test_plugin_lets_the_installer_pods_through() -> None:
    from cni.plugin import NODE_POD_PREFIX

    ds = manifests()[("DaemonSet", "istio-cni-node")]
    # DaemonSet pods are named <daemonset>-<suffix>.
    assert ds["metadata"]["name"] + "-" == NODE_POD_PREFIX


# --- RBAC -------------------------------------------------------------------------------------


BASE_RULES = [
    {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]},
    {"apiGroups": [""], "resources": ["events"], "verbs": ["create"]},
    {"apiGroups": [""], "resources": ["nodes"], "verbs": ["get", "patch"]},
]
REPAIR_VARIANTS = {
    "delete": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["delete"]}],
    "label": [{"apiGroups": [""], "resources": ["pods/status"], "verbs": ["patch"]}],
}


def roles_and_bindings(objs: dict[tuple[str, str], dict[str, Any]]) -> dict[str, list[Any]]:
    """ClusterRole name -> its rules, each checked to be bound to the DaemonSet's account."""
    roles = {doc["metadata"]["name"]: doc for (kind, _), doc in objs.items() if kind in ("ClusterRole", "Role")}
    assert all(doc["kind"] == "ClusterRole" for doc in roles.values())
    bindings = [doc for (kind, _), doc in objs.items() if kind in ("ClusterRoleBinding", "RoleBinding")]
    sa = next(doc for (kind, _), doc in objs.items() if kind == "ServiceAccount")
    ds = objs[("DaemonSet", "istio-cni-node")]
    assert ds["spec"]["template"]["spec"]["serviceAccountName"] == sa["metadata"]["name"]
    bound = set()
    for binding in bindings:
        assert binding["roleRef"]["apiGroup"] == "rbac.authorization.k8s.io"
        assert binding["roleRef"]["kind"] == "ClusterRole"
        assert binding["subjects"] == [
            {"kind": "ServiceAccount", "name": sa["metadata"]["name"], "namespace": sa["metadata"]["namespace"]}
        ]
        bound.add(binding["roleRef"]["name"])
    assert bound == set(roles), "every role bound, every binding to a role"
    return {name: doc["rules"] for name, doc in roles.items()}


def variant_manifests(mode: str) -> dict[tuple[str, str], dict[str, Any]]:
    """A repair-mode variant applied to the base (extra resources, a ConfigMap data patch)."""
    d = DEPLOY / f"kubernetes-repair-{mode}"
    overlay = yaml.safe_load((d / "kustomization.yaml").read_text())
    assert overlay["resources"][0] == "../kubernetes"
    out = dict(manifests())
    for res in overlay["resources"][1:]:
        for doc in load_all(d / res):
            out[(doc["kind"], doc["metadata"]["name"])] = doc
    for patch in overlay["patches"]:
        doc = yaml.safe_load((d / patch["path"]).read_text())
        assert doc["kind"] == "ConfigMap"
        key = (doc["kind"], doc["metadata"]["name"])
        out[key] = {**out[key], "data": {**out[key]["data"], **doc["data"]}}
    return out


def test_rbac_is_exactly_what_the_plugin_and_the_agent_use() -> None:
    """The plugin GETs the pod; the agent lists and watches pods, creates Events, and reads and
    patches its Node (the taint). Nothing may delete or change a pod in the base."""
    assert roles_and_bindings(manifests()) == {"istio-cni": BASE_RULES}


@pytest.mark.parametrize("mode", sorted(REPAIR_VARIANTS))
def test_each_repair_mode_variant_adds_only_its_own_grant_and_selects_the_mode(mode: str) -> None:
    objs = variant_manifests(mode)
    assert roles_and_bindings(objs) == {"istio-cni": BASE_RULES, f"istio-cni-repair-{mode}": REPAIR_VARIANTS[mode]}
    s = parse_settings(build_parser().parse_args([]), installer_environment(objs))
    assert s.repair_mode == mode


def test_the_base_repairs_in_place_and_lifts_the_taint() -> None:
    s = parse_settings(build_parser().parse_args([]), installer_environment(manifests()))
    assert s.repair_enabled and s.repair_mode == "repair" and s.node_name == "worker-1"
    assert s.startup_taint == "cni.istio.io/not-ready" and s.repair_init_container_name == "istio-validation"
    assert s.monitoring_port == 15014


# --- the DaemonSet ----------------------------------------------------------------------------


def test_daemonset_runs_on_every_node_and_rolls() -> None:
    ds = manifests()[("DaemonSet", "istio-cni-node")]
    spec = ds["spec"]["template"]["spec"]
    assert spec["priorityClassName"] == "system-node-critical"
    assert {"operator": "Exists"} in spec["tolerations"], "tolerates every taint"
    assert ds["spec"]["updateStrategy"]["type"] == "RollingUpdate"
    assert (
        ds["spec"]["selector"]["matchLabels"].items() <= ds["spec"]["template"]["metadata"]["labels"].items()
    )
    assert not spec.get("hostNetwork")
    assert ds["spec"]["template"]["metadata"]["annotations"]["sidecar.istio.io/inject"] == "false"


def test_probes_use_the_installer_endpoints() -> None:
    objs = manifests()
    c = container(objs[("DaemonSet", "istio-cni-node")])
    s = parse_settings(build_parser().parse_args([]), installer_environment(objs))
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    for probe in (c["readinessProbe"], c["livenessProbe"]):
        port = probe["httpGet"]["port"]
        assert ports.get(port, port) == s.health_port
    assert s.health_address == "", "listens on the pod's address, where kubelet probes"


def test_installer_security_context() -> None:
    c = container(manifests()[("DaemonSet", "istio-cni-node")])
    sc = c["securityContext"]
    assert sc["privileged"] is False and sc["allowPrivilegeEscalation"] is False
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["capabilities"]["drop"] == ["ALL"]
    # DAC_OVERRIDE for the host's directories; the rest for the agent's repair in place (as
    # Istio's DaemonSet with repair.repairPods): iptables in a pod's namespace, finding it
    # through the node's /proc, entering it.
    assert set(sc["capabilities"].get("add", [])) == {"DAC_OVERRIDE", "NET_ADMIN", "NET_RAW", "SYS_PTRACE", "SYS_ADMIN"}
    assert any(m["mountPath"] == "/tmp" for m in c["volumeMounts"]), "a writable /tmp for the bundle"


def test_the_agent_sees_the_nodes_processes_namespaces_and_socket_dir() -> None:
    objs = manifests()
    ds = objs[("DaemonSet", "istio-cni-node")]
    c = container(ds)
    s = parse_settings(build_parser().parse_args([]), installer_environment(objs))
    volumes = {v["name"]: v for v in ds["spec"]["template"]["spec"]["volumes"]}
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    proc = mounts[s.host_proc]
    assert proc.get("readOnly") and volumes[proc["name"]]["hostPath"]["path"] == "/proc"
    (netns_dir,) = s.netns_dirs
    pinned = mounts[netns_dir]
    assert pinned.get("readOnly") and pinned["mountPropagation"] == "HostToContainer"
    assert volumes[pinned["name"]]["hostPath"]["path"] == "/var/run/netns"
    assert host_path_of(ds, str(s.mounted_agent_run_dir)) == s.agent_run_dir
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports["metrics"] == s.monitoring_port
    annotations = ds["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(s.monitoring_port) and annotations["prometheus.io/path"] == "/metrics"


# --- images -----------------------------------------------------------------------------------


def build_script_defaults() -> tuple[str, list[str]]:
    text = (DEPLOY / "build-images").read_text()
    registry = re.search(r"^REGISTRY=\$\{REGISTRY:-([^}]+)\}", text, re.M)
    images = re.search(r"^IMAGES=\(([^)]*)\)", text, re.M)
    assert registry and images
    return registry.group(1), images.group(1).split()


def image_refs() -> dict[str, str]:
    """container name -> image, over every manifest and example."""
    refs = {}
    for path in ALL_YAML:
        for doc in load_all(path):
            spec = doc.get("spec", {})
            spec = spec.get("template", {}).get("spec", spec)
            for c in spec.get("initContainers", []) + spec.get("containers", []):
                refs[f"{path.name}:{c['name']}"] = c.get("image", "")
    return refs


def test_images_match_the_containerfiles() -> None:
    registry, names = build_script_defaults()
    assert sorted(names) == sorted(
        p.name.removesuffix(".Containerfile") for p in (DEPLOY / "images").iterdir()
    )
    version = VERSION["metadata"]["version"]
    ours = {k: v for k, v in image_refs().items() if v.startswith(registry + "/")}
    assert ours["daemonset.yaml:install-cni"] == f"{registry}/install-cni:{version}"
    assert ours["meshed-pod-init.yaml:istio-init"] == f"{registry}/istio-iptables:{version}"
    for ref in ours.values():
        name, tag = ref.removeprefix(registry + "/").split(":")
        assert name in names and tag == version


@pytest.mark.parametrize("name", ["install-cni", "istio-iptables"])
def test_containerfile(name: str) -> None:
    text = (DEPLOY / "images" / f"{name}.Containerfile").read_text()
    bases = re.findall(r"^FROM\s+(\S+)", text, re.M)
    assert bases and set(bases) == {"${BASE}"}, "every stage builds on the one base"
    (default,) = re.findall(r"^ARG BASE=(\S+)$", text, re.M)
    # A real, dated tag of a fully qualified image: no "latest", no floating "slim".
    assert re.fullmatch(r"docker\.io/library/debian:bookworm-\d{8}-slim", default), default
    assert f'ENTRYPOINT ["{name}"]' in text
    assert "COPY *.whl" in text, "installs the project's wheel"
    final = text.rsplit("FROM", 1)[1]
    assert "python3 " in final
    if name == "install-cni":
        # The node agent: prometheus_client (install_requires) and the tools of a repair in place.
        assert "python3-prometheus-client" in final and re.search(r"\biptables nftables\b", final)
        assert "prometheus_client" in VERSION["options"]["install_requires"]
    if name == "istio-iptables":
        assert re.search(r"install .*\biptables\b", final), "iptables (nft and legacy) from Debian"
        assert "iptables-legacy --version" in final and "iptables-nft --version" in final
    # The package installs the command: a console script, or one of its own scripts.
    entry_points = VERSION["options.entry_points"]["console_scripts"]
    scripts = VERSION["options"].get("scripts", "")
    assert re.search(rf"^{re.escape(name)} =", entry_points, re.M) or re.search(
        rf"/{re.escape(name)}$", scripts, re.M
    )
    for line in scripts.split():
        assert (ROOT / line).read_text().startswith("#!python\n"), line


# --- the example pods -------------------------------------------------------------------------


def init_container() -> dict[str, Any]:
    pod = load_all(DEPLOY / "examples" / "meshed-pod-init.yaml")[0]
    return next(c for c in pod["spec"]["initContainers"] if c["name"] == "istio-init")


def test_init_container_has_the_classic_options() -> None:
    c = init_container()
    assert c["args"] == CLASSIC_ARGS
    assert "command" not in c, "the image's entrypoint is istio-iptables"
    sc = c["securityContext"]
    assert set(sc["capabilities"]["add"]) == {"NET_ADMIN", "NET_RAW"}
    assert sc["runAsUser"] == 0 and sc["runAsNonRoot"] is False and sc["privileged"] is False


def test_init_container_args_parse_with_our_cli(venv_bin: Path) -> None:
    exe = venv_bin / "istio-iptables"
    if not exe.exists():
        pytest.skip("istio-iptables is not installed")
    p = subprocess.run(
        [str(exe), *init_container()["args"], "--dry-run"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith("# iptables-restore\n")
    assert "-j REDIRECT --to-ports 15001" in p.stdout and "-j REDIRECT --to-ports 15006" in p.stdout


def test_cni_example_pod_is_one_the_plugin_captures() -> None:
    pod = load_all(DEPLOY / "examples" / "meshed-pod-cni.yaml")[0]
    assert "initContainers" not in pod["spec"]
    assert "sidecar.istio.io/status" in pod["metadata"]["annotations"]
    assert "istio-proxy" in [c["name"] for c in pod["spec"]["containers"]]


def test_network_attachment_definition_names_the_standalone_network() -> None:
    nad = load_all(MULTUS / "network-attachment-definition.yaml")[0]
    assert nad["apiVersion"] == "k8s.cni.cncf.io/v1" and nad["kind"] == "NetworkAttachmentDefinition"
    objs = multus_manifests()
    s = parse_settings(build_parser().parse_args([]), installer_environment(objs))
    assert json.loads(standalone_conf(s, "YYY-istio-cni.conflist"))["name"] == nad["metadata"]["name"]
    assert "spec" not in nad or "config" not in nad["spec"], "Multus reads the file install-cni writes"
