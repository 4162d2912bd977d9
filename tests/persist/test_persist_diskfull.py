"""Disk full during a persist: it fails cleanly, training goes on, the previous checkpoint stays latest."""

from __future__ import annotations

import errno
import os
import subprocess
import uuid

import pytest
from persist_helpers import assert_same_shards, make_shards

from resilient.errors import PersistError
from resilient.persist import Persister, clean_leftovers, latest_complete, load


@pytest.fixture
def small_disk(tmp_path):
    """A 4 MiB tmpfs mounted for the test (needs root; skipped when mounting is not allowed)."""
    mountpoint = tmp_path / f"tmpfs-{uuid.uuid4().hex[:6]}"
    mountpoint.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mountpoint)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {proc.stderr.strip()}")
    try:
        yield str(mountpoint)
    finally:
        if subprocess.run(["umount", str(mountpoint)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(mountpoint)], check=True)


def _errno_in_chain(exc):
    while exc is not None:
        if isinstance(exc, OSError):
            return exc.errno
        exc = exc.__cause__
    return None


def test_disk_full_fails_the_persist_cleanly_and_keeps_the_previous_checkpoint(small_disk, events_seen):
    small, large = make_shards(1, floats=20_000), make_shards(2, floats=200_000)  # ~0.5 MB and ~4.8 MB
    with Persister(small_disk, job="j", keep=1, on_event=events_seen.append) as persister:
        persister.persist(1, 1, 2, small)
        future = persister.submit(2, 1, 2, large)  # returns at once; training is not held up
        with pytest.raises(PersistError, match="step 2") as info:
            future.result(timeout=60)
        assert _errno_in_chain(info.value) == errno.ENOSPC

        failed = [e for e in events_seen if e["kind"] == "persist.failed"]
        assert len(failed) == 1 and failed[0]["step"] == 2 and failed[0]["errno"] == "ENOSPC"
        assert os.listdir(small_disk) == ["step-00000001"], "the failed persist must remove what it wrote"
        manifest = latest_complete(small_disk)
        assert manifest.step == 1
        assert_same_shards(load(manifest), small)
        assert clean_leftovers(small_disk) == []

        # training continues and the next (smaller) persist succeeds
        assert persister.submit(3, 1, 2, make_shards(3, floats=20_000)).result(timeout=60).step == 3
    assert latest_complete(small_disk).step == 3
    assert os.listdir(small_disk) == ["step-00000003"]


def test_injected_enospc_reports_the_errno_without_a_real_full_disk(ckpt_dir, events_seen):
    with Persister(ckpt_dir, job="j", failpoints="persist.shard.after_write=1*enospc",
                   on_event=events_seen.append) as persister:
        with pytest.raises(PersistError) as info:
            persister.persist(4, 1, 2, make_shards(4))
        assert _errno_in_chain(info.value) == errno.ENOSPC
        assert [e["errno"] for e in events_seen if e["kind"] == "persist.failed"] == ["ENOSPC"]
        assert os.listdir(ckpt_dir) == []
        assert persister.persist(4, 1, 2, make_shards(4)).step == 4
