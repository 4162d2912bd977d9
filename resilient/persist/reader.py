"""Finding, verifying and loading durable checkpoints.

``latest_complete(directory)`` is the newest checkpoint whose manifest is committed and whose files
verify; a corrupt or partial one is skipped with a warning and a ``ckpt.verify_failed`` event, and the
one before it is used. ``load`` reads shards back as ``ShardState`` (tensors view one buffer per file,
no extra copy), checking every tensor's and file's crc32 on the way. ``load_latest`` does both in one read of the
bytes: it tries checkpoints newest first and falls back when one fails verification.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from resilient import events
from resilient.errors import CheckpointCorruptError, PersistError
from resilient.logs import get_logger
from resilient.persist import checksum, shardfile
from resilient.persist.fs import Storage, open_storage
from resilient.persist.manifest import MANIFEST_NAME, Manifest, from_json, parse_step_dir

log = get_logger(__name__)


@dataclass
class ShardState:
    """One rank's state as persisted: what ``resilient.store.Snapshot`` holds."""

    step: int
    generation: int
    meta: bytes
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)


def list_checkpoints(storage: Storage) -> list[tuple[int, str]]:
    """(step, directory name) of every checkpoint directory, complete or not, oldest first."""
    found = []
    for name in storage.list_dir(""):
        step = parse_step_dir(name)
        if step is not None:
            found.append((step, name))
    return sorted(found)


def read_manifest(storage: Storage, directory: str) -> Manifest:
    """The manifest of ``directory``; ``CheckpointCorruptError`` if it is missing (partial) or damaged."""
    path = f"{directory}/{MANIFEST_NAME}"
    try:
        with storage.open_read(path) as fh:
            text = fh.read()
    except FileNotFoundError as exc:
        raise CheckpointCorruptError(
            f"Checkpoint {storage.describe(directory)} has no {MANIFEST_NAME}: it is partial (a persist that did "
            f"not finish) and is ignored."
        ) from exc
    return from_json(text, where=storage.describe(path)).bind(storage, directory)


def _storage_of(manifest: Manifest) -> Storage:
    if manifest.storage is None:
        raise PersistError(f"Manifest of step {manifest.step} is not bound to a storage; read it with read_manifest.")
    return manifest.storage


def check_files(manifest: Manifest) -> None:
    """Cheap check: every shard file exists with the size the manifest records."""
    storage = _storage_of(manifest)
    for shard in manifest.shards:
        path = f"{manifest.directory}/{shard.file}"
        try:
            size = storage.size(path)
        except FileNotFoundError as exc:
            raise CheckpointCorruptError(
                f"Checkpoint step {manifest.step}: shard file {storage.describe(path)} is missing."
            ) from exc
        if size != shard.bytes:
            raise CheckpointCorruptError(
                f"Checkpoint step {manifest.step}: shard file {storage.describe(path)} is {size} bytes, the "
                f"manifest says {shard.bytes}."
            )


def _read_verified(manifest: Manifest, rank: int, *, verify: bool, deep: bool = False) -> bytearray:
    storage = _storage_of(manifest)
    shard = manifest.shard(rank)
    path = f"{manifest.directory}/{shard.file}"
    where = storage.describe(path)
    try:
        buf = storage.read_bytes(path)
    except FileNotFoundError as exc:
        raise CheckpointCorruptError(f"Checkpoint step {manifest.step}: shard file {where} is missing.") from exc
    except EOFError as exc:
        raise CheckpointCorruptError(f"Checkpoint step {manifest.step}: {exc}") from exc
    if len(buf) != shard.bytes:
        raise CheckpointCorruptError(
            f"Checkpoint step {manifest.step}: shard file {where} is {len(buf)} bytes, the manifest says {shard.bytes}."
        )
    if verify:
        _check_crc(manifest, shard, buf, where=where, deep=deep)
    return buf


def _check_crc(manifest: Manifest, shard, buf: bytearray, *, where: str, deep: bool) -> None:
    """One crc32 pass: each tensor against its crc32, the file (combined) against the file's crc32.

    Tensor ranges come from the manifest, not from the file's own (possibly damaged) header.
    """
    view = memoryview(buf)
    data_start = shard.bytes - max((t.end for t in shard.tensors), default=0)
    file_crc = checksum.crc32(view[:data_start])
    expected_begin = 0
    bad: list[str] = []
    for entry in shard.tensors:
        if entry.begin != expected_begin:
            raise CheckpointCorruptError(
                f"Checkpoint step {manifest.step}: the manifest's byte ranges for {where} are not contiguous at "
                f"tensor {entry.name!r}; the manifest is damaged."
            )
        crc = checksum.crc32(view[data_start + entry.begin:data_start + entry.end])
        file_crc = checksum.crc32_combine(file_crc, crc, entry.nbytes)
        expected_begin = entry.end
        if crc != entry.crc32:
            bad.append(f"{entry.name!r} in {where} fails its crc32 (got {crc:08x}, manifest {entry.crc32:08x})")
            if not deep:
                break
    if bad:
        raise CheckpointCorruptError(
            f"Checkpoint step {manifest.step}: tensor {'; tensor '.join(bad)}; the file is corrupt."
        )
    if file_crc != shard.crc32:
        raise CheckpointCorruptError(
            f"Checkpoint step {manifest.step}: shard file {where} fails its crc32 (got {file_crc:08x}, manifest "
            f"{shard.crc32:08x}) though every tensor matches; its header or metadata is corrupt."
        )


def verify(manifest: Manifest, *, deep: bool = False) -> None:
    """Read every shard file and check its tensors' and its own crc32 (``deep``: report every bad tensor,
    not just the first).

    ``CheckpointCorruptError`` names the file, and the tensor(s) to blame.
    """
    check_files(manifest)
    for shard in manifest.shards:
        _read_verified(manifest, shard.rank, verify=True, deep=deep)


_verify = verify  # parameters named ``verify`` below shadow the function


def _state_from(manifest: Manifest, rank: int, buf: bytearray) -> ShardState:
    storage = _storage_of(manifest)
    shard = manifest.shard(rank)
    where = storage.describe(f"{manifest.directory}/{shard.file}")
    parsed = shardfile.parse(buf, where=where)
    expected = {t.name for t in shard.tensors}
    if set(parsed.tensors) != expected:
        raise CheckpointCorruptError(
            f"Shard file {where} holds tensors {sorted(parsed.tensors)}, the manifest lists {sorted(expected)}."
        )
    tensors = {name: shardfile.tensor_from(buf, parsed, name) for name in sorted(parsed.tensors)}
    meta = shardfile.decode_meta(parsed.metadata, where=where)
    try:
        generation = int(parsed.metadata.get("resilient.generation", manifest.generation))
    except ValueError as exc:
        raise CheckpointCorruptError(f"Shard file {where} has a malformed generation in its metadata.") from exc
    return ShardState(step=manifest.step, generation=generation, meta=meta, tensors=tensors)


def _report_skip(manifest_or_dir: str, step: int, exc: Exception, on_event: Callable[[dict], Any] | None) -> None:
    log.warning("Skipping checkpoint step %d at %s: %s Falling back to an older checkpoint.", step, manifest_or_dir, exc)
    event = events.emit("ckpt.verify_failed", source="persisted", step=step, location=manifest_or_dir, error=str(exc))
    if on_event is not None:
        on_event(event)


def _candidates(storage: Storage, on_event: Callable[[dict], Any] | None):
    """Manifests newest first, skipping (with a warning) partial and damaged ones."""
    for step, directory in reversed(list_checkpoints(storage)):
        if not storage.exists(f"{directory}/{MANIFEST_NAME}"):
            log.info("Ignoring partial checkpoint %s (no manifest).", storage.describe(directory))
            continue
        try:
            manifest = read_manifest(storage, directory)
            if manifest.step != step:
                raise CheckpointCorruptError(
                    f"Manifest {storage.describe(directory)} says step {manifest.step}, its directory says {step}."
                )
            check_files(manifest)
        except CheckpointCorruptError as exc:
            _report_skip(storage.describe(directory), step, exc, on_event)
            continue
        yield manifest


def latest_complete(
    directory: str | Storage,
    *,
    verify: bool = True,
    storage_options: dict | None = None,
    on_event: Callable[[dict], Any] | None = None,
) -> Manifest | None:
    """The newest complete checkpoint under ``directory`` (checksums verified unless ``verify=False``:
    then only manifest and file sizes are checked), or None if there is none."""
    storage = open_storage(directory, **(storage_options or {}))
    for manifest in _candidates(storage, on_event):
        if not verify:
            return manifest
        try:
            _verify(manifest)
        except CheckpointCorruptError as exc:
            _report_skip(manifest.location, manifest.step, exc, on_event)
            continue
        return manifest
    return None


def _split_checkpoint_path(path: str) -> tuple[str, str] | None:
    """(root, step directory) if ``path`` names one checkpoint (its directory or its manifest.json)."""
    trimmed = path.rstrip("/")
    if trimmed.endswith("/" + MANIFEST_NAME):
        trimmed = trimmed[: -len(MANIFEST_NAME) - 1]
    root, _, last = trimmed.rpartition("/")
    if parse_step_dir(last) is not None:
        if not root:
            root = "/" if path.startswith("/") else "."
        return root, last
    return None


def open_checkpoint(path: str, *, storage_options: dict | None = None) -> Manifest:
    """The manifest of the one checkpoint ``path`` names (``.../step-N`` or ``.../step-N/manifest.json``)."""
    split = _split_checkpoint_path(path)
    if split is None:
        raise PersistError(f"{path!r} does not name a checkpoint directory (step-NNNNNNNN) or its manifest.json.")
    root, directory = split
    storage = open_storage(root, **(storage_options or {}))
    return read_manifest(storage, directory)


def is_checkpoint_path(path: str) -> bool:
    return _split_checkpoint_path(path) is not None


def load(
    source: str | Manifest,
    rank: int | None = None,
    *,
    verify: bool = True,
    storage_options: dict | None = None,
    on_event: Callable[[dict], Any] | None = None,
) -> dict[int, ShardState]:
    """Shards of a checkpoint as ``{rank: ShardState}`` (all ranks, or just ``rank``).

    ``source`` is a ``Manifest`` (from ``latest_complete``), the path of one checkpoint, or a persist
    directory (then the newest checkpoint that loads and verifies is used, see ``load_latest``).
    ``CheckpointCorruptError`` if the named checkpoint fails verification.
    """
    if isinstance(source, Manifest):
        manifest = source
    elif isinstance(source, str) and is_checkpoint_path(source):
        manifest = open_checkpoint(source, storage_options=storage_options)
    else:
        found = load_latest(source, rank, storage_options=storage_options, on_event=on_event, verify=verify)
        if found is None:
            where = source.location if isinstance(source, Storage) else source
            raise PersistError(f"No complete checkpoint under {where}; nothing to load.")
        return found[1]
    ranks = [rank] if rank is not None else [s.rank for s in manifest.shards]
    out = {}
    for r in ranks:
        buf = _read_verified(manifest, r, verify=verify)
        out[r] = _state_from(manifest, r, buf)
    return out


def load_latest(
    directory: str | Storage,
    rank: int | None = None,
    *,
    verify: bool = True,
    storage_options: dict | None = None,
    on_event: Callable[[dict], Any] | None = None,
) -> tuple[Manifest, dict[int, ShardState]] | None:
    """Newest checkpoint that loads and verifies, read once: ``(manifest, {rank: ShardState})`` or None."""
    if isinstance(directory, str) and is_checkpoint_path(directory):
        raise PersistError(f"{directory!r} is one checkpoint, not a persist directory; use load() for it.")
    storage = open_storage(directory, **(storage_options or {}))
    for manifest in _candidates(storage, on_event):
        try:
            return manifest, load(manifest, rank, verify=verify)
        except CheckpointCorruptError as exc:
            _report_skip(manifest.location, manifest.step, exc, on_event)
    return None
