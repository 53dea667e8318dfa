"""The project's two container images, built once per test session from this working tree on a
local Debian 12 base (deploy/local-base-image, then deploy/build-images), and the podman settings
this machine needs. The session fixture ``project_images`` (conftest.py) calls ``build``; the
CRI tests (tests/test_cri.py) import the images into containerd and run them as Kubernetes
does."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

BASE = "localhost/debian:bookworm-debootstrap"
REGISTRY = "localhost/istio-iptables-py-test"
TAG = "test"
INIT_IMAGE = f"{REGISTRY}/istio-iptables:{TAG}"
INSTALL_IMAGE = f"{REGISTRY}/install-cni:{TAG}"


def podman_env(d: Path) -> dict[str, str]:
    """podman settings for this machine (see the podman tests): no raised rlimits, runc, cgroupfs."""
    conf = d / "containers.conf"
    conf.write_text(
        '[containers]\ndefault_ulimits = []\n\n[network]\nnetwork_backend = "cni"\n\n'
        '[engine]\nruntime = "runc"\ncgroup_manager = "cgroupfs"\n'
    )
    return {**os.environ, "CONTAINERS_CONF": str(conf)}


def build(repo_root: Path, work: Path) -> dict[str, str]:
    """Both images, built from this working tree (on a local Debian 12 base): {"init": ...,
    "install": ...}. Raises AssertionError with the build's error output when a step fails."""

    def run(argv: list[str], env: dict[str, str] | None, timeout: float) -> None:
        p = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout, check=False)
        assert p.returncode == 0, f"{' '.join(argv)} exited {p.returncode}:\n{p.stderr[-4000:]}"

    run(["bash", str(repo_root / "deploy" / "local-base-image"), BASE], None, 900)
    env = {**podman_env(work), "BASE": BASE, "REGISTRY": REGISTRY, "TAG": TAG}
    run(["bash", str(repo_root / "deploy" / "build-images")], env, 1800)
    return {"init": INIT_IMAGE, "install": INSTALL_IMAGE}
