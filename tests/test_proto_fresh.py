"""The checked-in generated gRPC code must match proto/: regenerate with `python proto/generate.py`."""

import importlib.util
import pathlib
import re
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


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split("."))


def test_declared_floors_load_the_generated_code():
    """pyproject's floors for grpcio and protobuf are at least what the checked-in code refuses to run below
    (an install at the floor would otherwise fail at import with a version error)."""
    tomllib = pytest.importorskip("tomllib")
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    floors = {}
    for dep in deps:
        name, sep, version = dep.partition(">=")
        if sep:
            floors[name.strip()] = _version(version.split(",")[0].strip())
    generated = ROOT / "resilient" / "_proto"
    for pb2 in sorted(generated.glob("*_pb2.py")):
        needed = re.search(r"^# Protobuf Python Version: ([0-9.]+)$", pb2.read_text(), re.M)
        assert needed, f"{pb2.name} names no protobuf version"
        assert floors["protobuf"] >= _version(needed.group(1)), f"{pb2.name} needs protobuf>={needed.group(1)}"
    for grpc_py in sorted(generated.glob("*_pb2_grpc.py")):
        needed = re.search(r"^GRPC_GENERATED_VERSION = '([0-9.]+)'$", grpc_py.read_text(), re.M)
        assert needed, f"{grpc_py.name} names no grpcio version"
        assert floors["grpcio"] >= _version(needed.group(1)), f"{grpc_py.name} needs grpcio>={needed.group(1)}"
