"""Two nodes as two ``resilient-run`` agents against one etcd on loopback: a node joins a running job
(scale-up), then a node is lost with its workers (SIGKILL of the agent); the job goes on and completes.
And a node that freezes (every process SIGSTOPped, its connections left open): the survivor, blocked in a
collective on the frozen worker, is released when its agent announces the generation without that node."""

from __future__ import annotations

import os
import signal
import time
import uuid

import psutil

from tests.agent.conftest import SCRIPTS, step_done

ELASTIC = str(SCRIPTS / "elastic_train.py")


def _a_then_b(launch, etcd_server, tmp_path, *, job: str, steps: int, sleep: float):
    """Node a trains alone, then node b joins (1:2 nodes, one worker each); returns both once each trains in
    the world of 2."""
    common = ["--nnodes", "1:2", "--nproc-per-node", "1", "--rdzv-endpoint", etcd_server.endpoints[0],
              "--rdzv-id", f"{job}-{uuid.uuid4().hex[:8]}", "--lease-ttl", "2", "--last-call", "0.5"]
    args = [ELASTIC, "--steps", str(steps), "--sleep", str(sleep), "--out", str(tmp_path)]
    a = launch([*common, "--node-id", "node-a", *args], name="a")
    a.wait_event(step_done(at_least=3, world_size=1), 120, "node a training alone")
    b = launch([*common, "--node-id", "node-b", *args], name="b")
    a.wait_event(step_done(at_least=0, world_size=2), 120, "world size 2 on node a")
    b.wait_event(step_done(at_least=0, world_size=2), 60, "world size 2 on node b")
    return a, b


def test_scale_up_then_node_loss(launch, etcd_server, tmp_path):
    a, b = _a_then_b(launch, etcd_server, tmp_path, job="two", steps=120, sleep=0.1)
    grown = [e for e in a.events("gen.formed") if "in_process" in e and e["world_size"] == 2]
    assert grown and grown[0]["in_process"] == [0], "node a's worker joins the bigger world in-process"
    first_b = min(e["step"] for e in b.events("step.done"))
    assert first_b > 0, "the joining node restores the committed step instead of starting over"

    b.wait_event(step_done(at_least=first_b + 3), 60, "node b training")
    os.killpg(b.proc.pid, signal.SIGKILL)  # the agent; its workers die with it (PDEATHSIG)
    b.proc.wait(10)
    shrunk = a.wait_event(lambda e: e["kind"] == "gen.formed" and "in_process" in e and e["world_size"] == 1
                          and e["gen"] > grown[0]["gen"], 60, "a generation without node b")
    assert shrunk["in_process"] == [0]
    assert a.wait(240) == 0, a.output()
    world, _gen, step, _digest, _restored = (tmp_path / "done-0").read_text().split()
    assert (world, step) == ("1", "119")
    assert len([e for e in a.events("worker.start")]) == 1, "node a never restarted its worker"


def _tree(pid: int) -> list[psutil.Process]:
    root = psutil.Process(pid)
    return [root, *root.children(recursive=True)]


def test_a_frozen_node_releases_the_survivor_blocked_in_a_collective(launch, etcd_server, tmp_path):
    # Node b freezes: its agent stops renewing its lease and its worker stops answering, but the worker's
    # gloo connections stay open, so node a's worker waits in its all_reduce with nothing failing it. Hang
    # detection is off and the group timeout is 300 s: only the announcement of the next generation can
    # release it (collectives.abort), in-process, without a restart.
    a, b = _a_then_b(launch, etcd_server, tmp_path, job="freeze", steps=150, sleep=0.05)
    first_b = min(e["step"] for e in b.events("step.done"))
    b.wait_event(step_done(at_least=first_b + 2, world_size=2), 60, "node b training in the world of 2")
    frozen = _tree(b.proc.pid)
    try:
        for p in frozen:
            p.send_signal(signal.SIGSTOP)
        t_freeze = time.monotonic()
        shrunk = a.wait_event(lambda e: e["kind"] == "gen.formed" and "in_process" in e and e["world_size"] == 1
                              and e["mono"] > t_freeze, 60, "a generation without the frozen node")
        assert shrunk["in_process"] == [0], "node a's worker was alive and registered: it is kept"
        resumed = a.wait_event(lambda e: step_done(world_size=1)(e) and e["mono"] > shrunk["mono"], 60,
                               "node a training alone again (its worker released from the blocked collective)")
        assert resumed["mono"] - t_freeze < 60, "released long before the 300 s group timeout"
        aborted = [e for e in a.events("collectives.abort") if e["mono"] > t_freeze]
        assert aborted and aborted[0]["target"] > aborted[0]["aborted_gen"] and aborted[0]["connections"] >= 1
        recovered = [e for e in a.events("recover.begin") if e["mono"] > t_freeze]
        assert recovered, "node a's worker recovered in-process"
    finally:
        for p in frozen:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
    assert a.wait(240) == 0, a.output()
    world, _gen, step, _digest, _restored = (tmp_path / "done-0").read_text().split()
    assert (world, step) == ("1", "149")
    assert len(a.events("worker.start")) == 1, "node a never restarted its worker"
