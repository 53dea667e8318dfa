"""Goldens: every named configuration's dry-run matches golden/<name>.rules byte for byte, and the
kernel accepts every document."""

from __future__ import annotations

import importlib.machinery
import importlib.util
from pathlib import Path
from types import ModuleType

import pytest

from tests.support.netns import EXTRA_GROUPS, NetNS, with_extra_groups

ROOT = Path(__file__).resolve().parent.parent


def _load_updater() -> ModuleType:
    path = ROOT / "scripts" / "update-goldens"
    loader = importlib.machinery.SourceFileLoader("update_goldens", str(path))
    spec = importlib.util.spec_from_loader("update_goldens", loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


UPDATER = _load_updater()
CONFIGS = UPDATER.configurations()
IDS = [c["name"] for c in CONFIGS]


def split_dry_run(text: str) -> dict[str, str]:
    """'# iptables-restore' / '# ip6tables-restore' sections of a dry-run output."""
    sections: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in text.splitlines(keepends=True):
        if line.strip() in ("# iptables-restore", "# ip6tables-restore"):
            current = sections.setdefault(line.strip()[2:], [])
        else:
            assert current is not None, f"content before the first marker: {line!r}"
            current.append(line)
    return {k: "".join(v) for k, v in sections.items()}


def test_enough_configurations() -> None:
    assert len(CONFIGS) >= 30
    assert len(set(IDS)) == len(IDS)


@pytest.mark.parametrize("backend", ["rules", "nft"])
def test_no_stray_golden_files(backend: str) -> None:
    files = {p.stem for p in (ROOT / "golden").glob(f"*.{backend}")}
    assert files == set(IDS)


@pytest.mark.parametrize("backend", ["rules", "nft"])
@pytest.mark.parametrize("cfg", CONFIGS, ids=IDS)
def test_golden_matches(cfg: dict, backend: str) -> None:
    p = UPDATER.run(cfg, backend)
    assert p.returncode == 0, p.stderr
    expected = UPDATER.golden_path(cfg, backend).read_text()
    assert p.stdout == expected, f"run scripts/update-goldens {cfg['name']} and review the diff"


def _loader(argv: list[str], document: str, tmp_path: Path) -> list[str]:
    # Istio's owner-group cases name groups a plain machine lacks: load with them resolvable.
    if any(f"{name}" in document.split() for name in EXTRA_GROUPS):
        return with_extra_groups(argv, tmp_path)
    return argv


@pytest.mark.kernel
@pytest.mark.parametrize("cfg", CONFIGS, ids=IDS)
def test_kernel_accepts_golden(cfg: dict, netns, tmp_path: Path) -> None:
    ns: NetNS = netns("gold")
    sections = split_dry_run(UPDATER.golden_path(cfg).read_text())
    assert "iptables-restore" in sections
    for command, document in sections.items():
        r = ns.run(_loader([command, "--noflush"], document, tmp_path), input=document, check=False)
        assert r.returncode == 0, f"{command} rejected {cfg['name']}: {r.stderr}"
    saved = ns.run(["iptables-save"]).stdout
    assert ":ISTIO_OUTPUT" in saved


@pytest.mark.kernel
@pytest.mark.parametrize("cfg", CONFIGS, ids=IDS)
def test_kernel_accepts_nft_golden(cfg: dict, netns, tmp_path: Path) -> None:
    ns: NetNS = netns("gold")
    head, sep, script = UPDATER.golden_path(cfg, "nft").read_text().partition("# nft -f\n")
    assert sep and not head.strip(), "the dry-run starts with its marker line"
    r = ns.run(_loader(["nft", "-f", "-"], script, tmp_path), input=script, check=False)
    assert r.returncode == 0, f"nft rejected {cfg['name']}: {r.stderr}"
    listed = ns.run(["nft", "list", "ruleset"]).stdout
    assert "table inet istio-proxy-nat" in listed and "chain istio-output" in listed
