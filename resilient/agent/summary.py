"""The one-screen exit summary: the job's outcome, the newest durable checkpoint on disk (with
``--persist-dir``: and whether the last persist failed, see ``resilient.agent.durable.Durable.summary_line``)
and the first failure (rank, node, exit code or signal, the worker's traceback from its error file)."""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass

from resilient.agent.supervisor import describe_exit

MAX_TRACE_LINES = 25


KILLED_FOR = {
    "hung": "hung (no progress beat)",
    "stuck": "stuck in an ended generation (did not leave it when the next was announced)",
}


@dataclass(frozen=True)
class Failure:
    rank: int
    local_rank: int
    node: str
    pid: int
    exitcode: int
    generation: int
    when: float  # wall time
    error_file: str
    killed_for: str | None = None  # why the agent killed it (``WorkerHandle.killed_for``)

    def cause(self) -> str:
        what = describe_exit(self.exitcode)
        if self.killed_for is not None:
            what = f"{KILLED_FOR.get(self.killed_for, self.killed_for)}, killed: {what}"
        return f"rank {self.rank} (local {self.local_rank}) on node {self.node}, pid {self.pid}: {what}"


def read_error_file(path: str) -> str | None:
    """The traceback a worker recorded (torchelastic's error-file format), trimmed to the last lines."""
    if not path or not os.path.exists(path):
        return None
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except (OSError, ValueError):
        return None
    msg = data.get("message", data)
    if isinstance(msg, dict):
        trace = msg.get("extraInfo", {}).get("py_callstack") or msg.get("message")
    else:
        trace = str(msg)
    if not trace:
        return None
    lines = str(trace).rstrip().splitlines()
    if len(lines) > MAX_TRACE_LINES:
        lines = ["  ..."] + lines[-MAX_TRACE_LINES:]
    return "\n".join(lines)


def render(*, job: str, node: str, exit_code: int, outcome: str, first: Failure | None, restarts: int,
           generation: int | None, committed_step: int | None, durable: str | None = None) -> str:
    """The summary block. ``durable``: the durable-checkpoint status (``Durable.summary_line()``), shown when
    the job runs with ``--persist-dir``; the exit code does not depend on it (a failed persist does not fail
    a job whose training succeeded, but the line says so)."""
    bar = "=" * 72
    lines = [bar, f"resilient-run: job {job!r} on node {node}: {outcome} (exit code {exit_code})",
             f"  generation: {generation if generation is not None else '-'}   restarts: {restarts}   "
             f"committed step: {committed_step if committed_step is not None else '-'}"]
    if durable is not None:
        lines.append(f"  durable checkpoint: {durable}")
    if first is not None:
        lines.append(f"  first failure: {first.cause()}")
        lines.append(f"    at {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(first.when))}, generation "
                     f"{first.generation}")
        trace = read_error_file(first.error_file)
        if trace:
            lines.append(f"    traceback (from {first.error_file}):")
            lines.extend("      " + line for line in trace.splitlines())
        else:
            lines.append("    (no error file: the worker was killed or died before recording its error)")
    lines.append(bar)
    return "\n".join(lines)
