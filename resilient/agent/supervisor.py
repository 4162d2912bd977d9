"""Worker processes of one node: start (fork from the zygote or plain spawn), reap, signal, stop, dump stacks.

A replacement worker comes from the standby when one is ready (``keep_standby``: a worker forked from
the zygote ahead of need, its heap already faulted in to the size the workers use; see ``zygote``).

Workers are started in their own process group so that a stop reaches their children too; they die with
the agent (``PR_SET_PDEATHSIG``, set by ``bootstrap``). Exits are collected with ``waitpid`` (forked
workers are re-parented to the agent, a child subreaper), so the real exit code or signal is always known.
A failure is known earlier, when the kernel starts tearing the process down (``deathwatch``: its exit
status is readable then); such a worker counts as exited at once and is reaped when the teardown ends
(``Supervisor.reap``, every monitor tick).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from resilient import env, events
from resilient.agent import deathwatch, hang
from resilient.agent.zygote import Standby, ZygoteClient, launch_request
from resilient.errors import WorkerError
from resilient.logs import get_logger
from resilient.runtime.control import ControlBlock

log = get_logger(__name__)


@dataclass
class WorkerHandle:
    """One worker process (a slot's current incarnation)."""

    slot: int
    rank: int
    generation: int
    pid: int
    how: str  # "fork" | "standby" | "spawn"
    control: ControlBlock
    error_file: str
    stdout_path: str | None
    stderr_path: str | None
    started_mono: float
    popen: subprocess.Popen | None = None
    registered: bool = False
    exitcode: int | None = None  # os.waitstatus_to_exitcode: negative for a signal
    stopping: bool = False  # the agent is stopping it: its exit is not a failure
    generation_handed_ns: int = field(default_factory=time.monotonic_ns)
    reaped: bool = False  # waited for: the process is gone (exitcode may be known earlier, see poll)
    killed_for: str | None = None  # "hung" (hang timeout) | "stuck" (leave timeout): why the agent killed it
    leave_clock: hang.LeaveClock = field(default_factory=hang.LeaveClock)  # time had to leave an ended generation

    @property
    def alive(self) -> bool:
        return self.exitcode is None

    def poll(self) -> int | None:
        """The exit code once the worker exited, else None. A failure counts from the moment the kernel
        starts tearing the process down (``deathwatch.failing_status``), before it can be reaped."""
        if self.exitcode is None and not self.reap():
            status = deathwatch.failing_status(self.pid)
            if status is not None:
                self.exitcode = os.waitstatus_to_exitcode(status)
        return self.exitcode

    def reap(self) -> bool:
        """Wait for the process if it has exited (setting ``exitcode`` if still unknown); True once it is gone."""
        if self.reaped:
            return True
        if self.popen is not None:
            code = self.popen.poll()
            if code is None:
                return False
        else:
            try:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:
                # not our child (should not happen): fall back to existence
                if pid_exists(self.pid):
                    return False
                pid, status = self.pid, signal.SIGKILL
            if pid == 0:
                return False
            code = os.waitstatus_to_exitcode(status)
        self.reaped = True
        if self.exitcode is None:
            self.exitcode = code
        elif code != self.exitcode:
            log.warning("rank %d pid %d was reaped with %s, not the %s its exit began with", self.rank, self.pid,
                        describe_exit(code), describe_exit(self.exitcode))
        return True

    def signal_group(self, sig: int) -> None:
        if not self.alive:
            return
        try:
            os.killpg(self.pid, sig)
        except (ProcessLookupError, PermissionError):
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                pass


def pid_exists(pid: int) -> bool:
    """Whether a process ``pid`` exists (one of another user's counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def describe_exit(code: int | None) -> str:
    if code is None:
        return "running"
    if code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"exit code {code}"


class Supervisor:
    """Starts and stops this node's workers. ``zygote`` may be None (plain spawn only)."""

    # a standby is warmed again only when the workers' memory grew by more than this fraction
    REWARM_GROWTH = 0.1
    # how long a worker dumping its own stacks (faulthandler) gets before it is killed
    DUMP_WAIT_S = 1.0

    def __init__(self, *, target: str, args: list[str], module: bool, no_python: bool,
                 zygote: ZygoteClient | None, tee: tuple[bool, bool], standby: bool = True,
                 on_dying: Callable[[], None] | None = None) -> None:
        self._target = target
        self._args = args
        self._module = module
        self._no_python = no_python
        self._zygote = zygote
        self._tee = tee
        self._tailers: list[_Tailer] = []
        self._logged_choice: str | None = None
        self._standby_on = standby and zygote is not None and not no_python
        self._standby: Standby | None = None
        self._unreaped: list[WorkerHandle] = []
        self._deathwatch = deathwatch.DeathWatch(lambda _pid: on_dying()) if on_dying is not None else None

    def keep_standby(self, warm_bytes: int) -> None:
        """Have one standby ready, warmed to ``warm_bytes`` of anonymous memory (a worker's); forks one
        from the zygote when there is none. Cheap when nothing changed: call it as often as convenient."""
        if not self._standby_on or self._zygote is None or not self._zygote.usable():
            return
        sb = self._standby
        if sb is not None and not sb.alive():
            log.warning("standby pid %d exited (%s); forking another", sb.pid, describe_exit(sb.exitcode))
            sb.close()
            sb = self._standby = None
        try:
            if sb is None:
                sb = self._standby = self._zygote.standby()
                events.emit("standby.start", pid=sb.pid)
                log.info("standby worker pid %d forked (replaces the next failed worker)", sb.pid)
            if warm_bytes > sb.warmed_to * (1 + self.REWARM_GROWTH):
                sb.warm(warm_bytes)
                log.debug("standby pid %d warms its heap to %d bytes", sb.pid, warm_bytes)
        except WorkerError as exc:
            log.warning("no standby worker: %s; replacements are forked when needed", exc)
            if self._standby is not None:
                self._standby.close()
                self._standby = None

    def _take_standby(self, request: dict) -> int | None:
        """The standby turned into the worker ``request`` describes (its pid), or None when there is none."""
        sb, self._standby = self._standby, None
        if sb is None:
            return None
        try:
            return sb.activate(request)
        except WorkerError as exc:
            log.warning("the standby could not take over (%s); forking the worker instead", exc)
            sb.close()
            return None

    def start(self, *, slot: int, rank: int, generation: int, env_vars: dict[str, str], control: ControlBlock,
              error_file: str, stdout_path: str | None, stderr_path: str | None) -> WorkerHandle:
        env_vars = dict(env_vars)
        env_vars[env.SPAWN_MONO] = repr(time.monotonic())
        for path in (stdout_path, stderr_path, error_file):
            if path:
                os.makedirs(os.path.dirname(path), exist_ok=True)
        if os.path.exists(error_file):
            os.unlink(error_file)
        how, pid, popen = self._launch(env_vars, stdout_path, stderr_path)
        handle = WorkerHandle(slot=slot, rank=rank, generation=generation, pid=pid, how=how, control=control,
                              error_file=error_file, stdout_path=stdout_path, stderr_path=stderr_path,
                              started_mono=time.monotonic(), popen=popen)
        control.set("worker_pid", pid)
        self._unreaped.append(handle)
        if self._deathwatch is not None:
            self._deathwatch.watch(pid)
        events.emit("worker.start", rank=rank, local_rank=slot, pid=pid, how=how)
        log.info("started rank %d (local %d) pid %d by %s", rank, slot, pid, how)
        for stream, path, on in (("stdout", stdout_path, self._tee[0]), ("stderr", stderr_path, self._tee[1])):
            if on and path:
                self._tailers.append(_Tailer(path, f"[{rank}]:", sys.stdout if stream == "stdout" else sys.stderr))
        return handle

    def _launch(self, env_vars: dict[str, str], stdout_path: str | None,
                stderr_path: str | None) -> tuple[str, int, subprocess.Popen | None]:
        choice_reason = None
        if self._no_python:
            choice_reason = "--no-python: the target is not a Python script"
        elif self._zygote is None:
            choice_reason = "the zygote is off (--no-zygote)"
        elif not self._zygote.usable():
            choice_reason = f"forking is unsafe or unavailable: {self._zygote.why}"
        if choice_reason is None:
            request = launch_request(target=self._target, args=self._args, module=self._module, env=env_vars,
                                     cwd=os.getcwd(), stdout=stdout_path, stderr=stderr_path)
            pid = self._take_standby(request)
            if pid is not None:
                return "standby", pid, None
            try:
                pid = self._zygote.fork(**request)
                self._log_choice("fork", "workers are forked from the warm zygote (torch already imported)")
                return "fork", pid, None
            except WorkerError as exc:
                choice_reason = str(exc)
        self._log_choice("spawn", f"workers are started with a plain spawn: {choice_reason}")
        if self._no_python:
            cmd = [self._target, *self._args]
        else:
            cmd = [sys.executable, "-u", "-m", "resilient.agent.bootstrap", "--agent-pid", str(os.getpid())]
            cmd += (["-m"] if self._module else []) + ["--", self._target, *self._args]
        out = open(stdout_path, "ab") if stdout_path else None
        err = open(stderr_path, "ab") if stderr_path else None
        try:
            popen = subprocess.Popen(cmd, env=env_vars, stdout=out, stderr=err, stdin=subprocess.DEVNULL,
                                     process_group=0)
        except OSError as exc:
            raise WorkerError(f"could not start worker {cmd[0]!r}: {exc}") from exc
        finally:
            for f in (out, err):
                if f is not None:
                    f.close()
        return "spawn", popen.pid, popen

    def _log_choice(self, how: str, message: str) -> None:
        if self._logged_choice != message:
            (log.info if how == "fork" else log.warning)(message)
            self._logged_choice = message

    def stop(self, handles: list[WorkerHandle], grace: float) -> None:
        """SIGTERM, wait up to ``grace`` seconds, then SIGKILL whatever is left; reaps every handle."""
        live = [h for h in handles if h.poll() is None]
        for h in live:
            h.stopping = True
            h.signal_group(signal.SIGCONT)
            h.signal_group(signal.SIGTERM)
        deadline = time.monotonic() + grace
        while any(h.poll() is None for h in live) and time.monotonic() < deadline:
            time.sleep(0.02)
        for h in live:
            if h.poll() is None:
                log.warning("rank %d pid %d ignored SIGTERM for %.1fs: SIGKILL", h.rank, h.pid, grace)
                h.signal_group(signal.SIGKILL)
        for h in live:
            while not h.reap():
                time.sleep(0.005)
        self.reap()

    def reap(self) -> None:
        """Wait for the workers whose exit was seen (``poll``) but that could not be reaped then (their failure
        was known before the kernel finished tearing them down); call it every monitor tick. Exits nobody has
        seen yet are left to ``poll``."""
        for h in list(self._unreaped):
            if h.exitcode is not None and h.reap():
                self._unreaped.remove(h)
                if self._deathwatch is not None:
                    self._deathwatch.forget(h.pid)

    def kill(self, handle: WorkerHandle) -> None:
        handle.signal_group(signal.SIGKILL)
        handle.signal_group(signal.SIGCONT)

    def dump_stacks(self, handle: WorkerHandle, what: str) -> bool:
        """Write the worker's Python stacks to the log (py-spy when installed, else faulthandler via SIGUSR1);
        ``what`` the worker is, for the log. True when the worker writes them itself (faulthandler, from its
        signal handler): give it a moment (``DUMP_WAIT_S``) before killing it."""
        pyspy = shutil.which("py-spy")
        if pyspy:
            try:
                out = subprocess.run([pyspy, "dump", "--pid", str(handle.pid)], capture_output=True, text=True,
                                     timeout=5.0)
                if out.returncode == 0 and out.stdout:
                    log.error("stacks of %s rank %d (pid %d, py-spy):\n%s", what, handle.rank, handle.pid, out.stdout)
                    return False
            except (OSError, subprocess.TimeoutExpired) as exc:
                log.warning("py-spy could not dump pid %d: %s; falling back to faulthandler", handle.pid, exc)
        where = handle.stderr_path or "the console"
        log.error("dumping the Python stacks of %s rank %d (pid %d) to %s (faulthandler, SIGUSR1)",
                  what, handle.rank, handle.pid, where)
        try:
            os.kill(handle.pid, signal.SIGUSR1)
            os.kill(handle.pid, signal.SIGCONT)
        except ProcessLookupError:
            return False
        return True

    def close(self, reap_wait: float = 5.0) -> None:
        if self._standby is not None:
            self._standby.close()
            self._standby = None
        deadline = time.monotonic() + reap_wait  # workers whose teardown is still running
        while self._unreaped and time.monotonic() < deadline:
            self.reap()
            if self._unreaped:
                time.sleep(0.01)
        if self._deathwatch is not None:
            self._deathwatch.close()
        for t in self._tailers:
            t.stop()
        self._tailers.clear()


class _Tailer:
    """Copies a worker's log file to the console with a rank prefix (``--tee``)."""

    def __init__(self, path: str, prefix: str, out) -> None:
        self._path = path
        self._prefix = prefix
        self._out = out
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"tee{prefix}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        pos = os.path.getsize(self._path) if os.path.exists(self._path) else 0
        pending = ""
        while True:
            stopping = self._stop.is_set()
            try:
                with open(self._path, encoding="utf-8", errors="replace") as fh:
                    fh.seek(pos)
                    data = fh.read()
                    pos = fh.tell()
            except FileNotFoundError:
                data = ""
            if data:
                pending += data
                *lines, pending = pending.split("\n")
                for line in lines:
                    self._out.write(f"{self._prefix} {line}\n")
                self._out.flush()
            if stopping:
                if pending:
                    self._out.write(f"{self._prefix} {pending}\n")
                return
            self._stop.wait(0.1)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(2.0)
