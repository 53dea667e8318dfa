"""Goldens: every named configuration's dry-run matches golden/<name>.rules byte for byte, and the
kernel accepts every document."""

from __future__ import annotations

import importlib.machinery
import importlib.util
from pathlib import Path
from types import ModuleType

import pytest

from nsutil import NetNS

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


def test_no_stray_golden_files() -> None:
    files = {p.stem for p in (ROOT / "golden").glob("*.rules")}
    assert files == set(IDS)


@pytest.mark.parametrize("cfg", CONFIGS, ids=IDS)
def test_golden_matches(cfg: dict) -> None:
    p = UPDATER.run(cfg)
    assert p.returncode == 0, p.stderr
    expected = UPDATER.golden_path(cfg).read_text()
    assert p.stdout == expected, f"run scripts/update-goldens {cfg['name']} and review the diff"


@pytest.mark.kernel
@pytest.mark.parametrize("cfg", CONFIGS, ids=IDS)
def test_kernel_accepts_golden(cfg: dict, netns) -> None:
    ns: NetNS = netns("gold")
    sections = split_dry_run(UPDATER.golden_path(cfg).read_text())
    assert "iptables-restore" in sections
    for command, document in sections.items():
        r = ns.run([command, "--noflush"], input=document, check=False)
        assert r.returncode == 0, f"{command} rejected {cfg['name']}: {r.stderr}"
    saved = ns.run(["iptables-save"]).stdout
    assert ":ISTIO_OUTPUT" in saved
