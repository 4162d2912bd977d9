"""A warm fork server for worker processes.

Importing torch costs seconds; a zygote pays it once. The agent starts ``python -m resilient.agent.zygote``
with one end of a socketpair; the zygote imports torch, torch.distributed, numpy and resilient (no CUDA
initialised, no thread started), reports whether forking is safe, and then forks workers on request.

Protocol (newline-delimited JSON over the socketpair): zygote -> agent ``{"op": "ready", "fork_safe",
"why", "import_s"}``; agent -> zygote ``{"op": "fork", "id", "target", "args", "module", "env", "cwd",
"stdout", "stderr"}``; zygote -> agent ``{"id", "pid"}`` or ``{"id", "error"}``.

Each worker is forked twice (zygote -> short-lived middle -> worker) so that it is re-parented to the agent
(a child subreaper): the agent then reaps it with ``waitpid`` like a spawned worker and sees its real exit
status. The worker waits to be re-parented, sets ``PR_SET_PDEATHSIG`` against the agent, moves into its
own process group, takes its environment, working directory and stdio, reseeds Python's and NumPy's
global RNGs (as a fresh process would have), and runs the script as ``__main__``.

``ZygoteClient`` is the agent's side.
"""

from __future__ import annotations

import atexit
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Any

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


def _child(sock: socket.socket, agent_pid: int, req: dict[str, Any]) -> None:
    """In the forked worker: never returns."""
    code = 1
    try:
        sock.close()
        deadline = time.monotonic() + 5.0
        while os.getppid() != agent_pid:
            if time.monotonic() > deadline:
                os._exit(137)
            time.sleep(0.0005)
        bootstrap.die_with_parent(agent_pid)
        os.setpgid(0, 0)
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
        bootstrap.emit_exec("fork")
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


def _fork(sock: socket.socket, agent_pid: int, req: dict[str, Any]) -> int:
    sys.stdout.flush()
    sys.stderr.flush()
    r, w = os.pipe()
    middle = os.fork()
    if middle == 0:
        os.close(r)
        worker = os.fork()
        if worker == 0:
            os.close(w)
            _child(sock, agent_pid, req)
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
                pid = _fork(sock, agent_pid, req)
                _send(sock, {"id": req["id"], "pid": pid})
            except OSError as exc:
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

    def _readline(self, timeout: float | None) -> dict[str, Any] | None:
        self._sock.settimeout(timeout)
        while b"\n" not in self._buf:
            chunk = self._sock.recv(1 << 16)
            if not chunk:
                return None
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return json.loads(line)

    def _wait_ready(self) -> None:
        try:
            with self._lock:
                msg = self._readline(None)
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

    def fork(self, *, target: str, args: list[str], module: bool, env: dict[str, str], cwd: str,
             stdout: str | None, stderr: str | None, timeout: float = 10.0) -> int:
        if not self.usable():
            raise WorkerError(f"the zygote cannot fork workers: {self.why}")
        with self._lock:
            self._next_id += 1
            req = {"op": "fork", "id": self._next_id, "target": target, "args": args, "module": module,
                   "env": env, "cwd": cwd, "stdout": stdout, "stderr": stderr}
            try:
                self._sock.settimeout(timeout)
                self._sock.sendall((json.dumps(req) + "\n").encode())
                reply = self._readline(timeout)
            except (OSError, ValueError) as exc:
                self.fork_safe = False
                self.why = f"the zygote stopped answering: {exc}"
                raise WorkerError(f"the zygote did not fork the worker: {exc}") from exc
        if reply is None:
            self.fork_safe = False
            self.why = "the zygote exited"
            raise WorkerError("the zygote exited while forking a worker")
        if "error" in reply:
            raise WorkerError(f"the zygote could not fork the worker: {reply['error']}")
        return int(reply["pid"])

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


if __name__ == "__main__":
    zygote_main(int(sys.argv[1]), int(sys.argv[2]))
