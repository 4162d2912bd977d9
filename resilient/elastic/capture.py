"""Protected objects <-> (named tensors, meta blob): the snapshot format of one rank.

``capture`` walks the state of every protected object and returns

* ``tensors``: every tensor, named by its path: ``model/<key>``, ``optimizer/state/<i>/<k>``,
  ``optimizer/param_groups/...``, ``_rng/torch_cpu``...; contiguous, detached, shared with the live state
  (the store copies them while the training thread waits, so no second copy is made here);
* ``meta``: one pickled skeleton with every non-tensor part (tensors replaced by references), the RNG
  states of Python and NumPy, and the step, rank and world size of the snapshot.

``restore`` reverses it: it checks every module tensor against the live one (a restore into a model of
another shape is a ``StateError`` naming the key and both shapes), rebuilds each state dict and calls
``load_state_dict``. Errors always name the protected object and the key.

Kinds of protected objects: ``module`` (``nn.Module``; DDP is unwrapped so snapshots move between a
wrapped and an unwrapped model), ``optimizer``, ``stateful`` (anything with ``state_dict`` and
``load_state_dict``: LR schedulers, GradScaler, samplers, user objects) and ``value`` (plain picklable
data: numbers, strings, tensors, arrays and containers of them; kept in ``ctx.state``).
"""

from __future__ import annotations

import io
import pickle
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

import numpy as np
import torch

from resilient.errors import StateError

FORMAT_VERSION = 1
_PLAIN_LEAVES = (int, float, complex, str, bytes, bool, type(None), np.ndarray, np.generic, torch.Tensor)


@dataclass(frozen=True)
class TensorRef:
    """A tensor's place in a pickled skeleton."""

    key: str


@dataclass
class Captured:
    tensors: dict[str, torch.Tensor]
    meta: bytes

    @property
    def tensor_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    @property
    def nbytes(self) -> int:
        return self.tensor_bytes + len(self.meta)

    def layout(self) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
        return {k: (t.dtype, tuple(t.shape)) for k, t in self.tensors.items()}


def unwrap(obj: Any) -> Any:
    """The module inside a DistributedDataParallel / DataParallel wrapper (others unchanged)."""
    from torch.nn.parallel import DataParallel, DistributedDataParallel

    while isinstance(obj, (DistributedDataParallel, DataParallel)):
        obj = obj.module
    return obj


def is_plain(value: Any) -> bool:
    if isinstance(value, _PLAIN_LEAVES):
        return True
    if isinstance(value, (list, tuple, set, frozenset)):
        return all(is_plain(v) for v in value)
    if isinstance(value, dict):
        return all(is_plain(k) and is_plain(v) for k, v in value.items())
    return False


def kind_of(name: str, obj: Any) -> str:
    """'module' | 'optimizer' | 'stateful' | 'value'; StateError for anything else."""
    if isinstance(obj, torch.nn.Module):
        return "module"
    if isinstance(obj, torch.optim.Optimizer):
        return "optimizer"
    if callable(getattr(obj, "state_dict", None)) and callable(getattr(obj, "load_state_dict", None)):
        return "stateful"
    if is_plain(obj):
        return "value"
    raise StateError(
        f"ctx.protect({name}=...): a {type(obj).__qualname__} has no state_dict()/load_state_dict() and is not "
        f"plain data; give it those two methods, or protect plain values (numbers, strings, tensors, arrays "
        f"and lists/dicts of them) instead."
    )


def state_of(name: str, kind: str, obj: Any) -> Any:
    if kind == "module":
        return unwrap(obj).state_dict()
    if kind in ("optimizer", "stateful"):
        return obj.state_dict()
    return obj


def _map_dict(value: dict, fn: Any) -> dict:
    """A dict of the same type with ``fn(key, value)`` applied, keeping ``_metadata`` (module state dicts)."""
    if type(value) is dict:
        out = {k: fn(k, v) for k, v in value.items()}
    else:
        out = type(value)((k, fn(k, v)) for k, v in value.items())
    metadata = getattr(value, "_metadata", None)
    if metadata is not None:
        out._metadata = metadata  # type: ignore[attr-defined]
    return out


def flatten(value: Any, path: str, out: dict[str, torch.Tensor]) -> Any:
    """Move every tensor of ``value`` into ``out`` under its path; returns the skeleton."""
    if isinstance(value, torch.Tensor):
        if value.is_sparse or value.layout != torch.strided:
            raise StateError(
                f"Protected state {path!r} is a {value.layout} tensor; only dense tensors can be snapshotted."
            )
        if not value.is_contiguous():
            raise StateError(
                f"Protected state {path!r} is a non-contiguous tensor (shape {tuple(value.shape)}, stride "
                f"{value.stride()}); make it contiguous (.contiguous()) where it is created or returned by "
                "state_dict()."
            )
        if path in out:
            raise StateError(
                f"Protected state key {path!r} occurs twice (dict keys that differ only in type, such as 1 and '1')."
            )
        out[path] = value.detach()
        return TensorRef(path)
    if isinstance(value, dict):
        return _map_dict(value, lambda k, v: flatten(v, f"{path}/{k}", out))
    if type(value) in (list, tuple):
        return type(value)(flatten(v, f"{path}/{i}", out) for i, v in enumerate(value))
    return value


def unflatten(skeleton: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    if isinstance(skeleton, TensorRef):
        try:
            return tensors[skeleton.key]
        except KeyError as exc:
            raise StateError(
                f"The snapshot's index has no tensor {skeleton.key!r} that its meta refers to; the snapshot is "
                "inconsistent."
            ) from exc
    if isinstance(skeleton, dict):
        return _map_dict(skeleton, lambda k, v: unflatten(v, tensors))
    if type(skeleton) in (list, tuple):
        return type(skeleton)(unflatten(v, tensors) for v in skeleton)
    return skeleton


def capture(
    objects: Mapping[str, Any],
    *,
    extra_tensors: Mapping[str, torch.Tensor] | None = None,
    extra_meta: Mapping[str, Any] | None = None,
) -> Captured:
    """Flatten the protected ``objects`` (name -> object) into named tensors and one meta blob."""
    tensors: dict[str, torch.Tensor] = {}
    entries: dict[str, dict[str, Any]] = {}
    for name, obj in objects.items():
        kind = kind_of(name, obj)
        entries[name] = {"kind": kind, "state": flatten(state_of(name, kind, obj), name, tensors)}
    for key, tensor in (extra_tensors or {}).items():
        flatten(tensor, key, tensors)
    meta = {"format": FORMAT_VERSION, "objects": entries, **(extra_meta or {})}
    try:
        blob = pickle.dumps(meta, protocol=pickle.HIGHEST_PROTOCOL)
    except (pickle.PicklingError, TypeError, AttributeError) as exc:
        bad = _first_unpicklable(entries)
        raise StateError(f"Protected state {bad!r} cannot be pickled into the snapshot's meta: {exc}.") from exc
    return Captured(tensors=tensors, meta=blob)


def _first_unpicklable(entries: Mapping[str, Any]) -> str:
    def walk(value: Any, path: str) -> str | None:
        if isinstance(value, dict):
            for k, v in value.items():
                found = walk(v, f"{path}/{k}")
                if found:
                    return found
            return None
        if type(value) in (list, tuple):
            for i, v in enumerate(value):
                found = walk(v, f"{path}/{i}")
                if found:
                    return found
            return None
        try:
            pickle.dump(value, io.BytesIO())
        except Exception:  # noqa: BLE001 - probing which leaf fails; the caller re-raises the original error
            return path
        return None

    for name, entry in entries.items():
        found = walk(entry["state"], name)
        if found:
            return found
    return "<unknown>"


def load_meta(blob: bytes) -> dict[str, Any]:
    try:
        meta = pickle.loads(blob)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means the blob is unusable
        raise StateError(f"The snapshot's meta blob ({len(blob)} bytes) cannot be unpickled: {exc}.") from exc
    found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
    if found != FORMAT_VERSION:
        raise StateError(
            f"The snapshot's meta has format {found!r}; "
            f"this resilient reads format {FORMAT_VERSION}."
        )
    return meta


def check_module_shapes(name: str, module: torch.nn.Module, state: Mapping[str, Any]) -> None:
    """StateError naming the first key whose snapshot shape or dtype differs from the live module's."""
    live = unwrap(module).state_dict()
    for key, value in state.items():
        if not isinstance(value, torch.Tensor) or key not in live or not isinstance(live[key], torch.Tensor):
            continue
        if tuple(value.shape) != tuple(live[key].shape):
            raise StateError(
                f"Cannot restore {name}/{key}: the snapshot holds shape {tuple(value.shape)} but the model has "
                f"shape {tuple(live[key].shape)}; restore into the same architecture the snapshot was taken from."
            )
    missing = sorted(set(live) - set(state))
    unexpected = sorted(set(state) - set(live))
    if missing or unexpected:
        raise StateError(
            f"Cannot restore {name}: the model's state keys differ from the snapshot's (missing from the snapshot: "
            f"{missing[:5]}, not in the model: {unexpected[:5]}); restore into the same architecture."
        )


def live_module_tensors(objects: Mapping[str, Any], kinds: Mapping[str, str]) -> dict[str, torch.Tensor]:
    """The live tensors of the protected modules under the names ``capture`` stores them by: a restore
    reads into these directly (they share storage with the parameters and buffers)."""
    out: dict[str, torch.Tensor] = {}
    for name, obj in objects.items():
        if kinds[name] != "module":
            continue
        for key, value in unwrap(obj).state_dict().items():
            if isinstance(value, torch.Tensor):
                out[f"{name}/{key}"] = value.detach()
    return out


def restore_object(name: str, obj: Any, entry: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> Any:
    """Load one protected object's state; returns the object (or the restored value for plain values).

    ``tensors`` must be owned by the caller (the store's ``read`` returns fresh copies): optimizers keep
    the restored tensors as their state."""
    kind = kind_of(name, obj)
    if entry["kind"] != kind:
        raise StateError(
            f"Cannot restore {name}: the snapshot holds a {entry['kind']} under that name but a {kind} "
            f"({type(obj).__qualname__}) is protected now."
        )
    state = unflatten(entry["state"], tensors)
    if kind == "module":
        check_module_shapes(name, obj, state)
        unwrap(obj).load_state_dict(state)  # copies into the live parameters
        return obj
    if kind == "value":
        return state
    try:
        obj.load_state_dict(state)
    except (ValueError, KeyError, RuntimeError) as exc:
        raise StateError(
            f"Cannot restore {name} ({type(obj).__qualname__}): its load_state_dict refused the snapshot: {exc}"
        ) from exc
    return obj


def restore_order(names: Iterable[str], kinds: Mapping[str, str]) -> list[str]:
    """Modules first (shape errors surface before anything else changes), then optimizers, then the rest."""
    rank = {"module": 0, "optimizer": 1, "stateful": 2, "value": 3}
    return sorted(names, key=lambda n: rank[kinds[n]])
