"""The hand-written grammar checks in config.py (no ``re`` on the start-up path) against the
regular expressions they stand for."""

from __future__ import annotations

import re

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
    return total if rest else None


@settings(max_examples=3000)
@given(TEXT)
def test_hand_written_checks_accept_what_the_patterns_accept(s: str) -> None:
    assert c._is_digits(s) == bool(DIGITS.fullmatch(s))
    assert c._is_prefix_length(s) == bool(BITS.fullmatch(s))
    assert c._is_owner_name(s) == bool(OWNER_NAME.fullmatch(s))


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
    for bad in ("", "5", "s", ".s", "1x", "-1s", "1m3"):
        try:
            c.parse_duration("x", bad)
        except ConfigError:
            continue
        raise AssertionError(bad)
