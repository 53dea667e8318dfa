"""Where the conformance cases are: ../shared/conformance beside the checkout when present (the
published cases), else the copy in tests/data/conformance (see its ORIGIN.md)."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PUBLISHED = ROOT.parent / "shared" / "conformance"
COPY = ROOT / "tests" / "data" / "conformance"
CONFORMANCE = PUBLISHED if PUBLISHED.is_dir() else COPY
