"""ElasticSampler: the global sample sequence survives any sequence of world sizes, with no gap or repeat."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import DataLoader

from resilient.data import ElasticSampler
from resilient.errors import ConfigError, StateError


def global_sequence(n: int, batch: int, seed: int, steps: int, drop_last: bool = True) -> list[int]:
    sampler = ElasticSampler(n, global_batch_size=batch, seed=seed, drop_last=drop_last)
    return [i for s in range(steps) for i in sampler.global_batch(s)]


@settings(max_examples=150, deadline=None)
@given(
    n=st.integers(1, 200),
    batch=st.integers(1, 40),
    seed=st.integers(0, 2**31),
    drop_last=st.booleans(),
    worlds=st.lists(st.integers(1, 9), min_size=1, max_size=30),
)
def test_any_world_size_sequence_covers_the_global_order_exactly(n, batch, seed, drop_last, worlds):
    if drop_last and n < batch:
        return
    sampler = ElasticSampler(n, global_batch_size=batch, seed=seed, drop_last=drop_last)
    seen: list[int] = []
    for step, world in enumerate(worlds):  # the world size may change at every step
        per_rank = [sampler.batches(step, rank, world) for rank in range(world)]
        seen.extend(i for part in per_rank for i in part)
    assert seen == global_sequence(n, batch, seed, len(worlds), drop_last)


@settings(max_examples=60, deadline=None)
@given(n=st.integers(2, 300), batch=st.integers(1, 50), seed=st.integers(0, 1000))
def test_each_epoch_is_a_permutation_without_repeats(n, batch, seed):
    if n < batch:
        return
    sampler = ElasticSampler(n, global_batch_size=batch, seed=seed)
    epoch = [i for s in range(sampler.steps_per_epoch) for i in sampler.global_batch(s)]
    assert len(epoch) == len(set(epoch)) == sampler.steps_per_epoch * batch
    assert set(epoch) <= set(range(n))


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(8, 120),
    world=st.integers(1, 6),
    stop=st.integers(0, 40),
    seed=st.integers(0, 10_000),
)
def test_same_world_size_after_restore_gives_the_fault_free_order(n, world, stop, seed):
    batch = 8
    fault_free = [ElasticSampler(n, global_batch_size=batch, seed=seed, rank=r, world_size=world) for r in range(world)]
    expected = [[s.batches(step) for step in range(40)] for s in fault_free]
    for rank in range(world):
        before = ElasticSampler(n, global_batch_size=batch, seed=seed, rank=rank, world_size=world)
        before.set_step(stop)
        state = before.state_dict()
        after = ElasticSampler(n, global_batch_size=batch, seed=seed, rank=rank, world_size=world)
        after.load_state_dict(state)
        assert [after.batches(step) for step in range(stop, 40)] == expected[rank][stop:]


def test_iteration_yields_the_rest_of_the_epoch_and_feeds_a_dataloader():
    sampler = ElasticSampler(20, global_batch_size=4, seed=1, rank=1, world_size=2)
    sampler.set_step(3)
    loader = DataLoader(list(range(100, 120)), batch_sampler=sampler)
    assert len(loader) == 2  # steps 3 and 4 of a 5-step epoch
    got = [b.tolist() for b in loader]
    assert got == [[100 + i for i in sampler.batches(3)], [100 + i for i in sampler.batches(4)]]
    assert sampler.step == 5
    assert [sorted(b) for b in sampler][0] == sorted(sampler.batches(5))  # the next epoch continues


def test_order_differs_between_epochs_and_seeds_but_not_between_runs():
    a = ElasticSampler(50, global_batch_size=10, seed=1)
    b = ElasticSampler(50, global_batch_size=10, seed=1)
    c = ElasticSampler(50, global_batch_size=10, seed=2)
    assert a.global_batch(0) == b.global_batch(0)
    assert a.global_batch(0) != a.global_batch(5)  # epoch 1 is reshuffled
    assert a.global_batch(0) != c.global_batch(0)
    assert ElasticSampler(50, global_batch_size=10, shuffle=False).global_batch(1) == list(range(10, 20))


def test_mismatched_parameters_are_refused_on_restore():
    state = ElasticSampler(50, global_batch_size=10, seed=1).state_dict()
    with pytest.raises(StateError, match="global_batch_size=10.*global_batch_size=5"):
        ElasticSampler(50, global_batch_size=5, seed=1).load_state_dict(state)


def test_invalid_configuration_is_refused():
    with pytest.raises(ConfigError, match="drop_last"):
        ElasticSampler(5, global_batch_size=10)
    with pytest.raises(ConfigError, match="rank 3"):
        ElasticSampler(50, global_batch_size=10, rank=3, world_size=2)
