"""Our part of a namespace's iptables state, and the restore documents that change it.

Parses ``iptables-save`` output, picks out what this tool owns (the ISTIO_* chains, every rule in a
built-in chain that jumps to one, and the other built-in-chain rules a configuration adds), compares
it with what a configuration implies, and writes ``iptables-restore --noflush`` documents that move
from one state to another inside a single COMMIT per table. Pure functions: no I/O.

Comparing needs the expected rules in iptables-save's spelling (``--mark 0x539``, ``-m tcp``,
numeric owners...), which only the iptables binary itself produces. So the expected rules are
loaded as copies into check chains (``ISTIO_CHK_<chain>``) that nothing jumps to, which makes them
invisible to packets, read back with iptables-save, and removed in the COMMIT that follows.
"""

from __future__ import annotations

from .ruleset import BUILTIN_CHAINS, ISTIO_CHAINS
from .startup import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    import re
    from collections.abc import Callable, Iterable, Mapping

    from .ruleset import FamilyRules

OUR_CHAINS = frozenset(ISTIO_CHAINS)
CHECK_PREFIX = "ISTIO_CHK_"
_JUMP_FLAGS = frozenset({"-j", "--jump", "-g", "--goto"})
# Longest chain name iptables accepts.
MAX_CHAIN_NAME = 28


class Table:
    """One table of an iptables-save dump: chain policies and each chain's rule specifications.

    A rule specification is the text after ``-A CHAIN `` exactly as iptables-save prints it, which
    is also what ``-D CHAIN <spec>`` accepts.
    """

    __slots__ = ("chains", "rules")

    def __init__(
        self, chains: dict[str, str] | None = None, rules: dict[str, list[str]] | None = None
    ) -> None:
        self.chains: dict[str, str] = {} if chains is None else chains
        self.rules: dict[str, list[str]] = {} if rules is None else rules

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Table):
            return NotImplemented
        return self.chains == other.chains and self.rules == other.rules

    __hash__ = None  # type: ignore[assignment]  # mutable

    def __repr__(self) -> str:
        return f"Table(chains={self.chains!r}, rules={self.rules!r})"


State = dict[str, Table]
# (table, built-in chain) -> rule specifications, in iptables-save form
if TYPE_CHECKING:
    Known = Mapping[tuple[str, str], frozenset[str]]


def parse_save(text: str) -> State:
    """Parse iptables-save output (comments and counters ignored)."""
    state: State = {}
    table: Table | None = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("*"):
            table = state.setdefault(line[1:].strip(), Table())
        elif table is None or line == "COMMIT":
            continue
        elif line.startswith(":"):
            name, _, rest = line[1:].partition(" ")
            table.chains[name] = rest.split(" ", 1)[0] if rest else "-"
            table.rules.setdefault(name, [])
        elif line.startswith("-A "):
            chain, _, spec = line[3:].partition(" ")
            table.rules.setdefault(chain, []).append(" ".join(spec.split()))
    return state


def jump_target(spec: str) -> str | None:
    """The chain or target a rule specification jumps or goes to, if any."""
    import shlex  # deferred: a fresh namespace has no rules to read

    try:
        tokens = shlex.split(spec)
    except ValueError:
        tokens = spec.split()
    for i, tok in enumerate(tokens[:-1]):
        if tok in _JUMP_FLAGS:
            return tokens[i + 1]
    return None


def holds_rules(state: State) -> bool:
    """True when a dump shows anything beyond empty built-in chains with ACCEPT policies."""
    for table in state.values():
        for chain, policy in table.chains.items():
            if chain not in BUILTIN_CHAINS or policy not in ("ACCEPT", "-"):
                return True
        if any(table.rules.values()):
            return True
    return False


class Ours:
    """What this tool owns in one family's state.

    ``chains``: table -> ISTIO chain -> its rule specifications, in order.
    ``builtin``: table -> built-in chain -> (0-based index in that chain, specification) of our rules.
    """

    __slots__ = ("chains", "builtin")

    def __init__(
        self,
        chains: dict[str, dict[str, tuple[str, ...]]] | None = None,
        builtin: dict[str, dict[str, tuple[tuple[int, str], ...]]] | None = None,
    ) -> None:
        self.chains: dict[str, dict[str, tuple[str, ...]]] = {} if chains is None else chains
        self.builtin: dict[str, dict[str, tuple[tuple[int, str], ...]]] = {} if builtin is None else builtin

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Ours):
            return NotImplemented
        return self.chains == other.chains and self.builtin == other.builtin

    __hash__ = None  # type: ignore[assignment]  # holds dicts

    def __repr__(self) -> str:
        return f"Ours(chains={self.chains!r}, builtin={self.builtin!r})"

    @property
    def empty(self) -> bool:
        return not any(self.chains.values()) and not any(self.builtin.values())

    def view(self) -> dict[str, dict[str, tuple[str, ...]]]:
        """Table -> chain -> our specifications, ignoring where foreign rules sit between ours."""
        out: dict[str, dict[str, tuple[str, ...]]] = {}
        for table, chains in self.chains.items():
            out.setdefault(table, {}).update(chains)
        for table, builtin in self.builtin.items():
            for chain, items in builtin.items():
                if items:
                    out.setdefault(table, {})[chain] = tuple(spec for _, spec in items)
        return {t: c for t, c in out.items() if c}

    def known(self) -> dict[tuple[str, str], frozenset[str]]:
        """Our built-in-chain rules that do not jump to an ISTIO chain, for recognising them elsewhere."""
        return {
            (table, chain): frozenset(spec for _, spec in items if jump_target(spec) not in OUR_CHAINS)
            for table, builtin in self.builtin.items()
            for chain, items in builtin.items()
        }

    def summary(self) -> str:
        n_chains = sum(len(c) for c in self.chains.values())
        n_rules = sum(len(r) for c in self.chains.values() for r in c.values())
        n_rules += sum(len(i) for b in self.builtin.values() for i in b.values())
        return f"{n_chains} chains, {n_rules} rules"


def find_ours(state: State, known: Known | None = None) -> Ours:
    """Our part of ``state``: ISTIO chains, jumps into them, and built-in rules listed in ``known``."""
    known = known or {}
    chains: dict[str, dict[str, tuple[str, ...]]] = {}
    builtin: dict[str, dict[str, tuple[tuple[int, str], ...]]] = {}
    for tname, table in state.items():
        ours_here = {c: tuple(table.rules.get(c, ())) for c in table.chains if c in OUR_CHAINS}
        if ours_here:
            chains[tname] = ours_here
        for chain, specs in table.rules.items():
            if chain not in BUILTIN_CHAINS:
                continue
            extra = known.get((tname, chain), frozenset())
            mine = tuple((i, s) for i, s in enumerate(specs) if jump_target(s) in OUR_CHAINS or s in extra)
            if mine:
                builtin.setdefault(tname, {})[chain] = mine
    return Ours(chains, builtin)


def everything_ours(state: State) -> Ours:
    """The Ours of a scratch namespace that holds nothing but our rules."""
    known = {
        (tname, chain): frozenset(specs)
        for tname, table in state.items()
        for chain, specs in table.rules.items()
        if chain in BUILTIN_CHAINS
    }
    return find_ours(state, known)


def needs_known(state: State, tables: Iterable[tuple[str, str]]) -> bool:
    """True when ``state`` has rules in any of these (table, built-in chain) pairs."""
    return any(state.get(t, Table()).rules.get(c) for t, c in tables)


def check_name(chain: str) -> str:
    """The check chain that holds the copy of ``chain``'s expected rules."""
    name = CHECK_PREFIX + chain
    if len(name) > MAX_CHAIN_NAME:
        import hashlib

        name = CHECK_PREFIX + hashlib.sha1(chain.encode()).hexdigest()[: MAX_CHAIN_NAME - len(CHECK_PREFIX)]
    return name


def is_check(chain: str) -> bool:
    return chain.startswith(CHECK_PREFIX)


def check_chains(state: State) -> dict[str, list[str]]:
    """Table -> check chains present (left over by an interrupted run, or loaded by this one)."""
    out = {t: [c for c in table.chains if is_check(c)] for t, table in state.items()}
    return {t: cs for t, cs in out.items() if cs}


def without_checks(state: State) -> State:
    out: State = {}
    for tname, table in state.items():
        out[tname] = Table(
            {c: p for c, p in table.chains.items() if not is_check(c)},
            {c: r for c, r in table.rules.items() if not is_check(c)},
        )
    return out


def _rewrite_targets(tokens: list[str], names: Mapping[str, str]) -> list[str]:
    out = list(tokens)
    for i in range(len(out) - 1):
        if out[i] in _JUMP_FLAGS and out[i + 1] in names:
            out[i + 1] = names[out[i + 1]]
    return out


class CheckLoad(NamedTuple):
    """A document that loads check copies of expected rules, and what each of its lines came from."""

    document: str
    origins: list[str | None]
    names: dict[tuple[str, str], str]


def check_document(
    sections: Mapping[str, Section],
    stale: Mapping[str, Iterable[str]] | None = None,
    only: Callable[[str, str], bool] | None = None,
) -> CheckLoad:
    """Copies of the expected rules into check chains, one per chain that holds or receives rules.

    ``stale``: check chains already present, removed first. ``only(table, line)``: copy just the
    rule lines it accepts (the others, and chains they would need, are left out).
    """
    stale = stale or {}
    out: list[str] = []
    origins: list[str | None] = []
    names: dict[tuple[str, str], str] = {}

    def emit(line: str, origin: str | None = None) -> None:
        out.append(line)
        origins.append(origin)

    for table in sorted(set(sections) | set(stale)):
        sec = sections.get(table, Section())
        lines = [ln for ln in sec.lines if only is None or only(table, ln)]
        chains: dict[str, str] = {}
        for c in sec.chains:
            chains[c] = check_name(c)
        for ln in lines:
            chain = ln.split()[1]
            chains.setdefault(chain, check_name(chain))
        old = list(stale.get(table, ()))
        if not chains and not old:
            continue
        emit(f"*{table}")
        for c in old:
            emit(f"-F {c}")
        for c in old:
            if c not in chains.values():
                emit(f"-X {c}")
        for c in chains.values():
            if c not in old:
                emit(f"-N {c}")
        for ln in lines:
            tokens = ln.split()
            tokens[1] = chains[tokens[1]]
            emit(" ".join(_rewrite_targets(tokens, chains)), ln)
        emit("COMMIT")
        names.update({(table, orig): chk for orig, chk in chains.items()})
    return CheckLoad("".join(line + "\n" for line in out), origins, names)


_CHECK_TARGET: re.Pattern[str] | None = None


def _check_target() -> re.Pattern[str]:
    """Matches a jump to a check chain (compiled on first use: only re-runs compare rules)."""
    global _CHECK_TARGET
    if _CHECK_TARGET is None:
        import re

        _CHECK_TARGET = re.compile(r"(?<=-j |-g )" + CHECK_PREFIX + r"\S+")
    return _CHECK_TARGET


def _renamer(back: Mapping[str, str]) -> Callable[[re.Match[str]], str]:
    def rename(m: re.Match[str]) -> str:
        return back.get(m.group(0), m.group(0))

    return rename


def expected_from_checks(state: State, names: Mapping[tuple[str, str], str]) -> Ours:
    """What the check chains in ``state`` say our rules look like, under their real names."""
    chains: dict[str, dict[str, tuple[str, ...]]] = {}
    builtin: dict[str, dict[str, tuple[tuple[int, str], ...]]] = {}
    for (table, orig), chk in names.items():
        specs = state.get(table, Table()).rules.get(chk, [])
        rename = _renamer({chk: orig for (t, orig), chk in names.items() if t == table})
        pattern = _check_target()
        real = tuple(pattern.sub(rename, s) for s in specs)
        if orig in BUILTIN_CHAINS:
            if real:
                builtin.setdefault(table, {})[orig] = tuple(enumerate(real))
        else:
            chains.setdefault(table, {})[orig] = real
    return Ours(chains, builtin)


def missing_tables(current: Ours, expected: Ours) -> list[str] | None:
    """The tables ``expected`` has that ``current`` lacks entirely, when every table ``current``
    does have is exactly as expected; None when any differs.

    That is what a run of the same configuration leaves when it is killed (or fails) between two
    tables' COMMITs: each table is committed whole or not at all, so our rules from an identical
    configuration are either complete or absent per table. Completing them is not drift.
    """
    cur, exp = current.view(), expected.view()
    if any(exp.get(table) != chains for table, chains in cur.items()):
        return None
    return sorted(t for t in exp if t not in cur)


def describe_drift(current: Ours, expected: Ours, limit: int = 12) -> list[str]:
    """Human-readable differences between our rules in place and the expected ones (empty: none)."""
    cur, exp = current.view(), expected.view()
    lines: list[str] = []
    for table in sorted(set(cur) | set(exp)):
        c_chains, e_chains = cur.get(table, {}), exp.get(table, {})
        for chain in sorted(set(c_chains) | set(e_chains)):
            have, want = c_chains.get(chain), e_chains.get(chain)
            if have == want:
                continue
            where = f"{table}/{chain}"
            if want is None and chain in OUR_CHAINS:
                lines.append(f"{where}: chain present but not expected")
            elif have is None and chain in OUR_CHAINS:
                lines.append(f"{where}: chain missing")
            from collections import Counter  # only when rules differ

            missing = list((Counter(want or ()) - Counter(have or ())).elements())
            extra = list((Counter(have or ()) - Counter(want or ())).elements())
            lines.extend(f"{where}: missing   -A {chain} {s}" for s in missing)
            lines.extend(f"{where}: unexpected -A {chain} {s}" for s in extra)
            if not missing and not extra and have and want:
                lines.append(f"{where}: same rules in a different order")
    if len(lines) > limit:
        lines = lines[:limit] + [f"... and {len(lines) - limit} more differences"]
    return lines


class Section:
    """What one table should hold afterwards: chains to exist and the rule lines that fill them."""

    __slots__ = ("chains", "lines")

    def __init__(self, chains: list[str] | None = None, lines: list[str] | None = None) -> None:
        self.chains: list[str] = [] if chains is None else chains
        self.lines: list[str] = [] if lines is None else lines

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Section):
            return NotImplemented
        return self.chains == other.chains and self.lines == other.lines

    __hash__ = None  # type: ignore[assignment]  # mutable

    def __repr__(self) -> str:
        return f"Section(chains={self.chains!r}, lines={self.lines!r})"


def planned_sections(fr: FamilyRules) -> dict[str, Section]:
    """What each table of a planned family should hold, as the rendered document says it (the
    chains it creates, its rule lines): the same values ``parse_restore(render_family(fr))`` gives,
    taken from the rules themselves."""
    return {t: Section(fr.new_chains(t), [r.restore_line() for r in fr.rules_of(t)]) for t in fr.tables()}


def parse_restore(doc: str) -> dict[str, Section]:
    """Split a rendered restore document into its tables' chain creations and rule lines."""
    sections: dict[str, Section] = {}
    cur: Section | None = None
    for raw in doc.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("*"):
            cur = sections.setdefault(line[1:].strip(), Section())
        elif cur is None or line == "COMMIT":
            continue
        elif line.startswith("-N "):
            cur.chains.append(line[3:].strip())
        elif line.startswith(":"):
            name = line[1:].split(" ", 1)[0]
            if name not in BUILTIN_CHAINS:
                cur.chains.append(name)
        else:
            cur.lines.append(line)
    return sections


def transition(
    current: Ours, target: Mapping[str, Section], checks: Mapping[str, Iterable[str]] | None = None
) -> str:
    """A document that removes ``current`` (and the ``checks`` chains) and installs ``target``.

    Removal and installation share each table's COMMIT, so the kernel never sees a table without
    our rules in between. Foreign rules are never named, so they stay as they are.
    """
    checks = checks or {}
    out: list[str] = []
    for table in sorted(set(current.chains) | set(current.builtin) | set(target) | set(checks)):
        have = current.chains.get(table, {})
        want = target.get(table, Section())
        chk = list(checks.get(table, ()))
        body: list[str] = [f"-F {c}" for c in chk] + [f"-X {c}" for c in chk]
        for chain, items in current.builtin.get(table, {}).items():
            body.extend(f"-D {chain} {spec}" for _, spec in items)
        body.extend(f"-F {c}" for c in have)
        body.extend(f"-X {c}" for c in have if c not in want.chains)
        body.extend(f"-N {c}" for c in want.chains if c not in have)
        body.extend(want.lines)
        if body:
            out += [f"*{table}", *body, "COMMIT"]
    return "".join(line + "\n" for line in out)


def _multiset_minus(a: list[str], b: list[str]) -> list[tuple[int, str]]:
    """Items of ``a`` (with their indexes) left after taking away one occurrence per item of ``b``."""
    left: dict[str, int] = {}
    for s in b:
        left[s] = left.get(s, 0) + 1
    out: list[tuple[int, str]] = []
    for i, s in enumerate(a):
        if left.get(s):
            left[s] -= 1
        else:
            out.append((i, s))
    return out


def revert(before: State, after: State, known: Known | None = None) -> str:
    """A document that puts our part of ``after`` back the way it was in ``before``.

    Built-in chains: our rules added since (jumps to an ISTIO chain, and the plain rules listed in
    ``known``) are deleted and ours removed since are inserted back at their old positions; rules
    of others, whenever they came or went, are never named. ``known`` None: our plain rules could
    not be told apart, so every rule added or removed since counts as ours. ISTIO chains: reset to
    their old contents, created or deleted as needed. Empty when nothing of ours changed.
    """
    out: list[str] = []
    for tname in sorted(set(before) | set(after)):
        b, a = before.get(tname, Table()), after.get(tname, Table())
        deletes: list[str] = []
        inserts: list[str] = []
        for chain in sorted(BUILTIN_CHAINS):
            b_specs, a_specs = b.rules.get(chain, []), a.rules.get(chain, [])
            if b_specs == a_specs:
                continue
            plain = None if known is None else known.get((tname, chain), frozenset())

            def mine(spec: str, plain: frozenset[str] | None = plain) -> bool:
                return plain is None or spec in plain or jump_target(spec) in OUR_CHAINS

            deletes.extend(f"-D {chain} {s}" for _, s in _multiset_minus(a_specs, b_specs) if mine(s))
            inserts.extend(
                f"-I {chain} {i + 1} {s}" for i, s in _multiset_minus(b_specs, a_specs) if mine(s)
            )
        b_ours = {c: b.rules.get(c, []) for c in b.chains if c in OUR_CHAINS or is_check(c)}
        a_ours = {c: a.rules.get(c, []) for c in a.chains if c in OUR_CHAINS or is_check(c)}
        changed = [c for c in a_ours if c in b_ours and a_ours[c] != b_ours[c]]
        body = deletes
        # Check chains first: they may jump to the ISTIO chains deleted below.
        a_order = sorted(a_ours, key=lambda c: not is_check(c))
        body += [f"-F {c}" for c in a_order if c not in b_ours or c in changed]
        body += [f"-X {c}" for c in a_order if c not in b_ours]
        body += [f"-N {c}" for c in b_ours if c not in a_ours]
        for c in b_ours:
            if c not in a_ours or c in changed:
                body += [f"-A {c} {s}" for s in b_ours[c]]
        body += inserts
        if body:
            out += [f"*{tname}", *body, "COMMIT"]
    return "".join(line + "\n" for line in out)
