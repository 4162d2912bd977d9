"""Space is reserved at creation (StoreSpaceError on a small tmpfs); stale segments are reclaimed."""

from __future__ import annotations

import os
import subprocess
import tempfile

import pytest

from store_children import spawn_child
from resilient.errors import StoreSpaceError
from resilient.store import Segment, list_segments, reclaim_stale


@pytest.fixture
def tiny_tmpfs():
    path = tempfile.mkdtemp(prefix="resilient-tinyfs-")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", path], capture_output=True, text=True)
    if r.returncode != 0:
        os.rmdir(path)
        pytest.skip(f"cannot mount a small tmpfs here: {r.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", path], check=True)
        os.rmdir(path)


def test_too_small_shm_fails_at_creation_naming_sizes(tiny_tmpfs):
    with pytest.raises(StoreSpaceError, match=r"Cannot reserve \d+ bytes .* only \d+ bytes are available") as exc:
        Segment.create("big", 8 << 20, job="j", rank=0, shm_dir=tiny_tmpfs)
    assert tiny_tmpfs in str(exc.value)
    assert os.listdir(tiny_tmpfs) == []  # nothing half-made left behind


def test_fallocate_reserves_all_pages(tiny_tmpfs):
    """A segment that fits is fully backed at creation: filling the rest of the fs fails, not the segment."""
    seg = Segment.create("fits", 256 << 10, job="j", rank=0, shm_dir=tiny_tmpfs, index_capacity=4096)
    try:
        used = os.statvfs(tiny_tmpfs)
        assert (used.f_blocks - used.f_bfree) * used.f_frsize >= 2 * (256 << 10)
        with pytest.raises(StoreSpaceError):
            Segment.create("second", 512 << 10, job="j", rank=1, shm_dir=tiny_tmpfs, index_capacity=4096)
    finally:
        seg.close()
        seg.unlink()


def test_reclaim_removes_only_dead_owners(shm_dir):
    child = spawn_child("create-and-exit", "orphan", shm_dir, stdout=subprocess.PIPE)
    out, _ = child.communicate(timeout=60)
    assert child.returncode == 0 and "created" in out
    mine = Segment.create("alive", 1 << 16, job="dead-job", rank=0, shm_dir=shm_dir)
    try:
        before = {i.name: i.owner_alive for i in list_segments(shm_dir=shm_dir)}
        assert before == {"alive": True, "orphan": False}
        assert reclaim_stale("other-job", shm_dir=shm_dir) == []
        assert reclaim_stale("dead-job", shm_dir=shm_dir) == ["orphan"]
        assert [i.name for i in list_segments(shm_dir=shm_dir)] == ["alive"]
    finally:
        mine.close()
        mine.unlink()


def test_listing_skips_foreign_files(shm_dir):
    with open(os.path.join(shm_dir, "resilient-not-a-segment"), "wb") as f:
        f.write(b"hello")
    assert list_segments(shm_dir=shm_dir) == []
    assert reclaim_stale(shm_dir=shm_dir) == []
