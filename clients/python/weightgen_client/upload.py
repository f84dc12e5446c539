"""Uploading a user's own trained checkpoints into the server's zoo, each
with the task it was trained on: what a platform keeps in its model
registry, for the next denoiser to learn from. Shared by the blocking and
the asyncio client."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Generator, Iterable, Iterator, Optional

import grpc

from weightgen.v1 import catalog_pb2

from .client import WeightgenError, task_descriptor

# Largest chunk of a file in one UploadCheckpoint message (the server's limit).
CHUNK_BYTES = 1 << 20
# Codes that are not about one item: the next item would fail the same way,
# so upload_zoo stops (re-running resumes where it stopped).
FATAL_CODES = (
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.CANCELLED,
)


@dataclass
class ZooItem:
    """One checkpoint for the zoo. `checkpoint`: a safetensors file's bytes,
    a path to one, a state dict or a torch module (saved as safetensors);
    `task`: the task-file dict of the task it was trained on, whose
    "architecture" is the checkpoint's architecture; `family`: its task
    family ("digits", …; default the task's "family" entry, else none);
    `metrics`: what the user measured (e.g. {"test_accuracy": 0.97})."""

    checkpoint: Any
    task: dict
    family: str = ""
    metrics: dict = field(default_factory=dict)
    seed: int = 0
    training_config: Optional[dict] = None
    name: str = ""


@dataclass
class ZooItemResult:
    """What became of item `index`: "uploaded", "already stored" (the
    catalog holds the same bytes; nothing new was added) or "failed"
    (`error` says why)."""

    index: int
    name: str
    status: str
    sha256: str = ""
    model_id: str = ""
    error: Optional[Exception] = None


@dataclass
class UploadProgress:
    """After each item: items done, items in all (None for an iterator of
    unknown length), bytes sent so far, and the item's result."""

    done: int
    total: Optional[int]
    bytes_sent: int
    last: ZooItemResult


@dataclass
class UploadReport:
    """Every item's result, in order."""

    results: list

    def with_status(self, status: str) -> list:
        return [r for r in self.results if r.status == status]

    @property
    def uploaded(self) -> list:
        return self.with_status("uploaded")

    @property
    def already_stored(self) -> list:
        return self.with_status("already stored")

    @property
    def failed(self) -> list:
        return self.with_status("failed")


def checkpoint_bytes(checkpoint: Any) -> tuple:
    """(safetensors bytes, file name) of a ZooItem's checkpoint."""
    if isinstance(checkpoint, (bytes, bytearray, memoryview)):
        return bytes(checkpoint), ""
    if isinstance(checkpoint, (str, os.PathLike)):
        with open(checkpoint, "rb") as f:
            return f.read(), os.path.basename(os.fspath(checkpoint))
    state = checkpoint.state_dict() if hasattr(checkpoint, "state_dict") else checkpoint
    if not hasattr(state, "items"):
        raise TypeError(
            f"checkpoint of type {type(checkpoint).__name__}: expected bytes, a path, a state dict or a module"
        )
    from safetensors.torch import save

    return save({k: v.detach().cpu().contiguous() for k, v in state.items()}), ""


def as_item(raw: Any) -> ZooItem:
    return raw if isinstance(raw, ZooItem) else ZooItem(**raw)


def upload_header(item: ZooItem, data: bytes, digest: str, filename: str) -> catalog_pb2.UploadHeader:
    header = catalog_pb2.UploadHeader(
        architecture=item.task["architecture"],
        family=item.family or item.task.get("family", ""),
        task=task_descriptor(item.task),
        seed=item.seed,
        size_bytes=len(data),
        sha256=digest,
        filename=item.name or filename,
    )
    for key, value in item.metrics.items():
        header.metrics[key] = float(value)
    if item.training_config is not None:
        header.training_config_json = json.dumps(item.training_config)
    return header


def upload_messages(header: catalog_pb2.UploadHeader, data: bytes) -> Iterator:
    """The UploadCheckpoint stream: the header, then the file in chunks."""
    yield catalog_pb2.UploadCheckpointRequest(header=header)
    for start in range(0, len(data), CHUNK_BYTES):
        yield catalog_pb2.UploadCheckpointRequest(chunk=data[start : start + CHUNK_BYTES])


def list_request(architecture: str, page_token: str) -> catalog_pb2.ListZooModelsRequest:
    request = catalog_pb2.ListZooModelsRequest(architecture=architecture)
    request.page.page_token = page_token
    request.page.page_size = 1000
    return request


class Uploader:
    """One upload_zoo run without its I/O: `actions()` yields the calls to
    make — ("ListZooModels", request) page by page, ("UploadCheckpoint",
    messages) — and is sent each answer or thrown its grpc.RpcError, so the
    blocking and the asyncio client drive the same bookkeeping (paging,
    skipping stored digests, results, progress) and only make the calls."""

    def __init__(self, items: Iterable, on_progress: Optional[Callable[[UploadProgress], None]]):
        self.items = items
        self.total = len(items) if hasattr(items, "__len__") else None
        self.on_progress = on_progress
        self.results: list = []
        self.bytes_sent = 0

    def actions(self) -> Generator:
        known: dict = {}
        for index, raw in enumerate(self.items):
            try:
                item = as_item(raw)
                data, filename = checkpoint_bytes(item.checkpoint)
                architecture = item.task["architecture"]
            except (OSError, TypeError, ValueError, KeyError) as e:
                name = raw.get("name", "") if isinstance(raw, dict) else getattr(raw, "name", "")
                self.record(ZooItemResult(index, str(name), "failed", error=e))
                continue
            digest = hashlib.sha256(data).hexdigest()
            if architecture not in known:
                known[architecture] = yield from self.stored_digests(architecture)
            stored = known[architecture].get(digest)
            if stored is not None:
                self.record(ZooItemResult(index, item.name, "already stored", digest, stored))
                continue
            header = upload_header(item, data, digest, filename)
            try:
                response = yield ("UploadCheckpoint", upload_messages(header, data))
            except grpc.RpcError as e:
                failure = WeightgenError(e.code(), e.details())
                if e.code() in FATAL_CODES:
                    raise failure from None
                self.record(ZooItemResult(index, item.name, "failed", digest, error=failure))
                continue
            self.bytes_sent += len(data)
            known[architecture][digest] = response.model.id
            status = "already stored" if response.deduplicated else "uploaded"
            self.record(ZooItemResult(index, item.name, status, digest, response.model.id))

    @staticmethod
    def stored_digests(architecture: str) -> Generator:
        """{sha256: zoo model id} of every zoo model of `architecture`,
        asked page by page."""
        digests, token = {}, ""
        while True:
            try:
                page = yield ("ListZooModels", list_request(architecture, token))
            except grpc.RpcError as e:
                raise WeightgenError(e.code(), e.details()) from None
            digests.update({m.sha256: m.id for m in page.models})
            token = page.next_page_token
            if not token:
                return digests

    def record(self, result: ZooItemResult) -> None:
        self.results.append(result)
        if self.on_progress:
            self.on_progress(UploadProgress(len(self.results), self.total, self.bytes_sent, result))

    def report(self) -> UploadReport:
        return UploadReport(self.results)


def upload_zoo(client, items: Iterable, on_progress=None) -> UploadReport:
    """WeightgenClient.upload_zoo (see there)."""
    from weightgen.v1 import catalog_pb2_grpc

    stub = catalog_pb2_grpc.CatalogServiceStub(client._channel)
    run = Uploader(items, on_progress)
    actions = run.actions()
    answer, error = None, None
    while True:
        try:
            method, request = actions.throw(error) if error is not None else actions.send(answer)
        except StopIteration:
            return run.report()
        answer, error = None, None
        try:
            answer = getattr(stub, method)(request, timeout=client.timeout, metadata=client._metadata)
        except grpc.RpcError as e:
            error = e
