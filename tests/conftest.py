"""Project-wide test settings: one thread per worker on these 2-core machines, quiet logs."""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ.setdefault("PYTHONUNBUFFERED", "1")
