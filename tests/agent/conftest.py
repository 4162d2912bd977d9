"""Helpers for the launcher tests: run real ``resilient-run`` processes and read their event logs."""

from __future__ import annotations

import os
import pathlib
import signal
import contextlib
import subprocess
import sys
import time

import pytest

from resilient import events

ROOT = pathlib.Path(__file__).resolve().parents[2]
SCRIPTS = pathlib.Path(__file__).resolve().parent / "scripts"


class Launched:
    """One ``resilient-run`` process (its own session, so a test can kill it and everything below it)."""

    def __init__(self, args: list[str], tmp: pathlib.Path, name: str, extra_env: dict[str, str] | None = None) -> None:
        self.events_path = str(tmp / f"{name}.events.jsonl")
        self.log_path = tmp / f"{name}.log"
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        env["OMP_NUM_THREADS"] = "1"
        env.pop("PYTEST_CURRENT_TEST", None)
        env.update(extra_env or {})
        self._log = open(self.log_path, "wb")
        cmd = [sys.executable, "-m", "resilient.run", "--event-log", self.events_path, *args]
        self.proc = subprocess.Popen(cmd, cwd=str(ROOT), env=env, stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True)

    def events(self, kind: str | None = None) -> list[dict]:
        evs = events.read(self.events_path)
        return [e for e in evs if kind is None or e["kind"] == kind]

    def wait_event(self, pred, timeout: float, what: str) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for e in events.read(self.events_path):
                if pred(e):
                    return e
            if self.proc.poll() is not None:
                break
            time.sleep(0.1)
        raise AssertionError(f"no event {what} within {timeout}s (exit {self.proc.poll()}):\n{self.output()[-4000:]}")

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"resilient-run did not exit within {timeout}s:\n{self.output()[-4000:]}") from None

    def output(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def kill(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(10)
        self._log.close()


@contextlib.contextmanager
def agent_runtime(tmp_path: pathlib.Path, snapshots, **service_kw):
    """A worker's ``AgentRuntime`` against a real ``WorkerService`` (no agent process): yields
    ``(hub, control, runtime)`` with slot 0 assigned generation 1."""
    from resilient.agent.hub import WorkerHub
    from resilient.agent.worker_service import WorkerService, serve
    from resilient.runtime.agent_client import AgentRuntime
    from resilient.runtime.control import ControlBlock

    hub = WorkerHub()
    hub.publish(1, {0: one_rank_assignment(1)})
    sock = str(tmp_path / "agent.sock")
    server = serve(WorkerService(hub, snapshots, **service_kw), sock, max_workers=4)
    control = ControlBlock.create(str(tmp_path / "control"), 1)
    runtime = AgentRuntime(sock, control.path, 0)
    try:
        yield hub, control, runtime
    finally:
        runtime.close()
        server.stop(grace=None)
        control.unlink()


def one_rank_assignment(generation: int):
    from resilient.runtime.api import WorkerAssignment

    return WorkerAssignment(generation=generation, rank=0, local_rank=0, world_size=1, local_world_size=1,
                            group_rank=0, master_addr="127.0.0.1", master_port=1, restart_count=0, job_id="j",
                            node_id="n")


def worker_pids(run: Launched, rank: int) -> list[int]:
    return [e["pid"] for e in run.events("worker.start") if e["rank"] == rank]


def step_done(rank: int | None = None, at_least: int = 0, world_size: int | None = None):
    def pred(e: dict) -> bool:
        return (e["kind"] == "step.done" and e["step"] >= at_least and (rank is None or e["rank"] == rank)
                and (world_size is None or e.get("world_size") == world_size))

    return pred


@pytest.fixture
def launch(tmp_path):
    started: list[Launched] = []

    def start(args: list[str], name: str = "agent", env: dict[str, str] | None = None) -> Launched:
        run = Launched(args, tmp_path, name, env)
        started.append(run)
        return run

    yield start
    for run in started:
        run.kill()
    report(started)


def report(runs: list[Launched]) -> None:
    """Print the end of every run's log at teardown: pytest shows it only when the test failed, so a failure
    shows every agent's view, not just the one the test was waiting on."""
    for run in runs:
        print(f"==== {run.log_path.stem}: last lines ====\n{run.log_path.read_text(errors='replace')[-3000:]}")


@pytest.fixture(scope="module")
def etcd_server():
    from resilient.testing.etcd import running_etcd

    with running_etcd() as server:
        yield server


@pytest.fixture(autouse=True)
def _no_leftovers():
    """Agents killed by a test cannot clean up: remove their run dirs and segments afterwards."""
    yield
    from resilient.agent.agent import reclaim_stale_run_dirs
    from resilient.store.registry import list_segments, reclaim_stale

    if os.path.isdir("/dev/shm"):
        reclaim_stale_run_dirs("/dev/shm")
    for job in {seg.job for seg in list_segments() if not seg.owner_alive}:
        if job.startswith(("standalone-", "two-", "freeze-")):
            reclaim_stale(job=job)
