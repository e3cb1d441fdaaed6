"""Drives the Sigil agent's Workload API with the official Python SPIFFE
library (py-spiffe, on gRPC C-core). Prints one JSON object per line; the
Rust test reads them. Commands come on stdin, one per line."""

import json
import sys
import threading

import grpc
from spiffe import WorkloadApiClient
from spiffe._proto import workload_pb2, workload_pb2_grpc


def out(**fields):
    print(json.dumps(fields), flush=True)


def main():
    socket = sys.argv[1]
    client = WorkloadApiClient(socket_path=socket)

    svid = client.fetch_x509_svid()
    out(event="x509", spiffe_id=str(svid.spiffe_id), serial=format(svid.leaf.serial_number, "x"))

    bundles = client.fetch_x509_bundles()
    out(event="bundles", trust_domains=sorted(str(b.trust_domain) for b in bundles.bundles))

    jwt = client.fetch_jwt_svid(audience={"db"})
    validated = client.validate_jwt_svid(jwt.token, "db")
    out(event="jwt", spiffe_id=str(validated.spiffe_id), audience=sorted(jwt.audience))

    jwt_bundles = client.fetch_jwt_bundles()
    out(event="jwt_bundles", trust_domains=sorted(str(b.trust_domain) for b in jwt_bundles.bundles))

    # gRPC C-core from 1.57 sends the percent-encoded socket path as
    # :authority, grpc-java the raw path; force both, whatever this grpcio
    # version does by default, and check the agent still answers.
    path = socket[len("unix:"):]
    for name, authority in [("c-core", path.lstrip("/").replace("/", "%2F")), ("java", path)]:
        channel = grpc.insecure_channel(socket, options=[("grpc.default_authority", authority)])
        stub = workload_pb2_grpc.SpiffeWorkloadAPIStub(channel)
        first = next(iter(stub.FetchX509SVID(workload_pb2.X509SVIDRequest(), metadata=[("workload.spiffe.io", "true")])))
        out(event="authority", client=name, authority=authority, spiffe_id=first.svids[0].spiffe_id)
        channel.close()

    # Watch the X.509 stream; every update is printed with its serial.
    updates = threading.Event()

    def on_success(ctx):
        leaf = ctx.default_svid.leaf
        out(event="x509_update", spiffe_id=str(ctx.default_svid.spiffe_id), serial=format(leaf.serial_number, "x"))
        updates.set()

    def on_error(err):
        out(event="stream_error", error=str(err))

    handle = client.stream_x509_contexts(on_success, on_error, retry_connect=False)
    for line in sys.stdin:
        if line.strip() == "quit":
            break
    handle.cancel()
    client.close()
    out(event="done")


if __name__ == "__main__":
    main()
