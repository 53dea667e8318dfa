"""The plugin's minimal HTTP/1.1 GET (``cni.kube``): response framing by Content-Length, chunked
transfer-encoding and connection close, malformed answers, the request it sends, and the server
URL and path escaping it does without ``urllib``, numbers too long for int(), and the deadline
that bounds a request however slowly the server sends. Parsing is driven from bytes and over
real TLS connections to small local servers that answer with canned bytes."""

from __future__ import annotations

import io
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from urllib.parse import quote, urlsplit

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cni import kube
from tests.support.kubeconfig import write_kubeconfig
from tests.support.pki import Pki

POD = b'{"kind":"Pod","apiVersion":"v1","metadata":{"name":"web-0","namespace":"shop"}}'


def parse(raw: bytes, limit: int = kube.MAX_BODY) -> kube.Response:
    return kube.read_response(io.BufferedReader(io.BytesIO(raw)), limit)  # type: ignore[arg-type]


def chunked(body: bytes, sizes: Sequence[int], *, ext: bytes = b"", trailer: bytes = b"") -> bytes:
    out, pos = [], 0
    for n in sizes:
        out.append(b"%x%s\r\n%s\r\n" % (n, ext, body[pos : pos + n]))
        pos += n
    assert pos == len(body)
    return b"".join(out) + b"0\r\n" + trailer + b"\r\n"


# --- parsing ---------------------------------------------------------------------------------


def test_content_length() -> None:
    r = parse(
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%sEXTRA"
        % (len(POD), POD)
    )
    assert (r.status, r.reason, r.body) == (200, "OK", POD)
    assert r.headers["content-type"] == "application/json"


def test_content_length_zero_and_bodiless_statuses() -> None:
    assert parse(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n").body == b""
    assert parse(b"HTTP/1.1 204 No Content\r\n\r\n").body == b""
    assert parse(b"HTTP/1.1 304 Not Modified\r\nContent-Length: 10\r\n\r\n").body == b""


@pytest.mark.parametrize("sizes", [[len(POD)], [1] * len(POD), [10, 20, len(POD) - 30]])
def test_chunked(sizes: list[int]) -> None:
    raw = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + chunked(POD, sizes)
    assert parse(raw).body == POD


def test_chunked_with_extensions_and_trailers_and_a_content_length_to_ignore() -> None:
    body = chunked(POD, [7, len(POD) - 7], ext=b";name=value", trailer=b"X-Trailer: 1\r\nX-Other: 2\r\n")
    raw = b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: gzip, Chunked\r\n\r\n" + body
    assert parse(raw).body == POD


def test_chunk_sizes_in_upper_case_hex() -> None:
    body = bytes(range(256)) * 2
    raw = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n200\r\n" + body + b"\r\n0\r\n\r\n"
    assert parse(raw).body == body
    raw = raw.replace(b"\r\n200\r\n", b"\r\n1FF\r\n", 1).replace(
        body + b"\r\n", body[:511] + b"\r\n1\r\n" + body[511:] + b"\r\n"
    )
    assert parse(raw).body == body


def test_close_delimited() -> None:
    assert parse(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\r\n" + POD).body == POD
    # A transfer-coding other than chunked last: the body runs to the end of the connection.
    assert parse(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: identity\r\n\r\n" + POD).body == POD
    assert parse(b"HTTP/1.0 200 OK\r\n\r\n").body == b""


def test_interim_responses_are_skipped() -> None:
    raw = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: x\r\n\r\n"
    raw += b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(POD), POD)
    r = parse(raw)
    assert (r.status, r.body, "link" in r.headers) == (200, POD, False)


def test_status_line_and_header_forms() -> None:
    r = parse(
        b"HTTP/1.1 401\r\ncontent-length: 2\r\nX-A: one\r\nX-A: two\r\nX-B:  folded\r\n  more\r\n\r\n{}"
    )
    assert (r.status, r.reason, r.body) == (401, "", b"{}")
    assert r.headers["x-a"] == "one, two"
    assert r.headers["x-b"] == "folded more"
    r = parse(b"HTTP/1.1 503   Service Unavailable  \nContent-Length: 1\n\nx")  # bare LF line ends
    assert (r.status, r.reason, r.body) == (503, "Service Unavailable", b"x")
    assert parse(b"HTTP/1.1 200 OK\r\nContent-Length: 4, 4\r\n\r\nabcd").body == b"abcd"


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"", "closed the connection without a response"),
        (b"SSH-2.0-OpenSSH_9.2\r\n", "bad status line"),
        (b"HTTP/1.1\r\n\r\n", "bad status line"),
        (b"HTTP/2 200 OK\r\n\r\n", "bad status line"),
        (b"HTTP/1.1 2000 OK\r\n\r\n", "bad status line"),
        (b"HTTP/1.1 20x OK\r\n\r\n", "bad status line"),
        (b"HTTP/1.1 099 Low\r\n\r\n", "bad status line"),
        (b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n", "bad header line"),
        (b"HTTP/1.1 200 OK\r\nBad Name: x\r\n\r\n", "bad header line"),
        (b"HTTP/1.1 200 OK\r\nName : x\r\n\r\n", "bad header line"),
        (b"HTTP/1.1 200 OK\r\n: x\r\n\r\n", "bad header line"),
        (b"HTTP/1.1 200 OK\r\n\r\r\n\r\n", "bad header line"),
        (b"HTTP/1.1 200 OK\r\n" + b"X: y\r\n" * 101 + b"\r\n", "more than 100 header lines"),
        (b"HTTP/1.1 200 OK\r\nX: " + b"y" * 70000 + b"\r\n\r\n", "longer than 65536 bytes"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: ten\r\n\r\n", "bad Content-Length"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n", "bad Content-Length"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 4, 5\r\n\r\nabcde", "bad Content-Length"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\nContent-Length: 5\r\n\r\nabcde", "bad Content-Length"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc", "ended early: 3 of 10 body bytes"),
        # More digits than int() converts (4,300), and more than any length has.
        (b"HTTP/1.1 200 OK\r\nContent-Length: " + b"1" * 5000 + b"\r\n\r\n", "bad Content-Length"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: " + b"9" * 19 + b"\r\n\r\n", "bad Content-Length"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: \xd9\xa2\r\n\r\nab", "bad Content-Length"),
        (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + b"f" * 5000 + b"\r\nab\r\n0\r\n\r\n",
            "bad chunk size",
        ),
        (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1" + b"0" * 16 + b"\r\nab\r\n0\r\n\r\n",
            "bad chunk size",
        ),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nab\r\n0\r\n\r\n", "bad chunk size"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n-2\r\nab\r\n0\r\n\r\n", "bad chunk size"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0x2\r\nab\r\n0\r\n\r\n", "bad chunk size"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n\r\n", "bad chunk size"),
        (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nabc\r\n0\r\n\r\n",
            "not followed by CRLF",
        ),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nab", "ended early: 2 of 5 body bytes"),
        (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nab\r\n",
            "ended inside its chunked body",
        ),
    ],
)
def test_malformed_responses(raw: bytes, message: str) -> None:
    with pytest.raises(kube.HTTPError, match=message) as info:
        parse(raw)
    assert not isinstance(info.value, kube.TooLarge)
    assert len(str(info.value)) < 200, "an over-long value is clipped in the message"


def test_numbers_with_many_leading_zeros() -> None:
    # Still the numbers they spell, however many zeros lead them.
    raw = b"HTTP/1.1 200 OK\r\nContent-Length: " + b"0" * 5000 + b"2\r\n\r\n{}"
    assert parse(raw).body == b"{}"
    raw = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + b"0" * 5000 + b"2\r\n{}\r\n0\r\n\r\n"
    assert parse(raw).body == b"{}"


@pytest.mark.parametrize(
    ("over", "at"),
    [
        (
            b"HTTP/1.1 200 OK\r\nContent-Length: 11\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n" + b"x" * 10,
        ),
        (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + chunked(b"x" * 11, [6, 5]),
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + chunked(b"x" * 10, [6, 4]),
        ),
        (b"HTTP/1.1 200 OK\r\n\r\n" + b"x" * 11, b"HTTP/1.1 200 OK\r\n\r\n" + b"x" * 10),
    ],
    ids=["content-length", "chunked", "close-delimited"],
)
def test_body_limit(over: bytes, at: bytes) -> None:
    # Content-Length is refused before any of the body is read.
    with pytest.raises(kube.TooLarge):
        parse(over, limit=10)
    assert parse(at, limit=10).body == b"x" * 10


# --- over TLS against local servers ----------------------------------------------------------


class CannedServer:
    """Accepts TLS connections on 127.0.0.1 and answers each with the next canned response, sent
    in the pieces given (to cross chunk and header boundaries), then closes the connection."""

    def __init__(self, pki: Pki, responses: list[Iterable[bytes]]) -> None:
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.load_cert_chain(str(pki.server_cert), str(pki.server_key))
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.responses = list(responses)
        self.requests: list[bytes] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        for pieces in self.responses:
            try:
                conn, _ = self.listener.accept()
            except OSError:  # closed
                return
            try:
                with self.ctx.wrap_socket(conn, server_side=True) as tls:
                    request = b""
                    while b"\r\n\r\n" not in request:
                        data = tls.recv(65536)
                        if not data:
                            break
                        request += data
                    self.requests.append(request)
                    for piece in pieces:
                        tls.sendall(piece)
                    tls.unwrap()
            except OSError:  # the client gave up first (it refused the answer)
                pass

    def close(self) -> None:
        self.listener.close()
        self.thread.join(timeout=5)


Serve = Callable[..., CannedServer]


@pytest.fixture
def serve(pki: Pki) -> Iterator[Serve]:
    servers: list[CannedServer] = []

    def start(*responses: Iterable[bytes]) -> CannedServer:
        servers.append(CannedServer(pki, list(responses)))
        return servers[-1]

    yield start
    for s in servers:
        s.close()


def get(pki: Pki, tmp_path: Path, port: int, name: str = "web-0") -> dict[str, object]:
    kc = kube.load_kubeconfig(
        str(write_kubeconfig(tmp_path / "kc", f"https://127.0.0.1:{port}", ca_file=pki.ca_cert, token="tok"))
    )
    return kube.get_pod(kc, "shop", name, 5.0)


def test_the_request_sent(pki: Pki, tmp_path: Path, serve: Serve) -> None:
    srv = serve([b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(POD), POD)])
    assert get(pki, tmp_path, srv.port, "we b/0")["kind"] == "Pod"
    assert srv.requests == [
        b"GET /api/v1/namespaces/shop/pods/we%20b%2F0 HTTP/1.1\r\n"
        b"Host: 127.0.0.1:PORT\r\n"
        b"Accept: application/json\r\n"
        b"Authorization: Bearer tok\r\n"
        b"Connection: close\r\n\r\n".replace(b"PORT", str(srv.port).encode())
    ]


@pytest.mark.parametrize(
    "response",
    [
        [b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(POD), POD[:9], POD[9:]],
        [
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
            *[bytes([b]) for b in chunked(POD, [5, 9, len(POD) - 14])],
        ],
        [b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n", b"\r\n", POD[:3], POD[3:]],
        [
            b"HTTP/1.1 100 Continue\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(POD), POD),
        ],
    ],
    ids=["content-length", "chunked", "close-delimited", "continue"],
)
def test_framings_over_tls(pki: Pki, tmp_path: Path, serve: Serve, response: list[bytes]) -> None:
    srv = serve(response)
    assert get(pki, tmp_path, srv.port) == {
        "kind": "Pod",
        "apiVersion": "v1",
        "metadata": {"name": "web-0", "namespace": "shop"},
    }


@pytest.mark.parametrize(
    ("response", "message"),
    [
        (
            [b"garbage\r\n\r\n"],
            r"GET https://127\.0\.0\.1:\d+/api/v1/namespaces/shop/pods/web-0: bad status line",
        ),
        ([b""], "closed the connection without a response"),
        ([b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{}"], "ended early: 2 of 100 body bytes"),
        ([b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{]"], "web-0: the response is not JSON"),
        ([b'HTTP/1.1 200 OK\r\nContent-Length: 16\r\n\r\n{"kind":"Node"}\n'], "the response is not a Pod"),
        (
            [b'HTTP/1.1 403 Forbidden\r\nContent-Length: 20\r\n\r\n{"message":"denied"}'],
            "GET /api/v1/namespaces/shop/pods/web-0: HTTP 403 Forbidden: denied",
        ),
        ([b"HTTP/1.1 502 Bad Gateway\r\n\r\n<html>"], "pods/web-0: HTTP 502 Bad Gateway$"),
        ([b"HTTP/1.1 200 OK\r\nContent-Length: 9999999999\r\n\r\n"], "response larger than 8388608 bytes"),
    ],
)
def test_failures_over_tls(
    pki: Pki, tmp_path: Path, serve: Serve, response: list[bytes], message: str
) -> None:
    srv = serve(response)
    with pytest.raises(kube.KubeError, match=message):
        get(pki, tmp_path, srv.port)


def test_over_long_content_length_is_a_bad_response_and_retried(
    pki: Pki, tmp_path: Path, serve: Serve
) -> None:
    ok = [b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(POD), POD)]
    srv = serve([b"HTTP/1.1 200 OK\r\nContent-Length: " + b"7" * 5000 + b"\r\n\r\n"], ok)
    kc = write_kubeconfig(tmp_path / "kc", f"https://127.0.0.1:{srv.port}", ca_data=pki.ca_cert, token="t")
    failures: list[kube.KubeError] = []

    def on_failure(attempt: int, err: kube.KubeError) -> bool:
        failures.append(err)
        return False

    policy = kube.RetryPolicy(deadline=10, request_timeout=2, initial_backoff=0.01)
    assert kube.fetch_pod(str(kc), "shop", "web-0", policy, on_failure=on_failure)["kind"] == "Pod"
    assert len(failures) == 1 and failures[0].transient
    assert "bad Content-Length '7777" in str(failures[0]) and "(5000 characters)" in str(failures[0])


@pytest.mark.parametrize(
    ("status", "transient"),
    [
        (500, True),
        (503, True),
        (429, True),
        (408, True),
        (401, True),
        (403, True),
        (404, False),
        (400, False),
    ],
)
def test_which_statuses_are_retried(
    pki: Pki, tmp_path: Path, serve: Serve, status: int, transient: bool
) -> None:
    ok = [b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(POD), POD)]
    srv = serve([b"HTTP/1.1 %d Status\r\nContent-Length: 0\r\n\r\n" % status], *([ok] if transient else []))
    kc = write_kubeconfig(tmp_path / "kc", f"https://127.0.0.1:{srv.port}", ca_data=pki.ca_cert, token="t")
    policy = kube.RetryPolicy(deadline=10, request_timeout=2, initial_backoff=0.01)
    if transient:
        assert kube.fetch_pod(str(kc), "shop", "web-0", policy)["kind"] == "Pod"
    else:
        with pytest.raises(kube.KubeError, match=f"HTTP {status} Status$") as info:
            kube.fetch_pod(str(kc), "shop", "web-0", policy)
        assert not info.value.transient
        assert len(srv.requests) == 1


def test_retries_until_a_good_answer(pki: Pki, tmp_path: Path, serve: Serve) -> None:
    ok = [b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + chunked(POD, [len(POD)])]
    srv = serve([b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n"], [b"junk"], ok)
    kc = write_kubeconfig(tmp_path / "kc", f"https://127.0.0.1:{srv.port}", ca_data=pki.ca_cert, token="t")
    failures: list[str] = []

    def on_failure(attempt: int, err: kube.KubeError) -> bool:
        failures.append(str(err))
        return False

    policy = kube.RetryPolicy(deadline=10, request_timeout=2, initial_backoff=0.01)
    pod = kube.fetch_pod(str(kc), "shop", "web-0", policy, on_failure=on_failure)
    assert pod["kind"] == "Pod"
    assert [f.split(": ", 1)[1] for f in failures] == [
        "HTTP 503 Service Unavailable",
        "bad status line b'junk'",
    ]


# --- the server URL and path escaping, as urllib reads them -----------------------------------


@pytest.mark.parametrize(
    ("server", "expected"),
    [
        ("https://127.0.0.1:6443", ("127.0.0.1", 6443, "")),
        ("https://10.96.0.1", ("10.96.0.1", 443, "")),
        ("HTTPS://Kubernetes.Default.SVC:443/", ("kubernetes.default.svc", 443, "")),
        ("https://[fd00::1]:8443/k8s/clusters/c-1/", ("fd00::1", 8443, "/k8s/clusters/c-1")),
        ("https://[FD00::1]", ("fd00::1", 443, "")),
        ("https://user:pw@host:1/p?q=1#f", ("host", 1, "/p")),
        ("https://host:0", ("host", 443, "")),
        ("https://host:/x", ("host", 443, "/x")),
    ],
)
def test_split_server(server: str, expected: tuple[str, int, str]) -> None:
    assert kube.split_server(server) == expected


@pytest.mark.parametrize(
    ("server", "message"),
    [
        ("http://host", "is not an https:// URL"),
        ("https:host", "is not an https:// URL"),
        ("https://", "is not an https:// URL"),
        ("https://:443", "is not an https:// URL"),
        ("https://[fd00::1", "unbalanced brackets"),
        ("host:443", "is not an https:// URL"),
        ("https://host:https", "invalid port"),
        ("https://host:65536", "out of range"),
        ("https://host:-1", "invalid port"),
        ("https://host:" + "1" * 5000, r"out of range: 1{20}\.\.\. \(5000 digits\)$"),
        ("https://host:" + "0" * 5000 + "70000", "out of range"),
    ],
)
def test_split_server_refuses(server: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        kube.split_server(server)


def test_many_leading_zeros_in_the_port() -> None:
    assert kube.split_server("https://host:" + "0" * 5000 + "6443") == ("host", 6443, "")


@pytest.mark.parametrize("port", ["99999", "9" * 5000])
def test_a_bad_port_is_a_kubeconfig_error(tmp_path: Path, port: str) -> None:
    kc = write_kubeconfig(tmp_path / "kc", f"https://127.0.0.1:{port}", token="t")
    with pytest.raises(kube.KubeError, match=f"kc: server .* has a port out of range: {port[:20]}") as info:
        kube.load_kubeconfig(str(kc))
    assert not info.value.transient
    assert len(str(info.value)) < 300


# --- the deadline bounds every read ---------------------------------------------------------


def drip(prefix: bytes, filler: bytes, *, gap: float = 0.2, for_seconds: float = 20.0) -> Iterator[bytes]:
    """``prefix``, then ``filler`` one byte every ``gap`` seconds (one TLS record each), for at
    most ``for_seconds``: a server that never stops sending and never finishes."""
    yield prefix
    end = time.monotonic() + for_seconds
    i = 0
    while time.monotonic() < end:
        time.sleep(gap)
        yield filler[i % len(filler) : i % len(filler) + 1]
        i += 1


class SlowHandshake:
    """Accepts TCP connections and answers the ClientHello with the header of a TLS handshake
    record, then its body one byte every 0.2 s (for at most 20 s): the handshake never ends."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:  # closed
                return
            with conn:
                try:
                    conn.recv(65536)  # the ClientHello
                    for piece in drip(b"\x16\x03\x03\x40\x00", b"\x02\x00"):
                        conn.sendall(piece)
                except OSError:  # the client gave up
                    pass

    def close(self) -> None:
        self.listener.close()
        self.thread.join(timeout=5)


HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
SLOW = {
    "status-line": (b"HTTP/1.1 200 ", b"O"),
    "headers": (HEAD, b"X-Slow: 1\r\n"),
    "content-length-body": (HEAD + b"Content-Length: 100000\r\n\r\n", b"x"),
    "chunked-body": (HEAD + b"Transfer-Encoding: chunked\r\n\r\n186a0\r\n", b"x"),
    "chunk-size-line": (HEAD + b"Transfer-Encoding: chunked\r\n\r\n", b"0"),
    "close-delimited-body": (HEAD + b"\r\n", b"x"),
}


@pytest.fixture(params=["handshake", *SLOW])
def slow_server(request: pytest.FixtureRequest, serve: Serve) -> Iterator[int]:
    """The port of a server that sends the named part of its answer a byte at a time."""
    if request.param == "handshake":
        srv = SlowHandshake()
        yield srv.port
        srv.close()
        return
    prefix, filler = SLOW[request.param]
    yield serve(*(drip(prefix, filler) for _ in range(10))).port


def test_the_deadline_bounds_a_request_the_server_drips(pki: Pki, tmp_path: Path, slow_server: int) -> None:
    kc = write_kubeconfig(tmp_path / "kc", f"https://127.0.0.1:{slow_server}", ca_data=pki.ca_cert, token="t")
    # The request timeout is longer than the deadline: the deadline alone must end the request.
    policy = kube.RetryPolicy(deadline=2, request_timeout=30, initial_backoff=0.05)
    start = time.monotonic()
    with pytest.raises(
        kube.KubeError, match="gave up after 1 attempts in 2s: .*no complete response within 2s"
    ):
        kube.fetch_pod(str(kc), "shop", "web-0", policy)
    assert time.monotonic() - start < 6


def test_the_request_timeout_bounds_a_request_the_server_drips(
    pki: Pki, tmp_path: Path, slow_server: int
) -> None:
    kc = write_kubeconfig(tmp_path / "kc", f"https://127.0.0.1:{slow_server}", ca_data=pki.ca_cert, token="t")
    policy = kube.RetryPolicy(deadline=60, request_timeout=1)
    errors: list[kube.KubeError] = []

    def on_failure(attempt: int, err: kube.KubeError) -> bool:
        errors.append(err)
        return True  # stop after the first request

    start = time.monotonic()
    with pytest.raises(kube.KubeError, match="no complete response within 1s$"):
        kube.fetch_pod(str(kc), "shop", "web-0", policy, on_failure=on_failure)
    assert time.monotonic() - start < 5
    assert len(errors) == 1 and errors[0].transient


_host = st.one_of(
    st.from_regex(r"[a-zA-Z0-9][a-zA-Z0-9.-]{0,20}", fullmatch=True),
    st.ip_addresses(v=4).map(str),
    st.ip_addresses(v=6).map(lambda a: f"[{a}]"),
)
_url = st.builds(
    lambda scheme, user, host, port, path, tail: f"{scheme}://{user}{host}{port}{path}{tail}",
    st.sampled_from(["https", "HTTPS", "Https"]),
    st.sampled_from(["", "u@", "u:p@"]),
    _host,
    st.one_of(st.just(""), st.just(":"), st.integers(0, 70000).map(lambda p: f":{p}")),
    st.from_regex(r"(/[a-zA-Z0-9._~%-]{0,8}){0,3}/?", fullmatch=True),
    st.sampled_from(["", "?a=b", "#frag", "?x#y"]),
)


@given(_url)
@settings(max_examples=400)
def test_split_server_agrees_with_urlsplit(url: str) -> None:
    ref = urlsplit(url)
    try:
        port = ref.port
    except ValueError:
        with pytest.raises(ValueError):
            kube.split_server(url)
        return
    assert kube.split_server(url) == (ref.hostname, port or 443, ref.path.rstrip("/"))


@given(st.text(max_size=30))
def test_quote_segment_agrees_with_urllib(s: str) -> None:
    try:
        expected = quote(s, safe="")
    except UnicodeEncodeError:  # lone surrogates
        with pytest.raises(UnicodeEncodeError):
            kube.quote_segment(s)
        return
    assert kube.quote_segment(s) == expected
