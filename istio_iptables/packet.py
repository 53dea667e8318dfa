"""The packet description ``--explain`` takes: one packet, the first of a new connection.

    DIRECTION PROTO SRC -> DST [uid=N] [gid=N] [oif=NAME] [iif=NAME] [mark=N]

``DIRECTION`` is ``out`` (sent by a process in the pod) or ``in`` (arriving on an interface);
``PROTO`` is ``tcp`` or ``udp``; ``SRC`` and ``DST`` are ``ADDR:PORT``, IPv6 in brackets
(``[fd00::5]:5353``). ``uid``/``gid`` are the sending process's (``out`` only; ``gid`` defaults
to ``uid``), ``oif`` the interface an ``out`` packet leaves by, ``iif`` the one an ``in`` packet
arrives on, ``mark`` the packet mark (``SO_MARK``; decimal or ``0x`` hex).

A bad description raises ConfigError naming ``--explain``, the text and the part that is wrong.
Imported only when ``--explain`` is given.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from .config import ConfigError

SOURCE = "--explain"
GRAMMAR = "out|in tcp|udp SRC:PORT -> DST:PORT [uid=N gid=N oif=NAME iif=NAME mark=N]"
_KEYS = ("uid", "gid", "oif", "iif", "mark")
_MAX_ID = 2**32 - 2
_MAX_MARK = 2**32 - 1
_IFNAME_MAX = 15

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True)
class Packet:
    direction: str  # "out" or "in"
    proto: str  # "tcp" or "udp"
    src: IPAddress
    sport: int
    dst: IPAddress
    dport: int
    uid: int | None = None
    gid: int | None = None
    gid_given: bool = False
    oif: str | None = None
    iif: str | None = None
    mark: int = 0
    text: str = ""

    @property
    def family(self) -> int:
        return self.src.version

    def describe(self) -> str:
        """The description in its canonical spelling (every field the walk uses)."""
        parts = [
            self.direction,
            self.proto,
            _endpoint(self.src, self.sport),
            "->",
            _endpoint(self.dst, self.dport),
        ]
        if self.uid is not None:
            parts.append(f"uid={self.uid}")
        if self.gid is not None:
            parts.append(f"gid={self.gid}")
        if self.oif is not None:
            parts.append(f"oif={self.oif}")
        if self.iif is not None:
            parts.append(f"iif={self.iif}")
        parts.append(f"mark={self.mark}")
        return " ".join(parts)


def _endpoint(addr: IPAddress, port: int) -> str:
    return f"[{addr}]:{port}" if addr.version == 6 else f"{addr}:{port}"


def _bad(text: str, reason: str) -> ConfigError:
    return ConfigError(SOURCE, text, reason)


def _number(text: str, what: str, value: str, high: int, *, hex_ok: bool = False) -> int:
    v = value.strip()
    base = 10
    digits = v
    if hex_ok and v[:2].lower() == "0x":
        base, digits = 16, v[2:]
    ok = bool(digits) and digits.isascii() and len(digits) <= 20
    ok = ok and all(c in ("0123456789abcdefABCDEF" if base == 16 else "0123456789") for c in digits)
    n = int(digits, base) if ok else -1
    if not 0 <= n <= high:
        kind = "a number (decimal or 0x hex)" if hex_ok else "a number"
        raise _bad(text, f"{what} {value!r}: expected {kind} from 0 to {high}")
    return n


def _address_port(text: str, what: str, token: str) -> tuple[IPAddress, int]:
    if token.startswith("["):
        addr_text, sep, port_text = token[1:].partition("]:")
        if not sep:
            raise _bad(text, f"{what} {token!r}: expected [IPv6 address]:PORT")
    else:
        addr_text, sep, port_text = token.rpartition(":")
        if not sep or ":" in addr_text:
            hint = " (an IPv6 address goes in brackets: [ADDR]:PORT)" if ":" in addr_text else ""
            raise _bad(text, f"{what} {token!r}: expected ADDR:PORT{hint}")
    try:
        addr = ipaddress.ip_address(addr_text)
    except ValueError:
        raise _bad(text, f"{what} address {addr_text!r}: not an IP address") from None
    if addr.version == 6 and not token.startswith("["):
        raise _bad(text, f"{what} {token!r}: an IPv6 address goes in brackets: [ADDR]:PORT")
    if addr.version == 4 and token.startswith("["):
        raise _bad(text, f"{what} {token!r}: brackets are for IPv6 addresses only")
    port = _number(text, f"{what} port", port_text, 65535)
    if port == 0:
        raise _bad(text, f"{what} port {port_text!r}: expected a port from 1 to 65535")
    return addr, port


def _ifname(text: str, key: str, value: str) -> str:
    bad = (
        not value
        or len(value) > _IFNAME_MAX
        or value in (".", "..")
        or any(c in "/:\"'\\#" or not ("!" <= c <= "~") for c in value)
    )
    if bad:
        raise _bad(text, f"{key}={value!r}: not an interface name (1-{_IFNAME_MAX} printable characters)")
    return value


def parse_packet(text: str) -> Packet:
    """Parse a packet description (module docstring). Raises ConfigError."""
    if "\0" in text:
        raise _bad(text, "contains a NUL character")
    tokens = text.replace("->", " -> ").split()
    if len(tokens) < 5:
        raise _bad(text, f"expected {GRAMMAR}")
    direction, proto, src_text, arrow, dst_text, *rest = tokens
    if direction not in ("out", "in"):
        raise _bad(text, f"direction {direction!r}: expected out (sent by a local process) or in (arriving)")
    if proto not in ("tcp", "udp"):
        raise _bad(text, f"protocol {proto!r}: expected tcp or udp")
    if arrow != "->":
        raise _bad(text, f"expected '->' between source and destination, got {arrow!r}")
    src, sport = _address_port(text, "source", src_text)
    dst, dport = _address_port(text, "destination", dst_text)
    if src.version != dst.version:
        raise _bad(text, f"source {src} and destination {dst} are not of the same IP family")
    fields: dict[str, str] = {}
    for item in rest:
        key, eq, value = item.partition("=")
        if not eq or key not in _KEYS:
            raise _bad(text, f"unknown field {item!r} (expected {', '.join(k + '=' for k in _KEYS)})")
        if key in fields:
            raise _bad(text, f"{key}= given twice")
        fields[key] = value
    if direction == "in":
        for key in ("uid", "gid"):
            if key in fields:
                raise _bad(text, f"{key}=: an arriving (in) packet has no sending process in the pod")
        if "oif" in fields:
            raise _bad(text, "oif=: an arriving (in) packet has an input interface (iif=), not an output one")
    elif "iif" in fields:
        raise _bad(text, "iif=: a locally sent (out) packet has an output interface (oif=), not an input one")
    uid = _number(text, "uid", fields["uid"], _MAX_ID) if "uid" in fields else None
    gid = _number(text, "gid", fields["gid"], _MAX_ID) if "gid" in fields else uid
    mark = _number(text, "mark", fields["mark"], _MAX_MARK, hex_ok=True) if "mark" in fields else 0
    return Packet(
        direction=direction,
        proto=proto,
        src=src,
        sport=sport,
        dst=dst,
        dport=dport,
        uid=uid,
        gid=gid,
        gid_given="gid" in fields,
        oif=_ifname(text, "oif", fields["oif"]) if "oif" in fields else None,
        iif=_ifname(text, "iif", fields["iif"]) if "iif" in fields else None,
        mark=mark,
        text=text,
    )
