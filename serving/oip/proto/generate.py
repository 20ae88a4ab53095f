"""Regenerate the Python gRPC modules from ``grpc_predict_v2.proto`` with grpcio-tools.

Run from anywhere: ``python -m serving.oip.proto.generate`` (writes next to the ``.proto``).
Two rewrites of ``protoc``'s output, both checked so a changed ``protoc`` fails loudly:

- the service module's top-level ``import grpc_predict_v2_pb2`` becomes package-relative, so the modules
  load as ``serving.oip.proto.grpc_predict_v2_pb2``;
- the messages go into a private descriptor pool instead of protobuf's process-wide default one. The
  standard's message names (``inference.ModelInferRequest``...) are also defined by Triton's and KServe's
  client libraries; in the default pool, importing both in one process fails with "duplicate symbol".
A unit test regenerates into a temporary directory and checks the committed files match.
"""

from __future__ import annotations

import argparse
from pathlib import Path

PROTO_DIR = Path(__file__).resolve().parent
PROTO_FILE = PROTO_DIR / "grpc_predict_v2.proto"
GENERATED = ("grpc_predict_v2_pb2.py", "grpc_predict_v2_pb2_grpc.py")
_ABSOLUTE_IMPORT = "import grpc_predict_v2_pb2 as "
_RELATIVE_IMPORT = "from . import grpc_predict_v2_pb2 as "
_DEFAULT_POOL = "DESCRIPTOR = _descriptor_pool.Default().AddSerializedFile("
_PRIVATE_POOL = (
    "# Private pool (rewritten by generate.py): Triton's and KServe's clients define the same names.\n"
    "_POOL = _descriptor_pool.DescriptorPool()\n"
    "DESCRIPTOR = _POOL.AddSerializedFile("
)


def generate(out_dir: Path = PROTO_DIR) -> list[Path]:
    """Run ``protoc`` (bundled with grpcio-tools) and fix the service module's import.

    Args:
        out_dir: Where the ``*_pb2.py`` and ``*_pb2_grpc.py`` modules are written.

    Returns:
        The paths written.

    Raises:
        RuntimeError: ``protoc`` failed or its output no longer has the import this script rewrites.
    """
    from grpc_tools import protoc  # dev-only dependency (grpcio-tools)

    out_dir.mkdir(parents=True, exist_ok=True)
    args = [
        "grpc_tools.protoc",
        f"--proto_path={PROTO_DIR}",
        f"--python_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        PROTO_FILE.name,
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed on {PROTO_FILE}; run it by hand to see why: {' '.join(args)}")
    _rewrite(out_dir / GENERATED[0], _DEFAULT_POOL, _PRIVATE_POOL)
    _rewrite(out_dir / GENERATED[1], _ABSOLUTE_IMPORT, _RELATIVE_IMPORT)
    return [out_dir / name for name in GENERATED]


def _rewrite(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    if text.count(old) != 1:
        raise RuntimeError(f"{path} does not have exactly one {old!r} to rewrite; update generate.py")
    path.write_text(text.replace(old, new))


def main() -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", type=Path, default=PROTO_DIR, help="output directory (default: next to the .proto)"
    )
    for path in generate(parser.parse_args().out):
        print(path)


if __name__ == "__main__":
    main()
