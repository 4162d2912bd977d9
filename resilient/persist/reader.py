"""Finding, verifying and loading durable checkpoints.

``latest_complete(directory)`` is the newest checkpoint whose manifest is committed and whose files
verify; a corrupt or partial one is skipped with a warning and a ``ckpt.verify_failed`` event, and the
one before it is used. ``load`` reads shards back as ``ShardState`` (tensors view one buffer per file,
no extra copy), checking every tensor's and file's crc32 on the way. ``load_latest`` does both in one read of the
bytes: it tries checkpoints newest first and falls back when one fails verification. ``find_latest`` is
what both use: it also reports the committed checkpoints it skipped, tells "nothing committed" (no
manifest anywhere) from "every committed checkpoint is damaged", and, for the job's own agents, sets the
damaged ones aside (``set_aside``: renamed to ``step-NNNNNNNN.corrupt-<time>-<id>``, never deleted) so
that retention and later readers no longer count them.
"""

from __future__ import annotations

import dataclasses
import time
import uuid
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


@dataclass(frozen=True)
class Skipped:
    """A committed checkpoint (its manifest is there) that failed to read or verify."""

    step: int
    directory: str  # name under the persist directory
    location: str  # full path or URL, for messages
    error: str
    set_aside_as: str | None = None  # where ``set_aside`` moved it (None: left in place)


@dataclass
class Found:
    """What ``find_latest`` found: the newest checkpoint that loads (``manifest`` None: none), its shards when
    asked for (``states``), and the newer committed ones it had to skip."""

    location: str
    manifest: Manifest | None
    states: dict[int, ShardState] | None
    skipped: list[Skipped]

    @property
    def all_damaged(self) -> bool:
        """Committed checkpoints exist but none of them loads (not the same as an empty directory)."""
        return self.manifest is None and bool(self.skipped)

    def damage_report(self) -> str:
        """One sentence per skipped checkpoint: which directory and why."""
        return " ".join(f"{s.location}: {s.error}" for s in self.skipped)

    def require_resumable(self, who: str) -> None:
        """``CheckpointCorruptError`` when every committed checkpoint is damaged (``who``: what cannot resume,
        e.g. ``the job`` or ``rank 3``): a job never starts from scratch over committed work."""
        if self.all_damaged:
            raise CheckpointCorruptError(
                f"Every committed checkpoint in {self.location} is damaged, so {who} cannot resume from it, and the "
                f"job does not start from scratch over committed work. {self.damage_report()} Nothing was changed or "
                f"deleted. "
                f"Repair them or move them out of {self.location} (the newest intact one left is then used), or "
                f"point --persist-dir at a fresh directory to start from scratch."
            )


def _report_skip(location: str, step: int, exc: Exception, on_event: Callable[[dict], Any] | None,
                 older: str | None) -> None:
    then = (f"Trying the next older checkpoint, {older}." if older is not None
            else "There is no older committed checkpoint to fall back to.")
    log.warning("Skipping checkpoint step %d at %s: %s %s", step, location, exc, then)
    event = events.emit("ckpt.verify_failed", source="persisted", step=step, location=location, error=str(exc))
    if on_event is not None:
        on_event(event)


SET_ASIDE_MARK = ".corrupt-"


def set_aside(storage: Storage, directory: str, reason: str, *, step: int | None = None) -> str | None:
    """Rename the damaged committed checkpoint ``directory`` to ``<directory>.corrupt-<UTC time>-<random>``, a
    name that readers, retention and ``clean_leftovers`` never count or delete; returns its new location
    (None: not moved). Nothing is ever deleted here.

    Safe to call from several agents at once: the rename is atomic and the targets differ, so one wins and
    the others find the directory gone (fine: it is set aside already). A directory whose manifest is gone
    is left alone: retention removes a checkpoint's manifest first, so that is a deletion in progress, not
    damage. Storages without an atomic rename (object stores) leave it in place with a warning."""
    where = storage.describe(directory)
    if not storage.atomic_rename:
        log.warning("Checkpoint %s is damaged: %s It cannot be set aside on %s (no atomic rename): move or delete "
                    "it yourself; until then retention counts it as one of the checkpoints it keeps.",
                    where, reason, storage.location)
        return None
    if not storage.exists(f"{directory}/{MANIFEST_NAME}"):
        return None
    target = (f"{directory}{SET_ASIDE_MARK}{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-"
              f"{uuid.uuid4().hex[:6]}")
    try:
        storage.rename(directory, target)
    except FileNotFoundError:
        log.info("Damaged checkpoint %s was already set aside or removed by another reader.", where)
        return None
    except OSError as exc:
        log.warning("Checkpoint %s is damaged: %s It could not be set aside (%s): move or delete it yourself; "
                    "until then retention counts it as one of the checkpoints it keeps.", where, reason, exc)
        return None
    try:
        storage.fsync_dir("")
    except OSError as exc:
        log.debug("fsync of %s after setting %s aside failed: %s", storage.location, where, exc)
    moved = storage.describe(target)
    log.warning("Checkpoint %s is damaged: %s It was set aside as %s (renamed, not deleted): no job, reader or "
                "retention uses or removes it. Look at it with `resilient inspect %s`, then delete it or move it "
                "elsewhere.", where, reason, moved, moved)
    events.emit("ckpt.set_aside", step=step, location=where, moved_to=moved, error=reason)
    return moved


def set_aside_dirs(storage: Storage) -> list[str]:
    """Names of the checkpoint directories ``set_aside`` renamed, oldest step first."""
    found = []
    for name in storage.list_dir(""):
        head, mark, _ = name.partition(SET_ASIDE_MARK)
        if mark and parse_step_dir(head) is not None:
            found.append((parse_step_dir(head), name))
    return [name for _, name in sorted(found)]


def committed_dirs(directory: str | Storage, *, quiet: bool = False) -> list[tuple[int, str]]:
    """(step, directory) of every checkpoint with a manifest (complete or damaged), newest first. A
    directory without one is a persist that never committed: ignored (``clean_leftovers`` removes it; said at
    INFO unless ``quiet``)."""
    storage = open_storage(directory)
    out = []
    for step, directory in reversed(list_checkpoints(storage)):
        if storage.exists(f"{directory}/{MANIFEST_NAME}"):
            out.append((step, directory))
        elif not quiet:
            log.info("Ignoring partial checkpoint %s (no manifest).", storage.describe(directory))
    return out


def readable(storage: Storage, step: int, name: str) -> Manifest:
    """The manifest of checkpoint directory ``name`` (of ``step``), checked to name that step and to list files
    of the sizes they have (no crc32 pass); ``CheckpointCorruptError`` saying what is wrong otherwise."""
    manifest = read_manifest(storage, name)
    if manifest.step != step:
        raise CheckpointCorruptError(
            f"Manifest {storage.describe(name)} says step {manifest.step}, its directory says {step}."
        )
    check_files(manifest)
    return manifest


def first_readable(storage: Storage, committed: list[tuple[int, str]], *,
                   skip_unreadable: bool = False) -> Manifest | None:
    """The first of ``committed`` ((step, directory), newest first) that is ``readable``; None when none is.
    ``skip_unreadable``: an ``OSError`` reading one is skipped too (else raised)."""
    skipped = (CheckpointCorruptError, OSError) if skip_unreadable else CheckpointCorruptError
    for step, name in committed:
        try:
            return readable(storage, step, name)
        except skipped:
            continue
    return None


def newest_readable(directory: str | Storage) -> Manifest | None:
    """The newest checkpoint whose manifest reads and whose files have their recorded sizes (no crc32 pass,
    no logging): what is on disk, for status lines and messages. None when there is none."""
    storage = open_storage(directory)
    return first_readable(storage, committed_dirs(storage, quiet=True))


def what_stays(directory: str | Storage, shown_as: str) -> str:
    """After a failed persist: which checkpoint stays the latest, if any (a sentence, for messages).
    ``shown_as``: the persist directory as the user gave it."""
    try:
        newest = newest_readable(directory)
    except (OSError, PersistError) as exc:
        return f"whatever was committed before is unchanged ({shown_as} cannot be listed: {exc})."
    if newest is None:
        return f"there is no earlier checkpoint in {shown_as}, so nothing is persisted yet."
    return f"earlier checkpoints are unchanged and the newest of them, step {newest.step}, stays the latest."


def find_latest(
    directory: str | Storage,
    rank: int | None = None,
    *,
    load_states: bool = False,
    verify: bool = True,
    storage_options: dict | None = None,
    on_event: Callable[[dict], Any] | None = None,
    set_aside_damaged: bool = False,
) -> Found:
    """The newest committed checkpoint that reads (manifest, file sizes and, with ``verify``, every crc32;
    with ``load_states`` also its shards, one read of the bytes), and the newer ones that did not.

    ``set_aside_damaged`` (for the job's own agents, never for read-only tools): once an older checkpoint
    loads, each newer damaged one is ``set_aside``. When none loads nothing is moved, so an operator decides
    (``Found.all_damaged``). Errors other than damage (a permission error, say) are raised as they are."""
    storage = open_storage(directory, **(storage_options or {}))
    committed = committed_dirs(storage)
    skipped: list[Skipped] = []
    for i, (step, name) in enumerate(committed):
        older = storage.describe(committed[i + 1][1]) if i + 1 < len(committed) else None
        states = None
        try:
            manifest = readable(storage, step, name)
            if load_states:
                states = load(manifest, rank, verify=verify)
            elif verify:
                _verify(manifest)
        except CheckpointCorruptError as exc:
            skipped.append(Skipped(step, name, storage.describe(name), str(exc)))
            _report_skip(storage.describe(name), step, exc, on_event, older)
            continue
        if set_aside_damaged:
            skipped = [dataclasses.replace(s, set_aside_as=set_aside(storage, s.directory, s.error, step=s.step))
                       for s in skipped]
        return Found(storage.location, manifest, states, skipped)
    return Found(storage.location, None, None, skipped)


def find_resumable(directory: str | Storage, who: str, **options: Any) -> Found:
    """``find_latest`` for a job about to resume (``who``: ``the job``, ``rank 3``, for messages): a directory
    that cannot be read is a ``PersistError``, and so is one whose every committed checkpoint is damaged
    (``Found.require_resumable``); an empty one gives ``Found.manifest`` None."""
    location = directory.location if isinstance(directory, Storage) else directory
    try:
        found = find_latest(directory, **options)
    except OSError as exc:
        raise PersistError(
            f"The persist directory {location} cannot be read ({type(exc).__name__}: {exc}), so {who} cannot tell "
            f"whether it holds a checkpoint to resume from. Fix its permissions or storage, or point --persist-dir "
            f"at another directory."
        ) from exc
    found.require_resumable(who)
    return found


def latest_complete(
    directory: str | Storage,
    *,
    verify: bool = True,
    storage_options: dict | None = None,
    on_event: Callable[[dict], Any] | None = None,
) -> Manifest | None:
    """The newest complete checkpoint under ``directory`` (checksums verified unless ``verify=False``:
    then only manifest and file sizes are checked), or None if there is none (``find_latest`` tells an
    empty directory from one whose checkpoints are all damaged)."""
    return find_latest(directory, verify=verify, storage_options=storage_options, on_event=on_event).manifest


def split_checkpoint_path(path: str) -> tuple[str, str] | None:
    """(root, step directory) if ``path`` names one checkpoint (its directory or its manifest.json; a set-aside
    ``step-N.corrupt-...`` directory counts when named)."""
    trimmed = path.rstrip("/")
    if trimmed.endswith("/" + MANIFEST_NAME):
        trimmed = trimmed[: -len(MANIFEST_NAME) - 1]
    root, _, last = trimmed.rpartition("/")
    if parse_step_dir(last.partition(SET_ASIDE_MARK)[0]) is not None:  # a set-aside one too, named explicitly
        if not root:
            root = "/" if path.startswith("/") else "."
        return root, last
    return None


def open_checkpoint(path: str, *, storage_options: dict | None = None) -> Manifest:
    """The manifest of the one checkpoint ``path`` names (``.../step-N`` or ``.../step-N/manifest.json``)."""
    split = split_checkpoint_path(path)
    if split is None:
        raise PersistError(f"{path!r} does not name a checkpoint directory (step-NNNNNNNN) or its manifest.json.")
    root, directory = split
    storage = open_storage(root, **(storage_options or {}))
    return read_manifest(storage, directory)


def is_checkpoint_path(path: str) -> bool:
    return split_checkpoint_path(path) is not None


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
    found = find_latest(directory, rank, load_states=True, verify=verify, storage_options=storage_options,
                        on_event=on_event)
    if found.manifest is None:
        return None
    return found.manifest, found.states
