"""Named failpoints: code points where a test or the chaos harness can inject a fault.

A component marks a point with ``failpoints.hit("persist.manifest.after_rename")``; nothing happens
unless that name is armed. Arming comes from ``$RESILIENT_FAILPOINTS`` (read once at import) or from
``configure`` / ``arm`` at run time::

    RESILIENT_FAILPOINTS="persist.shard.after_fsync=panic,persist.manifest.after_write=sleep(200)"

Terms are separated by ``,`` or ``;``; each is ``name=[K>][N*]action``, where the optional ``N*`` makes
the term fire at most N times and the optional ``K>`` lets the first K hits (of each process) pass, so
``repl.commit.after_txn=10>1*panic`` dies at the eleventh commit rather than the first. Actions:

- ``panic``: ``os._exit(137)``, no clean-up, like a SIGKILL at that line.
- ``raise``: raise ``FailpointError``.
- ``sleep(ms)``: sleep that many milliseconds, then continue.
- ``enospc``: raise ``OSError(ENOSPC)``, as a full disk would.
- ``off``: disarmed (useful to override an inherited environment).

``N*`` counts per process, unless ``$RESILIENT_FAILPOINTS_STATE`` names a directory: then each firing
claims a file ``<dir>/<name>.<k>`` (``k < N``), so the N firings are shared by every process of that
environment (a worker respawned with the same ``$RESILIENT_FAILPOINTS`` does not fire again). The
native module (``native.*`` names, see ``native/src/failpoint.h``) reads the same variables.

Every firing emits a ``failpoint.fired`` event (before the action, so even ``panic`` leaves a trace).
Unarmed, ``hit`` costs one function call and one truth test of an empty dict.

A ``Registry`` holds one set of armed terms; the module-level functions act on the process-wide one.
Components that take a ``failpoints=`` argument accept a ``Registry`` or a spec string, so a test can arm
points for one object without touching the process.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import re
import threading
import time
from dataclasses import dataclass

from resilient import env, events
from resilient.errors import ConfigError, FailpointError

ACTIONS = ("panic", "raise", "sleep", "enospc", "off")
PANIC_EXIT_CODE = 137

_TERM = re.compile(r"^(?:(?P<skip>\d+)>)?(?:(?P<count>\d+)\*)?(?P<action>[a-z_]+)(?:\((?P<arg>[^()]*)\))?$")


@dataclass(frozen=True)
class Action:
    """One armed action: what to do, its argument, and how many firings are left (None: unlimited)."""

    kind: str
    arg: float | None = None
    count: int | None = None
    limit: int | None = None  # the N of N* (claims in $RESILIENT_FAILPOINTS_STATE count up to it)
    skip: int = 0  # hits still to let pass before the first firing

    def spec(self) -> str:
        prefix = (f"{self.skip}>" if self.skip else "") + (f"{self.count}*" if self.count is not None else "")
        arg = f"({self.arg:g})" if self.arg is not None else ""
        return f"{prefix}{self.kind}{arg}"


def parse_action(text: str, *, name: str = "?") -> Action:
    """Parse ``[N*]action[(arg)]``; refuses unknown actions and bad arguments with a clear message."""
    match = _TERM.match(text.strip())
    if match is None:
        raise ConfigError(
            f"Failpoint {name!r} has action {text!r}, which is not of the form [K>][N*]action[(arg)]; "
            f"use one of {', '.join(ACTIONS)}, e.g. {name}=panic or {name}=sleep(100)."
        )
    kind = match.group("action")
    if kind not in ACTIONS:
        raise ConfigError(f"Failpoint {name!r} has unknown action {kind!r}; use one of {', '.join(ACTIONS)}.")
    raw_arg = match.group("arg")
    arg: float | None = None
    if kind == "sleep":
        try:
            arg = float(raw_arg) if raw_arg is not None else None
        except ValueError as exc:
            raise ConfigError(f"Failpoint {name!r}: sleep takes milliseconds, got {raw_arg!r}.") from exc
        if arg is None or arg < 0:
            raise ConfigError(f"Failpoint {name!r}: sleep needs a non-negative duration in ms, e.g. sleep(100).")
    elif raw_arg is not None:
        raise ConfigError(f"Failpoint {name!r}: action {kind!r} takes no argument, got ({raw_arg}).")
    count = int(match.group("count")) if match.group("count") is not None else None
    skip = int(match.group("skip")) if match.group("skip") is not None else 0
    return Action(kind=kind, arg=arg, count=count, limit=count, skip=skip)


def parse_spec(spec: str | None) -> dict[str, Action]:
    """Parse ``name=action[,name=action]`` (``;`` also separates terms); empty or None: nothing armed."""
    armed: dict[str, Action] = {}
    if not spec:
        return armed
    for term in re.split(r"[,;]", spec):
        term = term.strip()
        if not term:
            continue
        name, sep, action = term.partition("=")
        name = name.strip()
        if not sep or not name:
            raise ConfigError(
                f"Failpoint term {term!r} in {spec!r} is not of the form name=action; "
                f"e.g. persist.shard.after_fsync=panic."
            )
        parsed = parse_action(action, name=name)
        if parsed.kind == "off":
            armed.pop(name, None)
        else:
            armed[name] = parsed
    return armed


class Registry:
    """A set of armed failpoints. ``hit`` is cheap while nothing is armed."""

    def __init__(self, spec: str | None = None) -> None:
        self._lock = threading.Lock()
        self._armed: dict[str, Action] = parse_spec(spec)

    def configure(self, spec: str | None) -> None:
        """Replace every armed term with those of ``spec``."""
        armed = parse_spec(spec)
        with self._lock:
            self._armed = armed

    def arm(self, name: str, action: str) -> None:
        parsed = parse_action(action, name=name)
        with self._lock:
            armed = dict(self._armed)
            if parsed.kind == "off":
                armed.pop(name, None)
            else:
                armed[name] = parsed
            self._armed = armed

    def disarm(self, name: str | None = None) -> None:
        """Disarm one point, or all of them when ``name`` is None."""
        with self._lock:
            if name is None:
                self._armed = {}
            else:
                armed = dict(self._armed)
                armed.pop(name, None)
                self._armed = armed

    def armed(self) -> dict[str, str]:
        """Armed names and their actions as spec text."""
        return {name: action.spec() for name, action in self._armed.items()}

    def hit(self, name: str, **context: object) -> None:
        """Mark the code point ``name``; fires its action if armed."""
        if not self._armed:
            return
        self._fire(name, context)

    def _fire(self, name: str, context: dict[str, object]) -> None:
        with self._lock:
            action = self._armed.get(name)
            if action is None:
                return
            if action.skip:
                self._armed = {**self._armed, name: dataclasses.replace(action, skip=action.skip - 1)}
                return
            if action.count is not None:
                claimed = _claim(name, action.limit or action.count)
                armed = dict(self._armed)
                if action.count <= 1:
                    armed.pop(name)
                else:
                    armed[name] = dataclasses.replace(action, count=action.count - 1)
                if not claimed:
                    armed.pop(name, None)
                self._armed = armed
                if not claimed:
                    return
        events.emit("failpoint.fired", name=name, action=action.spec(), **context)
        if action.kind == "panic":
            os._exit(PANIC_EXIT_CODE)
        if action.kind == "raise":
            raise FailpointError(f"Failpoint {name!r} fired (action raise); this failure was injected on purpose.")
        if action.kind == "enospc":
            raise OSError(errno.ENOSPC, f"No space left on device (injected by failpoint {name!r})")
        if action.kind == "sleep":
            time.sleep((action.arg or 0.0) / 1000.0)


def _claim(name: str, count: int) -> bool:
    """Whether this firing of a ``count``-limited term may go ahead (see the module docstring)."""
    directory = env.get(env.FAILPOINTS_STATE)
    if not directory:
        return True
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError:
        return True
    for k in range(count):
        try:
            os.close(os.open(os.path.join(directory, f"{name}.{k}"), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
            return True
        except FileExistsError:
            continue
        except OSError:
            return True  # no usable directory: per-process counting only
    return False


_global = Registry(env.get(env.FAILPOINTS))


def default() -> Registry:
    """The process-wide registry (armed from ``$RESILIENT_FAILPOINTS`` at import)."""
    return _global


def resolve(failpoints: Registry | str | None) -> Registry:
    """A ``Registry`` from a ``failpoints=`` argument: None -> the process-wide one, str -> a new one."""
    if failpoints is None:
        return _global
    if isinstance(failpoints, Registry):
        return failpoints
    if isinstance(failpoints, str):
        return Registry(failpoints)
    raise ConfigError(f"failpoints must be a Registry, a spec string or None, got {type(failpoints).__name__}.")


def hit(name: str, **context: object) -> None:
    """Mark the code point ``name`` in the process-wide registry."""
    if not _global._armed:
        return
    _global._fire(name, context)


def configure(spec: str | None) -> None:
    _global.configure(spec)


def reload_from_env() -> None:
    """Re-read ``$RESILIENT_FAILPOINTS`` (e.g. after a fork that changed the environment)."""
    _global.configure(env.get(env.FAILPOINTS))


def arm(name: str, action: str) -> None:
    _global.arm(name, action)


def disarm(name: str | None = None) -> None:
    _global.disarm(name)


def armed() -> dict[str, str]:
    return _global.armed()
