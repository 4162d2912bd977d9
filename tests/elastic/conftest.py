"""Fixtures for the train-function API tests: a private shm directory and a LocalRuntime on it, and the
environment of a worker script run as a real process."""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest

from resilient import env, events

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPTS = os.path.join(REPO, "tests", "elastic", "scripts")


def script_env(shm_dir: str, **extra: str) -> dict[str, str]:
    """A worker environment: source tree on the path, one thread, no launcher variables inherited."""
    launcher = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "GROUP_RANK")
    out = {
        k: v for k, v in os.environ.items() if not k.startswith(("RESILIENT_", "TORCHELASTIC_")) and k not in launcher
    }
    out["PYTHONPATH"] = REPO + os.pathsep + out.get("PYTHONPATH", "")
    out["OMP_NUM_THREADS"] = "1"
    out["RESILIENT_SHM_DIR"] = shm_dir
    out.update(extra)
    return out


@pytest.fixture
def shm_dir(monkeypatch):
    """A directory on /dev/shm (tmpfs) for this test's segments, removed afterwards."""
    base = "/dev/shm" if os.path.isdir("/dev/shm") else None
    path = tempfile.mkdtemp(prefix="resilient-test-elastic-", dir=base)
    monkeypatch.setenv(env.SHM_DIR, path)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def local_runtime(shm_dir):
    from resilient.runtime.local import LocalRuntime

    runtime = LocalRuntime(mode="single")
    yield runtime
    runtime.close()


@pytest.fixture
def event_log(tmp_path):
    """This process's events go to a file for the test; the fixture reads them back: ``kind -> [events]``."""
    path = str(tmp_path / "events.jsonl")
    events.open_log(path)
    yield lambda kind: [e for e in events.read(path) if e["kind"] == kind]
    events.open_log(None)
