"""Fixtures for the store tests: a private shm directory per test, both engines, child processes."""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest

from resilient.store import _loader, _pynative



@pytest.fixture
def shm_dir():
    base = os.environ.get("RESILIENT_SHM_DIR") or ("/dev/shm" if os.path.isdir("/dev/shm") else None)
    path = tempfile.mkdtemp(prefix="resilient-test-", dir=base)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def engines():
    out = [pytest.param(_pynative, id="twin")]
    if _loader.is_native():
        out.insert(0, pytest.param(_loader.backend(), id="native"))
    return out


@pytest.fixture(params=engines())
def engine(request, monkeypatch):
    """Run the test with the native engine and again with the pure-Python twin."""
    import resilient.store.segment as segment_mod
    import resilient.store.transport as transport_mod

    monkeypatch.setattr(segment_mod, "backend", lambda: request.param)
    monkeypatch.setattr(transport_mod, "backend", lambda: request.param)
    return request.param
