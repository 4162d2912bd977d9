"""resilient: a fault-tolerant, elastic training runtime for PyTorch.

Public API: ``@resilient.elastic`` (the decorator), ``resilient.Context`` (what the train function
receives), ``resilient.data`` (``ElasticSampler``) and ``resilient.state_hash``. They are loaded lazily,
so processes that never train (the agent, the chaos harness) do not import torch through this package.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["Context", "data", "elastic", "state_hash", "__version__"]

_LAZY = {
    "Context": ("resilient.elastic.context", "Context"),
    "state_hash": ("resilient.elastic.exactness", "state_hash"),
}

if TYPE_CHECKING:
    from resilient import data
    from resilient.elastic.context import Context
    from resilient import elastic
    from resilient.elastic.exactness import state_hash


def __getattr__(name: str) -> Any:
    if name in ("data", "elastic"):
        return importlib.import_module(f"resilient.{name}")  # resilient.elastic is callable: the decorator
    if name in _LAZY:
        module, attr = _LAZY[name]
        value = getattr(importlib.import_module(module), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'resilient' has no attribute {name!r}")
