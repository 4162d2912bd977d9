"""The checked-in generated gRPC code must match proto/: regenerate with `python proto/generate.py`."""

import importlib.util
import pathlib
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent


@pytest.mark.skipif(importlib.util.find_spec("grpc_tools") is None, reason="grpcio-tools not installed")
def test_generated_code_is_fresh(tmp_path):
    sys.path.insert(0, str(ROOT / "proto"))
    try:
        import generate
    finally:
        sys.path.pop(0)
    written = generate.generate(tmp_path)
    assert written, "no .proto files found under proto/resilient/v1"
    for fresh in written:
        checked_in = ROOT / "resilient" / "_proto" / fresh.name
        assert checked_in.exists(), f"{checked_in} is missing: run python proto/generate.py"
        assert checked_in.read_text() == fresh.read_text(), f"{checked_in.name} is stale: run python proto/generate.py"
