"""The Persister's queue: background writes, superseding, synchronous persist, callbacks, close."""

from __future__ import annotations

import os
import threading
import time

import pytest
from persist_helpers import make_shards

from resilient.errors import ConfigError, PersistError
from resilient.persist import Persister, latest_complete


class Gate:
    """An on_event hook that holds the writer thread at the start of chosen steps until released."""

    def __init__(self, hold_steps):
        self.hold_steps = set(hold_steps)
        self.entered = threading.Event()
        self.release = threading.Event()
        self.events = []

    def __call__(self, event):
        self.events.append(event)
        if event["kind"] == "persist.begin" and event["step"] in self.hold_steps:
            self.entered.set()
            assert self.release.wait(60), "test never released the gate"

    def kinds(self, kind):
        return [e["step"] for e in self.events if e["kind"] == kind]


def _release_when(condition, event, timeout=60.0):
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.005)
    event.set()


def test_submit_returns_a_future_of_the_manifest(ckpt_dir):
    with Persister(ckpt_dir, job="j") as persister:
        manifest = persister.submit(3, 2, 2, make_shards(3)).result(timeout=60)
    assert (manifest.step, manifest.generation, manifest.world_size) == (3, 2, 2)
    assert latest_complete(ckpt_dir) == manifest


def test_a_full_queue_supersedes_the_oldest_pending_step_instead_of_blocking(ckpt_dir):
    gate = Gate(hold_steps={1})
    persister = Persister(ckpt_dir, job="j", keep=5, on_event=gate, queue_size=1)
    try:
        first = persister.submit(1, 1, 2, make_shards(1))
        assert gate.entered.wait(60)
        second = persister.submit(2, 1, 2, make_shards(2))
        third = persister.submit(3, 1, 2, make_shards(3))  # queue full: step 2 is superseded, nobody waits
        assert second.cancelled()
        gate.release.set()
        assert first.result(timeout=60).step == 1 and third.result(timeout=60).step == 3
    finally:
        gate.release.set()
        persister.close()
    assert gate.kinds("persist.superseded") == [2]
    assert gate.kinds("persist.commit") == [1, 3]
    assert sorted(os.listdir(ckpt_dir)) == ["step-00000001", "step-00000003"]


def test_synchronous_persist_supersedes_older_pending_steps_and_waits_for_the_write_in_progress(ckpt_dir):
    gate = Gate(hold_steps={1})
    persister = Persister(ckpt_dir, job="j", keep=5, on_event=gate, queue_size=2)
    try:
        first = persister.submit(1, 1, 2, make_shards(1))
        assert gate.entered.wait(60)
        pending = persister.submit(2, 1, 2, make_shards(2))
        releaser = threading.Thread(target=_release_when, args=(pending.cancelled, gate.release))
        releaser.start()
        manifest = persister.persist(5, 1, 2, make_shards(5))
        releaser.join()
        assert manifest.step == 5 and pending.cancelled() and first.result(timeout=60).step == 1
    finally:
        gate.release.set()
        persister.close()
    assert gate.kinds("persist.commit") == [1, 5]
    assert latest_complete(ckpt_dir).step == 5


def test_on_committed_sees_each_manifest_before_retention_deletes_the_older_ones(ckpt_dir):
    seen = []

    def on_committed(manifest):
        seen.append((manifest.step, sorted(os.listdir(ckpt_dir))))

    with Persister(ckpt_dir, job="j", keep=1, on_committed=on_committed) as persister:
        persister.persist(1, 1, 2, make_shards(1))
        persister.persist(2, 1, 2, make_shards(2))
    assert seen == [(1, ["step-00000001"]), (2, ["step-00000001", "step-00000002"])]
    assert os.listdir(ckpt_dir) == ["step-00000002"]


def test_a_failing_on_committed_is_reported_but_the_checkpoint_stays_complete(ckpt_dir, events_seen):
    def on_committed(manifest):
        raise RuntimeError("etcd unreachable")

    with Persister(ckpt_dir, job="j", on_committed=on_committed, on_event=events_seen.append) as persister:
        with pytest.raises(PersistError, match="pointer to it was not updated"):
            persister.persist(1, 1, 2, make_shards(1))
    assert latest_complete(ckpt_dir).step == 1
    assert [e["kind"] for e in events_seen if e["kind"].startswith("persist.on_committed")] == [
        "persist.on_committed_failed"]


def test_a_failure_does_not_stop_the_background_thread(ckpt_dir):
    with Persister(ckpt_dir, job="j", failpoints="persist.manifest.after_fsync=1*raise") as persister:
        with pytest.raises(PersistError):
            persister.submit(1, 1, 2, make_shards(1)).result(timeout=60)
        assert persister.submit(2, 1, 2, make_shards(2)).result(timeout=60).step == 2
    assert os.listdir(ckpt_dir) == ["step-00000002"]


def test_close_without_wait_cancels_pending_and_refuses_new_work(ckpt_dir):
    gate = Gate(hold_steps={1})
    persister = Persister(ckpt_dir, job="j", on_event=gate)
    first = persister.submit(1, 1, 2, make_shards(1))
    assert gate.entered.wait(60)
    pending = persister.submit(2, 1, 2, make_shards(2))
    closer = threading.Thread(target=persister.close, kwargs={"wait": False})
    closer.start()
    gate.release.set()
    closer.join(60)
    assert not closer.is_alive()
    assert pending.cancelled() and first.result(timeout=60).step == 1
    with pytest.raises(PersistError, match="closed"):
        persister.submit(3, 1, 2, make_shards(3))
    persister.close()


def test_close_with_wait_finishes_pending_work(ckpt_dir):
    persister = Persister(ckpt_dir, job="j", queue_size=3, keep=5)
    futures = [persister.submit(s, 1, 2, make_shards(s)) for s in (1, 2, 3)]
    persister.close(wait=True)
    assert [f.result(timeout=0).step for f in futures] == [1, 2, 3]
    assert latest_complete(ckpt_dir).step == 3


@pytest.mark.parametrize("kwargs", [{"keep": 0}, {"queue_size": 0}, {"max_workers": 0}, {"job": ""},
                                    {"background_nice": 25}])
def test_invalid_settings_are_refused_at_construction(ckpt_dir, kwargs):
    args = {"job": "j", **kwargs}
    with pytest.raises(ConfigError):
        Persister(ckpt_dir, **args)
