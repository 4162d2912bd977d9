"""Which checkpoints to delete, and removing them and the leftovers of killed persists.

``plan_retention`` is the pure decision: keep the newest ``keep`` complete checkpoints; delete older
complete ones, and partial ones older than the newest complete one. Nothing newer than the newest
complete checkpoint is touched (it may be a persist in progress), and nothing is deleted before a
complete checkpoint exists, so an older checkpoint goes only after a newer one is complete.

Deleting a checkpoint removes its manifest first (it turns into a partial one, which no reader trusts),
then its files; a kill in between leaves a partial directory that ``clean_leftovers`` removes.

A checkpoint counts as complete here when its manifest is there (verifying every byte at each persist
would cost a full read). The job's readers set a damaged one aside (``reader.set_aside`` renames it to
``step-N.corrupt-...``), which is no checkpoint name: neither counted nor deleted here, nor by
``clean_leftovers``; removing it is the operator's decision.
"""

from __future__ import annotations

from collections.abc import Sequence

from resilient import failpoints as fp_mod
from resilient.errors import ConfigError
from resilient.logs import get_logger
from resilient.persist.fs import TEMP_SUFFIX, Storage, open_storage
from resilient.persist.manifest import MANIFEST_NAME, parse_step_dir

log = get_logger(__name__)


def plan_retention(checkpoints: Sequence[tuple[int, bool]], keep: int) -> list[int]:
    """Steps to delete, oldest first, given ``(step, complete)`` pairs and how many complete ones to keep."""
    if keep < 1:
        raise ConfigError(f"Retention must keep at least 1 checkpoint, got keep={keep}.")
    complete = sorted(step for step, ok in checkpoints if ok)
    if not complete:
        return []
    newest = complete[-1]
    kept = set(complete[-keep:])
    return sorted(step for step, ok in checkpoints if (ok and step not in kept) or (not ok and step < newest))


def delete_checkpoint(storage: Storage, directory: str, *, failpoints: fp_mod.Registry | None = None) -> None:
    """Remove one checkpoint: manifest first (it stops being complete), then the rest."""
    fp = failpoints or fp_mod.default()
    storage.remove(f"{directory}/{MANIFEST_NAME}")
    storage.fsync_dir(directory)
    fp.hit("persist.retention.after_unlink_manifest", directory=directory)
    storage.remove_tree(directory)


def apply_retention(storage: Storage, keep: int, *, failpoints: fp_mod.Registry | None = None) -> list[int]:
    """Delete what ``plan_retention`` says; returns the deleted steps."""
    dirs = {}
    status = []
    for name in storage.list_dir(""):
        step = parse_step_dir(name)
        if step is None:
            continue
        dirs[step] = name
        status.append((step, storage.exists(f"{name}/{MANIFEST_NAME}")))
    doomed = plan_retention(status, keep)
    for step in doomed:
        delete_checkpoint(storage, dirs[step], failpoints=failpoints)
    if doomed:
        storage.fsync_dir("")
        log.info("Retention (keep %d) deleted checkpoint steps %s.", keep, doomed)
    return doomed


def clean_leftovers(directory: str | Storage, *, storage_options: dict | None = None,
                    up_to_step: int | None = None) -> list[str]:
    """Remove what killed persists left behind: temporary files, and checkpoint directories without a
    manifest. Returns the removed paths. Call it when no persist is in flight (e.g. at start-up), or pass
    ``up_to_step``: only the directories of that step and older ones are looked at (a newer one may be a
    persist another host is writing right now)."""
    storage = open_storage(directory, **(storage_options or {}))
    removed: list[str] = []
    for name in storage.list_dir(""):
        step = parse_step_dir(name)
        if step is None:
            if name.startswith(".") and name.endswith(TEMP_SUFFIX):
                storage.remove(name)
                removed.append(storage.describe(name))
            continue
        if up_to_step is not None and step > up_to_step:
            continue
        if not storage.exists(f"{name}/{MANIFEST_NAME}"):
            storage.remove_tree(name)
            removed.append(storage.describe(name))
            continue
        for entry in storage.list_dir(name):
            if entry.startswith(".") and entry.endswith(TEMP_SUFFIX):
                storage.remove(f"{name}/{entry}")
                removed.append(storage.describe(f"{name}/{entry}"))
    if removed:
        storage.fsync_dir("")
        log.info("Removed %d leftover(s) of unfinished persists under %s.", len(removed), storage.location)
    return removed
