"""Keeps scripts/bench from rotting: a quick run (2 repetitions, 3 concurrent ADDs, 1 s per
connection-rate point) must measure every item, with nothing failing. No figure is judged here;
the benchmark is for reading."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.kernel, pytest.mark.slow]

ITEMS = ("floor", "cni", "init", "old_way", "concurrency", "scale", "nft", "connrate", "nftlib", "cri")


@pytest.fixture(scope="module")
def quick_run(
    repo_root: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[subprocess.CompletedProcess[str], dict]:
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    proc = subprocess.run(
        [sys.executable, str(repo_root / "scripts" / "bench"), "--quick", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert out.exists(), f"no JSON written (exit {proc.returncode}):\n{proc.stderr[-3000:]}"
    return proc, json.loads(out.read_text())


def test_quick_run_succeeds_and_prints_the_table(quick_run) -> None:
    proc, _ = quick_run
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"
    assert "targets" in proc.stdout and "where the time goes" in proc.stdout


def test_every_item_ran_without_failures(quick_run) -> None:
    _, doc = quick_run
    assert doc["params"]["quick"] is True
    assert set(ITEMS) <= set(doc["items"]), sorted(doc["items"])
    for name in ITEMS:
        item = doc["items"][name]
        assert item["status"] == "ok", f"{name}: {item.get('status')}: {item.get('reason')}"
    assert doc["failures"] == 0


def test_every_measurement_has_figures(quick_run) -> None:
    _, doc = quick_run
    items = doc["items"]
    measured = [
        items["floor"]["add"],
        *(items["floor"]["pieces"][k] for k in
          ("python_S_start", "python_site_start", "nsenter_net_true", "iptables_restore", "ip6tables_restore")),
        items["cni"]["add"],
        items["cni"]["check"],
        items["cni"]["del"],
        items["cni"]["add_zipapp"],
        items["cni"]["add_selfcontained"],
        items["cni"]["add_kubectl_kubeconfig"],
        items["init"]["apply_injector"],
        items["init"]["apply"],
        items["init"]["dry_run"],
        items["old_way"]["apply"],
        items["scale"]["plan_render"],
        items["scale"]["add_cidrs"],
        items["nft"]["cni_add"],
        items["nft"]["init_apply"],
        items["nft"]["init_dry_run"],
        *(items["nftlib"][k] for k in ("python_S", "binary", "library", "nft_alone")),
        *(items["cri"][k] for k in ("nomesh", "unmeshed", "meshed")),
    ]  # fmt: skip
    for m in measured:
        assert m["n"] >= 1 and m["failures"] == 0 and "median_ms" in m and "p95_ms" in m, m
    # Peak RSS is measured for the processes (under the RSS wrapper) where one is installed.
    if doc["run"]["rss_wrapper"]:
        assert items["cni"]["add"]["peak_rss_mib"] > 0
    conc = items["concurrency"]
    assert conc["failures"] == 0 and conc["concurrency"] == 3 and conc["latency"]["n"] == 3
    assert {t["result"] for t in doc["targets"]} <= {"PASS", "FAIL"}
    assert len(doc["targets"]) == 11


def test_native_nftables_runs_beside_iptables(quick_run) -> None:
    _, doc = quick_run
    nft = doc["items"]["nft"]
    assert nft["cni_add_vs_iptables"] > 0 and nft["init_apply_vs_iptables"] > 0
    assert nft["init_nft_dry_run_equals_planner"] is True
    lib = doc["items"]["nftlib"]
    assert lib["time_cheaper"] in ("binary", "library")
    assert {"binary.load_ms", "library.import_ms", "library.load_ms"} <= set(lib["in_process_median"])


def test_connection_rate_measures_every_point(quick_run) -> None:
    _, doc = quick_run
    rate = doc["items"]["connrate"]
    points = {(p["backend"], p["excluded_cidrs"]): p for p in rate["points"]}
    assert set(points) == {(b, n) for b in ("iptables", "nftables") for n in (0, 1000, 10000)}
    for p in points.values():
        assert p["status"] == "ok" and p["connections"] > 0 and p["conn_per_s"] > 0, p
        assert p["failures"] == 0 and p["conntrack_drop"] == 0 and p["conntrack_insert_failed"] == 0, p
    # One rule per CIDR for iptables; one set for nftables.
    assert points[("iptables", 10000)]["rule_lines"] >= 10000
    assert points[("nftables", 10000)]["rule_lines"] < 100


def test_nothing_is_left_behind(quick_run) -> None:
    _, doc = quick_run
    run = doc["run"]
    netns_dir = Path("/var/run/netns")
    left = (
        [n.name for n in netns_dir.iterdir() if n.name.startswith(run["netns_prefix"])]
        if netns_dir.is_dir()
        else []
    )
    assert left == []
    assert not Path(f"/proc/{run['api_server_pid']}").exists() or _is_zombie_or_other(run["api_server_pid"])


def _is_zombie_or_other(pid: int) -> bool:
    """True when the pid is no longer the benchmark's API server (it may have been reused)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return True
    return b"tests.support.apiserver" not in cmdline
