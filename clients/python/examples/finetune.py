"""Request an initialization for a task, load it strictly into a plain
PyTorch module, and fine-tune it next to a random (PyTorch default) init.

    weightgen task --family digits --held-out-seed 3 -o task.json
    python examples/finetune.py --addr 127.0.0.1:50051 --task task.json

Prints one line per method and, last, a JSON summary.
"""

import argparse
import json
import re
import sys

import torch
from torch import nn

from weightgen_client import WeightgenClient, load_task


def plain_module(architecture: str) -> nn.Module:
    """The PyTorch module of an MLP architecture named like
    "digits-mlp-64-32-5": Linear layers with ReLU between them, so its
    state_dict names are 0.weight, 0.bias, 2.weight, ..."""
    match = re.search(r"-mlp-(\d+(?:-\d+)+)$", architecture)
    if not match:
        raise SystemExit(f"{architecture}: this example builds MLP architectures only")
    sizes = [int(s) for s in match.group(1).split("-")]
    layers = []
    for i, (a, b) in enumerate(zip(sizes, sizes[1:])):
        if i:
            layers.append(nn.ReLU())
        layers.append(nn.Linear(a, b))
    return nn.Sequential(*layers)


def score(model, x, y, classification):
    with torch.no_grad():
        out = model(x)
        if classification:
            return (out.argmax(1) == y).float().mean().item()
        return nn.functional.mse_loss(out, y).item()


def fine_tune(model, data, steps, lr, classification):
    """Full-batch Adam; returns the test score before and after each step."""
    x, y = data["train_x"], data["train_y"]
    loss_fn = nn.functional.cross_entropy if classification else nn.functional.mse_loss
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    scores = [score(model, data["test_x"], data["test_y"], classification)]
    for _ in range(steps):
        optimizer.zero_grad()
        loss_fn(model(x), y).backward()
        optimizer.step()
        scores.append(score(model, data["test_x"], data["test_y"], classification))
    return scores


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--addr", default="127.0.0.1:50051")
    parser.add_argument("--task", required=True, help="task file from `weightgen task`")
    parser.add_argument("--steps", type=int, default=200, help="fine-tuning steps")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sampler", default="auto", choices=["auto", "ddim", "dpm-solver", "ddpm"])
    parser.add_argument("--guidance", type=float, default=None)
    parser.add_argument("--dtype", default="f32", choices=["f32", "f16", "bf16"])
    parser.add_argument("--save", help="also write the generated file here")
    args = parser.parse_args()

    task = load_task(args.task)
    if "data" not in task:
        raise SystemExit(f"{args.task}: no data section to fine-tune on")
    raw = task["data"]
    classification = raw["objective"] == "classification"
    data = {k: torch.tensor(v, dtype=torch.float32) for k, v in raw.items() if k != "objective"}
    if classification:
        data["train_y"], data["test_y"] = data["train_y"].long(), data["test_y"].long()

    with WeightgenClient(args.addr) as client:
        answer = client.generate_init(
            task, sampler=args.sampler, guidance=args.guidance, seed=args.seed, dtype=args.dtype
        )
    if args.save:
        answer.save([args.save])
    header = answer.header
    print(
        f"denoiser {header.denoiser_id} v{header.denoiser_version}, seed {header.seed}, "
        f"{len(header.tensors)} tensors, {answer.trailer.samples[0].size_bytes} bytes, "
        f"sha256 {answer.trailer.samples[0].sha256[:16]}…, sampling {answer.trailer.sampling_ms:.0f} ms"
    )
    state = answer.state_dicts()[0]
    generated = plain_module(task["architecture"])
    generated.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    torch.manual_seed(args.seed)
    random = plain_module(task["architecture"])

    metric = "accuracy" if classification else "MSE"
    curves = {}
    for name, model in [("generated", generated), ("random", random)]:
        curves[name] = fine_tune(model, data, args.steps, args.lr, classification)
        c = curves[name]
        print(f"{name:>9}: zero-shot {metric} {c[0]:.3f}, after {args.steps} steps {c[-1]:.3f}")
    summary = {
        "denoiser_id": header.denoiser_id,
        "tensors": {k: [list(v.shape), str(v.dtype).removeprefix("torch.")] for k, v in state.items()},
        "sha256": answer.trailer.samples[0].sha256,
        "zero_shot": {k: c[0] for k, c in curves.items()},
        "final": {k: c[-1] for k, c in curves.items()},
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    sys.exit(main())
