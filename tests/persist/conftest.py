"""Fixtures for the durable-checkpoint tests."""

from __future__ import annotations

import logging

import pytest


@pytest.fixture
def ckpt_dir(tmp_path):
    path = tmp_path / "ckpt"
    path.mkdir()
    return str(path)


@pytest.fixture
def events_seen():
    """A list that ``on_event=events_seen.append`` fills."""
    return []


@pytest.fixture
def warnings_logged(caplog):
    """caplog, also recording WARNING and above from the ``resilient`` loggers (which do not propagate to root)."""
    logger = logging.getLogger("resilient")
    logger.addHandler(caplog.handler)
    caplog.set_level(logging.WARNING)
    try:
        yield caplog
    finally:
        logger.removeHandler(caplog.handler)
