"""A small Kubernetes API server for tests: real TLS (a CA and a server certificate made here with
``cryptography``), bearer-token authentication (401 on a wrong token, as kube-apiserver answers),
and ``GET /api/v1/namespaces/NS/pods/NAME`` serving Pod objects shaped as the API returns them.

Also builds those Pods from the conformance cases' pod descriptions and writes kubeconfigs.
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import ipaddress
import json
import ssl
import threading
import uuid
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

PROXY_IMAGE = "docker.io/istio/proxyv2:1.24.0"


# --- PKI -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pki:
    """PEM files: a CA, a server certificate for 127.0.0.1/localhost, and a client certificate."""

    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _cert(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: x509.Certificate | None,
    issuer_key: ec.EllipticCurvePrivateKey,
    *,
    ca: bool = False,
    sans: Iterable[x509.GeneralName] = (),
    usage: x509.ObjectIdentifier | None = None,
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    b = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer.subject if issuer else name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if ca:
        b = b.add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        b = b.add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    else:
        assert issuer is not None
        b = b.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()), critical=False
        )
    sans = list(sans)
    if sans:
        b = b.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    if usage is not None:
        b = b.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    return b.sign(issuer_key, hashes.SHA256())


def make_pki(directory: Path, *, server_names: Iterable[str] = ("localhost",)) -> Pki:
    """A fresh CA, a server certificate valid for 127.0.0.1 (and ``server_names``), and a client
    certificate, all written as PEM files under ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    ca_key = _key()
    ca = _cert("test kube CA", ca_key, None, ca_key, ca=True)
    srv_key = _key()
    sans: list[x509.GeneralName] = [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    sans += [x509.DNSName(n) for n in server_names]
    srv = _cert("kube-apiserver", srv_key, ca, ca_key, sans=sans, usage=ExtendedKeyUsageOID.SERVER_AUTH)
    cli_key = _key()
    cli = _cert("system:node:test", cli_key, ca, ca_key, usage=ExtendedKeyUsageOID.CLIENT_AUTH)
    files = {
        "ca.crt": ca.public_bytes(serialization.Encoding.PEM),
        "ca.key": _key_pem(ca_key),
        "server.crt": srv.public_bytes(serialization.Encoding.PEM),
        "server.key": _key_pem(srv_key),
        "client.crt": cli.public_bytes(serialization.Encoding.PEM),
        "client.key": _key_pem(cli_key),
    }
    for name, data in files.items():
        (directory / name).write_bytes(data)
        (directory / name).chmod(0o600)
    d = directory
    return Pki(
        d / "ca.crt", d / "ca.key", d / "server.crt", d / "server.key", d / "client.crt", d / "client.key"
    )


# --- Pods ----------------------------------------------------------------------------------


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


# --- the server ----------------------------------------------------------------------------


def _status(code: int, reason: str, message: str) -> dict[str, Any]:
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }


@dataclass
class _State:
    token: str
    pods: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    requests: list[tuple[str, str, bool]] = field(default_factory=list)  # (method, path, authorized)
    fail_next: int = 0  # answer this many requests with 503 first
    lock: threading.Lock = field(default_factory=threading.Lock)


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"
    # Go servers (kube-apiserver) set TCP_NODELAY; without it small writes wait on delayed ACKs.
    disable_nagle_algorithm = True

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        pass

    def _send(self, code: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        st = self.server.state
        auth = self.headers.get("Authorization", "")
        cert = self.connection.getpeercert() if isinstance(self.connection, ssl.SSLSocket) else None
        ok = auth == f"Bearer {st.token}" or (not auth and bool(cert))
        with st.lock:
            st.requests.append(("GET", self.path, ok))
            failing = st.fail_next > 0
            if failing:
                st.fail_next -= 1
        if not ok:
            self._send(401, _status(401, "Unauthorized", "Unauthorized"))
            return
        if failing:
            self._send(
                503,
                _status(503, "ServiceUnavailable", "the server is currently unable to handle the request"),
            )
            return
        parts = [unquote(p) for p in self.path.split("?")[0].strip("/").split("/")]
        if len(parts) == 6 and parts[:3] == ["api", "v1", "namespaces"] and parts[4] == "pods":
            with st.lock:
                pod = st.pods.get((parts[3], parts[5]))
            if pod is None:
                self._send(404, _status(404, "NotFound", f'pods "{parts[5]}" not found'))
            else:
                self._send(200, pod)
            return
        self._send(404, _status(404, "NotFound", "the server could not find the requested resource"))


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    state: _State


class KubeAPIServer:
    """An HTTPS Kubernetes API serving Pods on 127.0.0.1; use as a context manager."""

    def __init__(self, pki: Pki, token: str, *, require_client_cert: bool = False) -> None:
        self.pki = pki
        self.state = _State(token=token)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(str(pki.server_cert), str(pki.server_key))
        ctx.load_verify_locations(str(pki.ca_cert))
        ctx.verify_mode = ssl.CERT_REQUIRED if require_client_cert else ssl.CERT_OPTIONAL
        self._ctx = ctx
        self._httpd = self._listen(0)
        self._port = int(self._httpd.server_address[1])
        self._thread: threading.Thread | None = None

    def _listen(self, port: int) -> _Server:
        httpd = _Server(("127.0.0.1", port), _Handler)
        httpd.state = self.state
        httpd.socket = self._ctx.wrap_socket(httpd.socket, server_side=True)
        return httpd

    @property
    def port(self) -> int:
        return self._port

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def add_pod(self, pod: Mapping[str, Any]) -> None:
        meta = pod["metadata"]
        with self.state.lock:
            self.state.pods[(meta["namespace"], meta["name"])] = dict(pod)

    @property
    def requests(self) -> list[tuple[str, str, bool]]:
        with self.state.lock:
            return list(self.state.requests)

    def fail_next(self, n: int) -> None:
        with self.state.lock:
            self.state.fail_next = n

    def start(self) -> KubeAPIServer:
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="kubeapi", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            self._httpd.shutdown()
            self._thread.join(timeout=10)
        self._httpd.server_close()

    @contextlib.contextmanager
    def down(self) -> Iterator[None]:
        """The API is unreachable for the block (nothing listens on its port: connection refused),
        then serves again on the same port with the same pods and token."""
        self.stop()
        try:
            yield
        finally:
            self._httpd = self._listen(self._port)
            self.start()

    def __enter__(self) -> KubeAPIServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# --- kubeconfig ----------------------------------------------------------------------------


def _b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def write_kubeconfig(
    path: Path,
    server: str,
    *,
    ca_file: Path | None = None,
    ca_data: Path | None = None,
    token: str | None = None,
    token_file: Path | None = None,
    client_cert: Path | None = None,
    client_key: Path | None = None,
    client_data: bool = False,
    fmt: str = "yaml",
) -> Path:
    """A kubeconfig with one cluster, user and context, in YAML (as install-cni writes it) or JSON."""
    cluster: dict[str, Any] = {"server": server}
    if ca_file is not None:
        cluster["certificate-authority"] = str(ca_file)
    if ca_data is not None:
        cluster["certificate-authority-data"] = _b64(ca_data)
    user: dict[str, Any] = {}
    if token is not None:
        user["token"] = token
    if token_file is not None:
        user["tokenFile"] = str(token_file)
    if client_cert is not None and client_key is not None:
        if client_data:
            user["client-certificate-data"] = _b64(client_cert)
            user["client-key-data"] = _b64(client_key)
        else:
            user["client-certificate"] = str(client_cert)
            user["client-key"] = str(client_key)
    doc = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "local", "cluster": cluster}],
        "users": [{"name": "istio-cni", "user": user}],
        "contexts": [{"name": "istio-cni-context", "context": {"cluster": "local", "user": "istio-cni"}}],
        "current-context": "istio-cni-context",
        "preferences": {},
    }
    if fmt == "json":
        path.write_text(json.dumps(doc, indent=2))
    else:
        path.write_text(_yaml(doc))
    path.chmod(0o600)
    return path


def yaml_kubeconfig(form: str, server: str, ca_cert: Path, token: str) -> str:
    """A kubeconfig (one cluster with the CA inline, a token user) in one of the forms people
    point the plugin at: kubectl's ``config view --raw`` output, Istio's installer template,
    and YAML the small reader in cni.kube leaves to PyYAML (comments after values, quoted keys,
    flow collections, block scalars, anchors, ``---`` and ``...``)."""
    ca = base64.b64encode(ca_cert.read_bytes()).decode()
    forms = {
        "kubectl-config-view": f"""apiVersion: v1
clusters:
- cluster:
    certificate-authority-data: {ca}
    server: {server}
  name: kind-kind
contexts:
- context:
    cluster: kind-kind
    user: kind-kind
  name: kind-kind
current-context: kind-kind
kind: Config
preferences: {{}}
users:
- name: kind-kind
  user:
    token: {token}
""",
        "istio-template": f"""# Kubeconfig file for Istio CNI plugin.
apiVersion: v1
kind: Config
clusters:
- name: local
  cluster:
    server: {server}
    certificate-authority-data: "{ca}"
users:
- name: istio-cni
  user:
    token: "{token}"
contexts:
- name: istio-cni-context
  context:
    cluster: local
    user: istio-cni
current-context: istio-cni-context
""",
        "hand-written": f"""---
# by hand, with every YAML nicety
"apiVersion": 'v1'
kind: Config   # trailing comment
clusters: [{{name: "c", cluster: {{server: '{server}', certificate-authority-data: &ca {ca}}}}}]
users:
  - name: u
    user:
      token: >-
        {token}
contexts:
  - &ctx
    name: x
    context: {{cluster: c, user: u}}
current-context: x
extensions: []
...
""",
        "block-literal-ca": f"""apiVersion: v1
clusters:
- name: c
  cluster:
    server: {server}
    certificate-authority-data: |
      {ca}
users:
- {{name: u, user: {{token: {token}}}}}
contexts:
- name: x
  context: {{cluster: c, user: u}}
current-context: "x"
""",
    }
    return forms[form]


YAML_KUBECONFIG_FORMS = ("kubectl-config-view", "istio-template", "hand-written", "block-literal-ca")
# The forms cni.kube's small YAML reader refuses (PyYAML reads them).
PYYAML_ONLY_FORMS = ("hand-written", "block-literal-ca")


def _yaml(doc: Mapping[str, Any], indent: int = 0) -> str:
    """Block-style YAML for the kubeconfig's shapes (maps, lists of maps, strings)."""
    pad = " " * indent
    out = []
    for k, v in doc.items():
        if isinstance(v, dict):
            out.append(f"{pad}{k}:" + (" {}\n" if not v else "\n" + _yaml(v, indent + 2)))
        elif isinstance(v, list):
            out.append(f"{pad}{k}:\n")
            for item in v:
                body = _yaml(item, indent + 4)
                out.append(f"{pad}  - {body.lstrip()}")
        else:
            out.append(f"{pad}{k}: {json.dumps(v)}\n")
    return "".join(out)


# --- driving the plugin as a runtime does --------------------------------------------------


@dataclass(frozen=True)
class PluginRun:
    """One execution of the plugin: exit status, stdout (the result or error JSON) and stderr."""

    code: int
    stdout: str
    stderr: str

    @property
    def json(self) -> Any:
        return json.loads(self.stdout)


def run_plugin(
    exe: Path | str,
    command: str,
    conf: Mapping[str, Any] | bytes | None,
    *,
    netns: str = "",
    container_id: str = "5d6a1f0e8c7b4a39b2d1c0f9e8d7c6b5a4f3e2d1c0b9a8f7e6d5c4b3a2f1e0d9",
    ifname: str = "eth0",
    args: str = "",
    cni_path: str = "/opt/cni/bin",
    extra_env: Mapping[str, str] | None = None,
    timeout: float = 120,
) -> PluginRun:
    """Runs the plugin executable with the CNI_* environment and the configuration on stdin, as
    libcni does (a minimal environment: the runtime does not pass its own)."""
    import os
    import subprocess

    environ = {
        "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
        "CNI_COMMAND": command,
        "CNI_CONTAINERID": container_id,
        "CNI_NETNS": netns,
        "CNI_IFNAME": ifname,
        "CNI_ARGS": args,
        "CNI_PATH": cni_path,
    }
    environ.update(extra_env or {})
    environ = {k: v for k, v in environ.items() if v is not None}
    data = conf if isinstance(conf, bytes) else (b"" if conf is None else json.dumps(conf).encode())
    p = subprocess.run([str(exe)], input=data, env=environ, capture_output=True, timeout=timeout, check=False)
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
