"""Python client for weightgen: request task-conditioned weight
initializations over gRPC and load them into PyTorch modules, and add
one's own trained checkpoints to the zoo. `weightgen_client.aio` has the
asyncio client, `weightgen_client.torch` the PyTorch helpers."""

from .client import (
    GeneratedInits,
    ProtocolError,
    WeightgenClient,
    WeightgenError,
    load_task,
    task_descriptor,
)
from .upload import UploadProgress, UploadReport, ZooItem, ZooItemResult

__all__ = [
    "GeneratedInits",
    "ProtocolError",
    "UploadProgress",
    "UploadReport",
    "WeightgenClient",
    "WeightgenError",
    "ZooItem",
    "ZooItemResult",
    "load_task",
    "task_descriptor",
]
