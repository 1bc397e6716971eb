"""Regenerate the Python code of ``vnodes.proto`` (``python protos/generate.py``).

The generated files are committed so that installing needs no compiler; ``tests/test_protos.py``
regenerates them and fails if they drifted from the ``.proto``.
"""

from __future__ import annotations

import pathlib
import sys
import tempfile

HERE = pathlib.Path(__file__).resolve().parent
OUTPUTS = ("vnodes_pb2.py", "vnodes_pb2_grpc.py")


def generate(out_dir: pathlib.Path) -> None:
    from grpc_tools import protoc

    code = protoc.main(["protoc", f"-I{HERE}", f"--python_out={out_dir}", f"--grpc_python_out={out_dir}",
                        str(HERE / "vnodes.proto")])
    if code != 0:
        raise RuntimeError(f"protoc failed with exit code {code}")
    grpc_file = out_dir / "vnodes_pb2_grpc.py"
    # protoc writes an absolute import; the package is vnodes.protos, so make it relative.
    grpc_file.write_text(grpc_file.read_text().replace("import vnodes_pb2 as", "from . import vnodes_pb2 as"))


def generated_text() -> dict[str, str]:
    with tempfile.TemporaryDirectory() as tmp:
        generate(pathlib.Path(tmp))
        return {name: (pathlib.Path(tmp) / name).read_text() for name in OUTPUTS}


if __name__ == "__main__":
    for name, text in generated_text().items():
        (HERE / name).write_text(text)
        print(f"wrote {HERE / name}", file=sys.stderr)
