"""A kill at each point of the persist sequence leaves exactly the old or the new checkpoint, never a mix.

Each case persists step 10 here, then persists step 20 in a child process whose
``RESILIENT_FAILPOINTS`` arms one point with ``panic`` (``os._exit(137)``, as abrupt as SIGKILL).
"""

from __future__ import annotations

import json
import os

import pytest
from persist_helpers import REPO, assert_same_shards, make_shards, run_python

from resilient import failpoints
from resilient.persist import Persister, clean_leftovers, latest_complete, load

OLD, NEW = 10, 20
WORLD = 3

# failpoint -> (checkpoint latest after the kill, whether the kill leaves something to clean up)
SEQUENCE = [
    ("persist.shard.mid_write", OLD, True),
    ("persist.shard.after_write", OLD, True),
    ("persist.shard.after_fsync", OLD, True),
    ("persist.shard.after_rename", OLD, True),
    ("persist.shards.after_dir_fsync", OLD, True),
    ("persist.manifest.after_write", OLD, True),
    ("persist.manifest.after_fsync", OLD, True),
    ("persist.manifest.after_rename", NEW, False),
    ("persist.after_commit", NEW, False),
    ("persist.retention.after_unlink_manifest", NEW, True),
]

CHILD = """
import sys
sys.path.insert(0, {helpers!r})
from persist_helpers import make_shards
from resilient.persist import Persister

persister = Persister({directory!r}, job="j", keep=1)
persister.submit({step}, 1, {world}, make_shards({step}, {world})).result()
print("persist finished", flush=True)
"""


def _files(directory):
    return sorted(os.path.relpath(os.path.join(root, name), directory)
                  for root, _, names in os.walk(directory) for name in names)


@pytest.mark.parametrize("point, survivor, leftovers", SEQUENCE, ids=[p for p, _, _ in SEQUENCE])
def test_kill_at_failpoint_leaves_old_or_new_never_a_mix(ckpt_dir, tmp_path, point, survivor, leftovers):
    with Persister(ckpt_dir, job="j", keep=1) as persister:
        persister.persist(OLD, 1, WORLD, make_shards(OLD, WORLD))
    log = tmp_path / "events.jsonl"
    proc = run_python(
        CHILD.format(helpers=os.path.join(REPO, "tests", "persist"), directory=ckpt_dir, step=NEW, world=WORLD),
        env={"RESILIENT_FAILPOINTS": f"{point}=panic", "RESILIENT_EVENT_LOG": str(log)},
    )
    assert proc.returncode == failpoints.PANIC_EXIT_CODE, proc.stdout + proc.stderr
    assert "persist finished" not in proc.stdout
    fired = [e for e in map(json.loads, log.read_text().splitlines()) if e["kind"] == "failpoint.fired"]
    assert [e["name"] for e in fired] == [point]

    manifest = latest_complete(ckpt_dir)
    assert manifest is not None and manifest.step == survivor
    assert_same_shards(load(manifest), make_shards(survivor, WORLD))

    before = _files(ckpt_dir)
    removed = clean_leftovers(ckpt_dir)
    assert bool(removed) == leftovers, (removed, before)
    after = _files(ckpt_dir)
    assert not [f for f in after if f.endswith(".tmp")]
    for directory in os.listdir(ckpt_dir):
        assert os.path.exists(os.path.join(ckpt_dir, directory, "manifest.json")), after
    assert latest_complete(ckpt_dir).step == survivor
