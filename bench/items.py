"""The measurements. ``Bench`` owns the set-up (TLS API server, kubeconfig, namespaces, the
rendered classic rules) and runs the items; per-repetition items run interleaved, one repetition
of each per round, so a noisy machine slows all of them alike and their ratios hold."""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import json
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from istio_iptables.config import CidrSpec, Config, PortSpec
from istio_iptables.nftables import render_dry_run_nft, render_nft
from istio_iptables.planner import plan, plan_nft
from istio_iptables.render import render_dry_run, render_family
from istio_iptables.ruleset import Ruleset
from tests.support import apiserver
from tests.support.netns import Namespaces
from tests.support.pki import make_pki

from . import fixtures, proc, rules
from .connrate import ConnRate
from .floor import write_floor
from .stats import summary

CLASSIC_ARGS = ["-p", "15001", "-z", "15006", "-u", "1337", "-m", "REDIRECT",
                "-i", "*", "-x", "", "-b", "*", "-d", "15090,15021,15020"]  # fmt: skip
INIT_ARGS = [*CLASSIC_ARGS, "--dual-stack", "--enable-ipv6"]
# The pod's address for the injector's command line, which has IPv6 detected from the namespace.
POD_ADDRESS = "10.244.0.5/24"


def injector_args(repo: Path) -> list[str]:
    """istio-init's arguments exactly as deploy/examples/meshed-pod-init.yaml gives them."""
    import yaml

    pod = yaml.safe_load((repo / "deploy" / "examples" / "meshed-pod-init.yaml").read_text())
    (init,) = [c for c in pod["spec"]["initContainers"] if c["name"] == "istio-init"]
    return [str(a) for a in init["args"]]


CLASSIC = Config(
    proxy_port=15001,
    inbound_capture_port=15006,
    proxy_uids=("1337",),
    inbound_ports=PortSpec(wildcard=True),
    inbound_ports_exclude=(15090, 15021, 15020),
    outbound_ip_ranges_include=CidrSpec(wildcard=True),
    enable_ipv6=True,
)
SAVES = ("iptables-legacy-save", "iptables-nft-save", "ip6tables-legacy-save", "ip6tables-nft-save")
CIDR_COUNT = 1000
SCALE_CIDRS = 10_000
SCALE_PORTS = 1_000
TIMEOUT = 60.0
_IMPORTTIME = re.compile(r"import time:\s+(\d+) \|\s+(\d+) \|( *)(\S+)")

ITEMS = ("floor", "cni", "init", "old_way", "concurrency", "scale", "nft", "connrate", "nftlib", "cri")
# The system interpreter, which Debian's python3-nftables is installed for (item nftlib).
SYSTEM_PYTHON = "/usr/bin/python3"
NFTLOAD = Path(__file__).resolve().parent / "nftload.py"


@dataclass
class Series:
    """Repetitions of one measurement: times, peak RSS, CPU time, and why any failed."""

    seconds: list[float] = field(default_factory=list)
    rss_kib: list[int] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        out = summary(self.seconds, self.rss_kib, len(self.failures))
        if self.failures:
            out["failure_reasons"] = sorted(set(self.failures))[:5]
        return out

    @property
    def median(self) -> float | None:
        return statistics.median(self.seconds) if self.seconds else None


class Bench:
    def __init__(
        self, repo: Path, *, reps: int, concurrency: int, quick: bool, items: tuple[str, ...]
    ) -> None:
        self.repo = repo
        self.reps = reps
        self.concurrency = concurrency
        self.quick = quick
        self.items = items
        self.python = sys.executable
        self.venv_bin = Path(sys.executable).parent
        self.ns = Namespaces()
        self.series: dict[str, Series] = {}
        self.values: dict[str, list[float]] = {}
        self.status: dict[str, dict[str, Any]] = {}
        self.info: dict[str, Any] = {}
        self.work = Path(tempfile.mkdtemp(prefix="istio-bench-"))
        self.server: subprocess.Popen[bytes] | None = None
        self.cni_reference: dict[str, Any] | None = None
        self.cni_nft_reference: list[str] | None = None
        self.nft_reference: list[str] | None = None
        self.nftables_site: str | None = None
        self.connrate: dict[str, Any] | None = None
        # In-process figures of the nftlib runs (ms, and KiB for the peak RSS), by series.
        self.nftlib_values: dict[str, list[float]] = {}
        self._nftlib_runs = 0
        self.zipapp: Path | None = None
        self.selfcontained: Path | None = None  # the installed launcher of the self-contained plugin
        self.selfcontained_dir: Path | None = None  # its bin dir (outside work: a short path)
        self.nsexec = repo / "istio_iptables" / "nsexec.py"
        self.mode = "time"
        self._pods = 0
        self._rss_count = 0
        self.rss_wrapper, self.rss_divisor = _rss_wrapper()
        if not self.rss_wrapper:
            self.info["rss_unavailable"] = "neither GNU time nor busybox is installed"

    # ---------------------------------------------------------------- set-up and tear-down

    def setup(self) -> None:
        # Bytecode beside every module, as an installed package has it (pip compiles on install):
        # otherwise a run under PYTHONDONTWRITEBYTECODE would time the compiler, not the start.
        subprocess.run(
            [self.python, "-m", "compileall", "-q", "istio_iptables", "cni"], cwd=self.repo, check=True
        )
        pki = make_pki(self.work / "pki")
        ca = pki.ca_cert
        self.token = fixtures.new_token()
        cidr_pod = fixtures.meshed_pod(
            "pod-cidrs", {fixtures.CIDRS_ANNOTATION: ",".join(fixtures.excluded_cidrs(CIDR_COUNT))}
        )
        pods = {"default": fixtures.meshed_pod("default"), "pod-cidrs": cidr_pod}
        self.server, port = apiserver.spawn(
            pki, self.token, pods, self.work, python=self.python, timeout=20, start_new_session=True
        )
        self.server_url = f"https://127.0.0.1:{port}"
        self.kubeconfig = self.work / "istio-cni.kubeconfig"
        fixtures.write_kubeconfig(self.kubeconfig, self.server_url, ca, self.token)
        self.kubeconfig_kubectl = self.work / "kubectl.kubeconfig"
        fixtures.write_kubectl_kubeconfig(self.kubeconfig_kubectl, self.server_url, ca, self.token)
        self.info["kubeconfig"] = fixtures.KUBECONFIG_SOURCE

        self.classic: Ruleset = plan(CLASSIC)
        assert self.classic.v6 is not None
        self.doc4 = render_family(self.classic.v4)
        self.doc6 = render_family(self.classic.v6)
        self.floor_script = write_floor(self.work / "floor_add.py", self.doc4, self.doc6)
        self.old_way_script = self._write_old_way(self.work / "old_way.sh")
        self.cni_path = f"/opt/cni/bin:{self.venv_bin}"

        # The classic rules as the kernel holds them after a plain restore: the reference that the
        # floor, the init container and the per-rule way must each reproduce exactly.
        (name,) = self.ns.create(1)
        try:
            for cmd, doc in (("iptables-restore", self.doc4), ("ip6tables-restore", self.doc6)):
                r = proc.run(self._nsenter(name, cmd, "--noflush"), stdin=doc.encode())
                if not r.ok:
                    raise RuntimeError(f"cannot load the classic rules: {r.describe()}")
            self.reference = rules.dump(Namespaces.path(name))
        finally:
            self.ns.delete([name])
        # The same rules for IPv4 only: what an IPv4 pod gets from the injector's command line.
        self.reference_v4 = {**self.reference, "v6": {}}
        self.injector_args = injector_args(self.repo)
        self.info["injector_args"] = self.injector_args
        self.info["classic_rule_lines"] = rules.rule_count(self.reference)

        # The classic rules for native nftables, as the kernel holds them after a plain nft -f.
        self.nft_doc = render_nft(plan_nft(CLASSIC).rules)
        if {"nft", "nftlib"} & set(self.items) and shutil.which("nft"):
            (name,) = self.ns.create(1)
            try:
                r = proc.run(self._nsenter(name, "nft", "-f", "-"), stdin=self.nft_doc.encode())
                if not r.ok:
                    raise RuntimeError(f"cannot load the classic nftables rules: {r.describe()}")
                self.nft_reference = rules.nft_dump(Namespaces.path(name))
            finally:
                self.ns.delete([name])
            self.info["classic_nft_rule_lines"] = rules.nft_rule_count(self.nft_reference)

    def teardown(self) -> None:
        proc.kill_all()
        if self.server is not None and self.server.poll() is None:
            self.server.terminate()
            try:
                self.server.wait(5)
            except subprocess.TimeoutExpired:
                self.server.kill()
                self.server.wait()
        self.ns.delete_all()
        shutil.rmtree(self.work, ignore_errors=True)
        if self.selfcontained_dir is not None:
            shutil.rmtree(self.selfcontained_dir, ignore_errors=True)

    # ---------------------------------------------------------------- helpers

    @staticmethod
    def _nsenter(name: str, *argv: str) -> list[str]:
        return ["nsenter", f"--net={Namespaces.path(name)}", "--", *argv]

    def s(self, key: str) -> Series:
        return self.series.setdefault(key, Series())

    def _write_old_way(self, path: Path) -> Path:
        """The early shell way: one iptables/ip6tables process per chain and per rule."""
        lines = ["set -e"]
        calls = 0
        for fr in self.classic.families:
            cmd = fr.family.iptables_command
            for table in fr.tables():
                for chain in fr.new_chains(table):
                    lines.append(shlex.join([cmd, "-t", table, "-N", chain]))
                    calls += 1
            for r in fr.rules:
                head = ["-A", r.chain] if r.position is None else ["-I", r.chain, str(r.position)]
                lines.append(shlex.join([cmd, "-t", r.table, *head, *r.spec]))
                calls += 1
        path.write_text("\n".join(lines) + "\n")
        self.info["old_way_calls"] = calls
        return path

    def _cni_run(
        self,
        command: str,
        name: str,
        pod: str,
        cid: str,
        *,
        exe: list[str] | None = None,
        log_level: str = "info",
        native_nftables: bool = False,
        kubeconfig: Path | None = None,
    ) -> proc.Result:
        path = Namespaces.path(name)
        conf = fixtures.cni_config(
            kubeconfig or self.kubeconfig, path, log_level=log_level, native_nftables=native_nftables
        )
        env = fixtures.cni_env(command, path, pod, cid, self.cni_path)
        argv = exe or [str(self.venv_bin / "istio-cni")]
        return self._run(argv, stdin=json.dumps(conf).encode(), env=env)

    @staticmethod
    def _cni_result_ok(r: proc.Result) -> str:
        """Why a CNI ADD/CHECK/DEL result is not a success ('' when it is)."""
        if not r.ok:
            return r.describe()
        out = r.stdout.strip()
        if not out:
            return ""
        try:
            doc = json.loads(out)
        except ValueError:
            return f"stdout is not JSON: {out[:200]!r}"
        if isinstance(doc, dict) and "code" in doc and "msg" in doc:
            return f"CNI error {doc['code']}: {doc['msg']}"
        return ""

    def _check_rules(self, name: str, expected: dict[str, Any] | None) -> str:
        try:
            got = rules.dump(Namespaces.path(name))
        except RuntimeError as e:
            return str(e)
        if expected is None:
            return "" if rules.has_capture(got) else "the namespace lacks the capture chains in both families"
        return rules.difference(expected, got)

    def _check_nft(self, name: str, expected: list[str] | None) -> str:
        """'' when the namespace's nf_tables ruleset is ``expected`` (or, with None, holds our nat
        table); else why not."""
        try:
            got = rules.nft_dump(Namespaces.path(name))
        except RuntimeError as e:
            return str(e)
        if expected is None:
            ours = "table inet istio-proxy-nat {" in got
            return "" if ours else "the namespace lacks table inet istio-proxy-nat"
        return rules.nft_difference(expected, got)

    def available(self, item: str) -> str:
        """'' when the item can run; otherwise why not."""
        if item in ("cni", "cni_zipapp", "cni_selfcontained", "cni_kubectl", "concurrency", "scale_add"):
            if importlib.util.find_spec("cni.plugin") is None:
                return "cni/plugin.py does not exist yet"
            if not (self.venv_bin / "istio-cni").exists():
                return f"{self.venv_bin / 'istio-cni'} is not installed"
        if item in ("nft_cni", "nft_init", "nftlib") and not shutil.which("nft"):
            return "nft (nftables) is not installed"
        if item == "nft_cni":
            return self.available("cni")
        if item == "nft_init":
            return self.available("init")
        if item == "nftlib":
            return self._find_nftables_binding()
        if item == "init_injector":
            return self.available("init")
        if item == "init":
            for mod in ("istio_iptables.cli", "istio_iptables.apply"):
                if importlib.util.find_spec(mod) is None:
                    return f"{mod.replace('.', '/')}.py does not exist yet"
            if not (self.venv_bin / "istio-iptables").exists():
                return f"{self.venv_bin / 'istio-iptables'} is not installed"
        return ""

    def _find_nftables_binding(self) -> str:
        """Where the system interpreter finds python3-nftables ('' when found, else why not)."""
        if self.nftables_site is not None:
            return ""
        if not os.access(SYSTEM_PYTHON, os.X_OK):
            return f"{SYSTEM_PYTHON} does not exist"
        where = "import nftables, os; print(os.path.dirname(os.path.dirname(nftables.__file__)))"
        r = proc.run([SYSTEM_PYTHON, "-c", where])
        if not r.ok:
            return f"python3-nftables is not installed for {SYSTEM_PYTHON} (apt-get install python3-nftables)"
        self.nftables_site = r.stdout.decode().strip()
        self.info["nftables_binding"] = self.nftables_site
        return ""

    def build_zipapp(self) -> str:
        """Builds the single-file plugin that install-cni puts on a node (cni/bundle.py), with this
        interpreter in its shebang; '' or why not."""
        if importlib.util.find_spec("cni.bundle") is None:
            return "cni/bundle.py does not exist yet"
        import cni.bundle as bundle

        build = getattr(bundle, "build_archive", None)
        if build is None:
            return "cni/bundle.py has no build_archive()"
        target = self.work / "zipapp" / "istio-cni"
        target.parent.mkdir(exist_ok=True)
        try:
            target.write_bytes(build(f"{self.python} -S"))
        except Exception as e:  # noqa: BLE001 - whatever the builder raises is reported, not fatal
            return f"cni.bundle.build_archive failed: {e}"
        target.chmod(0o755)
        self.zipapp = target
        self.info["zipapp_shebang"] = f"#!{self.python} -S"
        return ""

    def build_selfcontained(self) -> str:
        """Builds the self-contained plugin (cni/selfcontained.py) and installs it as install-cni
        does, into a bin dir short enough for its shebang; '' or why not."""
        import tempfile

        if shutil.which("patchelf") is None:
            return "patchelf is not installed (scripts/setup installs it)"
        from cni import selfcontained

        bin_dir = Path(tempfile.mkdtemp(prefix="bench-cni-", dir="/tmp"))
        self.selfcontained_dir = bin_dir
        try:
            selfcontained.build(bin_dir / "template")
            version, _ = selfcontained.install(bin_dir / "template", bin_dir, str(bin_dir))
        except (selfcontained.BuildError, OSError) as e:
            return f"building the self-contained plugin failed: {e}"
        self.selfcontained = bin_dir / selfcontained.LAUNCHER
        self.info["selfcontained_version"] = version
        return ""

    # ---------------------------------------------------------------- per-round items
    #
    # Each task runs one repetition of its measurements and checks the result. In the warm-up
    # round a failure stops the item (it is reported, not measured); in timed rounds a failure is
    # counted; in RSS rounds every process runs under a ``time`` wrapper that reports its peak RSS.

    def _run(self, argv: list[str], *, stdin: bytes = b"", env: dict[str, str] | None = None) -> proc.Result:
        if self.mode != "rss":
            return proc.run(argv, stdin=stdin, env=env, timeout=TIMEOUT)
        self._rss_count += 1
        out = self.work / f"rss-{self._rss_count}"
        r = proc.run(
            [*self.rss_wrapper, "-f", "%M", "-o", str(out), *argv], stdin=stdin, env=env, timeout=TIMEOUT
        )
        try:
            kib = int(out.read_text().split()[-1]) // self.rss_divisor
        except (OSError, ValueError, IndexError):
            kib = 0
        finally:
            out.unlink(missing_ok=True)
        return dataclasses.replace(r, argv=tuple(argv), maxrss_kib=kib)

    def _record(self, key: str, r: proc.Result, why: str = "") -> None:
        why = why or ("" if r.ok else r.describe())
        if self.mode == "warmup":
            if why:
                raise RuntimeError(f"{key}: {why}")
            return
        ser = self.s(key)
        if why:
            ser.failures.append(why)
        elif self.mode == "time":
            ser.seconds.append(r.seconds)
            ser.cpu.append(r.cpu_seconds)
        elif r.maxrss_kib:
            ser.rss_kib.append(r.maxrss_kib)

    def _pod(self, prefix: str) -> str:
        self._pods += 1
        return f"{prefix}-{self._pods}"

    def t_floor(self, pool: list[str]) -> None:
        name = pool.pop()
        path = Namespaces.path(name)
        r = self._run(
            [self.python, "-S", str(self.floor_script)],
            stdin=json.dumps(fixtures.cni_config(self.kubeconfig, path)).encode(),
            env=fixtures.cni_env("ADD", path, self._pod("floor"), fixtures.container_id(), self.cni_path),
        )
        why = self._cni_result_ok(r) or self._check_rules(name, self.reference)
        self._record("floor.add", r, why)
        if self.mode == "time" and not why:
            for line in r.stderr.decode().splitlines():
                if line.startswith("floor-timings "):
                    for k, v in json.loads(line.split(" ", 1)[1]).items():
                        self.values.setdefault(f"floor.{k}", []).append(v / 1000)

    def t_pieces(self, pool: list[str]) -> None:
        measured = [
            ("floor.python_S", [self.python, "-S", "-c", "pass"]),
            ("floor.python_site", [self.python, "-c", "pass"]),
            ("floor.nsenter", self._nsenter(pool[-1], "true")),
        ]
        for key, argv in measured:
            self._record(key, self._run(argv))
        name = pool.pop()
        for key, cmd, doc in (
            ("floor.restore_v4", "iptables-restore", self.doc4),
            ("floor.restore_v6", "ip6tables-restore", self.doc6),
        ):
            self._record(key, self._run(self._nsenter(name, cmd, "--noflush"), stdin=doc.encode()))

    def t_spawns(self, pool: list[str]) -> None:
        """What the appliers' other spawns cost alone: iptables-save of each variant and family
        (state reads, backend detection) and the applier's Python namespace launcher."""
        name = pool[-1]
        for cmd in SAVES:
            if shutil.which(cmd):
                self._record(f"spawn.nsenter + {cmd}", self._run(self._nsenter(name, cmd)))
        if self.nsexec.exists():
            argv = [self.python, "-I", "-S", str(self.nsexec), "--net", Namespaces.path(name)]
            self._record("spawn.python nsexec.py", self._run([*argv, "--local-lookups", "--", "true"]))
        if shutil.which("ldconfig"):
            self._record("spawn.ldconfig -p", self._run(["ldconfig", "-p"]))

    def t_cni(self, pool: list[str]) -> None:
        name, cid, pod = pool.pop(), fixtures.container_id(), self._pod("pod")
        r = self._cni_run("ADD", name, pod, cid)
        why = self._cni_result_ok(r) or self._check_rules(name, self.cni_reference)
        if not why and self.cni_reference is None:
            self.cni_reference = rules.dump(Namespaces.path(name))
            self.info["cni_rule_lines"] = rules.rule_count(self.cni_reference)
            self.info["cni_rules_equal_classic"] = self.cni_reference == self.reference
            self.info["cni_vs_classic"] = rules.difference(self.reference, self.cni_reference)
        self._record("cni.add", r, why)
        for command in ("CHECK", "DEL"):
            r = self._cni_run(command, name, pod, cid)
            self._record(f"cni.{command.lower()}", r, self._cni_result_ok(r))

    def t_cni_kubectl(self, pool: list[str]) -> None:
        """The ADD of t_cni with an ordinary YAML kubeconfig (kubectl's) instead of install-cni's."""
        name = pool.pop()
        r = self._cni_run(
            "ADD", name, self._pod("pod-k"), fixtures.container_id(), kubeconfig=self.kubeconfig_kubectl
        )
        why = self._cni_result_ok(r) or self._check_rules(name, self.cni_reference)
        self._record("cni.add_kubectl_kubeconfig", r, why)

    def t_cni_zipapp(self, pool: list[str]) -> None:
        if self.zipapp is None:
            return
        name = pool.pop()
        r = self._cni_run("ADD", name, self._pod("pod-z"), fixtures.container_id(), exe=[str(self.zipapp)])
        why = self._cni_result_ok(r) or self._check_rules(name, self.cni_reference)
        self._record("cni.add_zipapp", r, why)

    def t_cni_selfcontained(self, pool: list[str]) -> None:
        if self.selfcontained is None:
            return
        name = pool.pop()
        r = self._cni_run(
            "ADD", name, self._pod("pod-s"), fixtures.container_id(), exe=[str(self.selfcontained)]
        )
        why = self._cni_result_ok(r) or self._check_rules(name, self.cni_reference)
        self._record("cni.add_selfcontained", r, why)

    def t_cni_cidrs(self, pool: list[str]) -> None:
        name = pool.pop()
        r = self._cni_run("ADD", name, "pod-cidrs", fixtures.container_id())
        why = self._cni_result_ok(r)
        if not why:
            try:
                got = rules.dump(Namespaces.path(name))
            except RuntimeError as e:
                why = str(e)
            else:
                n = sum(
                    1
                    for line in got.get("v4", {}).get("nat", {}).get("rules", [])
                    if line.startswith("-A ISTIO_OUTPUT -d 10.") and line.endswith("-j RETURN")
                )
                if n < CIDR_COUNT:
                    why = f"only {n} of the {CIDR_COUNT} excluded CIDRs are in ISTIO_OUTPUT"
        self._record("scale.add_cidrs", r, why)

    def t_init(self, pool: list[str]) -> None:
        name = pool.pop()
        exe = str(self.venv_bin / "istio-iptables")
        r = self._run([exe, *INIT_ARGS, "--network-namespace", Namespaces.path(name)])
        self._record("init.apply", r, "" if not r.ok else self._check_rules(name, self.reference))
        r = self._run([exe, *INIT_ARGS, "--dry-run"])
        why = ""
        if r.ok and "ip6tables-restore" not in r.stdout.decode():
            why = "the dry run printed no IPv6 rules"
        if self.mode == "warmup" and r.ok:
            self.info["init_dry_run_equals_planner"] = r.stdout.decode() == render_dry_run(self.classic)
        self._record("init.dry_run", r, why)

    def t_cni_nft(self, pool: list[str]) -> None:
        """The ADD of t_cni (the same Pod) with ``"native_nftables": true`` in the conflist entry."""
        name = pool.pop()
        r = self._cni_run("ADD", name, self._pod("pod"), fixtures.container_id(), native_nftables=True)
        why = self._cni_result_ok(r) or self._check_nft(name, self.cni_nft_reference)
        if not why and self.cni_nft_reference is None:
            self.cni_nft_reference = rules.nft_dump(Namespaces.path(name))
            foreign = [
                t for t in self.cni_nft_reference if t.startswith("table ") and " istio-proxy-" not in t
            ]
            if foreign:
                self.cni_nft_reference = None
                why = f"the ADD with native_nftables left other tables too: {', '.join(foreign)}"
        if not why and self.cni_nft_reference is not None and "cni_nft_rule_lines" not in self.info:
            self.info["cni_nft_rule_lines"] = rules.nft_rule_count(self.cni_nft_reference)
            self.info["cni_nft_rules_equal_classic"] = self.cni_nft_reference == self.nft_reference
            self.info["cni_nft_vs_classic"] = rules.nft_difference(
                self.nft_reference or [], self.cni_nft_reference
            )
        self._record("nft.cni_add", r, why)

    def t_init_injector(self, pool: list[str]) -> None:
        """The init container with the injector's command line (no option of ours): IPv6 is
        detected from the pod's addresses (an IPv4 pod here, so IPv4 rules), as on a node."""
        name = pool.pop()
        path = Namespaces.path(name)
        pod_link = (
            ["link", "add", "eth0", "type", "veth", "peer", "name", "eth1"],
            ["addr", "add", POD_ADDRESS, "dev", "eth0"],
            ["link", "set", "eth0", "up"],
        )
        for argv in pod_link:
            made = proc.run(["ip", "-n", name, *argv])
            if not made.ok:
                raise RuntimeError(f"cannot give the pod its address: {made.describe()}")
        exe = str(self.venv_bin / "istio-iptables")
        r = self._run([exe, *self.injector_args, "--network-namespace", path])
        why = "" if not r.ok else self._check_rules(name, self.reference_v4)
        self._record("init.apply_injector", r, why)

    def t_init_nft(self, pool: list[str]) -> None:
        """The init container's apply and dry run of t_init with ``--native-nftables``."""
        name = pool.pop()
        exe = str(self.venv_bin / "istio-iptables")
        r = self._run([exe, *INIT_ARGS, "--native-nftables", "--network-namespace", Namespaces.path(name)])
        self._record("nft.init_apply", r, "" if not r.ok else self._check_nft(name, self.nft_reference))
        r = self._run([exe, *INIT_ARGS, "--native-nftables", "--dry-run"])
        why = "" if not r.ok or r.stdout.startswith(b"# nft -f\n") else "the dry run printed no nft script"
        if self.mode == "warmup" and r.ok:
            self.info["init_nft_dry_run_equals_planner"] = r.stdout.decode() == render_dry_run_nft(
                plan_nft(CLASSIC).rules
            )
        self._record("nft.init_dry_run", r, why)

    def t_nftlib(self, pool: list[str]) -> None:
        """The classic nftables rules loaded into a fresh namespace by a fresh system-Python
        process (``python3 -S``, entered with nsenter), by spawning ``nft -f -`` or through
        libnftables (python3-nftables); beside them the interpreter's start and nft alone. The two
        ways take turns going first."""
        assert self.nftables_site is not None
        py = [SYSTEM_PYTHON, "-S"]
        doc = self.nft_doc.encode()
        self._record("nftlib.python_S", self._run(self._nsenter(pool[-1], *py, "-c", "pass")))
        ways: list[tuple[str, list[str]]] = [("binary", []), ("library", [self.nftables_site])]
        self._nftlib_runs += 1
        for mode, extra in ways if self._nftlib_runs % 2 else ways[::-1]:
            name = pool.pop()
            r = self._run(self._nsenter(name, *py, str(NFTLOAD), mode, *extra), stdin=doc)
            why = "" if not r.ok else self._check_nft(name, self.nft_reference)
            self._record(f"nftlib.{mode}", r, why)
            if self.mode == "time" and not why:
                for line in r.stderr.decode().splitlines():
                    if line.startswith("nftload-timings "):
                        for kv in line.split()[1:]:
                            k, _, v = kv.partition("=")
                            self.nftlib_values.setdefault(f"{mode}.{k}", []).append(float(v))
        name = pool.pop()
        r = self._run(self._nsenter(name, "nft", "-f", "-"), stdin=doc)
        self._record("nftlib.nft", r, "" if not r.ok else self._check_nft(name, self.nft_reference))

    def t_old_way(self, pool: list[str]) -> None:
        name = pool.pop()
        r = self._run(self._nsenter(name, "sh", str(self.old_way_script)))
        self._record("old_way.apply", r, "" if not r.ok else self._check_rules(name, self.reference))

    def rounds(self, log: Callable[[str], None]) -> None:
        """One warm-up round (not recorded; it also proves each item works), ``reps`` timed rounds,
        then a few rounds under the RSS wrapper."""
        # (status key, task, namespaces it takes from the round's pool)
        tasks: list[tuple[str, Callable[[list[str]], None], int]] = []
        nft = "nft" in self.items
        if "floor" in self.items:
            tasks += [("floor", self.t_floor, 1), ("floor", self.t_pieces, 1), ("floor", self.t_spawns, 0)]
        if "cni" in self.items or "concurrency" in self.items or nft:
            tasks.append(("cni", self.t_cni, 1))
        if nft:
            tasks.append(("nft_cni", self.t_cni_nft, 1))
        if "cni" in self.items:
            tasks.append(("cni_zipapp", self.t_cni_zipapp, 1))
            tasks.append(("cni_selfcontained", self.t_cni_selfcontained, 1))
            tasks.append(("cni_kubectl", self.t_cni_kubectl, 1))
        if "init" in self.items or nft:
            tasks.append(("init", self.t_init, 1))
        if "init" in self.items:
            tasks.append(("init_injector", self.t_init_injector, 1))
        if nft:
            tasks.append(("nft_init", self.t_init_nft, 1))
        if "old_way" in self.items:
            tasks.append(("old_way", self.t_old_way, 1))
        if "scale" in self.items:
            tasks.append(("scale_add", self.t_cni_cidrs, 1))
        if "nftlib" in self.items:
            tasks.append(("nftlib", self.t_nftlib, 3))
        live: list[tuple[str, Callable[[list[str]], None]]] = []
        pool_size = 1  # one more than the tasks take: t_pieces and t_spawns use the last one
        for item, task, needs in tasks:
            why = self.available(item)
            if why:
                self.status.setdefault(item, {"status": "unavailable", "reason": why})
                continue
            live.append((item, task))
            pool_size += needs
        if any(item == "cni_zipapp" for item, _ in live):
            why = self.build_zipapp()
            if why:
                self.info["zipapp_unavailable"] = why
        if any(item == "cni_selfcontained" for item, _ in live):
            why = self.build_selfcontained()
            if why:
                self.info["selfcontained_unavailable"] = why
        rss_rounds = 0 if not self.rss_wrapper else (1 if self.quick else 3)
        plan_ = ["warmup"] + ["time"] * self.reps + ["rss"] * rss_rounds
        for i, mode in enumerate(plan_):
            self.mode = mode
            names = self.ns.create(pool_size)
            pool = list(names)  # the tasks take namespaces from this copy
            try:
                for item, task in _order(live, i):
                    if self.status.get(item, {}).get("status") == "failed":
                        continue
                    try:
                        task(pool)
                    except (RuntimeError, OSError, ValueError, KeyError) as e:
                        self.status[item] = {"status": "failed", "reason": str(e)}
                        log(f"{item}: FAILED: {e}")
            finally:
                self.ns.delete(names)
            if mode == "time" and i % 10 == 0:
                log(f"round {i}/{self.reps}")
        self.mode = "time"

    # ---------------------------------------------------------------- concurrency

    def concurrency_item(self, log: Callable[[str], None]) -> None:
        why = self.available("concurrency")
        if why or self.cni_reference is None:
            reason = why or "no single ADD succeeded to compare with"
            self.status["concurrency"] = {"status": "unavailable" if why else "failed", "reason": reason}
            return
        n = self.concurrency
        rounds = 1 if self.quick else 3
        walls, latencies, cpu_use, failures, cpu = [], [], [], [], []
        for rnd in range(rounds):
            names = self.ns.create(n)
            try:
                children = []
                first = time.perf_counter()
                for i, name in enumerate(names):
                    path = Namespaces.path(name)
                    conf = fixtures.cni_config(self.kubeconfig, path)
                    env = fixtures.cni_env(
                        "ADD", path, f"pod-c{rnd}-{i}", fixtures.container_id(), self.cni_path
                    )
                    children.append(
                        proc.Child(
                            [str(self.venv_bin / "istio-cni")], stdin=json.dumps(conf).encode(), env=env
                        )
                    )
                results = proc.run_all(children, TIMEOUT * 2)
                wall = max(c.started + r.seconds for c, r in zip(children, results, strict=True)) - first
                walls.append(wall)
                cpu_use.append(sum(r.cpu_seconds for r in results) / (wall * (os.cpu_count() or 1)))
                cpu += [r.cpu_seconds for r in results]
                for name, r in zip(names, results, strict=True):
                    why = self._cni_result_ok(r) or self._check_rules(name, self.cni_reference)
                    if why:
                        failures.append(why)
                    else:
                        latencies.append(r.seconds)
            finally:
                self.ns.delete(names)
            log(f"concurrency round {rnd + 1}/{rounds}: {n} ADDs in {wall * 1000:.0f} ms")
        lat = summary(latencies)
        self.status["concurrency"] = {
            "status": "ok" if not failures else "failed",
            "concurrency": n,
            "rounds": rounds,
            "wall_ms": round(statistics.median(walls) * 1000, 1),
            "wall_ms_each_round": [round(w * 1000, 1) for w in walls],
            "latency": lat,
            "p99_ms": lat.get("p99_ms"),
            "failures": len(failures),
            "failure_reasons": sorted(set(failures))[:5],
            "cpu_utilisation": round(statistics.median(cpu_use), 2),
            "cpu_ms_per_add": round(statistics.median(cpu) * 1000, 1),
            "cores": os.cpu_count(),
            "cpu_bound_wall_ms": round(n * statistics.median(cpu) * 1000 / (os.cpu_count() or 1), 1),
        }

    # ---------------------------------------------------------------- connection rate

    def connrate_item(self, log: Callable[[str], None]) -> None:
        needed = ("nft", "iptables-nft-restore", "ip6tables-nft-restore", "iptables-nft-save", "sysctl")
        missing = [c for c in needed if not shutil.which(c)]
        if missing:
            self.connrate = {"status": "unavailable", "reason": f"not installed: {', '.join(missing)}"}
            return
        cr = ConnRate(CLASSIC, self.ns, self.python, seconds_per_point=1.0 if self.quick else 2.0)
        try:
            log("connection rate: loading the rules into 6 namespaces")
            cr.setup()
            cr.run(log)
        finally:
            cr.teardown()
        self.connrate = cr.result()

    # ---------------------------------------------------------------- scale: planning

    def planning_item(self) -> dict[str, Any]:
        import ipaddress

        v4 = [ipaddress.IPv4Network((0x0A000000 + (i << 8), 24)) for i in range(SCALE_CIDRS // 2)]
        v6 = [ipaddress.IPv6Network(((0xFD00 << 112) | (i << 64), 64)) for i in range(SCALE_CIDRS - len(v4))]
        ports = tuple(range(20000, 20000 + SCALE_PORTS))
        cfg = Config(
            inbound_ports=PortSpec(ports=ports),
            outbound_ip_ranges_include=CidrSpec(wildcard=True),
            outbound_ip_ranges_exclude=(*v4, *v6),
            enable_ipv6=True,
        )
        times = []
        size = lines = 0
        for _ in range(self.reps + 1):
            t = time.perf_counter()
            rs = plan(cfg)
            docs = [render_family(fr) for fr in rs.families]
            times.append(time.perf_counter() - t)
            size = sum(len(d) for d in docs)
            lines = sum(len(fr.rules) for fr in rs.families)
        out = summary(times[1:])
        out.update(cidrs=SCALE_CIDRS, ports=SCALE_PORTS, rules=lines, restore_bytes=size)
        # Parsing the same values from option strings, when the parsers exist.
        from istio_iptables import config as config_mod

        parse_cidrs = getattr(config_mod, "parse_cidr_list", None)
        parse_ports = getattr(config_mod, "parse_port_list", None)
        if parse_cidrs is not None and parse_ports is not None:
            cidr_text = ",".join(str(c) for c in (*v4, *v6))
            port_text = ",".join(str(p) for p in ports)
            ptimes = []
            for _ in range(self.reps + 1):
                t = time.perf_counter()
                parse_cidrs("--outbound-ip-ranges-exclude", cidr_text)
                parse_ports("--inbound-ports", port_text)
                ptimes.append(time.perf_counter() - t)
            out["parse"] = summary(ptimes[1:])
        return out

    # ---------------------------------------------------------------- where the time goes

    def breakdown(self, log: Callable[[str], None]) -> dict[str, Any]:
        """Profiles the ADD (and the init container's apply): imports (``-X importtime`` of real
        runs, per top-level package), the API call in a fresh process, which programs a run
        executes (strace, where installed) and what each costs alone, and the plugin's own log."""
        out: dict[str, Any] = {}
        k = 2 if self.quick else 5
        if self.cni_reference is not None:

            def add(exe: list[str]) -> proc.Result:
                (name,) = self.ns.create(1)
                try:
                    return self._cni_run("ADD", name, "pod-prof", fixtures.container_id(), exe=exe)
                finally:
                    self.ns.delete([name])

            out.update(
                self._imports(
                    lambda: add([self.python, "-X", "importtime", str(self.venv_bin / "istio-cni")]), k
                )
            )
            out["api"] = self._api_call(k)
            out["execs"] = self._census(lambda pre: add([*pre, str(self.venv_bin / "istio-cni")]))
            out["cprofile"] = self._cprofile(lambda pre: add([*pre, str(self.venv_bin / "istio-cni")]))
            if self.zipapp is not None and self.status.get("cni_zipapp", {}).get("status") != "failed":
                zipapp = str(self.zipapp)
                out["zipapp"] = self._imports(
                    lambda: add([self.python, "-S", "-X", "importtime", zipapp]), k, site=False
                )
            out["plugin_debug_timings"] = self._debug_log()
        if (
            "init" in self.items
            and self.status.get("init", {}).get("status") != "failed"
            and not self.available("init")
        ):

            def init(pre: list[str]) -> proc.Result:
                (name,) = self.ns.create(1)
                try:
                    argv = [*pre, str(self.venv_bin / "istio-iptables"), *INIT_ARGS]
                    return self._run([*argv, "--network-namespace", Namespaces.path(name)])
                finally:
                    self.ns.delete([name])

            prof = self._imports(lambda: init([self.python, "-X", "importtime"]), k)
            prof["execs"] = self._census(init)
            prof["cprofile"] = self._cprofile(init)
            out["init"] = prof
        log("profiled the ADD")
        return out

    def _imports(self, run: Callable[[], proc.Result], k: int, *, site: bool = True) -> dict[str, Any]:
        per_run: list[dict[str, float]] = []
        for _ in range(k):
            r = run()
            if not r.ok:
                return {"imports_error": r.describe()}
            per_run.append(_import_totals(r.stderr.decode()))
        startup = [self.python, *(() if site else ("-S",)), "-X", "importtime", "-c", "pass"]
        site_runs = [_import_totals(proc.run(startup).stderr.decode()) for _ in range(k)]
        pkgs = sorted({p for run in per_run for p in run})
        imports = {p: round(statistics.median(run.get(p, 0.0) for run in per_run) * 1000, 2) for p in pkgs}
        total = round(statistics.median(sum(run.values()) for run in per_run) * 1000, 2)
        site_total = round(statistics.median(sum(run.values()) for run in site_runs) * 1000, 2)
        return {
            "imports_total_ms": total,
            "imports_at_startup_ms": site_total,
            "imports_after_startup_ms": round(total - site_total, 2),
            "imports_by_package_ms": dict(sorted(imports.items(), key=lambda kv: -kv[1])),
        }

    def _api_call(self, k: int) -> dict[str, Any]:
        """The plugin's own GET (cni.kube) in a fresh process, its import excluded."""
        snippet = (
            "import json,time,sys\n"
            "t=time.perf_counter()\n"
            "from cni import kube\n"
            "t1=time.perf_counter()\n"
            "kc=kube.load_kubeconfig(sys.argv[1]); kube.ssl_context(kc)\n"
            "t2=time.perf_counter()\n"
            "kube.fetch_pod(sys.argv[1], sys.argv[2], sys.argv[3])\n"
            "t3=time.perf_counter()\n"
            "print(json.dumps({'import_ms':(t1-t)*1e3,'tls_context_ms':(t2-t1)*1e3,'fetch_pod_ms':(t3-t2)*1e3}))\n"
        )
        api: dict[str, list[float]] = {}
        for _ in range(k):
            r = proc.run([self.python, "-c", snippet, str(self.kubeconfig), fixtures.NAMESPACE, "pod-api"])
            if not r.ok:
                return {"error": r.describe()}
            for key, v in json.loads(r.stdout).items():
                api.setdefault(key, []).append(v)
        return {key: round(statistics.median(v), 2) for key, v in api.items()}

    def _census(self, run: Callable[[list[str]], proc.Result]) -> dict[str, Any]:
        """Which programs one run executes, counted (strace -f -e execve), in order."""
        strace = shutil.which("strace")
        if strace is None:
            return {"note": "strace is not installed"}
        tdir = self.work / "execs"
        shutil.rmtree(tdir, ignore_errors=True)
        tdir.mkdir()
        r = run(
            [
                strace,
                "-f",
                "-ff",
                "-qq",
                "-s",
                "256",
                "-e",
                "trace=execve",
                "-e",
                "signal=none",
                "-o",
                str(tdir / "t"),
            ]
        )
        order: list[str] = []
        # One file per process (t.PID); process ids grow with spawn order.
        for f in sorted(tdir.iterdir(), key=lambda f: int(f.suffix[1:]) if f.suffix[1:].isdigit() else 0):
            order += [p for p in (_exec_program(line) for line in f.read_text().splitlines()) if p]
        shutil.rmtree(tdir, ignore_errors=True)
        if not order:
            return {"note": f"strace recorded nothing ({r.describe()})"}
        counts: dict[str, int] = {}
        for p in order[1:]:  # the first is the measured program itself
            counts[p] = counts.get(p, 0) + 1
        return {"sequence": order, "counts": counts}

    def _cprofile(self, run: Callable[[list[str]], proc.Result]) -> list[dict[str, Any]]:
        """One run under cProfile: this project's functions by cumulative time (the profiler
        inflates every figure; read them as shares)."""
        import pstats

        out_file = self.work / "run.prof"
        r = run([self.python, "-m", "cProfile", "-o", str(out_file)])
        if not out_file.exists():
            return [{"error": r.describe()}]
        try:
            stats = pstats.Stats(str(out_file)).stats  # type: ignore[attr-defined]
        finally:
            out_file.unlink(missing_ok=True)
        roots = (str(self.repo / "cni") + os.sep, str(self.repo / "istio_iptables") + os.sep)
        rows = []
        for (filename, line, func), (_cc, _nc, _tt, ct, _callers) in stats.items():
            if filename.startswith(roots) and not func.startswith("<"):
                rel = os.path.relpath(filename, self.repo)
                rows.append({"function": f"{rel}:{line}({func})", "cumulative_ms": round(ct * 1000, 1)})
        rows.sort(key=lambda row: -row["cumulative_ms"])
        return rows[:15]

    def _debug_log(self) -> list[str]:
        """The lines of the plugin's debug log that carry a duration."""
        (name,) = self.ns.create(1)
        try:
            r = self._cni_run("ADD", name, "pod-debug", fixtures.container_id(), log_level="debug")
        finally:
            self.ns.delete([name])
        lines = r.stderr.decode().splitlines()
        return [line for line in lines if re.search(r"\d(\.\d+)?\s?(ms|s)\b", line)][:20]


# Tasks measured against each other: in every other round the second of a pair goes first.
_PAIRS = {"nft_cni": "cni", "nft_init": "init"}
_Task = tuple[str, Callable[[list[str]], None]]


def _order(live: list[_Task], i: int) -> list[_Task]:
    """Round ``i``'s order: the tasks rotated by ``i``; paired tasks next to each other, their
    order alternating from round to round."""
    k = i % len(live) if live else 0
    order = live[k:] + live[:k]
    for second, first in _PAIRS.items():
        a = next((t for t in order if t[0] == first), None)
        b = next((t for t in order if t[0] == second), None)
        if a is None or b is None:
            continue
        order.remove(b)
        at = order.index(a)
        order.insert(at if i % 2 else at + 1, b)
    return order


def _exec_program(line: str) -> str:
    """``python nsexec.py`` / ``iptables-nft-save`` / ... for a successful execve line of strace."""
    m = re.match(r'execve\("([^"]+)", \[(.*?)\]', line)
    if not m or not line.rstrip().endswith("= 0"):
        return ""
    prog = os.path.basename(m.group(1))
    if prog.startswith("python"):
        script = next((os.path.basename(a) for a in re.findall(r'"([^"]*)"', m.group(2))[1:]
                       if not a.startswith("-")), "")  # fmt: skip
        return f"python {script}".strip()
    return prog


def _rss_wrapper() -> tuple[list[str], int]:
    """A small process that forks the measured command and reports its peak RSS. Spawned straight
    from this (large) process, a child's ru_maxrss would start at this process's size: exec records
    the high-water mark of the address space it replaces, and posix_spawn shares ours until then.
    GNU time reports kilobytes; BusyBox's applet multiplies ru_maxrss by the page size in KiB."""
    if os.path.exists("/usr/bin/time"):
        return ["/usr/bin/time"], 1
    busybox = shutil.which("busybox")
    if busybox:
        return [busybox, "time"], max(1, os.sysconf("SC_PAGE_SIZE") // 1024)
    return [], 1


def _import_totals(stderr: str) -> dict[str, float]:
    """Seconds spent importing, per top-level package (sum of each module's own time)."""
    totals: dict[str, float] = {}
    for line in stderr.splitlines():
        m = _IMPORTTIME.match(line)
        if m:
            top = m.group(4).split(".")[0]
            totals[top] = totals.get(top, 0.0) + int(m.group(1)) / 1e6
    return totals


def load_average() -> list[float] | None:
    """The 1-, 5- and 15-minute load averages (something else running shows here)."""
    try:
        with open("/proc/loadavg") as f:
            return [float(v) for v in f.read().split()[:3]]
    except (OSError, ValueError):
        return None


def machine() -> dict[str, Any]:
    cpu = ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    ipt = subprocess.run(["iptables", "-V"], capture_output=True, text=True, check=False).stdout.strip()
    return {
        "load_average_at_start": load_average(),
        "kernel": os.uname().release,
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": sys.version.split()[0],
        "iptables": ipt,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "nft": subprocess.run(
            ["nft", "--version"], capture_output=True, text=True, check=False
        ).stdout.strip()
        if shutil.which("nft")
        else None,
    }
