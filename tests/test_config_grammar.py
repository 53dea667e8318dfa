"""The hand-written grammar checks in config.py (no ``re`` on the start-up path) against the
regular expressions they stand for."""

from __future__ import annotations

import re
import sys

from hypothesis import given, settings
from hypothesis import strategies as st

from istio_iptables import config as c
from istio_iptables.config import ConfigError

DIGITS = re.compile(r"[0-9]+")
BITS = re.compile(r"0|[1-9][0-9]{0,2}")
OWNER_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]*\$?")
DURATION_PART = re.compile(r"([0-9]*(?:\.[0-9]*)?)(ns|us|\u00b5s|\u03bcs|ms|s|m|h)")

# Mostly the characters that matter, plus anything.
TEXT = st.text(alphabet=st.sampled_from("0123456789.$_-aZ9msunhµμ٣ "), max_size=8) | st.text(max_size=6)


def _duration_by_regex(v: str) -> float | None:
    v = v.strip()
    if v == "0":
        return 0.0
    rest = v[1:] if v[:1] == "+" else v
    total, pos = 0.0, 0
    while pos < len(rest):
        m = DURATION_PART.match(rest, pos)
        if m is None or m.group(1) in ("", "."):
            return None
        total += float(m.group(1)) * c._DURATION_UNITS[m.group(2)]
        pos = m.end()
    # Go's time.Duration range: int64 nanoseconds.
    return total if rest and total <= (2**63 - 1) / 1e9 else None


@settings(max_examples=3000)
@given(TEXT)
def test_hand_written_checks_accept_what_the_patterns_accept(s: str) -> None:
    assert c._is_digits(s) == bool(DIGITS.fullmatch(s))
    assert c._is_prefix_length(s) == bool(BITS.fullmatch(s))
    assert c._is_owner_name(s) == bool(OWNER_NAME.fullmatch(s))


@settings(max_examples=1000)
@given(
    st.one_of(
        TEXT,
        st.builds(
            lambda zeros, digits: "0" * zeros + digits,
            st.integers(0, 6000),
            st.text(alphabet="0123456789", max_size=30) | st.just("9" * 5000),
        ),
    )
)
def test_numbers_read_as_int_reads_them_without_its_digit_limit(s: str) -> None:
    # int() itself refuses more than 4300 digits (lifted here for the reference only); _decimal
    # caps what no bound here could accept.
    limit = sys.get_int_max_str_digits()
    sys.set_int_max_str_digits(0)
    try:
        want = int(s) if DIGITS.fullmatch(s) else None
    finally:
        sys.set_int_max_str_digits(limit)
    got = c._decimal(s)
    if want is None or want < c._TOO_LARGE:
        assert got == want
    else:
        assert got == c._TOO_LARGE


@settings(max_examples=3000)
@given(TEXT)
def test_durations_parse_as_the_pattern_reads_them(s: str) -> None:
    want = _duration_by_regex(s)
    try:
        got: float | None = c.parse_duration("--probe-timeout", s)
    except ConfigError:
        got = None
    assert got == want


def test_duration_examples() -> None:
    assert c.parse_duration("x", "1m30s") == 90.0
    assert c.parse_duration("x", "250ms") == 0.25
    assert c.parse_duration("x", "1.5h") == 5400.0
    assert c.parse_duration("x", "+2us") == 2e-6
    assert c.parse_duration("x", "2562047h") == 2562047 * 3600.0
    for bad in ("", "5", "s", ".s", "1x", "-1s", "1m3", "2562048h", "9" * 5000 + "s", "1" + "0" * 400 + "ns"):
        try:
            c.parse_duration("x", bad)
        except ConfigError:
            continue
        raise AssertionError(bad)


# --- IPv4 loopback ranges: parsed by hand, checked against ipaddress ------------------------

OCTET = st.one_of(
    st.integers(0, 300).map(str), st.sampled_from(["00", "01", "007", "0x1", "", " 1", "٣", "+1"])
)
V4ISH = st.one_of(
    st.builds(lambda a, b, c_, d: f"{a}.{b}.{c_}.{d}", OCTET, OCTET, OCTET, OCTET),
    st.builds(lambda a, b, c_: f"{a}.{b}.{c_}", OCTET, OCTET, OCTET),
    st.sampled_from(["::1", "::ffff:127.0.0.1", "fe80::1%lo", "127.0.0.1%lo", "localhost", ""]),
)
LOOPBACKISH = st.builds(
    lambda a, sep, bits: f"{a}{sep}{bits}",
    st.one_of(V4ISH, st.builds(lambda d: f"127.0.{d}.1", OCTET)),
    st.sampled_from(["/", "/", "", "//"]),
    st.one_of(st.integers(0, 140).map(str), st.sampled_from(["08", "", "-1", " 8", "32 "])),
)


def _loopback_by_ipaddress(s: str) -> str | None:
    """Istio's ValidateIPv4LoopbackCidr written with ipaddress (the reference)."""
    import ipaddress

    item = s.strip()
    addr, slash, bits = item.partition("/")
    if not slash or "%" in addr or not BITS.fullmatch(bits):
        return None
    try:
        ip = ipaddress.ip_address(addr)
    except ValueError:
        return None
    if ip.version != 4 or int(bits) > 32 or not ip.is_loopback or not 8 <= int(bits) <= 32:
        return None
    return str(ipaddress.ip_network(f"{ip}/{bits}", strict=False))


@settings(max_examples=3000)
@given(V4ISH)
def test_ipv4_addresses_parse_as_ipaddress_reads_them(s: str) -> None:
    import ipaddress

    try:
        want: int | None = int(ipaddress.IPv4Address(s))
    except ValueError:
        want = None
    assert c._ipv4(s) == want


@settings(max_examples=3000)
@given(LOOPBACKISH)
def test_loopback_ranges_parse_as_ipaddress_reads_them(s: str) -> None:
    try:
        got: str | None = c.parse_ipv4_loopback_cidr("--x", s)
    except ConfigError:
        got = None
    assert got == _loopback_by_ipaddress(s)


def test_loopback_range_examples() -> None:
    assert c.parse_ipv4_loopback_cidr("x", "127.0.0.1/32") == "127.0.0.1/32"
    assert c.parse_ipv4_loopback_cidr("x", " 127.1.2.3/8 ") == "127.0.0.0/8"
    assert c.parse_ipv4_loopback_cidr("x", "127.0.0.255/30") == "127.0.0.252/30"
    for bad, why in [
        ("10.0.0.1/32", "not an IPv4 loopback range"),
        ("127.0.0.1/7", "the prefix length must be 8-32"),
        ("127.0.0.1/33", "the prefix length must be 0-32"),
        ("::1/128", "an IPv6 range is not allowed here"),
        ("127.0.0.1", "is not a CIDR range"),
        ("127.0.0.01/32", "is not a CIDR range (bad address)"),
    ]:
        try:
            c.parse_ipv4_loopback_cidr("--x", bad)
        except ConfigError as e:
            assert why in str(e) and "--x" in str(e), (bad, str(e))
        else:
            raise AssertionError(f"{bad!r} was accepted")
