"""A canonical hash of training state, to compare runs bit for bit.

``state_hash(objs)`` is the sha256 over the sorted ``(key, dtype, shape, bytes)`` of every tensor in the
state dicts of the given objects (modules, optimizers, or anything with ``state_dict``; DDP is unwrapped),
plus the ``repr`` of every non-tensor leaf (learning rates, step counters). Two runs that end with the
same weights and optimizer state give the same hash; a single flipped bit changes it. Used by the tests,
the example scripts (``train.done``) and the chaos harness.
"""

from __future__ import annotations

import hashlib
from typing import Any, Mapping

import torch

from resilient.elastic.capture import TensorRef, flatten, kind_of, state_of


def _leaves(value: Any, path: str, out: dict[str, Any]) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            _leaves(v, f"{path}/{k}", out)
    elif type(value) in (list, tuple):
        for i, v in enumerate(value):
            _leaves(v, f"{path}/{i}", out)
    else:
        out[path] = value


def state_hash(objs: Mapping[str, Any]) -> str:
    """Hex sha256 of the state of ``objs`` (name -> module / optimizer / stateful / plain value)."""
    tensors: dict[str, torch.Tensor] = {}
    leaves: dict[str, Any] = {}
    for name, obj in objs.items():
        kind = kind_of(name, obj)
        skeleton = flatten(_contiguous(state_of(name, kind, obj)), name, tensors)
        _leaves(skeleton, name, leaves)
    digest = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key].detach()
        if t.device.type != "cpu":
            t = t.cpu()
        digest.update(f"T|{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        if t.numel():
            digest.update(t.reshape(-1).view(torch.uint8).numpy().data)
    for key in sorted(leaves):
        if not isinstance(leaves[key], TensorRef):
            digest.update(f"V|{key}|{leaves[key]!r}|".encode())
    return digest.hexdigest()


def _contiguous(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.contiguous()
    if isinstance(value, dict):
        return {k: _contiguous(v) for k, v in value.items()}
    if type(value) in (list, tuple):
        return type(value)(_contiguous(v) for v in value)
    return value
