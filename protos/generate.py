"""Regenerate the Python code of ``vnodes.proto`` and ``cluster.proto`` (``python protos/generate.py``).

The generated files are committed so that installing needs no compiler; ``tests/test_protos.py``
regenerates them and fails if they drifted from the ``.proto``.
"""

from __future__ import annotations

import pathlib
import sys
import tempfile

HERE = pathlib.Path(__file__).resolve().parent
PROTOS = ("vnodes.proto", "cluster.proto")
OUTPUTS = ("vnodes_pb2.py", "vnodes_pb2_grpc.py", "cluster_pb2.py", "cluster_pb2_grpc.py")


def generate(out_dir: pathlib.Path) -> None:
    from grpc_tools import protoc

    for proto in PROTOS:
        code = protoc.main(["protoc", f"-I{HERE}", f"--python_out={out_dir}", f"--grpc_python_out={out_dir}",
                            str(HERE / proto)])
        if code != 0:
            raise RuntimeError(f"protoc failed on {proto} with exit code {code}")
        stem = proto.removesuffix(".proto")
        grpc_file = out_dir / f"{stem}_pb2_grpc.py"
        # protoc writes an absolute import; the package is vnodes.protos, so make it relative.
        grpc_file.write_text(grpc_file.read_text().replace(f"import {stem}_pb2 as", f"from . import {stem}_pb2 as"))


def generated_text() -> dict[str, str]:
    with tempfile.TemporaryDirectory() as tmp:
        generate(pathlib.Path(tmp))
        return {name: (pathlib.Path(tmp) / name).read_text() for name in OUTPUTS}


if __name__ == "__main__":
    for name, text in generated_text().items():
        (HERE / name).write_text(text)
        print(f"wrote {HERE / name}", file=sys.stderr)
