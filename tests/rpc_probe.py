"""Call every RPC of the master at ADDRESS without the token, over TLS with CA_FILE, and print
{rpc: status code name} as JSON (run from another host by test_hosts.py)."""

import json
import sys

import grpc

SERVICE = "/vnodes.v1.Master/"
UNARY = ("Register", "GetPlan", "Leave", "Fail", "Status", "EpochStatus", "Store")


def main(address: str, ca_file: str) -> None:
    with open(ca_file, "rb") as f:
        credentials = grpc.ssl_channel_credentials(f.read())
    codes = {}
    with grpc.secure_channel(address, credentials) as channel:
        grpc.channel_ready_future(channel).result(timeout=30)
        calls = {name: (lambda n=name: channel.unary_unary(SERVICE + n)(b"", timeout=10)) for name in UNARY}
        calls["Session"] = lambda: list(channel.stream_stream(SERVICE + "Session")(iter([b""]), timeout=10))
        calls["GetCode"] = lambda: list(channel.unary_stream(SERVICE + "GetCode")(b"", timeout=10))
        for name, call in calls.items():
            try:
                call()
                codes[name] = "OK"
            except grpc.RpcError as exc:
                codes[name] = exc.code().name
    print(json.dumps(codes))


if __name__ == "__main__":
    main(*sys.argv[1:])
