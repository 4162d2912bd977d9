"""A warm fork server for worker processes.

Importing torch costs seconds; a zygote pays it once. The agent starts ``python -m resilient.agent.zygote``
with one end of a socketpair; the zygote imports torch, torch.distributed, numpy and resilient (no CUDA
initialised, no thread started), reports whether forking is safe, and then forks workers on request.

Protocol (newline-delimited JSON over the socketpair): zygote -> agent ``{"op": "ready", "fork_safe",
"why", "import_s"}``; agent -> zygote ``{"op": "fork", "id", "target", "args", "module", "env", "cwd",
"stdout", "stderr"}``; zygote -> agent ``{"id", "pid"}`` or ``{"id", "error"}``. A standby (below):
agent -> zygote ``{"op": "standby", "id"}``; zygote -> agent ``{"id", "pid"}`` with the agent's end of the
standby's own socketpair attached (``SCM_RIGHTS``).

Each worker is forked twice (zygote -> short-lived middle -> worker) so that it is re-parented to the agent
(a child subreaper): the agent then reaps it with ``waitpid`` like a spawned worker and sees its real exit
status. The worker waits to be re-parented, sets ``PR_SET_PDEATHSIG`` against the agent, moves into its
own process group, takes its environment, working directory and stdio, reseeds Python's and NumPy's
global RNGs (as a fresh process would have), and runs the script as ``__main__``.

**Standby**: a worker forked ahead of need. It waits on its own channel, keeps freed memory
(``bootstrap.retain_heap``) and, told ``{"op": "warm", "bytes"}``, faults in heap until its anonymous
memory reaches that many bytes (``warm_budget``: never into the last fifth of the host's memory) and
frees it again (kept, and mapped); a message arriving meanwhile ends the warm-up where it is;
``{"op": "run", <a fork request>}`` turns it into that worker. A replacement worker then allocates its
model and optimizer state from pages that are already there instead of page-faulting gigabytes on the
recovery path; end of channel: it exits.

``ZygoteClient`` is the agent's side; ``Standby`` is the agent's handle of one standby.
"""

from __future__ import annotations

import atexit
import ctypes
import json
import os
import random
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Any, Callable

from resilient.agent import bootstrap
from resilient.errors import WorkerError
from resilient.logs import get_logger

log = get_logger(__name__)

WARM_MODULES = ("torch", "torch.distributed", "torch.nn", "torch.optim", "numpy", "resilient")
# torch._dynamo is imported lazily by the first DistributedDataParallel(...) (~1.4 s, 800+ modules)
OPTIONAL_MODULES = ("resilient.elastic", "resilient.runtime.agent_client", "torch.nn.parallel", "torch._dynamo")


# ----------------------------------------------------------------------------------------------------
# zygote process
# ----------------------------------------------------------------------------------------------------
def _thread_count() -> int:
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        return threading.active_count()


def _send(sock: socket.socket, msg: dict[str, Any]) -> None:
    sock.sendall((json.dumps(msg) + "\n").encode())


def _await_reparent(agent_pid: int) -> None:
    """In a freshly forked worker: wait until the middle process exited (re-parenting us to the agent), then
    die with the agent and leave the zygote's process group."""
    deadline = time.monotonic() + 5.0
    while os.getppid() != agent_pid:
        if time.monotonic() > deadline:
            os._exit(137)
        time.sleep(0.0005)
    bootstrap.die_with_parent(agent_pid)
    os.setpgid(0, 0)


def _child(sock: socket.socket, agent_pid: int, req: dict[str, Any]) -> None:
    """In the forked worker: never returns."""
    sock.close()
    _await_reparent(agent_pid)
    _become_worker(agent_pid, req, how="fork")


def _become_worker(agent_pid: int, req: dict[str, Any], *, how: str) -> None:
    """Take the worker's environment, working directory and stdio, and run its script: never returns."""
    code = 1
    try:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.chdir(req["cwd"])
        os.environ.clear()
        os.environ.update(req["env"])
        for fd, path in ((1, req.get("stdout")), (2, req.get("stderr"))):
            if path:
                os.makedirs(os.path.dirname(path), exist_ok=True)
                f = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
                os.dup2(f, fd)
                os.close(f)
        threads = req["env"].get("OMP_NUM_THREADS", "1")
        if threads.isdigit() and int(threads) > 1:
            sys.modules["torch"].set_num_threads(int(threads))  # the zygote itself runs single-threaded
        random.seed()
        np = sys.modules.get("numpy")
        if np is not None:
            np.random.seed()
        bootstrap.prepare(agent_pid)
        bootstrap.emit_exec(how)
        code = bootstrap.run_target(req["target"], list(req["args"]), module=bool(req.get("module")))
    except BaseException as exc:  # anything escaping here would return into the zygote's loop
        bootstrap.write_error_file(exc)
        import traceback

        traceback.print_exc()
        code = 1
    finally:
        try:
            atexit._run_exitfuncs()
        finally:
            try:
                sys.stdout.flush()
                sys.stderr.flush()
            finally:
                os._exit(code)


# ----------------------------------------------------------------------------------------------------
# standby
# ----------------------------------------------------------------------------------------------------
WARM_PIECE = 64 << 20  # heap is faulted in this many bytes at a time (below the retained mmap threshold)


# a standby never warms itself into the last fifth of the host's memory: it would push the workers (or the
# shared-memory snapshots) towards the OOM killer for a speed-up of the next recovery
WARM_RESERVE_FRACTION = 0.2


def warm_budget(target: int, have: int, available: int | None, total: int | None) -> int:
    """Bytes a standby holding ``have`` should fault in to reach ``target``, leaving at least
    ``WARM_RESERVE_FRACTION`` of the host's memory (``total``) available (``available``: MemAvailable;
    None when unknown: no cap)."""
    need = max(0, target - have)
    if available is not None and total is not None:
        need = min(need, max(0, available - int(total * WARM_RESERVE_FRACTION)))
    return need


def _meminfo() -> dict[str, int]:
    """/proc/meminfo in bytes (empty when unreadable)."""
    out: dict[str, int] = {}
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                key, _, rest = line.partition(":")
                fields = rest.split()
                if fields and fields[0].isdigit():
                    out[key] = int(fields[0]) * 1024
    except OSError:
        pass
    return out


def warm_heap(target: int, stop: Callable[[], bool] | None = None) -> int:
    """Fault in heap until this process holds ``target`` bytes of anonymous memory (within
    ``warm_budget``), then free it: with ``bootstrap.retain_heap`` in force the pages stay mapped for the
    next allocations. ``stop()`` is asked after each piece: True ends the warm-up early (what was faulted
    in stays). Returns the bytes faulted in (0 when there was nothing to do)."""
    mem = _meminfo()
    need = warm_budget(target, anon_bytes_of(os.getpid()), mem.get("MemAvailable"), mem.get("MemTotal"))
    if need <= 0:
        return 0
    libc = ctypes.CDLL(None)
    libc.malloc.argtypes, libc.malloc.restype = (ctypes.c_size_t,), ctypes.c_void_p
    libc.free.argtypes, libc.free.restype = (ctypes.c_void_p,), None
    pieces = []
    try:
        while need > 0:
            p = libc.malloc(WARM_PIECE)
            if not p:
                break  # out of memory: warm what we could
            ctypes.memset(p, 0, WARM_PIECE)
            pieces.append(p)
            need -= WARM_PIECE
            if stop is not None and stop():
                break
    finally:
        for p in pieces:
            libc.free(p)
    return len(pieces) * WARM_PIECE


def _standby_child(sock: socket.socket, chan: socket.socket, agent_pid: int) -> None:
    """In a forked standby: wait for ``warm`` and ``run`` messages; never returns. A message arriving
    while it warms ends the warm-up (a ``run`` must not wait for gigabytes of page faults)."""
    sock.close()
    _await_reparent(agent_pid)
    retained = bootstrap.retain_heap()
    buf = b""

    def message_waiting() -> bool:
        return b"\n" in buf or bool(select.select([chan], [], [], 0)[0])

    while True:
        try:
            chunk = chan.recv(1 << 16)
        except OSError:
            chunk = b""
        if not chunk:
            os._exit(0)  # the agent closed the channel (or died): nobody will need this standby
        buf += chunk
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            msg = json.loads(line)
            if msg.get("op") == "warm" and retained:
                warm_heap(int(msg["bytes"]), stop=message_waiting)
            elif msg.get("op") == "run":
                chan.close()
                _become_worker(agent_pid, msg, how="standby")


def _fork(sock: socket.socket, agent_pid: int, child: Callable[[], None]) -> int:
    """Fork ``child`` twice removed (it is re-parented to the agent); returns its pid."""
    sys.stdout.flush()
    sys.stderr.flush()
    r, w = os.pipe()
    middle = os.fork()
    if middle == 0:
        os.close(r)
        worker = os.fork()
        if worker == 0:
            os.close(w)
            try:
                child()  # never returns when all goes well
            except BaseException:  # noqa: BLE001 - the child must never return into the zygote's loop
                import traceback

                traceback.print_exc()
            finally:
                os._exit(1)
        os.write(w, str(worker).encode())
        os._exit(0)
    os.close(w)
    data = b""
    while True:
        chunk = os.read(r, 64)
        if not chunk:
            break
        data += chunk
    os.close(r)
    os.waitpid(middle, 0)
    if not data:
        raise WorkerError("the zygote's middle process died before reporting the worker's pid")
    return int(data)


def _fork_standby(sock: socket.socket, agent_pid: int, req: dict[str, Any]) -> None:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        pid = _fork(sock, agent_pid, lambda: (ours.close(), _standby_child(sock, theirs, agent_pid)))
        socket.send_fds(sock, [(json.dumps({"id": req["id"], "pid": pid}) + "\n").encode()], [ours.fileno()])
    finally:
        ours.close()
        theirs.close()


def zygote_main(fd: int, agent_pid: int) -> None:
    bootstrap.die_with_parent(agent_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    sock = socket.socket(fileno=fd)
    t0 = time.monotonic()
    import importlib

    for name in WARM_MODULES:
        importlib.import_module(name)
    for name in OPTIONAL_MODULES:
        try:
            importlib.import_module(name)
        except ImportError:
            pass
    import_s = time.monotonic() - t0
    threads = _thread_count()
    torch = sys.modules["torch"]
    cuda_initialised = bool(getattr(torch.cuda, "is_initialized", lambda: False)())
    fork_safe = threads == 1 and not cuda_initialised
    why = "" if fork_safe else (f"{threads} threads after import" if threads != 1 else "CUDA already initialised")
    _send(sock, {"op": "ready", "fork_safe": fork_safe, "why": why, "import_s": import_s})
    buf = b""
    while True:
        chunk = sock.recv(1 << 16)
        if not chunk:
            os._exit(0)
        buf += chunk
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            req = json.loads(line)
            if req.get("op") == "exit":
                os._exit(0)
            try:
                if req.get("op") == "standby":
                    _fork_standby(sock, agent_pid, req)
                    continue
                pid = _fork(sock, agent_pid, lambda: _child(sock, agent_pid, req))
                _send(sock, {"id": req["id"], "pid": pid})
            except (OSError, WorkerError) as exc:
                _send(sock, {"id": req["id"], "error": f"fork failed: {exc}"})


# ----------------------------------------------------------------------------------------------------
# agent side
# ----------------------------------------------------------------------------------------------------
class ZygoteClient:
    """Starts the zygote and asks it to fork workers. ``fork`` returns the worker's pid (a child of this
    process, which must be a child subreaper), or raises ``WorkerError`` when the zygote is unusable."""

    def __init__(self, base_env: dict[str, str]) -> None:
        bootstrap.become_subreaper()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock = ours
        self._lock = threading.Lock()
        self._ready = threading.Event()
        self._buf = b""
        self._next_id = 0
        self.fork_safe = False
        self.why = "not ready"
        self.import_s: float | None = None
        zygote_env = dict(base_env, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")  # no thread pool before fork
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "resilient.agent.zygote", str(theirs.fileno()), str(os.getpid())],
            pass_fds=(theirs.fileno(),),
            env=zygote_env,
            stdin=subprocess.DEVNULL,
        )
        theirs.close()
        self._reader = threading.Thread(target=self._wait_ready, name="zygote-ready", daemon=True)
        self._reader.start()

    @property
    def pid(self) -> int:
        return self._proc.pid

    def _wait_ready(self) -> None:
        try:
            with self._lock:
                msg, _fds = self._readline_fds(None)
            if msg and msg.get("op") == "ready":
                self.fork_safe = bool(msg["fork_safe"])
                self.why = msg.get("why", "")
                self.import_s = float(msg["import_s"])
            else:
                self.why = "the zygote exited during start-up"
        except (OSError, ValueError) as exc:
            self.why = f"the zygote's channel failed during start-up: {exc}"
        finally:
            self._ready.set()

    def wait_ready(self, timeout: float) -> bool:
        """True when the zygote is up and forking is safe."""
        self._ready.wait(timeout)
        return self._ready.is_set() and self.fork_safe and self._proc.poll() is None

    def usable(self) -> bool:
        return self._ready.is_set() and self.fork_safe and self._proc.poll() is None

    def _request(self, req: dict[str, Any], timeout: float, what: str) -> tuple[dict[str, Any], list[int]]:
        """Send one request and read its reply (with any file descriptors passed along with it)."""
        if not self.usable():
            raise WorkerError(f"the zygote cannot fork workers: {self.why}")
        with self._lock:
            self._next_id += 1
            req = {**req, "id": self._next_id}
            try:
                self._sock.settimeout(timeout)
                self._sock.sendall((json.dumps(req) + "\n").encode())
                reply, fds = self._readline_fds(timeout)
            except (OSError, ValueError) as exc:
                self.fork_safe = False
                self.why = f"the zygote stopped answering: {exc}"
                raise WorkerError(f"the zygote did not fork the {what}: {exc}") from exc
        if reply is None:
            self.fork_safe = False
            self.why = "the zygote exited"
            raise WorkerError(f"the zygote exited while forking the {what}")
        if "error" in reply:
            for fd in fds:
                os.close(fd)
            raise WorkerError(f"the zygote could not fork the {what}: {reply['error']}")
        return reply, fds

    def _readline_fds(self, timeout: float | None) -> tuple[dict[str, Any] | None, list[int]]:
        """One reply line, and the descriptors passed along with its bytes (SCM_RIGHTS)."""
        self._sock.settimeout(timeout)
        fds: list[int] = []
        while b"\n" not in self._buf:
            chunk, got, _flags, _addr = socket.recv_fds(self._sock, 1 << 16, 4)
            fds += got
            if not chunk:
                for fd in fds:
                    os.close(fd)
                return None, []
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return json.loads(line), fds

    def fork(self, *, target: str, args: list[str], module: bool, env: dict[str, str], cwd: str,
             stdout: str | None, stderr: str | None, timeout: float = 10.0) -> int:
        reply, fds = self._request({"op": "fork", **launch_request(target=target, args=args, module=module, env=env,
                                                                  cwd=cwd, stdout=stdout, stderr=stderr)},
                                   timeout, "worker")
        for fd in fds:
            os.close(fd)
        return int(reply["pid"])

    def standby(self, timeout: float = 10.0) -> "Standby":
        """Fork a standby worker (see the module docstring); WorkerError when the zygote cannot."""
        reply, fds = self._request({"op": "standby"}, timeout, "standby")
        if len(fds) != 1:
            for fd in fds:
                os.close(fd)
            raise WorkerError(f"the zygote forked standby pid {reply['pid']} but passed {len(fds)} channels, not 1")
        return Standby(int(reply["pid"]), socket.socket(fileno=fds[0]))

    def close(self) -> None:
        try:
            self._sock.close()
        except OSError:
            pass
        if self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(2.0)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()


def launch_request(*, target: str, args: list[str], module: bool, env: dict[str, str], cwd: str,
                   stdout: str | None, stderr: str | None) -> dict[str, Any]:
    """What a forked worker or an activated standby needs to become a given worker."""
    return {"target": target, "args": args, "module": module, "env": env, "cwd": cwd, "stdout": stdout,
            "stderr": stderr}


class Standby:
    """The agent's handle of one standby worker (a child of the agent, re-parented like forked workers).

    ``warm`` and ``activate`` only write to the standby's channel; ``close`` ends it and reaps it."""

    def __init__(self, pid: int, chan: socket.socket) -> None:
        self.pid = pid
        self._chan = chan
        self.warmed_to = 0  # the largest ``warm`` target sent
        self.exitcode: int | None = None

    def alive(self) -> bool:
        if self.exitcode is None:
            try:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:
                self.exitcode = -signal.SIGKILL
                return False
            if pid:
                self.exitcode = os.waitstatus_to_exitcode(status)
        return self.exitcode is None

    def _send(self, msg: dict[str, Any]) -> None:
        try:
            self._chan.settimeout(5.0)
            self._chan.sendall((json.dumps(msg) + "\n").encode())
        except OSError as exc:
            raise WorkerError(f"standby pid {self.pid} cannot be reached: {exc}") from exc

    def warm(self, nbytes: int) -> None:
        """Have it fault in heap up to ``nbytes`` of anonymous memory (it does so while waiting)."""
        self._send({"op": "warm", "bytes": int(nbytes)})
        self.warmed_to = max(self.warmed_to, int(nbytes))

    def activate(self, request: dict[str, Any]) -> int:
        """Turn it into the worker ``request`` describes (see ``launch_request``); returns its pid."""
        if not self.alive():
            raise WorkerError(f"standby pid {self.pid} exited ({self.exitcode})")
        self._send({"op": "run", **request})
        self._chan.close()
        return self.pid

    def close(self, grace: float = 2.0) -> None:
        """End an unused standby (its channel closes: it exits) and reap it."""
        self._chan.close()
        deadline = time.monotonic() + grace
        while self.alive() and time.monotonic() < deadline:
            time.sleep(0.01)
        if self.alive():
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            while self.alive():
                time.sleep(0.005)


def anon_bytes_of(pid: int) -> int:
    """Resident anonymous memory (``RssAnon``) of a process, in bytes; 0 when unknown."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


if __name__ == "__main__":
    zygote_main(int(sys.argv[1]), int(sys.argv[2]))
