"""A gRPC client in another language: generates Python stubs from proto/ with grpcio-tools,
calls the orchestrator's public API and writes the PNG it returns.

Usage: client_generate.py ADDRESS OUT.png [--stubs DIR]
"""

import argparse
import pathlib
import sys
import tempfile

from grpc_tools import protoc


def build_stubs(proto_root: pathlib.Path, out: pathlib.Path) -> None:
    files = [str(p.relative_to(proto_root)) for p in sorted(proto_root.rglob("*.proto"))]
    code = protoc.main(
        ["grpc_tools.protoc", f"-I{proto_root}", f"--python_out={out}", f"--grpc_python_out={out}", *files]
    )
    if code != 0:
        raise SystemExit(f"protoc failed with {code}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("address", help="orchestrator host:port")
    parser.add_argument("out", type=pathlib.Path)
    parser.add_argument("--stubs", type=pathlib.Path, default=None)
    args = parser.parse_args()

    stubs = args.stubs or pathlib.Path(tempfile.mkdtemp(prefix="sd-stubs-"))
    stubs.mkdir(parents=True, exist_ok=True)
    build_stubs(pathlib.Path(__file__).resolve().parents[2] / "proto", stubs)
    sys.path.insert(0, str(stubs))

    import grpc
    from sd.v1 import image_generation_pb2 as pb
    from sd.v1 import image_generation_pb2_grpc as rpc

    with grpc.insecure_channel(args.address) as channel:
        client = rpc.ImageGenerationServiceStub(channel)
        response = client.Generate(
            pb.GenerateRequest(prompt="a blue square", width=64, height=64, steps=3, seed=11),
            timeout=120,
        )
        # A bad request comes back as INVALID_ARGUMENT naming the field, in Python too.
        try:
            client.Generate(pb.GenerateRequest(prompt="x", steps=0), timeout=30)
            raise SystemExit("steps=0 was accepted")
        except grpc.RpcError as err:
            assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err
            assert err.details().startswith("steps"), err.details()
        # Streaming: progress events, then the result.
        events = list(
            client.GenerateStream(
                pb.GenerateStreamRequest(
                    request=pb.GenerateRequest(prompt="a blue square", width=64, height=64, steps=3, seed=11)
                ),
                timeout=120,
            )
        )
        kinds = [e.WhichOneof("event") for e in events]
        assert kinds == ["progress"] * 3 + ["result"], kinds
        assert events[-1].result.images[0].data == response.images[0].data

    args.out.write_bytes(response.images[0].data)
    print(f"seed={response.seed} images={len(response.images)} bytes={len(response.images[0].data)}")


if __name__ == "__main__":
    main()
