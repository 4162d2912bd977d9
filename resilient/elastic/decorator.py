"""``@resilient.elastic``: run a train function through failures and membership changes.

The loop, per worker process::

    assignment -> init process group -> Context -> fn(ctx)
      returned                      -> final snapshot, train.done, return fn's value
      peer failure / new generation -> recover.begin, tear the group down (NCCL aborted first), wait for the
                                       next generation, call fn again (state comes back via ctx.protect)
      any other exception           -> write torchelastic's error file, re-raise (the process exits non-zero
                                       and the agent handles it)

"Peer failure" is an error from a collective (gloo raises when a peer closes its connection, or when the
runtime's generation watcher shut the group's connections down because the agent announced a newer
generation; NCCL is aborted) or ``GenerationChangedError`` (raised by ``ctx.steps()`` when the agent
announced a newer generation); any exception raised while the runtime reports a pending generation counts
too, because it was caused by the membership change.
"""

from __future__ import annotations

import functools
import inspect
import json
import numbers
import os
import time
import traceback
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable

import torch

from resilient import env, events, logs
from resilient.elastic import distributed
from resilient.elastic.context import Context, Recovery
from resilient.elastic.snapshots import SnapshotWriter
from resilient.errors import ConfigError, RendezvousClosedError
from resilient.runtime.api import WorkerAssignment, WorkerRuntime

log = logs.get_logger(__name__)


@dataclass(frozen=True)
class ElasticConfig:
    """Settings of one decorated train function (argument > environment > default)."""

    snapshot_every: int = 1  # snapshot after every N steps; 0: only ctx.snapshot() and the final one
    backend: str | None = None  # None: RESILIENT_BACKEND, else nccl on CUDA and gloo on CPU
    device: str | None = None  # None: cuda:<local_rank> when CUDA is available, else cpu
    seed: int = 0  # seeds per-rank RNGs after a world-size change (with step and rank)
    pg_timeout_s: float = 300.0  # collective timeout (failures are detected by the agent, not by this)
    generation_timeout_s: float = 1800.0  # longest wait for the next generation
    # the final snapshot (end of training, or a stop request) waits this long for its commit before the
    # function returns; periodic snapshots never wait (see resilient.elastic.cadence)
    commit_wait_s: float = 30.0
    # data-parallel deduplication: model and optimizer state is the same on every rank, so each rank
    # snapshots only its 1/N slice of it (and its own per-rank state); restore puts the whole back together
    dedup: bool = False

    def __post_init__(self) -> None:
        _whole("snapshot_every", self.snapshot_every, "(0 turns periodic snapshots off)")
        if self.snapshot_every < 0:
            raise ConfigError(
                f"snapshot_every={self.snapshot_every} must be >= 0 (0 turns periodic snapshots off)."
            )
        if self.backend is not None and self.backend not in BACKENDS:
            raise ConfigError(f"backend={self.backend!r} is not a torch.distributed backend; use one of "
                              f"{', '.join(BACKENDS)}, or leave it unset to get nccl on CUDA and gloo on CPU.")
        if self.device is not None:
            try:
                torch.device(self.device)
            except (RuntimeError, TypeError, ValueError) as exc:
                raise ConfigError(f"device={self.device!r} is not a torch device; use 'cpu', 'cuda', 'cuda:0' ... "
                                  "(or leave it unset to pick one from the host).") from exc
        _whole("seed", self.seed, "(it seeds per-rank RNGs after a world-size change)")
        for name in ("commit_wait_s", "pg_timeout_s", "generation_timeout_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ConfigError(f"{name}={value!r} must be a number of seconds.")
        if self.commit_wait_s < 0:
            raise ConfigError(f"commit_wait_s={self.commit_wait_s} must be >= 0 seconds.")
        if self.pg_timeout_s <= 0 or self.generation_timeout_s <= 0:
            raise ConfigError(
                f"pg_timeout_s ({self.pg_timeout_s}) and generation_timeout_s ({self.generation_timeout_s}) "
                "must be positive numbers of seconds."
            )
        if not isinstance(self.dedup, bool):
            raise ConfigError(f"dedup={self.dedup!r} must be True or False.")


BACKENDS = ("gloo", "nccl", "mpi", "ucc", "xccl")


def _whole(name: str, value: Any, note: str) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ConfigError(f"{name}={value!r} must be a whole number {note}.")


def _check_train_signature(train: Callable[..., Any]) -> None:
    """The decorator calls ``train(ctx, *args, **kwargs)``: refuse a function that cannot take the Context
    positionally, at decoration rather than at the first call."""
    try:
        params = inspect.signature(train).parameters.values()
    except (TypeError, ValueError):  # a builtin or C callable without a signature: nothing to check
        return
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD,
                  inspect.Parameter.VAR_POSITIONAL)
    if not any(p.kind in positional for p in params):
        name = getattr(train, "__name__", "train")
        raise ConfigError(
            f"@resilient.elastic: {name}() takes no positional parameter, but it is called with the Context as its "
            f"first argument; define it as `def {name}(ctx, ...):` and read rank, device and the step loop from ctx."
        )


def elastic(
    fn: Callable[..., Any] | None = None,
    *,
    snapshot_every: int | None = None,
    backend: str | None = None,
    device: str | None = None,
    seed: int = 0,
    pg_timeout_s: float = 300.0,
    generation_timeout_s: float = 1800.0,
    commit_wait_s: float = 30.0,
    dedup: bool | None = None,
    runtime: Callable[[], WorkerRuntime] | None = None,
) -> Any:
    """Decorate ``fn(ctx, *args, **kwargs)``; usable bare (``@elastic``) or with arguments.

    ``runtime`` is a factory for the ``WorkerRuntime`` (default: chosen from the environment).
    ``dedup=True`` (default: ``RESILIENT_DEDUP``): data-parallel deduplication, see ``resilient.elastic.dedup``."""

    if fn is not None and not callable(fn):
        raise ConfigError(
            f"@resilient.elastic({fn!r}): the decorator takes keyword arguments only, e.g. "
            "@resilient.elastic(snapshot_every=10)."
        )
    if runtime is not None and not callable(runtime):
        raise ConfigError(f"@resilient.elastic(runtime={runtime!r}): runtime must be a callable that returns a "
                          "WorkerRuntime (or left out).")
    # Validated now, at decoration, not at the first call: the arguments as given (the environment's
    # defaults for those left out are read, and checked, at each call).
    try:
        ElasticConfig(
            snapshot_every=1 if snapshot_every is None else snapshot_every,
            backend=backend,
            device=device,
            seed=seed,
            pg_timeout_s=pg_timeout_s,
            generation_timeout_s=generation_timeout_s,
            commit_wait_s=commit_wait_s,
            dedup=False if dedup is None else dedup,
        )
    except ConfigError as exc:
        raise ConfigError(f"@resilient.elastic: {exc}") from None

    def wrap(train: Callable[..., Any]) -> Callable[..., Any]:
        if not callable(train):
            raise ConfigError(f"@resilient.elastic decorates a train function; got {train!r}.")
        _check_train_signature(train)

        @functools.wraps(train)
        def run(*args: Any, **kwargs: Any) -> Any:
            # the arguments were checked at decoration; what the environment fills in is checked here, by name
            every = snapshot_every
            if every is None:
                every = env.get_int(env.SNAPSHOT_EVERY, 1)
                _check_from_env(env.SNAPSHOT_EVERY, lambda: ElasticConfig(snapshot_every=every))
            chosen = backend
            if chosen is None:
                chosen = env.get(env.BACKEND)
                if chosen is not None:
                    _check_from_env(env.BACKEND, lambda: ElasticConfig(backend=chosen))
            config = ElasticConfig(
                snapshot_every=every,
                backend=chosen,
                device=device,
                seed=seed,
                pg_timeout_s=pg_timeout_s,
                generation_timeout_s=generation_timeout_s,
                commit_wait_s=commit_wait_s,
                dedup=env.get_bool(env.DEDUP) if dedup is None else dedup,
            )
            return Driver(train, config, runtime).run(args, kwargs)

        return run

    return wrap(fn) if fn is not None else wrap


def _check_from_env(variable: str, build: Callable[[], ElasticConfig]) -> None:
    """``build`` a config holding the value of ``variable`` alone; its ``ConfigError`` names the variable."""
    try:
        build()
    except ConfigError as exc:
        raise ConfigError(f"{exc} The value came from ${variable}: fix or unset it.") from exc


def _device_for(config: ElasticConfig, assignment: WorkerAssignment) -> torch.device:
    requested = config.device or env.get(env.DEVICE)  # argument > RESILIENT_DEVICE > what the host has
    if requested is not None:
        dev = torch.device(requested)
        if dev.type == "cuda" and dev.index is None:
            if not torch.cuda.is_available():
                raise ConfigError(f"{env.DEVICE}={requested!r} asks for CUDA but torch sees no CUDA device.")
            return torch.device("cuda", assignment.local_rank % torch.cuda.device_count())
        return dev
    if config.backend != "gloo" and torch.cuda.is_available():
        return torch.device("cuda", assignment.local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def write_error_file(exc: BaseException) -> str | None:
    """Record ``exc`` in ``TORCHELASTIC_ERROR_FILE`` (torch.distributed.elastic's ``record`` format)."""
    path = env.get(env.ERROR_FILE)
    if not path:
        return None
    data = {
        "message": {
            "message": f"{type(exc).__name__}: {exc}",
            "extraInfo": {
                "py_callstack": "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)),
                "timestamp": str(int(time.time())),
            },
        }
    }
    try:
        with open(path, "w", encoding="utf-8") as fh:
            json.dump(data, fh)
    except OSError as err:
        log.error("could not write the error file %s: %s", path, err)
        return None
    return path


def _process_age_s() -> float | None:
    try:
        import psutil

        return max(0.0, time.time() - psutil.Process(os.getpid()).create_time())
    except (ImportError, OSError) as exc:
        log.debug("process start time unknown: %s", exc)
        return None


class Driver:
    """One decorated call: the recovery loop described in the module docstring."""

    def __init__(
        self, fn: Callable[..., Any], config: ElasticConfig, runtime_factory: Callable[[], WorkerRuntime] | None
    ) -> None:
        self.fn = fn
        self.config = config
        self._runtime_factory = runtime_factory

    def run(self, args: tuple, kwargs: dict) -> Any:
        if self._runtime_factory is None:
            from resilient.runtime.select import runtime_from_env

            runtime = runtime_from_env()
        else:
            runtime = self._runtime_factory()
        writer = SnapshotWriter(runtime, dedup=self.config.dedup)
        # the moment the agent announces a newer generation, collectives of the current one fail
        runtime.watch_generation(distributed.abort_collectives)
        try:
            return self._loop(runtime, writer, args, kwargs)
        except Exception as exc:
            write_error_file(exc)
            distributed.teardown(abort=True)  # peers may be gone: never wait on them on the way out
            raise
        finally:
            distributed.teardown(abort=False)
            writer.close()
            runtime.close()

    def _loop(self, runtime: WorkerRuntime, writer: SnapshotWriter, args: tuple, kwargs: dict) -> Any:
        assignment = runtime.assignment()
        self._identify(assignment)
        events.emit("worker.ready", rank=assignment.rank, import_s=_process_age_s())
        recovery: Recovery | None = None
        while True:
            device = _device_for(self.config, assignment)
            if device.type == "cuda":
                torch.cuda.set_device(device)
            backend = self.config.backend or distributed.default_backend(device)
            try:
                began = time.monotonic()
                distributed.init(
                    assignment,
                    rendezvous=getattr(runtime, "rendezvous", "agent"),
                    backend=backend,
                    device=device,
                    timeout=timedelta(seconds=self.config.pg_timeout_s),
                    superseded=runtime.pending_generation,
                )
                if recovery is not None:
                    recovery.phases["pg_init_s"] = time.monotonic() - began
                ctx = Context(
                    runtime=runtime,
                    assignment=assignment,
                    device=device,
                    writer=writer,
                    snapshot_every=self.config.snapshot_every,
                    seed=self.config.seed,
                    recovery=recovery,
                    commit_wait_s=self.config.commit_wait_s,
                )
                result = self.fn(ctx, *args, **kwargs)
            except Exception as exc:
                if not (distributed.is_collective_failure(exc) or runtime.pending_generation()):
                    raise
                recovery, assignment = self._recover(runtime, assignment, exc)
                continue
            ctx._finish()
            distributed.teardown(abort=False)
            return result

    def _recover(
        self, runtime: WorkerRuntime, assignment: WorkerAssignment, exc: BaseException
    ) -> tuple[Recovery, WorkerAssignment]:
        reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}".strip()
        began = time.monotonic()
        events.emit("recover.begin", reason=reason)
        log.warning("generation %d failed (%s); recovering in-process", assignment.generation, reason)
        recovery = Recovery(reason=reason, began=began)
        distributed.teardown(abort=True)
        recovery.phases["teardown_s"] = time.monotonic() - began
        waited = time.monotonic()
        try:
            new = runtime.wait_for_generation(after=assignment.generation, timeout=self.config.generation_timeout_s)
        except RendezvousClosedError as closed:
            log.error("no new generation will form (%s); giving up with the original error", closed)
            raise exc from closed
        recovery.phases["generation_s"] = time.monotonic() - waited
        if new.world_size != assignment.world_size:
            log.info(
                "world size changes from %d to %d in generation %d", assignment.world_size, new.world_size, new.generation
            )
        self._identify(new)
        return recovery, new

    @staticmethod
    def _identify(assignment: WorkerAssignment) -> None:
        logs.set_identity(
            job=assignment.job_id, node=assignment.node_id, rank=assignment.rank, gen=assignment.generation, step=None
        )
