"""Project-wide test settings: one thread per worker on these 2-core machines, quiet logs."""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ.setdefault("PYTHONUNBUFFERED", "1")


import pytest


@pytest.fixture(autouse=True)
def _fresh_log_identity():
    """Each test starts with no job/node/rank identity: events and logs of one test never carry another's."""
    from resilient import logs

    saved = logs.identity()
    logs.set_identity(job="-", node="-", rank=None, gen=None, step=None)
    yield
    logs.set_identity(**saved)
