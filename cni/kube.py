"""Just enough of a Kubernetes client for one request: read a kubeconfig and GET one Pod over
verified TLS, with bounded retries and an overall deadline.

Standard library only: ``ssl`` and a minimal HTTP/1.1 GET (``http.client`` would pull in the
``email`` package, which costs more start-up than the request itself). PyYAML is imported only
for a kubeconfig that is neither JSON nor the plain YAML kubeconfig writers emit (the plugin
executable install-cni writes carries PyYAML's pure-Python package for that). There is
deliberately no way to turn certificate verification off.

Failures are KubeErrors that say whether trying again may help: the network and the server's
answers may change within the deadline; a kubeconfig, or a file it names, that cannot be used
needs someone to fix it, so retrying it would only delay the error.
"""

from __future__ import annotations

import binascii
import json
import os
import time

from istio_iptables.startup import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    import socket
    import ssl
    from collections.abc import Callable, Iterator
    from typing import Any, Protocol

    class Source(Protocol):
        """What read_response reads from: a binary file object, or the deadline-bound reader."""

        def readline(self, size: int = -1, /) -> bytes: ...

        def read(self, size: int = -1, /) -> bytes: ...


MAX_BODY = 8 << 20


def _read(path: str, encoding: str = "utf-8") -> str:
    with open(path, encoding=encoding) as f:
        return f.read()


def clip(text: str, width: int = 60) -> str:
    """``text`` quoted for a message: whole when short, else its start and its length (a value
    may be thousands of characters long)."""
    return repr(text) if len(text) <= width else f"{text[:width]!r}... ({len(text)} characters)"


def shorten(text: str, width: int = 200) -> str:
    """``clip`` unquoted, for text that is itself a message."""
    return text if len(text) <= width else f"{text[:width]}... ({len(text)} characters)"


def uint(text: str, *, base: int = 10, digits: int = 18) -> int | None:
    """``text`` as a number when it is only ASCII digits of ``base`` (10 or 16) with at most
    ``digits`` significant ones; else None. int() alone would take signs, blanks, underscores
    and other scripts' digits, and raise for more than 4,300 decimal digits."""
    allowed = "0123456789abcdefABCDEF" if base == 16 else "0123456789"
    if not text or text.strip(allowed):
        return None
    significant = text.lstrip("0")
    if len(significant) > digits:
        return None
    return int(significant or "0", base)


class KubeError(Exception):
    """The Pod could not be read; the message says why (kubeconfig, TLS, HTTP status ...).
    ``transient``: trying again may succeed (the network, the server's answer), as opposed to a
    kubeconfig or credential that cannot be used until someone changes it."""

    def __init__(self, message: str, *, transient: bool = False) -> None:
        super().__init__(message)
        self.transient = transient


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
            except UnicodeDecodeError:
                raise KubeError(f"tokenFile {self.token_file} is not UTF-8 text") from None
            else:
                if tok:
                    _check_token(tok, f"tokenFile {self.token_file}")
                    return tok
        return self.token or None


def _check_token(token: str, where: str) -> None:
    # The token goes into a header line: a control character would end the line (or smuggle in
    # another header) and a character outside latin-1 cannot be sent at all.
    if not token.isascii() or not token.isprintable():
        raise KubeError(f"{where}: the token holds characters an HTTP header cannot carry")


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
    # json and both YAML readers recurse per nesting level; int() refuses over-long numbers.
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        pass
    try:
        return _simple_yaml(text)
    except (_NotSimple, RecursionError):
        pass
    try:
        import yaml  # type: ignore[import-untyped]
    except ImportError:
        raise KubeError(
            f"kubeconfig {path} is neither JSON nor the plain YAML read without PyYAML, "
            "and PyYAML is not installed"
        ) from None
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    try:
        return yaml.load(text, Loader=loader)  # noqa: S506 - a safe loader
    except yaml.YAMLError as e:
        raise KubeError(f"kubeconfig {path} is not valid YAML: {e}") from None
    except RecursionError:
        raise KubeError(f"kubeconfig {path} is not valid YAML: nested too deeply") from None
    except (ValueError, TypeError, OverflowError) as e:
        # A scalar the YAML resolver types but cannot construct (a date such as 2024-13-45, an
        # integer of thousands of digits).
        raise KubeError(f"kubeconfig {path} is not valid YAML: {shorten(str(e))}") from None


def _entries(doc: dict[str, Any], kind: str, path: str) -> list[Any]:
    entries = doc.get(kind)
    if entries is None:
        return []
    if not isinstance(entries, list):
        raise KubeError(f"kubeconfig {path}: {kind} is not a list")
    return entries


def _named(doc: dict[str, Any], kind: str, name: str, path: str) -> dict[str, Any]:
    for entry in _entries(doc, kind, path):
        if isinstance(entry, dict) and entry.get("name") == name:
            body = entry.get(kind[:-1])
            if isinstance(body, dict):
                return body
    raise KubeError(f"kubeconfig {path}: no {kind[:-1]} named {name!r}")


def _b64(value: Any, what: str, path: str) -> bytes:
    # base64.b64decode(s, validate=True), without importing base64 before ssl needs it. Line
    # breaks are ignored, as Go's decoder (kubectl's) ignores them: a YAML block scalar holds a
    # wrapped value and ends in one.
    text = str(value).replace("\r", "").replace("\n", "")
    try:
        return binascii.a2b_base64(text.encode("ascii"), strict_mode=True)
    except (binascii.Error, ValueError):
        raise KubeError(f"kubeconfig {path}: {what} is not valid base64") from None


def load_kubeconfig(path: str) -> KubeConfig:
    """Reads the current context of the kubeconfig at ``path`` (JSON or YAML)."""
    try:
        text = _read(path, "utf-8-sig")  # a byte order mark is allowed, as kubectl allows it
    except OSError as e:
        raise KubeError(f"cannot read kubeconfig {path}: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise KubeError(f"kubeconfig {path} is not UTF-8 text (byte {e.start})") from None
    except ValueError as e:  # a NUL in the path
        raise KubeError(f"cannot read kubeconfig {path!r}: {e}") from None
    doc = _parse_document(path, text)
    if not isinstance(doc, dict):
        raise KubeError(f"kubeconfig {path} is not a mapping")
    ctx_name = doc.get("current-context")
    contexts = [c for c in _entries(doc, "contexts", path) if isinstance(c, dict)]
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
        if not value:
            return None
        if "\0" in str(value):
            raise KubeError(f"kubeconfig {path}: the path {clip(str(value))} holds a NUL character")
        return os.path.join(base, str(value))

    server = str(cluster.get("server") or "")
    try:
        ascii_host(split_server(server)[0])
    except ValueError as e:
        raise KubeError(f"kubeconfig {path}: server {clip(server)} {e}") from None
    if cluster.get("tls-server-name"):
        try:
            ascii_host(str(cluster["tls-server-name"]))
        except ValueError as e:
            raise KubeError(f"kubeconfig {path}: tls-server-name {e}") from None
    if cluster.get("insecure-skip-tls-verify"):
        raise KubeError(
            f"kubeconfig {path}: insecure-skip-tls-verify is not supported; give the cluster's CA"
        )
    for unsupported in ("exec", "auth-provider", "username", "password"):
        if user.get(unsupported):
            raise KubeError(f"kubeconfig {path}: user {unsupported!r} authentication is not supported")
    if user.get("token"):
        _check_token(str(user["token"]), f"kubeconfig {path}")
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
    except (OSError, ssl.SSLError, ValueError) as e:
        raise KubeError(f"kubeconfig {kc.source}: cannot load TLS material: {e}") from None
    return ctx


# --- the request -----------------------------------------------------------------------------

# What urlsplit strips from the front of a URL (WHATWG C0 controls and space) and removes anywhere.
_C0_OR_SPACE = "".join(chr(i) for i in range(33))
_URL_UNSAFE = ("\t", "\r", "\n")
_UNRESERVED = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.-~")


def split_server(server: str) -> tuple[str, int, str]:
    """``(host, port, path)`` of an ``https://`` server URL, read as ``urllib.parse.urlsplit`` reads
    it (host lower-cased and without brackets, port 443 when absent or 0, path without trailing
    ``/``; userinfo, query and fragment ignored). Raises ValueError saying what is wrong."""
    url = server.lstrip(_C0_OR_SPACE)
    for c in _URL_UNSAFE:
        url = url.replace(c, "")
    scheme, colon, rest = url.partition(":")
    if not colon or scheme.lower() != "https":
        raise ValueError("is not an https:// URL")
    netloc = ""
    if rest.startswith("//"):
        rest = rest[2:]
        end = min((i for i in (rest.find(c) for c in "/?#") if i >= 0), default=len(rest))
        netloc, rest = rest[:end], rest[end:]
    path = rest.partition("#")[0].partition("?")[0]
    if ("[" in netloc) != ("]" in netloc):
        raise ValueError("is not an https:// URL (unbalanced brackets)")
    hostinfo = netloc.rpartition("@")[2]
    if "[" in hostinfo:
        host, _, after = hostinfo.partition("[")[2].partition("]")
        port_text = after.partition(":")[2]
    else:
        host, _, port_text = hostinfo.partition(":")
    if not host:
        raise ValueError("is not an https:// URL")
    host, pct, zone = host.partition("%")
    host = host.lower() + pct + zone
    port = 0
    if port_text:
        if not (port_text.isascii() and port_text.isdigit()):
            raise ValueError(f"has an invalid port {clip(port_text)}")
        number = uint(port_text, digits=5)
        if number is None or number > 65535:
            shown = port_text if len(port_text) <= 20 else f"{port_text[:20]}... ({len(port_text)} digits)"
            raise ValueError(f"has a port out of range: {shown}")
        port = number
    return host, port or 443, path.rstrip("/")


def ascii_host(host: str) -> str:
    """The host name as it goes on the wire (IDNA for a non-ASCII name); ValueError when it
    cannot be one."""
    if any(c <= " " or c == "\x7f" for c in host):
        raise ValueError(f"has a host name with a blank or control character: {clip(host)}")
    if host.isascii():
        return host
    try:
        return host.encode("idna").decode("ascii")
    except UnicodeError:
        raise ValueError(f"has a host name that is not valid: {clip(host)}") from None


def quote_segment(s: str) -> str:
    """``urllib.parse.quote(s, safe="")``: one path segment, everything but unreserved escaped."""
    return "".join(chr(b) if b in _UNRESERVED else f"%{b:02X}" for b in s.encode("utf-8"))


class HTTPError(Exception):
    """The server's answer is not the HTTP/1.1 this client understands."""


class TooLarge(HTTPError):
    """The body exceeds the caller's limit."""


MAX_LINE = 65536
MAX_HEADERS = 100


class Response(NamedTuple):
    """A response as read_response returns it."""

    status: int
    reason: str
    headers: dict[str, str]  # lower-case names; repeated headers joined with ", "
    body: bytes


class DeadlineReader:
    """Buffered reads from a socket that all end by one ``time.monotonic()`` instant. A socket
    timeout bounds each recv alone, so a server sending a byte at a time could otherwise hold a
    request (and the pod start waiting on it) open for as long as it liked."""

    __slots__ = ("_sock", "_end", "_buf", "_eof")

    def __init__(self, sock: socket.socket, end: float) -> None:
        self._sock = sock
        self._end = end
        self._buf = bytearray()
        self._eof = False

    def _fill(self) -> bool:
        """One more recv into the buffer; False at the end of the stream."""
        if self._eof:
            return False
        self._sock.settimeout(time_left(self._end))
        data = self._sock.recv(16384)
        if not data:
            self._eof = True
            return False
        self._buf += data
        return True

    def _take(self, n: int) -> bytes:
        out = bytes(self._buf[:n])
        del self._buf[:n]
        return out

    def readline(self, size: int = -1, /) -> bytes:
        """Up to and including the next LF, at most ``size`` bytes (all there is at the end)."""
        searched = 0
        while True:
            nl = self._buf.find(b"\n", searched)
            if nl != -1:
                return self._take(nl + 1 if size < 0 else min(nl + 1, size))
            if 0 <= size <= len(self._buf):
                return self._take(size)
            searched = len(self._buf)
            if not self._fill():
                return self._take(len(self._buf))

    def read(self, size: int = -1, /) -> bytes:
        """``size`` bytes, fewer only at the end of the stream (``-1``: up to the end)."""
        while (size < 0 or len(self._buf) < size) and self._fill():
            pass
        return self._take(len(self._buf) if size < 0 else size)


def time_left(end: float) -> float:
    """Seconds until ``end`` (monotonic), for a socket timeout; TimeoutError once it has passed."""
    left = end - time.monotonic()
    if left <= 0:
        raise TimeoutError("timed out")
    return left


def _line(f: Source, what: str) -> bytes:
    line = f.readline(MAX_LINE + 1)
    if len(line) > MAX_LINE:
        raise HTTPError(f"{what} longer than {MAX_LINE} bytes")
    return line


def _exactly(f: Source, n: int) -> bytes:
    data = f.read(n)
    if len(data) < n:
        raise HTTPError(f"the response ended early: {len(data)} of {n} body bytes")
    return data


def _chunk(f: Source, limit: int, what: str) -> bytes:
    """The next chunk of a chunked body (b"" for the last one), at most ``limit`` bytes."""
    size_line = _line(f, "a chunk size line")
    if not size_line:
        raise HTTPError(f"{what} ended inside its chunked body")
    # More than 16 hex digits is no chunk size (Go's reader refuses them too).
    size = uint(size_line.partition(b";")[0].strip().decode("latin-1"), base=16, digits=16)
    if size is None:
        raise HTTPError(f"bad chunk size line {size_line[:40]!r}")
    if size == 0:
        return b""
    if size > limit:
        raise TooLarge(limit)
    data = _exactly(f, size)
    if _line(f, "a chunk terminator") not in (b"\r\n", b"\n"):
        raise HTTPError("a chunk is not followed by CRLF")
    return data


def _chunked(f: Source, limit: int) -> bytes:
    parts: list[bytes] = []
    total = 0
    while True:
        try:
            data = _chunk(f, limit - total, "the response")
        except TooLarge:
            raise TooLarge(limit) from None
        if not data:
            break
        total += len(data)
        parts.append(data)
    for _ in range(MAX_HEADERS + 1):  # trailer fields, ignored
        if _line(f, "a trailer line") in (b"\r\n", b"\n", b""):
            return b"".join(parts)
    raise HTTPError(f"more than {MAX_HEADERS} trailer lines")


def read_head(f: Source) -> tuple[int, str, dict[str, str]]:
    """The status line and header fields of one HTTP/1.x response (interim 1xx responses
    skipped): ``(status, reason, headers)``. Raises HTTPError for anything malformed."""
    while True:
        line = _line(f, "the status line")
        if not line:
            raise HTTPError("the server closed the connection without a response")
        fields = line.decode("latin-1").split(None, 2)
        if len(fields) < 2 or not fields[0].startswith("HTTP/1."):
            raise HTTPError(f"bad status line {line[:80]!r}")
        code = fields[1]
        if len(code) != 3 or not (code.isascii() and code.isdigit()) or code[0] == "0":
            raise HTTPError(f"bad status line {line[:80]!r}")
        status = int(code)
        reason = fields[2].strip() if len(fields) > 2 else ""
        headers: dict[str, str] = {}
        last = ""
        for _ in range(MAX_HEADERS + 1):
            line = _line(f, "a header line")
            if line in (b"\r\n", b"\n", b""):
                break
            text = line.decode("latin-1").rstrip("\r\n")
            if not text:
                raise HTTPError(f"bad header line {line[:80]!r}")
            if text[0] in " \t" and last:  # obsolete line folding: part of the previous value
                headers[last] += " " + text.strip()
                continue
            name, colon, value = text.partition(":")
            name = name.lower()
            if not colon or not name or name != name.strip() or " " in name:
                raise HTTPError(f"bad header line {line[:80]!r}")
            value = value.strip()
            headers[name] = f"{headers[name]}, {value}" if name in headers else value
            last = name
        else:
            raise HTTPError(f"more than {MAX_HEADERS} header lines")
        if not 100 <= status < 200 or status == 101:
            return status, reason, headers


def _is_chunked(headers: dict[str, str]) -> tuple[bool, bool]:
    """(chunked, other codings): how the body is framed."""
    codings = [c.strip().lower() for c in headers.get("transfer-encoding", "").split(",") if c.strip()]
    return bool(codings) and codings[-1] == "chunked", bool(codings)


def read_response(f: Source, limit: int = MAX_BODY) -> Response:
    """One HTTP/1.x response from ``f``: status line, header fields, then the body framed by
    chunked transfer-encoding, Content-Length, or the end of the connection. Interim 1xx
    responses are skipped. Raises HTTPError for anything malformed, TooLarge past ``limit``."""
    status, reason, headers = read_head(f)
    if status in (101, 204, 304) or 100 <= status < 200:
        return Response(status, reason, headers, b"")
    chunked, coded = _is_chunked(headers)
    if chunked:
        body = _chunked(f, limit)
    elif coded or "content-length" not in headers:
        body = f.read(limit + 1)  # delimited by the end of the connection
        if len(body) > limit:
            raise TooLarge(limit)
    else:
        values = {v.strip() for v in headers["content-length"].split(",")}
        # No body is 19 digits long; int() itself would raise past 4,300 digits.
        length = uint(values.pop())
        if values or length is None:
            raise HTTPError(f"bad Content-Length {clip(headers['content-length'], 40)}")
        if length > limit:
            raise TooLarge(limit)
        body = _exactly(f, length)
    return Response(status, reason, headers, body)


def _host_bytes(host: str) -> str | bytes:
    # socket and ssl would run a str host name through the idna codec (an import of its own);
    # an ASCII name needs no conversion.
    return host.encode("ascii") if host.isascii() else host


def http_get(
    ctx: ssl.SSLContext,
    host: str,
    port: int,
    target: str,
    headers: dict[str, str],
    *,
    server_hostname: str | None = None,
    timeout: float,
    limit: int = MAX_BODY,
) -> Response:
    """``GET target`` over a new TLS connection (``Connection: close``), all of it (connecting,
    the handshake, sending, every read) done within ``timeout`` seconds. ``host`` and
    ``server_hostname`` (the name the certificate must carry, default ``host``) are ASCII
    (``ascii_host``). Raises OSError (ssl errors included; TimeoutError when time ran out),
    HTTPError or TooLarge."""
    return http_request(
        ctx, host, port, "GET", target, headers, server_hostname=server_hostname, timeout=timeout, limit=limit
    )


def _send(
    ctx: ssl.SSLContext,
    host: str,
    port: int,
    method: str,
    target: str,
    headers: dict[str, str],
    body: bytes,
    server_hostname: str | None,
    end: float,
) -> ssl.SSLSocket:
    """A new TLS connection with the request sent on it, all by ``end``."""
    authority = f"[{host}]" if ":" in host else host
    if port != 443:
        authority = f"{authority}:{port}"
    lines = [f"{method} {target} HTTP/1.1", f"Host: {authority}"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    if body or method in ("POST", "PUT", "PATCH"):
        lines.append(f"Content-Length: {len(body)}")
    lines += ["Connection: close", "", ""]
    request = "\r\n".join(lines).encode("latin-1") + body
    raw = _connect(host, port, end)
    try:
        # CPython bounds the whole handshake by the timeout in force when it starts.
        raw.settimeout(time_left(end))
        tls = ctx.wrap_socket(raw, server_hostname=_host_bytes(server_hostname or host))
    except BaseException:
        raw.close()
        raise
    try:
        tls.settimeout(time_left(end))
        tls.sendall(request)
    except BaseException:
        tls.close()
        raise
    return tls


def http_request(
    ctx: ssl.SSLContext,
    host: str,
    port: int,
    method: str,
    target: str,
    headers: dict[str, str],
    body: bytes = b"",
    *,
    server_hostname: str | None = None,
    timeout: float,
    limit: int = MAX_BODY,
) -> Response:
    """``method target`` (with ``body``) as http_get sends a GET: a new TLS connection, all of it
    within ``timeout`` seconds. Raises what http_get raises."""
    end = time.monotonic() + timeout
    with _send(ctx, host, port, method, target, headers, body, server_hostname, end) as tls:
        return read_response(DeadlineReader(tls, end), limit)


def _connect(host: str, port: int, end: float) -> socket.socket:
    """A TCP connection to the first of the host's addresses that answers, all tries within
    ``end`` (socket.create_connection gives each address the whole timeout)."""
    import socket

    infos = socket.getaddrinfo(_host_bytes(host), port, type=socket.SOCK_STREAM)
    error: OSError | None = None
    for family, kind, proto, _, address in infos:
        sock = socket.socket(family, kind, proto)
        try:
            sock.settimeout(time_left(end))
            sock.connect(address)
        except OSError as e:
            sock.close()
            if isinstance(e, TimeoutError):
                raise
            error = e
        else:
            return sock
    raise error or OSError(f"no address for {host}")


def get_pod(kc: KubeConfig, namespace: str, name: str, timeout: float) -> dict[str, Any]:
    """One ``GET /api/v1/namespaces/NS/pods/NAME``; the Pod object, or KubeError."""
    try:
        host, port, prefix = split_server(kc.server)
        host = ascii_host(host)
        server_name = ascii_host(kc.tls_server_name) if kc.tls_server_name else None
    except ValueError as e:
        raise KubeError(f"server {clip(kc.server)} {e}") from None
    try:
        target = f"{prefix}/api/v1/namespaces/{quote_segment(namespace)}/pods/{quote_segment(name)}"
    except UnicodeEncodeError:
        raise KubeError(f"pod {namespace!a}/{name!a}: not a name the API can hold") from None
    token = kc.bearer_token()
    headers = {"Accept": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    ctx = ssl_context(kc)
    try:
        # tls-server-name, when given, is the name the certificate must carry.
        resp = http_get(ctx, host, port, target, headers, server_hostname=server_name, timeout=timeout)
    except (OSError, HTTPError) as e:
        what = f"GET {kc.server}{target}"
        raise _transport_error(e, kc.server, what, f"GET {target}", max(timeout, 0)) from None
    body = resp.body
    if resp.status != 200:
        detail = ""
        try:
            status = json.loads(body)
            if isinstance(status, dict) and status.get("message"):
                detail = f": {shorten(str(status['message']))}"
        except (ValueError, RecursionError):
            pass
        raise KubeError(
            f"GET {target}: HTTP {resp.status} {resp.reason}{detail}", transient=retry_status(resp.status)
        )
    try:
        pod = json.loads(body)
    except (ValueError, RecursionError):
        raise KubeError(f"GET {target}: the response is not JSON", transient=True) from None
    if not isinstance(pod, dict) or pod.get("kind", "Pod") != "Pod":
        raise KubeError(f"GET {target}: the response is not a Pod", transient=True)
    return pod


def retry_status(status: int) -> bool:
    """Whether an HTTP error status may go away by itself within the deadline.

    5xx, 408 and 429: the server is overloaded, restarting or behind a failing proxy. 401: the
    token expired or was rotated; install-cni rewrites the kubeconfig (and tokenFile is re-read
    on every attempt), so the next attempt may carry the new one. 403: the RBAC binding that
    grants the read is applied with the DaemonSet and may not be in force yet. Not 404: the
    kubelet creates a pod's sandbox only for a Pod it read from the API (a mirror Pod before
    a static pod's sandbox) and the GET is a quorum read, so the Pod has been deleted or the
    server URL names the wrong path, and neither changes by waiting. Nor any other 4xx or
    3xx: the same request gets the same answer."""
    return status >= 500 or status in (401, 403, 408, 429)


class RetryPolicy(NamedTuple):
    """How long to keep trying: an overall deadline, a per-request timeout and capped backoff."""

    deadline: float = 30.0
    request_timeout: float = 5.0
    initial_backoff: float = 0.1
    max_backoff: float = 2.0


def _transport_error(e: Exception, server: str, what: str, short: str, wait: float) -> KubeError:
    """What a request that got no usable answer raises (all transient): ``what`` names the request
    with its server, ``short`` without it."""
    import ssl  # loaded already: the request made its context

    if isinstance(e, ssl.SSLCertVerificationError):
        # The installer rewrites the kubeconfig when the cluster's CA is rotated.
        return KubeError(f"TLS verification of {server} failed: {e.verify_message}", transient=True)
    if isinstance(e, TooLarge):
        return KubeError(f"{short}: response larger than {MAX_BODY} bytes", transient=True)
    if isinstance(e, TimeoutError):
        return KubeError(f"{what}: no complete response within {wait:.3g}s", transient=True)
    return KubeError(f"{what}: {str(e) or type(e).__name__}", transient=True)


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
    """GETs the Pod, retrying transient failures (the kubeconfig is re-read each time, as the
    installer may rewrite it) until ``policy.deadline``, which bounds every request too: each
    ends by ``policy.request_timeout`` or the deadline, whichever comes first. A failure that no
    retry can fix (``KubeError.transient`` false) is raised at once. ``on_failure(attempt,
    error)`` is called for every failure; True stops at once (the caller decided to go on
    without the Pod) and the error is raised."""
    policy = policy or RetryPolicy()
    start = clock()
    backoff = policy.initial_backoff
    attempt = 0
    err: KubeError | None = None
    while True:
        remaining = policy.deadline - (clock() - start)
        # After a backoff that ran into the deadline: the last real failure, not a request
        # given no time at all.
        if err is not None and remaining <= 0.001:
            raise KubeError(
                f"gave up after {attempt} attempts in {policy.deadline:g}s: {err}", transient=True
            )
        attempt += 1
        try:
            kc = load_kubeconfig(kubeconfig)
            return get_pod(kc, namespace, name, min(policy.request_timeout, remaining))
        except KubeError as e:
            err = e
        if on_failure is not None and on_failure(attempt, err):
            raise err
        if not err.transient:
            raise err
        sleep(max(0.0, min(backoff, policy.deadline - (clock() - start))))
        backoff = min(backoff * 2, policy.max_backoff)


# --- the node agent's requests ------------------------------------------------------------------
#
# install-cni's agent lists and watches the pods of its node, posts Events, deletes or labels a
# broken pod and patches its Node: the same verified TLS and bearer token, one connection per
# request (a watch keeps its connection for as long as it streams).


class ApiError(KubeError):
    """The API answered with an error status; ``status`` is the HTTP code (410: the resource
    version is too old, 409: a precondition or a conflicting write)."""

    def __init__(self, message: str, status: int, *, transient: bool = False) -> None:
        super().__init__(message, transient=transient)
        self.status = status


def in_cluster(server: str, ca_file: str, token_file: str) -> KubeConfig:
    """The service account's credentials as a KubeConfig (the token re-read on every request)."""
    return KubeConfig(source="the service account", server=server, ca_file=ca_file, token_file=token_file)


def query_string(params: dict[str, str] | None) -> str:
    if not params:
        return ""
    return "?" + "&".join(f"{quote_segment(k)}={quote_segment(v)}" for k, v in params.items())


def _status_message(body: bytes) -> str:
    try:
        status = json.loads(body)
    except (ValueError, RecursionError):
        return ""
    if isinstance(status, dict) and status.get("message"):
        return f": {shorten(str(status['message']))}"
    return ""


class WatchStream:
    """The body of a watch as it arrives: one JSON object per line (kube-apiserver writes each
    event as a line, in chunked encoding). ``events()`` ends when the server ends the stream;
    a connection broken in between raises HTTPError or OSError. Each read waits at most
    ``idle`` seconds."""

    def __init__(
        self, tls: ssl.SSLSocket, reader: DeadlineReader, headers: dict[str, str], idle: float
    ) -> None:
        self._tls = tls
        self._reader = reader
        self._chunked = _is_chunked(headers)[0]
        self._idle = idle

    def _data(self) -> Iterator[bytes]:
        f = self._reader
        while True:
            f._end = time.monotonic() + self._idle
            if not self._chunked:
                data = f.readline(MAX_BODY)
                if not data:
                    return
                yield data
                continue
            data = _chunk(f, MAX_BODY, "the watch")
            if not data:
                return
            yield data

    def events(self) -> Iterator[dict[str, Any]]:
        pending = b""
        for data in self._data():
            pending += data
            if len(pending) > MAX_BODY:
                raise TooLarge(MAX_BODY)
            *lines, pending = pending.split(b"\n")
            for line in lines:
                if line.strip():
                    yield self._event(line)
        if pending.strip():
            yield self._event(pending)

    @staticmethod
    def _event(line: bytes) -> dict[str, Any]:
        try:
            event = json.loads(line)
        except (ValueError, RecursionError):
            raise HTTPError(f"a watch event is not JSON: {line[:80]!r}") from None
        if not isinstance(event, dict) or not isinstance(event.get("type"), str):
            raise HTTPError(f"a watch event without a type: {line[:80]!r}")
        return event

    def close(self) -> None:
        self._tls.close()

    def abort(self) -> None:
        """From another thread: ends a read waiting on the stream (it fails, or sees the end)."""
        import socket

        try:  # noqa: SIM105 - the TCP socket's shutdown, under the TLS layer the reader is in
            socket.socket.shutdown(self._tls, socket.SHUT_RDWR)
        except OSError:
            pass

    def __enter__(self) -> WatchStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Client:
    """Requests to the API for a long-running process: ``config`` is called for every request
    (a file re-read, so a rotated token or CA is picked up). Failures are KubeErrors; an error
    status is an ApiError carrying it."""

    def __init__(self, config: Callable[[], KubeConfig], *, timeout: float = 10.0) -> None:
        self._config = config
        self.timeout = timeout

    def _prepare(
        self, kc: KubeConfig, accept: str = "application/json"
    ) -> tuple[ssl.SSLContext, str, int, str, str | None, dict[str, str]]:
        try:
            host, port, prefix = split_server(kc.server)
            host = ascii_host(host)
            server_name = ascii_host(kc.tls_server_name) if kc.tls_server_name else None
        except ValueError as e:
            raise KubeError(f"server {clip(kc.server)} {e}") from None
        headers = {"Accept": accept, "User-Agent": "install-cni"}
        token = kc.bearer_token()
        if token:
            headers["Authorization"] = f"Bearer {token}"
        return ssl_context(kc), host, port, prefix, server_name, headers

    def request(
        self,
        method: str,
        path: str,
        *,
        query: dict[str, str] | None = None,
        body: Any = None,
        content_type: str = "application/json",
        timeout: float | None = None,
    ) -> dict[str, Any]:
        """One request; the response's JSON object. ``body`` (JSON-encoded) is sent with
        ``content_type``."""
        kc = self._config()
        ctx, host, port, prefix, server_name, headers = self._prepare(kc)
        target = prefix + path + query_string(query)
        data = b""
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = content_type
        what = f"{method} {target}"
        wait = self.timeout if timeout is None else timeout
        try:
            resp = http_request(
                ctx, host, port, method, target, headers, data, server_hostname=server_name, timeout=wait
            )
        except (OSError, HTTPError) as e:
            raise _transport_error(e, kc.server, what, what, wait) from None
        if not 200 <= resp.status < 300:
            raise ApiError(
                f"{what}: HTTP {resp.status} {resp.reason}{_status_message(resp.body)}",
                resp.status,
                transient=retry_status(resp.status),
            )
        try:
            doc = json.loads(resp.body) if resp.body else {}
        except (ValueError, RecursionError):
            raise KubeError(f"{what}: the response is not JSON", transient=True) from None
        if not isinstance(doc, dict):
            raise KubeError(f"{what}: the response is not a JSON object", transient=True)
        return doc

    def watch(self, path: str, query: dict[str, str], *, idle: float) -> WatchStream:
        """Opens a watch (``query`` should hold ``watch=1``); the stream of its events. An error
        status raises ApiError at once (410 Gone: list again)."""
        import ssl

        kc = self._config()
        ctx, host, port, prefix, server_name, headers = self._prepare(kc)
        target = prefix + path + query_string(query)
        what = f"GET {target}"
        end = time.monotonic() + self.timeout
        try:
            tls = _send(ctx, host, port, "GET", target, headers, b"", server_name, end)
        except ssl.SSLCertVerificationError as e:
            raise KubeError(
                f"TLS verification of {kc.server} failed: {e.verify_message}", transient=True
            ) from None
        except TimeoutError:
            raise KubeError(f"{what}: no connection within {self.timeout:.3g}s", transient=True) from None
        except OSError as e:
            raise KubeError(f"{what}: {str(e) or type(e).__name__}", transient=True) from None
        try:
            reader = DeadlineReader(tls, end)
            status, reason, resp_headers = read_head(reader)
            if status != 200:
                reader._end = time.monotonic() + self.timeout
                body = b""
                try:  # noqa: SIM105 - contextlib is one more import for the plugin
                    body = read_body(reader, resp_headers, 65536)
                except (OSError, HTTPError):
                    pass
                message = f"{what}: HTTP {status} {reason}{_status_message(body)}"
                raise ApiError(message, status, transient=retry_status(status))
        except KubeError:
            tls.close()
            raise
        except (OSError, HTTPError) as e:
            tls.close()
            raise KubeError(f"{what}: {str(e) or type(e).__name__}", transient=True) from None
        return WatchStream(tls, reader, resp_headers, idle)


def read_body(f: Source, headers: dict[str, str], limit: int) -> bytes:
    """The body after ``headers`` (read_head's), framed as read_response frames it."""
    chunked, coded = _is_chunked(headers)
    if chunked:
        return _chunked(f, limit)
    length = uint(headers.get("content-length", "").strip())
    if coded or length is None:
        return f.read(limit)
    return _exactly(f, min(length, limit))
