"""A node-agent stand-in for the rendezvous tests: joins a job in its own process, then obeys stdin.

Usage: python standin.py ENDPOINTS JOB NODE_ID MIN MAX LEASE_TTL
Prints ``JOINED <gen> <ranks,...>`` after each join; commands on stdin: ``write`` (publish a fault for the
last joined generation; prints ``WROTE`` or ``FENCED <message>``), ``join`` (join again), ``exit``.
"""

from __future__ import annotations

import os
import sys

from resilient.config import EtcdSettings, Timeouts
from resilient.errors import FencedError
from resilient.etcd.client import EtcdKV
from resilient.rendezvous import NodeInfo, Rendezvous, RendezvousSettings


def main() -> None:
    endpoints, job, node_id, lo, hi, ttl = sys.argv[1:7]
    timeouts = Timeouts.from_lease_ttl(int(ttl), last_call=0.3, join_timeout=30.0)
    settings = RendezvousSettings(int(lo), int(hi), last_call=0.3, join_timeout=30.0, timeouts=timeouts)
    kv = EtcdKV.connect(EtcdSettings.parse(endpoints))
    port = 20000 + os.getpid() % 20000
    node = NodeInfo(node_id, "127.0.0.1", f"127.0.0.1:{port}", f"127.0.0.1:{port + 1}", 1, port + 2)
    rdzv = Rendezvous(kv, job, node, settings)

    def join() -> int:
        a = rdzv.join()
        print("JOINED", a.generation, ",".join(map(str, a.ranks_of(node_id))), flush=True)
        return a.generation

    gen = join()
    for line in sys.stdin:
        cmd = line.strip()
        if cmd == "write":
            try:
                rdzv.publish_fault(gen, "standin", {})
                print("WROTE", flush=True)
            except FencedError as exc:
                print("FENCED", exc, flush=True)
        elif cmd == "join":
            gen = join()
        elif cmd == "exit":
            break
    rdzv.leave()
    kv.close()


if __name__ == "__main__":
    main()
