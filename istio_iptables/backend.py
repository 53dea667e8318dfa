"""Which iptables binaries write a namespace's rules: iptables-legacy or iptables-nft, per family.

``--force-iptables-binary`` wins. Otherwise detection follows Istio: legacy only when the legacy
tables of the target namespace already hold rules and a probe rule can be added and removed there;
nft in every other case. Writing to the backend the packets do not traverse loses rules silently,
so the choice and its reason are always logged.
"""

from __future__ import annotations

from .logsink import get_logger
from .ruleset import Family
from .startup import TYPE_CHECKING, NamedTuple
from .state import holds_rules, parse_save
from .tools import find as path_which

if TYPE_CHECKING:
    from collections.abc import Callable

    from .executor import Completed

log = get_logger(__name__)


LEGACY = "legacy"
NFT = "nft"
PLAIN = ""

_FORCE_NAMES = {
    "legacy": LEGACY,
    "iptables-legacy": LEGACY,
    "nft": NFT,
    "iptables-nft": NFT,
    "iptables": PLAIN,
}

# A rule that can never match (protocol 255 is reserved), added and deleted again in one COMMIT:
# proves the binary and the kernel accept writes to this backend without changing anything.
PROBE_DOCUMENT = "*filter\n-A INPUT -p 255 -j DROP\n-D INPUT -p 255 -j DROP\nCOMMIT\n"


class BackendError(Exception):
    """No usable iptables binaries (message says which were looked for)."""


class BackendBusy(BackendError):
    """The legacy tables hold rules but their xtables lock was not free within the wait.

    Busy is not unusable: the rules must not go to the other backend, where the packets of a
    namespace that uses legacy would never see them. The caller reports it ("try again later").
    """


def lock_held(stderr: str) -> bool:
    """Whether an iptables command failed because another process held the xtables lock."""
    return "xtables lock" in stderr


class Backend(NamedTuple):
    """The restore and save binaries of one variant for one family."""

    family: Family
    variant: str
    restore: str
    save: str

    @property
    def name(self) -> str:
        base = self.family.iptables_command
        return f"{base}-{self.variant}" if self.variant else base

    @property
    def legacy(self) -> bool:
        """Legacy uses the xtables lock file; nft does not lock at all."""
        return self.variant == LEGACY

    def __str__(self) -> str:
        return self.name


def forced_variant(value: str) -> str:
    """The variant named by ``--force-iptables-binary`` (raises ValueError for an unknown one)."""
    try:
        return _FORCE_NAMES[value.strip().lower()]
    except KeyError:
        names = ", ".join(sorted(_FORCE_NAMES))
        raise ValueError(f"unsupported --force-iptables-binary {value!r} (one of: {names})") from None


def binary_names(family: Family, variant: str) -> tuple[str, str]:
    base = family.iptables_command + (f"-{variant}" if variant else "")
    return f"{base}-restore", f"{base}-save"


def find(family: Family, variant: str, which: Callable[[str], str | None] | None = None) -> Backend | None:
    """The backend if both its binaries are on PATH, else None."""
    which = which or path_which
    restore, save = binary_names(family, variant)
    restore_path, save_path = which(restore), which(save)
    if restore_path is None or save_path is None:
        return None
    return Backend(family, variant, restore_path, save_path)


def require(family: Family, variant: str, which: Callable[[str], str | None] | None = None) -> Backend:
    which = which or path_which
    found = find(family, variant, which)
    if found is None:
        restore, save = binary_names(family, variant)
        missing = [b for b in (restore, save) if which(b) is None]
        raise BackendError(f"{' and '.join(missing)}: not found in PATH")
    return found


class Choice(NamedTuple):
    """A chosen backend, why, and the iptables-save output detection already read (if any)."""

    backend: Backend
    reason: str
    saved: str | None = None


def choose(
    family: Family,
    forced: str | None,
    save: Callable[[Backend], Completed],
    restore: Callable[[Backend, str], Completed],
    which: Callable[[str], str | None] | None = None,
    legacy_tables: Callable[[Family], bool | None] | None = None,
) -> Choice:
    """Pick the backend for ``family``; ``save``/``restore`` run a binary inside the target namespace.

    ``legacy_tables(family)``, when given, says whether the namespace has any legacy table of that
    family at all (None: cannot tell); without one, legacy tables cannot hold rules, so detection
    need not run iptables-legacy-save to know it.
    """
    if forced is not None:
        variant = forced_variant(forced)
        choice = Choice(require(family, variant, which), "forced by --force-iptables-binary")
    else:
        choice = _detect(family, save, restore, which, legacy_tables)
    log.info("%s: using %s (%s)", _fam(family), choice.backend.name, choice.reason)
    return choice


def _detect(
    family: Family,
    save: Callable[[Backend], Completed],
    restore: Callable[[Backend, str], Completed],
    which: Callable[[str], str | None] | None,
    legacy_tables: Callable[[Family], bool | None] | None = None,
) -> Choice:
    legacy = find(family, LEGACY, which)
    why_not = "no iptables-legacy binaries"
    if legacy is not None and legacy_tables is not None and legacy_tables(family) is False:
        why_not = "no legacy tables in the namespace"
    elif legacy is not None:
        dump = save(legacy)
        if not dump.ok:
            why_not = f"{legacy.save} failed: {dump.stderr.strip()}"
        elif not holds_rules(parse_save(dump.stdout)):
            why_not = "legacy tables hold no rules"
        else:
            probe = restore(legacy, PROBE_DOCUMENT)
            if probe.ok:
                return Choice(legacy, "legacy tables already hold rules and accept a probe rule", dump.stdout)
            if lock_held(probe.stderr):
                raise BackendBusy(
                    f"{_fam(family)}: the legacy tables hold rules, but {legacy.restore} could not take"
                    f" the xtables lock: {probe.stderr.strip()}"
                )
            why_not = f"legacy tables hold rules but the probe rule failed: {probe.stderr.strip()}"
    nft = find(family, NFT, which)
    if nft is not None:
        return Choice(nft, why_not)
    plain = find(family, PLAIN, which)
    if plain is not None:
        return Choice(plain, f"{why_not}; no iptables-nft binaries, using the unsuffixed ones")
    names = [n for v in (LEGACY, NFT, PLAIN) for n in binary_names(family, v)]
    raise BackendError(f"no iptables binaries for {_fam(family)} in PATH (looked for {', '.join(names)})")


def _fam(family: Family) -> str:
    return "IPv4" if family is Family.V4 else "IPv6"
