"""Regenerate the checked-in protobuf and gRPC code from proto/lossd/v1/*.proto.

Run from anywhere: ``python proto/generate.py``. CI runs it and fails on any diff, so the
checked-in code always matches the contract.

protoc's virtual include mapping (``-Ilossd/client/_proto=...``) makes the generated gRPC
module import ``lossd.client._proto.lossd_pb2`` directly, so no import rewriting is needed.

It also writes ``lossd_v1_descriptor.binpb``: the contract as a FileDescriptorSet under its
source name (``lossd/v1/lossd.proto``) with its comments, which server reflection serves.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
SOURCE = ROOT / "proto" / "lossd" / "v1"
TARGET = ROOT / "client" / "_proto"
VIRTUAL = "lossd/client/_proto"
DESCRIPTOR_SET = TARGET / "lossd_v1_descriptor.binpb"


def main() -> int:
    protos = sorted(SOURCE.glob("*.proto"))
    with tempfile.TemporaryDirectory() as tmp:
        args = [
            "protoc",
            f"-I{VIRTUAL}={SOURCE}",
            f"--python_out={tmp}",
            f"--grpc_python_out={tmp}",
            f"--pyi_out={tmp}",
            *(f"{VIRTUAL}/{p.name}" for p in protos),
        ]
        if protoc.main(args) != 0:
            print("protoc failed", file=sys.stderr)
            return 1
        generated = Path(tmp) / VIRTUAL
        TARGET.mkdir(parents=True, exist_ok=True)
        for old in TARGET.glob("*_pb2*.py*"):
            old.unlink()
        for new in sorted(generated.iterdir()):
            shutil.copyfile(new, TARGET / new.name)
            print(f"wrote {(TARGET / new.name).relative_to(ROOT)}")
    sources = [f"lossd/v1/{p.name}" for p in protos]
    if protoc.main(
        [
            "protoc",
            f"-I{ROOT / 'proto'}",
            f"--descriptor_set_out={DESCRIPTOR_SET}",
            "--include_source_info",
            *sources,
        ]
    ):
        print("protoc failed (descriptor set)", file=sys.stderr)
        return 1
    print(f"wrote {DESCRIPTOR_SET.relative_to(ROOT)}")
    init = TARGET / "__init__.py"
    if not init.exists():
        init.write_text(
            '"""Generated protobuf and gRPC code; regenerate with proto/generate.py."""\n'
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
