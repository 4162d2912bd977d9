"""Writing and reading checkpoints back: bit-exact, in the safetensors format, with a checked manifest."""

from __future__ import annotations

import json
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from persist_helpers import assert_same_shards, make_shards
from safetensors import safe_open
from safetensors.torch import load_file

from resilient.errors import CheckpointCorruptError, PersistError, StateError
from resilient.persist import (
    Persister,
    ShardState,
    latest_complete,
    load,
    load_latest,
    open_checkpoint,
    open_storage,
    write_checkpoint,
)
from resilient.persist.manifest import from_json
from resilient.persist.shardfile import DTYPES


def test_round_trip_is_bit_exact(ckpt_dir):
    shards = make_shards(12, world_size=3, generation=4)
    with Persister(ckpt_dir, job="j") as persister:
        manifest = persister.persist(12, 4, 3, shards)
    assert (manifest.step, manifest.generation, manifest.world_size) == (12, 4, 3)
    assert sorted(os.listdir(ckpt_dir)) == ["step-00000012"]
    assert sorted(os.listdir(os.path.join(ckpt_dir, "step-00000012"))) == [
        "manifest.json", "rank-0.safetensors", "rank-1.safetensors", "rank-2.safetensors"]
    assert_same_shards(load(ckpt_dir), shards)
    one = load(latest_complete(ckpt_dir), rank=1)
    assert_same_shards(one, {1: shards[1]})
    assert (one[1].step, one[1].generation) == (12, 4)


def test_nan_and_negative_zero_survive_bit_for_bit(ckpt_dir):
    t = torch.tensor([float("nan"), -0.0, float("inf"), 1e-45])
    shards = {0: ShardState(1, 1, b"", {"x": t})}
    write_checkpoint(open_storage(ckpt_dir), 1, 1, 1, shards, job="j")
    assert_same_shards(load(ckpt_dir), shards)


def test_non_contiguous_layouts_are_written_in_logical_order(ckpt_dir):
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    shards = {0: ShardState(1, 1, b"m", {"t": base.t(), "s": base[:, ::2]})}
    write_checkpoint(open_storage(ckpt_dir), 1, 1, 1, shards, job="j")
    got = load(ckpt_dir)[0].tensors
    assert torch.equal(got["t"], base.t()) and torch.equal(got["s"], base[:, ::2])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_cuda_tensor_is_written_bit_for_bit_and_read_back_on_the_cpu(ckpt_dir):
    t = torch.randn(100_003, device="cuda").to(torch.bfloat16)
    shards = {0: ShardState(1, 1, b"m", {"g": t, "s": t[::3]})}
    write_checkpoint(open_storage(ckpt_dir), 1, 1, 1, shards, job="j")
    got = load(ckpt_dir)[0].tensors
    assert got["g"].device.type == "cpu" and torch.equal(got["g"], t.cpu()) and torch.equal(got["s"], t[::3].cpu())


def test_shard_files_are_plain_safetensors_with_meta_in_the_header(ckpt_dir):
    shards = make_shards(3, world_size=1, generation=9)
    write_checkpoint(open_storage(ckpt_dir), 3, 9, 1, shards, job="j")
    path = os.path.join(ckpt_dir, "step-00000003", "rank-0.safetensors")
    plain = load_file(path)
    assert_same_shards({0: ShardState(3, 9, shards[0].meta, plain)}, shards)
    with safe_open(path, "pt") as fh:
        meta = fh.metadata()
    assert meta["resilient.step"] == "3" and meta["resilient.generation"] == "9" and meta["resilient.rank"] == "0"
    assert meta["format"] == "pt"


def test_manifest_records_versions_sizes_and_checksums(ckpt_dir):
    shards = make_shards(5, world_size=2)
    manifest = write_checkpoint(open_storage(ckpt_dir), 5, 2, 2, shards, job="jobX")
    body = json.loads(open(os.path.join(ckpt_dir, "step-00000005", "manifest.json")).read())
    assert body["torch_version"] == torch.__version__ and body["resilient_version"]
    assert body["job"] == "jobX" and body["step"] == 5 and body["world_size"] == 2
    for shard in body["shards"]:
        size = os.path.getsize(os.path.join(ckpt_dir, "step-00000005", shard["file"]))
        assert shard["bytes"] == size and isinstance(shard["crc32"], int)
        assert set(shard["tensors"]) == set(shards[shard["rank"]].tensors)
        assert all(isinstance(t["crc32"], int) for t in shard["tensors"].values())
    assert body["total_bytes"] == manifest.total_bytes
    assert open_checkpoint(os.path.join(ckpt_dir, "step-00000005")) == manifest


def test_manifest_with_a_changed_field_fails_its_own_checksum(ckpt_dir):
    write_checkpoint(open_storage(ckpt_dir), 5, 2, 1, make_shards(5, world_size=1), job="j")
    path = os.path.join(ckpt_dir, "step-00000005", "manifest.json")
    text = open(path).read().replace('"generation": 2', '"generation": 3')
    with pytest.raises(CheckpointCorruptError, match="checksum"):
        from_json(text, where=path)


def test_persisting_a_step_that_is_already_complete_returns_it_unchanged(ckpt_dir):
    storage = open_storage(ckpt_dir)
    first = write_checkpoint(storage, 7, 1, 2, make_shards(7), job="j")
    mtime = os.path.getmtime(os.path.join(ckpt_dir, "step-00000007", "rank-0.safetensors"))
    again = write_checkpoint(storage, 7, 2, 2, make_shards(7, seed=5), job="j")
    assert again == first
    assert os.path.getmtime(os.path.join(ckpt_dir, "step-00000007", "rank-0.safetensors")) == mtime


def test_shards_of_mixed_steps_or_missing_ranks_are_refused(ckpt_dir):
    storage = open_storage(ckpt_dir)
    mixed = {0: make_shards(4)[0], 1: make_shards(5)[1]}
    with pytest.raises(PersistError, match="never mixes steps"):
        write_checkpoint(storage, 5, 1, 2, mixed, job="j")
    with pytest.raises(PersistError, match="needs exactly ranks"):
        write_checkpoint(storage, 5, 1, 3, make_shards(5), job="j")
    assert os.listdir(ckpt_dir) == []


def test_unsupported_values_are_refused_with_a_state_error(ckpt_dir):
    storage = open_storage(ckpt_dir)
    with pytest.raises(StateError, match="not a torch.Tensor"):
        write_checkpoint(storage, 1, 1, 1, {0: ShardState(1, 1, b"", {"x": [1, 2]})}, job="j")
    with pytest.raises(StateError, match="dtype"):
        write_checkpoint(storage, 1, 1, 1, {0: ShardState(1, 1, b"", {"x": torch.zeros(2, dtype=torch.complex128)})},
                         job="j")
    assert os.listdir(ckpt_dir) == []


def test_load_of_an_empty_directory_says_there_is_nothing(ckpt_dir):
    assert latest_complete(ckpt_dir) is None
    assert load_latest(ckpt_dir) is None
    with pytest.raises(PersistError, match="No complete checkpoint"):
        load(ckpt_dir)


_dtypes = st.sampled_from(sorted(DTYPES, key=str))
_shapes = st.lists(st.integers(0, 5), min_size=0, max_size=3)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.dictionaries(st.text(st.characters(codec="utf-8", exclude_characters="\x00"), min_size=1, max_size=12)
                       .filter(lambda s: s != "__metadata__"),
                       st.tuples(_dtypes, _shapes, st.integers(0, 2**31)), max_size=6),
       st.binary(max_size=300))
def test_any_dtype_shape_and_name_round_trips(tmp_path_factory, spec, meta):
    directory = str(tmp_path_factory.mktemp("prop"))
    tensors = {}
    for name, (dtype, shape, seed) in spec.items():
        g = torch.Generator().manual_seed(seed)
        n = 1
        for d in shape:
            n *= d
        itemsize = torch.empty((), dtype=dtype).element_size()
        raw = torch.randint(0, 256, (n * itemsize,), dtype=torch.uint8, generator=g)
        tensors[name] = raw.view(dtype).reshape(shape) if n else torch.empty(shape, dtype=dtype)
    shards = {0: ShardState(1, 1, meta, tensors)}
    write_checkpoint(open_storage(directory), 1, 1, 1, shards, job="j")
    assert_same_shards(load(directory), shards)


def test_store_snapshots_are_accepted_as_shards(ckpt_dir):
    store = pytest.importorskip("resilient.store")
    want = make_shards(8, world_size=2, generation=3)
    snaps = {r: store.Snapshot(step=s.step, generation=s.generation, meta=s.meta, tensors=s.tensors)
             for r, s in want.items()}
    write_checkpoint(open_storage(ckpt_dir), 8, 3, 2, snaps, job="j")
    assert_same_shards(load(ckpt_dir), want)
