"""Memory an upload costs the server: starts $WEIGHTGEN_BIN/weightgen-server
(default target/release)
on a fresh data dir, uploads a SIZE_MIB file of random bytes (refused after
it is received: not safetensors) N times concurrently, and prints the
server's peak resident set (VmHWM) and anonymous memory (RssAnon) before and
after. Run with the torch venv (grpcio-tools, installed by scripts/tools.sh):

    . scripts/bootstrap.sh && . scripts/tools.sh
    "$WEIGHTGEN_TORCH_VENV/bin/python" scripts/bench-upload-memory.py [SIZE_MIB] [N]
"""

import hashlib
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time

import grpc
from grpc_tools import protoc
import grpc_tools

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZE_MIB = int(sys.argv[1]) if len(sys.argv) > 1 else 91
N = int(sys.argv[2]) if len(sys.argv) > 2 else 1
CHUNK = 1 << 20


def stubs(out):
    proto = os.path.join(ROOT, "proto")
    well_known = os.path.join(os.path.dirname(grpc_tools.__file__), "_proto")
    files = [os.path.join(proto, "weightgen", "v1", f) for f in sorted(os.listdir(os.path.join(proto, "weightgen", "v1")))]
    code = protoc.main(["protoc", f"-I{proto}", f"-I{well_known}", f"--python_out={out}", f"--grpc_python_out={out}", *files])
    assert code == 0, code
    for package in ("weightgen", os.path.join("weightgen", "v1")):
        open(os.path.join(out, package, "__init__.py"), "a").close()
    sys.path.insert(0, out)


def status(pid, field):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024  # MiB
    return float("nan")


def main():
    work = tempfile.mkdtemp()
    stubs(work)
    from weightgen.v1 import catalog_pb2, catalog_pb2_grpc

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    server = subprocess.Popen(
        [os.path.join(os.environ.get("WEIGHTGEN_BIN", os.path.join(ROOT, "target/release")), "weightgen-server"), "--listen", f"127.0.0.1:{port}",
         "--metrics-listen", "off", "--data-dir", os.path.join(work, "data"), "--device", "cpu"],
        stderr=subprocess.DEVNULL)
    try:
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        grpc.channel_ready_future(channel).result(timeout=60)
        stub = catalog_pb2_grpc.CatalogServiceStub(channel)
        time.sleep(1)
        before = (status(server.pid, "VmHWM"), status(server.pid, "RssAnon"))
        payload = os.urandom(SIZE_MIB * CHUNK)
        digest = hashlib.sha256(payload).hexdigest()

        def messages():
            yield catalog_pb2.UploadCheckpointRequest(header=catalog_pb2.UploadHeader(
                architecture="digits-mlp-64-32-5", family="digits", size_bytes=len(payload),
                sha256=digest, filename="noise.safetensors"))
            for start in range(0, len(payload), CHUNK):
                yield catalog_pb2.UploadCheckpointRequest(chunk=payload[start:start + CHUNK])

        codes = []

        def one():
            try:
                stub.UploadCheckpoint(messages(), timeout=300)
                codes.append("OK")
            except grpc.RpcError as e:
                codes.append(e.code().name)

        started = time.time()
        threads = [threading.Thread(target=one) for _ in range(N)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        took = time.time() - started
        after = (status(server.pid, "VmHWM"), status(server.pid, "RssAnon"))
        print(f"{N} concurrent upload(s) of {SIZE_MIB} MiB in {took:.1f} s: {sorted(set(codes))}")
        print(f"server peak RSS (VmHWM) {before[0]:.0f} -> {after[0]:.0f} MiB (+{after[0] - before[0]:.0f}); "
              f"RssAnon {before[1]:.0f} -> {after[1]:.0f} MiB")
        staged = os.listdir(os.path.join(work, "data", "staging")) if os.path.isdir(os.path.join(work, "data", "staging")) else []
        print(f"files left in staging/: {len(staged)}")
    finally:
        server.terminate()
        server.wait()


if __name__ == "__main__":
    main()
