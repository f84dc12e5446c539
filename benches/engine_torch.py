"""The engine benchmark's PyTorch (eager) twin: the same MLP U-Net with FiLM,
task encoder, preconditioning, cosine schedule, DDIM/DDPM loops and Adam
training step as weightgen's Rust code, timed the same way. Prints one JSON
object per measurement. Run by `cargo bench --bench engine`; not for direct use.
"""
import json
import math
import sys
import time

import torch
from torch import nn
from torch.nn import functional as F


def cosine_alpha_bars(T, s=0.008, max_beta=0.999):
    f = lambda t: math.cos(((t / T + s) / (1 + s)) * math.pi / 2) ** 2
    betas = [min(1 - f(t) / f(t - 1), max_beta) for t in range(1, T + 1)]
    ab = [1.0]
    for b in betas:
        ab.append(ab[-1] * (1 - b))
    return torch.tensor(betas, dtype=torch.float64), torch.tensor(ab, dtype=torch.float64)


def time_embedding(t, dim):
    half = dim // 2
    freqs = torch.exp(torch.arange(half, dtype=torch.float32) * (-math.log(10000.0) / half))
    args = t.float()[:, None] * freqs[None, :]
    return torch.cat([args.cos(), args.sin()], 1)


class FilmBlock(nn.Module):
    def __init__(self, width, cond):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.film = nn.Linear(cond, 2 * width)
        self.up = nn.Linear(width, 2 * width)
        self.down = nn.Linear(2 * width, width)

    def forward(self, h, c):
        g, b = self.film(c).chunk(2, 1)
        x = self.norm(h) * (1 + g) + b
        return h + self.down(F.silu(self.up(x)))


class MlpUnet(nn.Module):
    def __init__(self, dim, widths, blocks, time_dim, cond_dim):
        super().__init__()
        c = time_dim + cond_dim
        self.time_dim = time_dim
        self.time = nn.Sequential(nn.Linear(time_dim, time_dim), nn.SiLU(), nn.Linear(time_dim, time_dim))
        self.input = nn.Linear(dim, widths[0])
        self.down = nn.ModuleList([nn.ModuleList([FilmBlock(w, c) for _ in range(blocks)]) for w in widths])
        self.down_proj = nn.ModuleList([nn.Linear(widths[i], widths[i + 1]) for i in range(len(widths) - 1)])
        self.middle = FilmBlock(widths[-1], c)
        self.up_proj = nn.ModuleList([nn.Linear(widths[i + 1], widths[i]) for i in range(len(widths) - 1)])
        self.merge = nn.ModuleList([nn.ModuleList([nn.Linear(2 * w, w) for _ in range(blocks)]) for w in widths])
        self.up = nn.ModuleList([nn.ModuleList([FilmBlock(w, c) for _ in range(blocks)]) for w in widths])
        self.out_norm = nn.LayerNorm(widths[0])
        self.output = nn.Linear(widths[0], dim)

    def forward(self, w, t, e):
        c = F.silu(torch.cat([self.time(time_embedding(t, self.time_dim)), e], 1))
        h = self.input(w)
        skips = []
        levels = len(self.down)
        for level in range(levels):
            for block in self.down[level]:
                h = block(h, c)
                skips.append(h)
            if level + 1 < levels:
                h = self.down_proj[level](h)
        h = self.middle(h, c)
        for level in reversed(range(levels)):
            if level + 1 < levels:
                h = self.up_proj[level](h)
            for block, merge in zip(self.up[level], self.merge[level]):
                h = block(merge(torch.cat([h, skips.pop()], 1)), c)
        return self.output(self.out_norm(h))


class Denoiser(nn.Module):
    def __init__(self, dim, T):
        super().__init__()
        self.features = nn.Sequential(nn.Linear(5, 64), nn.SiLU(), nn.Linear(64, 32))
        self.net = MlpUnet(dim, [512, 256], 2, 128, 32)
        self.betas, self.ab = cosine_alpha_bars(T)

    def forward(self, w, t, feats):
        e = self.features(feats)
        b = (1 - self.ab[t]).sqrt().float()[:, None]
        return self.net(w, t, e) + w * b


@torch.no_grad()
def ddim(model, feats, dim, steps, T):
    bsz = feats.shape[0]
    w = torch.randn(bsz, dim)
    grid = [1 + (i - 1) * T // steps for i in range(1, steps + 1)]
    for i in reversed(range(len(grid))):
        t, tp = grid[i], (grid[i - 1] if i > 0 else 0)
        ab, abp = model.ab[t].item(), model.ab[tp].item()
        eps = model(w, torch.full((bsz,), t, dtype=torch.long), feats)
        x0 = (w - eps * math.sqrt(1 - ab)) / math.sqrt(ab)
        w = x0 * math.sqrt(abp) + eps * math.sqrt(1 - abp)
    return w


@torch.no_grad()
def ddpm(model, feats, dim, T):
    bsz = feats.shape[0]
    w = torch.randn(bsz, dim)
    for t in range(T, 0, -1):
        beta = model.betas[t - 1].item()
        alpha, ab, abp = 1 - beta, model.ab[t].item(), model.ab[t - 1].item()
        eps = model(w, torch.full((bsz,), t, dtype=torch.long), feats)
        mean = (w - eps * (beta / math.sqrt(1 - ab))) / math.sqrt(alpha)
        z = torch.randn(bsz, dim)
        w = mean + z * math.sqrt((1 - abp) / (1 - ab) * beta) if t > 1 else mean
    return w


def timed(fn, repeats):
    """Fastest of `repeats` runs after one warm-up, as on the Rust side."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main():
    cases = json.loads(sys.argv[1])
    torch.manual_seed(0)
    for case in cases:
        dim, batch, kind = case["dim"], case["batch"], case["kind"]
        T = case["timesteps"]
        model = Denoiser(dim, T)
        feats = torch.ones(batch, 5)
        if kind == "ddim":
            seconds = timed(lambda: ddim(model, feats, dim, case["steps"], T), case["repeats"])
        elif kind == "ddpm":
            seconds = timed(lambda: ddpm(model, feats, dim, T), case["repeats"])
        elif kind == "noise":
            seconds = timed(lambda: torch.randn(batch, dim), case["repeats"])
        else:
            opt = torch.optim.Adam(model.parameters(), lr=1e-4)
            data = torch.randn(256, dim)
            ema = [p.detach().clone() for p in model.parameters()]

            def step():
                idx = torch.randint(0, 256, (batch,))
                t = torch.randint(1, T + 1, (batch,))
                eps = torch.randn(batch, dim)
                ab = model.ab[t].float()[:, None]
                wt = data[idx] * ab.sqrt() + eps * (1 - ab).sqrt()
                loss = F.mse_loss(model(wt, t, feats), eps)
                opt.zero_grad()
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                with torch.no_grad():
                    for e, p in zip(ema, model.parameters()):
                        e.mul_(0.999).add_(p, alpha=0.001)

            seconds = timed(lambda: [step() for _ in range(case["iterations"])], case["repeats"]) / case["iterations"]
        print(json.dumps({"name": case["name"], "seconds": seconds}), flush=True)


if __name__ == "__main__":
    main()
