"""Data order that survives restarts and world-size changes: ``ElasticSampler``.

The sample order is a deterministic global permutation per epoch (a pure function of ``seed`` and the
epoch), cut into global batches by step: global batch ``s`` is ``order[s*B:(s+1)*B]`` of epoch
``s // steps_per_epoch``. Each global batch is split across the ranks of the *current* world size in
contiguous pieces (like ``torch.tensor_split``). So

* with the same world size, every rank sees exactly the fault-free sequence after a restore, and
* after a world-size change no sample of the global sequence is skipped or repeated: the union over
  ranks of step ``s``'s pieces is global batch ``s`` whatever the world size was at step ``s``.

The sampler yields one list of indices per step (use it as a ``DataLoader(..., batch_sampler=sampler)``)
or call ``batches(step)`` directly. Its position is the number of steps completed; ``ctx.steps()`` keeps
it current for protected samplers, and ``state_dict``/``load_state_dict`` carry it in a snapshot.
"""

from __future__ import annotations

from typing import Any, Iterator

import torch
from torch.utils.data import Sampler

from resilient.errors import ConfigError, StateError


class ElasticSampler(Sampler[list[int]]):
    """Deterministic global order partitioned by step and split across the current ranks."""

    def __init__(
        self,
        dataset_len: int,
        *,
        global_batch_size: int,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = True,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if dataset_len < 1:
            raise ConfigError(f"ElasticSampler needs a non-empty dataset; got dataset_len={dataset_len}.")
        if global_batch_size < 1:
            raise ConfigError(f"ElasticSampler global_batch_size must be >= 1; got {global_batch_size}.")
        if drop_last and dataset_len < global_batch_size:
            raise ConfigError(
                f"ElasticSampler with drop_last=True needs dataset_len ({dataset_len}) >= global_batch_size "
                f"({global_batch_size}); lower the batch size or pass drop_last=False."
            )
        self.dataset_len = int(dataset_len)
        self.global_batch_size = int(global_batch_size)
        self.seed = int(seed)
        self.shuffle = bool(shuffle)
        self.drop_last = bool(drop_last)
        self._step = 0
        self._rank = 0
        self._world_size = 1
        self._order_epoch: int | None = None
        self._order: list[int] = []
        self.set_world(rank, world_size)

    # --- geometry ---------------------------------------------------------------------------------
    @property
    def steps_per_epoch(self) -> int:
        if self.drop_last:
            return self.dataset_len // self.global_batch_size
        return -(-self.dataset_len // self.global_batch_size)

    @property
    def step(self) -> int:
        """Number of steps completed (the next step ``__iter__`` yields)."""
        return self._step

    @property
    def rank(self) -> int:
        return self._rank

    @property
    def world_size(self) -> int:
        return self._world_size

    def epoch_of(self, step: int) -> int:
        return step // self.steps_per_epoch

    def set_world(self, rank: int, world_size: int) -> None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise ConfigError(f"ElasticSampler.set_world: rank {rank} is not in a world of size {world_size}.")
        self._rank = int(rank)
        self._world_size = int(world_size)

    def set_step(self, step: int) -> None:
        if step < 0:
            raise ConfigError(f"ElasticSampler.set_step: step must be >= 0; got {step}.")
        self._step = int(step)

    def _epoch_order(self, epoch: int) -> list[int]:
        if self._order_epoch != epoch:
            if self.shuffle:
                gen = torch.Generator()
                gen.manual_seed((self.seed * 1_000_003 + epoch) & 0x7FFF_FFFF_FFFF_FFFF)
                self._order = torch.randperm(self.dataset_len, generator=gen).tolist()
            else:
                self._order = list(range(self.dataset_len))
            self._order_epoch = epoch
        return self._order

    def global_batch(self, step: int) -> list[int]:
        """All ranks' indices for ``step`` (global batch ``step``), in order."""
        if step < 0:
            raise ConfigError(f"ElasticSampler: step must be >= 0; got {step}.")
        epoch, within = divmod(step, self.steps_per_epoch)
        order = self._epoch_order(epoch)
        start = within * self.global_batch_size
        return order[start : start + self.global_batch_size]

    def batches(self, step: int, rank: int | None = None, world_size: int | None = None) -> list[int]:
        """This rank's indices for ``step`` (or those of ``rank`` in a world of ``world_size``)."""
        rank = self._rank if rank is None else rank
        world_size = self._world_size if world_size is None else world_size
        batch = self.global_batch(step)
        n = len(batch)
        return batch[(rank * n) // world_size : ((rank + 1) * n) // world_size]

    # --- torch Sampler protocol -------------------------------------------------------------------
    def __iter__(self) -> Iterator[list[int]]:
        """This rank's batches from the current step to the end of its epoch (advancing the position)."""
        end = (self.epoch_of(self._step) + 1) * self.steps_per_epoch
        while self._step < end:
            step = self._step
            self._step = step + 1
            yield self.batches(step)

    def __len__(self) -> int:
        return self.steps_per_epoch - (self._step % self.steps_per_epoch)

    # --- state ------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "step": self._step,
            "dataset_len": self.dataset_len,
            "global_batch_size": self.global_batch_size,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "drop_last": self.drop_last,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Take the position; the order parameters must match (a different order would skip/repeat data)."""
        for key in ("dataset_len", "global_batch_size", "seed", "shuffle", "drop_last"):
            if key in state and state[key] != getattr(self, key):
                raise StateError(
                    f"ElasticSampler.load_state_dict: the snapshot has {key}={state[key]!r} but this sampler has "
                    f"{key}={getattr(self, key)!r}; build the sampler with the same parameters as the run that "
                    f"took the snapshot."
                )
        self.set_step(int(state["step"]))
