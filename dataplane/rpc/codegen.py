"""Regenerate the gRPC stubs from `kvfleet.proto`: `python -m kvfleet.dataplane.rpc.codegen [OUT_DIR]`.

The proto is compiled from a temporary tree `kvfleet/dataplane/rpc/kvfleet.proto` so the stubs
import each other as `kvfleet.dataplane.rpc.kvfleet_pb2` (a package path, not a top-level module).
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
GENERATED = ("kvfleet_pb2.py", "kvfleet_pb2.pyi", "kvfleet_pb2_grpc.py")


def generate(out_dir: Path) -> list[Path]:
    """Compile kvfleet.proto into `out_dir`; returns the written files."""
    from grpc_tools import protoc

    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp, "src", "kvfleet", "dataplane", "rpc")
        src.mkdir(parents=True)
        shutil.copy(HERE / "kvfleet.proto", src / "kvfleet.proto")
        out = Path(tmp, "out")
        out.mkdir()
        args = ["protoc", f"-I{Path(tmp, 'src')}", f"--python_out={out}", f"--pyi_out={out}",
                f"--grpc_python_out={out}", "kvfleet/dataplane/rpc/kvfleet.proto"]
        if protoc.main(args) != 0:
            raise RuntimeError("protoc failed on kvfleet.proto")
        out_dir.mkdir(parents=True, exist_ok=True)
        written = []
        for name in GENERATED:
            dst = out_dir / name
            shutil.copy(out / "kvfleet" / "dataplane" / "rpc" / name, dst)
            written.append(dst)
        return written


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    for path in generate(Path(argv[0]) if argv else HERE):
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
