"""The agent's durable tier (``resilient.agent.durable.Durable``) against real checkpoint files and real
shared-memory segments (``LocalSnapshots``): seeding sets a damaged newer checkpoint aside, refuses to
start from scratch over committed work, and the exit summary's line tells the newest checkpoint on disk
and a failed final persist."""

from __future__ import annotations

import os
import uuid

import pytest
from persist_helpers import assert_same_shards, flip_byte, make_shards, truncate_manifest

from resilient import failpoints
from resilient.agent import summary
from resilient.agent.durable import Durable
from resilient.agent.snapshots import LocalSnapshots
from resilient.errors import CheckpointCorruptError, PersistError
from resilient.persist import latest_complete, load, open_storage, write_checkpoint
from resilient.persist.reader import set_aside_dirs


@pytest.fixture
def snapshots():
    snaps = LocalSnapshots(job=f"t-{uuid.uuid4().hex[:8]}", node="n0")  # the default shm dir, as the agent
    snaps.on_generation((0, 1), 2, generation=1)
    yield snaps
    snaps.close(unlink=True)


def _write(ckpt_dir, *steps, world_size=2):
    storage = open_storage(ckpt_dir)
    for step in steps:
        write_checkpoint(storage, step, 1, world_size, make_shards(step, world_size), job="j")


def test_seed_resumes_from_the_older_checkpoint_and_sets_the_corrupt_newer_one_aside(ckpt_dir, snapshots):
    _write(ckpt_dir, 1, 12)
    flip_byte(os.path.join(ckpt_dir, "step-00000012", "rank-1.safetensors"), offset_from_end=1, mask=0x01)
    durable = Durable(ckpt_dir, "j", keep=2, every=0)
    try:
        assert durable.seed(snapshots, (0, 1), 2) == 1
    finally:
        durable.close()
    assert snapshots.committed_step() == 1
    [aside] = set_aside_dirs(open_storage(ckpt_dir))
    assert aside.startswith("step-00000012.corrupt-")
    assert sorted(os.listdir(ckpt_dir)) == sorted(["step-00000001", aside])


def test_seed_refuses_to_start_from_scratch_when_every_committed_checkpoint_is_damaged(ckpt_dir, snapshots):
    _write(ckpt_dir, 4, 12)
    for step in (4, 12):
        truncate_manifest(ckpt_dir, step, size=30)
    before = sorted(os.listdir(ckpt_dir))
    durable = Durable(ckpt_dir, "j", keep=2, every=0)
    try:
        with pytest.raises(CheckpointCorruptError) as info:
            durable.seed(snapshots, (0, 1), 2)
    finally:
        durable.close()
    msg = str(info.value)
    for step in (4, 12):
        assert os.path.join(ckpt_dir, f"step-{step:08d}") in msg
    assert "not valid JSON" in msg and "--persist-dir" in msg and "move them out" in msg
    assert sorted(os.listdir(ckpt_dir)) == before, "nothing is renamed or deleted when nothing can be loaded"
    assert snapshots.committed_step() is None
    assert durable.summary_line() == f"none intact in {ckpt_dir} (2 damaged, see the warnings above)"


def test_seed_of_a_directory_with_only_unfinished_persists_starts_from_scratch(ckpt_dir, snapshots):
    os.makedirs(os.path.join(ckpt_dir, "step-00000009"))
    before = sorted(os.listdir(ckpt_dir))
    durable = Durable(ckpt_dir, "j", keep=2, every=0)
    try:
        assert durable.seed(snapshots, (0, 1), 2) is None
    finally:
        durable.close()
    # the unfinished persist is left as it is: not set aside as damaged, not removed
    assert sorted(os.listdir(ckpt_dir)) == before == ["step-00000009"]
    assert os.listdir(os.path.join(ckpt_dir, "step-00000009")) == []


def test_seed_refuses_a_checkpoint_of_another_world_size(ckpt_dir, snapshots):
    _write(ckpt_dir, 6, world_size=3)
    durable = Durable(ckpt_dir, "j", keep=2, every=0)
    try:
        with pytest.raises(PersistError, match=r"world size 3; this job has world size 2"):
            durable.seed(snapshots, (0, 1), 2)
    finally:
        durable.close()
    assert os.listdir(ckpt_dir) == ["step-00000006"]


def _seeded(snapshots, tmp_path, step=10):
    """Committed ``step`` in ``snapshots`` (seeded from a checkpoint in a directory of its own)."""
    source = str(tmp_path / "source")
    _write(source, step)
    seeder = Durable(source, "j", keep=2, every=0)
    try:
        assert seeder.seed(snapshots, (0, 1), 2) == step
    finally:
        seeder.close()


def test_summary_line_names_the_checkpoint_on_disk_and_a_failed_final_persist(tmp_path, snapshots):
    _seeded(snapshots, tmp_path, step=10)
    target = str(tmp_path / "target")
    _write(target, 3)
    durable = Durable(target, "j", keep=2, every=0)
    registry = failpoints.default()
    registry.arm("persist.shard.after_write", "enospc")
    try:
        durable.maybe_persist(snapshots, (0, 1), 2, 1, final=True)
    finally:
        registry.disarm("persist.shard.after_write")
        durable.close()
    line = durable.summary_line()
    assert line.startswith(f"step 3 in {target} (the final persist of step 10 failed: ENOSPC: ")
    text = summary.render(job="j", node="n0", exit_code=0, outcome="succeeded", first=None, restarts=0,
                          generation=1, committed_step=10, durable=line)
    assert f"  durable checkpoint: step 3 in {target} (the final persist of step 10 failed: ENOSPC" in text
    assert latest_complete(target).step == 3


def test_summary_line_without_any_checkpoint_says_none_and_after_success_names_the_step(tmp_path, snapshots):
    _seeded(snapshots, tmp_path, step=10)
    target = str(tmp_path / "target")
    durable = Durable(target, "j", keep=2, every=0)
    registry = failpoints.default()
    registry.arm("persist.shard.after_write", "enospc")
    try:
        durable.maybe_persist(snapshots, (0, 1), 2, 1, final=True)
        assert durable.summary_line().startswith(f"none in {target} (the final persist of step 10 failed: ENOSPC")
        registry.disarm("persist.shard.after_write")
        durable.maybe_persist(snapshots, (0, 1), 2, 1, final=True)  # retried: the failed one did not count
    finally:
        registry.disarm("persist.shard.after_write")
        durable.close()
    assert durable.summary_line() == f"step 10 in {target}"
    assert_same_shards(load(latest_complete(target)), make_shards(10))


def test_summary_omits_the_durable_line_without_persist_dir():
    text = summary.render(job="j", node="n0", exit_code=0, outcome="succeeded", first=None, restarts=0,
                          generation=1, committed_step=5)
    assert "durable checkpoint" not in text


def test_a_late_persist_says_once_at_info_which_step_was_due_and_why_the_steps_between_are_not_persisted(
        ckpt_dir, caplog):
    import logging

    logger = logging.getLogger("resilient")
    logger.addHandler(caplog.handler)
    caplog.set_level(logging.DEBUG, logger="resilient")
    durable = Durable(ckpt_dir, "j", keep=2, every=5)
    try:
        assert durable._due(1)  # nothing persisted yet: the first committed step seen is
        durable._last = 1
        assert not durable._due(4)
        assert durable._due(5)  # exactly at the multiple: nothing to say
        assert durable._due(8) and durable._due(9)  # due at 5, seen at 8 and 9: later than due
    finally:
        durable.close()
        logger.removeHandler(caplog.handler)
    said = [(r.levelno, r.getMessage()) for r in caplog.records if "was due" in r.getMessage()]
    assert [level for level, _ in said] == [logging.INFO, logging.DEBUG]
    assert "persisting step 8: step 5 was due (--persist-every 5)" in said[0][1]
    assert "once per monitor tick" in said[0][1]


def test_a_job_seeded_from_disk_persists_next_at_the_next_multiple_not_at_once(ckpt_dir, snapshots):
    _write(ckpt_dir, 10)
    durable = Durable(ckpt_dir, "j", keep=2, every=5)
    try:
        assert durable.seed(snapshots, (0, 1), 2) == 10
        # step 10 is on disk: the first committed steps after the resume are not persisted again at once
        assert not durable._due(11) and not durable._due(14)
        assert durable._due(15)
    finally:
        durable.close()
