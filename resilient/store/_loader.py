"""Chooses the engine behind the store: ``resilient._native`` or its pure-Python twin.

The twin serves when the extension is not built or ``RESILIENT_NO_NATIVE=1``. Both expose the same
functions (see ``resilient/_native.pyi``).
"""

from __future__ import annotations

from functools import lru_cache
from types import ModuleType

from resilient import env
from resilient.logs import get_logger

_log = get_logger(__name__)


@lru_cache(maxsize=1)
def backend() -> ModuleType:
    """The engine module in use for this process (decided once)."""
    from resilient.store import _pynative

    if env.get_bool(env.NO_NATIVE):
        return _pynative
    try:
        from resilient import _native
    except ImportError as exc:
        _log.warning("resilient._native is not available (%s); using the pure-Python twin (slower).", exc)
        return _pynative
    if getattr(_native, "VERSION", None) != _pynative.VERSION:
        _log.warning(
            "resilient._native has version %s but the Python side expects %s; using the pure-Python twin. "
            "Rebuild with `pip install --no-build-isolation -e .`.",
            getattr(_native, "VERSION", None),
            _pynative.VERSION,
        )
        return _pynative
    return _native


def is_native() -> bool:
    """Whether the compiled extension is in use."""
    return backend().__name__ == "resilient._native"


def twin() -> ModuleType:
    from resilient.store import _pynative

    return _pynative
