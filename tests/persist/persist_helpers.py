"""Helpers for the durable-checkpoint tests: shard states with known contents, a bit-exact comparison,
damaging a checkpoint on disk, and running code in a fresh interpreter."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import textwrap

import torch

from resilient.persist import ShardState

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def make_shards(step: int, world_size: int = 2, *, generation: int = 1, floats: int = 1000, seed: int = 0
                ) -> dict[int, ShardState]:
    """World-size shards of step ``step`` whose contents depend on (seed, step, rank)."""
    shards = {}
    for rank in range(world_size):
        g = torch.Generator().manual_seed(seed * 1_000_003 + step * 1009 + rank)
        tensors = {
            "model/layer.weight": torch.randn(floats // 10, 10, generator=g),
            "model/layer.bias": torch.randn(10, generator=g).to(torch.bfloat16),
            "optimizer/state/0/exp_avg": torch.randn(floats // 10, 10, generator=g, dtype=torch.float64),
            "optimizer/state/0/step": torch.tensor(float(step)),
            "sampler/position": torch.tensor([step, rank], dtype=torch.int64),
            "misc/mask": torch.rand(17, generator=g) > 0.5,
            "misc/empty": torch.empty(0, 3),
        }
        meta = pickle.dumps({"rng": g.get_state().numpy().tobytes(), "step": step, "rank": rank, "note": "ü"})
        shards[rank] = ShardState(step=step, generation=generation, meta=meta, tensors=tensors)
    return shards


def assert_same_shards(got: dict[int, ShardState], want: dict[int, ShardState]) -> None:
    """Bit-exact equality of every tensor (dtype, shape, bytes) and of the meta bytes."""
    assert sorted(got) == sorted(want)
    for rank, w in want.items():
        g = got[rank]
        assert g.meta == w.meta, f"rank {rank}: meta differs"
        assert sorted(g.tensors) == sorted(w.tensors), f"rank {rank}: tensor names differ"
        for name, wt in w.tensors.items():
            gt = g.tensors[name]
            assert gt.dtype == wt.dtype and gt.shape == wt.shape, f"rank {rank} {name}: {gt.dtype}{gt.shape}"
            assert torch.equal(_raw(gt), _raw(wt)), f"rank {rank} {name}: bytes differ"


def _raw(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


def flip_byte(path: str, offset_from_end: int = 1, mask: int = 0x01) -> None:
    """XOR the byte ``offset_from_end`` bytes before the end of file ``path`` with ``mask``, in place."""
    with open(path, "r+b") as fh:
        fh.seek(-offset_from_end, os.SEEK_END)
        byte = fh.read(1)
        fh.seek(-offset_from_end, os.SEEK_END)
        fh.write(bytes([byte[0] ^ mask]))


def truncate_manifest(ckpt_dir: str, step: int, size: int = 40) -> None:
    """Cut step ``step``'s ``manifest.json`` in ``ckpt_dir`` to its first ``size`` bytes: it no longer parses."""
    with open(os.path.join(ckpt_dir, f"step-{step:08d}", "manifest.json"), "r+") as fh:
        fh.truncate(size)


def run_python(code: str, *, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter with the source tree importable; returns the finished process."""
    full_env = dict(os.environ)
    full_env["PYTHONPATH"] = REPO + os.pathsep + full_env.get("PYTHONPATH", "")
    full_env["OMP_NUM_THREADS"] = "1"
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=full_env, capture_output=True,
                          text=True, timeout=timeout)
