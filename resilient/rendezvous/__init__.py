"""Rendezvous, membership and fencing on etcd v3.

``Rendezvous`` (handler.py) is the public entry point; ``state.py`` holds the pure decisions, ``executor.py``
the etcd side effects, ``membership.py`` the lease and keep-alive, ``budget.py`` the restart budget.
"""

from resilient.rendezvous.handler import Rendezvous
from resilient.rendezvous.model import Assignment, NodeEntry, NodeInfo
from resilient.rendezvous.settings import RendezvousSettings

__all__ = ["Assignment", "NodeEntry", "NodeInfo", "Rendezvous", "RendezvousSettings"]
