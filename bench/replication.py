"""Replication throughput between two agents on loopback, beside raw loopback TCP measured in the same run.

Two processes, each a "host" running a real ``ShardManager`` (real etcd, real shared-memory segments, gRPC
control, the bulk transport). Each host owns one rank with ``--gb`` GiB of state; both seal at the same
moment (what happens at every snapshot), each replicates its shard to the other, and the step commits.
``replication_gbps`` = bytes replicated (both directions) / wall time from the seal to the commit seen by
both hosts (it includes verifying the sealed slot, the receiver's checksums and the etcd commit).
``tcp_gbps`` = the same bytes blasted in both directions at once between the same two processes with the
store backend's raw ``blast_send``/``blast_recv`` (no checksums, no protocol). Best of ``--repeat``.

``host_loss_recovery_s``: two real ``resilient-run`` agents as two hosts (``--nnodes 1:2``, each with its
own shared-memory directory), each worker holding ``--gb`` GiB of protected state (this file run with
``--worker``). Once a step with that state is committed (so replicated), host 0 dies: all its processes are
SIGSTOPped (silence, no connection reset reaches the peer), SIGKILLed one second later, and its segments
removed. The figure is the time from the SIGSTOP to host 1's first completed step in the next generation
(events carry CLOCK_MONOTONIC, the same clock as this process). ``--no-host-loss`` skips it.

    python bench/replication.py [--gb 1.0] [--repeat 3] [--lease-ttl 5]

Prints one JSON line: {"replication_gbps", "tcp_gbps", "ratio", "lease_ttl_s", "host_loss_recovery_s",
"snapshot_host_bytes", ...} (``snapshot_host_bytes``: ``ShardManager.host_memory_bytes()`` of the busier
host, its own segment and the replica it keeps). Before it, one line per world size N with data-parallel
deduplication (``--dedup-mb``): {"dedup": true, "world_size": N, "bytes_per_rank", "full_state_bytes",
"fraction", "segment_bytes_per_rank"}.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import shutil
import socket
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

TOKEN = b"bench-replication-token"


def _host(index: int, conn, endpoints: tuple[str, ...], job: str, shm_dir: str, nbytes: int) -> None:
    """One host: a ShardManager driven by commands from the parent over ``conn``."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    from resilient.config import EtcdSettings
    from resilient.etcd.client import EtcdKV
    from resilient.etcd.server import free_ports
    from resilient.keys import JobKeys
    from resilient.rendezvous.model import Assignment, NodeInfo
    from resilient.replication.manager import ShardManager
    from resilient.store import Segment, backend
    from resilient.testing.fence import NodeFence

    kv = EtcdKV.connect(EtcdSettings(endpoints=endpoints))
    keys = JobKeys(job)
    p1, p2 = free_ports(2)
    node = NodeInfo(f"n{index}", f"host{index}", f"127.0.0.1:{p1}", f"127.0.0.1:{p2}", 1, 0)
    fence = NodeFence(kv, keys, node, ttl=600)
    mgr = ShardManager(kv, keys, node, replicas=2, token=TOKEN, rendezvous=fence, shm_dir=shm_dir)
    mgr.start()
    listener = socket.create_server(("127.0.0.1", 0))
    state = torch.empty(nbytes // 4, dtype=torch.float32).uniform_()
    recv_buf = torch.empty(nbytes, dtype=torch.uint8)
    be = backend()
    conn.send({"node": node.to_json().decode(), "blast_port": listener.getsockname()[1], "native": be.__name__})
    assignment = None
    try:
        while True:
            cmd = conn.recv()
            op = cmd[0]
            if op == "form":
                assignment = Assignment.from_json(cmd[1].encode())
                mgr.on_generation(assignment)
                conn.send("ok")
            elif op == "write":
                step = cmd[1]
                seg = Segment.open(mgr.segment_for(index, nbytes + (1 << 20)), shm_dir)
                state[0] = float(step)
                seg.write({"state": state}, step=step, generation=assignment.generation)
                seg.seal()
                seg.close()
                conn.send("ok")
            elif op == "release":
                step = cmd[1]
                t0 = time.monotonic()
                mgr.on_sealed(index, step, assignment.generation, nbytes)
                deadline = t0 + 600
                while mgr.committed_step() != step and time.monotonic() < deadline:
                    time.sleep(0.002)
                conn.send({"t0": t0, "t1": time.monotonic(), "committed": mgr.committed_step(),
                           "skipped": mgr.stats.skipped, "host_bytes": mgr.host_memory_bytes()})
            elif op == "blast":
                peer_port = cmd[1]
                got = {}

                def recv() -> None:
                    c, _ = listener.accept()
                    with c:
                        got["n"] = be.blast_recv(c.fileno(), recv_buf.data_ptr(), nbytes, 60.0)

                t = threading.Thread(target=recv)
                t.start()
                conn.send("listening")
                conn.recv()  # both listening: go
                t0 = time.monotonic()
                with socket.create_connection(("127.0.0.1", peer_port)) as s:
                    be.blast_send(s.fileno(), state.data_ptr(), nbytes, 60.0)
                t.join()
                conn.send({"t0": t0, "t1": time.monotonic(), "n": got.get("n", 0)})
            elif op == "stop":
                break
    finally:
        listener.close()
        mgr.close(unlink=True)
        fence.revoke()
        kv.close()
        conn.send("stopped")


def _worker(argv: list[str]) -> None:
    """The training script of the host-loss measurement: ``--gb`` GiB of protected state, a tiny collective
    per step (so a lost peer is noticed the way a real job notices it)."""
    wp = argparse.ArgumentParser()
    wp.add_argument("--gb", type=float, default=1.0)
    wp.add_argument("--steps", type=int, default=100000)
    wp.add_argument("--sleep", type=float, default=0.05)
    a = wp.parse_args(argv)
    import torch
    import torch.distributed as dist

    import resilient

    class Ballast(torch.nn.Module):
        def __init__(self, n: int) -> None:
            super().__init__()
            self.register_buffer("ballast", torch.ones(n, dtype=torch.float32))
            self.register_buffer("counter", torch.zeros(1, dtype=torch.float64))

    @resilient.elastic(seed=0)
    def train(ctx) -> None:
        model = Ballast(int(a.gb * (1 << 30)) // 4)
        ctx.protect(model=model)
        for _step in ctx.steps(a.steps):
            t = torch.ones(1, dtype=torch.float64)
            if ctx.world_size > 1:
                dist.all_reduce(t)
            model.counter += t
            time.sleep(a.sleep)

    train()


def _wait_event(path: str, pred, timeout: float, what: str, procs=()) -> dict:
    from resilient import events

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if os.path.exists(path):
            for e in events.read(path):
                if pred(e):
                    return e
        if any(p.poll() is not None for p in procs):
            raise SystemExit(f"an agent exited while waiting for {what}")
        time.sleep(0.05)
    raise SystemExit(f"no {what} within {timeout:.0f}s (events in {path})")


def host_loss(gb: float, lease_ttl: int, workdir: str) -> dict:
    """Two agents, host 0 dies (silence, then kill and shm removed); host 1's recovery (see the docstring)."""
    import signal
    import subprocess

    from resilient.testing.etcd import running_etcd

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    shm_root = tempfile.mkdtemp(prefix="rsl-bench-hostloss-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
    job = f"bench-hostloss-{os.getpid()}"
    procs, logs = [], []
    try:
        with running_etcd() as etcd:
            paths = []
            for i in range(2):
                shm = os.path.join(shm_root, f"h{i}")
                os.makedirs(shm)
                ev = os.path.join(workdir, f"h{i}.events.jsonl")
                paths.append(ev)
                env = {**os.environ, "OMP_NUM_THREADS": "1", "RESILIENT_SHM_DIR": shm,
                       "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
                cmd = [sys.executable, "-m", "resilient.run", "--event-log", ev, "--nnodes", "1:2",
                       "--nproc-per-node", "1", "--rdzv-endpoint", etcd.endpoints[0], "--rdzv-id", job,
                       "--lease-ttl", str(lease_ttl), "--replicas", "2", "--snapshot-every", "20",
                       "--node-id", f"h{i}", os.path.abspath(__file__), "--worker", "--gb", str(gb)]
                log = open(os.path.join(workdir, f"h{i}.log"), "wb")
                logs.append(log)
                procs.append(subprocess.Popen(cmd, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT,
                                              start_new_session=True))
            first = _wait_event(paths[1], lambda e: e["kind"] == "ckpt.committed", 600,
                                "a committed step of the big state", procs)
            gen = first["gen"]
            time.sleep(0.5)
            t_dead = time.monotonic()
            os.killpg(procs[0].pid, signal.SIGSTOP)
            time.sleep(1.0)
            os.killpg(procs[0].pid, signal.SIGKILL)
            procs[0].wait(10)
            shutil.rmtree(os.path.join(shm_root, "h0"), ignore_errors=True)
            step = _wait_event(paths[1], lambda e: e["kind"] == "step.done" and (e.get("gen") or 0) > gen, 300,
                               "host 1's first step after the loss", procs[1:])
            from resilient import events

            evs = events.read(paths[1])
            formed = next((e for e in evs if e["kind"] == "gen.formed" and e.get("gen", 0) > gen and "reason" in e), {})
            restore = next((e for e in evs if e["kind"] == "restore.done" and e["mono"] > t_dead), {})
            return {
                "host_loss_recovery_s": round(step["mono"] - t_dead, 3),
                "host_loss_detect_s": round(formed["mono"] - t_dead, 3) if formed else None,
                "host_loss_restore": {k: restore.get(k) for k in ("origin", "step", "seconds")} if restore else None,
                "committed_before_loss": first["step"],
            }
    finally:
        for p in procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                p.wait(10)
        for log in logs:
            log.close()
        shutil.rmtree(shm_root, ignore_errors=True)


def dedup_lines(mb: float, worlds: tuple[int, ...] = (1, 2, 4, 8)) -> list[dict]:
    """Per-rank snapshot bytes with data-parallel deduplication (``@resilient.elastic(dedup=True)``): a
    model + Adam state of ``mb`` MiB of parameters, captured as a worker does, sliced for each rank of a
    world of N and written into a real segment; the slot bytes of the largest rank beside the whole
    (unsliced) snapshot's, and the shared memory a segment of that rank reserves (two slots)."""
    import torch

    from resilient.elastic import capture as cap
    from resilient.elastic import dedup
    from resilient.elastic.snapshots import required_capacity
    from resilient.store import Segment

    torch.manual_seed(0)
    width = 1024
    layers = max(1, int(mb * (1 << 20) / 4 / (width * width + width)))
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(layers)])
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(2, width)).square().sum().backward()
    opt.step()
    shm = tempfile.mkdtemp(prefix="rsl-bench-dedup-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
    out = []
    try:
        for world in worlds:
            per_rank, reserved, whole = 0, 0, 0
            for rank in range(world):
                full = cap.capture({"model": model, "optimizer": opt},
                                   extra_meta={"step": 1, "rank": rank, "world_size": world})
                whole = required_capacity(full)
                sliced = dedup.split(full)
                seg = Segment.create(f"dedup-{world}-{rank}", required_capacity(sliced), job="bench", rank=rank,
                                     shm_dir=shm)
                try:
                    seg.write(sliced.tensors, step=1, generation=1, meta=sliced.meta)
                    per_rank = max(per_rank, seg.seal().nbytes)
                    reserved = max(reserved, os.fstat(seg.fileno).st_size)
                finally:
                    seg.close()
                    seg.unlink()
            out.append({"dedup": True, "world_size": world, "bytes_per_rank": per_rank, "full_state_bytes": whole,
                        "fraction": round(per_rank / whole, 4), "segment_bytes_per_rank": reserved})
    finally:
        shutil.rmtree(shm, ignore_errors=True)
    return out


def main() -> None:
    if "--worker" in sys.argv[1:]:
        argv = sys.argv[1:]
        argv.remove("--worker")
        _worker(argv)
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gb", type=float, default=1.0, help="GiB of snapshot state per host (default 1)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--lease-ttl", type=int, default=5, help="lease TTL of the host-loss agents (s)")
    ap.add_argument("--no-host-loss", action="store_true", help="skip the host-loss measurement")
    ap.add_argument("--no-throughput", action="store_true", help="skip the throughput measurement")
    ap.add_argument("--dedup-mb", type=float, default=32.0,
                    help="MiB of parameters (plus Adam state) for the dedup lines; 0 skips them")
    args = ap.parse_args()
    if args.dedup_mb > 0:
        for line in dedup_lines(args.dedup_mb):
            print(json.dumps(line), flush=True)
    nbytes = int(args.gb * (1 << 30)) // 4096 * 4096
    loss: dict = {"host_loss_recovery_s": None}
    if not args.no_host_loss:
        with tempfile.TemporaryDirectory(prefix="rsl-bench-hostloss-") as workdir:
            loss = host_loss(args.gb, args.lease_ttl, workdir)
    if args.no_throughput:
        print(json.dumps({"lease_ttl_s": args.lease_ttl, **loss, "state_bytes_per_host": nbytes}))
        return

    from resilient.rendezvous.model import Assignment, NodeEntry, NodeInfo
    from resilient.testing.etcd import running_etcd

    shm_root = tempfile.mkdtemp(prefix="rsl-bench-repl-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
    ctx = mp.get_context("spawn")
    procs, conns = [], []
    job = f"bench-repl-{os.getpid()}"
    try:
        with running_etcd() as etcd:
            for i in range(2):
                parent, child = ctx.Pipe()
                d = os.path.join(shm_root, f"host{i}")
                os.makedirs(d)
                p = ctx.Process(target=_host, args=(i, child, tuple(etcd.endpoints), job, d, nbytes), daemon=True)
                p.start()
                procs.append(p)
                conns.append(parent)
            hello = [c.recv() for c in conns]
            nodes = [NodeInfo.from_json(h["node"].encode()) for h in hello]
            a = Assignment(1, 2, tuple(NodeEntry(n.node_id, n.host, n.addr, n.bulk_addr, k, (k,)) for k, n in enumerate(nodes)),
                           "127.0.0.1", 1, time.time())
            from resilient.keys import JobKeys
            from resilient.etcd.client import EtcdKV

            kv = EtcdKV.connect(etcd.settings)
            kv.put(JobKeys(job).gen(1), a.to_json())
            kv.close()
            for c in conns:
                c.send(("form", a.to_json().decode()))
            [c.recv() for c in conns]

            repl, tcp, host_bytes, skipped = [], [], 0, 0
            for r in range(args.repeat):
                step = r + 1
                for c in conns:
                    c.send(("write", step))
                [c.recv() for c in conns]
                for c in conns:
                    c.send(("release", step))
                res = [c.recv() for c in conns]
                if any(x["committed"] != step for x in res):
                    raise SystemExit(f"step {step} did not commit: {res}")
                elapsed = max(x["t1"] for x in res) - min(x["t0"] for x in res)
                repl.append(2 * nbytes / elapsed / 1e9)
                host_bytes = max(x["host_bytes"] for x in res)
                skipped = sum(x["skipped"] for x in res)
                # raw TCP, both directions at once, the same bytes
                for k, c in enumerate(conns):
                    c.send(("blast", hello[1 - k]["blast_port"]))
                [c.recv() for c in conns]
                for c in conns:
                    c.send("go")
                res = [c.recv() for c in conns]
                if any(x["n"] != nbytes for x in res):
                    raise SystemExit(f"raw TCP blast received short: {res}")
                tcp.append(2 * nbytes / (max(x["t1"] for x in res) - min(x["t0"] for x in res)) / 1e9)
            for c in conns:
                c.send(("stop",))
            [c.recv() for c in conns]
    finally:
        for p in procs:
            p.join(30)
            if p.is_alive():
                p.kill()
        shutil.rmtree(shm_root, ignore_errors=True)
    best_repl, best_tcp = max(repl), max(tcp)
    print(json.dumps({
        "replication_gbps": round(best_repl, 3),
        "tcp_gbps": round(best_tcp, 3),
        "ratio": round(best_repl / best_tcp, 3),
        "lease_ttl_s": args.lease_ttl,
        **loss,
        "snapshot_host_bytes": host_bytes,
        "state_bytes_per_host": nbytes,
        "backend": hello[0]["native"],
        "skipped": skipped,
        "runs_replication_gbps": [round(x, 3) for x in repl],
        "runs_tcp_gbps": [round(x, 3) for x in tcp],
    }))


if __name__ == "__main__":
    main()
