"""Start from the user's PyTorch module, not from an architecture name.

    from weightgen_client import WeightgenClient, load_task
    from weightgen_client.torch import warm_start

    model = torch.nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 5))
    warm_start(model, load_task("task.json"), WeightgenClient("127.0.0.1:50051"))
    # ... fine-tune `model` as usual

`warm_start` reads the module's state_dict (names, shapes), finds the
server's architecture with exactly those tensors (or raises
ArchitectureMismatch naming the tensors that differ from the closest one),
asks for one initialization and loads it into the module in place with
`load_state_dict(strict=True)`, in the module's own dtypes and device.
"""

from __future__ import annotations

from typing import Optional

import torch

from weightgen.v1 import catalog_pb2, catalog_pb2_grpc, common_pb2

from .client import GeneratedInits, WeightgenClient

_DTYPES = {
    torch.float32: common_pb2.DTYPE_F32,
    torch.float16: common_pb2.DTYPE_F16,
    torch.bfloat16: common_pb2.DTYPE_BF16,
}

# Layer kinds by module type, as the server's architectures name them.
_KINDS = {
    torch.nn.Linear: "linear",
    torch.nn.Conv1d: "conv1d",
    torch.nn.Conv2d: "conv2d",
    torch.nn.Conv3d: "conv3d",
    torch.nn.LayerNorm: "layer_norm",
    torch.nn.BatchNorm1d: "batch_norm",
    torch.nn.BatchNorm2d: "batch_norm",
    torch.nn.Embedding: "embedding",
}


class ArchitectureMismatch(ValueError):
    """No architecture on the server has the module's tensors. `closest` is
    the name of the architecture sharing most tensor names (None when the
    server has none), `missing` the tensors it has and the module lacks,
    `unexpected` the module's tensors it lacks, `shapes` the tensors whose
    shapes differ as {name: (module's, server's)}."""

    def __init__(self, closest: Optional[str], missing: list, unexpected: list, shapes: dict):
        self.closest, self.missing, self.unexpected, self.shapes = closest, missing, unexpected, shapes
        if closest is None:
            message = "the server has no architectures"
        else:
            parts = []
            if missing:
                parts.append(f"missing from the module: {', '.join(missing)}")
            if unexpected:
                parts.append(f"not in {closest}: {', '.join(unexpected)}")
            if shapes:
                parts.append(
                    "shapes differ: "
                    + ", ".join(f"{k} {list(a)} vs {list(b)}" for k, (a, b) in shapes.items())
                )
            message = f"no architecture matches the module; closest is {closest} ({'; '.join(parts)})"
        super().__init__(message)


def _parameters(module: torch.nn.Module) -> dict:
    """The module's floating-point state_dict entries, {name: tensor}."""
    return {k: v for k, v in module.state_dict().items() if v.is_floating_point()}


def architecture_of(module: torch.nn.Module, name: str = "", family: str = "") -> common_pb2.ArchitectureSpec:
    """The ArchitectureSpec of `module`: its floating-point state_dict
    tensors in order, each in the layer of the submodule that owns it (kind
    from the submodule's type: linear, conv2d, layer_norm, ...)."""
    owners = dict(module.named_modules())
    spec = common_pb2.ArchitectureSpec(name=name, family=family)
    groups: dict = {}
    for key, tensor in _parameters(module).items():
        layer = key.rsplit(".", 1)[0] if "." in key else ""
        if tensor.dtype not in _DTYPES:
            raise ValueError(f"{key}: dtype {tensor.dtype} is not one of {sorted(map(str, _DTYPES))}")
        spec.tensors.append(
            common_pb2.TensorSpec(name=key, shape=list(tensor.shape), dtype=_DTYPES[tensor.dtype], layer=layer)
        )
        if layer not in groups:
            owner = owners.get(layer)
            kind = next((k for t, k in _KINDS.items() if isinstance(owner, t)), type(owner).__name__.lower())
            groups[layer] = common_pb2.LayerGroup(name=layer, kind=kind)
        groups[layer].tensors.append(key)
        spec.num_parameters += tensor.numel()
    spec.layers.extend(groups.values())
    return spec


def find_architecture(client: WeightgenClient, module: torch.nn.Module, family: str = "") -> str:
    """The name of the server's architecture whose tensors have the
    module's names and shapes, in the same order; ArchitectureMismatch
    otherwise."""
    stub = catalog_pb2_grpc.CatalogServiceStub(client._channel)
    answer = client._call(
        lambda: stub.ListArchitectures(
            catalog_pb2.ListArchitecturesRequest(family=family),
            timeout=client.timeout,
            metadata=client._metadata,
        )
    )
    ours = [(k, tuple(v.shape)) for k, v in _parameters(module).items()]
    best, best_overlap = None, -1
    for arch in answer.architectures:
        theirs = [(t.name, tuple(t.shape)) for t in arch.tensors]
        if theirs == ours:
            return arch.name
        overlap = len({n for n, _ in ours} & {n for n, _ in theirs})
        if overlap > best_overlap:
            best, best_overlap = arch, overlap
    if best is None:
        raise ArchitectureMismatch(None, [], [], {})
    mine, theirs = dict(ours), {t.name: tuple(t.shape) for t in best.tensors}
    raise ArchitectureMismatch(
        best.name,
        missing=[n for n in theirs if n not in mine],
        unexpected=[n for n in mine if n not in theirs],
        shapes={n: (mine[n], theirs[n]) for n in mine if n in theirs and mine[n] != theirs[n]},
    )


def warm_start(
    module: torch.nn.Module,
    task: dict,
    client: WeightgenClient,
    architecture: Optional[str] = None,
    **sampling,
) -> GeneratedInits:
    """Loads a generated initialization for `task` (a task-file dict; its
    "architecture" entry is ignored) into `module` in place and returns the
    server's answer (header, file, trailer with the sample's nearness to
    the zoo). `architecture` skips the lookup; `sampling` goes to
    `WeightgenClient.generate_init` (sampler, steps, guidance, seed, ...;
    num_samples is 1). Tensors keep the module's dtypes and devices."""
    if "num_samples" in sampling:
        raise TypeError("warm_start loads one sample; use client.generate_init for several")
    name = architecture or find_architecture(client, module)
    answer = client.generate_init(dict(task, architecture=name), num_samples=1, **sampling)
    current = module.state_dict()
    generated = answer.state_dicts()[0]
    state = {
        k: generated[k].to(dtype=current[k].dtype, device=current[k].device) if k in generated else v
        for k, v in current.items()
    }
    module.load_state_dict(state, strict=True)
    return answer
