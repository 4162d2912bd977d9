"""crc32 combining (file checksum from tensor checksums) matches zlib over the concatenated bytes."""

from __future__ import annotations

import os
import zlib

import pytest
from hypothesis import given
from hypothesis import strategies as st
from persist_helpers import make_shards

from resilient.errors import CheckpointCorruptError
from resilient.persist import latest_complete, open_storage, verify, write_checkpoint
from resilient.persist.checksum import crc32, crc32_combine


@given(st.lists(st.binary(max_size=600), max_size=6))
def test_combined_crc32_equals_crc32_of_the_concatenation(parts):
    combined = 0
    for part in parts:
        combined = crc32_combine(combined, zlib.crc32(part), len(part))
    assert combined == zlib.crc32(b"".join(parts))


def test_chunked_crc32_equals_zlib_for_data_larger_than_a_chunk():
    data = os.urandom(3 << 20)
    assert crc32(memoryview(data)) == zlib.crc32(data)


def test_a_changed_metadata_byte_is_caught_by_the_file_crc32(ckpt_dir):
    write_checkpoint(open_storage(ckpt_dir), 1, 1, 1, make_shards(1, world_size=1), job="j")
    path = os.path.join(ckpt_dir, "step-00000001", "rank-0.safetensors")
    data = bytearray(open(path, "rb").read())
    index = data.index(b'"resilient.step":"1"') + len('"resilient.step":"')
    data[index:index + 1] = b"7"  # still valid JSON, different metadata
    open(path, "wb").write(bytes(data))
    manifest = latest_complete(ckpt_dir, verify=False)
    with pytest.raises(CheckpointCorruptError, match="header or metadata is corrupt"):
        verify(manifest)
