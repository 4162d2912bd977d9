"""The manifest of a durable checkpoint, and the names of the files in a checkpoint directory.

Layout under a persist directory::

    step-00000120/rank-0.safetensors     one file per shard (rank), tensors + non-tensor state
    step-00000120/rank-1.safetensors
    step-00000120/manifest.json          written last: its presence is the commit point

``manifest.json`` records step, generation, world size, job, creation time, torch and resilient
versions, and per shard the file name, size and crc32 of the whole file, the size of the non-tensor
state, and per tensor its dtype, shape, byte range and crc32 (see ``checksum``). The manifest carries a
sha256 of its own canonical JSON (``checksum``), so a damaged manifest is detected, not trusted.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from resilient.errors import CheckpointCorruptError

if TYPE_CHECKING:
    from resilient.persist.fs import Storage

FORMAT = "resilient.checkpoint/1"
MANIFEST_NAME = "manifest.json"
_STEP_DIR = re.compile(r"^step-(\d{8,})$")


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def parse_step_dir(name: str) -> int | None:
    """The step of a checkpoint directory name, or None if ``name`` is not one."""
    match = _STEP_DIR.match(name)
    return int(match.group(1)) if match else None


def shard_file_name(rank: int) -> str:
    return f"rank-{rank}.safetensors"


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a shard file: byte range relative to the file's data section, and its crc32."""

    name: str
    dtype: str  # safetensors dtype name: F32, BF16, I64...
    shape: tuple[int, ...]
    begin: int
    end: int
    crc32: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


def file_order(entries) -> tuple[TensorEntry, ...]:
    """Tensor entries in the order of their bytes in the file (the canonical order of a ShardEntry)."""
    return tuple(sorted(entries, key=lambda t: (t.begin, t.end, t.name)))


@dataclass(frozen=True)
class ShardEntry:
    """One rank's shard file."""

    rank: int
    file: str
    bytes: int
    crc32: int  # of the whole file
    meta_bytes: int
    tensors: tuple[TensorEntry, ...]

    def tensor(self, name: str) -> TensorEntry:
        for entry in self.tensors:
            if entry.name == name:
                return entry
        raise KeyError(name)


@dataclass(frozen=True)
class Manifest:
    """What a complete checkpoint holds. ``storage`` and ``directory`` say where it was read from."""

    job: str
    step: int
    generation: int
    world_size: int
    created: float
    torch_version: str
    resilient_version: str
    shards: tuple[ShardEntry, ...]
    format: str = FORMAT
    directory: str = field(default="", compare=False)
    storage: Storage | None = field(default=None, compare=False, repr=False)

    @property
    def total_bytes(self) -> int:
        return sum(shard.bytes for shard in self.shards)

    @property
    def location(self) -> str:
        """Full path or URL of the checkpoint directory (empty if not bound to a storage)."""
        return self.storage.describe(self.directory) if self.storage is not None else self.directory

    def shard(self, rank: int) -> ShardEntry:
        for entry in self.shards:
            if entry.rank == rank:
                return entry
        raise KeyError(
            f"Checkpoint step {self.step} at {self.location or '?'} has no shard for rank {rank}; "
            f"its ranks are {[s.rank for s in self.shards]}."
        )

    def to_dict(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "format": self.format,
            "job": self.job,
            "step": self.step,
            "generation": self.generation,
            "world_size": self.world_size,
            "created": self.created,
            "torch_version": self.torch_version,
            "resilient_version": self.resilient_version,
            "total_bytes": self.total_bytes,
            "shards": [
                {
                    "rank": s.rank,
                    "file": s.file,
                    "bytes": s.bytes,
                    "crc32": s.crc32,
                    "meta_bytes": s.meta_bytes,
                    "tensors": {
                        t.name: {"dtype": t.dtype, "shape": list(t.shape), "offsets": [t.begin, t.end], "crc32": t.crc32}
                        for t in s.tensors
                    },
                }
                for s in self.shards
            ],
        }
        body["checksum"] = _canonical_sha256(body)
        return body

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, sort_keys=True) + "\n"

    def bind(self, storage: Storage, directory: str) -> Manifest:
        """The same manifest, marked as read from ``directory`` of ``storage``."""
        return dataclasses.replace(self, storage=storage, directory=directory)


def _canonical_sha256(body: dict[str, Any]) -> str:
    without = {k: v for k, v in body.items() if k != "checksum"}
    text = json.dumps(without, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def from_json(text: str | bytes, *, where: str = "?") -> Manifest:
    """Parse and check a manifest; ``CheckpointCorruptError`` naming ``where`` if it is damaged."""
    try:
        body = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointCorruptError(f"Manifest {where} is not valid JSON ({exc}); the checkpoint is damaged.") from exc
    if not isinstance(body, dict):
        raise CheckpointCorruptError(f"Manifest {where} is not a JSON object; the checkpoint is damaged.")
    if body.get("format") != FORMAT:
        raise CheckpointCorruptError(
            f"Manifest {where} has format {body.get('format')!r}, expected {FORMAT!r}; it was not written by "
            f"this version of resilient or is damaged."
        )
    if body.get("checksum") != _canonical_sha256(body):
        raise CheckpointCorruptError(f"Manifest {where} fails its own checksum; the checkpoint is damaged.")
    try:
        shards = tuple(
            ShardEntry(
                rank=int(s["rank"]),
                file=str(s["file"]),
                bytes=int(s["bytes"]),
                crc32=int(s["crc32"]),
                meta_bytes=int(s["meta_bytes"]),
                tensors=file_order(
                    TensorEntry(
                        name=name,
                        dtype=str(t["dtype"]),
                        shape=tuple(int(d) for d in t["shape"]),
                        begin=int(t["offsets"][0]),
                        end=int(t["offsets"][1]),
                        crc32=int(t["crc32"]),
                    )
                    for name, t in s["tensors"].items()
                ),
            )
            for s in body["shards"]
        )
        manifest = Manifest(
            job=str(body["job"]),
            step=int(body["step"]),
            generation=int(body["generation"]),
            world_size=int(body["world_size"]),
            created=float(body["created"]),
            torch_version=str(body["torch_version"]),
            resilient_version=str(body["resilient_version"]),
            shards=shards,
        )
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        raise CheckpointCorruptError(f"Manifest {where} lacks or mangles field {exc}; the checkpoint is damaged.") from exc
    ranks = sorted(s.rank for s in shards)
    if ranks != list(range(manifest.world_size)):
        raise CheckpointCorruptError(
            f"Manifest {where} lists shards for ranks {ranks} but world size {manifest.world_size}; "
            f"the checkpoint is incomplete."
        )
    return manifest


def shard_entry_to_dict(entry: ShardEntry) -> dict[str, Any]:
    """One shard's manifest entry as JSON-able data (the manifest's own shard format), so that a writer
    holding only that shard can hand its entry to the agent that commits the manifest."""
    return {
        "rank": entry.rank, "file": entry.file, "bytes": entry.bytes, "crc32": entry.crc32,
        "meta_bytes": entry.meta_bytes,
        "tensors": {t.name: {"dtype": t.dtype, "shape": list(t.shape), "offsets": [t.begin, t.end], "crc32": t.crc32}
                    for t in entry.tensors},
    }


def shard_entry_from_dict(s: dict[str, Any], *, where: str = "?") -> ShardEntry:
    """The inverse of ``shard_entry_to_dict``; ``CheckpointCorruptError`` naming ``where`` if malformed."""
    try:
        return ShardEntry(
            rank=int(s["rank"]), file=str(s["file"]), bytes=int(s["bytes"]), crc32=int(s["crc32"]),
            meta_bytes=int(s["meta_bytes"]),
            tensors=file_order(
                TensorEntry(name=name, dtype=str(t["dtype"]), shape=tuple(int(d) for d in t["shape"]),
                            begin=int(t["offsets"][0]), end=int(t["offsets"][1]), crc32=int(t["crc32"]))
                for name, t in s["tensors"].items()
            ),
        )
    except (KeyError, TypeError, ValueError, IndexError, AttributeError) as exc:
        raise CheckpointCorruptError(f"Shard entry {where} lacks or mangles field {exc}.") from exc
