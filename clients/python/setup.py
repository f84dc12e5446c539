"""Build hook: generates the gRPC stubs from the repository's proto files
into the `weightgen.v1` package of the build (grpcio-tools; nothing
generated is committed). WEIGHTGEN_PROTO_DIR overrides where the protos are
(default: ../../proto relative to this file)."""

import glob
import os

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))


class BuildWithStubs(build_py):
    def run(self):
        super().run()
        from grpc_tools import protoc
        import grpc_tools

        proto_dir = os.environ.get("WEIGHTGEN_PROTO_DIR", os.path.join(HERE, "..", "..", "proto"))
        protos = sorted(glob.glob(os.path.join(proto_dir, "weightgen", "v1", "*.proto")))
        if not protos:
            raise SystemExit(f"no weightgen/v1/*.proto under {proto_dir} (set WEIGHTGEN_PROTO_DIR)")
        well_known = os.path.join(os.path.dirname(grpc_tools.__file__), "_proto")
        out = self.build_lib
        code = protoc.main(
            ["grpc_tools.protoc", f"-I{proto_dir}", f"-I{well_known}",
             f"--python_out={out}", f"--pyi_out={out}", f"--grpc_python_out={out}", *protos]
        )
        if code != 0:
            raise SystemExit(f"grpc_tools.protoc failed ({code}) on {protos}")
        for package in ("weightgen", os.path.join("weightgen", "v1")):
            init = os.path.join(out, package, "__init__.py")
            if not os.path.exists(init):
                open(init, "w").close()


setup(cmdclass={"build_py": BuildWithStubs})
