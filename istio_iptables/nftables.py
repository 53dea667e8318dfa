"""Render planned rules (``planner.plan_nft``) as the script Istio feeds to ``nft -f``.

Istio's native nftables layout: up to three ``inet`` tables (``istio-proxy-nat``,
``istio-proxy-mangle``, ``istio-proxy-raw``), each written ``add table``, ``flush table``, its
chains that hold rules (in a fixed order; base chains with their type, hook and numeric priority),
then its rules in planning order. A table without rules is not written at all.

Where nftables differs from iptables in how an insert lands, it is handled here and only here:
iptables inserts at a 1-based position (``-I CHAIN 1``), nft before the rule at a 0-based index;
and nft refuses an insert into an empty chain or at an index past its end, which Istio then
turns into an append.
"""

from __future__ import annotations

from .startup import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Iterable

    from .ruleset import Rule

FAMILY = "inet"
# Our tables by the iptables table their rules are planned in, in the order Istio writes them.
TABLES = {"nat": "istio-proxy-nat", "mangle": "istio-proxy-mangle", "raw": "istio-proxy-raw"}
# A table of the same name with this suffix holds inert copies (no hooks) while a run compares.
CHECK_SUFFIX = "-check"

# Per table, Istio's chains in the order it declares them. Base chains: (type, hook, priority);
# priorities as numbers (nft 1.0.6 does not take the name "dstnat" on the nat output hook).
_BASE = {
    "nat": {"PREROUTING": ("nat", "prerouting", -100), "OUTPUT": ("nat", "output", -100)},
    "mangle": {"PREROUTING": ("filter", "prerouting", -150), "OUTPUT": ("route", "output", -150)},
    "raw": {"PREROUTING": ("filter", "prerouting", -300), "OUTPUT": ("filter", "output", -300)},
}
_REGULAR = {
    "nat": ("ISTIO_INBOUND", "ISTIO_REDIRECT", "ISTIO_IN_REDIRECT", "ISTIO_OUTPUT", "ISTIO_OUTPUT_DNS"),
    "mangle": ("ISTIO_DIVERT", "ISTIO_TPROXY", "ISTIO_INBOUND", "ISTIO_DROP"),
    "raw": ("ISTIO_INBOUND", "ISTIO_OUTPUT_DNS"),
}


def chain_name(chain: str) -> str:
    """The nft name of a planned chain: ``OUTPUT`` -> ``output``, ``ISTIO_IN_REDIRECT`` ->
    ``istio-in-redirect``."""
    return chain.lower().replace("_", "-")


def base_chain(table: str, chain: str) -> tuple[str, str, int] | None:
    """(type, hook, priority) of a base chain of ``table`` (planned names), else None."""
    return _BASE[table].get(chain)


def render_nft(rules: Iterable[Rule], *, suffix: str = "", hooks: bool = True) -> str:
    """The ``nft -f`` script for ``rules``. ``suffix`` renames the tables; ``hooks=False`` declares
    base chains as regular ones, which no packet ever traverses (the inert copies a run compares
    with what a namespace holds)."""
    by_table: dict[str, list[Rule]] = {t: [] for t in TABLES}
    for r in rules:
        by_table[r.table].append(r)
    out: list[str] = []
    for table, name in TABLES.items():
        planned = by_table[table]
        if not planned:
            continue
        full = f"{FAMILY} {name}{suffix}"
        used = {r.chain for r in planned}
        out += [f"add table {full}", f"flush table {full}"]
        for chain, (kind, hook, priority) in _BASE[table].items():
            if chain in used:
                spec = f" {{ type {kind} hook {hook} priority {priority} ; }}" if hooks else ""
                out.append(f"add chain {full} {chain_name(chain)}{spec}")
        out += [f"add chain {full} {chain_name(c)}" for c in _REGULAR[table] if c in used]
        count: dict[str, int] = {}
        for r in planned:
            chain = chain_name(r.chain)
            n = count.get(chain, 0)
            index = None if r.position is None else r.position - 1
            if index is None or n == 0 or index >= n:
                out.append(f"add rule {full} {chain} {r.nft}")
            else:
                out.append(f"insert rule {full} {chain} index {index} {r.nft}")
            count[chain] = n + 1
    return "".join(line + "\n" for line in out)


def render_dry_run_nft(rules: Iterable[Rule]) -> str:
    """The ``--native-nftables --dry-run`` output: a marker line, then the script."""
    return "# nft -f\n" + render_nft(rules)


def tables_of(rules: Iterable[Rule]) -> list[str]:
    """Our table names that ``rules`` fill, in Istio's order."""
    used = {r.table for r in rules}
    return [name for table, name in TABLES.items() if table in used]
