"""The ``resilient`` command: ``status``, ``top``, ``inspect``, ``export`` (and ``run``, the same as ``resilient-run``).

Each subcommand lives in its own module and is imported only when used.
"""

from __future__ import annotations

import importlib
import sys
from typing import Sequence

COMMANDS = {
    "run": ("resilient.run", "main", "launch and supervise a training script (same as resilient-run)"),
    "status": ("resilient.cli_status", "status_main", "show a job's generation, members, progress and commits"),
    "top": ("resilient.cli_top", "top_main", "live view of a job: generation, ranks, steps, recoveries"),
    "inspect": ("resilient.cli_persist", "inspect_main", "list and verify durable checkpoints"),
    "export": ("resilient.cli_persist", "export_main", "export a durable checkpoint to a plain state dict"),
}


def usage() -> str:
    lines = ["usage: resilient <command> [options]", "", "commands:"]
    lines += [f"  {name:<8} {help_}" for name, (_m, _f, help_) in COMMANDS.items()]
    lines += ["", "resilient <command> --help shows a command's options."]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(usage())
        return 0 if args else 2
    name, rest = args[0], args[1:]
    if name not in COMMANDS:
        print(f"resilient: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module, func, _ = COMMANDS[name]
    try:
        fn = getattr(importlib.import_module(module), func)
    except (ImportError, AttributeError) as exc:
        print(f"resilient: the {name!r} command is not available in this installation: {exc}", file=sys.stderr)
        return 2
    result = fn(rest)
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
