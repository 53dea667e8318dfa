"""`istio-iptables --run-validation`, as Istio's validation init container runs it after the CNI
plugin: with --skip-rule-apply it only checks that outbound capture works in the namespace."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CLASSIC = ["-p", "15001", "-z", "15006", "-u", "1337", "-m", "REDIRECT", "-i", "*", "-x", "", "-b", "*"]
PINNED = ["--no-enable-ipv6", "--dns-servers="]


def istio_iptables(*args: str) -> subprocess.CompletedProcess[str]:
    exe = str(ROOT / ".venv" / "bin" / "istio-iptables")
    return subprocess.run([exe, *args], capture_output=True, text=True, timeout=60, check=False)


@pytest.mark.kernel
def test_validation_only_checks_rules_installed_by_someone_else(netns) -> None:
    ns = netns("val")
    probe = [*CLASSIC, *PINNED, f"--network-namespace={ns.path}", "--probe-timeout=2s"]
    r = istio_iptables(*probe, "--run-validation", "--skip-rule-apply")
    assert r.returncode == 126, r.stderr
    assert "iptables validation failed; workload is not ready for Istio." in r.stderr
    assert r.stdout == ""
    assert ":ISTIO_OUTPUT" not in ns.run(["iptables-save", "-t", "nat"]).stdout

    r = istio_iptables(*CLASSIC, *PINNED, f"--network-namespace={ns.path}")
    assert r.returncode == 0, r.stderr
    r = istio_iptables(*probe, "--run-validation", "--skip-rule-apply")
    assert r.returncode == 0, r.stderr


@pytest.mark.kernel
def test_apply_then_validate_in_one_run(netns) -> None:
    ns = netns("val")
    r = istio_iptables(
        *CLASSIC, *PINNED, f"--network-namespace={ns.path}", "--run-validation", "--probe-timeout=2s"
    )
    assert r.returncode == 0, r.stderr
    assert "validation passed" in r.stderr
