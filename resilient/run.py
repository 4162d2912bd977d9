"""``resilient-run``: the torchrun drop-in (``python -m resilient.run`` works too).

Parses and validates the command line, reaches etcd (or starts the embedded one with ``--standalone``)
and only then starts anything; bad options, a missing script or an unreachable etcd exit with status 2
and one clear message. See ``resilient.agent.agent`` for what the agent does.
"""

from __future__ import annotations

import os
import sys
from typing import Sequence

from resilient import events, logs
from resilient.agent.settings import prepare_local_paths
from resilient.errors import ConfigError, EtcdError, ResilientError

EXIT_USAGE = 2


def main(argv: Sequence[str] | None = None) -> int:
    from resilient.agent import cli_args

    logs.configure()
    try:
        settings = cli_args.parse(argv)
        prepare_local_paths(settings)
        if settings.event_log:
            _open_event_log(settings.event_log)
    except ConfigError as exc:
        print(f"resilient-run: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    from resilient.agent.agent import NodeAgent

    agent = NodeAgent(settings)
    try:
        try:
            agent.connect()
        except EtcdError as exc:
            print(f"resilient-run: error: cannot reach etcd: {exc}", file=sys.stderr)
            return EXIT_USAGE
        except ResilientError as exc:
            print(f"resilient-run: error: {exc}", file=sys.stderr)
            return EXIT_USAGE
        try:
            agent.start()
            return agent.run()
        except ConfigError as exc:  # a missing fsspec backend at start; a closed job's id once it tried to join
            print(f"resilient-run: error: {exc}", file=sys.stderr)
            return EXIT_USAGE
    finally:
        agent.close()


def _open_event_log(path: str) -> None:
    """Open ``--event-log`` for appending (its missing directories are created); ``ConfigError`` saying why not."""
    if os.path.isdir(path):
        raise ConfigError(
            f"--event-log {path!r} is a directory; give a file path (e.g. {path.rstrip('/')}/events.jsonl)."
        )
    ancestor = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(ancestor):
        ancestor = os.path.dirname(ancestor)
    if not os.path.isdir(ancestor):
        raise ConfigError(f"--event-log {path!r} cannot be created: {ancestor!r} is a file, not a directory; give a "
                          "file path in a directory.")
    try:
        events.open_log(path)
    except OSError as exc:
        raise ConfigError(
            f"--event-log {path!r} cannot be opened for appending ({exc.strerror or exc}); give a file path in a "
            "directory this user can write (missing directories are created)."
        ) from exc


if __name__ == "__main__":
    sys.exit(main())
