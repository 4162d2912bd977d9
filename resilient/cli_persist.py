"""``resilient inspect`` and ``resilient export``: look into and take state out of durable checkpoints.

``inspect_main(argv)`` prints a checkpoint's manifest (step, generation, world size, shards, sizes) and
verifies every tensor's and every file's crc32; given a persist directory it does so for every
checkpoint in it. Exit 0 when all verify, 1 (with a message naming the file and tensor) when one does not.

``export_main(argv)`` writes one shard's tensors as a plain safetensors file or a ``torch.load``-able
state dict. ``--only model`` keeps the keys under ``model/`` and strips that prefix, giving a state dict
that ``model.load_state_dict`` accepts.

Both return the exit status; the ``resilient`` CLI wires them up as subcommands.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import tempfile

import torch

from resilient.errors import PersistError, ResilientError
from resilient.persist import reader
from resilient.persist.fs import open_storage
from resilient.persist.manifest import Manifest


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
    try:
        reader.verify(manifest, deep=True)
    except PersistError as exc:
        print(f"  CORRUPT: {exc}", file=out)
        print(f"error: checkpoint step {manifest.step} at {manifest.location} is corrupt: {exc}", file=sys.stderr)
        return False
    print("  verified: every tensor's and every file's crc32 match", file=out)
    return True


def inspect_main(argv: list[str] | None = None, *, out=None) -> int:
    parser = argparse.ArgumentParser(prog="resilient inspect", description=__doc__.split("\n\n")[1])
    parser.add_argument("path", help="a checkpoint (…/step-NNNNNNNN or its manifest.json) or a persist directory")
    parser.add_argument("--tensors", action="store_true", help="list every tensor of every shard")
    parser.add_argument("--no-verify", action="store_true", help="print the manifest only, read no shard bytes")
    parser.add_argument("--json", action="store_true", help="print the manifest as JSON (one checkpoint)")
    args = parser.parse_args(argv)
    out = out or sys.stdout
    try:
        if reader.is_checkpoint_path(args.path):
            manifest = reader.open_checkpoint(args.path)
            if args.json:
                out.write(manifest.to_json())
                return 0
            return 0 if _inspect_one(manifest, args, out) else 1
        storage = open_storage(args.path)
        checkpoints = reader.list_checkpoints(storage)
        if not checkpoints:
            print(f"error: no checkpoint (step-NNNNNNNN directory) under {storage.location}", file=sys.stderr)
            return 1
        ok = True
        for step, directory in checkpoints:
            try:
                manifest = reader.read_manifest(storage, directory)
            except PersistError as exc:
                partial = not storage.exists(f"{directory}/manifest.json")
                print(f"{'partial' if partial else 'CORRUPT'}: {storage.describe(directory)}: {exc}", file=out)
                if not partial:
                    print(f"error: checkpoint step {step} is corrupt: {exc}", file=sys.stderr)
                    ok = False
                continue
            ok = _inspect_one(manifest, args, out) and ok
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


def export_main(argv: list[str] | None = None, *, out=None) -> int:
    parser = argparse.ArgumentParser(prog="resilient export", description=__doc__.split("\n\n")[2])
    parser.add_argument("path", help="a checkpoint (…/step-NNNNNNNN) or a persist directory (newest complete one)")
    parser.add_argument("out", help="output file")
    parser.add_argument("--rank", type=int, default=0, help="which shard to export (default 0)")
    parser.add_argument("--format", choices=("safetensors", "torch"), default=None,
                        help="default: torch for .pt/.pth/.bin, safetensors otherwise")
    parser.add_argument("--only", default=None, metavar="PREFIX",
                        help="keep keys under PREFIX/ and strip it (e.g. --only model gives a model state_dict)")
    parser.add_argument("--no-verify", action="store_true", help="skip the checksum check")
    args = parser.parse_args(argv)
    out = out or sys.stdout
    fmt = args.format or ("torch" if args.out.endswith((".pt", ".pth", ".bin")) else "safetensors")
    try:
        if reader.is_checkpoint_path(args.path):
            manifest = reader.open_checkpoint(args.path)
        else:
            manifest = reader.latest_complete(args.path, verify=False)
            if manifest is None:
                raise PersistError(f"No complete checkpoint under {args.path}; nothing to export.")
        if args.rank not in {s.rank for s in manifest.shards}:
            raise PersistError(f"Checkpoint step {manifest.step} has ranks 0..{manifest.world_size - 1}; "
                               f"--rank {args.rank} is not one of them.")
        state = reader.load(manifest, args.rank, verify=not args.no_verify)[args.rank]
        tensors = _select(state.tensors, args.only)
        _write_atomically(args.out, tensors, fmt, manifest)
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
