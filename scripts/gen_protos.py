"""Regenerate the committed gRPC stubs from protos/*.proto.

Run from anywhere; it works from the repo root so the generated imports are
absolute package paths (``from protos import x_pb2``). ``--check`` regenerates
into a scratch folder and fails on any difference, which is how the test
command catches drift between the .proto files and the committed modules.
"""

from __future__ import annotations

import argparse
import filecmp
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "protos"
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py", "_pb2_grpc.pyi")


def generate(out_root: Path) -> list[Path]:
    protos = sorted(p.relative_to(ROOT) for p in PROTO_DIR.glob("*.proto"))
    # The mypy-protobuf plugins live beside this interpreter, which may not be on PATH.
    bindir = Path(sys.executable).parent
    cmd = [
        sys.executable,
        "-m",
        "grpc_tools.protoc",
        "-I",
        ".",
        f"--plugin=protoc-gen-mypy={bindir / 'protoc-gen-mypy'}",
        f"--plugin=protoc-gen-mypy_grpc={bindir / 'protoc-gen-mypy_grpc'}",
        f"--python_out={out_root}",
        f"--grpc_python_out={out_root}",
        f"--mypy_out={out_root}",
        f"--mypy_grpc_out={out_root}",
        *(str(p) for p in protos),
    ]
    subprocess.run(cmd, cwd=ROOT, check=True)
    return sorted((out_root / "protos").glob("*_pb2*"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail if committed stubs drift")
    args = parser.parse_args()
    if not args.check:
        generate(ROOT)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        fresh = {p.name for p in generate(Path(tmp))}
        committed = {p.name for p in PROTO_DIR.iterdir() if p.name.endswith(GENERATED_SUFFIXES)}
        problems = [f"missing: protos/{n}" for n in sorted(fresh - committed)]
        problems += [f"stale (no .proto): protos/{n}" for n in sorted(committed - fresh)]
        for name in sorted(fresh & committed):
            if not filecmp.cmp(Path(tmp) / "protos" / name, PROTO_DIR / name, shallow=False):
                problems.append(f"differs: protos/{name}")
    if problems:
        print("generated code drifted from protos/*.proto; run scripts/gen_protos.py:")
        print("\n".join(f"  {p}" for p in problems))
        return 1
    print(f"generated code matches {len(fresh)} files")
    return 0


if __name__ == "__main__":
    sys.exit(main())
