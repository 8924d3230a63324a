#!/usr/bin/python3
"""A Python gRPC client of loraplex.v1, built from stubs generated from proto/ (see
test/rpc/python-client.test.ts): proves the API works from another language's gRPC stack.

usage: client.py --gen-dir DIR [--prompt TEXT] [--max-new-tokens N] [--timeout S] ADDRESS ADAPTER_ID

Prints one JSON object: the Generate stream (deltas, concatenated text, the finished message) and the
LoadAdapter result; an RPC that fails is reported as {"error": {"code": "NOT_FOUND", "details": "..."}}, so
the exit status is 0 whenever the calls could be made.
"""
import argparse
import json
import sys

from google.protobuf.json_format import MessageToDict


def rpc_error(err):
    return {"error": {"code": err.code().name, "details": err.details()}}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--gen-dir", required=True, help="directory holding loraplex/v1/*_pb2*.py")
    parser.add_argument("--prompt", default="Once upon a time")
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--timeout", type=float, default=60.0, help="deadline of each call, seconds")
    parser.add_argument("address")
    parser.add_argument("adapter_id")
    args = parser.parse_args()

    sys.path.insert(0, args.gen_dir)
    import grpc
    from loraplex.v1 import adapters_pb2, adapters_pb2_grpc, inference_pb2, inference_pb2_grpc

    result = {}
    with grpc.insecure_channel(args.address) as channel:
        inference = inference_pb2_grpc.InferenceServiceStub(channel)
        adapters = adapters_pb2_grpc.AdapterServiceStub(channel)

        request = inference_pb2.GenerateRequest(
            text=args.prompt,
            adapter_id=args.adapter_id,
            sampling=inference_pb2.SamplingParams(max_new_tokens=args.max_new_tokens),
        )
        deltas, finished = [], None
        try:
            for response in inference.Generate(request, timeout=args.timeout):
                kind = response.WhichOneof("event")
                if kind == "delta":
                    deltas.append({"text": response.delta.text, "tokenIds": list(response.delta.token_ids)})
                elif kind == "finished":
                    finished = MessageToDict(response.finished)
            result["generate"] = {"deltas": deltas, "text": "".join(d["text"] for d in deltas), "finished": finished}
        except grpc.RpcError as err:
            result["generate"] = rpc_error(err)

        try:
            loaded = adapters.LoadAdapter(adapters_pb2.LoadAdapterRequest(adapter_id=args.adapter_id), timeout=args.timeout)
            result["loadAdapter"] = MessageToDict(loaded)
        except grpc.RpcError as err:
            result["loadAdapter"] = rpc_error(err)

    json.dump(result, sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
