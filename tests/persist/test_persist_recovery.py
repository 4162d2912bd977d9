"""Damaged, partial and old checkpoints: skipped with a warning, cleaned, and retained as configured."""

from __future__ import annotations

import logging
import os

import pytest
from hypothesis import given
from hypothesis import strategies as st
from persist_helpers import assert_same_shards, flip_byte, make_shards

from resilient.errors import CheckpointCorruptError, ConfigError, PersistError
from resilient.persist import (
    Persister,
    clean_leftovers,
    latest_complete,
    load,
    load_latest,
    open_storage,
    plan_retention,
    verify,
    write_checkpoint,
)


def _two_checkpoints(ckpt_dir):
    storage = open_storage(ckpt_dir)
    old = make_shards(10)
    new = make_shards(20)
    write_checkpoint(storage, 10, 1, 2, old, job="j")
    write_checkpoint(storage, 20, 1, 2, new, job="j")
    return old, new


def _rank_file(ckpt_dir, step, rank):
    return os.path.join(ckpt_dir, f"step-{step:08d}", f"rank-{rank}.safetensors")


def test_corrupt_shard_is_skipped_with_a_warning_and_the_previous_checkpoint_is_used(
        ckpt_dir, warnings_logged, events_seen):
    old, _ = _two_checkpoints(ckpt_dir)
    flip_byte(_rank_file(ckpt_dir, 20, 1), offset_from_end=5, mask=0x01)
    manifest = latest_complete(ckpt_dir, on_event=events_seen.append)
    assert manifest.step == 10
    assert any(r.levelno == logging.WARNING and "Skipping checkpoint step 20" in r.getMessage()
               and "rank-1.safetensors" in r.getMessage() for r in warnings_logged.records)
    assert [(e["kind"], e["step"]) for e in events_seen] == [("ckpt.verify_failed", 20)]
    assert_same_shards(load(manifest), old)
    found, shards = load_latest(ckpt_dir)
    assert found.step == 10
    assert_same_shards(shards, old)


def test_corruption_names_the_tensor_whose_bytes_changed(ckpt_dir):
    _two_checkpoints(ckpt_dir)
    flip_byte(_rank_file(ckpt_dir, 20, 0), offset_from_end=5, mask=0x01)
    manifest = latest_complete(ckpt_dir, verify=False)
    assert manifest.step == 20
    with pytest.raises(CheckpointCorruptError, match=r"tensor '.*' in .*rank-0.safetensors fails its crc32"):
        verify(manifest)
    with pytest.raises(CheckpointCorruptError):
        load(manifest)


def test_corrupt_header_truncated_file_missing_file_and_bad_manifest_are_each_skipped(ckpt_dir):
    storage = open_storage(ckpt_dir)
    for step in (1, 2, 3, 4, 5):
        write_checkpoint(storage, step, 1, 2, make_shards(step), job="j")
    with open(_rank_file(ckpt_dir, 5, 0), "r+b") as fh:  # header byte
        fh.seek(20)
        fh.write(b"#")
    with open(_rank_file(ckpt_dir, 4, 1), "r+b") as fh:  # truncated
        fh.truncate(100)
    os.unlink(_rank_file(ckpt_dir, 3, 0))  # missing
    with open(os.path.join(ckpt_dir, "step-00000002", "manifest.json"), "a") as fh:
        fh.write("garbage")
    assert latest_complete(ckpt_dir).step == 1
    for step in (2, 3, 4, 5):
        path = os.path.join(ckpt_dir, f"step-{step:08d}")
        with pytest.raises(CheckpointCorruptError):
            load(path)


def test_partial_checkpoint_without_manifest_is_ignored_and_cleaned(ckpt_dir):
    old, new = _two_checkpoints(ckpt_dir)
    os.unlink(os.path.join(ckpt_dir, "step-00000020", "manifest.json"))
    temp = os.path.join(ckpt_dir, "step-00000010", ".rank-0.safetensors.123-abcd.tmp")
    open(temp, "wb").write(b"half")
    assert latest_complete(ckpt_dir).step == 10
    removed = clean_leftovers(ckpt_dir)
    assert sorted(removed) == sorted([os.path.join(ckpt_dir, "step-00000020"), temp])
    assert sorted(os.listdir(ckpt_dir)) == ["step-00000010"]
    assert_same_shards(load(ckpt_dir), old)
    assert clean_leftovers(ckpt_dir) == []


def test_leftovers_of_newer_steps_are_left_alone_when_told_up_to_which_step(ckpt_dir):
    """``up_to_step``: a directory of a newer step without a manifest may be a persist in flight on another
    host; only the abandoned ones (that step and older) go."""
    _two_checkpoints(ckpt_dir)
    for step in (15, 30):
        os.makedirs(os.path.join(ckpt_dir, f"step-{step:08d}"))
        open(os.path.join(ckpt_dir, f"step-{step:08d}", "rank-1.safetensors"), "wb").write(b"shard")
    removed = clean_leftovers(ckpt_dir, up_to_step=20)
    assert removed == [os.path.join(ckpt_dir, "step-00000015")]
    assert sorted(os.listdir(ckpt_dir)) == ["step-00000010", "step-00000020", "step-00000030"]
    assert os.path.exists(os.path.join(ckpt_dir, "step-00000030", "rank-1.safetensors"))
    assert clean_leftovers(ckpt_dir) == [os.path.join(ckpt_dir, "step-00000030")], "without a bound: all"


def test_retention_keeps_the_newest_k(ckpt_dir, events_seen):
    with Persister(ckpt_dir, job="j", keep=2, on_event=events_seen.append) as persister:
        for step in (5, 10, 15, 20):
            persister.persist(step, 1, 2, make_shards(step))
    assert sorted(os.listdir(ckpt_dir)) == ["step-00000015", "step-00000020"]
    deleted = [e["deleted"] for e in events_seen if e["kind"] == "persist.retention"]
    assert deleted == [[5], [10]]


def test_a_failed_persist_deletes_nothing_older(ckpt_dir, events_seen):
    with Persister(ckpt_dir, job="j", keep=1, failpoints="persist.manifest.after_write=raise",
                   on_event=events_seen.append) as persister:
        persister._fp.disarm()
        persister.persist(5, 1, 2, make_shards(5))
        persister._fp.arm("persist.manifest.after_write", "raise")
        with pytest.raises(PersistError, match="step 6"):
            persister.persist(6, 1, 2, make_shards(6))
    assert os.listdir(ckpt_dir) == ["step-00000005"]
    assert latest_complete(ckpt_dir).step == 5
    failed = [e for e in events_seen if e["kind"] == "persist.failed"]
    assert len(failed) == 1 and failed[0]["step"] == 6 and "FailpointError" in failed[0]["error"]


def test_plan_retention_refuses_keep_below_one():
    with pytest.raises(ConfigError):
        plan_retention([(1, True)], 0)


@given(st.dictionaries(st.integers(0, 50), st.booleans(), max_size=12), st.integers(1, 4))
def test_plan_retention_keeps_k_newest_complete_and_never_touches_newer_partials(status, keep):
    doomed = set(plan_retention(list(status.items()), keep))
    complete = sorted(s for s, ok in status.items() if ok)
    survivors_complete = [s for s in complete if s not in doomed]
    assert survivors_complete == complete[-keep:]
    newest = complete[-1] if complete else None
    for step, ok in status.items():
        if not ok and (newest is None or step > newest):
            assert step not in doomed
        if not ok and newest is not None and step < newest:
            assert step in doomed
