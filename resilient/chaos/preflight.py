"""Preflight: what a scenario needs that this machine or this build lacks, as reasons to skip.

Nothing is installed here. A scenario whose needs are missing is reported as skipped with the reason,
never run and never passed: no root for namespaces, no ``iptables``, a launcher without a flag the
harness passes, a failpoint name that no module of the runtime defines, an in-worker hook in a script
that does not call it.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

from resilient.chaos import netns
from resilient.chaos.faults import ACTIONS
from resilient.chaos.scenario import Scenario
from resilient.chaos.topology import DEFAULT_SCRIPT, REPO_ROOT

LAUNCHER_FLAGS = ("--nnodes", "--nproc-per-node", "--rdzv-endpoint", "--rdzv-id", "--max-restarts",
                  "--monitor-interval", "--lease-ttl", "--hang-timeout", "--leave-timeout", "--replicas",
                  "--snapshot-every", "--event-log", "--node-id", "--log-dir", "--local-addr", "--last-call")


@functools.lru_cache(maxsize=1)
def launcher_help() -> str | None:
    """``resilient-run --help`` text, or None when the launcher is not there (yet)."""
    if importlib.util.find_spec("resilient.run") is None:
        return None
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])))
    res = subprocess.run([sys.executable, "-m", "resilient.run", "--help"], capture_output=True, text=True,
                         timeout=120, env=env, cwd=str(REPO_ROOT))
    return res.stdout if res.returncode == 0 else None


@functools.lru_cache(maxsize=1)
def _capabilities() -> dict[str, str | None]:
    caps = netns.probe()
    caps["tmpfs"] = None if os.geteuid() == 0 else "mounting a tmpfs needs root"
    return caps


def native_failpoints() -> list[str]:
    """The ``native.*`` failpoints that the shard-store engine in use marks (the built extension, or its
    pure-Python twin); empty for an extension built before failpoints existed."""
    from resilient.store import _loader

    names = getattr(_loader.backend(), "failpoint_names", None)
    return list(names()) if names is not None else []


@functools.lru_cache(maxsize=256)
def failpoint_defined(name: str) -> bool:
    """True when some module of the runtime marks that failpoint: for ``native.*`` names the engine in
    use (so a stale build is a skip, not a fault that never fires), else a Python or native source file
    (``repl.*``, ``persist.*``: marked with ``failpoints.hit("NAME")``)."""
    if name.startswith("native."):
        return name in native_failpoints()
    needle = re.compile(r"""["']""" + re.escape(name) + r"""["']""")
    roots = [REPO_ROOT / "resilient", REPO_ROOT / "native"]
    for root in roots:
        if not root.is_dir():
            continue
        for path in root.rglob("*"):
            if path.suffix not in (".py", ".cpp", ".cc", ".h", ".hpp") or "chaos" in path.parts:
                continue
            try:
                if needle.search(path.read_text(encoding="utf-8", errors="ignore")):
                    return True
            except OSError:
                continue
    return False


def script_has_hooks(script: Path) -> bool:
    try:
        return "inworker.at_step" in script.read_text(encoding="utf-8", errors="ignore")
    except OSError:
        return False


def check(scenario: Scenario, script: Path) -> list[str]:
    """Reasons this scenario cannot run here; empty when it can."""
    reasons: list[str] = []
    if not script.is_file():
        return [f"training script {script} does not exist"]
    help_text = launcher_help()
    if help_text is None:
        return ["resilient-run is not available (python -m resilient.run --help failed or the module is missing)"]
    needed = list(LAUNCHER_FLAGS)
    if scenario.runtime.persist_every:
        needed += ["--persist-dir", "--persist-every"]
    missing = [f for f in needed if f not in help_text]
    if missing:
        reasons.append(f"resilient-run lacks the flag(s) {missing}")
    requires = set(scenario.requires)
    if scenario.topology.network == "netns":
        requires |= {"root", "netns"}
    if scenario.runtime.persist_tmpfs_kb:
        requires |= {"root", "tmpfs"}
    for f in scenario.faults:
        requires |= set(ACTIONS[f.action].requirements(f))
        names = []
        if f.action == "failpoint":
            names.append(f.params["name"])
        if f.trigger.kind == "failpoint":
            names.append(f.trigger.value)
        for n in names:
            if not failpoint_defined(n):
                where = ("the shard-store engine in use (rebuild: pip install --no-build-isolation -e .)"
                         if n.startswith("native.") else "the runtime")
                reasons.append(f"failpoint {n!r} is not defined anywhere in {where}")
    caps = _capabilities()
    for req in sorted(requires):
        if req == "chaos_hooks":
            if script.resolve() != DEFAULT_SCRIPT.resolve() and not script_has_hooks(script):
                reasons.append(f"{script.name} does not call resilient.chaos.inworker.at_step (in-worker faults)")
        elif req == "etcd_members>=3":
            if scenario.topology.etcd_members < 3:
                reasons.append("needs a 3-member etcd")
        elif caps.get(req):
            reasons.append(f"{req}: {caps[req]}")
    return reasons
