"""Random number generator state of one rank: capture, restore, and deterministic re-derivation.

Captured per rank: torch's CPU generator, the CUDA generator of this rank's device (when CUDA is in use),
Python's ``random`` and NumPy's legacy global generator. Tensors go into the snapshot as tensors
(``torch_cpu``, ``cuda``; the caller prefixes them); the Python and NumPy states go into the pickled meta.

After a world-size change a rank has no RNG state of its own to restore (its shard came from another
rank), so its generators are seeded from ``(seed, step, rank)`` instead: deterministic for a given
recovery, and different per rank.
"""

from __future__ import annotations

import hashlib
import random
from typing import Any

import numpy as np
import torch


def capture(device: torch.device | None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors, picklable states) for this process's generators."""
    tensors = {"torch_cpu": torch.get_rng_state()}
    if device is not None and device.type == "cuda" and torch.cuda.is_initialized():
        tensors["cuda"] = torch.cuda.get_rng_state(device)
    plain = {"python": random.getstate(), "numpy": np.random.get_state()}
    return tensors, plain


def restore(tensors: dict[str, torch.Tensor], plain: dict[str, Any], device: torch.device | None) -> None:
    """Put the generators back exactly as captured."""
    torch.set_rng_state(tensors["torch_cpu"].clone())
    if "cuda" in tensors and device is not None and device.type == "cuda":
        torch.cuda.set_rng_state(tensors["cuda"].clone(), device)
    random.setstate(plain["python"])
    np.random.set_state(plain["numpy"])


def derived_seed(seed: int, step: int, rank: int) -> int:
    """A 63-bit seed that is a pure function of (seed, step, rank)."""
    digest = hashlib.sha256(f"resilient-rng/{seed}/{step}/{rank}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF


def reseed(seed: int, step: int, rank: int, device: torch.device | None) -> int:
    """Seed every generator of this process from (seed, step, rank); returns the seed used."""
    value = derived_seed(seed, step, rank)
    torch.manual_seed(value)  # also seeds every CUDA device
    random.seed(value)
    np.random.seed(value & 0xFFFF_FFFF)
    return value
