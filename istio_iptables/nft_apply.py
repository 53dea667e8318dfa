"""Install planned native nftables rules (``planner.plan_nft``) in a network namespace, or take
ours away again: the ``--native-nftables`` backend of both appliers.

The contract is the iptables applier's (apply.py), with nftables' own means:

- one ``nft -f -`` transaction for all our tables and both families: the kernel applies it whole
  or not at all, so unlike the iptables path there is no half-applied family to roll back;
- our tables are ours entirely (``inet istio-proxy-nat``, ``-mangle``, ``-raw``): a run replaces
  or deletes only those, and every other table, ``inet`` or not, stays as it is;
- idempotent: when our tables are there, the expected rules are loaded for a moment as inert
  copies (``istio-proxy-nat-check``..., regular chains only, so no packet ever traverses them),
  both are read back with ``nft -j list ruleset`` and compared as the kernel holds them; equal is
  a no-op, different is drift (an error unless --reconcile or --force-apply, which replace ours in
  the same transaction that drops the copies);
- the namespace is opened, locked and entered as by the iptables applier (apply._Target), and
  the TPROXY policy routes and ``::6`` are the same.

``nft`` is the binary on PATH (the init image carries it); a missing one is a clear error, never a
fall-back to iptables. Measured against Debian's libnftables binding (python3-nftables), running
the binary costs no more per pod and needs no library in the interpreter's process (docs/benchmarks.md).
"""

from __future__ import annotations

from .apply import (
    BINARY_MISSING,
    DEFAULT_LOCK_WAIT,
    DRIFT,
    NETNS,
    REJECTED,
    ROUTES,
    STATE,
    ApplyError,
    _routing_what,
    _Target,
    in_target,
)
from .executor import RealExecutor
from .logsink import get_logger
from .nftables import CHECK_SUFFIX, FAMILY, TABLES, base_chain, render_nft, tables_of
from .startup import TYPE_CHECKING

if TYPE_CHECKING:
    from typing import Any

    from .config import ApplyOptions
    from .executor import Completed, Executor
    from .netns import Netns
    from .ruleset import NftRules

log = get_logger(__name__)

OUR_TABLES = frozenset(TABLES.values())
_CHECK_TABLES = frozenset(t + CHECK_SUFFIX for t in OUR_TABLES)
# Planned chain name by nft name, per table, to find a base chain's expected type/hook/priority.
_PLANNED = {"prerouting": "PREROUTING", "output": "OUTPUT"}


def _nft() -> str:
    from .tools import find

    found = find("nft")
    if found is None:
        raise ApplyError(
            "nft: not found in PATH (--native-nftables needs the nft program of nftables)", 1, BINARY_MISSING
        )
    return found


class _Nft:
    """Runs nft in the target namespace (through apply._Target) and reads what it holds."""

    def __init__(self, target: _Target, binary: str) -> None:
        self.target = target
        self.binary = binary

    def tables(self) -> list[str]:
        """The names of the namespace's ``inet`` tables: from the kernel directly when commands
        run for real (no process), else from ``nft list tables``."""
        if isinstance(self.target.executor, RealExecutor):
            from . import netlink

            try:
                return netlink.nft_table_names(netlink.NFPROTO_INET)
            except netlink.NetlinkError as e:
                log.debug("cannot list the nf_tables tables over netlink: %s", e)
        res = self.run(["list", "tables", FAMILY])
        if not res.ok:
            raise ApplyError(f"nft list tables failed: {res.stderr.strip()}", 1, STATE)
        return [
            ln.split()[2]
            for ln in res.stdout.splitlines()
            if len(ln.split()) >= 3 and ln.split()[0] == "table"
        ]

    def run(self, args: list[str], doc: str | None = None) -> Completed:
        # nft resolves user and group names (skuid/skgid) while it reads the script.
        names = doc is not None and ("skuid" in doc or "skgid" in doc)
        return self.target.run_tool([self.binary, *args], doc, looks_up_names=names)

    def load(self, doc: str, what: str) -> None:
        """One transaction: ``nft -f -`` of ``doc``. Raises ApplyError with nft's own message."""
        log.info("%s with nft:\n%s", what, doc.rstrip())
        res = self.run(["-f", "-"], doc)
        if not res.ok:
            raise _nft_error(what, res, doc)

    def listing(self) -> list[dict[str, Any]]:
        """``nft -j list ruleset``: its table, chain and rule objects."""
        import json

        res = self.run(["-j", "list", "ruleset"])
        if not res.ok:
            raise ApplyError(f"nft list ruleset failed: {res.stderr.strip()}", 1, STATE)
        try:
            items = json.loads(res.stdout)["nftables"]
        except (ValueError, KeyError, TypeError) as e:
            raise ApplyError(f"nft list ruleset: unreadable output ({e})", 1, STATE) from None
        return [i for i in items if isinstance(i, dict)]

    def text(self, table: str) -> list[str]:
        """``nft list table inet TABLE`` rule lines, counters dropped (for messages)."""
        res = self.run(["list", "table", FAMILY, table])
        lines = []
        for ln in res.stdout.splitlines() if res.ok else ():
            ln = ln.strip()
            if ln and not ln.startswith(("table ", "}", "type ")):
                lines.append(_without_counter_values(ln))
        return lines


def _without_counter_values(line: str) -> str:
    words = line.split()
    out = []
    skip = 0
    for i, w in enumerate(words):
        if skip:
            skip -= 1
            continue
        if w == "packets" and i > 0 and words[i - 1] == "counter":
            skip = 3  # N bytes M
            continue
        out.append(w)
    return " ".join(out)


def _nft_error(what: str, res: Completed, doc: str) -> ApplyError:
    msg = "\n".join(ln for ln in res.stderr.splitlines() if not ln.startswith("nsexec: warning:")).strip()
    msg = msg or res.stdout.strip() or f"exit status {res.returncode}"
    detail = ""
    # nft names the line it refused: "/dev/stdin:12:5-10: Error: ..."
    for ln in msg.splitlines():
        head = ln.split(":", 3)
        if len(head) >= 3 and head[1].isdigit():
            n = int(head[1])
            lines = doc.splitlines()
            if 0 < n <= len(lines):
                detail = f"\nrejected line {n}: {lines[n - 1]}"
            break
    return ApplyError(f"{what}: nft -f failed (exit {res.returncode}): {msg}{detail}", 1, REJECTED)


# --- comparing what the namespace holds with what it should ------------------------------------


def _state(items: list[dict[str, Any]], names: set[str]) -> dict[str, dict[str, Any]]:
    """Per table in ``names``: chain name -> (base chain properties or None, rule expressions),
    handles and counter values left out; chains in the kernel's order, rules in chain order."""
    out: dict[str, dict[str, Any]] = {}
    for item in items:
        if "chain" in item:
            c = item["chain"]
            if c.get("family") == FAMILY and c.get("table") in names:
                props = (
                    (c.get("type"), c.get("hook"), c.get("prio"), c.get("policy")) if "hook" in c else None
                )
                out.setdefault(c["table"], {})[c["name"]] = [props, []]
        elif "rule" in item:
            r = item["rule"]
            if r.get("family") == FAMILY and r.get("table") in names:
                chains = out.setdefault(r["table"], {})
                chains.setdefault(r["chain"], [None, []])[1].append(_expr(r.get("expr")))
    return out


def _expr(value: Any) -> Any:
    """A rule's expression with the counters' values taken out (they change with traffic)."""
    if isinstance(value, list):
        return [_expr(v) for v in value]
    if isinstance(value, dict):
        if set(value) == {"counter"}:
            return {"counter": None}
        return {k: _expr(v) for k, v in value.items()}
    return value


def _expected_props(table: str, chain: str) -> tuple[Any, ...] | None:
    planned = next((t for t, name in TABLES.items() if name == table), None)
    spec = base_chain(planned, _PLANNED[chain]) if planned and chain in _PLANNED else None
    return None if spec is None else (spec[0], spec[1], spec[2], "accept")


def _differences(have: dict[str, Any], want_copy: dict[str, Any], table: str) -> list[str]:
    """What differs between our table ``table`` and the inert copy of the expected one."""
    lines: list[str] = []
    for chain in sorted(set(have) | set(want_copy)):
        where = f"{table}/{chain}"
        if chain not in want_copy:
            lines.append(f"{where}: chain present but not expected")
            continue
        if chain not in have:
            lines.append(f"{where}: chain missing")
            continue
        (h_props, h_rules), (_, w_rules) = have[chain], want_copy[chain]
        w_props = _expected_props(table, chain)
        if h_props != w_props:
            lines.append(f"{where}: chain is {_describe(h_props)}, expected {_describe(w_props)}")
        if h_rules != w_rules:
            lines.append(f"{where}: {len(h_rules)} rules, expected {len(w_rules)} (or in another order)")
    return lines


def _describe(props: tuple[Any, ...] | None) -> str:
    if props is None:
        return "a regular chain"
    kind, hook, prio, policy = props
    return f"type {kind} hook {hook} priority {prio} policy {policy}"


# --- apply --------------------------------------------------------------------------------------


def apply_nft(
    rules: NftRules,
    opts: ApplyOptions,
    executor: Executor | None = None,
    *,
    lock_wait: int = DEFAULT_LOCK_WAIT,
    netns: Netns | None = None,
) -> None:
    """Install ``rules`` in the target namespace (see the module docstring). Raises ApplyError.

    ``opts.cleanup_only`` removes ours instead; ``opts.skip_rule_apply`` and ``opts.dry_run`` do
    nothing. ``netns``: the target namespace already open; by default ``opts.network_namespace``.
    """
    if opts.dry_run:
        log.info("dry run: not applying rules")
        return
    if opts.cleanup_only:
        cleanup_nft(opts, executor, rules=rules, lock_wait=lock_wait, netns=netns)
        return
    if opts.skip_rule_apply:
        log.info("--skip-rule-apply: not applying rules")
        return
    binary = _nft()
    in_target(opts, executor, lock_wait, netns, lambda target: _apply(_Nft(target, binary), rules, opts))


def _apply(nft: _Nft, rules: NftRules, opts: ApplyOptions) -> None:
    present = nft.tables()
    ours = [t for t in present if t in OUR_TABLES]
    stale = [t for t in present if t in _CHECK_TABLES]
    script = render_nft(rules.rules)
    before: list[dict[str, Any]] | None = None
    if not ours and not stale:
        nft.load(script, "applying")
    else:
        before = _decide_and_load(nft, rules, opts, script, ours, stale)
    if rules.routes or rules.loopback_addresses:
        from . import routes  # deferred: only pods with routes or loopback addresses need it

        try:
            routes.apply_routes(rules.routes, rules.loopback_addresses, nft.target.route_netns)
        except routes.RoutesError as e:
            gone = nft.target.deleted_error()
            if gone is not None:
                raise gone from e
            _put_back(nft, before, tables_of(rules.rules))
            raise ApplyError(f"{_routing_what(rules)}: {e}", 1, ROUTES) from e
    gone = nft.target.deleted_error()
    if gone is not None:
        raise gone
    log.info("nftables rules are in place")


def _delete(tables: list[str]) -> str:
    # "add" first: deleting a table that is not there would fail the whole transaction.
    return "".join(f"add table {FAMILY} {t}\ndelete table {FAMILY} {t}\n" for t in tables)


def _decide_and_load(
    nft: _Nft, rules: NftRules, opts: ApplyOptions, script: str, ours: list[str], stale: list[str]
) -> list[dict[str, Any]] | None:
    """Our tables are there: compare, then load what the comparison calls for. Returns the state
    before (for a rollback) when ours were replaced, else None."""
    wanted = tables_of(rules.rules)
    copies = [t + CHECK_SUFFIX for t in wanted]
    nft.load(
        _delete(stale) + render_nft(rules.rules, suffix=CHECK_SUFFIX, hooks=False),
        "loading the expected rules",
    )
    listing = nft.listing()
    state = _state(listing, set(ours) | set(copies))
    differences: list[str] = []
    for table in sorted(set(ours) | set(wanted)):
        have = state.get(table, {})
        want = state.get(table + CHECK_SUFFIX, {})
        if table not in ours:
            differences.append(f"{table}: table missing")
        elif table not in wanted:
            differences.append(f"{table}: table present but not expected")
        else:
            differences += _differences(have, want, table)
    drop_copies = _delete(copies)
    if not differences and not opts.force_apply:
        log.info("nftables rules already in place (%s), nothing to do", ", ".join(ours))
        nft.load(drop_copies, "removing the inert copies")
        return None
    if differences and not (opts.reconcile or opts.force_apply):
        detail = _drift_detail(nft, ours, wanted)
        nft.load(drop_copies, "removing the inert copies")
        raise ApplyError(
            "nftables rules from an earlier, different configuration are in place (drift):\n  "
            + "\n  ".join(differences[:12] + detail)
            + "\nrun again with --reconcile (or --force-apply) to replace them,"
            + " or with --cleanup-only to remove them",
            1,
            DRIFT,
        )
    why = "drift, --reconcile" if differences and opts.reconcile else "--force-apply"
    log.info("replacing our nftables rules (%s): %s", why, "; ".join(differences) or "same rules")
    nft.load(drop_copies + _delete(ours) + script, "replacing our rules")
    return listing


def _drift_detail(nft: _Nft, ours: list[str], wanted: list[str]) -> list[str]:
    """The first rules that differ, as nft prints them (for the drift message)."""
    out: list[str] = []
    for table in ours:
        if table not in wanted:
            continue
        have, want = nft.text(table), nft.text(table + CHECK_SUFFIX)
        for i, (h, w) in enumerate(zip(have, want, strict=False)):
            if h != w:
                out.append(f"first difference in {table}, line {i + 1}: have {h!r}, expected {w!r}")
                break
        else:
            if len(have) != len(want):
                out.append(f"{table}: {len(have)} lines, expected {len(want)}")
    return out[:3]


def _put_back(nft: _Nft, before: list[dict[str, Any]] | None, tables: list[str]) -> None:
    """Undo this run's transaction (best effort): delete the tables it wrote and, when it replaced
    earlier ones, recreate those from their listing."""
    doc = _delete(tables)
    log.info("rolling back the nftables rules")
    try:
        nft.load(doc, "rolling back")
    except ApplyError as e:
        log.error("roll back failed: %s", e)
        return
    if before is None:
        return
    import json

    keep = [i for i in before if any(k in i for k in ("table", "chain", "rule"))]
    adds = []
    for item in keep:
        ((kind, body),) = item.items()
        if body.get("family") != FAMILY or (body.get("table", body.get("name")) not in OUR_TABLES):
            continue
        adds.append({"add": {kind: {k: v for k, v in body.items() if k != "handle"}}})
    res = nft.run(["-j", "-f", "-"], json.dumps({"nftables": adds}))
    if not res.ok:
        log.error("roll back failed: %s", res.stderr.strip())


# --- cleanup ------------------------------------------------------------------------------------


def cleanup_nft(
    opts: ApplyOptions,
    executor: Executor | None = None,
    *,
    rules: NftRules | None = None,
    lock_wait: int = DEFAULT_LOCK_WAIT,
    netns: Netns | None = None,
) -> None:
    """Delete our tables (and any inert copies an interrupted run left), in one transaction, and
    with ``rules`` its policy routes and loopback addresses. Other tables stay. Raises ApplyError."""
    if opts.dry_run:
        log.info("dry run: not removing rules")
        return
    binary = _nft()
    in_target(opts, executor, lock_wait, netns, lambda target: _cleanup(_Nft(target, binary), rules))


def _cleanup(nft: _Nft, rules: NftRules | None) -> None:
    present = [t for t in nft.tables() if t in OUR_TABLES or t in _CHECK_TABLES]
    if present:
        nft.load(_delete(present), "removing")
    else:
        log.info("no nftables rules of ours to remove")
    if rules is not None and (rules.routes or rules.loopback_addresses):
        from . import routes

        try:
            for item in routes.remove_routes(rules.routes, rules.loopback_addresses, nft.target.route_netns):
                log.info("removed %s", item)
        except routes.RoutesError as e:
            raise ApplyError(f"{_routing_what(rules)}: {e}", 1, ROUTES) from e
    gone = nft.target.deleted_error()
    if gone is not None:
        raise ApplyError(str(gone), 1, NETNS)
    log.info("cleanup done")
