"""The decorator's recovery loop in-process, over a real LocalRuntime, segment and gloo process group."""

from __future__ import annotations

import inspect
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
    with pytest.raises(ConfigError, match="backend='tcp'"):
        ElasticConfig(backend="tcp")


@pytest.mark.parametrize("kwargs, names", [
    ({"snapshot_every": "abc"}, "snapshot_every='abc' must be a whole number"),
    ({"snapshot_every": -1}, "snapshot_every=-1 must be >= 0"),
    ({"snapshot_every": 2.5}, "snapshot_every=2.5 must be a whole number"),
    ({"backend": "tcp"}, "backend='tcp' is not a torch.distributed backend"),
    ({"device": "gpu"}, "device='gpu' is not a torch device"),
    ({"seed": "0"}, "seed='0' must be a whole number"),
    ({"commit_wait_s": -1}, "commit_wait_s=-1 must be >= 0"),
    ({"pg_timeout_s": "300"}, "pg_timeout_s='300' must be a number of seconds"),
    ({"generation_timeout_s": 0}, "generation_timeout_s (0) must be positive"),
    ({"dedup": "yes"}, "dedup='yes' must be True or False"),
    ({"runtime": 3}, "runtime must be a callable"),
])
def test_bad_decorator_arguments_are_refused_when_decorating(kwargs, names):
    with pytest.raises(ConfigError) as info:
        resilient.elastic(**kwargs)  # before any function is decorated or called
    assert names in str(info.value) and str(info.value).startswith("@resilient.elastic")


def test_a_train_function_must_take_the_context():
    with pytest.raises(ConfigError, match=r"train\(\) takes no positional parameter.*def train\(ctx, \.\.\.\)"):
        @resilient.elastic
        def train():
            pass
    with pytest.raises(ConfigError, match="takes no positional parameter"):
        @resilient.elastic(snapshot_every=2)
        def keyword_only(*, ctx):
            pass
    with pytest.raises(ConfigError, match="keyword arguments only"):
        resilient.elastic(5)

    @resilient.elastic
    def with_ctx(ctx, steps=3):
        pass

    @resilient.elastic(snapshot_every=0)
    def variadic(*args):
        pass

    # accepted: each is wrapped, keeping the train function's own signature
    assert str(inspect.signature(with_ctx)) == "(ctx, steps=3)" and with_ctx.__name__ == "with_ctx"
    assert str(inspect.signature(variadic)) == "(*args)" and variadic.__name__ == "variadic"


def test_a_bad_environment_default_is_refused_at_the_call_naming_the_variable(monkeypatch):
    monkeypatch.setenv(env.SNAPSHOT_EVERY, "-2")
    made = []

    @resilient.elastic(runtime=lambda: made.append(1))
    def train(ctx):
        pass

    with pytest.raises(ConfigError, match=r"snapshot_every=-2 must be >= 0.*\$RESILIENT_SNAPSHOT_EVERY"):
        train()
    assert made == []  # refused before a runtime was made


def test_each_bad_environment_value_is_blamed_on_its_own_variable(monkeypatch):
    # the variable used to be guessed from the message: a non-integer RESILIENT_SNAPSHOT_EVERY was blamed on
    # $RESILIENT_BACKEND
    @resilient.elastic(runtime=lambda: pytest.fail("a runtime was made"))
    def train(ctx):
        pass

    monkeypatch.setenv(env.SNAPSHOT_EVERY, "x")
    with pytest.raises(ConfigError) as info:
        train()
    assert str(info.value) == "Environment variable RESILIENT_SNAPSHOT_EVERY='x' must be an integer."
    monkeypatch.delenv(env.SNAPSHOT_EVERY)
    monkeypatch.setenv(env.BACKEND, "tcp")
    with pytest.raises(ConfigError, match=r"backend='tcp' is not a torch.distributed backend.*"
                                          r"The value came from \$RESILIENT_BACKEND: fix or unset it\.$"):
        train()
