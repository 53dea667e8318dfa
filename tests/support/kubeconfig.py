"""Kubeconfigs: one cluster, user and context written as install-cni writes them (YAML or JSON,
CA file or data, token or token file, client certificates), and the YAML forms people point the
plugin at."""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any


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
    return yaml_kubeconfig_text(form, server, base64.b64encode(ca_cert.read_bytes()).decode(), token)


def yaml_kubeconfig_text(form: str, server: str, ca: str, token: str) -> str:
    """yaml_kubeconfig's text with the CA given as its base64 text."""
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
    certificate-authority-data: {ca}
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
