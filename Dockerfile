# syntax=docker/dockerfile:1.7
#
# weightgen: one image for CPU and CUDA serving and for the workers.
#   docker build -t weightgen:0.1.0 .
#   docker run --rm -p 50051:50051 weightgen:0.1.0                    # server, CPU
#   docker run --rm --gpus all -e WEIGHTGEN_DEVICE=cuda:0 weightgen:0.1.0
#   docker run --rm weightgen:0.1.0 weightgen-worker zoo build --family digits --models 100
#
# The builder links the binaries against the pinned PyPI wheel torch==2.11.0
# (the CUDA build), exactly as scripts/bootstrap.sh does on a workstation; the
# runtime stage carries the binaries, torch's libraries and the CUDA
# libraries of the wheel's nvidia-* dependencies, nothing else. The NVIDIA
# driver library libcuda.so.1 is not in the image: the NVIDIA Container
# Toolkit mounts the host's at run time (`--gpus`, or the Kubernetes device
# plugin); without it the binaries run on CPU.
#
# scripts/check-deploy.sh checks this file offline: hadolint, and that every
# shared library the binaries load (recursively) is copied below or comes
# from the runtime base image. Keep the COPY sources literal so it can follow
# them. Base images are pinned by tag; pin digests in your registry mirror
# (they cannot be resolved on the offline machine this was written on).

# ---------------------------------------------------------------------------
# Toolchain: Rust, a C++ compiler for torch-sys's wrapper, the torch wheel in
# a venv (torch-sys finds libtorch through its python), cargo-chef.
FROM rust:1.95.0-slim-bookworm AS toolchain

# Debian's security updates replace package versions in place, so apt pins
# would break the build; the base image tag pins the release.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends g++ python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*

# torch==2.11.0 pins its nvidia-* CUDA wheels exactly. Its own layer: it is
# 4.6 GB and changes only with the torch pin. nvidia-cuda-crt adds the CUDA
# headers (crt/) that build.rs needs to compile the CUDA-graph shim.
RUN python3 -m venv /opt/venv \
    && /opt/venv/bin/pip install --no-cache-dir torch==2.11.0 \
    && /opt/venv/bin/pip install --no-cache-dir --no-deps nvidia-cuda-crt==13.0.88
ENV LIBTORCH_USE_PYTORCH=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

RUN cargo install --locked cargo-chef --version 0.1.78

WORKDIR /build

# ---------------------------------------------------------------------------
# Planner: the dependency recipe (manifests only), so that the dependency
# layer below is rebuilt only when Cargo.toml or Cargo.lock change.
FROM toolchain AS planner
COPY . .
RUN cargo chef prepare --recipe-path recipe.json

# ---------------------------------------------------------------------------
# Builder: dependencies (including torch-sys's C++ wrapper) from the recipe,
# then the three binaries. build.rs sets an rpath to the venv's torch/lib and
# keeps libtorch_cuda.so linked.
FROM toolchain AS builder
COPY --from=planner /build/recipe.json recipe.json
RUN cargo chef cook --release --locked --bins --recipe-path recipe.json
COPY . .
RUN cargo build --release --locked --bins

# ---------------------------------------------------------------------------
# Runtime: Debian 12 like the builder (same glibc and libstdc++).
FROM debian:12.11-slim AS runtime

# ca-certificates: TLS to S3 and other HTTPS endpoints (rustls reads the
# system roots). glibc, libstdc++ and libgcc come with the base image.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/*

RUN groupadd --system --gid 10001 weightgen \
    && useradd --system --uid 10001 --gid weightgen --no-log-init \
        --home-dir /var/lib/weightgen --create-home --shell /usr/sbin/nologin weightgen

# torch/lib and nvidia/*/lib keep their relative layout: torch's libraries
# find the CUDA ones through their own rpath ($ORIGIN/../../nvidia/*/lib).
COPY --from=builder /opt/venv/lib/python3.11/site-packages/torch/lib /opt/weightgen/lib/torch/lib
COPY --from=builder /opt/venv/lib/python3.11/site-packages/nvidia/cu13/lib /opt/weightgen/lib/nvidia/cu13/lib
COPY --from=builder /opt/venv/lib/python3.11/site-packages/nvidia/cudnn/lib /opt/weightgen/lib/nvidia/cudnn/lib
COPY --from=builder /opt/venv/lib/python3.11/site-packages/nvidia/cusparselt/lib /opt/weightgen/lib/nvidia/cusparselt/lib
COPY --from=builder /opt/venv/lib/python3.11/site-packages/nvidia/nccl/lib /opt/weightgen/lib/nvidia/nccl/lib
COPY --from=builder /opt/venv/lib/python3.11/site-packages/nvidia/nvshmem/lib /opt/weightgen/lib/nvidia/nvshmem/lib
COPY --from=builder /build/target/release/weightgen-server /build/target/release/weightgen-worker /build/target/release/weightgen /usr/local/bin/

# The binaries' rpath names the builder's venv, which is not here: the loader
# finds torch and CUDA through LD_LIBRARY_PATH (also for the libraries CUDA
# loads with dlopen, e.g. cuDNN's engines and NVRTC's builtins).
ENV LD_LIBRARY_PATH=/opt/weightgen/lib/torch/lib:/opt/weightgen/lib/nvidia/cu13/lib:/opt/weightgen/lib/nvidia/cudnn/lib:/opt/weightgen/lib/nvidia/cusparselt/lib:/opt/weightgen/lib/nvidia/nccl/lib:/opt/weightgen/lib/nvidia/nvshmem/lib \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    WEIGHTGEN_LISTEN=0.0.0.0:50051 \
    WEIGHTGEN_METRICS_LISTEN=0.0.0.0:9090 \
    WEIGHTGEN_DATA_DIR=/var/lib/weightgen \
    WEIGHTGEN_ADDR=127.0.0.1:50051 \
    WEIGHTGEN_LOG_FORMAT=json

USER 10001:10001
# WEIGHTGEN_DATA_DIR: the embedded SQLite catalog and blob directory when no
# --catalog/--blobs URL is given (mount a volume there for a single-container
# trial); with PostgreSQL and S3 nothing is stored in it.
WORKDIR /var/lib/weightgen
EXPOSE 50051 9090

# Liveness of the server through grpc.health.v1 with the CLI in the image:
# "" is SERVING while the server runs. Readiness (a denoiser loaded) is
# weightgen.v1.GenerationService, which Kubernetes probes natively.
# WEIGHTGEN_ADDR must follow WEIGHTGEN_LISTEN's port if you change it.
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
    CMD ["weightgen", "--timeout", "4s", "health"]

CMD ["weightgen-server"]
