"""Data-parallel deduplication of snapshots: each rank stores only its 1/N slice of the state every rank
holds alike, and a restore puts the whole back together from the N slices.

With ``@resilient.elastic(dedup=True)`` (or ``RESILIENT_DEDUP=1``) the model and optimizer state
(protected objects of kind ``module`` and ``optimizer``) is taken to be identical on every rank, as in
DDP. ``split`` lays those tensors end to end as one byte stream of ``total`` bytes (in capture order) and
keeps only the bytes ``[total*r//N, total*(r+1)//N)`` of rank ``r`` of ``N``, as uint8 views named
``_dedup/<key>`` (no copy: the store copies them into the segment); everything else (RNG states,
``ctx.state``, schedulers, samplers) stays per rank and whole. The rank's meta gains ``dedup`` (the
layout of the stream: key, dtype, shape, bytes) and the slot gains the marker tensor ``_dedup``
(int64 ``[rank, N, lo, hi, total]``), which is how the agent recognises a sliced snapshot from the slot
index alone (``resilient.replication.slices``).

``assemble`` reverses it: given this rank's own snapshot (per-rank state, the meta, its slice) and the
segments of all N slices of the same step (``RestoreSource.slices``, index = source rank), it reads
every slice straight into the buffers of the whole tensors (verified chunk by chunk) and checks each
slice's marker (same N and total, its own bounds, same step and generation). The N of the snapshot is
the N of the world that took it, so a restore into a world of another size reassembles from the old N
slices.
"""

from __future__ import annotations

import pickle
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from resilient.elastic.capture import Captured, load_meta
from resilient.errors import StateError
from resilient.replication.slices import MARKER, PREFIX, bounds
from resilient.store import Segment
from resilient.store.segment import dtype_from_name, dtype_name, fits_stored

DEDUP_KINDS = ("module", "optimizer")
META_KEY = "dedup"
VERSION = 1


def _bytes_view(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).view(torch.uint8)


def split(captured: Captured) -> Captured:
    """This rank's snapshot with the shared state cut to its slice (rank and world size from the meta)."""
    meta = load_meta(captured.meta)
    rank, world = int(meta["rank"]), int(meta["world_size"])
    if not 0 <= rank < world:
        raise StateError(f"Cannot slice the snapshot of rank {rank} in a world of {world}.")
    names = {n for n, e in meta["objects"].items() if e["kind"] in DEDUP_KINDS}
    shared = [k for k in captured.tensors if k.split("/", 1)[0] in names]
    layout = []
    for k in shared:
        t = captured.tensors[k]
        layout.append((k, dtype_name(t.dtype), tuple(t.shape), t.numel() * t.element_size()))
    total = sum(n for *_, n in layout)
    lo, hi = bounds(rank, world, total)
    tensors: dict[str, torch.Tensor] = {k: v for k, v in captured.tensors.items() if k not in set(shared)}
    pos = 0
    for (k, _dt, _shape, n) in layout:
        a, b = max(lo, pos), min(hi, pos + n)
        if a < b:
            tensors[f"{PREFIX}{k}"] = _bytes_view(captured.tensors[k])[a - pos : b - pos]
        pos += n
    tensors[MARKER] = torch.tensor([rank, world, lo, hi, total], dtype=torch.int64)
    meta[META_KEY] = {"version": VERSION, "rank": rank, "world_size": world, "total": total, "layout": layout}
    return Captured(tensors=tensors, meta=pickle.dumps(meta, protocol=pickle.HIGHEST_PROTOCOL))


def is_sliced(meta: Mapping[str, Any]) -> bool:
    return META_KEY in meta


def _pieces(layout: Sequence, lo: int, hi: int) -> list[tuple[str, int, int]]:
    """(key, start, end) within each tensor of the bytes ``[lo, hi)`` of the stream."""
    out, pos = [], 0
    for (k, _dt, _shape, n) in layout:
        a, b = max(lo, pos), min(hi, pos + n)
        if a < b:
            out.append((k, a - pos, b - pos))
        pos += n
    return out


def assemble(meta: Mapping[str, Any], own: Mapping[str, torch.Tensor], slices: Sequence[str], *, step: int,
             generation: int, own_segment: Segment | None = None,
             into: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The whole tensors of a sliced snapshot: ``own`` (the tensors read from this rank's source shard)
    without the slice tensors, plus every shared tensor rebuilt from the ``slices`` segments (straight
    into the tensors of ``into`` where they fit, as ``Segment.read`` does)."""
    d = meta[META_KEY]
    world, total, layout, mine = int(d["world_size"]), int(d["total"]), d["layout"], int(d["rank"])
    if len(slices) < world:
        raise StateError(
            f"The snapshot of step {step} is sliced across {world} ranks (dedup) but the runtime named "
            f"{len(slices)} slice segments ({list(slices)}); every slice of the step is needed to restore it."
        )
    into = into or {}
    live = {k: into[k] for (k, dt, shape, _n) in layout if fits_stored(into.get(k), dt, tuple(shape))}
    bufs = {k: (_bytes_view(live[k]) if k in live else torch.empty(n, dtype=torch.uint8))
            for (k, _dt, _shape, n) in layout}
    for r in range(world):
        lo, hi = bounds(r, world, total)
        pieces = _pieces(layout, lo, hi)
        if r == mine:
            for k, a, b in pieces:
                bufs[k][a:b].copy_(own[f"{PREFIX}{k}"])
            continue
        targets = {f"{PREFIX}{k}": bufs[k][a:b] for k, a, b in pieces}
        targets[MARKER] = torch.empty(5, dtype=torch.int64)
        name = slices[r]
        reuse = own_segment is not None and own_segment.name == name
        seg = own_segment if reuse else Segment.open(name)
        try:
            snap = seg.read_into(targets, step=step, verify=True)
        except StateError as exc:
            raise StateError(f"Slice {r} of {world} of step {step} in segment {name!r} does not fit the snapshot's "
                             f"layout: {exc}") from exc
        finally:
            if not reuse:
                seg.close()
        got = [int(x) for x in targets[MARKER].tolist()]
        if got != [r, world, lo, hi, total] or snap.generation != generation:
            raise StateError(
                f"Segment {name!r} holds slice {got[:2]} (bytes {got[2]}..{got[3]} of {got[4]}, generation "
                f"{snap.generation}) where slice [{r}, {world}] (bytes {lo}..{hi} of {total}, generation "
                f"{generation}) of step {step} was expected; the slices are of different snapshots."
            )
    out = {k: v for k, v in own.items() if k != MARKER and not k.startswith(PREFIX)}
    for (k, dt, shape, _n) in layout:
        out[k] = live[k] if k in live else bufs[k].view(dtype_from_name(dt)).reshape(tuple(shape))
    return out


__all__ = ["assemble", "is_sliced", "split"]
