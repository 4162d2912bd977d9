"""The reference docs list everything the code offers: every ``resilient-run`` flag (from its argparse
parser) and every environment variable constant of ``resilient/env.py`` in ``docs/configuration.md``, and
every event kind the code emits (``events.emit("kind", ...)`` under ``resilient/``, and the persister's
``self._emit`` wrapper) in
``docs/operations.md``. Each name must appear in backticks, as the docs' tables write them."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from resilient import env
from resilient.agent.cli_args import build_parser

ROOT = Path(__file__).resolve().parents[1]
CONFIGURATION = ROOT / "docs" / "configuration.md"
OPERATIONS = ROOT / "docs" / "operations.md"
# events.emit("kind", ...), and the persister's self._emit("kind", ...) wrapper around it
_EMIT = re.compile(r"""(?:\bevents\.emit|\bself\._emit)\(\s*["']([^"']+)["']""")


def _in_backticks(name: str, text: str) -> bool:
    """``name`` appears inside a backtick span (alone, or as the start of one: `--keep N`, `-r`, ...)."""
    return re.search(r"`" + re.escape(name) + r"(?![\w-])[^`]*`", text) is not None


def run_flags() -> list[str]:
    """Each option of resilient-run by its documented spelling: the dashed long form, and the short form."""
    flags = []
    for action in build_parser()._actions:
        if not action.option_strings or "--help" in action.option_strings:
            continue
        longs = [o for o in action.option_strings if o.startswith("--")]
        dashed = [o for o in longs if "_" not in o] or longs
        flags.extend(dashed[:1] + [o for o in action.option_strings if not o.startswith("--")])
    return flags


def env_variables() -> list[str]:
    return sorted(
        value for name, value in vars(env).items() if name.isupper() and isinstance(value, str) and value
    )


def emitted_event_kinds() -> dict[str, str]:
    """kind -> the first file (relative) that emits it."""
    kinds: dict[str, str] = {}
    for path in sorted((ROOT / "resilient").rglob("*.py")):
        for kind in _EMIT.findall(path.read_text(encoding="utf-8")):
            kinds.setdefault(kind, str(path.relative_to(ROOT)))
    return kinds


def test_the_sources_of_truth_are_found() -> None:
    assert {"--nnodes", "--lease-ttl", "--etcd-user", "-r"} <= set(run_flags())
    assert "RESILIENT_ETCD_ENDPOINTS" in env_variables()
    assert {"agent.start", "gen.formed", "step.done"} <= set(emitted_event_kinds())


@pytest.mark.parametrize("flag", run_flags())
def test_every_resilient_run_flag_is_in_configuration_md(flag: str) -> None:
    assert _in_backticks(flag, CONFIGURATION.read_text(encoding="utf-8")), (
        f"resilient-run flag {flag} (resilient/agent/cli_args.py) is missing from docs/configuration.md"
    )


@pytest.mark.parametrize("variable", env_variables())
def test_every_environment_variable_is_in_configuration_md(variable: str) -> None:
    assert _in_backticks(variable, CONFIGURATION.read_text(encoding="utf-8")), (
        f"environment variable {variable} (resilient/env.py) is missing from docs/configuration.md"
    )


@pytest.mark.parametrize("kind,where", sorted(emitted_event_kinds().items()))
def test_every_emitted_event_kind_is_in_operations_md(kind: str, where: str) -> None:
    assert _in_backticks(kind, OPERATIONS.read_text(encoding="utf-8")), (
        f"event kind {kind!r} (emitted in {where}) is missing from docs/operations.md"
    )
