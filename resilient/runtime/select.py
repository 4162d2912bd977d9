"""Which ``WorkerRuntime`` this process runs under, decided from the environment once.

* ``RESILIENT_AGENT_SOCKET`` set: under ``resilient-run`` -> ``AgentRuntime`` (imported lazily: plain runs
  never load the gRPC client).
* torchrun's variables (``TORCHELASTIC_RUN_ID`` or ``RANK``) without resilient's: plain torchrun ->
  ``LocalRuntime`` in torchrun mode, with a warning that in-memory recovery is off.
* neither: ``python train.py`` -> ``LocalRuntime``, world size 1.
"""

from __future__ import annotations

from resilient import env, logs
from resilient.runtime.api import WorkerRuntime

log = logs.get_logger(__name__)

TORCHRUN_WARNING = (
    "resilient: running under plain torchrun; in-memory recovery is off (a failure restarts every worker "
    "from scratch). Launch with resilient-run to recover from in-memory snapshots."
)


def detect_mode() -> str:
    """'agent' | 'torchrun' | 'single'."""
    if env.get(env.AGENT_SOCKET):
        return "agent"
    if env.get(env.RUN_ID) or env.get(env.RANK):
        return "torchrun"
    return "single"


def runtime_from_env() -> WorkerRuntime:
    mode = detect_mode()
    if mode == "agent":
        from resilient.runtime.agent_client import AgentRuntime

        return AgentRuntime.from_env()
    from resilient.runtime.local import LocalRuntime

    if mode == "torchrun":
        log.warning(TORCHRUN_WARNING)
        return LocalRuntime.from_torchrun_env()
    return LocalRuntime(mode="single", shm_dir=env.get(env.SHM_DIR))
