"""Checkpoints on S3 through fsspec, against a moto S3 server this test starts on a free port."""

from __future__ import annotations

import socket

import pytest
from persist_helpers import assert_same_shards, make_shards

moto_server = pytest.importorskip("moto.server", reason="moto[server] is not installed")
pytest.importorskip("s3fs", reason="s3fs is not installed")

from resilient.persist import (  # noqa: E402
    Persister,
    clean_leftovers,
    latest_complete,
    list_checkpoints,
    load,
    load_latest,
    open_storage,
)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def s3_options(tmp_path_factory):
    port = _free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    try:
        import boto3

        endpoint = f"http://127.0.0.1:{port}"
        boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="testing",
                     aws_secret_access_key="testing").create_bucket(Bucket="ckpts")
        yield {
            "key": "testing",
            "secret": "testing",
            "client_kwargs": {"endpoint_url": endpoint, "region_name": "us-east-1"},
            "skip_instance_cache": True,
        }
    finally:
        server.stop()


@pytest.fixture
def s3_dir(s3_options, request):
    return f"s3://ckpts/{request.node.name}"


def test_s3_round_trip_retention_and_latest(s3_dir, s3_options):
    with Persister(s3_dir, job="j", keep=2, storage_options=s3_options) as persister:
        persister.submit(1, 1, 2, make_shards(1)).result(timeout=120)
        persister.persist(2, 1, 2, make_shards(2))
        persister.persist(3, 1, 2, make_shards(3))
    storage = open_storage(s3_dir, **s3_options)
    assert [step for step, _ in list_checkpoints(storage)] == [2, 3]
    manifest = latest_complete(s3_dir, storage_options=s3_options)
    assert manifest.step == 3 and manifest.location == f"{s3_dir}/step-00000003"
    assert_same_shards(load(manifest), make_shards(3))
    assert_same_shards(load(f"{s3_dir}/step-00000002", rank=1, storage_options=s3_options), {1: make_shards(2)[1]})


def test_s3_corrupt_object_is_skipped_and_partial_checkpoint_is_cleaned(s3_dir, s3_options):
    with Persister(s3_dir, job="j", keep=3, storage_options=s3_options) as persister:
        for step in (1, 2, 3):
            persister.persist(step, 1, 2, make_shards(step))
    storage = open_storage(s3_dir, **s3_options)
    fs = storage.fs
    root = s3_dir[len("s3://"):]
    data = bytearray(fs.cat_file(f"{root}/step-00000003/rank-0.safetensors"))
    data[-3] ^= 0xFF
    fs.pipe_file(f"{root}/step-00000003/rank-0.safetensors", bytes(data))
    fs.rm(f"{root}/step-00000002/manifest.json")

    manifest, shards = load_latest(s3_dir, storage_options=s3_options)
    assert manifest.step == 1
    assert_same_shards(shards, make_shards(1))
    removed = clean_leftovers(s3_dir, storage_options=s3_options)
    assert removed == [f"{s3_dir}/step-00000002"]
    assert [step for step, _ in list_checkpoints(storage)] == [1, 3]
