"""``resilient-run --persist-dir`` end to end, with damaged checkpoints and a full disk: a corrupt newest
checkpoint is set aside and retention keeps the verified older one; a directory whose committed
checkpoints are all damaged fails the job at start instead of training from step 0; and the exit summary
names the newest checkpoint on disk and a failed final persist."""

from __future__ import annotations

import os

from resilient.persist import latest_complete, open_storage
from resilient.persist.reader import set_aside_dirs
from tests.agent.conftest import SCRIPTS

ELASTIC = str(SCRIPTS / "elastic_train.py")
BASE = ["--standalone", "--nproc-per-node", "2", "--lease-ttl", "2"]


def _run(launch, tmp_path, ckpt, steps, name, *extra, env=None):
    out = tmp_path / name
    out.mkdir()
    run = launch([*BASE, "--persist-dir", str(ckpt), *extra, ELASTIC, "--steps", str(steps), "--sleep", "0",
                  "--out", str(out)], name=name, env=env)
    return run


def _two_checkpoints(launch, tmp_path, ckpt):
    """Steps 3 and 6, each persisted at job end (``--persist-every 0``) by a run of its own."""
    for steps, name in ((3, "first"), (6, "second")):
        run = _run(launch, tmp_path, ckpt, steps, name, "--persist-every", "0")
        assert run.wait(120) == 0, run.output()
    assert sorted(os.listdir(ckpt)) == ["step-00000003", "step-00000006"]


def test_a_corrupt_newest_checkpoint_is_set_aside_and_retention_keeps_the_verified_older_one(launch, tmp_path):
    ckpt = tmp_path / "ckpt"
    _two_checkpoints(launch, tmp_path, ckpt)
    shard = ckpt / "step-00000006" / "rank-0.safetensors"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0x01  # one flipped tensor byte
    shard.write_bytes(bytes(data))
    run = _run(launch, tmp_path, ckpt, 5, "third", "--persist-every", "0", "--keep", "2")
    assert run.wait(120) == 0, run.output()
    steps = sorted({e["step"] for e in run.events("step.done")})
    assert steps[0] == 3, "it resumes from the verified older checkpoint"
    [aside] = set_aside_dirs(open_storage(str(ckpt)))
    assert aside.startswith("step-00000006.corrupt-")
    # keep 2 keeps the two verified ones; before, the corrupt step 6 was kept and step 3 deleted
    assert sorted(os.listdir(ckpt)) == sorted(["step-00000003", "step-00000005", aside])
    assert latest_complete(str(ckpt)).step == 5
    assert f"It was set aside as {ckpt / aside}" in run.output()


def test_every_committed_checkpoint_damaged_fails_the_job_at_start_instead_of_training_from_scratch(
        launch, tmp_path):
    ckpt = tmp_path / "ckpt"
    _two_checkpoints(launch, tmp_path, ckpt)
    for step in (3, 6):
        with open(ckpt / f"step-{step:08d}" / "manifest.json", "r+") as fh:
            fh.truncate(40)
    run = _run(launch, tmp_path, ckpt, 5, "third", "--persist-every", "0")
    assert run.wait(120) == 1, run.output()
    output = run.output()
    assert f"Every committed checkpoint in {ckpt} is damaged" in output
    assert str(ckpt / "step-00000003") in output and str(ckpt / "step-00000006") in output
    assert "point --persist-dir at a fresh directory" in output
    assert "There is no older committed checkpoint to fall back to" in output
    assert "Falling back" not in output
    assert run.events("worker.start") == [], "no worker trains from step 0"
    assert sorted(os.listdir(ckpt)) == ["step-00000003", "step-00000006"], "nothing renamed or deleted"


def test_the_exit_summary_names_the_checkpoint_on_disk_and_the_failed_final_persist(launch, tmp_path):
    ckpt = tmp_path / "ckpt"
    run = _run(launch, tmp_path, ckpt, 4, "full", "--persist-every", "0",
               env={"RESILIENT_FAILPOINTS": "persist.shard.after_write=enospc"})
    assert run.wait(120) == 0, "training succeeded: the exit code stays 0\n" + run.output()
    output = run.output()
    assert "succeeded (exit code 0)" in output
    assert f"durable checkpoint: none in {ckpt} (the final persist of step 4 failed: ENOSPC: " in output
    assert "earlier checkpoints are unchanged" not in output
    assert f"there is no earlier checkpoint in {ckpt}, so nothing is persisted yet" in output
