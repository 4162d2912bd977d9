"""resilient-run refuses bad command lines before anything starts, with a clear message and exit 2."""

from __future__ import annotations

import dataclasses
import logging
import os
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
    assert "raise the connect timeout" not in err, "no advice about a timeout resilient-run has no flag for"


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


# --- torchrun flags: each is supported, accepted with a warning, or refused with what to do instead ----------
def _torchrun_option_strings() -> list[str]:
    from torch.distributed.run import get_args_parser

    return [o for a in get_args_parser()._actions for o in a.option_strings if o not in ("-h", "--help")]


def test_every_torchrun_flag_is_known_to_resilient_run():
    # none may fall through to argparse's bare "unrecognized arguments"
    known = {o for a in cli_args.build_parser()._actions for o in a.option_strings}
    missing = [o for o in _torchrun_option_strings() if o not in known]
    assert not missing, f"torchrun flags resilient-run does not know: {missing}"


@pytest.mark.parametrize("flags", sorted(cli_args.UNSUPPORTED_TORCHRUN_FLAGS))
def test_an_unsupported_torchrun_flag_is_refused_naming_it_and_what_to_do(flags):
    takes_value, advice = cli_args.UNSUPPORTED_TORCHRUN_FLAGS[flags]
    for spelling in flags:
        argv = ["--standalone", spelling, *(["x"] if takes_value else []), SCRIPT]
        with pytest.raises(ConfigError) as err:
            cli_args.parse(argv)
        assert str(err.value) == f"{flags[0]} is a torchrun flag that resilient-run does not support: {advice}."


def test_an_unsupported_torchrun_flag_exits_2_with_the_message(capsys):
    assert main(["--standalone", "--run_path", SCRIPT]) == 2
    err = capsys.readouterr().err
    assert "--run-path is a torchrun flag that resilient-run does not support" in err
    assert "unrecognized" not in err and "Traceback" not in err


def test_the_torchrun_defaults_spelled_out_are_accepted_and_logged(caplog, monkeypatch):
    monkeypatch.setattr(logging.getLogger("resilient"), "propagate", True)  # main() turns it off
    caplog.set_level(logging.INFO, logger="resilient")
    for backend in ("c10d", "etcd", "etcd-v2"):
        caplog.clear()
        cli_args.parse(["--standalone", "--rdzv-backend", backend, SCRIPT])
        assert f"--rdzv-backend {backend}: resilient-run always uses its own etcd v3 rendezvous" in caplog.text
    caplog.clear()
    cli_args.parse(["--standalone", SCRIPT])
    assert "--rdzv-backend" not in caplog.text


@pytest.mark.parametrize("backend,why", [("bogus", "not a rendezvous backend"), ("static", "static rendezvous")])
def test_an_rdzv_backend_other_than_torchruns_dynamic_ones_is_refused(backend, why):
    with pytest.raises(ConfigError, match=f"--rdzv-backend '{backend}': .*{why}.*drop --rdzv-backend"):
        cli_args.parse(["--standalone", "--rdzv-backend", backend, SCRIPT])


def test_torchrun_flags_resilient_ignores_are_named_in_one_warning(caplog, monkeypatch):
    monkeypatch.setattr(logging.getLogger("resilient"), "propagate", True)
    caplog.set_level(logging.INFO, logger="resilient")
    cli_args.parse(["--standalone", "--node-rank", "1", "--master-addr", "h0", "--master_port", "29500",
                    "--start-method", "fork", "--rdzv-conf", "read_timeout=5,join_timeout=30,is_host=1", SCRIPT])
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    for named in ("--node-rank 1", "--master-addr h0", "--master-port 29500", "static rendezvous",
                  "--start-method fork", "zygote", "--rdzv-conf read_timeout, is_host"):
        assert named in warnings[0]
    assert "join_timeout (" not in warnings[0], "a key resilient reads is not reported as ignored"
    caplog.clear()
    cli_args.parse(["--standalone", "--rdzv-conf", "join_timeout=30,last_call_timeout=2", SCRIPT])
    assert not [r for r in caplog.records if r.levelno == logging.WARNING]


def test_standalone_with_an_endpoint_is_refused():
    with pytest.raises(ConfigError, match="--standalone starts its own etcd; drop --rdzv-endpoint, or drop "
                                          "--standalone to use the etcd at 10.0.0.1:2379"):
        cli_args.parse(["--standalone", "--nnodes", "1:2", "--rdzv-endpoint", "10.0.0.1:2379", SCRIPT])


def test_standalone_with_several_nodes_says_to_drop_standalone_for_a_multi_node_job():
    with pytest.raises(ConfigError, match="drop --nnodes, or drop --standalone and pass --rdzv-endpoint"):
        cli_args.parse(["--standalone", "--nnodes", "1:2", SCRIPT])


def test_role_is_kept_for_the_workers():
    assert cli_args.parse(["--standalone", SCRIPT]).role == "default"
    assert cli_args.parse(["--standalone", "--role", "trainer", SCRIPT]).role == "trainer"


def test_workers_get_the_role_as_role_name(tmp_path):
    out = subprocess.run([sys.executable, "-m", "resilient.run", "--standalone", "--role", "trainer", "--no-python",
                          "sh", "-c", "echo ROLE=$ROLE_NAME"], cwd=tmp_path, capture_output=True, text=True,
                         timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr[-3000:]
    assert "ROLE=trainer" in out.stdout


# --- timeouts: messages name resilient-run's flags, not the Timeouts fields ---------------------------------
@pytest.mark.parametrize("argv,message", [
    (["--monitor-interval", "0"], "--monitor-interval 0 must be > 0 and <= --lease-ttl/3 (1.667 s with --lease-ttl 5)"),
    (["--monitor-interval", "3", "--lease-ttl", "6"], "--monitor-interval 3 must be > 0 and <= --lease-ttl/3 (2 s"),
    (["--join-timeout", "0"], "--last-call 1 s must be shorter than --join-timeout 0 s"),
    (["--last-call", "5", "--join-timeout", "5"], "--last-call 5 s must be shorter than --join-timeout 5 s"),
    (["--rdzv-conf", "last_call_timeout=700"],
     "--rdzv-conf last_call_timeout=700 must be shorter than --join-timeout 600 s"),
    (["--rdzv-conf", "join_timeout=0.5"], "--last-call 1 s must be shorter than --rdzv-conf join_timeout=0.5"),
    (["--last-call", "-1"], "--last-call -1 s must be >= 0"),
    (["--lease-ttl", "1"], "--lease-ttl 1 must be a whole number of seconds >= 2"),
    (["--term-grace", "0"], "--term-grace 0 s must be > 0"),
    (["--restart-window", "0"], "--restart-window 0 s must be > 0"),
    (["--restart-window", "-1"], "--restart-window -1 s must be > 0"),
])
def test_timeout_flags_are_checked_with_messages_naming_them(argv, message):
    with pytest.raises(ConfigError) as err:
        cli_args.parse(["--standalone", *argv, SCRIPT])
    assert message in str(err.value)
    assert "_interval=" not in str(err.value) and "join_timeout=0s" not in str(err.value)


def test_a_number_of_seconds_must_be_finite():
    with pytest.raises(SystemExit):
        cli_args.parse(["--standalone", "--monitor-interval", "nan", SCRIPT])


def test_the_settings_refuse_a_restart_window_that_is_not_positive():
    s = cli_args.parse(["--standalone", SCRIPT])
    with pytest.raises(ConfigError, match=r"--restart-window 0 s must be > 0 \(restarts are counted over that many"):
        dataclasses.replace(s, restart_window=0.0)


# --- the script --------------------------------------------------------------------------------------------
def test_a_directory_given_as_the_script_is_called_a_directory(tmp_path):
    with pytest.raises(ConfigError, match="is a directory; give the Python file to run"):
        cli_args.parse(["--standalone", str(tmp_path)])


def test_no_python_needs_an_executable(tmp_path):
    with pytest.raises(ConfigError, match="executable 'no_such_binary_xyz' is not on PATH"):
        cli_args.parse(["--standalone", "--no-python", "no_such_binary_xyz"])
    with pytest.raises(ConfigError, match="does not exist"):
        cli_args.parse(["--standalone", "--no-python", str(tmp_path / "nope")])
    plain = tmp_path / "tool.sh"
    plain.write_text("#!/bin/sh\n")
    plain.chmod(0o644)
    with pytest.raises(ConfigError, match=r"is not executable; make it so \(chmod \+x"):
        cli_args.parse(["--standalone", "--no-python", str(plain)])
    plain.chmod(0o755)
    assert cli_args.parse(["--standalone", "--no-python", str(plain)]).script == str(plain)
    assert cli_args.parse(["--standalone", "--no-python", "true"]).no_python


# --- paths and ports: refused before anything starts (no etcd is started) -----------------------------------
@pytest.fixture
def no_etcd(monkeypatch):
    """Fail the test if the launcher gets as far as starting the embedded etcd."""
    from resilient.etcd import server

    def refuse(*_a, **_k):
        raise AssertionError("the embedded etcd was started before the bad option was refused")

    monkeypatch.setattr(server, "EmbeddedEtcd", refuse)


@pytest.mark.parametrize("flag", ["--log-dir", "--persist-dir"])
def test_a_directory_flag_given_a_file_exits_2(flag, tmp_path, capsys, no_etcd):
    f = tmp_path / "a-file"
    f.write_text("")
    assert main(["--standalone", flag, str(f), SCRIPT]) == 2
    assert f"{flag} '{f}' is a file, not a directory" in capsys.readouterr().err


def test_a_persist_dir_that_cannot_be_created_exits_2(capsys, no_etcd):
    assert main(["--standalone", "--persist-dir", "/proc/nope", SCRIPT]) == 2
    assert "--persist-dir '/proc/nope' cannot be created" in capsys.readouterr().err


def test_missing_local_directories_are_created_and_urls_left_to_the_persister(tmp_path, monkeypatch):
    from resilient.agent.settings import prepare_local_paths

    s = cli_args.parse(["--standalone", "--log-dir", str(tmp_path / "logs" / "a"), "--persist-dir",
                        str(tmp_path / "ckpt"), SCRIPT])
    prepare_local_paths(s)
    assert (tmp_path / "logs" / "a").is_dir() and (tmp_path / "ckpt").is_dir()
    monkeypatch.chdir(tmp_path)  # os.makedirs("memory://nowhere/x") would make ./memory:/nowhere/x here
    before = sorted(p.name for p in tmp_path.iterdir())
    prepare_local_paths(cli_args.parse(["--standalone", "--persist-dir", "memory://nowhere/x", SCRIPT]))
    assert not (tmp_path / "memory:").exists(), "a --persist-dir URL was created as a local directory"
    assert sorted(p.name for p in tmp_path.iterdir()) == before


@pytest.mark.parametrize("where,message", [
    ("file/ev.jsonl", "is a file, not a directory"),
    ("dir", "is a directory; give a file path"),
])
def test_an_event_log_that_cannot_be_opened_exits_2(where, message, tmp_path, capsys, no_etcd):
    (tmp_path / "file").write_text("")
    (tmp_path / "dir").mkdir()
    assert main(["--standalone", "--event-log", str(tmp_path / where), SCRIPT]) == 2
    err = capsys.readouterr().err
    assert "--event-log" in err and message in err and "Traceback" not in err


def test_a_metrics_port_in_use_exits_2_naming_it(capsys, no_etcd):
    with socket.socket() as busy:
        busy.bind(("0.0.0.0", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["--standalone", "--metrics-port", str(port), SCRIPT]) == 2
    err = capsys.readouterr().err
    assert f"--metrics-port {port}: cannot serve metrics on it" in err and "or 0 for any free one" in err


# --- a closed job id ----------------------------------------------------------------------------------------
def test_a_closed_job_id_is_refused_to_a_node_that_never_took_part(etcd_server, tmp_path):
    from resilient.etcd.client import EtcdKV

    endpoint = etcd_server.endpoints[0]
    job = f"reused-{os.getpid()}"

    def run():
        return subprocess.run([sys.executable, "-m", "resilient.run", "--rdzv-endpoint", endpoint, "--rdzv-id", job,
                               "--no-python", "true"], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})

    first = run()
    assert first.returncode == 0 and "succeeded" in first.stdout, first.stderr[-3000:]
    again = run()
    assert again.returncode == 2, again.stdout + again.stderr[-3000:]
    assert (f"job '{job}' was already closed (succeeded: " in again.stderr
            and "before this node joined; a job id cannot be reused: pass a new --rdzv-id" in again.stderr
            and f"`etcdctl --endpoints {endpoint} del --prefix /resilient/{job}/`" in again.stderr), again.stderr
    kv = EtcdKV.connect(etcd_server.settings)  # the advice works: with the old keys gone the id runs again
    try:
        kv.delete(f"/resilient/{job}/", prefix=True)
    finally:
        kv.close()
    assert run().returncode == 0
