"""``resilient-run``: the torchrun drop-in (``python -m resilient.run`` works too).

Parses and validates the command line, reaches etcd (or starts the embedded one with ``--standalone``)
and only then starts anything; bad options, a missing script or an unreachable etcd exit with status 2
and one clear message. See ``resilient.agent.agent`` for what the agent does.
"""

from __future__ import annotations

import sys
from typing import Sequence

from resilient import events, logs
from resilient.errors import ConfigError, EtcdError, ResilientError

EXIT_USAGE = 2


def main(argv: Sequence[str] | None = None) -> int:
    from resilient.agent import cli_args

    logs.configure()
    try:
        settings = cli_args.parse(argv)
    except ConfigError as exc:
        print(f"resilient-run: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if settings.event_log:
        events.open_log(settings.event_log)
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
        agent.start()
        return agent.run()
    finally:
        agent.close()


if __name__ == "__main__":
    sys.exit(main())
