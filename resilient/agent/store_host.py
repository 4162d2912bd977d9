"""The TCPStores that workers bootstrap ``torch.distributed`` from.

Two kinds, both hosted by agents:

* The node store: every agent hosts one on its registered ``store_port`` for its whole life. When its
  node is group rank 0 of a generation it is ``master_addr:master_port`` for that generation. Workers
  running ``@resilient.elastic`` keep one client connection to it and use a per-generation
  ``PrefixStore`` (see ``resilient.elastic.distributed``), so a recovery costs no reconnect.
* The generation store: unmodified ``env://`` scripts (``TORCHELASTIC_USE_AGENT_STORE=True``) read no
  prefix, so keys written by a previous attempt would be read again (a respawned gloo rank would pick up
  the dead rank's address). As torchrun does per rendezvous round, the master agent starts a fresh store
  for every generation on a free port and publishes that port in its node store under
  ``resilient/gen<g>/env_port``; every agent reads it there and hands it to its workers as MASTER_PORT.
"""

from __future__ import annotations

import datetime
import socket
import time
from typing import Callable

from resilient.errors import RendezvousError
from resilient.logs import get_logger

log = get_logger(__name__)


def env_port_key(generation: int) -> str:
    return f"resilient/gen{generation}/env_port"


def free_port(host: str = "0.0.0.0") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _server(port: int, timeout: float):
    import torch.distributed as dist

    return dist.TCPStore("0.0.0.0", port, is_master=True, wait_for_workers=False,
                         timeout=datetime.timedelta(seconds=timeout), use_libuv=True)


class StoreHost:
    """This agent's node store and (when master) the current generation store."""

    def __init__(self, timeout: float, port: int = 0) -> None:
        self._timeout = timeout
        try:
            self._node = _server(port, timeout)
        except (RuntimeError, OSError) as exc:
            raise RendezvousError(f"could not host the node TCPStore on port {port}: {exc}") from exc
        self.port = self._node.port
        self._gen_store = None
        self._gen: int | None = None

    def host_generation(self, generation: int) -> int:
        """Start a fresh generation store (dropping the previous one) and publish its port; returns it."""
        self._gen_store = None
        try:
            self._gen_store = _server(0, self._timeout)
        except (RuntimeError, OSError) as exc:
            raise RendezvousError(f"could not host the TCPStore of generation {generation}: {exc}") from exc
        self._gen = generation
        self._node.set(env_port_key(generation), str(self._gen_store.port))
        log.info("generation %d: worker TCPStore on port %d (node store on %d)", generation,
                 self._gen_store.port, self.port)
        return self._gen_store.port

    def drop_generation(self) -> None:
        self._gen_store = None
        self._gen = None

    def close(self) -> None:
        self._gen_store = None
        self._node = None


def generation_env_port(
    master_addr: str,
    master_port: int,
    generation: int,
    timeout: float,
    *,
    ended: Callable[[], bool] = lambda: False,
    poll: float = 0.25,
) -> int | None:
    """Read the generation store's port from the master's node store, waiting until it is published.

    Returns None as soon as ``ended()`` says the generation is over: its master may have died before
    publishing, and the next generation must not wait for it. A master not (yet) listening is retried
    every ``poll`` seconds; RendezvousError after ``timeout``."""
    import torch.distributed as dist

    key = env_port_key(generation)
    deadline = time.monotonic() + timeout
    client = None
    last: Exception | None = None
    while not ended():
        left = deadline - time.monotonic()
        if left <= 0:
            raise RendezvousError(
                f"could not read the worker TCPStore port of generation {generation} from the master's store at "
                f"{master_addr}:{master_port} within {timeout:g}s: {last or 'not published'}. Is that node's agent "
                "alive and reachable?"
            )
        step = min(poll, left)
        try:
            if client is None:
                # probe first: a master that is gone refuses at once, where c10d would retry (and log) for long
                socket.create_connection((master_addr, master_port), timeout=step).close()
                client = dist.TCPStore(master_addr, master_port, is_master=False,
                                       timeout=datetime.timedelta(seconds=left))
            client.wait([key], datetime.timedelta(seconds=step))
            return int(client.get(key))
        except ValueError as exc:
            raise RendezvousError(f"the master's store at {master_addr}:{master_port} holds a malformed port for "
                                  f"generation {generation}: {exc}") from exc
        except (OSError, RuntimeError) as exc:  # not listening, gone, or not published within this poll
            last = exc
            if isinstance(exc, OSError) or "timeout" not in str(exc):
                client = None
                time.sleep(min(step, max(0.0, deadline - time.monotonic())))
    return None
