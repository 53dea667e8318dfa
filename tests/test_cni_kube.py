"""The plugin's one-request Kubernetes client (``cni.kube``): kubeconfig forms (YAML and JSON, CA
file or data, token or tokenFile, client certificates, relative paths), verified TLS, retries
within a deadline, and the small YAML reader against PyYAML."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Mapping
from pathlib import Path

import pytest
import yaml  # type: ignore[import-untyped]
from hypothesis import given, settings
from hypothesis import strategies as st

from cni import kube
from tests.support.apiserver import KubeAPIServer
from tests.support.kubeconfig import (
    PYYAML_ONLY_FORMS,
    YAML_KUBECONFIG_FORMS,
    write_kubeconfig,
    yaml_kubeconfig,
    yaml_kubeconfig_text,
)
from tests.support.pki import Pki, make_pki
from tests.support.pods import meshed_pod

TOKEN = "kube-unit-token"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"), server_names=("localhost", "kubernetes.default.svc"))


@pytest.fixture(scope="module")
def api(api: KubeAPIServer) -> KubeAPIServer:
    api.add_pod(meshed_pod("web-0", "shop"))
    return api


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


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_deadline_bounds_the_retries(pki: Pki, tmp_path: Path) -> None:
    now = [0.0]
    slept: list[float] = []

    def sleep(s: float) -> None:
        slept.append(s)
        now[0] += s

    kc = write_kubeconfig(tmp_path / "kc", f"https://127.0.0.1:{closed_port()}", ca_file=pki.ca_cert)
    with pytest.raises(kube.KubeError, match="gave up after .*Connection refused"):
        kube.fetch_pod(
            str(kc),
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

# Istio's installer template, as it writes it: an IPv6 server, the CA unquoted, the token quoted.
INSTALLER_STYLE = yaml_kubeconfig_text(
    "istio-template", "https://[fd00::1]:443", "LS0tLS1CRUdJTg==", "eyJhbGciOi.J9-x_y"
)


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


# --- what is retried, what fails at once -------------------------------------------------------


def _json_kubeconfig(path: Path, cluster: Mapping[str, object], user: Mapping[str, object]) -> Path:
    path.write_text(
        json.dumps(
            {
                "clusters": [{"name": "c", "cluster": cluster}],
                "users": [{"name": "u", "user": user}],
                "contexts": [{"name": "x", "context": {"cluster": "c", "user": "u"}}],
                "current-context": "x",
            }
        )
    )
    return path


def _unusable(tmp_path: Path, pki: Pki, how: str) -> Path:
    """A kubeconfig (or its absence) that no retry can fix."""
    kc = tmp_path / "kc"
    server = "https://127.0.0.1:1"
    if how == "missing":
        return tmp_path / "nope"
    if how == "not-utf8":
        kc.write_bytes(b"apiVersion: v1\nclusters:\n- name: caf\xe9\n")
    elif how == "malformed-yaml":
        kc.write_text("clusters: [{name: c, cluster: {server: https://x}\n")
    elif how == "huge-integer":
        kc.write_text("apiVersion: v1\npreferences: {colors: " + "1" * 5000 + "}\n")
    elif how == "bad-date":
        kc.write_text("apiVersion: v1\npreferences: {since: 2024-13-45}\n")
    elif how == "deeply-nested":
        kc.write_text("[" * 100_000)
    elif how == "contexts-not-a-list":
        kc.write_text('{"contexts": 5, "current-context": "x"}')
    elif how == "ca-not-a-certificate":
        (tmp_path / "ca.crt").write_text("not a certificate\n")
        _json_kubeconfig(kc, {"server": server, "certificate-authority": "ca.crt"}, {"token": "t"})
    elif how == "client-cert-not-a-certificate":
        (tmp_path / "client.crt").write_text("garbage\n")
        cluster = {"server": server, "certificate-authority": str(pki.ca_cert)}
        _json_kubeconfig(kc, cluster, {"client-certificate": "client.crt", "client-key": str(pki.client_key)})
    elif how == "exec-auth":
        _json_kubeconfig(kc, {"server": server}, {"exec": {"command": "aws"}})
    elif how == "token-with-newline":
        _json_kubeconfig(kc, {"server": server}, {"token": "abc\r\nX-Injected: 1"})
    elif how == "nul-in-a-path":
        _json_kubeconfig(kc, {"server": server, "certificate-authority": "ca\0.crt"}, {"token": "t"})
    elif how == "bad-host-name":
        _json_kubeconfig(kc, {"server": "https://" + "ü" * 100}, {"token": "t"})
    else:
        raise AssertionError(how)
    return kc


UNUSABLE = {
    "missing": "cannot read kubeconfig .*nope: No such file",
    "not-utf8": "kubeconfig .*kc is not UTF-8 text",
    "malformed-yaml": "kubeconfig .*kc is not valid YAML",
    "huge-integer": "kubeconfig .*kc is not valid YAML: .*digits",
    "bad-date": "kubeconfig .*kc is not valid YAML: month must be in 1..12",
    "deeply-nested": "kubeconfig .*kc is not valid YAML",
    "contexts-not-a-list": "kubeconfig .*kc: contexts is not a list",
    "ca-not-a-certificate": "kubeconfig .*kc: cannot load TLS material",
    "client-cert-not-a-certificate": "kubeconfig .*kc: cannot load TLS material",
    "exec-auth": "'exec' authentication is not supported",
    "token-with-newline": "kubeconfig .*kc: the token holds characters an HTTP header cannot carry",
    "nul-in-a-path": "kubeconfig .*kc: the path 'ca\\\\x00.crt' holds a NUL character",
    "bad-host-name": "kubeconfig .*kc: server .* has a host name that is not valid",
}


@pytest.mark.parametrize("how", UNUSABLE)
def test_an_unusable_kubeconfig_fails_at_once(pki: Pki, tmp_path: Path, how: str) -> None:
    kc = _unusable(tmp_path, pki, how)
    attempts: list[int] = []

    def on_failure(attempt: int, err: kube.KubeError) -> bool:
        attempts.append(attempt)
        return False  # not the caller's call to stop: the error itself must

    start = time.monotonic()
    with pytest.raises(kube.KubeError, match=UNUSABLE[how]) as info:
        kube.fetch_pod(str(kc), "shop", "web-0", kube.RetryPolicy(deadline=20), on_failure=on_failure)
    assert time.monotonic() - start < 6
    assert attempts == [1], "the caller still hears of the failure (the installer bypass needs it)"
    assert not info.value.transient
    assert "gave up" not in str(info.value)


def test_non_utf8_token_file(pki: Pki, tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_bytes(b"\xff\xfe")
    kc = write_kubeconfig(tmp_path / "kc", "https://127.0.0.1:1", ca_file=pki.ca_cert, token_file=token)
    with pytest.raises(kube.KubeError, match=f"tokenFile {token} is not UTF-8 text") as info:
        kube.fetch_pod(str(kc), "shop", "web-0", kube.RetryPolicy(deadline=20))
    assert not info.value.transient


def test_an_unreachable_server_is_retried_until_the_deadline(pki: Pki, tmp_path: Path) -> None:
    kc = write_kubeconfig(tmp_path / "kc", f"https://127.0.0.1:{closed_port()}", ca_file=pki.ca_cert)
    attempts: list[int] = []

    def on_failure(attempt: int, err: kube.KubeError) -> bool:
        attempts.append(attempt)
        return False

    start = time.monotonic()
    with pytest.raises(kube.KubeError, match="gave up after .* in 1s: .*Connection refused") as info:
        policy = kube.RetryPolicy(deadline=1, initial_backoff=0.05)
        kube.fetch_pod(str(kc), "shop", "web-0", policy, on_failure=on_failure)
    assert time.monotonic() - start < 6
    assert len(attempts) > 1 and info.value.transient


def test_a_missing_pod_fails_at_once(api: KubeAPIServer, pki: Pki, tmp_path: Path) -> None:
    kc = write_kubeconfig(tmp_path / "kc", api.url, ca_file=pki.ca_cert, token=TOKEN)
    before = len(api.requests)
    with pytest.raises(kube.KubeError, match='HTTP 404 Not Found: pods "gone" not found$') as info:
        kube.fetch_pod(str(kc), "shop", "gone", kube.RetryPolicy(deadline=20))
    assert not info.value.transient
    assert len(api.requests) == before + 1


def test_a_wrong_token_is_retried(api: KubeAPIServer, pki: Pki, tmp_path: Path) -> None:
    # 401: the installer rewrites the kubeconfig with the rotated token, so it is retried.
    kc = write_kubeconfig(tmp_path / "kc", api.url, ca_file=pki.ca_cert, token="stale")
    with pytest.raises(kube.KubeError, match="gave up after .*HTTP 401") as info:
        fetch(kc, deadline=0.5)
    assert info.value.transient


# --- kubeconfigs as people write them ----------------------------------------------------------


@pytest.mark.parametrize("form", YAML_KUBECONFIG_FORMS)
def test_standard_kubeconfigs(api: KubeAPIServer, pki: Pki, tmp_path: Path, form: str) -> None:
    kc = tmp_path / "kc"
    text = yaml_kubeconfig(form, api.url, pki.ca_cert, TOKEN)
    kc.write_text(text)
    if form in PYYAML_ONLY_FORMS:
        with pytest.raises(kube._NotSimple):
            kube._simple_yaml(text)
    else:
        assert kube._simple_yaml(text) == yaml.safe_load(text)
    assert fetch(kc)["kind"] == "Pod"
    assert api.requests[-1] == ("GET", "/api/v1/namespaces/shop/pods/web-0", True)


def test_a_byte_order_mark_is_allowed(api: KubeAPIServer, pki: Pki, tmp_path: Path) -> None:
    kc = write_kubeconfig(tmp_path / "kc", api.url, ca_file=pki.ca_cert, token=TOKEN)
    kc.write_bytes(b"\xef\xbb\xbf" + kc.read_bytes())
    assert fetch(kc)["kind"] == "Pod"


_value = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=8) | st.sampled_from(["", "\0", "é"]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=6,
)
_field = st.sampled_from(
    [
        "server",
        "certificate-authority",
        "certificate-authority-data",
        "tls-server-name",
        "token",
        "tokenFile",
        "client-certificate",
        "client-key",
        "client-certificate-data",
        "client-key-data",
        "exec",
        "name",
        "cluster",
        "user",
        "insecure-skip-tls-verify",
    ]
)


@given(
    top=st.dictionaries(
        st.sampled_from(["clusters", "users", "contexts", "current-context"]), _value, max_size=4
    ),
    cluster=st.dictionaries(_field, _value, max_size=4),
    user=st.dictionaries(_field, _value, max_size=4),
)
@settings(max_examples=300)
def test_any_kubeconfig_is_read_or_refused_with_a_kube_error(
    tmp_path_factory: pytest.TempPathFactory,
    top: dict[str, object],
    cluster: dict[str, object],
    user: dict[str, object],
) -> None:
    doc: dict[str, object] = {
        "clusters": [{"name": "c", "cluster": {"server": "https://127.0.0.1:1", **cluster}}],
        "users": [{"name": "u", "user": user}],
        "contexts": [{"name": "x", "context": {"cluster": "c", "user": "u"}}],
        "current-context": "x",
        **top,
    }
    kc = tmp_path_factory.mktemp("kc") / "kc"
    kc.write_text(json.dumps(doc))
    try:
        loaded = kube.load_kubeconfig(str(kc))
        kube.get_pod(loaded, "shop", "web-0", 0.5)
    except kube.KubeError:
        pass
