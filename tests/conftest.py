"""Shared fixtures and the policy for tests that need the kernel: tests marked ``kernel``,
``podman`` or ``cri`` are skipped with the reason where this machine cannot create a network
namespace (or lacks podman, or containerd), and fail instead when CI is set (CI runs as root
after scripts/setup, so there they must run)."""

from __future__ import annotations

import shutil
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support.apiserver import KubeAPIServer
from tests.support.kubeconfig import write_kubeconfig
from tests.support.netns import NetNS, ci_enabled, create_netns, delete_netns, netns_unavailable_reason
from tests.support.pki import Pki, make_pki
from tests.support.topology import BACKENDS, FAMILIES

REPO_ROOT = Path(__file__).resolve().parent.parent

try:
    from hypothesis import HealthCheck, settings
except ImportError:  # pragma: no cover - hypothesis is a dev dependency
    pass
else:
    # Property tests here exec iptables and enter namespaces: a per-example deadline would be a
    # timing assertion. Built on the profile Hypothesis already chose (its "ci" profile under CI).
    settings.register_profile("mesh", settings(deadline=None, suppress_health_check=[HealthCheck.too_slow]))
    settings.load_profile("mesh")

_NEEDS_NETNS = ("kernel", "podman", "cri")
_unavailable: dict[str, str | None] = {}


def _reason(marker: str) -> str | None:
    """Why tests with this marker cannot run here (None when they can); probed once per session."""
    if marker not in _unavailable:
        if "netns" not in _unavailable:
            _unavailable["netns"] = netns_unavailable_reason()
        reason = _unavailable["netns"]
        if reason is None and marker in ("podman", "cri") and shutil.which("podman") is None:
            reason = "podman is not installed (run scripts/setup)"
        if reason is None and marker == "cri":
            try:
                from containerd import unavailable_reason
            except ImportError as e:
                reason = f"the CRI client cannot be built: {e} (run scripts/setup)"
            else:
                reason = unavailable_reason()
        _unavailable[marker] = reason
    return _unavailable[marker]


def pytest_report_header(config: pytest.Config) -> str:
    reason = _reason("kernel")
    state = "available" if reason is None else f"unavailable ({reason})"
    return f"network namespaces: {state}; CI: {ci_enabled()}"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # A test that asks for a namespace needs the kernel, marked or not.
    for item in items:
        if "netns" in getattr(item, "fixturenames", ()) and item.get_closest_marker("kernel") is None:
            item.add_marker(pytest.mark.kernel)


def pytest_runtest_setup(item: pytest.Item) -> None:
    for marker in _NEEDS_NETNS:
        if item.get_closest_marker(marker) is None:
            continue
        reason = _reason(marker)
        if reason is None:
            continue
        if ci_enabled():
            pytest.fail(f"{marker} test cannot run in CI: {reason}", pytrace=False)
        pytest.skip(f"{marker} test: {reason}")


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def shared_dir() -> Path | None:
    """The shared material (conformance cases, notes) beside the repository, or None when absent."""
    path = REPO_ROOT.parent / "shared"
    return path if path.is_dir() else None


@pytest.fixture(scope="session")
def venv_bin() -> Path:
    """The directory of the installed console scripts (istio-iptables, istio-cni, ...)."""
    path = REPO_ROOT / ".venv" / "bin"
    return path if path.is_dir() else Path(sys.executable).parent


@pytest.fixture(scope="session")
def project_images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The project's two images (``init``: istio-iptables, ``install``: install-cni), built once per
    session from this working tree on a local Debian 12 base; the image and CRI tests share them."""
    import images

    return images.build(REPO_ROOT, tmp_path_factory.mktemp("images"))


@pytest.fixture
def netns() -> Iterator[Callable[..., NetNS]]:
    """Factory: ``netns()`` or ``netns("pod")`` creates a uniquely named namespace with lo up and
    returns a NetNS (``.name``, ``.path``, ``.run(argv)``, ``.popen(argv)``). All of them are
    deleted at teardown, also when the test fails, with any process still running inside."""
    created: list[NetNS] = []

    def make(hint: str = "") -> NetNS:
        ns = create_netns(hint)
        created.append(ns)
        return ns

    try:
        yield make
    finally:
        for ns in reversed(created):
            delete_netns(ns)


@pytest.fixture(scope="session")
def plugin_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The self-contained plugin's template (scripts/build-plugin --template-only), built once:
    what install-cni installs from by default (PLUGIN_TEMPLATE)."""
    import subprocess

    out = tmp_path_factory.mktemp("plugin") / "template"
    p = subprocess.run(
        [str(REPO_ROOT / "scripts" / "build-plugin"), "--template-only", str(out)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert p.returncode == 0, p.stderr
    return out


@pytest.fixture
def short_dir(tmp_path: Path) -> Iterator[Path]:
    """An empty directory whose path is short enough for the self-contained plugin's shebang
    (pytest's own temporary paths are not); removed afterwards."""
    import shutil
    import tempfile

    d = Path(tempfile.mkdtemp(prefix="cni-", dir="/tmp"))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


# --- the plugin against the tests' API server ------------------------------------------------
# Module-scoped: one PKI and one server per test module. A module's TOKEN is the token the
# server accepts; a module overrides any of these by defining a fixture of the same name (which
# may ask for the one here by that name, to add pods).

DEFAULT_TOKEN = "test-token"


@pytest.fixture(scope="module")
def api_token(request: pytest.FixtureRequest) -> str:
    """The bearer token of the module's API server: the test module's ``TOKEN``."""
    return str(getattr(request.module, "TOKEN", DEFAULT_TOKEN))


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def api(pki: Pki, api_token: str) -> Iterator[KubeAPIServer]:
    """The HTTPS API server (tests.support.apiserver), serving the pods the tests add."""
    with KubeAPIServer(pki, api_token) as server:
        yield server


@pytest.fixture(scope="module")
def kubeconfig(tmp_path_factory: pytest.TempPathFactory, api: KubeAPIServer, pki: Pki, api_token: str) -> Path:
    """A kubeconfig for ``api`` (CA file, token) under the name install-cni gives it."""
    d = tmp_path_factory.mktemp("kc")
    return write_kubeconfig(d / "ZZZ-istio-cni-kubeconfig", api.url, ca_file=pki.ca_cert, token=api_token)


@pytest.fixture(scope="module")
def exe(venv_bin: Path) -> Path:
    """The installed plugin executable."""
    return venv_bin / "istio-cni"


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Stands in for the pod's namespace file where nothing may be installed: pass-through paths
    and refused inputs never open it; a capture attempt would fail on it."""
    f = tmp_path_factory.mktemp("netns") / "netns-placeholder"
    f.write_text("")
    return str(f)


# --- real packets through the traffic topology (tests.support.topology) ---------------------


# Module scope, so that pytest runs all tests of one backend together.
@pytest.fixture(scope="module", params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(params=FAMILIES)
def family(request: pytest.FixtureRequest) -> str:
    return str(request.param)
