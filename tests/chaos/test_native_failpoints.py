"""Failpoints of the native module (and of its pure-Python twin, which marks the same names): armed by
``$RESILIENT_FAILPOINTS``, a firing leaves a ``failpoint.fired`` event in the process's event log before
its action; ``panic`` exits 137 at that point (a transfer stops at exactly half its bytes), ``K>`` lets
hits pass, ``N*`` counts for every process sharing ``$RESILIENT_FAILPOINTS_STATE``; the chaos preflight
knows every name the engine in use marks."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from resilient import events
from resilient.chaos import preflight
from resilient.store import _loader, _pynative

REPO = Path(__file__).resolve().parents[2]
ENGINES = [pytest.param("twin", id="twin")] + (
    [pytest.param("native", id="native")] if _loader.is_native() else []
)

PRELUDE = """
import os, socket, sys, torch
from resilient.store import _loader
be = _loader.backend() if sys.argv[1] == "native" else _loader.twin()
assert be.__name__.endswith("_native" if sys.argv[1] == "native" else "_pynative"), be.__name__
"""

COPY = PRELUDE + """
src = torch.arange(4096, dtype=torch.float64); dst = torch.zeros_like(src)
for i in range(int(sys.argv[2])):
    print(f"copy {i}", flush=True)
    be.copy_checksum_batch([dst.data_ptr()], [src.data_ptr()], [src.numel() * 8], 4096)
print("done", flush=True)
"""

SEND = PRELUDE + """
fd = int(sys.argv[2])
buf = torch.arange(1 << 17, dtype=torch.uint8)  # 128 KiB, below the socket buffer on loopback
print("sent", be.send_addr(fd, buf.data_ptr(), buf.numel(), 10.0), flush=True)
"""

RECV = PRELUDE + """
fd = int(sys.argv[2])
buf = torch.zeros(1 << 17, dtype=torch.uint8)
got, _ = be.recv_checksum(fd, buf.data_ptr(), buf.numel(), [(0, buf.numel())], 4096, 10.0)
print("received", got, flush=True)
"""


def run(script: str, engine: str, *args: str, spec: str, tmp_path: Path, state: Path | None = None,
        pass_fds=()) -> subprocess.CompletedProcess:
    env = dict(os.environ, RESILIENT_FAILPOINTS=spec, RESILIENT_EVENT_LOG=str(tmp_path / "events.jsonl"),
               OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    env.pop("RESILIENT_FAILPOINTS_STATE", None)
    if state is not None:
        env["RESILIENT_FAILPOINTS_STATE"] = str(state)
    if engine == "twin":
        env["RESILIENT_NO_NATIVE"] = "1"
    return subprocess.run([sys.executable, "-c", textwrap.dedent(script), engine, *args], env=env, cwd=str(REPO),
                          capture_output=True, text=True, timeout=120, pass_fds=pass_fds)


def fired(tmp_path: Path) -> list[dict]:
    return [e for e in events.read(str(tmp_path / "events.jsonl")) if e["kind"] == "failpoint.fired"]


@pytest.mark.parametrize("engine", ENGINES)
def test_panic_between_copy_and_seal_exits_137_after_the_event(engine, tmp_path):
    res = run(COPY, engine, "3", spec="native.copy.after_data=panic", tmp_path=tmp_path)
    assert res.returncode == 137, res.stderr
    assert res.stdout.splitlines() == ["copy 0"]
    (ev,) = fired(tmp_path)
    assert (ev["name"], ev["action"], ev["native"]) == ("native.copy.after_data", "panic", True)


@pytest.mark.parametrize("engine", ENGINES)
def test_skip_then_once_shared_by_the_processes_of_a_state_dir(engine, tmp_path):
    state = tmp_path / "state" / "host"  # parents created on the first claim
    first = run(COPY, engine, "5", spec="native.copy.after_data=2>1*panic", tmp_path=tmp_path, state=state)
    assert first.returncode == 137, first.stderr
    assert first.stdout.splitlines() == ["copy 0", "copy 1", "copy 2"], "the first two hits pass, the third fires"
    again = run(COPY, engine, "5", spec="native.copy.after_data=2>1*panic", tmp_path=tmp_path, state=state)
    assert again.returncode == 0 and again.stdout.splitlines()[-1] == "done", "the one firing was claimed already"
    assert len(fired(tmp_path)) == 1
    assert sorted(p.name for p in state.iterdir()) == ["native.copy.after_data.0"]


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("action, error", [("raise", "FailpointError"), ("enospc", "No space left on device")])
def test_raise_and_enospc_surface_as_python_errors(engine, action, error, tmp_path):
    res = run(COPY, engine, "1", spec=f"native.copy.after_data={action}", tmp_path=tmp_path)
    assert res.returncode == 1 and error in res.stderr, res.stderr


@pytest.mark.parametrize("engine", ENGINES)
def test_sender_panics_at_exactly_half_of_the_stream(engine, tmp_path):
    ours, theirs = __import__("socket").socketpair()
    with ours:
        try:
            proc_res = run(SEND, engine, str(theirs.fileno()), spec="native.send.mid_stream=panic",
                           tmp_path=tmp_path, pass_fds=(theirs.fileno(),))
        finally:
            theirs.close()
        got = bytearray()
        while chunk := ours.recv(1 << 16):
            got += chunk
    assert proc_res.returncode == 137, proc_res.stderr
    assert len(got) == (1 << 17) // 2
    assert [e["name"] for e in fired(tmp_path)] == ["native.send.mid_stream"]


@pytest.mark.parametrize("engine", ENGINES)
def test_receiver_panics_with_every_byte_in_before_its_ack(engine, tmp_path):
    ours, theirs = __import__("socket").socketpair()
    with ours:
        ours.sendall(bytes(range(256)) * 512)
        try:
            res = run(RECV, engine, str(theirs.fileno()), spec="native.recv.before_ack=panic",
                      tmp_path=tmp_path, pass_fds=(theirs.fileno(),))
        finally:
            theirs.close()
    assert res.returncode == 137 and "received" not in res.stdout, res.stderr
    assert [e["name"] for e in fired(tmp_path)] == ["native.recv.before_ack"]


@pytest.mark.parametrize("engine", ENGINES)
def test_sleep_continues_and_unarmed_names_do_nothing(engine, tmp_path):
    res = run(COPY, engine, "2", spec="native.copy.after_data=1*sleep(10),persist.shard.after_write=panic",
              tmp_path=tmp_path)
    assert res.returncode == 0 and res.stdout.splitlines()[-1] == "done", res.stderr
    assert [(e["name"], e["action"]) for e in fired(tmp_path)] == [("native.copy.after_data", "1*sleep(10)")]


def test_names_agree_between_native_source_twin_and_preflight():
    marked = set()
    for path in (REPO / "native" / "src").glob("*.cpp"):
        if path.name != "failpoint.cpp":
            marked |= set(re.findall(r'"(native\.[a-z_]+\.[a-z_]+)"', path.read_text()))
    assert marked == set(_pynative.FAILPOINT_NAMES)
    assert set(preflight.native_failpoints()) == marked
    for name in marked | {"repl.manifest.after_write", "repl.send.after_offer", "repl.send.after_transfer",
                          "repl.commit.before_txn", "repl.commit.after_txn"}:
        assert preflight.failpoint_defined(name), name
    assert not preflight.failpoint_defined("native.copy.nowhere")
