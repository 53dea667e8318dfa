"""The plugin's one-request Kubernetes client (``cni.kube``): kubeconfig forms (YAML and JSON, CA
file or data, token or tokenFile, client certificates, relative paths), verified TLS, retries
within a deadline, and the small YAML reader against PyYAML."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml  # type: ignore[import-untyped]
from hypothesis import given, settings
from hypothesis import strategies as st

from cni import kube
from kubeapi import KubeAPIServer, Pki, make_pki, meshed_pod, write_kubeconfig

TOKEN = "kube-unit-token"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"), server_names=("localhost", "kubernetes.default.svc"))


@pytest.fixture(scope="module")
def api(pki: Pki) -> Iterator[KubeAPIServer]:
    with KubeAPIServer(pki, TOKEN) as server:
        server.add_pod(meshed_pod("web-0", "shop"))
        yield server


def fetch(path: Path, deadline: float = 2.0) -> dict[str, object]:
    policy = kube.RetryPolicy(deadline=deadline, request_timeout=1.0, initial_backoff=0.05)
    return kube.fetch_pod(str(path), "shop", "web-0", policy)


@pytest.mark.parametrize("fmt", ["yaml", "json"])
@pytest.mark.parametrize("ca", ["file", "data"])
def test_token_auth(api: KubeAPIServer, pki: Pki, tmp_path: Path, fmt: str, ca: str) -> None:
    kw = {"ca_file": pki.ca_cert} if ca == "file" else {"ca_data": pki.ca_cert}
    kc = write_kubeconfig(tmp_path / "kc", api.url, token=TOKEN, fmt=fmt, **kw)  # type: ignore[arg-type]
    pod = fetch(kc)
    assert pod["kind"] == "Pod"
    assert api.requests[-1] == ("GET", "/api/v1/namespaces/shop/pods/web-0", True)


@pytest.mark.parametrize("data", [False, True])
def test_client_certificate_auth(api: KubeAPIServer, pki: Pki, tmp_path: Path, data: bool) -> None:
    kc = write_kubeconfig(
        tmp_path / "kc",
        api.url,
        ca_data=pki.ca_cert,
        client_cert=pki.client_cert,
        client_key=pki.client_key,
        client_data=data,
    )
    assert fetch(kc)["kind"] == "Pod"
    assert api.requests[-1][2] is True


def test_token_file_is_reread_on_every_attempt(api: KubeAPIServer, pki: Pki, tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("stale\n")
    kc = write_kubeconfig(tmp_path / "kc", api.url, ca_file=pki.ca_cert, token_file=token)
    with pytest.raises(kube.KubeError, match="HTTP 401"):
        fetch(kc, deadline=0.3)
    token.write_text(TOKEN + "\n")  # the installer rotated it
    assert fetch(kc)["kind"] == "Pod"


def test_relative_paths_are_relative_to_the_kubeconfig(api: KubeAPIServer, pki: Pki, tmp_path: Path) -> None:
    (tmp_path / "ca.crt").write_bytes(pki.ca_cert.read_bytes())
    (tmp_path / "token").write_text(TOKEN)
    kc = tmp_path / "kc"
    kc.write_text(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    certificate-authority: ca.crt\n"
        f"    server: {api.url}\nusers:\n- name: u\n  user:\n    tokenFile: token\ncontexts:\n"
        "- name: x\n  context: {cluster: c, user: u}\ncurrent-context: x\n"
    )  # a flow mapping: read by PyYAML
    assert fetch(kc)["kind"] == "Pod"


def test_tls_server_name(api: KubeAPIServer, pki: Pki, tmp_path: Path) -> None:
    kc = write_kubeconfig(
        tmp_path / "kc", api.url.replace("127.0.0.1", "localhost"), ca_file=pki.ca_cert, token=TOKEN
    )
    assert fetch(kc)["kind"] == "Pod"
    doc = yaml.safe_load(kc.read_text())
    doc["clusters"][0]["cluster"]["tls-server-name"] = "kubernetes.default.svc"
    kc.write_text(json.dumps(doc))
    assert fetch(kc)["kind"] == "Pod"
    doc["clusters"][0]["cluster"]["tls-server-name"] = "someone-else.example"
    kc.write_text(json.dumps(doc))
    with pytest.raises(kube.KubeError, match="TLS verification"):
        fetch(kc, deadline=0.2)


def test_server_path_prefix(api: KubeAPIServer, pki: Pki, tmp_path: Path) -> None:
    kc = write_kubeconfig(tmp_path / "kc", api.url + "/k8s/clusters/c-1", ca_file=pki.ca_cert, token=TOKEN)
    with pytest.raises(kube.KubeError, match="HTTP 404"):
        fetch(kc, deadline=0.2)
    assert api.requests[-1][1] == "/k8s/clusters/c-1/api/v1/namespaces/shop/pods/web-0"


def test_names_are_escaped_in_the_path(api: KubeAPIServer, pki: Pki, tmp_path: Path) -> None:
    kc = kube.load_kubeconfig(
        str(write_kubeconfig(tmp_path / "kc", api.url, ca_file=pki.ca_cert, token=TOKEN))
    )
    with pytest.raises(kube.KubeError, match="HTTP 404"):
        kube.get_pod(kc, "shop", "../../x?y", 1.0)
    assert api.requests[-1][1] == "/api/v1/namespaces/shop/pods/..%2F..%2Fx%3Fy"


@pytest.mark.parametrize(
    ("cluster", "user", "message"),
    [
        ({"server": "http://127.0.0.1:1"}, {}, "is not an https:// URL"),
        ({"server": "https://127.0.0.1:1", "insecure-skip-tls-verify": True}, {}, "insecure-skip-tls-verify"),
        (
            {"server": "https://127.0.0.1:1"},
            {"exec": {"command": "aws"}},
            "'exec' authentication is not supported",
        ),
        ({"server": "https://127.0.0.1:1", "certificate-authority-data": "%%%"}, {}, "not valid base64"),
    ],
)
def test_refused_kubeconfigs(
    tmp_path: Path, cluster: dict[str, object], user: dict[str, object], message: str
) -> None:
    kc = tmp_path / "kc"
    kc.write_text(
        json.dumps(
            {
                "clusters": [{"name": "c", "cluster": cluster}],
                "users": [{"name": "u", "user": user}],
                "contexts": [{"name": "x", "context": {"cluster": "c", "user": "u"}}],
                "current-context": "x",
            }
        )
    )
    with pytest.raises(kube.KubeError, match=message):
        kube.load_kubeconfig(str(kc))


def test_missing_kubeconfig(tmp_path: Path) -> None:
    with pytest.raises(kube.KubeError, match="cannot read kubeconfig"):
        kube.load_kubeconfig(str(tmp_path / "nope"))


def test_deadline_bounds_the_retries(tmp_path: Path) -> None:
    now = [0.0]
    slept: list[float] = []

    def sleep(s: float) -> None:
        slept.append(s)
        now[0] += s

    with pytest.raises(kube.KubeError, match="gave up after"):
        kube.fetch_pod(
            str(tmp_path / "nope"),
            "a",
            "b",
            kube.RetryPolicy(deadline=10.0),
            clock=lambda: now[0],
            sleep=sleep,
        )
    assert sum(slept) == pytest.approx(10.0)
    assert max(slept) == 2.0  # capped backoff
    assert slept[:3] == [0.1, 0.2, 0.4]


def test_on_failure_can_stop_at_once(tmp_path: Path) -> None:
    seen: list[int] = []

    def on_failure(attempt: int, err: kube.KubeError) -> bool:
        seen.append(attempt)
        return True

    with pytest.raises(kube.KubeError, match="cannot read kubeconfig"):
        kube.fetch_pod(str(tmp_path / "nope"), "a", "b", on_failure=on_failure)
    assert seen == [1]


# --- the YAML subset -------------------------------------------------------------------------

INSTALLER_STYLE = """# Kubeconfig file for the istio CNI plugin.
apiVersion: v1
kind: Config
clusters:
- name: local
  cluster:
    server: https://[fd00::1]:443
    certificate-authority-data: LS0tLS1CRUdJTg==
users:
- name: istio-cni
  user:
    token: "eyJhbGciOi.J9-x_y"
contexts:
- name: istio-cni-context
  context:
    cluster: local
    user: istio-cni
current-context: istio-cni-context
"""


def test_installer_kubeconfig_reads_without_pyyaml() -> None:
    assert kube._simple_yaml(INSTALLER_STYLE) == yaml.safe_load(INSTALLER_STYLE)


_key = st.from_regex(r"[a-z][a-z0-9-]{0,8}", fullmatch=True) | st.sampled_from(["on", "No", "null", "y"])
_scalar = st.one_of(
    st.from_regex(r"[a-zA-Z/][a-zA-Z0-9:/._=-]{0,12}", fullmatch=True),
    st.text(st.characters(codec="ascii", exclude_characters="\r\n"), max_size=10).map(json.dumps),
    st.sampled_from(
        ["true", "False", "yes", "off", "~", "null", "{}", "[]", "'it''s'", "x # note", "'a: b'"]
    ),
)
_doc = st.recursive(
    st.dictionaries(_key, _scalar, min_size=1, max_size=4),
    lambda inner: st.dictionaries(
        _key, st.one_of(_scalar, inner, st.lists(inner, min_size=1, max_size=3)), min_size=1, max_size=4
    ),
    max_leaves=12,
)


def _emit(node: object, indent: int = 0) -> str:
    pad = " " * indent
    if isinstance(node, dict):
        out = []
        for k, v in node.items():
            if isinstance(v, dict):
                out.append(f"{pad}{k}:\n{_emit(v, indent + 2)}")
            elif isinstance(v, list):
                out.append(
                    f"{pad}{k}:\n" + "".join(f"{pad}- {_emit(item, indent + 2).lstrip()}" for item in v)
                )
            else:
                out.append(f"{pad}{k}: {v}\n")
        return "".join(out)
    raise AssertionError(node)


@given(_doc)
@settings(max_examples=300)
def test_yaml_subset_agrees_with_pyyaml(doc: dict[str, object]) -> None:
    text = _emit(doc)
    try:
        mine = kube._simple_yaml(text)
    except kube._NotSimple:
        return  # PyYAML reads it instead
    ref = yaml.safe_load(text)

    def strs(x: object) -> object:  # the client reads every scalar as a string anyway
        if isinstance(x, dict):
            return {str(k): strs(v) for k, v in x.items()}
        if isinstance(x, list):
            return [strs(v) for v in x]
        return x if isinstance(x, bool | type(None) | dict | list) else str(x)

    assert strs(mine) == strs(ref), text
