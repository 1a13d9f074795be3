"""Regenerate ``inference_pb2.py`` from ``inference.proto`` (needs ``grpcio-tools``).

    python -m guard.protocols.grpc.generate            # rewrite inference_pb2.py
    python -m guard.protocols.grpc.generate --check    # exit 1 when it is stale

protoc's output registers the messages in protobuf's process-wide default pool.
Triton's client (``tritonclient.grpc``) registers its own ``inference.*`` messages
there, and two definitions of one name in one pool fail at import. The generated
module is therefore rewritten, in one place, to build its messages in a pool of its
own: the wire format is the same, and a process may hold both (a test that runs
the guard and Triton's client, an application embedding both).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).parent
PROTO = "inference.proto"
TARGET = HERE / "inference_pb2.py"
STUB = HERE / "inference_pb2.pyi"  # protoc's type stub, unchanged
DEFAULT_POOL = "_descriptor_pool.Default().AddSerializedFile("
OWN_POOL = "POOL.AddSerializedFile("
POOL_LINE = "POOL = _descriptor_pool.DescriptorPool()  # the guard's own pool (see generate.py)\n"


def generate() -> tuple[str, str]:
    """The module's text and its stub's."""
    with tempfile.TemporaryDirectory() as out:
        command = [sys.executable, "-m", "grpc_tools.protoc", f"-I{HERE}"]
        command += [f"--python_out={out}", f"--pyi_out={out}", PROTO]
        subprocess.run(command, check=True)
        text = (Path(out) / TARGET.name).read_text()
        stub = (Path(out) / STUB.name).read_text()
    if text.count(DEFAULT_POOL) != 1:
        raise SystemExit(f"generate: expected one {DEFAULT_POOL!r} in protoc's output")
    text = text.replace(DEFAULT_POOL, OWN_POOL)
    marker = "\nDESCRIPTOR = "
    return text.replace(marker, "\n" + POOL_LINE + marker.lstrip("\n"), 1), stub


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 when the file is stale")
    args = parser.parse_args(argv)
    stale = 0
    for path, text in zip((TARGET, STUB), generate(), strict=True):
        if args.check:
            differs = not path.exists() or path.read_text() != text
            print(f"{path}: {'stale' if differs else 'up to date'}")
            stale |= differs
        else:
            path.write_text(text)
            print(f"wrote {path}")
    return stale


if __name__ == "__main__":
    sys.exit(main())
