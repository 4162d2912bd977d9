"""The decorator's recovery loop in-process, over a real LocalRuntime, segment and gloo process group."""

from __future__ import annotations

import json

import pytest
import torch.distributed as dist

import resilient
from resilient import env
from resilient.elastic import distributed
from resilient.elastic.decorator import ElasticConfig
from resilient.errors import ConfigError, GenerationChangedError
from resilient.runtime.local import LocalRuntime
from tiny_training import build, reference_hash, step




def test_generation_change_reenters_fn_and_restores_the_last_snapshot(shm_dir):
    runtime = LocalRuntime()
    seen = []

    @resilient.elastic(snapshot_every=1, runtime=lambda: runtime)
    def train(ctx):
        assert dist.is_initialized() and dist.get_world_size() == 1
        model, opt = build()
        ctx.protect(model=model, optimizer=opt)
        seen.append((ctx.generation, ctx.restart_count, ctx.restored_step))
        for s in ctx.steps(8):
            step(model, opt)
            if s == 4 and ctx.generation == 0:
                runtime.request_generation()
        return resilient.state_hash({"model": model, "optimizer": opt})

    assert train() == reference_hash(8)
    assert seen == [(0, 0, None), (1, 1, 5)]
    assert not dist.is_initialized()


def test_other_exceptions_propagate_after_writing_the_error_file(shm_dir, tmp_path, monkeypatch):
    error_file = tmp_path / "error.json"
    monkeypatch.setenv(env.ERROR_FILE, str(error_file))
    calls = []

    @resilient.elastic(runtime=lambda: LocalRuntime())
    def train(ctx):
        calls.append(1)
        for s in ctx.steps(5):
            if s == 2:
                raise ValueError("bad batch at step 2")

    with pytest.raises(ValueError, match="bad batch"):
        train()
    assert calls == [1]  # not retried
    record = json.loads(error_file.read_text())
    assert record["message"]["message"] == "ValueError: bad batch at step 2"
    assert "raise ValueError" in record["message"]["extraInfo"]["py_callstack"]
    assert int(record["message"]["extraInfo"]["timestamp"]) > 0
    assert not dist.is_initialized()


def test_collective_failure_without_a_next_generation_raises_the_original_error(shm_dir):
    @resilient.elastic(runtime=lambda: LocalRuntime())
    def train(ctx):
        raise RuntimeError("[gloo] Connection closed by peer 10.0.0.2:1234")

    with pytest.raises(RuntimeError, match="Connection closed by peer"):
        train()


def test_stop_request_ends_the_loop_after_a_final_snapshot(shm_dir):
    runtime = LocalRuntime()
    closed = []
    runtime.close = lambda: closed.append(runtime.committed_step())  # observe the commit before cleanup

    @resilient.elastic(snapshot_every=0, runtime=lambda: runtime)
    def train(ctx):
        model, opt = build()
        ctx.protect(model=model, optimizer=opt)
        done = []
        for s in ctx.steps(100):
            step(model, opt)
            done.append(s)
            if s == 3:
                runtime.request_stop()
        return done

    assert train() == [0, 1, 2, 3]
    assert closed == [4]
    LocalRuntime.close(runtime)


def test_failure_triage():
    assert distributed.is_collective_failure(GenerationChangedError("moved on"))
    assert distributed.is_collective_failure(dist.DistBackendError("NCCL communicator was aborted"))
    gloo = RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection closed by peer")
    assert distributed.is_collective_failure(gloo)
    assert not distributed.is_collective_failure(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    assert not distributed.is_collective_failure(ValueError("bad"))


def test_config_is_validated():
    with pytest.raises(ConfigError, match="snapshot_every"):
        ElasticConfig(snapshot_every=-1)
    with pytest.raises(ConfigError, match="backend 'tcp'"):
        ElasticConfig(backend="tcp")
