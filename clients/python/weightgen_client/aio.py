"""The asyncio client: WeightgenClient's calls as coroutines over
grpc.aio, for services that serve many users from one event loop. Same
requests, same checks, same bytes as the blocking client."""

from __future__ import annotations

from typing import Callable, Iterable, Optional

import grpc

from weightgen.v1 import catalog_pb2_grpc, generation_pb2, generation_pb2_grpc

from .client import (
    GeneratedInits,
    WeightgenError,
    _Assembler,
    _call_metadata,
    _channel_settings,
    _with_traceparent,
    generate_request,
)
from .upload import UploadProgress, UploadReport, Uploader


class AsyncWeightgenClient:
    """WeightgenClient for asyncio: `async with AsyncWeightgenClient(addr) as
    client: inits = await client.generate_init(task)`. The constructor takes
    the same arguments (address, timeout, token, TLS, traceparent) with the
    same environment defaults."""

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
        self.timeout = timeout
        self._metadata = _call_metadata(token, traceparent)
        target, credentials, options = _channel_settings(addr, tls_ca, tls_cert, tls_key, tls_domain)
        if credentials is not None:
            self._channel = grpc.aio.secure_channel(target, credentials, options=options)
        else:
            self._channel = grpc.aio.insecure_channel(target, options=options)
        self._generation = generation_pb2_grpc.GenerationServiceStub(self._channel)
        self._catalog = catalog_pb2_grpc.CatalogServiceStub(self._channel)

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> "AsyncWeightgenClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def wait_ready(self, timeout: float = 60.0) -> None:
        """Waits until the server answers (channel connected)."""
        import asyncio

        await asyncio.wait_for(self._channel.channel_ready(), timeout)

    async def server_metadata(self):
        """Server name, version, torch version and device."""
        try:
            return await self._generation.ServerMetadata(
                generation_pb2.ServerMetadataRequest(), timeout=self.timeout, metadata=self._metadata
            )
        except grpc.RpcError as e:
            raise WeightgenError(e.code(), e.details()) from None

    async def generate_init(
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
        """WeightgenClient.generate_init as a coroutine."""
        request = generate_request(
            task, num_samples, sampler, steps, eta, guidance, seed, dtype, denoiser_id, max_redraws
        )
        metadata = _with_traceparent(self._metadata, traceparent)
        assembler = _Assembler(on_chunk)
        try:
            async for message in self._generation.GenerateInit(
                request, timeout=self.timeout, metadata=metadata
            ):
                assembler.add(message)
        except grpc.RpcError as e:
            raise WeightgenError(e.code(), e.details()) from None
        return assembler.finish()

    async def upload_zoo(
        self,
        items: Iterable,
        on_progress: Optional[Callable[[UploadProgress], None]] = None,
    ) -> UploadReport:
        """WeightgenClient.upload_zoo as a coroutine (one upload at a time)."""
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
                answer = await getattr(self._catalog, method)(
                    request, timeout=self.timeout, metadata=self._metadata
                )
            except grpc.RpcError as e:
                error = e
