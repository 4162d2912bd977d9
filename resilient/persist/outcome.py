"""What a persist attempt came to, as the agents report it: the OS error behind a failure (its errno's
name for events, a short text for the exit summary) and ``PersistAttempt``, the newest attempt an agent
remembers (``newest_attempt``: by step, and the final persist of a step over a background one)."""

from __future__ import annotations

import errno as errno_mod
from dataclasses import dataclass


def os_error_behind(exc: BaseException) -> OSError | None:
    """The first ``OSError`` with an errno in ``exc``'s chain of causes (``exc`` itself included), if any."""
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, OSError) and cur.errno is not None:
            return cur
        cur = cur.__cause__ or cur.__context__
    return None


def errno_name(exc: BaseException) -> str | None:
    """The errno name of the OS error behind ``exc``, e.g. ``ENOSPC`` (None: no OS error caused it)."""
    os_error = os_error_behind(exc)
    return None if os_error is None else errno_mod.errorcode.get(os_error.errno, str(os_error.errno))


def describe_failure(exc: BaseException) -> str:
    """Why a persist failed, short: ``ENOSPC: [Errno 28] No space left on device: '...'`` when an OS error
    caused it, else the error itself."""
    os_error = os_error_behind(exc)
    if os_error is None:
        return f"{type(exc).__name__}: {exc}"
    return f"{errno_name(os_error)}: {os_error}"


@dataclass(frozen=True)
class PersistAttempt:
    """The outcome of one persist: ``error`` None when it committed."""

    step: int
    final: bool
    error: str | None = None


def newest_attempt(last: PersistAttempt | None, attempt: PersistAttempt) -> PersistAttempt:
    """The one to remember of two: the newer step, and for one step the final persist over a background one
    (the later report of the same kind wins)."""
    if last is None or (attempt.step, attempt.final) >= (last.step, last.final):
        return attempt
    return last
