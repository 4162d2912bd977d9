"""What runs first inside every worker process, spawned or forked: tie the worker's life to its agent,
make its Python stacks dumpable from outside, then run the user's script as ``__main__``.

* ``PR_SET_PDEATHSIG(SIGKILL)``: the worker dies with the process that started it (the agent, or the
  zygote, which itself dies with the agent), so workers never outlive their agent.
* ``faulthandler`` on ``SIGUSR1``: the agent sends SIGUSR1 to a hung worker and its stacks (all threads)
  land in the worker's stderr, written by a C-level handler that works while C code holds the GIL.
* Freed memory is kept for reuse (``retain_heap``): an in-process recovery frees the model and optimizer
  and the train function builds them again at the same sizes; with glibc's defaults every tensor above
  32 MB is its own ``mmap``, returned at ``free``, so the rebuild page-faults all of it in again
  (~0.4 s per GB on the machines we measured). ``RESILIENT_RETAIN_HEAP=0`` turns it off.
* An uncaught exception is written to ``$TORCHELASTIC_ERROR_FILE`` in torchelastic's JSON format (unless
  the script's own ``@record`` already wrote it), so the agent's exit summary can show the traceback.

``python -m resilient.agent.bootstrap --agent-pid PID [-m] TARGET ARGS...`` is the plain-spawn entry point;
the zygote calls ``prepare`` and ``run_target`` directly in its forked child.
"""

from __future__ import annotations

import ctypes
import faulthandler
import json
import os
import runpy
import signal
import sys
import time
import traceback

PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36
ERROR_FILE_ENV = "TORCHELASTIC_ERROR_FILE"


def _prctl(option: int, value: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(option, value, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl({option}, {value}) failed: {os.strerror(err)}")


def die_with_parent(expected_parent: int | None) -> None:
    """SIGKILL this process when its parent dies; exit now if the expected parent is already gone."""
    if not sys.platform.startswith("linux"):
        return
    _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if expected_parent is not None and os.getppid() != expected_parent:
        os._exit(137)


def become_subreaper() -> None:
    """Orphaned descendants (workers forked by the zygote) are re-parented to this process."""
    if sys.platform.startswith("linux"):
        _prctl(PR_SET_CHILD_SUBREAPER, 1)


M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_MAX = (1 << 31) - 1  # mallopt takes an int


def retain_heap() -> bool:
    """Make glibc's malloc keep freed memory: blocks up to 2 GB come from the heap, not from their own
    ``mmap``, and the heap is never trimmed. Memory then stays with the process at its peak (as a
    caching allocator's does), and new blocks are carved from freed ones where those coalesced (a model
    freed whole does; a freed block pinned between live small objects is reused only by a block that fits
    it, and glibc's aligned allocations need a little more than the same size). Returns False where it
    does not apply (not glibc, or glibc refused a setting)."""
    from resilient import env

    if not env.get_bool(env.RETAIN_HEAP, default=True):
        return False
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False  # not glibc
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    # M_TRIM_THRESHOLD -1: never trim (documented in mallopt(3))
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX)) and bool(mallopt(M_TRIM_THRESHOLD, -1))


def prepare(expected_parent: int | None) -> None:
    die_with_parent(expected_parent)
    faulthandler.register(signal.SIGUSR1, file=sys.stderr, all_threads=True, chain=False)
    retain_heap()


def write_error_file(exc: BaseException) -> None:
    path = os.environ.get(ERROR_FILE_ENV)
    if not path or os.path.exists(path):
        return
    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    payload = {
        "message": {
            "message": f"{type(exc).__name__}: {exc}",
            "extraInfo": {"py_callstack": tb, "timestamp": str(int(time.time()))},
        }
    }
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(payload, fh)
    os.replace(tmp, path)


def emit_exec(how: str) -> None:
    """``worker.exec``: the worker reached user code; ``startup_s`` counts from the agent's spawn/fork request."""
    from resilient import env, events

    started = env.get(env.SPAWN_MONO)
    startup = time.monotonic() - float(started) if started else None
    events.emit("worker.exec", rank=env.get_int(env.RANK), how=how, startup_s=startup)


def run_target(target: str, args: list[str], *, module: bool) -> int:
    """Run a script (or module) as ``__main__``; returns the exit code it asked for."""
    sys.argv = [target, *args]
    if not module:
        sys.path.insert(0, os.path.dirname(os.path.abspath(target)))
    try:
        if module:
            runpy.run_module(target, run_name="__main__", alter_sys=True)
        else:
            runpy.run_path(target, run_name="__main__")
    except SystemExit as exc:
        code = exc.code
        if code is None:
            return 0
        if isinstance(code, int):
            return code
        print(code, file=sys.stderr)
        return 1
    except BaseException as exc:  # the worker's own failure: recorded for the summary, then reported
        write_error_file(exc)
        traceback.print_exception(type(exc), exc, exc.__traceback__)
        return 1
    return 0


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    agent_pid = None
    module = False
    while argv and argv[0].startswith("-"):
        flag = argv.pop(0)
        if flag == "--agent-pid":
            agent_pid = int(argv.pop(0))
        elif flag == "-m":
            module = True
        elif flag == "--":
            break
        else:
            raise SystemExit(f"resilient.agent.bootstrap: unknown option {flag!r}")
    if not argv:
        raise SystemExit("resilient.agent.bootstrap: no target script given")
    prepare(agent_pid)
    emit_exec("spawn")
    target, args = argv[0], argv[1:]
    code = run_target(target, args, module=module)
    sys.stdout.flush()
    sys.stderr.flush()
    raise SystemExit(code)


if __name__ == "__main__":
    main()
