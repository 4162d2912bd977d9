"""``resilient inspect`` and ``resilient export``: look into and take state out of durable checkpoints.

``inspect_main(argv)`` prints a checkpoint's manifest (step, generation, world size, shards, sizes) and
verifies every tensor's and every file's crc32; given a persist directory it does so for every
checkpoint in it. Exit 0 when all verify, 1 (with a message naming the file and tensor) when one does not.

``export_main(argv)`` writes one shard's tensors as a plain safetensors file or a ``torch.load``-able
state dict. ``--only model`` keeps the keys under ``model/`` and strips that prefix, giving a state dict
that ``model.load_state_dict`` accepts. Given a persist directory it exports the newest checkpoint and
refuses (exit 1) when that one is damaged rather than fall back silently: name an older checkpoint to
export it. The output must lie outside the persist directory and is not replaced unless --force (exit 2).

Both return the exit status; inspect also lists the checkpoints a job set aside as damaged; the
``resilient`` CLI wires them up as subcommands.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import tempfile

import torch

from resilient.errors import CheckpointCorruptError, PersistError, ResilientError
from resilient.persist import reader
from resilient.persist.fs import has_scheme, open_storage
from resilient.persist.manifest import MANIFEST_NAME, Manifest


def _human(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


def _print_manifest(manifest: Manifest, *, tensors: bool, out) -> None:
    created = datetime.datetime.fromtimestamp(manifest.created, datetime.timezone.utc).isoformat(timespec="seconds")
    print(f"checkpoint {manifest.location}", file=out)
    print(f"  job {manifest.job}  step {manifest.step}  generation {manifest.generation}  "
          f"world size {manifest.world_size}  created {created}", file=out)
    print(f"  torch {manifest.torch_version}  resilient {manifest.resilient_version}  "
          f"total {_human(manifest.total_bytes)} ({manifest.total_bytes} bytes)", file=out)
    print(f"  {'rank':>4}  {'file':<24} {'bytes':>14}  {'tensors':>7}  {'meta':>8}  crc32", file=out)
    for shard in manifest.shards:
        print(f"  {shard.rank:>4}  {shard.file:<24} {shard.bytes:>14}  {len(shard.tensors):>7}  "
              f"{shard.meta_bytes:>8}  {shard.crc32:08x}", file=out)
        if tensors:
            for t in shard.tensors:
                print(f"        {t.name:<40} {t.dtype:<5} {list(t.shape)!s:<20} {t.nbytes:>12}  crc32 {t.crc32:08x}",
                      file=out)


def _inspect_one(manifest: Manifest, args, out) -> bool:
    _print_manifest(manifest, tensors=args.tensors, out=out)
    if args.no_verify:
        print("  not verified (--no-verify)", file=out)
        return True
    error = _check_verifies(manifest, args)
    if error is not None:
        print(f"  CORRUPT: {error}", file=out)
        print(f"error: checkpoint step {manifest.step} at {manifest.location} is corrupt: {error}", file=sys.stderr)
        return False
    print("  verified: every tensor's and every file's crc32 match", file=out)
    return True


def _check_verifies(manifest: Manifest, args) -> str | None:
    """None when ``manifest``'s files verify (or --no-verify), else the error."""
    if args.no_verify:
        return None
    try:
        reader.verify(manifest, deep=True)
    except PersistError as exc:
        return str(exc)
    return None


def _local_path(path: str) -> str | None:
    """``path`` on this machine's file system (a ``file://`` URL without its scheme); None for a remote URL."""
    if path.startswith("file://"):
        return path[len("file://"):]
    return None if has_scheme(path) else path


def _listed_manifest(storage, directory: str) -> tuple[Manifest | None, PersistError | None, bool]:
    """A listed checkpoint directory's manifest: ``(manifest, None, False)``, or ``(None, error, partial)`` when it
    does not read (``partial``: there is no manifest, a persist that never committed; else it is damaged)."""
    try:
        return reader.read_manifest(storage, directory), None, False
    except PersistError as exc:
        return None, exc, not storage.exists(f"{directory}/{MANIFEST_NAME}")


def _missing(path: str) -> str | None:
    """Why a local ``path`` cannot be read as a persist directory or checkpoint (None: it can, or a URL)."""
    local = _local_path(path)
    if local is None:
        return None
    if not os.path.exists(local):
        return (f"{path} does not exist; give a persist directory (--persist-dir) or one checkpoint in it "
                f"(…/step-NNNNNNNN).")
    if not os.path.isdir(local) and not reader.is_checkpoint_path(local):
        return f"{path} is a file, not a persist directory or a checkpoint directory (…/step-NNNNNNNN)."
    return None


def _inspect_dir_json(storage, args, out) -> int:
    entries, ok = [], True
    for step, directory in reader.list_checkpoints(storage):
        entry = {"step": step, "directory": directory, "location": storage.describe(directory), "status": None,
                 "error": None, "manifest": None}
        entries.append(entry)
        manifest, exc, partial = _listed_manifest(storage, directory)
        if manifest is None:
            entry.update(status="partial" if partial else "corrupt", error=str(exc))
            ok = ok and partial
            continue
        entry["manifest"] = manifest.to_dict()
        error = _check_verifies(manifest, args)
        entry.update(status="corrupt" if error else "not verified" if args.no_verify else "verified", error=error)
        ok = ok and error is None
    for name in reader.set_aside_dirs(storage):
        entries.append({"step": None, "directory": name, "location": storage.describe(name), "status": "set aside",
                        "error": None, "manifest": None})
    json.dump(entries, out, indent=1)
    out.write("\n")
    for entry in entries:
        if entry["status"] == "corrupt":
            print(f"error: checkpoint step {entry['step']} at {entry['location']} is corrupt: {entry['error']}",
                  file=sys.stderr)
    return 0 if ok else 1


def inspect_main(argv: list[str] | None = None, *, out=None) -> int:
    parser = argparse.ArgumentParser(prog="resilient inspect", description=__doc__.split("\n\n")[1])
    parser.add_argument("path", help="a checkpoint (…/step-NNNNNNNN or its manifest.json) or a persist directory")
    parser.add_argument("--tensors", action="store_true", help="list every tensor of every shard")
    parser.add_argument("--no-verify", action="store_true", help="print the manifest only, read no shard bytes")
    parser.add_argument("--json", action="store_true",
                        help="JSON: one checkpoint's manifest; for a persist directory, a list with each checkpoint's "
                             "status (verified, not verified, corrupt, partial, set aside), error and manifest")
    args = parser.parse_args(argv)
    out = out or sys.stdout
    try:
        missing = _missing(args.path)
        if missing is not None:
            print(f"error: {missing}", file=sys.stderr)
            return 1
        if reader.is_checkpoint_path(args.path):
            manifest = reader.open_checkpoint(args.path)
            if args.json:
                out.write(manifest.to_json())
                error = _check_verifies(manifest, args)
                if error is not None:
                    print(f"error: checkpoint step {manifest.step} at {manifest.location} is corrupt: {error}",
                          file=sys.stderr)
                    return 1
                return 0
            return 0 if _inspect_one(manifest, args, out) else 1
        storage = open_storage(args.path)
        if args.json:
            return _inspect_dir_json(storage, args, out)
        checkpoints = reader.list_checkpoints(storage)
        aside = reader.set_aside_dirs(storage)
        if not checkpoints and not aside:
            print(f"error: no checkpoint (step-NNNNNNNN directory) under {storage.location}", file=sys.stderr)
            return 1
        ok = True
        for step, directory in checkpoints:
            manifest, exc, partial = _listed_manifest(storage, directory)
            if manifest is None:
                print(f"{'partial' if partial else 'CORRUPT'}: {storage.describe(directory)}: {exc}", file=out)
                if not partial:
                    print(f"error: checkpoint step {step} is corrupt: {exc}", file=sys.stderr)
                    ok = False
                continue
            ok = _inspect_one(manifest, args, out) and ok
        for name in aside:
            print(f"set aside: {storage.describe(name)} (found damaged by a job and renamed; no job uses it: inspect "
                  f"it, then delete it or move it away)", file=out)
        return 0 if ok else 1
    except (ResilientError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


def _select(tensors: dict[str, torch.Tensor], only: str | None) -> dict[str, torch.Tensor]:
    if only is None:
        return {name: t.clone() for name, t in tensors.items()}
    prefix = only.rstrip("/") + "/"
    picked = {name[len(prefix):]: t.clone() for name, t in tensors.items() if name.startswith(prefix)}
    if not picked:
        prefixes = sorted({name.split("/", 1)[0] for name in tensors if "/" in name})
        raise PersistError(f"No tensor key starts with {prefix!r}; the shard's key prefixes are {prefixes}.")
    return picked


EXIT_USAGE = 2


class _Refused(Exception):
    """A usage error of ``resilient export`` (exit 2): the output path is not acceptable."""


def _check_out(path: str, out_path: str, *, force: bool) -> None:
    """Refuse an output inside the persist directory being read (it could overwrite committed files: a shard
    of the very checkpoint, or of another one), a directory, and an existing file unless ``force``."""
    if os.path.isdir(out_path):
        raise _Refused(f"The output {out_path} is a directory; give a file path (e.g. "
                       f"{out_path.rstrip('/')}/model.pt).")
    local = _local_path(path)
    if local is not None:
        split = reader.split_checkpoint_path(local)
        tree = os.path.realpath(split[0] if split else local)  # the persist directory, also for one checkpoint
        target = os.path.realpath(out_path)
        if os.path.commonpath([tree, target]) == tree:
            raise _Refused(
                f"The output {out_path} is inside the persist directory {tree} being read"
                f"{f' (it resolves to {target})' if os.path.abspath(out_path) != target else ''}; writing it there "
                f"could overwrite committed checkpoint files. Give an output path outside {tree}."
            )
    if os.path.lexists(out_path) and not force:
        raise _Refused(f"The output {out_path} exists; nothing was written. Pass --force to replace it, or give "
                       f"another path.")


def _latest_for_export(path: str, out_path: str) -> tuple[Manifest, list[tuple[int, str]]]:
    """The newest committed checkpoint under the persist directory ``path``, if its manifest and file sizes
    check (a damaged newest one is refused: never a silent fallback to an older one), and the committed
    checkpoints, newest first."""
    storage = open_storage(path)
    committed = reader.committed_dirs(storage)
    if not committed:
        raise PersistError(f"No complete checkpoint under {storage.location}; nothing to export.")
    try:
        return reader.readable(storage, *committed[0]), committed
    except CheckpointCorruptError as exc:
        raise _newest_damaged(storage, committed, exc, out_path) from exc


def _newest_damaged(storage, committed: list[tuple[int, str]], exc: Exception, out_path: str) -> PersistError:
    """The refusal to export a persist directory whose newest checkpoint is damaged, naming an older one."""
    step, name = committed[0]
    older = reader.first_readable(storage, committed[1:], skip_unreadable=True)
    hint = (f"The newest older one whose manifest reads is step {older.step}: export it by naming it, "
            f"`resilient export {older.location} {out_path}`." if older is not None
            else "No older checkpoint there has a readable manifest either.")
    return PersistError(
        f"The newest checkpoint under {storage.location}, step {step} ({storage.describe(name)}), is damaged: "
        f"{exc} Nothing was exported: export of a persist directory means its newest checkpoint and does not "
        f"fall back to an older one by itself. {hint}"
    )


def export_main(argv: list[str] | None = None, *, out=None) -> int:
    parser = argparse.ArgumentParser(prog="resilient export", description=__doc__.split("\n\n")[2])
    parser.add_argument("path", help="a checkpoint (…/step-NNNNNNNN) or a persist directory (its newest checkpoint; "
                                     "refused when that one is damaged)")
    parser.add_argument("out", help="output file (outside the checkpoint directory; not replaced unless --force)")
    parser.add_argument("--rank", type=int, default=0, help="which shard to export (default 0)")
    parser.add_argument("--format", choices=("safetensors", "torch"), default=None,
                        help="default: torch for .pt/.pth/.bin, safetensors otherwise")
    parser.add_argument("--only", default=None, metavar="PREFIX",
                        help="keep keys under PREFIX/ and strip it (e.g. --only model gives a model state_dict)")
    parser.add_argument("--no-verify", action="store_true", help="skip the checksum check")
    parser.add_argument("--force", action="store_true", help="replace OUT if it exists")
    args = parser.parse_args(argv)
    out = out or sys.stdout
    fmt = args.format or ("torch" if args.out.endswith((".pt", ".pth", ".bin")) else "safetensors")
    try:
        missing = _missing(args.path)
        if missing is not None:
            raise PersistError(missing)
        _check_out(args.path, args.out, force=args.force)
        committed = None  # the persist directory's checkpoints, when ``path`` is one
        if reader.is_checkpoint_path(args.path):
            manifest = reader.open_checkpoint(args.path)
        else:
            manifest, committed = _latest_for_export(args.path, args.out)
        if args.rank not in {s.rank for s in manifest.shards}:
            raise PersistError(f"Checkpoint step {manifest.step} has ranks 0..{manifest.world_size - 1}; "
                               f"--rank {args.rank} is not one of them.")
        try:
            state = reader.load(manifest, args.rank, verify=not args.no_verify)[args.rank]
        except CheckpointCorruptError as exc:
            if committed is None:
                raise
            raise _newest_damaged(manifest.storage, committed, exc, args.out) from exc
        tensors = _select(state.tensors, args.only)
        _write_atomically(args.out, tensors, fmt, manifest)
    except _Refused as exc:
        print(f"resilient export: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (ResilientError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"exported {len(tensors)} tensors of rank {args.rank}, step {manifest.step} from {manifest.location} "
          f"to {args.out} ({fmt})", file=out)
    return 0


def _write_atomically(path: str, tensors: dict[str, torch.Tensor], fmt: str, manifest: Manifest) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, temp = tempfile.mkstemp(prefix=".export-", suffix=".tmp", dir=directory)
    os.close(fd)
    try:
        if fmt == "torch":
            torch.save(tensors, temp)
        else:
            from safetensors.torch import save_file

            save_file(tensors, temp, metadata={"format": "pt", "resilient.step": str(manifest.step),
                                               "resilient.job": manifest.job})
        os.replace(temp, path)
    except BaseException:
        if os.path.exists(temp):
            os.unlink(temp)
        raise
