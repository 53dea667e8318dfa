"""Install a planned Ruleset inside a network namespace, or take ours away again.

The applier of both the init container (``istio-iptables``) and the CNI plugin. It makes no rule
decisions: the rules come from the planner, the restore text from the renderer. What it adds:

- target: the current namespace or ``--network-namespace``, which the applying thread enters for
  the run and leaves at the end (netlink.entered), so the restores it spawns start there and no
  nsenter process is spent per command (commands of a recording executor carry nsenter instead);
- backend: legacy or nft per family (backend.py), logged;
- atomic: one ``iptables-restore --noflush --wait=N`` per family, the two families' started
  together (they share no table) except in CNI mode; in CNI mode the xtables lock is the pod's
  own namespace file (XTABLES_LOCKFILE), not the node's global lock;
- all or nothing: when a later step fails, every family already changed is put back as it was;
- idempotent: the rules in place are compared with the expected ones; equal is a no-op, different
  is drift (an error unless --reconcile or --force-apply, which replace ours in the same COMMIT);
- no network name-service lookups: when nsswitch.conf could reach the network for passwd/group
  (sss, ldap, nis, winbind, compat...; not files or systemd), iptables-restore runs with those
  lookups limited to local files (nsexec.py); otherwise the restore binary is run directly;
- loopback addresses (``::6``) through one standard-library netlink request (netlink.py), TPROXY
  policy routing through the same kind of requests (routes.py, imported only when needed).
"""

from __future__ import annotations

import os
import sys

from . import backend as backends
from . import state as st
from .executor import CommandNotFound, RealExecutor, nsenter_argv
from .logsink import get_logger
from .netns import BUSY, Netns, NetnsError, open_netns
from .ruleset import BUILTIN_CHAINS, Family
from .startup import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from .config import ApplyOptions
    from .executor import Completed, Executor
    from .ruleset import FamilyRules, NftRules, Ruleset

log = get_logger(__name__)

# Seconds iptables-restore waits for the xtables lock (legacy only; nft takes no lock).
DEFAULT_LOCK_WAIT = 30
# Extra seconds before a hung child is killed, beyond the lock wait.
_CHILD_GRACE = 30


def _nsexec_argv() -> list[str]:
    """How to start the nsexec launcher: its file, or its source when we run from a zip bundle."""
    path = os.path.join(os.path.dirname(__file__), "nsexec.py")
    if os.path.isfile(path):
        return [sys.executable, "-I", "-S", path]
    import importlib.util

    spec = importlib.util.find_spec(f"{__package__}.nsexec")
    source = spec.loader.get_source(spec.name) if spec and spec.loader else None  # type: ignore[attr-defined]
    if not source:
        raise ApplyError("cannot find the nsexec launcher of this installation", 1, STATE)
    return [sys.executable, "-I", "-S", "-c", source]


# ApplyError kinds, for callers that map failures to their own codes (the CNI plugin).
BINARY_MISSING = "binary-missing"
NETNS = "netns"
REJECTED = "rejected"
LOCK = "lock"
DRIFT = "drift"
STATE = "state"
ROUTES = "routes"
VALIDATION = "validation"
OPTIONS = "options"


class ApplyError(Exception):
    """Applying (or cleaning up) failed; nothing of ours was left half-done.

    ``exit_code``: 1 for every failure, 126 for a failed ``--run-validation``.
    ``kind``: one of the constants above.
    """

    def __init__(self, message: str, exit_code: int = 1, kind: str = "failed") -> None:
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code
        self.kind = kind


def _fam(family: Family) -> str:
    return "IPv4" if family is Family.V4 else "IPv6"


# --- the target namespace ---------------------------------------------------------------------

# The databases iptables-restore reads for our rules (owner matches).
_OWNER_DATABASES = ("passwd", "group")

# NSS sources whose answers never leave the machine, whatever network namespace asks: local files
# (files, db, altfiles) and local daemons reached over unix sockets bound to filesystem paths,
# which a network namespace does not change (systemd: systemd-userdbd and the
# /run/systemd/userdb sockets; mymachines: systemd-machined over D-Bus). Everything else may ask
# the network: sss (sssd, then LDAP/AD), ldap, nis/nisplus, winbind, hesiod (DNS), and compat,
# whose "+"/"-" entries are NIS lookups. Unknown sources count as network ones.
_LOCAL_SOURCES = frozenset({"files", "db", "altfiles", "systemd", "mymachines"})


def needs_local_lookups(text: str | None) -> bool:
    """True when nsswitch.conf text lets passwd or group lookups reach a source that may use the
    network (see _LOCAL_SOURCES).

    ``None`` (no nsswitch.conf) means glibc's built-in defaults, which are files only.
    """
    if text is None:
        return False
    for line in text.splitlines():
        line = line.split("#", 1)[0]
        db, sep, sources = line.partition(":")
        if not sep or db.strip() not in _OWNER_DATABASES:
            continue
        for source in sources.split():
            if source.startswith("["):  # an action such as [NOTFOUND=return]
                continue
            if source not in _LOCAL_SOURCES:
                return True
    return False


def host_needs_local_lookups(path: str = "/etc/nsswitch.conf") -> bool:
    """Whether iptables-restore must run with lookups limited to local files (see nsexec.py)."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return needs_local_lookups(f.read())
    except FileNotFoundError:
        return False
    except OSError:
        return True


def open_target(path: str | None) -> Netns:
    """Open the namespace at ``path`` (None: this thread's) for a run. Raises ApplyError."""
    try:
        return open_netns(path)
    except NetnsError as e:
        raise ApplyError(str(e), 1, NETNS) from None


_LEGACY_TABLE_NAMES = {Family.V4: "ip_tables_names", Family.V6: "ip6_tables_names"}


def legacy_table_presence(proc_net: str = "/proc/thread-self/net") -> dict[Family, bool]:
    """Per family, whether the calling thread's network namespace has any legacy table.

    The kernel lists a namespace's legacy tables in ``ip_tables_names`` / ``ip6_tables_names``;
    a table appears there when something first uses it, and iptables-legacy-save shows only the
    tables listed. A missing file means the family's legacy module is not loaded, so no namespace
    has such a table. Families it cannot tell about are left out.
    """
    if not os.path.isdir(proc_net):
        return {}
    out: dict[Family, bool] = {}
    for family, name in _LEGACY_TABLE_NAMES.items():
        try:
            with open(os.path.join(proc_net, name), encoding="utf-8", errors="replace") as f:
                out[family] = bool(f.read().split())
        except FileNotFoundError:
            out[family] = False
        except OSError:
            continue
    return out


def table_presence() -> dict[tuple[Family, str], bool]:
    """Per family and backend (legacy, nft), whether the calling thread's network namespace has
    any table at all; where there is none, the save command would print nothing. Pairs it cannot
    tell about are left out."""
    from . import netlink

    out = {(family, backends.LEGACY): there for family, there in legacy_table_presence().items()}
    for family, proto in ((Family.V4, netlink.NFPROTO_IPV4), (Family.V6, netlink.NFPROTO_IPV6)):
        try:
            out[(family, backends.NFT)] = netlink.nft_table_count(proto) > 0
        except netlink.NetlinkError as e:
            log.debug("cannot list the nf_tables tables: %s", e)
    return out


class _Target:
    """Runs iptables binaries inside the target namespace, through the executor."""

    def __init__(self, executor: Executor, opts: ApplyOptions, lock_wait: int, ns: Netns) -> None:
        self.executor = executor
        self.ns = ns
        self.netns = opts.network_namespace
        # Real commands run from inside the namespace, which the applying thread enters for the
        # whole run (no nsenter process per command); recorded ones are prefixed with nsenter, so
        # what they would run is complete on its own.
        self.inside = self.netns is not None and isinstance(executor, RealExecutor)
        self.cmd_netns = None if self.inside else self.netns
        self.lock_wait = lock_wait
        # The whole run holds the namespace's own lock (run_locked), which in CNI mode is also the
        # pod's xtables lock (Istio's convention: XTABLES_LOCKFILE is the namespace file). Our
        # legacy restores must not wait for the lock their own run holds, so they lock a private
        # file instead (see _xtables_lockfile); nothing else shares the pod's tables with us.
        self.cni_mode = opts.cni_mode
        self._xtables_fd: int | None = None
        # Restores one after the other (CNI mode) or the families' together (see _commit).
        self.one_at_a_time = opts.cni_mode
        self.local_lookups = host_needs_local_lookups()
        self._tables: dict[tuple[Family, str], bool] | None = None

    def has_tables(self, family: Family, variant: str) -> bool | None:
        """Whether the namespace has any table of ``family`` in backend ``variant`` (legacy or
        nft); None: cannot tell, ask the save command.

        Read from the kernel directly (table_presence), so only when commands run for real: a
        recorded run sees the answers its executor gives.
        """
        if not isinstance(self.executor, RealExecutor):
            return None
        if self._tables is None:
            # Real commands run from inside the target namespace (run_locked), so this thread
            # looks at the namespace's own tables.
            self._tables = table_presence()
        return self._tables.get((family, variant))

    def legacy_tables(self, family: Family) -> bool | None:
        return self.has_tables(family, backends.LEGACY)

    def deleted_error(self) -> ApplyError | None:
        """The error to report when the namespace file no longer names the namespace this run
        works in (the runtime deleted it meanwhile); None while it does."""
        if not self.inside or self.netns is None or self.ns.named_by(self.netns):
            return None
        return ApplyError(f"network namespace {self.netns}: deleted while applying", 1, NETNS)

    @property
    def route_netns(self) -> str | None:
        """Where routes.py works: here, when this thread is inside the namespace (by its
        descriptor); a recorded run names the path, as its commands do."""
        return self.cmd_netns

    def run_locked(self, fn: Callable[[], None]) -> None:
        """``fn()`` holding the namespace's lock, with the calling thread inside the namespace
        when commands run for real (see __init__), and back in its own namespace afterwards."""
        try:
            self.ns.check_kind()
            self.ns.lock(self.lock_wait)
        except NetnsError as e:
            raise ApplyError(str(e), 1, LOCK if e.kind == BUSY else NETNS) from None
        try:
            if not self.inside:
                fn()
                return
            try:
                inside = self.ns.entered()
                inside.__enter__()
            except NetnsError as e:
                raise ApplyError(str(e), 1, NETNS) from None
            try:
                fn()
            finally:
                inside.__exit__(None, None, None)
        finally:
            self.ns.unlock()
            if self._xtables_fd is not None:
                os.close(self._xtables_fd)
                self._xtables_fd = None

    def _xtables_lockfile(self) -> str:
        """A lock file for our legacy restores in CNI mode: an anonymous in-memory file that each
        child opens by its inherited descriptor, so they lock something only they know of."""
        if self._xtables_fd is None:
            fd = os.memfd_create("xtables.lock", 0)
            os.set_inheritable(fd, True)
            self._xtables_fd = fd
        return f"/proc/self/fd/{self._xtables_fd}"

    def _run(self, argv: list[str], stdin: str | None = None, env: dict[str, str] | None = None) -> Completed:
        return self._start(argv, stdin, env)()

    def _start(
        self, argv: list[str], stdin: str | None = None, env: dict[str, str] | None = None
    ) -> Callable[[], Completed]:
        """Start ``argv``; the returned function waits for it. Commands run one at a time unless
        the executor can start them (the real one can), so a recorded run keeps its order."""
        log.debug("running %s", " ".join(argv))
        timeout = self.lock_wait + _CHILD_GRACE
        start = getattr(self.executor, "start", None)
        try:
            if start is None:
                res = self.executor.run(argv, stdin=stdin, env=env, timeout=timeout)
                return lambda: self._finished(res)
            running = start(argv, stdin=stdin, env=env, timeout=timeout)
        except CommandNotFound as e:
            raise ApplyError(f"{e.program}: command not found", 1, BINARY_MISSING) from e
        return lambda: self._finished(running.wait())

    def _finished(self, res: Completed) -> Completed:
        if not res.ok:
            self._launcher_failure(res)
        return res

    def _launcher_failure(self, res: Completed) -> None:
        """Turn a failure of nsenter/nsexec itself (not of iptables) into a clear ApplyError."""
        own = [ln for ln in res.stderr.splitlines() if ln.strip() and not ln.startswith("nsexec: warning:")]
        first = own[0].strip() if own else ""
        if not first.startswith(("nsenter:", "nsexec:")):
            return
        if "failed to execute" in first:
            raise ApplyError(first, 1, BINARY_MISSING)
        if any(w in first for w in ("cannot open", "reassociate", "cannot enter", "namespace")):
            raise ApplyError(f"network namespace {self.netns}: {first}", 1, NETNS)

    def save(self, b: backends.Backend) -> Completed:
        return self._run(nsenter_argv(self.cmd_netns, [b.save]))

    def restore(self, b: backends.Backend, doc: str) -> Completed:
        return self.start_restore(b, doc)()

    def start_restore(self, b: backends.Backend, doc: str) -> Callable[[], Completed]:
        """Start ``b``'s restore of ``doc``; the returned function waits for it."""
        cmd = [b.restore, "--noflush", f"--wait={self.lock_wait}"]
        env = {"XTABLES_LOCKFILE": self._xtables_lockfile()} if b.legacy and self.cni_mode else None
        # Only owner matches make iptables look names up (even numeric ones: getpwnam first).
        return self.start_tool(cmd, doc, env, looks_up_names="-owner" in doc)

    def run_tool(self, cmd: list[str], doc: str | None = None, *, looks_up_names: bool = False) -> Completed:
        """Run ``cmd`` (reading ``doc``) in the target namespace and wait for it."""
        return self.start_tool(cmd, doc, None, looks_up_names=looks_up_names)()

    def start_tool(
        self, cmd: list[str], doc: str | None, env: dict[str, str] | None, *, looks_up_names: bool
    ) -> Callable[[], Completed]:
        """Start ``cmd`` in the target namespace, with user and group lookups limited to local
        files when it ``looks_up_names`` and the host's could reach the network (nsexec.py); the
        returned function waits for it."""
        if self.local_lookups and looks_up_names:
            net = ["--net", self.cmd_netns] if self.cmd_netns else []
            argv = [*_nsexec_argv(), *net, "--local-lookups", "--", *cmd]
        else:
            argv = nsenter_argv(self.cmd_netns, cmd)
        finish = self._start(argv, stdin=doc, env=env)

        def wait() -> Completed:
            res = finish()
            for line in res.stderr.splitlines() if res.ok else ():
                if line.startswith("nsexec: warning:"):
                    log.warning("%s", line.removeprefix("nsexec: "))
            return res

        return wait


# --- errors from iptables-restore -------------------------------------------------------------


def _restore_error(
    what: str, b: backends.Backend, res: Completed, doc: str, origins: Sequence[str | None] | None = None
) -> ApplyError:
    """The restore tool's own message plus the document line it rejected."""
    err = "\n".join(ln for ln in res.stderr.splitlines() if not ln.startswith("nsexec: warning:"))
    msg = err.strip() or res.stdout.strip() or f"exit status {res.returncode}"
    if "xtables lock" in msg:
        return ApplyError(f"{what}: {b.restore}: {msg}", 1, LOCK)
    import re  # only on this error path

    lines = doc.splitlines()
    detail = ""
    m = re.search(r"line:? (\d+)", msg)
    if m and 0 < int(m.group(1)) <= len(lines):
        n = int(m.group(1))
        text = lines[n - 1]
        if origins is not None and origins[n - 1]:
            text = origins[n - 1] or text
        if text == "COMMIT":
            table = next((ln[1:].strip() for ln in reversed(lines[: n - 1]) if ln.startswith("*")), "?")
            detail = f"\nrejected line {n}: COMMIT (the kernel refused the {table} table as a whole)"
        else:
            detail = f"\nrejected line {n}: {text}"
    return ApplyError(f"{what}: {b.restore} failed (exit {res.returncode}): {msg}{detail}", 1, REJECTED)


# --- one family -------------------------------------------------------------------------------


class _Family:
    """One family's part of a run: its backend, its state on arrival, and what to commit."""

    def __init__(
        self,
        family: Family,
        backend: backends.Backend,
        before: st.State,
        expected: FamilyRules | None,
        stale: dict[str, list[str]] | None = None,
    ) -> None:
        self.family = family
        self.backend = backend
        self.before = before  # as first read, without check chains
        self.expected = expected  # None: only leftovers to look at (family not planned)
        self.stale: dict[str, list[str]] = stale or {}  # check chains found on arrival
        self.sections: dict[str, st.Section] = {}
        self.document = ""
        self.origins: list[str | None] | None = None
        self.action = ""
        self.changed = False
        # Our plain rules in built-in chains, in iptables-save's spelling, once check chains have
        # shown it: what a rollback may delete besides jumps to our chains.
        self.known: st.Known | None = None

    @property
    def name(self) -> str:
        return f"{_fam(self.family)} ({self.backend.name})"


def _render(fr: FamilyRules) -> str:
    from .render import render_family  # deferred: keeps this module importable on its own

    return render_family(fr)


def _open(
    target: _Target, family: Family, forced: str | None, expected: FamilyRules | None, *, required: bool
) -> _Family | None:
    """Choose the backend for ``family`` and read its state (None when optional and unreadable)."""
    try:
        choice = backends.choose(
            family, forced, target.save, target.restore, legacy_tables=target.legacy_tables
        )
    except ValueError as e:
        raise ApplyError(str(e), 1, OPTIONS) from e
    except backends.BackendBusy as e:
        raise ApplyError(str(e), 1, LOCK) from e
    except backends.BackendError as e:
        if not required:
            log.info("%s: not inspected: %s", _fam(family), e)
            return None
        raise ApplyError(str(e), 1, BINARY_MISSING) from e
    text = choice.saved
    if text is None and target.has_tables(family, choice.backend.variant) is False:
        log.debug("%s: no %s tables in the namespace", _fam(family), choice.backend.name)
        text = ""  # what the save command prints there
    if text is None:
        res = target.save(choice.backend)
        if not res.ok:
            if not required:
                log.info("%s: not inspected: %s", _fam(family), res.stderr.strip())
                return None
            raise ApplyError(f"{choice.backend.save} failed: {res.stderr.strip()}", 1, STATE)
        text = res.stdout
    return _family(family, choice.backend, text, expected)


def _family(family: Family, b: backends.Backend, saved: str, expected: FamilyRules | None) -> _Family:
    raw = st.parse_save(saved)
    fam = _Family(family, b, st.without_checks(raw), expected, st.check_chains(raw))
    if fam.stale:
        log.info("%s: removing check chains left by an interrupted run: %s", fam.name, fam.stale)
    return fam


def _load_checks(
    target: _Target, fam: _Family, only: Callable[[str, str], bool] | None = None
) -> tuple[st.State, st.CheckLoad]:
    """Load the check copies of ``fam.sections``, then read the namespace back."""
    load = st.check_document(fam.sections, fam.stale, only)
    if not load.document:
        return fam.before, load
    res = target.restore(fam.backend, load.document)
    fam.changed = True  # a failed document may still have committed its first tables
    if not res.ok:
        raise _restore_error(
            f"{fam.name}: loading the expected rules", fam.backend, res, load.document, load.origins
        )
    saved = target.save(fam.backend)
    if not saved.ok:
        raise ApplyError(f"{fam.backend.save} failed: {saved.stderr.strip()}", 1, STATE)
    return st.parse_save(saved.stdout), load


def _known_for_rollback(target: _Target, fam: _Family) -> st.Known | None:
    """Our plain built-in-chain rules in iptables-save's spelling, for a rollback to tell them from
    rules others added meanwhile: known from this run's check chains, else learned now (only a
    configuration with such rules - TPROXY, DNS, excluded interfaces - needs it). None when they
    cannot be learned: then every rule added since counts as ours, so that none of ours stays."""
    if fam.known is not None or fam.expected is None:
        return fam.known or {}
    sections = fam.sections or st.planned_sections(fam.expected)
    if not any(_plain_builtin_rule(t, ln) for t, sec in sections.items() for ln in sec.lines):
        return {}
    fam.sections = sections
    try:
        now, load = _load_checks(target, fam, _plain_builtin_rule)
    except ApplyError as e:
        log.warning("%s: cannot tell our rules in built-in chains from others' to roll back: %s", fam.name, e)
        return None
    fam.known = st.expected_from_checks(now, load.names).known()
    return fam.known


def _put_back(target: _Target, families: Sequence[_Family]) -> None:
    """Undo whatever this run changed in these families (best effort; logs what it could not).

    Only our own part moves back: rules others added or removed meanwhile stay as they are."""
    for fam in families:
        if not fam.changed:
            continue
        known = _known_for_rollback(target, fam)
        res = target.save(fam.backend)
        if not res.ok:
            log.error("%s: cannot read state to roll back: %s", fam.name, res.stderr.strip())
            continue
        doc = st.revert(fam.before, st.parse_save(res.stdout), known)
        if not doc:
            fam.changed = False
            continue
        log.info("%s: rolling back", fam.name)
        back = target.restore(fam.backend, doc)
        if back.ok:
            fam.changed = False
        else:
            log.error("%s: roll back failed: %s", fam.name, back.stderr.strip())


def _commit(target: _Target, families: Sequence[_Family], what: str) -> None:
    """Run the families' documents; if any fails, put every family back and raise.

    Outside CNI mode the restores run at the same time (each is atomic for its own tables and
    they share none), which takes one restore off an init container's run on an idle node. The
    CNI plugin runs them one after the other: it is called for many pods at once, when the
    node's cores are busy anyway and a second process per ADD gains nothing."""
    pending: list[tuple[_Family, str, Callable[[], Completed]]] = []
    failed: ApplyError | None = None
    for fam in families:
        if not fam.document:
            continue
        action = fam.action or what
        log.info("%s: %s with %s:\n%s", fam.name, action, fam.backend.restore, fam.document.rstrip())
        try:
            wait = target.start_restore(fam.backend, fam.document)
        except ApplyError as e:
            failed = e
            break
        fam.changed = True
        pending.append((fam, action, wait))
        if target.one_at_a_time:
            failed = _outcome(*pending.pop())
            if failed is not None:
                break
    # Every started command is waited for, whatever happened to the others.
    for item in pending:
        err = _outcome(*item)
        failed = failed or err
    if failed is not None:
        _put_back(target, families)
        raise failed


def _outcome(fam: _Family, action: str, wait: Callable[[], Completed]) -> ApplyError | None:
    """Wait for a family's restore: None when it succeeded, else the error to report."""
    try:
        res = wait()
    except ApplyError as e:
        return e
    if res.ok:
        return None
    return _restore_error(f"{fam.name}: {action}", fam.backend, res, fam.document, fam.origins)


# --- apply ------------------------------------------------------------------------------------


def _decide(
    target: _Target, families: Sequence[_Family], present: Sequence[bool], opts: ApplyOptions
) -> list[str]:
    """Set each family's document; returns the drift found (when neither reconcile nor force)."""
    replace_ok = opts.reconcile or opts.force_apply
    drift: list[str] = []
    for fam, has_ours in zip(families, present, strict=True):
        if not has_ours:
            # Fresh: the document is exactly the rendered one (what --dry-run prints).
            fam.document = _render(fam.expected) if fam.expected is not None else ""
            continue
        now, load = _load_checks(target, fam)
        expected = st.expected_from_checks(now, load.names)
        fam.known = expected.known()
        current = st.find_ours(st.without_checks(now), fam.known)
        checks = st.check_chains(now)
        differences = st.describe_drift(current, expected)
        if not differences and not opts.force_apply:
            log.info("%s: rules already in place (%s), nothing to do", fam.name, current.summary())
            fam.document = st.transition(st.Ours(), {}, checks)
            fam.action = "removing check chains"
            continue
        missing = st.missing_tables(current, expected) if differences and not opts.force_apply else None
        if missing:
            log.info(
                "%s: completing the rules of an interrupted run of this configuration (%s in place;"
                " missing tables: %s)",
                fam.name,
                current.summary(),
                ", ".join(missing),
            )
            fam.document = st.transition(st.Ours(), {t: fam.sections[t] for t in missing}, checks)
            fam.action = "completing our rules"
            continue
        if differences and not replace_ok:
            drift += [f"{fam.name} {d}" for d in differences]
            fam.document = st.transition(st.Ours(), {}, checks)
            fam.action = "removing check chains"
            continue
        why = "drift, --reconcile" if differences and opts.reconcile else "--force-apply"
        log.info("%s: replacing our rules (%s): %s", fam.name, why, "; ".join(differences) or "same rules")
        fam.document = st.transition(current, fam.sections, checks)
        fam.action = "replacing our rules"

    return drift


def in_target(
    opts: ApplyOptions,
    executor: Executor | None,
    lock_wait: int,
    netns: Netns | None,
    fn: Callable[[_Target], None],
) -> None:
    """``fn(target)`` for the namespace ``netns`` (opened here from ``opts.network_namespace``
    when None, and closed again), holding its lock, inside it when commands run for real: what
    every apply and cleanup of either backend runs in. Raises ApplyError."""
    ns = netns or open_target(opts.network_namespace)
    try:
        target = _Target(executor or RealExecutor(), opts, lock_wait, ns)
        target.run_locked(lambda: fn(target))
    finally:
        if netns is None:
            ns.close()


def apply(
    rs: Ruleset,
    opts: ApplyOptions,
    executor: Executor | None = None,
    *,
    lock_wait: int = DEFAULT_LOCK_WAIT,
    netns: Netns | None = None,
) -> None:
    """Install ``rs`` in the target namespace (see the module docstring). Raises ApplyError.

    ``opts.cleanup_only`` removes ours instead; ``opts.skip_rule_apply`` and ``opts.dry_run`` do
    nothing. ``lock_wait``: seconds to wait for the namespace's lock and the xtables lock.
    ``netns``: the target namespace already open (by the caller that checked it); by default
    ``opts.network_namespace`` is opened here.
    """
    if opts.dry_run:
        log.info("dry run: not applying rules")
        return
    if opts.cleanup_only:
        cleanup(opts, executor, enable_ipv6=True, ruleset=rs, lock_wait=lock_wait, netns=netns)
        return
    if opts.skip_rule_apply:
        log.info("--skip-rule-apply: not applying rules")
        return
    in_target(opts, executor, lock_wait, netns, lambda target: _apply(target, rs, opts))


def _apply(target: _Target, rs: Ruleset, opts: ApplyOptions) -> None:
    families: list[_Family] = []
    for fr in rs.families:
        fam = _open(target, fr.family, opts.force_iptables_binary, fr, required=True)
        assert fam is not None
        fam.sections = st.planned_sections(fr)
        families.append(fam)
    present = [not st.find_ours(f.before).empty or bool(f.stale) for f in families]
    if rs.v6 is None and (any(present) or opts.reconcile or opts.force_apply):
        # IPv6 is not planned: look for leftovers of an earlier configuration that had it.
        extra = _open(target, Family.V6, opts.force_iptables_binary, None, required=False)
        if extra is not None and (not st.find_ours(extra.before).empty or extra.stale):
            families.append(extra)
            present.append(True)

    try:
        drift = _decide(target, families, present, opts)
    except ApplyError:
        _put_back(target, families)
        raise
    if drift:
        for fam, has_ours in zip(families, present, strict=True):
            if not has_ours:
                fam.document = ""
        _commit(target, families, "removing check chains")
        raise ApplyError(
            "iptables rules from an earlier, different configuration are in place (drift):\n  "
            + "\n  ".join(drift)
            + "\nrun again with --reconcile (or --force-apply) to replace them,"
            + " or with --cleanup-only to remove them",
            1,
            DRIFT,
        )
    _commit(target, families, "applying")

    if rs.routes or rs.loopback_addresses:
        from . import routes  # deferred: only pods with routes or loopback addresses need it

        try:
            routes.apply_routes(rs.routes, rs.loopback_addresses, target.route_netns)
        except routes.RoutesError as e:
            gone = target.deleted_error()
            if gone is not None:
                raise gone from e
            _put_back(target, families)
            raise ApplyError(f"{_routing_what(rs)}: {e}", 1, ROUTES) from e
    gone = target.deleted_error()
    if gone is not None:
        raise gone
    log.info("iptables rules are in place")


# --- cleanup ----------------------------------------------------------------------------------


def cleanup(
    opts: ApplyOptions,
    executor: Executor | None = None,
    *,
    enable_ipv6: bool = True,
    ruleset: Ruleset | None = None,
    lock_wait: int = DEFAULT_LOCK_WAIT,
    netns: Netns | None = None,
) -> None:
    """Remove every ISTIO chain and every jump into one, in every table, for IPv4 and (unless
    ``enable_ipv6`` is False) IPv6, in both backends (only the forced one with
    --force-iptables-binary). With ``ruleset``, also its other rules in built-in chains, its policy
    routes and loopback addresses. Foreign rules stay. All or nothing, like apply. Raises ApplyError.
    """
    if opts.dry_run:
        log.info("dry run: not removing rules")
        return
    in_target(opts, executor, lock_wait, netns, lambda target: _cleanup(target, opts, enable_ipv6, ruleset))


def _cleanup(target: _Target, opts: ApplyOptions, enable_ipv6: bool, ruleset: Ruleset | None) -> None:
    fam_list = [Family.V4, Family.V6] if enable_ipv6 else [Family.V4]
    planned = {fr.family: fr for fr in (ruleset.families if ruleset else [])}

    families: list[_Family] = []
    for family in fam_list:
        if opts.force_iptables_binary is not None:
            try:
                variants = [backends.forced_variant(opts.force_iptables_binary)]
            except ValueError as e:
                raise ApplyError(str(e), 1, OPTIONS) from e
        else:
            variants = [backends.LEGACY, backends.NFT]
        found = [b for v in variants if (b := backends.find(family, v)) is not None]
        if not found:
            if family is Family.V4 or opts.force_iptables_binary is not None:
                names = ", ".join(n for v in variants for n in backends.binary_names(family, v))
                raise ApplyError(
                    f"no iptables binaries for {_fam(family)} in PATH ({names})", 1, BINARY_MISSING
                )
            log.info("%s: no iptables binaries, nothing to clean", _fam(family))
            continue
        for b in found:
            if target.has_tables(family, b.variant) is False:
                continue  # nothing of ours (or anyone's) to remove there
            res = target.save(b)
            if not res.ok:
                if family is Family.V6 and opts.force_iptables_binary is None:
                    log.info("%s: not inspected: %s", b.name, res.stderr.strip())
                    continue
                raise ApplyError(f"{b.save} failed: {res.stderr.strip()}", 1, STATE)
            families.append(_family(family, b, res.stdout, planned.get(family)))

    try:
        for fam in families:
            _removal(target, fam)
    except ApplyError:
        _put_back(target, families)
        raise
    _commit(target, families, "removing")
    if ruleset is not None and (ruleset.routes or ruleset.loopback_addresses):
        from . import routes

        try:
            for item in routes.remove_routes(
                ruleset.routes, ruleset.loopback_addresses, target.route_netns
            ):
                log.info("removed %s", item)
        except routes.RoutesError as e:
            raise ApplyError(f"{_routing_what(ruleset)}: {e}", 1, ROUTES) from e
    log.info("cleanup done")


def _routing_what(rs: Ruleset | NftRules) -> str:
    return "TPROXY policy routing" if rs.routes else "loopback addresses"


def _removal(target: _Target, fam: _Family) -> None:
    """Set ``fam.document`` to remove ours (nothing when nothing of ours is there)."""
    known: dict[tuple[str, str], frozenset[str]] = {}
    checks = fam.stale
    if fam.expected is not None:
        # The planned rules in built-in chains that do not jump to ours can only be recognised
        # in iptables-save's spelling: load their check copies when such chains hold anything.
        fam.sections = st.planned_sections(fam.expected)
        pairs = {
            (t, ln.split()[1])
            for t, sec in fam.sections.items()
            for ln in sec.lines
            if ln.split()[1] in BUILTIN_CHAINS
        }
        if st.needs_known(fam.before, pairs):
            now, load = _load_checks(target, fam, _plain_builtin_rule)
            known = st.expected_from_checks(now, load.names).known()
            checks = st.check_chains(now)
    current = st.find_ours(fam.before, known)
    if current.empty and not checks:
        return
    log.info("%s: removing %s", fam.name, current.summary())
    fam.document = st.transition(current, {}, checks)


def _plain_builtin_rule(table: str, line: str) -> bool:
    """A rendered rule in a built-in chain that does not jump to one of our chains."""
    tokens = line.split()
    return tokens[1] in BUILTIN_CHAINS and st.jump_target(" ".join(tokens[2:])) not in st.OUR_CHAINS


# --- the whole command ------------------------------------------------------------------------
