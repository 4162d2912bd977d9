"""The replica corruption hits the committed step whichever slot holds it: a real segment with two sealed
snapshots fails verification on both after the flip."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from resilient.chaos.faults.storage import _data_offsets
from resilient.errors import ChecksumError, StoreError
from resilient.store.segment import Segment


def test_flipping_at_the_data_offsets_breaks_both_sealed_slots(tmp_path: Path) -> None:
    seg = Segment.create("rs-chaos-test.rep.r0", 4096, job="j", rank=0, shm_dir=str(tmp_path))
    try:
        for step in (1, 2):
            seg.write({"w": torch.arange(256, dtype=torch.float64) * step}, step=step, generation=1)
            seg.seal()
        path = seg.path
        size = os.stat(path).st_size
        offsets = _data_offsets(path, size, 64)
        assert len(offsets) == 2
        with open(path, "r+b") as fh:
            for off in offsets:
                fh.seek(off)
                data = bytes(b ^ 0xFF for b in fh.read(64))
                fh.seek(off)
                fh.write(data)
        for step in (1, 2):
            with pytest.raises((ChecksumError, StoreError)):
                seg.read(step=step, verify=True)
    finally:
        seg.unlink()
        seg.close()


def test_a_file_that_is_not_a_segment_is_hit_in_the_middle(tmp_path: Path) -> None:
    p = tmp_path / "blob"
    p.write_bytes(b"x" * 1000)
    assert _data_offsets(str(p), 1000, 100) == [450]


def test_a_visible_durable_checkpoint_that_does_not_verify_fails_the_durable_check(tmp_path: Path) -> None:
    from types import SimpleNamespace

    from resilient.chaos import invariants as inv
    from resilient.chaos.runner import Execution, _check_durable
    from resilient.persist import ShardState, open_storage, write_checkpoint

    shards = {r: ShardState(5, 1, b"meta", {"model/w": torch.arange(64, dtype=torch.float64) + r}) for r in range(2)}
    write_checkpoint(open_storage(str(tmp_path)), 5, 1, 2, shards, job="j")
    (tmp_path / "step-partial").mkdir()  # not a checkpoint name; a torn persist without manifest is ignored
    cluster = SimpleNamespace(persist_dir=tmp_path)
    ex = Execution(run_dir=tmp_path, t_start=0.0)
    _check_durable(cluster, ex)
    assert inv.durable_consistent(ex.durable, ex.durable_seen).status == inv.PASS and ex.durable_seen == [5]
    shard = next(p for p in tmp_path.rglob("*.safetensors"))
    data = bytearray(shard.read_bytes())
    data[-8] ^= 0xFF
    shard.write_bytes(bytes(data))
    ex = Execution(run_dir=tmp_path, t_start=0.0)
    _check_durable(cluster, ex)
    c = inv.durable_consistent(ex.durable, ex.durable_seen)
    assert c.status == inv.FAIL and "does not verify" in c.detail
