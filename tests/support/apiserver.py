"""An HTTPS Kubernetes API server for the tests and the benchmark: real TLS (a ``tests.support.pki``
CA and server certificate), bearer-token authentication (401 on a wrong token, as kube-apiserver
answers; a verified client certificate authenticates a request that carries no token), and
``GET /api/v1/namespaces/NS/pods/NAME`` serving the Pod objects given to it.

One thread per connection with the TLS handshake in that thread, and a long listen queue, so that
many plugins starting at once are neither serialised behind one handshake nor refused.

As a process (the benchmark's): ``python -m tests.support.apiserver --pki DIR --token-file T
--pods PODS.json`` prints its port on the first line of stdout and serves until terminated. DIR
holds what ``make_pki`` wrote; PODS.json maps pod names to Pod objects, each served in every
namespace, and the ``default`` one answers for any other name.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import select
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from tests.support.pki import Pki

CLIENT_CERTS = ("none", "optional", "required")
MODULE = "tests.support.apiserver"
REPO_ROOT = Path(__file__).resolve().parents[2]


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


# --- selectors and patches, as kube-apiserver reads them ---------------------------------------

_FIELDS = {
    "spec.nodeName": lambda o: (o.get("spec") or {}).get("nodeName", ""),
    "metadata.namespace": lambda o: (o.get("metadata") or {}).get("namespace", ""),
    "metadata.name": lambda o: (o.get("metadata") or {}).get("name", ""),
    "status.phase": lambda o: (o.get("status") or {}).get("phase", ""),
}


def field_matches(selector: str, obj: Mapping[str, Any]) -> bool:
    """``spec.nodeName=node-1,status.phase!=Failed``: every term holds (``=``, ``==``, ``!=``)."""
    for term in filter(None, (t.strip() for t in selector.split(","))):
        neg = "!=" in term
        key, _, value = term.partition("!=" if neg else "=")
        value = value.removeprefix("=")
        have = str(_FIELDS[key.strip()](obj) or "")
        if (have == value) == neg:
            return False
    return True


def label_matches(selector: str, obj: Mapping[str, Any]) -> bool:
    """``k=v``, ``k!=v``, ``k`` and ``!k`` terms, all of which must hold."""
    labels = (obj.get("metadata") or {}).get("labels") or {}
    for term in filter(None, (t.strip() for t in selector.split(","))):
        if "!=" in term:
            k, _, v = term.partition("!=")
            if labels.get(k.strip()) == v.strip():
                return False
        elif "=" in term:
            k, _, v = term.partition("=")
            if labels.get(k.strip()) != v.strip().removeprefix("="):
                return False
        elif term.startswith("!"):
            if term[1:] in labels:
                return False
        elif term not in labels:
            return False
    return True


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = dict(target) if isinstance(target, dict) else {}
    for k, v in patch.items():
        if v is None:
            out.pop(k, None)
        else:
            out[k] = merge_patch(out.get(k), v)
    return out


class PatchFailed(Exception):
    """A JSON patch whose ``test`` does not hold, or that names a missing path."""


def json_patch(doc: Any, ops: list[dict[str, Any]]) -> Any:
    """RFC 6902 JSON patch: test, add, replace, remove (what clients send)."""
    doc = copy.deepcopy(doc)
    for op in ops:
        parts = [p.replace("~1", "/").replace("~0", "~") for p in op["path"].split("/")[1:]]
        parent = doc
        for part in parts[:-1]:
            try:
                parent = parent[int(part)] if isinstance(parent, list) else parent[part]
            except (KeyError, IndexError, ValueError):
                raise PatchFailed(f"path {op['path']} does not exist") from None
        last = parts[-1]
        kind = op["op"]
        if isinstance(parent, list):
            index = len(parent) if last == "-" else int(last)
            current = parent[index] if index < len(parent) else None
        else:
            current = parent.get(last)
        if kind == "test":
            if current != op["value"]:
                raise PatchFailed(f"testing value {op['path']} failed")
        elif kind in ("add", "replace"):
            if kind == "replace" and not isinstance(parent, list) and last not in parent:
                raise PatchFailed(f"replace operation does not apply: doc is missing key: {op['path']}")
            if isinstance(parent, list):
                if kind == "add":
                    parent.insert(index, copy.deepcopy(op["value"]))
                else:
                    parent[index] = copy.deepcopy(op["value"])
            else:
                parent[last] = copy.deepcopy(op["value"])
        elif kind == "remove":
            if isinstance(parent, list):
                del parent[index]
            elif last in parent:
                del parent[last]
            else:
                raise PatchFailed(f"remove operation does not apply: doc is missing path: {op['path']}")
        else:
            raise PatchFailed(f"unsupported operation {kind}")
    return doc


# --- the server's state --------------------------------------------------------------------------


@dataclass(frozen=True)
class Call:
    """One request as the server saw it (for tests: who asked for what, and the answer)."""

    method: str
    path: str
    status: int
    verb: str
    resource: str
    user_agent: str
    body: Any


@dataclass
class _State:
    token: str
    close_connections: bool = False
    pods: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    # Served under whatever namespace (and, for the default, name) the request asks for.
    everywhere: dict[str, dict[str, Any]] = field(default_factory=dict)
    default_pod: dict[str, Any] | None = None
    requests: list[tuple[str, str, bool]] = field(default_factory=list)  # (method, path, authorized)
    calls: list[Call] = field(default_factory=list)
    hooks: list[Callable[[Call], None]] = field(default_factory=list)  # called with every Call
    fail_next: int = 0  # answer this many requests with 503 first
    # Tokens besides ``token`` (which may do anything): token -> the "verb resource" pairs it may
    # do, as RBAC grants them ("list pods", "patch pods/status", "patch nodes").
    grants: dict[str, frozenset[str]] = field(default_factory=dict)
    nodes: dict[str, dict[str, Any]] = field(default_factory=dict)
    events: list[dict[str, Any]] = field(default_factory=list)
    # The pods' history for watches: (resourceVersion, type, object); versions below
    # ``oldest`` were compacted away (a watch from there gets 410 Gone).
    revision: int = 1000
    history: list[tuple[int, str, dict[str, Any]]] = field(default_factory=list)
    oldest: int = 0
    gone_as: str = "event"  # how a too-old watch is answered: an ERROR event, or HTTP "status"
    bookmark_interval: float = 1.0
    watch_generation: int = 0  # bumped by break_watches(): open watches are cut off
    watches: int = 0  # watch requests answered with a stream
    lock: threading.RLock = field(default_factory=threading.RLock)
    changed: threading.Condition = field(init=False)

    def __post_init__(self) -> None:
        self.changed = threading.Condition(self.lock)

    def pod(self, namespace: str, name: str) -> dict[str, Any] | None:
        with self.lock:
            pod = self.pods.get((namespace, name))
            if pod is not None:
                return pod
            pod = self.everywhere.get(name, self.default_pod)
        if pod is None:
            return None
        return {**pod, "metadata": {**pod["metadata"], "namespace": namespace, "name": name}}

    def record(self, kind: str, obj: dict[str, Any]) -> dict[str, Any]:
        """A change of a listed pod: a new resourceVersion, in the history, watchers woken."""
        with self.lock:
            self.revision += 1
            obj = {**obj, "metadata": {**obj["metadata"], "resourceVersion": str(self.revision)}}
            self.history.append((self.revision, kind, copy.deepcopy(obj)))
            self.changed.notify_all()
            return obj


def _verb_resource(method: str, parts: list[str], query: dict[str, str]) -> tuple[str, str, str]:
    """(verb, resource, namespace) as RBAC names them, for the paths this server knows."""
    ns = ""
    rest = parts[2:]
    if rest[:1] == ["namespaces"] and len(rest) >= 3:
        ns, rest = rest[1], rest[2:]
    resource = rest[0] if rest else ""
    named = len(rest) >= 2
    if len(rest) >= 3:
        resource = f"{resource}/{rest[2]}"
    verb = {"GET": "get", "POST": "create", "PATCH": "patch", "DELETE": "delete", "PUT": "update"}[method]
    if method == "GET" and not named:
        verb = "watch" if query.get("watch") in ("1", "true") else "list"
    return verb, resource, ns


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
        if self.server.state.close_connections:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(data)
        self._status = code

    def _found(self, resource: str, name: str, obj: Any) -> None:
        """The object, or kube-apiserver's 404 for it."""
        if obj is None:
            self._error(404, "NotFound", f'{resource} "{name}" not found')
        else:
            self._send(200, obj)

    def _error(self, code: int, reason: str, message: str) -> None:
        self._send(code, _status(code, reason, message))

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        self._dispatch("GET")

    def do_POST(self) -> None:  # noqa: N802
        self._dispatch("POST")

    def do_PATCH(self) -> None:  # noqa: N802
        self._dispatch("PATCH")

    def do_DELETE(self) -> None:  # noqa: N802
        self._dispatch("DELETE")

    def _dispatch(self, method: str) -> None:
        st = self.server.state
        self._status = 0
        self._recorded = False
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = ...
        path, _, qs = self.path.partition("?")
        query = {unquote(k): unquote(v) for k, _, v in (p.partition("=") for p in qs.split("&") if p)}
        parts = [unquote(p) for p in path.strip("/").split("/")]
        auth = self.headers.get("Authorization", "")
        cert = self.connection.getpeercert() if isinstance(self.connection, ssl.SSLSocket) else None
        token = auth.removeprefix("Bearer ") if auth.startswith("Bearer ") else None
        ok = token == st.token or (token is not None and token in st.grants) or (not auth and bool(cert))
        verb, resource, namespace = ("", "", "")
        if parts[:2] == ["api", "v1"] and len(parts) > 2:
            verb, resource, namespace = _verb_resource(method, parts, query)
        with st.lock:
            st.requests.append((method, self.path, ok))
            failing = st.fail_next > 0
            if failing:
                st.fail_next -= 1
        try:
            if not ok:
                self._error(401, "Unauthorized", "Unauthorized")
            elif token in st.grants and f"{verb} {resource}" not in st.grants[token]:
                where = f' in the namespace "{namespace}"' if namespace else " at the cluster scope"
                self._error(
                    403,
                    "Forbidden",
                    f'{resource} is forbidden: User "system:serviceaccount:test" cannot {verb} resource '
                    f'"{resource}" in API group ""{where}',
                )
            elif failing:
                self._error(503, "ServiceUnavailable", "the server is currently unable to handle the request")
            elif body is ...:
                self._error(400, "BadRequest", "the body is not JSON")
            else:
                self._route(method, verb, resource, namespace, parts, query, body)
        finally:
            if not self._recorded:
                self._record(method, verb, resource, body)

    def _record(self, method: str, verb: str, resource: str, body: Any) -> None:
        st = self.server.state
        self._recorded = True
        call = Call(method, self.path, self._status, verb, resource, self.headers.get("User-Agent", ""), body)
        with st.lock:
            st.calls.append(call)
            hooks = list(st.hooks)
        for hook in hooks:
            hook(call)

    def _route(
        self,
        method: str,
        verb: str,
        resource: str,
        namespace: str,
        parts: list[str],
        query: dict[str, str],
        body: Any,
    ) -> None:
        st = self.server.state
        name = ""
        rest = parts[2:]
        if rest[:1] == ["namespaces"] and len(rest) >= 3:
            rest = rest[2:]
        if len(rest) >= 2:
            name = rest[1]
        if resource == "pods" and verb == "get":
            self._found(resource, name, st.pod(namespace, name))
        elif resource == "pods" and verb == "list":
            self._list(namespace, query)
        elif resource == "pods" and verb == "watch":
            self._watch(namespace, query)
        elif resource == "pods" and verb == "delete":
            self._delete_pod(namespace, name, body)
        elif resource == "pods/status" and verb == "patch":
            self._patch_pod(namespace, name, body)
        elif resource == "nodes" and verb == "get":
            with st.lock:
                node = st.nodes.get(name)
            self._found(resource, name, node)
        elif resource == "nodes" and verb == "patch":
            self._patch_node(name, body)
        elif resource == "events" and verb == "create":
            if not isinstance(body, dict) or not isinstance(body.get("involvedObject"), dict):
                self._error(422, "Invalid", "Event is invalid: involvedObject: Required value")
            elif (body.get("metadata") or {}).get("namespace", namespace) != namespace:
                self._error(400, "BadRequest", "the namespace of the object does not match the request")
            else:
                with st.lock:
                    st.events.append(body)
                self._send(201, body)
        else:
            self._error(404, "NotFound", "the server could not find the requested resource")

    # --- pods: list and watch -----------------------------------------------------------------

    def _selected(self, namespace: str, query: dict[str, str], obj: Mapping[str, Any]) -> bool:
        if namespace and (obj.get("metadata") or {}).get("namespace") != namespace:
            return False
        return field_matches(query.get("fieldSelector", ""), obj) and label_matches(
            query.get("labelSelector", ""), obj
        )

    def _list(self, namespace: str, query: dict[str, str]) -> None:
        st = self.server.state
        limit = int(query.get("limit") or 0)
        token = query.get("continue", "")
        with st.lock:
            revision, offset = st.revision, 0
            if token:
                at, _, start = token.partition(":")
                revision, offset = int(at), int(start)
                if revision < st.oldest:
                    self._error(
                        410,
                        "Expired",
                        "The provided continue parameter is too old to display a consistent list result.",
                    )
                    return
            pods = [copy.deepcopy(p) for p in st.pods.values() if self._selected(namespace, query, p)]
        pods.sort(key=lambda p: (p["metadata"]["namespace"], p["metadata"]["name"]))
        page = pods[offset : offset + limit] if limit else pods[offset:]
        meta: dict[str, Any] = {"resourceVersion": str(revision)}
        if limit and offset + limit < len(pods):
            meta["continue"] = f"{revision}:{offset + limit}"
        items = []
        for p in page:
            p = dict(p)
            p.pop("kind", None)
            p.pop("apiVersion", None)
            items.append(p)
        self._send(200, {"kind": "PodList", "apiVersion": "v1", "metadata": meta, "items": items})

    def _chunk(self, doc: dict[str, Any]) -> None:
        data = json.dumps(doc).encode() + b"\n"
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def _watch(self, namespace: str, query: dict[str, str]) -> None:
        st = self.server.state
        since = query.get("resourceVersion", "")
        bookmarks = query.get("allowWatchBookmarks") == "true"
        timeout = float(query.get("timeoutSeconds") or 1800)
        with st.lock:
            start = int(since) if since and since != "0" else st.revision
            gone = bool(since) and since != "0" and start < st.oldest
            generation = st.watch_generation
            if not gone or st.gone_as == "event":
                st.watches += 1
            initial = (
                [copy.deepcopy(p) for p in st.pods.values() if self._selected(namespace, query, p)]
                if not since or since == "0"
                else []
            )
        message = f"too old resource version: {since} ({st.oldest})"
        if gone and st.gone_as == "status":
            self._error(410, "Expired", message)
            return
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        self._status = 200
        self._record("GET", "watch", "pods", None)  # now: the stream may last
        if gone:
            self._chunk({"type": "ERROR", "object": _status(410, "Expired", message)})
            self.wfile.write(b"0\r\n\r\n")
            return
        for p in initial:
            self._chunk({"type": "ADDED", "object": p})
        end = time.monotonic() + timeout
        last_bookmark = time.monotonic()
        sent = start
        while True:
            with st.lock:
                if not any(rv > sent for rv, _, _ in st.history):
                    st.changed.wait(timeout=0.05)
                if st.watch_generation != generation:
                    # Cut off mid-stream: no last chunk, the connection just closes.
                    self.close_connection = True
                    return
                pending = [(rv, k, o) for rv, k, o in st.history if rv > sent]
                current = st.revision
            for rv, kind, obj in pending:
                sent = rv
                if self._selected(namespace, query, obj):
                    self._chunk({"type": kind, "object": obj})
            now = time.monotonic()
            if bookmarks and now - last_bookmark >= st.bookmark_interval:
                sent = max(sent, current)
                self._chunk(
                    {
                        "type": "BOOKMARK",
                        "object": {
                            "kind": "Pod",
                            "apiVersion": "v1",
                            "metadata": {"resourceVersion": str(sent)},
                        },
                    }
                )
                last_bookmark = now
            if now >= end or getattr(self.server, "stopping", False):
                self.wfile.write(b"0\r\n\r\n")
                self.wfile.flush()
                return

    # --- pods: delete and patch ---------------------------------------------------------------

    def _delete_pod(self, namespace: str, name: str, body: Any) -> None:
        st = self.server.state
        pre = (body or {}).get("preconditions") or {} if isinstance(body, dict) else {}
        with st.lock:
            pod = st.pods.get((namespace, name))
            if pod is None:
                self._error(404, "NotFound", f'pods "{name}" not found')
                return
            meta = pod["metadata"]
            for key, what in (("uid", "UID"), ("resourceVersion", "ResourceVersion")):
                if pre.get(key) is not None and pre[key] != meta.get(key):
                    self._error(
                        409,
                        "Conflict",
                        f'Operation cannot be fulfilled on pods "{name}": Precondition failed: {what} in '
                        f"precondition: {pre[key]}, {what} in object meta: {meta.get(key)}",
                    )
                    return
            del st.pods[(namespace, name)]
            gone = st.record("DELETED", pod)
        self._send(200, gone)

    def _patch_pod(self, namespace: str, name: str, body: Any) -> None:
        st = self.server.state
        if self.headers.get("Content-Type") != "application/merge-patch+json":
            self._error(415, "UnsupportedMediaType", "the server only takes merge patches here")
            return
        with st.lock:
            pod = st.pods.get((namespace, name))
            if pod is None:
                self._error(404, "NotFound", f'pods "{name}" not found')
                return
            patched = merge_patch(pod, body)
            st.pods[(namespace, name)] = patched = st.record("MODIFIED", patched)
        self._send(200, patched)

    def _patch_node(self, name: str, body: Any) -> None:
        st = self.server.state
        kind = self.headers.get("Content-Type")
        with st.lock:
            node = st.nodes.get(name)
            if node is None:
                self._error(404, "NotFound", f'nodes "{name}" not found')
                return
            if kind == "application/json-patch+json":
                try:
                    patched = json_patch(node, body)
                except (PatchFailed, KeyError, TypeError, ValueError) as e:
                    self._error(422, "Invalid", str(e))
                    return
            elif kind == "application/merge-patch+json":
                want = ((body or {}).get("metadata") or {}).get("resourceVersion")
                if want is not None and want != node["metadata"].get("resourceVersion"):
                    self._error(
                        409,
                        "Conflict",
                        f'Operation cannot be fulfilled on nodes "{name}": the object has been modified; '
                        "please apply your changes to the latest version and try again",
                    )
                    return
                patched = merge_patch(node, body)
            else:
                self._error(415, "UnsupportedMediaType", f"unsupported patch type {kind}")
                return
            st.revision += 1
            patched["metadata"]["resourceVersion"] = str(st.revision)
            st.nodes[name] = patched
        self._send(200, patched)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 1024
    state: _State
    tls: ssl.SSLContext
    stopping = False

    def server_bind(self) -> None:
        # An address that is not there yet (a bridge's gateway before its first pod) can be bound.
        self.socket.setsockopt(socket.IPPROTO_IP, IP_FREEBIND, 1)
        super().server_bind()

    def finish_request(self, request: Any, client_address: Any) -> None:
        # The handshake here, in the connection's own thread, not in accept().
        try:
            conn = self.tls.wrap_socket(request, server_side=True)
        except OSError:  # ssl.SSLError too: a client that gave up or did not trust us
            return
        try:
            self.RequestHandlerClass(conn, client_address, self)
        finally:
            self.shutdown_request(conn)


IP_FREEBIND = 15  # linux/in.h


class KubeAPIServer:
    """An HTTPS Kubernetes API on ``host`` (127.0.0.1 unless given); use as a context manager, or
    ``serve()`` in the calling thread.

    It serves Pods (get; list and watch with field and label selectors, resourceVersion,
    bookmarks and 410 Gone; delete with preconditions; merge patches of ``pods/status``), Nodes
    (get; JSON patch with ``test``, merge patch with a resourceVersion precondition) and takes
    Events. Every token but the one given may do only what ``grant()`` allows (403 otherwise).

    ``client_certs``: whether the TLS handshake asks for a client certificate (``optional``: one
    signed by the PKI's CA authenticates a request without a token), insists on one, or does not
    ask. ``close_connections``: answer every request with ``Connection: close``."""

    def __init__(
        self,
        pki: Pki,
        token: str,
        *,
        client_certs: str = "optional",
        close_connections: bool = False,
        host: str = "127.0.0.1",
    ) -> None:
        if client_certs not in CLIENT_CERTS:
            raise ValueError(f"client_certs must be one of {CLIENT_CERTS}, not {client_certs!r}")
        self.pki = pki
        self.host = host
        self.state = _State(token=token, close_connections=close_connections)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(str(pki.server_cert), str(pki.server_key))
        if client_certs != "none":
            ctx.load_verify_locations(str(pki.ca_cert))
            ctx.verify_mode = ssl.CERT_REQUIRED if client_certs == "required" else ssl.CERT_OPTIONAL
        self._ctx = ctx
        self._httpd = self._listen(0)
        self._port = int(self._httpd.server_address[1])
        self._thread: threading.Thread | None = None

    def _listen(self, port: int) -> _Server:
        httpd = _Server((self.host, port), _Handler)
        httpd.state = self.state
        httpd.tls = self._ctx
        return httpd

    @property
    def port(self) -> int:
        return self._port

    @property
    def url(self) -> str:
        return f"https://{self.host}:{self.port}"

    def add_pod(self, pod: Mapping[str, Any], *, every_namespace: bool = False) -> None:
        """Serves ``pod`` under its namespace and name (listed and watched: ADDED, or MODIFIED
        when it was there, with a new resourceVersion); with ``every_namespace``, under its name
        in any namespace asked for (neither listed nor watched)."""
        meta = pod["metadata"]
        with self.state.lock:
            if every_namespace:
                self.state.everywhere[meta["name"]] = dict(pod)
                return
            key = (meta["namespace"], meta["name"])
            kind = "MODIFIED" if key in self.state.pods else "ADDED"
            self.state.pods[key] = self.state.record(kind, dict(pod))

    def update_pod(self, namespace: str, name: str, patch: Mapping[str, Any]) -> dict[str, Any]:
        """A merge patch of the pod (as kubelet's status updates are), MODIFIED for watchers."""
        with self.state.lock:
            pod = merge_patch(self.state.pods[(namespace, name)], dict(patch))
            self.state.pods[(namespace, name)] = pod = self.state.record("MODIFIED", pod)
            return copy.deepcopy(pod)

    def delete_pod(self, namespace: str, name: str) -> None:
        with self.state.lock:
            pod = self.state.pods.pop((namespace, name))
            self.state.record("DELETED", pod)

    def get_pod(self, namespace: str, name: str) -> dict[str, Any] | None:
        with self.state.lock:
            pod = self.state.pods.get((namespace, name))
            return copy.deepcopy(pod) if pod is not None else None

    def add_node(self, name: str, *, taints: list[dict[str, Any]] | None = None) -> None:
        with self.state.lock:
            self.state.revision += 1
            self.state.nodes[name] = {
                "kind": "Node",
                "apiVersion": "v1",
                "metadata": {
                    "name": name,
                    "uid": str(uuid.uuid4()),
                    "resourceVersion": str(self.state.revision),
                },
                "spec": {"taints": list(taints or [])} if taints else {},
            }

    def node(self, name: str) -> dict[str, Any]:
        with self.state.lock:
            return copy.deepcopy(self.state.nodes[name])

    def set_node_taints(self, name: str, taints: list[dict[str, Any]]) -> None:
        """Another writer changes the node's taints (a new resourceVersion)."""
        with self.state.lock:
            self.state.revision += 1
            node = self.state.nodes[name]
            node["spec"] = {**node.get("spec", {}), "taints": copy.deepcopy(taints)}
            node["metadata"]["resourceVersion"] = str(self.state.revision)

    def grant(self, token: str, *allowed: str) -> None:
        """``token`` authenticates, and may do only ``allowed`` ("list pods", "watch pods",
        "create events", "get nodes", "patch nodes", "delete pods", "patch pods/status", ...)."""
        with self.state.lock:
            self.state.grants[token] = frozenset(allowed)

    def set_default_pod(self, pod: Mapping[str, Any] | None) -> None:
        """Answers for any pod not added (under the namespace and name asked for) instead of 404."""
        with self.state.lock:
            self.state.default_pod = None if pod is None else dict(pod)

    def break_watches(self) -> None:
        """Every open watch is cut off mid-stream (the connection closes without the last chunk)."""
        with self.state.lock:
            self.state.watch_generation += 1
            self.state.changed.notify_all()

    def compact(self, *, gone_as: str = "event") -> None:
        """Forgets the history up to now: a watch from an older resourceVersion gets 410 Gone, as
        an ERROR event in its stream (``event``) or as its HTTP status (``status``); open watches
        are cut off."""
        with self.state.lock:
            self.state.oldest = self.state.revision
            self.state.history.clear()
            self.state.gone_as = gone_as
        self.break_watches()

    def on_call(self, hook: Callable[[Call], None]) -> None:
        """``hook(call)`` for every request, once it is answered (a watch: once it streams)."""
        with self.state.lock:
            self.state.hooks.append(hook)

    @property
    def requests(self) -> list[tuple[str, str, bool]]:
        with self.state.lock:
            return list(self.state.requests)

    @property
    def calls(self) -> list[Call]:
        with self.state.lock:
            return list(self.state.calls)

    @property
    def events(self) -> list[dict[str, Any]]:
        with self.state.lock:
            return copy.deepcopy(self.state.events)

    @property
    def watches(self) -> int:
        with self.state.lock:
            return self.state.watches

    def fail_next(self, n: int) -> None:
        with self.state.lock:
            self.state.fail_next = n

    def start(self) -> KubeAPIServer:
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="kubeapi", daemon=True)
        self._thread.start()
        return self

    def serve(self) -> None:
        """Serves in the calling thread until ``stop()`` from another one (or an exception)."""
        try:
            self._httpd.serve_forever()
        finally:
            self._httpd.server_close()

    def stop(self) -> None:
        self._httpd.stopping = True
        self.break_watches()
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


def spawn(
    pki: Pki,
    token: str,
    pods: Mapping[str, Mapping[str, Any]],
    work: Path,
    *,
    python: str = sys.executable,
    timeout: float = 30,
    **popen: Any,
) -> tuple[subprocess.Popen[bytes], int]:
    """Starts the server as its own process (``python -m tests.support.apiserver``) serving
    ``pods`` (see the module's docstring) with ``token``; its token and pods files go into
    ``work``. Returns the process, which the caller terminates, and the port it listens on."""
    token_file, pods_file = work / "token", work / "pods.json"
    token_file.write_text(token + "\n")
    pods_file.write_text(json.dumps(pods))
    argv = [python, "-m", MODULE, "--pki", str(pki.ca_cert.parent),
            "--token-file", str(token_file), "--pods", str(pods_file)]  # fmt: skip
    popen.setdefault("env", {**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    proc = subprocess.Popen(argv, cwd=REPO_ROOT, stdout=subprocess.PIPE, **popen)
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    line = proc.stdout.readline().strip() if ready else b""
    if not line.isdigit():
        proc.kill()
        proc.wait()
        raise RuntimeError(f"the API server did not start within {timeout}s")
    return proc, int(line)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog=f"python -m {MODULE}")
    ap.add_argument("--pki", required=True, type=Path, help="the directory make_pki wrote")
    ap.add_argument("--token-file", required=True, type=Path)
    ap.add_argument("--pods", required=True, type=Path, help="JSON: pod name -> Pod, 'default' for any other")
    ap.add_argument(
        "--client-certs", choices=CLIENT_CERTS, default="none", help="ask clients for a certificate"
    )
    args = ap.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    server = KubeAPIServer(
        Pki.in_dir(args.pki),
        args.token_file.read_text().strip(),
        client_certs=args.client_certs,
        close_connections=True,
    )
    pods = json.loads(args.pods.read_text())
    for name, pod in pods.items():
        if name == "default":
            server.set_default_pod(pod)
        else:
            server.add_pod({**pod, "metadata": {**pod["metadata"], "name": name}}, every_namespace=True)
    print(server.port, flush=True)
    server.serve()
    return 0


if __name__ == "__main__":
    sys.exit(main())
