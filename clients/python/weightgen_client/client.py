"""GenerateInit over gRPC: the streamed header, chunks and trailer are
reassembled into one safetensors file per sample and checked against the
trailer's size and SHA-256 before anything is returned."""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional

import grpc

from weightgen.v1 import generation_pb2, generation_pb2_grpc, common_pb2

_SAMPLERS = {
    # The denoiser's recommended sampling (DenoiserInfo.default_sampler).
    "auto": generation_pb2.SAMPLER_UNSPECIFIED,
    "ddim": generation_pb2.SAMPLER_DDIM,
    "dpm-solver": generation_pb2.SAMPLER_DPM_SOLVER,
    "ddpm": generation_pb2.SAMPLER_DDPM,
}
_DTYPES = {"f32": common_pb2.DTYPE_F32, "f16": common_pb2.DTYPE_F16, "bf16": common_pb2.DTYPE_BF16}


class WeightgenError(Exception):
    """The server refused or failed a call: `code` is the gRPC status code
    (e.g. grpc.StatusCode.INVALID_ARGUMENT), `details` names the field."""

    def __init__(self, code: grpc.StatusCode, details: str):
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details


class ProtocolError(Exception):
    """The response broke the stream protocol or a file does not match its digest."""


def load_task(path: str) -> dict:
    """Reads a task file written by `weightgen task` (JSON: architecture,
    num_classes, features, support, and optionally data)."""
    with open(path) as f:
        return json.load(f)


def _tensor(rows: list) -> common_pb2.FloatTensor:
    width = len(rows[0]) if rows and isinstance(rows[0], list) else None
    values = [float(v) for row in rows for v in (row if width is not None else [row])]
    shape = [len(rows), width] if width is not None else [len(rows)]
    return common_pb2.FloatTensor(shape=shape, values=values)


def task_descriptor(task: dict) -> common_pb2.TaskDescriptor:
    """The proto TaskDescriptor of a task dict in the task-file format."""
    descriptor = common_pb2.TaskDescriptor(
        architecture=task["architecture"], num_classes=int(task.get("num_classes", 0))
    )
    for name, values in task.get("features", {}).items():
        descriptor.features[name].values.extend(float(v) for v in values)
    descriptor.embedding.extend(float(v) for v in task.get("embedding", []))
    support = task.get("support")
    if support:
        descriptor.support.inputs.CopyFrom(_tensor(support["inputs"]))
        descriptor.support.targets.CopyFrom(_tensor(support["targets"]))
    return descriptor


@dataclass
class GeneratedInits:
    """One GenerateInit answer: the header (denoiser, architecture, tensor
    list, seed, sampler), one verified safetensors file per sample, and the
    trailer (digests with each sample's nearness to the zoo, queue and
    sampling times, batch size, the zoo spread)."""

    header: Any
    files: list
    trailer: Any

    def state_dicts(self, device: str = "cpu") -> list:
        """The files as PyTorch state dicts (needs torch)."""
        from safetensors.torch import load

        return [{k: v.to(device) for k, v in load(f).items()} for f in self.files]

    def save(self, paths: Iterable[str]) -> None:
        """Writes the files to `paths`, one per sample."""
        for path, data in zip(paths, self.files):
            with open(path, "wb") as f:
                f.write(data)


_TRACEPARENT = re.compile(r"00-(?!0{32})[0-9a-f]{32}-(?!0{16})[0-9a-f]{16}-[0-9a-f]{2}")


def _checked_traceparent(text: str) -> str:
    """`text` when it is a W3C traceparent (version 00), else ValueError."""
    if not _TRACEPARENT.fullmatch(text):
        raise ValueError(
            f"traceparent {text!r}: expected 00-<32 hex trace id>-<16 hex parent span id>-<2 hex flags>"
        )
    return text


def _call_metadata(token: Optional[str], traceparent: Optional[str]) -> tuple:
    """The metadata sent with every call: the bearer token (default
    WEIGHTGEN_TOKEN) and the trace context (default TRACEPARENT)."""
    token = token if token is not None else os.environ.get("WEIGHTGEN_TOKEN")
    metadata = (("authorization", f"Bearer {token}"),) if token else ()
    traceparent = traceparent or os.environ.get("TRACEPARENT")
    if traceparent:
        metadata += (("traceparent", _checked_traceparent(traceparent)),)
    return metadata


def _with_traceparent(metadata: tuple, traceparent: Optional[str]) -> tuple:
    """`metadata` with this call's trace context instead of the client's."""
    if not traceparent:
        return metadata
    kept = tuple(m for m in metadata if m[0] != "traceparent")
    return kept + (("traceparent", _checked_traceparent(traceparent)),)


def _channel_settings(addr, tls_ca, tls_cert, tls_key, tls_domain) -> tuple:
    """(target, credentials or None for plaintext, channel options) for
    `addr` and the TLS settings, falling back to the WEIGHTGEN_TLS_*
    variables; the same for the blocking and the asyncio channel."""
    tls_ca = tls_ca or os.environ.get("WEIGHTGEN_TLS_CA")
    tls_cert = tls_cert or os.environ.get("WEIGHTGEN_TLS_CLIENT_CERT")
    tls_key = tls_key or os.environ.get("WEIGHTGEN_TLS_CLIENT_KEY")
    tls_domain = tls_domain or os.environ.get("WEIGHTGEN_TLS_DOMAIN")
    if bool(tls_cert) != bool(tls_key):
        raise ValueError("tls_cert and tls_key go together (mutual TLS)")
    secure = addr.startswith("https://") or any((tls_ca, tls_cert, tls_domain))
    if addr.startswith("http://") and secure:
        raise ValueError("an http:// address with TLS options; use https:// or host:port")
    target = addr.split("://", 1)[-1]
    options = [("grpc.max_receive_message_length", 8 << 20)]
    if not secure:
        return target, None, options

    def read(path: Optional[str]) -> Optional[bytes]:
        if path is None:
            return None
        with open(path, "rb") as f:
            return f.read()

    credentials = grpc.ssl_channel_credentials(
        root_certificates=read(tls_ca),
        private_key=read(tls_key),
        certificate_chain=read(tls_cert),
    )
    if tls_domain:
        options.append(("grpc.ssl_target_name_override", tls_domain))
    return target, credentials, options


def generate_request(
    task: dict,
    num_samples: int = 1,
    sampler: str = "auto",
    steps: int = 0,
    eta: Optional[float] = None,
    guidance: Optional[float] = None,
    seed: Optional[int] = None,
    dtype: str = "f32",
    denoiser_id: str = "",
    max_redraws: int = 0,
) -> generation_pb2.GenerateInitRequest:
    """The GenerateInitRequest of WeightgenClient.generate_init's arguments."""
    if sampler not in _SAMPLERS:
        raise ValueError(f"sampler {sampler!r}: expected one of {sorted(_SAMPLERS)}")
    if dtype not in _DTYPES:
        raise ValueError(f"dtype {dtype!r}: expected one of {sorted(_DTYPES)}")
    options = generation_pb2.SamplingOptions(
        num_samples=num_samples, sampler=_SAMPLERS[sampler], steps=steps,
        output_dtype=_DTYPES[dtype], max_redraws=max_redraws,
    )
    if eta is not None:
        options.eta = eta
    if guidance is not None:
        options.guidance_scale = guidance
    if seed is not None:
        options.seed = seed
    return generation_pb2.GenerateInitRequest(
        task=task_descriptor(task), options=options, denoiser_id=denoiser_id
    )


class _Assembler:
    """A GenerateInit response stream, message by message, into verified files."""

    def __init__(self, on_chunk: Optional[Callable[[int], None]] = None):
        self.header, self.trailer, self.files, self.received = None, None, [], 0
        self.on_chunk = on_chunk

    def add(self, message) -> None:
        part = message.WhichOneof("part")
        if part == "header":
            self.header = message.header
            self.files = [bytearray() for _ in range(self.header.num_samples)]
        elif part == "chunk":
            chunk = message.chunk
            if chunk.sample_index >= len(self.files):
                raise ProtocolError(f"chunk for sample {chunk.sample_index} before a header naming it")
            file = self.files[chunk.sample_index]
            if chunk.offset != len(file):
                raise ProtocolError(
                    f"sample {chunk.sample_index}: chunk at offset {chunk.offset}, expected {len(file)}"
                )
            file.extend(chunk.data)
            self.received += len(chunk.data)
            if self.on_chunk:
                self.on_chunk(self.received)
        elif part == "trailer":
            self.trailer = message.trailer

    def finish(self) -> GeneratedInits:
        header, trailer, files = self.header, self.trailer, self.files
        if header is None or trailer is None:
            raise ProtocolError("the stream ended without a header and a trailer")
        if len(trailer.samples) != len(files):
            raise ProtocolError(f"{len(trailer.samples)} digests for {len(files)} samples")
        for digest in trailer.samples:
            file = files[digest.sample_index]
            if len(file) != digest.size_bytes or hashlib.sha256(file).hexdigest() != digest.sha256:
                raise ProtocolError(f"sample {digest.sample_index} does not match its digest")
        return GeneratedInits(header=header, files=[bytes(f) for f in files], trailer=trailer)


class WeightgenClient:
    """A connection to a weightgen server, e.g. WeightgenClient("127.0.0.1:50051")."""

    def __init__(
        self,
        addr: str,
        timeout: float = 120.0,
        token: Optional[str] = None,
        tls_ca: Optional[str] = None,
        tls_cert: Optional[str] = None,
        tls_key: Optional[str] = None,
        tls_domain: Optional[str] = None,
        traceparent: Optional[str] = None,
    ):
        """`token`: bearer token for a server started with --auth-tokens
        (default: the WEIGHTGEN_TOKEN environment variable, if set).

        TLS (a server started with --tls-cert): `tls_ca` is the PEM CA bundle
        the server's certificate must chain to (default: WEIGHTGEN_TLS_CA,
        else the system's roots when another TLS option or an "https://"
        address asks for TLS); `tls_cert` and `tls_key` the PEM client
        certificate and key for servers with --tls-client-ca (default:
        WEIGHTGEN_TLS_CLIENT_CERT / WEIGHTGEN_TLS_CLIENT_KEY); `tls_domain` the
        name the server's certificate must carry when it is not the
        address's host (WEIGHTGEN_TLS_DOMAIN).

        `traceparent`: a W3C trace context ("00-<trace id>-<parent id>-<flags>")
        sent with every call so that the server's spans (queue wait,
        sampling, streaming) join the caller's trace (default: the
        TRACEPARENT environment variable); generate_init takes one per call."""
        self.timeout = timeout
        self._metadata = _call_metadata(token, traceparent)
        target, credentials, options = _channel_settings(addr, tls_ca, tls_cert, tls_key, tls_domain)
        if credentials is not None:
            self._channel = grpc.secure_channel(target, credentials, options=options)
        else:
            self._channel = grpc.insecure_channel(target, options=options)
        self._generation = generation_pb2_grpc.GenerationServiceStub(self._channel)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "WeightgenClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Blocks until the server answers (channel connected)."""
        grpc.channel_ready_future(self._channel).result(timeout=timeout)

    def server_metadata(self):
        """Server name, version, torch version and device."""
        return self._call(
            lambda: self._generation.ServerMetadata(
                generation_pb2.ServerMetadataRequest(), timeout=self.timeout,
                metadata=self._metadata,
            )
        )

    def generate_init(
        self,
        task: dict,
        num_samples: int = 1,
        sampler: str = "auto",
        steps: int = 0,
        eta: Optional[float] = None,
        guidance: Optional[float] = None,
        seed: Optional[int] = None,
        dtype: str = "f32",
        denoiser_id: str = "",
        on_chunk: Optional[Callable[[int], None]] = None,
        max_redraws: int = 0,
        traceparent: Optional[str] = None,
    ) -> GeneratedInits:
        """Requests `num_samples` initializations for `task` (a task-file
        dict) and returns them verified. Raises WeightgenError with the
        server's status (INVALID_ARGUMENT naming the field, NOT_FOUND,
        UNAVAILABLE, RESOURCE_EXHAUSTED, ...). `max_redraws` > 0 asks the
        server to redraw samples that come out closer to a zoo model than
        the zoo's own models are to each other (see
        trailer.samples[i].nearest_zoo). `traceparent` continues the
        caller's trace for this call (see the constructor)."""
        request = generate_request(
            task, num_samples, sampler, steps, eta, guidance, seed, dtype, denoiser_id, max_redraws
        )
        metadata = _with_traceparent(self._metadata, traceparent)

        def collect() -> GeneratedInits:
            assembler = _Assembler(on_chunk)
            for message in self._generation.GenerateInit(
                request, timeout=self.timeout, metadata=metadata
            ):
                assembler.add(message)
            return assembler.finish()

        return self._call(collect)

    def upload_zoo(
        self,
        items: Iterable,
        on_progress: Optional[Callable[["UploadProgress"], None]] = None,
    ) -> "UploadReport":
        """Adds a user's own trained checkpoints, each with the task it was
        trained on, to the server's zoo (what a platform keeps in its model
        registry), for the next denoiser to learn from. `items`: ZooItem
        (or dicts with its fields). Resumable: checkpoints the catalog
        already holds (same SHA-256) are not sent again, so re-running
        after an interruption sends only the rest. One item's refusal
        (INVALID_ARGUMENT naming the field: wrong architecture, a task the
        family cannot read) is recorded in its result and the others go
        on. `on_progress` is called after every item."""
        from .upload import upload_zoo

        return upload_zoo(self, items, on_progress)

    @staticmethod
    def _call(fn):
        try:
            return fn()
        except grpc.RpcError as e:
            raise WeightgenError(e.code(), e.details()) from None
