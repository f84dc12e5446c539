"""Python client for weightgen: request task-conditioned weight
initializations over gRPC and load them into PyTorch modules."""

from .client import (
    GeneratedInits,
    ProtocolError,
    WeightgenClient,
    WeightgenError,
    load_task,
    task_descriptor,
)

__all__ = [
    "GeneratedInits",
    "ProtocolError",
    "WeightgenClient",
    "WeightgenError",
    "load_task",
    "task_descriptor",
]
