"""resilient-run refuses bad command lines before anything starts, with a clear message and exit 2."""

from __future__ import annotations

import pathlib
import socket
import subprocess
import sys

import pytest

from resilient.agent import cli_args
from resilient.errors import ConfigError
from resilient.run import main

ROOT = pathlib.Path(__file__).resolve().parents[2]
SCRIPT = str(pathlib.Path(__file__).parent / "scripts" / "plain_ddp.py")


def test_unknown_flag_exits_2_with_usage():
    out = subprocess.run([sys.executable, "-m", "resilient.run", "--no-such-flag", SCRIPT], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert "unrecognized arguments: --no-such-flag" in out.stderr


def test_missing_script_is_refused(capsys, tmp_path):
    assert main(["--standalone", str(tmp_path / "nope.py")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_min_above_max_is_refused(capsys):
    assert main(["--nnodes", "3:2", "--rdzv-endpoint", "127.0.0.1:2379", SCRIPT]) == 2
    assert "MIN must not exceed MAX" in capsys.readouterr().err


def test_no_endpoint_without_standalone_is_refused(capsys):
    assert main(["--nnodes", "2", SCRIPT]) == 2
    assert "--rdzv-endpoint" in capsys.readouterr().err


def test_unreachable_etcd_exits_2_before_starting(capsys):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert main(["--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "x", "--rdzv-conf", "join_timeout=5", SCRIPT]) == 2
    err = capsys.readouterr().err
    assert "cannot reach etcd" in err and str(port) in err


def test_inconsistent_timeouts_are_refused():
    with pytest.raises(ConfigError, match="--hang-timeout 0.05s must exceed --monitor-interval"):
        cli_args.parse(["--standalone", "--hang-timeout", "0.05", SCRIPT])


def test_the_leave_timeout_defaults_to_a_minute_turns_off_with_0_and_must_exceed_the_monitor_interval():
    assert cli_args.parse(["--standalone", SCRIPT]).leave_timeout == 60.0
    assert cli_args.parse(["--standalone", "--leave-timeout", "5", SCRIPT]).leave_timeout == 5.0
    assert cli_args.parse(["--standalone", "--leave-timeout", "0", SCRIPT]).leave_timeout is None
    for bad in ("0.05", "-3"):
        with pytest.raises(ConfigError, match="--leave-timeout"):
            cli_args.parse(["--standalone", "--leave-timeout", bad, SCRIPT])


def test_torchrun_flags_parse_with_both_spellings():
    s = cli_args.parse(["--nnodes", "1:4", "--nproc_per_node", "3", "--rdzv-endpoint", "h1:2379,h2:2379",
                        "--rdzv-id", "job7", "--max-restarts", "5", "--monitor-interval", "0.2",
                        "--node-rank", "0", "--rdzv-backend", "c10d", SCRIPT, "--lr", "0.1"])
    assert (s.nodes.min_nodes, s.nodes.max_nodes, s.nproc_per_node) == (1, 4, 3)
    assert s.etcd.endpoints == ("h1:2379", "h2:2379")
    assert (s.job_id, s.max_restarts, s.timeouts.monitor_interval) == ("job7", 5, 0.2)
    assert s.script_args == ("--lr", "0.1")


def test_standby_and_zygote_are_on_unless_turned_off():
    on = cli_args.parse(["--standalone", SCRIPT])
    assert on.standby and on.zygote
    off = cli_args.parse(["--standalone", "--no-standby", "--no-zygote", SCRIPT])
    assert not off.standby and not off.zygote


def test_help_explains_the_flags():
    text = cli_args.build_parser().format_help()
    for flag in ("--nnodes", "--nproc-per-node", "--rdzv-endpoint", "--standalone", "--lease-ttl", "--hang-timeout",
                 "--leave-timeout", "--replicas", "--snapshot-every", "--persist-dir", "--metrics-port", "--event-log", "--no-standby"):
        assert flag in text
