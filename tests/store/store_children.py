"""Starting store child processes (``store_child.py``) from tests, with the source tree importable."""

from __future__ import annotations

import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
CHILD = os.path.join(HERE, "store_child.py")


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    return env


def spawn_child(*args: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, CHILD, *args], env=child_env(), text=True, **kwargs)
