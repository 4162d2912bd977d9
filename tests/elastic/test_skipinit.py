"""``skip_init``: modules built inside draw nothing from the RNG (their initialisers are skipped), and the
initialisers are back afterwards, also after an exception."""

from __future__ import annotations

import pytest
import torch

from resilient.elastic.skipinit import skip_init


def build() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Embedding(50, 16), torch.nn.Linear(16, 16), torch.nn.LayerNorm(16),
                               torch.nn.Conv1d(16, 8, 3))


def draws_rng(fn) -> bool:
    before = torch.get_rng_state()
    fn()
    return not torch.equal(before, torch.get_rng_state())


def test_modules_built_inside_skip_their_initialisers_and_outside_do_not():
    with skip_init():
        assert not draws_rng(build)
        untouched = torch.zeros(3)
        assert torch.nn.init.ones_(untouched) is untouched and untouched.sum() == 0  # constants skipped too
    assert draws_rng(build)
    assert torch.nn.init.ones_(torch.zeros(3)).sum() == 3


def test_disabled_is_a_no_op():
    with skip_init(enabled=False):
        assert draws_rng(build)


def test_initialisers_come_back_after_an_exception():
    kaiming = torch.nn.init.kaiming_uniform_
    with pytest.raises(ValueError):
        with skip_init():
            raise ValueError("boom")
    assert torch.nn.init.kaiming_uniform_ is kaiming
    assert draws_rng(build)
