"""Writing one durable checkpoint: shard files, then the manifest as the commit point.

The sequence, each step followed by a named failpoint (``resilient.failpoints``)::

    per shard (in parallel):  write temp  -> persist.shard.mid_write (after the first tensor)
                                          -> persist.shard.after_write
                              fsync       -> persist.shard.after_fsync
                              rename      -> persist.shard.after_rename
    fsync step directory                  -> persist.shards.after_dir_fsync
    manifest: write temp                  -> persist.manifest.after_write
              fsync                       -> persist.manifest.after_fsync
              rename                      -> persist.manifest.after_rename   (committed from here on)
    fsync step directory                  -> persist.after_commit

A kill at any point before ``persist.manifest.after_rename`` leaves the previous checkpoint as the latest
complete one (plus leftovers that ``clean_leftovers`` removes); from that point on the new one is.

``write_shard`` and ``commit_manifest`` are public so that a caller holding only some shards (one agent
per host) can write its own files and let one writer commit the manifest; ``write_checkpoint`` does
the whole sequence for a caller that holds every shard.
"""

from __future__ import annotations

import importlib.metadata
import time
import zlib
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol

import torch

from resilient import failpoints as fp_mod
from resilient.errors import CheckpointCorruptError, PersistError
from resilient.logs import get_logger
from resilient.persist import checksum, shardfile
from resilient.persist.fs import Storage
from resilient.persist.manifest import (
    MANIFEST_NAME,
    Manifest,
    ShardEntry,
    TensorEntry,
    file_order,
    from_json,
    shard_file_name,
    step_dir_name,
)
from resilient.persist.reader import set_aside

log = get_logger(__name__)

class ShardLike(Protocol):
    """What a shard snapshot provides (``resilient.store.Snapshot`` and ``ShardState`` both do)."""

    step: int
    generation: int
    meta: bytes
    tensors: Mapping[str, torch.Tensor]


def resilient_version() -> str:
    import resilient

    version = getattr(resilient, "__version__", None)
    if version:
        return str(version)
    try:
        return importlib.metadata.version("resilient")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def write_shard(
    storage: Storage,
    directory: str,
    rank: int,
    shard: ShardLike,
    *,
    failpoints: fp_mod.Registry | None = None,
) -> ShardEntry:
    """Write ``rank``'s shard file into ``directory`` (temp name, fsync, rename); its manifest entry."""
    fp = failpoints or fp_mod.default()
    meta = bytes(shard.meta)
    metadata = {
        "format": "pt",
        "resilient.step": str(int(shard.step)),
        "resilient.generation": str(int(shard.generation)),
        "resilient.rank": str(int(rank)),
        shardfile.META_KEY: shardfile.encode_meta(meta),
    }
    header, planned = shardfile.layout(dict(shard.tensors), metadata)
    name = shard_file_name(rank)
    writer = storage.writer(f"{directory}/{name}")
    try:
        file_crc = checksum.crc32(header)
        writer.write(header)
        entries = []
        for index, item in enumerate(planned):
            crc = 0
            data = item.data
            for start in range(0, data.nbytes, checksum.CHUNK):
                chunk = data[start:start + checksum.CHUNK]
                crc = zlib.crc32(chunk, crc)
                writer.write(chunk)
            file_crc = checksum.crc32_combine(file_crc, crc, data.nbytes)
            entries.append(TensorEntry(item.name, item.dtype, item.shape, item.begin, item.end, crc))
            if index == 0:
                fp.hit("persist.shard.mid_write", rank=rank, step=shard.step)
        fp.hit("persist.shard.after_write", rank=rank, step=shard.step)
        writer.sync()
        fp.hit("persist.shard.after_fsync", rank=rank, step=shard.step)
        writer.publish()
        fp.hit("persist.shard.after_rename", rank=rank, step=shard.step)
    except BaseException:
        writer.abort()
        raise
    size = len(header) + (planned[-1].end if planned else 0)
    return ShardEntry(rank=rank, file=name, bytes=size, crc32=file_crc, meta_bytes=len(meta),
                      tensors=file_order(entries))


def commit_manifest(
    storage: Storage,
    directory: str,
    manifest: Manifest,
    *,
    failpoints: fp_mod.Registry | None = None,
) -> Manifest:
    """Make the shard files durable and publish the manifest: the checkpoint is complete on return."""
    fp = failpoints or fp_mod.default()
    storage.fsync_dir(directory)
    fp.hit("persist.shards.after_dir_fsync", step=manifest.step)
    writer = storage.writer(f"{directory}/{MANIFEST_NAME}")
    try:
        writer.write(manifest.to_json().encode())
        fp.hit("persist.manifest.after_write", step=manifest.step)
        writer.sync()
        fp.hit("persist.manifest.after_fsync", step=manifest.step)
        writer.publish()
    except BaseException:
        writer.abort()
        raise
    fp.hit("persist.manifest.after_rename", step=manifest.step)
    storage.fsync_dir(directory)
    fp.hit("persist.after_commit", step=manifest.step)
    return manifest.bind(storage, directory)


def existing_manifest(storage: Storage, directory: str) -> Manifest | None:
    """The committed manifest in ``directory`` (None: there is none); ``CheckpointCorruptError`` when there is
    one that does not parse."""
    if not storage.exists(f"{directory}/{MANIFEST_NAME}"):
        return None
    with storage.open_read(f"{directory}/{MANIFEST_NAME}") as fh:
        text = fh.read()
    return from_json(text, where=storage.describe(f"{directory}/{MANIFEST_NAME}")).bind(storage, directory)


def _set_aside_damaged(storage: Storage, directory: str, step: int) -> None:
    """Step ``step`` was committed once but its manifest no longer parses: set it aside (never deleted) before
    the step is written again; ``PersistError`` when it can be neither moved nor found gone."""
    if set_aside(storage, directory, "Its manifest does not parse.", step=step) is None and \
            storage.exists(f"{directory}/{MANIFEST_NAME}"):
        raise PersistError(
            f"Cannot persist step {step}: {storage.describe(directory)} holds a damaged checkpoint of that step "
            f"(its manifest does not parse) that could not be set aside. Move it out of {storage.location}; "
            f"later steps persist as usual."
        )


def write_checkpoint(
    storage: Storage,
    step: int,
    generation: int,
    world_size: int,
    shards: Mapping[int, ShardLike],
    *,
    job: str,
    failpoints: fp_mod.Registry | None = None,
    max_workers: int = 4,
    thread_init: Callable[[], None] | None = None,
) -> Manifest:
    """Write every shard of ``step`` and commit its manifest; returns the bound manifest.

    If ``step`` already has a committed, readable manifest it is returned unchanged (the same step is the
    same state). On failure before the commit, everything this call wrote is removed and the error is
    re-raised; older checkpoints are never touched here.
    """
    check_shards(step, world_size, shards)
    directory = step_dir_name(step)
    try:
        existing = existing_manifest(storage, directory)
    except CheckpointCorruptError:
        existing = None
        _set_aside_damaged(storage, directory, step)
    if existing is not None:
        log.info("Checkpoint step %d already exists at %s; not writing it again.", step, existing.location)
        return existing
    if storage.exists(directory):
        storage.remove_tree(directory)  # leftovers of an earlier, unfinished attempt at this step
    storage.makedirs(directory)
    storage.fsync_dir("")
    committed = False
    try:
        workers = max(1, min(max_workers, len(shards)))
        with ThreadPoolExecutor(workers, thread_name_prefix="persist-shard", initializer=thread_init) as pool:
            futures = {rank: pool.submit(write_shard, storage, directory, rank, shards[rank], failpoints=failpoints)
                       for rank in sorted(shards)}
            errors = []
            entries = []
            for rank, future in futures.items():
                try:
                    entries.append(future.result())
                except BaseException as exc:  # collect all, re-raise the first after the others stop
                    errors.append(exc)
            if errors:
                raise errors[0]
        manifest = Manifest(
            job=job,
            step=step,
            generation=generation,
            world_size=world_size,
            created=time.time(),
            torch_version=torch.__version__,
            resilient_version=resilient_version(),
            shards=tuple(entries),
        )
        committed_manifest = commit_manifest(storage, directory, manifest, failpoints=failpoints)
        committed = True
        return committed_manifest
    except BaseException:
        if not committed and not storage.exists(f"{directory}/{MANIFEST_NAME}"):
            _discard(storage, directory)
        raise


def _discard(storage: Storage, directory: str) -> None:
    try:
        storage.remove_tree(directory)
    except OSError as exc:
        log.warning("Could not remove the unfinished checkpoint %s (%s); clean_leftovers will retry.",
                    storage.describe(directory), exc)


def check_shards(step: int, world_size: int, shards: Mapping[int, ShardLike]) -> None:
    """Refuse a set of shards that is not exactly ranks 0..world_size-1 of one step."""
    if world_size < 1:
        raise PersistError(f"Cannot persist step {step} with world size {world_size}; it must be at least 1.")
    ranks = sorted(shards)
    if ranks != list(range(world_size)):
        raise PersistError(
            f"Cannot persist step {step}: shards are given for ranks {ranks}, but a checkpoint of world size "
            f"{world_size} needs exactly ranks 0..{world_size - 1}."
        )
    steps = {rank: int(s.step) for rank, s in shards.items()}
    if any(s != step for s in steps.values()):
        raise PersistError(
            f"Cannot persist step {step}: the shards are from steps {steps}; a checkpoint never mixes steps."
        )
