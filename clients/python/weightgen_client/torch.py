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
Non-floating-point entries (e.g. BatchNorm's num_batches_tracked) keep
their values.
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

# Layer kinds by the rank of a layer's largest tensor: the rule the server
# applies to checkpoints users upload (ArchSpec::infer).
_KINDS_BY_RANK = {2: "linear", 3: "conv1d", 4: "conv2d", 1: "norm"}


class ArchitectureMismatch(ValueError):
    """No architecture on the server has the module's tensors (or, `named`,
    the one asked for does not). `closest` is the name of the architecture
    sharing most tensor names (or the one asked for; None when the server
    has none), `missing` the tensors it has and the module lacks,
    `unexpected` the module's tensors it lacks, `shapes` the tensors whose
    shapes differ as {name: (module's, server's)}."""

    def __init__(
        self, closest: Optional[str], missing: list, unexpected: list, shapes: dict, named: bool = False
    ):
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
            lead = (
                f"{closest}, the architecture asked for, does not fit the module"
                if named
                else f"no architecture matches the module; closest is {closest}"
            )
            message = f"{lead} ({'; '.join(parts)})"
        super().__init__(message)


def _parameters(module: torch.nn.Module) -> dict:
    """The module's floating-point state_dict entries, {name: tensor}."""
    return {k: v for k, v in module.state_dict().items() if v.is_floating_point()}


def architecture_of(module: torch.nn.Module, name: str = "", family: str = "") -> common_pb2.ArchitectureSpec:
    """The ArchitectureSpec of `module` as the server infers one from an
    uploaded checkpoint: its floating-point state_dict tensors in order,
    grouped into layers by the name before the last dot (a tensor without a
    dot is its own layer), each layer's kind from the rank of its largest
    tensor (2 linear, 3 conv1d, 4 conv2d, 1 norm, else other)."""
    spec = common_pb2.ArchitectureSpec(name=name, family=family)
    groups: dict = {}
    ranks: dict = {}
    for key, tensor in _parameters(module).items():
        layer = key.rsplit(".", 1)[0] if "." in key else key
        if tensor.dtype not in _DTYPES:
            raise ValueError(f"{key}: dtype {tensor.dtype} is not one of {sorted(map(str, _DTYPES))}")
        spec.tensors.append(
            common_pb2.TensorSpec(name=key, shape=list(tensor.shape), dtype=_DTYPES[tensor.dtype], layer=layer)
        )
        groups.setdefault(layer, []).append(key)
        ranks[layer] = max(ranks.get(layer, 0), tensor.dim())
        spec.num_parameters += tensor.numel()
    for layer, keys in groups.items():
        kind = _KINDS_BY_RANK.get(ranks[layer], "other")
        spec.layers.append(common_pb2.LayerGroup(name=layer, kind=kind, tensors=keys))
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
    mine = {k: tuple(v.shape) for k, v in _parameters(module).items()}
    best, best_overlap = None, -1
    for arch in answer.architectures:
        # load_state_dict matches by name, so the order does not matter.
        theirs = {t.name: tuple(t.shape) for t in arch.tensors}
        if theirs == mine:
            return arch.name
        overlap = len(mine.keys() & theirs.keys())
        if overlap > best_overlap:
            best, best_overlap = arch, overlap
    if best is None:
        raise ArchitectureMismatch(None, [], [], {})
    raise ArchitectureMismatch(best.name, *_differences(mine, {t.name: tuple(t.shape) for t in best.tensors}))


def _differences(mine: dict, theirs: dict) -> tuple:
    """(missing, unexpected, shapes) between two {name: shape} maps."""
    return (
        [n for n in theirs if n not in mine],
        [n for n in mine if n not in theirs],
        {n: (mine[n], theirs[n]) for n in mine if n in theirs and mine[n] != theirs[n]},
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
    # With `architecture` given nothing was looked up: refuse an init that
    # would leave some of the module's parameters as they were.
    mine = {k: tuple(v.shape) for k, v in _parameters(module).items()}
    theirs = {k: tuple(v.shape) for k, v in generated.items()}
    if mine != theirs:
        raise ArchitectureMismatch(name, *_differences(mine, theirs), named=True)
    state = {
        k: generated[k].to(dtype=current[k].dtype, device=current[k].device) if k in generated else v
        for k, v in current.items()
    }
    module.load_state_dict(state, strict=True)
    return answer
