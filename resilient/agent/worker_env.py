"""The environment of a worker process: torch.distributed's contract (as torchrun sets it) plus resilient's.

``TORCHELASTIC_USE_AGENT_STORE=True`` makes an unmodified ``env://`` script connect to the TCPStore that
the generation's master agent hosts (``store_host``) as a client, instead of rank 0 starting its own; the
agent re-creates that store for every generation, so no key from a previous attempt is ever read.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Mapping

from resilient import env
from resilient.runtime.api import WorkerAssignment

USE_AGENT_STORE = "TORCHELASTIC_USE_AGENT_STORE"
DEFAULT_OMP_THREADS = "1"


@dataclass(frozen=True)
class AgentPaths:
    """Per-worker paths the agent hands out."""

    agent_socket: str
    control_file: str
    error_file: str
    event_log: str | None


def worker_environment(
    base: Mapping[str, str],
    a: WorkerAssignment,
    *,
    group_world_size: int,
    max_restarts: int,
    snapshot_every: int,
    paths: AgentPaths,
    role: str = "default",
) -> dict[str, str]:
    """``base`` (the agent's environment) overlaid with this worker's contract. ``role`` (``--role``) is the
    worker group's name, ``ROLE_NAME`` as torchrun sets it; every worker has it, so ``ROLE_RANK`` and
    ``ROLE_WORLD_SIZE`` equal ``RANK`` and ``WORLD_SIZE``."""
    out = dict(base)
    out.update(
        {
            env.RANK: str(a.rank),
            env.LOCAL_RANK: str(a.local_rank),
            env.WORLD_SIZE: str(a.world_size),
            env.LOCAL_WORLD_SIZE: str(a.local_world_size),
            env.GROUP_RANK: str(a.group_rank),
            env.GROUP_WORLD_SIZE: str(group_world_size),
            env.ROLE_RANK: str(a.rank),
            env.ROLE_WORLD_SIZE: str(a.world_size),
            env.ROLE_NAME: role,
            env.MASTER_ADDR: a.master_addr,
            env.MASTER_PORT: str(a.master_port),
            env.RESTART_COUNT: str(a.restart_count),
            env.MAX_RESTARTS: str(max_restarts),
            env.RUN_ID: a.job_id,
            env.ERROR_FILE: paths.error_file,
            USE_AGENT_STORE: str(True),
            env.JOB_ID: a.job_id,
            env.NODE_ID: a.node_id,
            env.GENERATION: str(a.generation),
            env.AGENT_SOCKET: paths.agent_socket,
            env.CONTROL_FILE: paths.control_file,
            env.SNAPSHOT_EVERY: str(snapshot_every),
            "PYTHONUNBUFFERED": base.get("PYTHONUNBUFFERED", "1"),
        }
    )
    if paths.event_log:
        out[env.EVENT_LOG] = os.path.abspath(paths.event_log)
    if not base.get("OMP_NUM_THREADS"):
        out["OMP_NUM_THREADS"] = DEFAULT_OMP_THREADS
    return out
