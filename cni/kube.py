"""Just enough of a Kubernetes client for one request: read a kubeconfig and GET one Pod over
verified TLS, with bounded retries and an overall deadline.

Standard library only (http.client + ssl); PyYAML is imported only for a kubeconfig that is
not JSON. There is deliberately no way to turn certificate verification off.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NamedTuple
from urllib.parse import quote, urlsplit

if TYPE_CHECKING:
    import ssl

MAX_BODY = 8 << 20


def _read(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read()


class KubeError(Exception):
    """The Pod could not be read; the message says why (kubeconfig, TLS, HTTP status ...)."""


class KubeConfig(NamedTuple):
    """The parts of a kubeconfig's current context this client uses."""

    source: str
    server: str
    ca_file: str | None = None
    ca_data: bytes | None = None
    tls_server_name: str | None = None
    token: str | None = None
    token_file: str | None = None
    cert_file: str | None = None
    cert_data: bytes | None = None
    key_file: str | None = None
    key_data: bytes | None = None

    def bearer_token(self) -> str | None:
        """The token, re-read from ``tokenFile`` on every call (the installer rotates it)."""
        if self.token_file:
            try:
                tok = _read(self.token_file).strip()
            except OSError as e:
                if not self.token:
                    raise KubeError(f"cannot read tokenFile {self.token_file}: {e.strerror}") from None
            else:
                if tok:
                    return tok
        return self.token or None


# YAML 1.1 booleans, as PyYAML resolves them.
_YAML_TRUE = frozenset(["true", "True", "TRUE", "yes", "Yes", "YES", "on", "On", "ON"])
_YAML_FALSE = frozenset(["false", "False", "FALSE", "no", "No", "NO", "off", "Off", "OFF"])


class _NotSimple(Exception):
    """The YAML uses more than the block subset kubeconfigs are written in."""


def _scalar(text: str) -> Any:
    if text in ("{}", "[]"):
        return {} if text == "{}" else []
    if text[:1] in ("'", '"'):
        q = text[0]
        end = text.find(q, 1)
        while q == "'" and end != -1 and text[end + 1 : end + 2] == "'":
            end = text.find(q, end + 2)
        if q == '"':
            end = 1
            while end < len(text) and text[end] != '"':
                end += 2 if text[end] == "\\" else 1
        rest = text[end + 1 :] if 0 < end < len(text) else None
        if rest is None or (rest.strip() and not rest.lstrip().startswith("#")):
            raise _NotSimple(text)
        body = text[: end + 1]
        if q == "'":
            return body[1:-1].replace("''", "'")
        try:
            return json.loads(body)
        except ValueError:
            raise _NotSimple(text) from None
    # Flow collections, anchors, tags, block scalars, and anything YAML might read as a number
    # are left to PyYAML.
    if not text or text[0] in "[]{}&*!|>%@`#0123456789+-.=" or text.startswith(("? ", ": ")):
        raise _NotSimple(text)
    cut = text.find(" #")
    if cut != -1:
        text = text[:cut].rstrip()
    if ": " in text or text.endswith(":"):
        raise _NotSimple(text)
    if text in _YAML_TRUE:
        return True
    if text in _YAML_FALSE:
        return False
    if text in ("null", "Null", "NULL", "~"):
        return None
    return text


def _simple_yaml(text: str) -> Any:
    """Block mappings, block sequences and one-line scalars: what kubeconfig writers emit (Istio's
    installer, kubectl). Anything else raises _NotSimple and PyYAML reads the file instead."""
    lines: list[tuple[int, str]] = []
    for n, raw in enumerate(text.splitlines()):
        body = raw.rstrip()
        stripped = body.lstrip(" ")
        if not stripped or stripped.startswith("#") or (n == 0 and stripped == "---"):
            continue
        if "\t" in body[: len(body) - len(stripped) + 1] or stripped.startswith(("---", "...")):
            raise _NotSimple(raw)
        lines.append((len(body) - len(stripped), stripped))
    pos = 0

    def is_item(i: int) -> bool:
        return lines[i][1] == "-" or lines[i][1].startswith("- ")

    def block(indent: int) -> Any:
        nonlocal pos
        if is_item(pos):
            seq: list[Any] = []
            while pos < len(lines) and lines[pos][0] == indent and is_item(pos):
                rest = lines[pos][1][1:]
                inner = rest.lstrip(" ")
                if not inner:
                    raise _NotSimple(lines[pos][1])
                col = indent + 1 + len(rest) - len(inner)
                if ": " in inner or inner.endswith(":"):
                    lines[pos] = (col, inner)
                    seq.append(block(col))
                else:
                    seq.append(_scalar(inner))
                    pos += 1
            return seq
        mapping: dict[str, Any] = {}
        while pos < len(lines) and lines[pos][0] == indent:
            key, colon, rest = lines[pos][1].partition(":")
            if not colon or (rest and not rest.startswith(" ")) or not key or key[0] in "'\"-?[{&*!|>%@`":
                raise _NotSimple(lines[pos][1])
            if key in mapping or key in _YAML_TRUE or key in _YAML_FALSE or key in ("null", "~"):
                raise _NotSimple(f"key {key}")
            pos += 1
            value = rest.strip()
            if value and not value.startswith("#"):
                mapping[key] = _scalar(value)
            elif pos < len(lines) and (lines[pos][0] > indent or (lines[pos][0] == indent and is_item(pos))):
                mapping[key] = block(lines[pos][0])
            else:
                mapping[key] = None
        return mapping

    if not lines:
        return None
    doc = block(lines[0][0])
    if pos != len(lines):
        raise _NotSimple(lines[pos][1])
    return doc


def _parse_document(path: str, text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        pass
    try:
        return _simple_yaml(text)
    except _NotSimple:
        pass
    try:
        import yaml  # type: ignore[import-untyped]
    except ImportError:  # pragma: no cover - PyYAML ships with the package
        raise KubeError(f"kubeconfig {path} is not JSON and PyYAML is not installed") from None
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    try:
        return yaml.load(text, Loader=loader)  # noqa: S506 - a safe loader
    except yaml.YAMLError as e:
        raise KubeError(f"kubeconfig {path} is not valid YAML: {e}") from None


def _named(doc: dict[str, Any], kind: str, name: str, path: str) -> dict[str, Any]:
    for entry in doc.get(kind) or ():
        if isinstance(entry, dict) and entry.get("name") == name:
            body = entry.get(kind[:-1])
            if isinstance(body, dict):
                return body
    raise KubeError(f"kubeconfig {path}: no {kind[:-1]} named {name!r}")


def _b64(value: Any, what: str, path: str) -> bytes:
    try:
        return base64.b64decode(str(value), validate=True)
    except (binascii.Error, ValueError):
        raise KubeError(f"kubeconfig {path}: {what} is not valid base64") from None


def load_kubeconfig(path: str) -> KubeConfig:
    """Reads the current context of the kubeconfig at ``path`` (JSON or YAML)."""
    try:
        text = _read(path)
    except OSError as e:
        raise KubeError(f"cannot read kubeconfig {path}: {e.strerror}") from None
    doc = _parse_document(path, text)
    if not isinstance(doc, dict):
        raise KubeError(f"kubeconfig {path} is not a mapping")
    ctx_name = doc.get("current-context")
    contexts = [c for c in doc.get("contexts") or () if isinstance(c, dict)]
    if not ctx_name:
        if len(contexts) != 1:
            raise KubeError(f"kubeconfig {path} has no current-context")
        ctx_name = contexts[0].get("name")
    ctx = _named(doc, "contexts", str(ctx_name), path)
    cluster = _named(doc, "clusters", str(ctx.get("cluster")), path)
    user: dict[str, Any] = _named(doc, "users", str(ctx["user"]), path) if ctx.get("user") else {}
    base = os.path.dirname(os.path.abspath(path))

    def rel(value: Any) -> str | None:
        # Paths in a kubeconfig are relative to the kubeconfig's own directory.
        return os.path.join(base, str(value)) if value else None

    server = str(cluster.get("server") or "")
    parts = urlsplit(server)
    if parts.scheme != "https" or not parts.hostname:
        raise KubeError(f"kubeconfig {path}: server {server!r} is not an https:// URL")
    if cluster.get("insecure-skip-tls-verify"):
        raise KubeError(
            f"kubeconfig {path}: insecure-skip-tls-verify is not supported; give the cluster's CA"
        )
    for unsupported in ("exec", "auth-provider", "username", "password"):
        if user.get(unsupported):
            raise KubeError(f"kubeconfig {path}: user {unsupported!r} authentication is not supported")
    return KubeConfig(
        source=path,
        server=server,
        ca_file=rel(cluster.get("certificate-authority")),
        ca_data=_b64(cluster["certificate-authority-data"], "certificate-authority-data", path)
        if cluster.get("certificate-authority-data")
        else None,
        tls_server_name=str(cluster["tls-server-name"]) if cluster.get("tls-server-name") else None,
        token=str(user["token"]) if user.get("token") else None,
        token_file=rel(user.get("tokenFile")),
        cert_file=rel(user.get("client-certificate")),
        cert_data=_b64(user["client-certificate-data"], "client-certificate-data", path)
        if user.get("client-certificate-data")
        else None,
        key_file=rel(user.get("client-key")),
        key_data=_b64(user["client-key-data"], "client-key-data", path)
        if user.get("client-key-data")
        else None,
    )


def _memfile(data: bytes) -> tuple[int, str]:
    """An anonymous in-memory file holding ``data``: keys from the kubeconfig never touch a disk."""
    fd = os.memfd_create("kubeconfig-credential", os.MFD_CLOEXEC)
    os.write(fd, data)
    return fd, f"/proc/self/fd/{fd}"


def ssl_context(kc: KubeConfig) -> ssl.SSLContext:
    """A client context that verifies the server (the kubeconfig's CA, else the system's)."""
    import ssl

    # PROTOCOL_TLS_CLIENT verifies the chain and the host name; the system's CAs are loaded only
    # when the kubeconfig names none (loading them costs more than the whole request).
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        if kc.ca_file or kc.ca_data:
            ctx.load_verify_locations(
                cafile=kc.ca_file, cadata=kc.ca_data.decode("ascii", "replace") if kc.ca_data else None
            )
        else:
            ctx.load_default_certs(ssl.Purpose.SERVER_AUTH)
        fds: list[int] = []
        try:
            cert = kc.cert_file
            key = kc.key_file
            if kc.cert_data:
                fd, cert = _memfile(kc.cert_data)
                fds.append(fd)
            if kc.key_data:
                fd, key = _memfile(kc.key_data)
                fds.append(fd)
            if cert:
                ctx.load_cert_chain(certfile=cert, keyfile=key)
            elif key:
                raise KubeError(f"kubeconfig {kc.source}: a client key without a client certificate")
        finally:
            for fd in fds:
                os.close(fd)
    except (OSError, ssl.SSLError) as e:
        raise KubeError(f"kubeconfig {kc.source}: cannot load TLS material: {e}") from None
    return ctx


def get_pod(kc: KubeConfig, namespace: str, name: str, timeout: float) -> dict[str, Any]:
    """One ``GET /api/v1/namespaces/NS/pods/NAME``; the Pod object, or KubeError."""
    import http.client
    import socket
    import ssl

    parts = urlsplit(kc.server)
    prefix = parts.path.rstrip("/")
    target = f"{prefix}/api/v1/namespaces/{quote(namespace, safe='')}/pods/{quote(name, safe='')}"
    headers = {"Accept": "application/json"}
    token = kc.bearer_token()
    if token:
        headers["Authorization"] = f"Bearer {token}"
    ctx = ssl_context(kc)
    host = parts.hostname or ""
    port = parts.port or 443
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        raw = socket.create_connection((host, port), timeout=timeout)
        try:
            # tls-server-name, when given, is the name the certificate must carry.
            conn.sock = ctx.wrap_socket(raw, server_hostname=kc.tls_server_name or host)
        except BaseException:
            raw.close()
            raise
        conn.request("GET", target, headers=headers)
        resp = conn.getresponse()
        body = resp.read(MAX_BODY + 1)
    except ssl.SSLCertVerificationError as e:
        raise KubeError(f"TLS verification of {kc.server} failed: {e.verify_message}") from None
    except (OSError, http.client.HTTPException) as e:
        raise KubeError(f"GET {kc.server}{target}: {str(e) or type(e).__name__}") from None
    finally:
        conn.close()
    if len(body) > MAX_BODY:
        raise KubeError(f"GET {target}: response larger than {MAX_BODY} bytes")
    if resp.status != 200:
        detail = ""
        try:
            status = json.loads(body)
            if isinstance(status, dict) and status.get("message"):
                detail = f": {status['message']}"
        except ValueError:
            pass
        raise KubeError(f"GET {target}: HTTP {resp.status} {resp.reason}{detail}")
    try:
        pod = json.loads(body)
    except ValueError:
        raise KubeError(f"GET {target}: the response is not JSON") from None
    if not isinstance(pod, dict) or pod.get("kind", "Pod") != "Pod":
        raise KubeError(f"GET {target}: the response is not a Pod")
    return pod


class RetryPolicy(NamedTuple):
    """How long to keep trying: an overall deadline, a per-request timeout and capped backoff."""

    deadline: float = 30.0
    request_timeout: float = 5.0
    initial_backoff: float = 0.1
    max_backoff: float = 2.0


def fetch_pod(
    kubeconfig: str,
    namespace: str,
    name: str,
    policy: RetryPolicy | None = None,
    *,
    on_failure: Callable[[int, KubeError], bool] | None = None,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> dict[str, Any]:
    """GETs the Pod, retrying every failure (the kubeconfig is re-read each time, as the installer
    may rewrite it) until ``policy.deadline``. ``on_failure(attempt, error)`` returning True stops
    at once (the caller decided to go on without the Pod); the last error is then raised."""
    policy = policy or RetryPolicy()
    start = clock()
    backoff = policy.initial_backoff
    attempt = 0
    while True:
        attempt += 1
        remaining = policy.deadline - (clock() - start)
        try:
            kc = load_kubeconfig(kubeconfig)
            return get_pod(kc, namespace, name, max(0.05, min(policy.request_timeout, remaining)))
        except KubeError as e:
            err = e
        if on_failure is not None and on_failure(attempt, err):
            raise err
        remaining = policy.deadline - (clock() - start)
        if remaining <= 0:
            raise KubeError(f"gave up after {attempt} attempts in {policy.deadline:g}s: {err}")
        sleep(min(backoff, remaining))
        backoff = min(backoff * 2, policy.max_backoff)
