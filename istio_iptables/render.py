"""Render planned rules as iptables-restore documents, in the layout Istio's own dry-run prints."""

from __future__ import annotations

from .ruleset import FamilyRules, Ruleset


def render_family(fr: FamilyRules) -> str:
    """One iptables-restore document (for ``--noflush``) holding every table of this family."""
    out: list[str] = []
    for table in fr.tables():
        out.append(f"* {table}")
        out.extend(f"-N {chain}" for chain in fr.new_chains(table))
        out.extend(r.restore_line() for r in fr.rules if r.table == table)
        out.append("COMMIT")
    return "".join(line + "\n" for line in out)


def render_dry_run(rs: Ruleset) -> str:
    """The ``--dry-run`` output: a marker line, then the document, for IPv4 and then IPv6."""
    return "".join(f"# {fr.family.restore_command}\n" + render_family(fr) for fr in rs.families)
