"""Istio's own capture test cases (from ../shared/conformance): the kernel must hold the same rules
after loading our dry-run output as after loading Istio's expected documents."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.conformance import CONFORMANCE

ROOT = Path(__file__).resolve().parent.parent
CASES = json.loads((CONFORMANCE / "capture_cases.json").read_text())


# Istio's owner-group cases name groups that a plain Debian machine does not have.
EXTRA_GROUPS = ["--extra-group", "java:30001", "--extra-group", "ftp:30002"]


def dry_run(case: dict) -> subprocess.CompletedProcess[str]:
    servers = [*case["dns_servers_v4"], *case["dns_servers_v6"]]
    argv = [
        str(ROOT / ".venv" / "bin" / "istio-iptables"),
        *case["args"],
        "--enable-ipv6" if case["ipv6"] else "--no-enable-ipv6",
        f"--dns-servers={','.join(servers)}",
    ]
    env = {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"), **case["env"]}
    return subprocess.run(argv, env=env, capture_output=True, text=True, check=False)


@pytest.mark.kernel
@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_capture_case(case: dict, tmp_path: Path) -> None:
    p = dry_run(case)
    assert p.returncode == 0, p.stderr
    actual = tmp_path / "actual.rules"
    actual.write_text(p.stdout)
    expected = [str(CONFORMANCE / case["expected"]["v4"])]
    if "v6" in case["expected"]:
        expected.append(str(CONFORMANCE / case["expected"]["v6"]))
    r = subprocess.run(
        [
            sys.executable,
            str(CONFORMANCE / "compare.py"),
            *expected,
            "--actual-file",
            str(actual),
            *EXTRA_GROUPS,
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert r.returncode == 0, f"{r.stdout}\n{r.stderr}"
    assert r.stdout.startswith("MATCH")


NFT = CONFORMANCE / "nftables"
NFT_CASES = json.loads((NFT / "nft_cases.json").read_text())["cases"] if NFT.is_dir() else []


@pytest.mark.kernel
@pytest.mark.parametrize("case", NFT_CASES, ids=[c["name"] for c in NFT_CASES])
def test_nftables_case(case: dict, tmp_path: Path) -> None:
    """Istio's native nftables cases: our `--native-nftables --dry-run` output, loaded with `nft -f`
    into a fresh namespace, holds what Istio's script does (compare_nft.py)."""
    assert "--native-nftables=true" in case["args"]
    p = dry_run(case)
    assert p.returncode == 0, p.stderr
    actual = tmp_path / "actual.nft"
    actual.write_text(p.stdout)
    r = subprocess.run(
        [
            sys.executable,
            str(NFT / "compare_nft.py"),
            str(NFT / case["expected"]),
            "--actual-file",
            str(actual),
            "--require-header",
            *EXTRA_GROUPS,
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert r.returncode == 0, f"{r.stdout}\n{r.stderr}"


def test_the_copy_is_the_published_cases() -> None:
    """tests/data/conformance is a copy of ../shared/conformance (ORIGIN.md): when the published
    cases are there, the copy must be them, file for file."""
    from tests.support.conformance import COPY, PUBLISHED

    if not PUBLISHED.is_dir():
        return  # nothing to compare with; the tests run on the copy

    def files(root: Path) -> dict[str, bytes]:
        return {
            str(p.relative_to(root)): p.read_bytes()
            for p in root.rglob("*")
            if p.is_file() and "__pycache__" not in p.parts
        }

    copy = files(COPY)
    copy.pop("ORIGIN.md")
    assert copy == files(PUBLISHED), "refresh the copy: cp -r ../shared/conformance tests/data/"
