"""Damaged committed checkpoints: set aside (renamed, never deleted) by the job's own readers so that
retention and later readers no longer count them; "every committed checkpoint is damaged" told apart from
"nothing committed"; the persister's failure message only claims earlier checkpoints that exist."""

from __future__ import annotations

import logging
import os
import threading
import time

import pytest
from persist_helpers import assert_same_shards, flip_byte, make_shards, truncate_manifest

from resilient.errors import PersistError
from resilient.persist import (
    Persister,
    clean_leftovers,
    find_latest,
    latest_complete,
    load,
    open_storage,
    read_manifest,
    set_aside,
    write_checkpoint,
)
from resilient.persist.reader import set_aside_dirs


def _write(ckpt_dir, *steps):
    storage = open_storage(ckpt_dir)
    return {step: write_checkpoint(storage, step, 1, 2, make_shards(step), job="j") for step in steps}


def _flip_tensor_byte(ckpt_dir, step, rank=0):
    """Flip one byte inside a tensor's data (not the header): only that tensor's crc32 can tell."""
    path = os.path.join(ckpt_dir, f"step-{step:08d}", f"rank-{rank}.safetensors")
    shard = read_manifest(open_storage(ckpt_dir), f"step-{step:08d}").shard(rank)
    data_start = shard.bytes - max(t.end for t in shard.tensors)
    first = next(t for t in shard.tensors if t.nbytes)
    flip_byte(path, offset_from_end=os.path.getsize(path) - (data_start + first.begin), mask=0x01)


def test_a_corrupt_newest_checkpoint_is_set_aside_and_retention_keeps_the_verified_older_one(
        ckpt_dir, warnings_logged):
    """The review's case: step 12 has one flipped tensor byte; the job resumes from step 1. Before, retention
    (keep 2) then kept the corrupt step 12 and deleted the verified step 1."""
    _write(ckpt_dir, 1, 12)
    _flip_tensor_byte(ckpt_dir, 12)
    found = find_latest(ckpt_dir, load_states=True, set_aside_damaged=True)
    assert found.manifest.step == 1
    assert_same_shards(found.states, make_shards(1))
    [skipped] = found.skipped
    assert skipped.step == 12 and "crc32" in skipped.error
    aside = set_aside_dirs(open_storage(ckpt_dir))
    assert len(aside) == 1 and aside[0].startswith("step-00000012.corrupt-")
    assert skipped.set_aside_as == os.path.join(ckpt_dir, aside[0])
    # the rename kept every byte: the damaged files are all there for a post-mortem
    assert sorted(os.listdir(os.path.join(ckpt_dir, aside[0]))) == ["manifest.json", "rank-0.safetensors",
                                                                   "rank-1.safetensors"]
    message = next(r.getMessage() for r in warnings_logged.records if "set aside as" in r.getMessage())
    assert os.path.join(ckpt_dir, "step-00000012") in message and "crc32" in message and "not deleted" in message

    # the resumed job persists steps 2 and 3 with keep 2: step 1 goes only once two newer intact ones exist,
    # and the set-aside directory is neither counted nor deleted
    with Persister(ckpt_dir, job="j", keep=2) as persister:
        persister.persist(2, 1, 2, make_shards(2))
        assert sorted(os.listdir(ckpt_dir)) == ["step-00000001", "step-00000002", aside[0]]
        persister.persist(3, 1, 2, make_shards(3))
    assert sorted(os.listdir(ckpt_dir)) == ["step-00000002", "step-00000003", aside[0]]
    assert latest_complete(ckpt_dir).step == 3
    assert clean_leftovers(ckpt_dir) == []
    assert aside[0] in os.listdir(ckpt_dir)


def test_readers_that_are_not_the_job_never_rename(ckpt_dir):
    _write(ckpt_dir, 1, 12)
    _flip_tensor_byte(ckpt_dir, 12)
    assert latest_complete(ckpt_dir).step == 1
    assert find_latest(ckpt_dir).manifest.step == 1
    assert sorted(os.listdir(ckpt_dir)) == ["step-00000001", "step-00000012"]


def test_every_committed_checkpoint_damaged_is_not_nothing_committed_and_nothing_is_moved(
        ckpt_dir, warnings_logged):
    _write(ckpt_dir, 4, 12)
    truncate_manifest(ckpt_dir, 4)
    truncate_manifest(ckpt_dir, 12)
    os.makedirs(os.path.join(ckpt_dir, "step-00000020"))  # an unfinished persist: not a committed checkpoint
    found = find_latest(ckpt_dir, load_states=True, set_aside_damaged=True)
    assert found.manifest is None and found.all_damaged
    assert [s.step for s in found.skipped] == [12, 4]
    report = found.damage_report()
    assert os.path.join(ckpt_dir, "step-00000012") in report and os.path.join(ckpt_dir, "step-00000004") in report
    assert sorted(os.listdir(ckpt_dir)) == ["step-00000004", "step-00000012", "step-00000020"]
    messages = [r.getMessage() for r in warnings_logged.records if "Skipping checkpoint" in r.getMessage()]
    assert "Trying the next older checkpoint" in messages[0] and "step-00000004" in messages[0]
    assert "There is no older committed checkpoint to fall back to" in messages[1]
    assert not any("Falling back" in m for m in messages)


def test_directories_without_a_manifest_are_nothing_committed(ckpt_dir):
    os.makedirs(os.path.join(ckpt_dir, "step-00000005"))
    open(os.path.join(ckpt_dir, "step-00000005", "rank-0.safetensors"), "wb").write(b"half")
    found = find_latest(ckpt_dir, set_aside_damaged=True)
    assert found.manifest is None and not found.all_damaged and found.skipped == []


def test_two_readers_setting_the_same_checkpoint_aside_at_once_leave_one_copy(ckpt_dir):
    _write(ckpt_dir, 1, 12)
    _flip_tensor_byte(ckpt_dir, 12)
    storage = open_storage(ckpt_dir)
    start = threading.Barrier(4)
    results = []

    def reader():
        start.wait()
        results.append(set_aside(storage, "step-00000012", "test", step=12))

    threads = [threading.Thread(target=reader) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    moved = [r for r in results if r is not None]
    assert len(moved) == 1, results
    assert set_aside_dirs(storage) == [os.path.basename(moved[0])]
    assert sorted(os.listdir(os.path.join(moved[0]))) == ["manifest.json", "rank-0.safetensors", "rank-1.safetensors"]


def test_a_checkpoint_whose_manifest_is_being_deleted_is_not_set_aside(ckpt_dir):
    """Retention removes the manifest first: a reader that found the files going must not move the rest."""
    _write(ckpt_dir, 3)
    os.unlink(os.path.join(ckpt_dir, "step-00000003", "manifest.json"))
    assert set_aside(open_storage(ckpt_dir), "step-00000003", "files vanished") is None
    assert os.listdir(ckpt_dir) == ["step-00000003"]


def test_persisting_a_step_over_its_damaged_committed_directory_sets_the_old_one_aside(ckpt_dir):
    """Before, write_checkpoint removed a step directory whose manifest did not parse: a committed checkpoint
    deleted without a word."""
    _write(ckpt_dir, 7)
    truncate_manifest(ckpt_dir, 7)
    with Persister(ckpt_dir, job="j") as persister:
        manifest = persister.persist(7, 1, 2, make_shards(7))
    assert_same_shards(load(manifest), make_shards(7))
    [aside] = set_aside_dirs(open_storage(ckpt_dir))
    assert aside.startswith("step-00000007.corrupt-")
    assert os.path.getsize(os.path.join(ckpt_dir, aside, "manifest.json")) == 40


def test_a_failed_persist_says_which_checkpoint_stays_the_latest_and_never_claims_one_that_does_not_exist(
        ckpt_dir):
    with Persister(ckpt_dir, job="j", failpoints="persist.shard.after_write=enospc") as persister:
        with pytest.raises(PersistError) as first:
            persister.persist(3, 1, 2, make_shards(3))
        assert f"there is no earlier checkpoint in {ckpt_dir}, so nothing is persisted yet" in str(first.value)
        assert "earlier checkpoints are unchanged" not in str(first.value)
        persister._fp.disarm()
        persister.persist(4, 1, 2, make_shards(4))
        persister._fp.arm("persist.shard.after_write", "enospc")
        with pytest.raises(PersistError) as second:
            persister.persist(5, 1, 2, make_shards(5))
    assert "the newest of them, step 4, stays the latest" in str(second.value)


def test_a_superseded_step_is_logged_at_info_with_the_reason(ckpt_dir, caplog):
    logger = logging.getLogger("resilient")
    logger.addHandler(caplog.handler)
    caplog.set_level(logging.INFO, logger="resilient")
    try:
        with Persister(ckpt_dir, job="j", failpoints="persist.shard.after_write=1*sleep(600)") as persister:
            first = persister.submit(1, 1, 2, make_shards(1))
            deadline = time.monotonic() + 30
            while persister.pending():  # step 1 is being written (sleeping in the failpoint) once the queue is empty
                assert time.monotonic() < deadline, "step 1 was still queued after 30 s: the writer never took it"
                time.sleep(0.01)
            second = persister.submit(2, 1, 2, make_shards(2))
            third = persister.submit(3, 1, 2, make_shards(3))
            assert third.result(60).step == 3 and first.result(60).step == 1
            assert second.cancelled()
    finally:
        logger.removeHandler(caplog.handler)
    said = [r.getMessage() for r in caplog.records
            if r.levelno == logging.INFO and "is not persisted" in r.getMessage()]
    assert said == [said[0]] and "step 2" in said[0] and "step 3 replaced it" in said[0]
