"""Regenerate the checked-in gRPC/protobuf code: ``python proto/generate.py`` (needs grpcio-tools).

Sources: ``proto/resilient/v1/*.proto``. Output: ``resilient/_proto/`` (``*_pb2.py``, ``*_pb2_grpc.py``),
with imports rewritten to be package-relative. ``tests/test_proto_fresh.py`` fails when the checked-in
code is stale: run this script and commit the result.
"""

from __future__ import annotations

import pathlib
import re
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parent.parent
SRC = ROOT / "proto"
OUT = ROOT / "resilient" / "_proto"


def generate(out_dir: pathlib.Path) -> list[pathlib.Path]:
    from grpc_tools import protoc  # imported lazily: only needed to regenerate

    protos = sorted((SRC / "resilient" / "v1").glob("*.proto"))
    if not protos:
        return []
    with tempfile.TemporaryDirectory() as tmp:
        args = ["protoc", f"-I{SRC}", f"--python_out={tmp}", f"--grpc_python_out={tmp}", f"--pyi_out={tmp}"]
        args += [str(p.relative_to(SRC)) for p in protos]
        if protoc.main(args) != 0:
            raise SystemExit("protoc failed; see the messages above")
        out_dir.mkdir(parents=True, exist_ok=True)
        written = []
        for f in sorted((pathlib.Path(tmp) / "resilient" / "v1").iterdir()):
            text = f.read_text()
            # "from resilient.v1 import x_pb2" -> "from . import x_pb2"
            text = re.sub(r"^from resilient\.v1 import", "from . import", text, flags=re.M)
            target = out_dir / f.name
            target.write_text(text)
            written.append(target)
        return written


if __name__ == "__main__":
    for path in generate(OUT):
        print(path.relative_to(ROOT))
    sys.exit(0)
