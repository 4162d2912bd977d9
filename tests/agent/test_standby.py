"""The zygote's standby worker and the workers' retained heap, with a real zygote and real processes.

Page faults are counted (``ru_minflt``), not timed: a worker whose heap is already faulted in allocates
and fills its tensors with almost no faults; one forked the plain way faults in every page."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import textwrap

import pytest

from tests.agent.conftest import ROOT, SCRIPTS

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc and /proc")


def drive(tmp_path: pathlib.Path, mode: str) -> tuple[dict, dict | None]:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, str(SCRIPTS / "zygote_driver.py"), str(tmp_path), mode], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    driver = json.loads((tmp_path / "driver.json").read_text())
    probe = tmp_path / "probe.json"
    return driver, (json.loads(probe.read_text()) if probe.exists() else None)


def test_activated_standby_becomes_the_worker_with_its_heap_already_faulted_in(tmp_path):
    driver, probe = drive(tmp_path, "standby")
    assert driver["warm_anon"] >= 600 << 20
    assert probe["pid"] == driver["pid"] == driver["standby_pid"]
    assert probe["ppid"] == driver["driver_pid"], "re-parented to the driver (a subreaper), not the zygote"
    assert driver["exitcode"] == 7, "the driver reaps the worker's own exit code"
    assert probe["tag"] == "from-env" and probe["cwd"] == str(tmp_path)
    assert (tmp_path / "probe.out").read_text().strip() == "probe ran"
    # 256 MB allocated and filled from pages the standby faulted in while it waited
    assert probe["faults"] < probe["pages"] // 10, probe


def test_a_plain_fork_faults_every_page_in(tmp_path):
    """The control for the test above: the same probe, forked on demand, pays a fault per page."""
    driver, probe = drive(tmp_path, "fork")
    assert driver["exitcode"] == 7
    assert probe["faults"] >= probe["pages"] * 9 // 10, probe


def test_activating_a_standby_ends_its_warm_up_where_it_is(tmp_path):
    """A standby told to warm to gigabytes and activated while it does starts the worker at once, not after
    the whole warm-up: the worker starts holding far less than the warm-up's target."""
    driver, probe = drive(tmp_path, "interrupt")
    if driver["warm_target"] < 2 << 30:
        pytest.skip(f"this host's memory caps a standby's warm-up at {driver['warm_target'] >> 20} MB")
    assert driver["exitcode"] == 7 and probe["pid"] == driver["standby_pid"]
    assert probe["anon_at_start"] < driver["warm_target"] // 2, (probe, driver)


def test_an_unused_standby_exits_when_closed(tmp_path):
    driver, probe = drive(tmp_path, "close")
    assert driver["gone"] and probe is None


def test_a_standby_warms_to_the_workers_size_but_never_into_the_last_fifth_of_memory():
    from resilient.agent.zygote import warm_budget

    gb = 1 << 30
    assert warm_budget(3 * gb, have=1 * gb, available=20 * gb, total=24 * gb) == 2 * gb
    assert warm_budget(3 * gb, have=4 * gb, available=20 * gb, total=24 * gb) == 0  # already that big
    # 24 GB host: a fifth (4.8 GB) stays available, so with 6 GB available only 1.2 GB may be faulted in
    assert warm_budget(10 * gb, have=0, available=6 * gb, total=24 * gb) == 6 * gb - int(24 * gb * 0.2)
    assert warm_budget(10 * gb, have=0, available=4 * gb, total=24 * gb) == 0
    assert warm_budget(2 * gb, have=0, available=None, total=None) == 2 * gb  # /proc/meminfo unreadable


RETAIN = textwrap.dedent("""
    import json, resource
    from resilient.agent import bootstrap
    from resilient.agent.zygote import anon_bytes_of
    import os
    retained = bootstrap.retain_heap()
    import torch
    old = torch.empty(256 << 20, dtype=torch.uint8).fill_(1)  # the state of the generation that failed
    del old  # freed, as an in-process recovery frees the old model
    kept = anon_bytes_of(os.getpid())
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    new = [torch.empty(64 << 20, dtype=torch.uint8).fill_(1) for _ in range(3)]  # the rebuilt state
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    print(json.dumps({"retained": retained, "kept": kept, "faults": faults}))
""")


@pytest.mark.parametrize("setting", ["1", "0"])
def test_freed_memory_is_kept_and_reused_without_page_faults_unless_turned_off(setting):
    env = dict(os.environ, PYTHONPATH=str(ROOT), RESILIENT_RETAIN_HEAP=setting, OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", RETAIN], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    pages = 192 * (1 << 20) // os.sysconf("SC_PAGE_SIZE")
    if setting == "1":
        assert got["retained"] and got["kept"] >= 256 << 20, got  # still resident after the free
        assert got["faults"] < pages // 10, got
    else:
        assert not got["retained"] and got["kept"] < 256 << 20, got  # given back at the free
        assert got["faults"] >= pages * 9 // 10, got
