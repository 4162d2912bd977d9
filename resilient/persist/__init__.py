"""Durable checkpoints: committed snapshots persisted as safetensors files plus a manifest.

The tier under the in-memory snapshots: for when every copy in memory is gone, and for keeping
checkpoints beyond the job. Local paths are written with temp name + fsync + rename + directory fsync;
URLs with a scheme (``s3://...``) go through fsspec. The manifest, written last, is the commit point.

- ``Persister``: background writer with a bounded queue, ``submit`` / ``persist`` / ``close``; retention.
- ``latest_complete``, ``load``, ``load_latest``, ``verify``: find, check and read checkpoints back;
  ``find_latest`` also reports the damaged ones and can ``set_aside`` them (renamed, never deleted).
- ``clean_leftovers``: remove what killed persists left behind.
- ``write_shard`` / ``commit_manifest``: the two halves of a write, for callers holding only some shards.
"""

from resilient.persist.fs import LocalStorage, Storage, open_storage
from resilient.persist.manifest import Manifest, ShardEntry, TensorEntry, step_dir_name
from resilient.persist.persister import PersistConfig, Persister
from resilient.persist.reader import (
    Found,
    ShardState,
    Skipped,
    find_latest,
    latest_complete,
    list_checkpoints,
    load,
    load_latest,
    open_checkpoint,
    read_manifest,
    set_aside,
    verify,
)
from resilient.persist.retention import apply_retention, clean_leftovers, plan_retention
from resilient.persist.writer import commit_manifest, write_checkpoint, write_shard

__all__ = [
    "Found",
    "LocalStorage",
    "Manifest",
    "PersistConfig",
    "Persister",
    "ShardEntry",
    "ShardState",
    "Skipped",
    "Storage",
    "TensorEntry",
    "apply_retention",
    "clean_leftovers",
    "commit_manifest",
    "find_latest",
    "latest_complete",
    "list_checkpoints",
    "load",
    "load_latest",
    "open_checkpoint",
    "open_storage",
    "plan_retention",
    "read_manifest",
    "set_aside",
    "step_dir_name",
    "verify",
    "write_checkpoint",
    "write_shard",
]
