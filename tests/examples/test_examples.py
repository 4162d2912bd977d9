"""Every example runs in a short configuration: under resilient-run --standalone, and as one process."""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    return env


def _run(args: list[str], timeout: float = 240) -> str:
    proc = subprocess.run(args, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{args} exited {proc.returncode}:\n{out[-4000:]}"
    return out


def _losses(out: str) -> list[float]:
    return [float(m) for m in re.findall(r"loss ([0-9.]+)", out)]


def test_minimal_under_resilient_run_standalone():
    out = _run([sys.executable, "-m", "resilient.run", "--standalone", "--nproc-per-node", "2",
                str(EXAMPLES / "minimal.py"), "--steps", "30"])
    assert "world 2" in out
    losses = _losses(out)
    assert len(losses) == 3 and losses[-1] < losses[0]
    assert "succeeded (exit code 0)" in out


def test_ddp_mlp_under_resilient_run_standalone():
    out = _run([sys.executable, "-m", "resilient.run", "--standalone", "--nproc-per-node", "2",
                str(EXAMPLES / "ddp_mlp.py"), "--steps", "41", "--hidden", "64"])
    losses = _losses(out)
    assert len(losses) == 3 and losses[-1] < losses[0], losses
    assert "world 2" in out


def test_gpt_char_loss_falls_in_one_process():
    out = _run([sys.executable, str(EXAMPLES / "gpt_char.py"), "--steps", "60", "--global-batch", "16",
                "--ctx-len", "32"])
    losses = _losses(out)
    assert len(losses) >= 3, out[-2000:]
    assert losses[-1] < losses[0] - 0.5, f"loss did not fall: {losses}"


def test_from_torchrun_guide_names_the_changes():
    text = (EXAMPLES / "from_torchrun.md").read_text()
    for needle in ("@resilient.elastic", "ctx.protect", "ctx.steps", "resilient-run"):
        assert needle in text
