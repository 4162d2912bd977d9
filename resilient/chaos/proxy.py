"""A userspace TCP proxy for slow links and blackholes (this kernel has no netem).

``TcpProxy(listen=(host, port), upstream=(host, port))`` forwards every accepted connection. While it
runs, ``set_delay(ms)`` delays every forwarded chunk by that many milliseconds (both directions) and
``blackhole(True)`` stops forwarding without closing anything: the peers see silence, as with a lost
host or a DROP rule, not a reset. ``blackhole(False)`` resumes forwarding of the buffered bytes.
"""

from __future__ import annotations

import socket
import threading
import time

from resilient.errors import ChaosError
from resilient.logs import get_logger

log = get_logger(__name__)

_CHUNK = 65536


class TcpProxy:
    def __init__(self, listen: tuple[str, int], upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self._delay_s = 0.0
        self._open = threading.Event()
        self._open.set()
        self._stop = threading.Event()
        self._socks: list[socket.socket] = []
        self._lock = threading.Lock()
        self.connections = 0  # accepted and connected upstream
        self.chunks = 0  # forwarded chunks, both directions
        self.delayed_chunks = 0  # of which forwarded with a delay
        self._srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self._srv.bind(listen)
        except OSError as exc:
            self._srv.close()
            raise ChaosError(f"Proxy cannot listen on {listen[0]}:{listen[1]}: {exc.strerror}.") from exc
        self._srv.listen(64)
        self.address = self._srv.getsockname()[:2]
        self._thread = threading.Thread(target=self._accept, name=f"proxy-{self.address[1]}", daemon=True)
        self._thread.start()

    @property
    def endpoint(self) -> str:
        return f"{self.address[0]}:{self.address[1]}"

    def set_delay(self, ms: float) -> None:
        self._delay_s = max(0.0, ms) / 1000.0

    def blackhole(self, on: bool) -> None:
        if on:
            self._open.clear()
        else:
            self._open.set()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._srv.accept()
            except OSError:
                return
            try:
                up = socket.create_connection(self.upstream, timeout=5.0)
                up.settimeout(None)
            except OSError as exc:
                log.debug("proxy: upstream %s unreachable: %s", self.upstream, exc)
                client.close()
                continue
            with self._lock:
                self._socks += [client, up]
                self.connections += 1
            for a, b in ((client, up), (up, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while not self._stop.is_set():
                self._open.wait()
                data = src.recv(_CHUNK)
                if not data:
                    break
                delayed = self._delay_s > 0
                if delayed:
                    time.sleep(self._delay_s)
                self._open.wait()
                if self._stop.is_set():
                    break
                dst.sendall(data)
                with self._lock:
                    self.chunks += 1
                    self.delayed_chunks += delayed
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self._stop.set()
        self._open.set()
        try:
            self._srv.close()
        except OSError:
            pass
        with self._lock:
            socks, self._socks = self._socks, []
        for s in socks:
            try:
                s.close()
            except OSError:
                pass
        self._thread.join(timeout=2.0)
