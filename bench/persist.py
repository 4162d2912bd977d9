"""Benchmark: durable-checkpoint throughput and the stall it adds to training.

1. Throughput: persist ``--gb`` of state over ``--shards`` shards with ``Persister.persist`` (safetensors
   files, sha256 + crc32, fsync, rename, manifest), beside a plain sequential write + fsync of the same
   tensor bytes to the same file system, in the same run, alternating, best of ``--reps`` each (other processes on the machine only ever slow a run down).
2. Stall: a small MLP train loop (one thread) timed without persistence and with a ``--snapshot-mb``
   snapshot persisted every ``--persist-every`` steps, alternating ``--loop-reps`` times. As in
   ``resilient-run``, persistence runs off the training process: the loop only sends "persist step s" to a
   separate persisting process (the agent's role; ``Persister.submit`` there, at the agent's background
   priority), the way a worker only reports a sealed snapshot to its agent. ``stall_added_s`` is the
   training thread's added wall time per persist (fastest loop with persistence minus fastest loop without,
   divided by the persists in a loop); ``noise_s`` is the same quantity between the two fastest loops
   *without* persistence, so ``measurable`` says whether the added stall stands out from the machine's
   own jitter. ``--in-process`` persists from a thread of the training process instead (what a user
   calling ``Persister`` directly gets: the persist thread then competes for the GIL).

Prints one JSON line: {"persist_gbps", "write_gbps", "ratio", "stall_added_s", ...details}.
Targets: ratio >= 0.8; no measurable added stall.

    python bench/persist.py --gb 1 --dir /tmp   # about a minute on 2 cores
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from resilient.persist import Persister, ShardState  # noqa: E402
from resilient.persist.shardfile import tensor_bytes  # noqa: E402


def make_state(total_bytes: int, shards: int, tensors_per_shard: int = 8) -> dict[int, ShardState]:
    per_tensor = max(1, total_bytes // shards // tensors_per_shard // 4)
    out = {}
    for rank in range(shards):
        tensors = {f"model/p{i}": torch.empty(per_tensor).uniform_() for i in range(tensors_per_shard)}
        out[rank] = ShardState(step=0, generation=1, meta=b"x" * 4096, tensors=tensors)
    return out


def plain_write(directory: str, state: dict[int, ShardState]) -> tuple[float, int]:
    """Sequentially write every shard's tensor bytes to one file per shard, fsync each; (seconds, bytes)."""
    total = 0
    start = time.perf_counter()
    for rank, shard in state.items():
        path = os.path.join(directory, f"plain-{rank}.bin")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            for name, tensor in shard.tensors.items():
                view = tensor_bytes(name, tensor)
                while view:
                    n = os.write(fd, view[: 64 << 20])
                    view = view[n:]
                    total += n
            os.fsync(fd)
        finally:
            os.close(fd)
    fd = os.open(directory, os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)
    return time.perf_counter() - start, total


def throughput(root: str, gb: float, shards: int, reps: int) -> dict:
    state = make_state(int(gb * 1e9), shards)
    write_s, persist_s = [], []
    nbytes = pbytes = 0
    for rep in range(reps):
        plain_dir = tempfile.mkdtemp(prefix="plain-", dir=root)
        try:
            seconds, nbytes = plain_write(plain_dir, state)
            write_s.append(seconds)
        finally:
            shutil.rmtree(plain_dir)
        persist_dir = tempfile.mkdtemp(prefix="persist-", dir=root)
        try:
            shard_state = {r: ShardState(rep, 1, s.meta, s.tensors) for r, s in state.items()}
            with Persister(persist_dir, job="bench", keep=1) as persister:
                start = time.perf_counter()
                manifest = persister.persist(rep, 1, shards, shard_state)
                persist_s.append(time.perf_counter() - start)
                pbytes = manifest.total_bytes
        finally:
            shutil.rmtree(persist_dir)
    write_gbps = nbytes / min(write_s) / 1e9
    persist_gbps = pbytes / min(persist_s) / 1e9
    return {"persist_gbps": round(persist_gbps, 3), "write_gbps": round(write_gbps, 3),
            "ratio": round(persist_gbps / write_gbps, 3), "bytes": pbytes,
            "persist_s": [round(s, 3) for s in persist_s], "write_s": [round(s, 3) for s in write_s]}


class _Sink:
    """Where the training loop sends its persist requests: a thread in this process (``in_process``) or a
    separate persisting process (the agent's place), reached through a pipe."""

    def __init__(self, directory: str, snapshot_mb: float, shards: int, in_process: bool) -> None:
        self.in_process = in_process
        self.futures: list = []
        if in_process:
            self.snapshot = make_state(int(snapshot_mb * 1e6), shards)
            self.persister = Persister(directory, job="bench", keep=1)
            return
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_persist_server, args=(child, directory, snapshot_mb, shards), daemon=True)
        self.proc.start()
        child.close()
        if self.conn.recv() != "ready":
            raise RuntimeError("the persisting process did not start")

    def submit(self, step: int) -> None:
        if self.in_process:
            snap = {r: ShardState(step, 1, v.meta, v.tensors) for r, v in self.snapshot.items()}
            self.futures.append(self.persister.submit(step, 1, len(snap), snap))
        else:
            self.conn.send(step)

    def close(self) -> dict:
        """Wait for the persists; their outcomes."""
        if self.in_process:
            outcomes = _outcomes(self.futures)
            self.persister.close()
            return outcomes
        self.conn.send(None)
        outcomes = self.conn.recv()
        self.proc.join(30)
        return outcomes


def _outcomes(futures: list) -> dict:
    """Wait for the persists; how many were done, superseded by a newer one, or failed (printed)."""
    outcomes = {"done": 0, "superseded": 0, "failed": 0}
    for f in futures:
        try:
            f.result()
            outcomes["done"] += 1
        except Exception as exc:  # noqa: BLE001 - counted and reported, not hidden
            outcomes["superseded" if f.cancelled() else "failed"] += 1
            if not f.cancelled():
                print(f"persist failed: {exc}", file=sys.stderr)
    return outcomes


def _persist_server(conn, directory: str, snapshot_mb: float, shards: int) -> None:
    """The persisting process: persists its copy of the snapshot for every step the loop sends."""
    torch.set_num_threads(1)
    snapshot = make_state(int(snapshot_mb * 1e6), shards)
    futures = []
    with Persister(directory, job="bench", keep=1) as persister:
        conn.send("ready")
        while (step := conn.recv()) is not None:
            snap = {r: ShardState(step, 1, v.meta, v.tensors) for r, v in snapshot.items()}
            futures.append(persister.submit(step, 1, len(snap), snap))
        outcomes = _outcomes(futures)
    conn.send(outcomes)


def train_loop(steps: int, sink: _Sink | None, every: int, first_step: int) -> tuple[float, float, int]:
    """Time ``steps`` training steps; with a sink, ask it to persist every ``every`` steps."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(512, 1024), torch.nn.ReLU(), torch.nn.Linear(1024, 512))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x, y = torch.randn(64, 512), torch.randn(64, 512)
    submits = 0
    submit_max = 0.0
    start = time.perf_counter()
    for step in range(steps):
        loss = torch.nn.functional.mse_loss(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if sink is not None and (step + 1) % every == 0:
            t0 = time.perf_counter()
            sink.submit(first_step + step)
            submit_max = max(submit_max, time.perf_counter() - t0)
            submits += 1
    elapsed = time.perf_counter() - start
    return elapsed, submit_max, submits


def stall(root: str, steps: int, every: int, snapshot_mb: float, shards: int, reps: int, in_process: bool) -> dict:
    torch.set_num_threads(1)
    train_loop(20, None, every, 0)  # warm-up
    base, with_persist, submit_max, persists = [], [], 0.0, 0
    outcomes = {"done": 0, "superseded": 0, "failed": 0}
    for rep in range(reps):
        elapsed, _, _ = train_loop(steps, None, every, 0)
        base.append(elapsed)
        directory = tempfile.mkdtemp(prefix="stall-", dir=root)
        try:
            sink = _Sink(directory, snapshot_mb, shards, in_process)
            try:
                elapsed, smax, n = train_loop(steps, sink, every, rep * steps)
            finally:
                for k, v in sink.close().items():
                    outcomes[k] += v
            with_persist.append(elapsed)
            submit_max = max(submit_max, smax)
            persists += n
        finally:
            shutil.rmtree(directory)
    # Interference from other processes only adds time, so the fastest loop of each kind is the estimate.
    base_sorted = sorted(base)
    base_s, with_s = base_sorted[0], min(with_persist)
    per_rep_persists = persists / reps
    added = (with_s - base_s) / per_rep_persists if per_rep_persists else None
    noise = (base_sorted[1] - base_sorted[0]) / per_rep_persists if per_rep_persists and len(base) > 1 else None
    return {
        "stall_added_s": round(added, 4) if added is not None else None,
        "noise_s": round(noise, 4) if noise is not None else None,
        "measurable": bool(added is not None and noise is not None and added > noise),
        "persist_from": "this process (thread)" if in_process else "a separate process (as the agent does)",
        "step_s_base": round(base_s / steps, 5), "step_s_persist": round(with_s / steps, 5),
        "loop_s_base": [round(b, 3) for b in base], "loop_s_persist": [round(w, 3) for w in with_persist],
        "persists_per_loop": per_rep_persists, "submit_max_s": round(submit_max, 5), "snapshot_mb": snapshot_mb,
        "persist_outcomes": outcomes,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gb", type=float, default=1.0, help="state size for the throughput test (GB)")
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--reps", type=int, default=3, help="alternating repetitions of write and persist")
    parser.add_argument("--dir", default=None, help="file system to test (default: the system temp dir)")
    parser.add_argument("--steps", type=int, default=300, help="train steps per timed loop")
    parser.add_argument("--persist-every", type=int, default=50)
    parser.add_argument("--snapshot-mb", type=float, default=128.0, help="snapshot size persisted in the loop")
    parser.add_argument("--loop-reps", type=int, default=4)
    parser.add_argument("--in-process", action="store_true",
                        help="persist from a thread of the training process (default: a separate process, as the agent)")
    args = parser.parse_args(argv)
    root = tempfile.mkdtemp(prefix="resilient-bench-persist-", dir=args.dir)
    try:
        result = throughput(root, args.gb, args.shards, args.reps)
        result.update(stall(root, args.steps, args.persist_every, args.snapshot_mb, args.shards, args.loop_reps,
                            args.in_process))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    head = {k: result.pop(k) for k in ("persist_gbps", "write_gbps", "ratio", "stall_added_s")}
    print(json.dumps({**head, "gb": args.gb, "shards": args.shards, "dir": args.dir or tempfile.gettempdir(),
                      **result}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
