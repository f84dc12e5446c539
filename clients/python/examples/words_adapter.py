"""A generated LoRA adapter on its base language model, in plain PyTorch.

The `words` family's base is a small byte-level causal transformer over
single words; weightgen generates LoRA adapters of it from a handful of
example words. This loads the base and an adapter (PEFT-named safetensors:
`base_model.model.layers.{i}.{qkv,proj,up,down}.lora_{A,B}.weight`, with
`r` and `lora_alpha` in the file's metadata) and prints bits per byte of
words — the ones given, else those typed on stdin, one per line — under
the base alone and with the adapter. Lower is better.

From a server (fetches the base named by the header, generates the adapter):
    python words_adapter.py --addr 127.0.0.1:50051 --task task.json [--words …]
From files (e.g. `weightgen models download` and `weightgen generate`):
    python words_adapter.py --base base.safetensors --adapter adapter.safetensors [--words …]
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load

END = 256  # the end-of-word token; bytes are 0..255
MAX_WORD_BYTES = 31  # longer words are not read
PEFT_PREFIX = "base_model.model."


class ByteLM:
    """The base model as weightgen trains it: token and position embeddings,
    pre-LayerNorm blocks (causal self-attention, GELU-tanh MLP), a final
    LayerNorm and a head over 257 tokens. `tensors` are its state dict."""

    def __init__(self, tensors: dict, heads: int):
        self.t = tensors
        self.heads = heads
        self.layers = sorted({int(k.split(".")[1]) for k in tensors if k.startswith("layers.")})

    def logits(self, tokens: torch.Tensor, lora: dict | None = None, scale: float = 0.0) -> torch.Tensor:
        t, (b, length) = self.t, tokens.shape
        h = F.embedding(tokens, t["tokens.weight"]) + t["positions"][:length].unsqueeze(0)
        width = h.shape[-1]

        def project(name: str, x: torch.Tensor) -> torch.Tensor:
            y = F.linear(x, t[f"{name}.weight"], t[f"{name}.bias"])
            if lora and name in lora:
                a, up = lora[name]
                y = y + (x @ a.T @ up.T) * scale
            return y

        def norm(name: str, x: torch.Tensor) -> torch.Tensor:
            return F.layer_norm(x, (width,), t[f"{name}.weight"], t[f"{name}.bias"])

        for i in self.layers:
            p = f"layers.{i}"
            qkv = project(f"{p}.qkv", norm(f"{p}.norm1", h))
            qkv = qkv.view(b, length, 3, self.heads, width // self.heads).permute(2, 0, 3, 1, 4)
            attended = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], is_causal=True)
            h = h + project(f"{p}.proj", attended.transpose(1, 2).reshape(b, length, width))
            up = F.gelu(project(f"{p}.up", norm(f"{p}.norm2", h)), approximate="tanh")
            h = h + project(f"{p}.down", up)
        return F.linear(norm("norm", h), t["head.weight"], t["head.bias"])


def adapter_modules(tensors: dict) -> dict:
    """{"layers.0.qkv": (A [r, in], B [out, r]), …} of PEFT-named tensors."""
    modules: dict = {}
    for name, tensor in tensors.items():
        module, kind = name.removeprefix(PEFT_PREFIX).rsplit(".lora_", 1)
        pair = modules.setdefault(module, [None, None])
        pair[0 if kind.startswith("A") else 1] = tensor
    return {m: tuple(pair) for m, pair in modules.items()}


def bits_per_byte(lm: ByteLM, words: list, lora: dict | None = None, scale: float = 0.0) -> float:
    """Each word read as [END, b1…bn] predicting [b1…bn, END]: its bits
    over its n + 1 predictions, summed over words, per predicted byte."""
    encoded = [w.encode() for w in words]
    encoded = [w for w in encoded if 0 < len(w) <= MAX_WORD_BYTES]
    if not encoded:
        raise ValueError(f"no word of 1 to {MAX_WORD_BYTES} bytes")
    length = max(len(w) for w in encoded) + 1
    inputs = torch.full((len(encoded), length), END, dtype=torch.long)
    targets = torch.full((len(encoded), length), END, dtype=torch.long)
    mask = torch.zeros(len(encoded), length)
    for row, word in enumerate(encoded):
        inputs[row, 1 : len(word) + 1] = torch.tensor(list(word))
        targets[row, : len(word)] = torch.tensor(list(word))
        mask[row, : len(word) + 1] = 1.0
    with torch.no_grad():
        logits = lm.logits(inputs, lora, scale)
        nll = -logits.log_softmax(-1).gather(2, targets.unsqueeze(2)).squeeze(2)
    return float((nll * mask).sum() / math.log(2) / mask.sum())


def heads_of(architecture: str) -> int:
    """Attention heads from a base architecture's name, "words-bytelm-w64x2h4" → 4."""
    found = re.search(r"h(\d+)$", architecture)
    if not found:
        raise ValueError(f"architecture {architecture!r} does not name its heads (…h<N>)")
    return int(found.group(1))


def from_server(addr: str, task_path: str) -> tuple:
    """(base bytes, adapter bytes, base architecture) via weightgen_client."""
    from weightgen.v1 import catalog_pb2, catalog_pb2_grpc
    from weightgen_client import WeightgenClient, load_task

    client = WeightgenClient(addr)
    answer = client.generate_init(load_task(task_path), num_samples=1, seed=0)
    base = answer.header.architecture.base_model
    if not base.zoo_model_id:
        raise SystemExit(f"{answer.header.architecture.name} is not an adapter architecture")
    stub = catalog_pb2_grpc.CatalogServiceStub(client._channel)
    request = catalog_pb2.DownloadCheckpointRequest(zoo_model_id=base.zoo_model_id)
    data = b"".join(
        m.chunk for m in stub.DownloadCheckpoint(request, metadata=client._metadata) if m.WhichOneof("part") == "chunk"
    )
    return data, answer.files[0], base.architecture


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--addr", help="a weightgen server (with --task)")
    parser.add_argument("--task", help="task file of a words task (weightgen task --family words …)")
    parser.add_argument("--base", help="the base model's safetensors file")
    parser.add_argument("--adapter", help="a generated adapter's safetensors file")
    parser.add_argument("--words", nargs="*", help="words to score (default: stdin, one per line)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    if args.addr:
        base_bytes, adapter_bytes, architecture = from_server(args.addr, args.task)
    elif args.base and args.adapter:
        with open(args.base, "rb") as f:
            base_bytes = f.read()
        with open(args.adapter, "rb") as f:
            adapter_bytes = f.read()
        with safe_open(args.base, framework="pt") as f:
            architecture = (f.metadata() or {}).get("architecture", "")
    else:
        parser.error("give --addr and --task, or --base and --adapter")
    with_metadata = adapter_bytes
    header_len = int.from_bytes(with_metadata[:8], "little")
    metadata = json.loads(with_metadata[8 : 8 + header_len]).get("__metadata__", {})
    if metadata.get("peft_type") != "LORA":
        raise SystemExit("the adapter file has no PEFT LoRA config in its metadata")
    scale = float(metadata["lora_alpha"]) / float(metadata["r"])
    lm = ByteLM(load(base_bytes), heads_of(architecture))
    lora = adapter_modules(load(adapter_bytes))
    words = args.words if args.words else [line.strip() for line in sys.stdin if line.strip()]
    base_bits = bits_per_byte(lm, words)
    adapted_bits = bits_per_byte(lm, words, lora, scale)
    if args.json:
        print(json.dumps({"words": len(words), "base": base_bits, "adapted": adapted_bits}))
    else:
        print(f"{len(words)} words: base {base_bits:.3f} bits/byte, with the adapter {adapted_bits:.3f}")


if __name__ == "__main__":
    main()
