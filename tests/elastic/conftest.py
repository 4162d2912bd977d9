"""Fixtures for the train-function API tests: a private shm directory and a LocalRuntime on it."""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest

from resilient import env, events

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
