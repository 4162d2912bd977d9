"""Fixtures for the train-function API tests: a private shm directory and a LocalRuntime on it."""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest

from resilient import env

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
