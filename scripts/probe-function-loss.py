"""Probe (issue 16, eleventh step; not project code): can a function-space loss lift the
features-only zero-shot accuracy of weight diffusion on `digits` above a task->weights regression?

The project's setting in plain PyTorch: the UCI digits (every third image of a class is a test image),
5-way ordered class sets, the held-out class sets of `tasks::families` (every 8th 5-subset from the
4th), 1,000 MLPs 64-32-5 trained 100 full-batch Adam steps at 1e-2 from one shared init, the class
one-hot as the condition, PCA-64 of the standardized zoo. `diff` trains a v-prediction FiLM MLP
denoiser (DDIM-10, guidance 1 and 3); `reg` an MLP regression one-hot -> latent (the hypernetwork's
shape). LAMBDA > 0 adds LAMBDA x the cross-entropy of the decoded x0-hat (or the regression's
output) on 64 training images of the row's task (Text-to-LoRA's "SFT" training next to
reconstruction). 20 validation class sets (drawn from the zoo side, never trained on) and the
held-out sets, 40 ordered tasks each, one sample per task.

Needs scikit-learn for the data (`pip install --target /tmp/pylib scikit-learn`, then
PYTHONPATH=/tmp/pylib) and the bootstrap's torch:
    python scripts/probe-function-loss.py 0 3000 reg      # regression
    python scripts/probe-function-loss.py 0.1 3000 reg    # regression + function loss
    python scripts/probe-function-loss.py 0 10000         # diffusion
    python scripts/probe-function-loss.py 0.1 10000       # diffusion + function loss
The first run builds the zoo (about 2 min) and caches it under /tmp/probe/."""
import itertools, math, random, sys, time, os
import numpy as np, torch, torch.nn as nn, torch.nn.functional as F
from sklearn.datasets import load_digits
torch.set_num_threads(1); torch.manual_seed(0); random.seed(0); np.random.seed(0)
LAM = float(sys.argv[1]); ITERS = int(sys.argv[2]); MODE = sys.argv[3] if len(sys.argv) > 3 else 'diff'
TW = os.environ.get('TW', 'all')  # which timesteps get the function loss
d = load_digits(); X = torch.tensor(d.data, dtype=torch.float32) / 16.0; Y = torch.tensor(d.target)
seen = [0] * 10; test = []
for y in Y.tolist():
    seen[y] += 1; test.append(seen[y] % 3 == 0)
test = torch.tensor(test); tr = (~test).nonzero().flatten(); te = test.nonzero().flatten()
WAYS, H = 5, 32
def task_data(classes, idx):
    m = torch.zeros(len(idx), dtype=torch.bool); lab = torch.full((len(idx),), -1)
    for i, c in enumerate(classes):
        s = Y[idx] == c; m |= s; lab[s] = i
    return X[idx][m], lab[m]
sizes = [(H, 64), (H,), (WAYS, H), (WAYS,)]
def unflat(w):  # w [B, D] -> list of [B, ...]
    out, o = [], 0
    for s in sizes:
        n = int(np.prod(s)); out.append(w[:, o:o + n].view(w.shape[0], *s)); o += n
    return out
def fwd(w, x):  # w [B, D], x [B, n, 64] -> logits [B, n, 5]
    W1, b1, W2, b2 = unflat(w)
    h = torch.relu(torch.bmm(x, W1.transpose(1, 2)) + b1[:, None])
    return torch.bmm(h, W2.transpose(1, 2)) + b2[:, None]
def mlp(): return nn.Sequential(nn.Linear(64, H), nn.ReLU(), nn.Linear(H, WAYS))
def flat(m): return torch.cat([p.detach().flatten() for p in m.parameters()])
def acc_w(w, classes):
    x, y = task_data(classes, te)
    with torch.no_grad(): return (fwd(w[None], x[None])[0].argmax(1) == y).float().mean().item()
combos = list(itertools.combinations(range(10), WAYS))
held = [c for i, c in enumerate(combos) if i % 8 == 3]; rest = [c for i, c in enumerate(combos) if i % 8 != 3]
random.shuffle(rest); val_sets, train_sets = rest[:20], rest[20:]
def rand_task(pool):
    s = list(random.choice(pool)); random.shuffle(s); return tuple(s)
def desc(classes):
    e = torch.zeros(WAYS, 10)
    for i, c in enumerate(classes): e[i, c] = 1
    return e.flatten()
NZOO = int(os.environ.get("NZOO", 1000))
w_init = flat(mlp())
os.makedirs('/tmp/probe', exist_ok=True); ZP = f'/tmp/probe/zoo{NZOO}.pt'
if os.path.exists(ZP):
    W, C, zoo_t = torch.load(ZP)
else:
    t0 = time.time(); zoo_w, zoo_c, zoo_t = [], [], []
    for i in range(NZOO):
        c = rand_task(train_sets); x, y = task_data(c, tr)
        w = w_init.clone().requires_grad_(True); opt = torch.optim.Adam([w], lr=1e-2)
        for s in range(100):
            loss = F.cross_entropy(fwd(w[None], x[None])[0], y); opt.zero_grad(); loss.backward(); opt.step()
        zoo_w.append(w.detach()); zoo_c.append(desc(c)); zoo_t.append(c)
    W = torch.stack(zoo_w); C = torch.stack(zoo_c)
    torch.save((W, C, zoo_t), ZP)
print(f"zoo acc (own tasks, test) {np.mean([acc_w(W[j], zoo_t[j]) for j in range(50)]):.3f}", flush=True)
# per-task train data, padded: each zoo task draws 64 examples per step
task_x = [task_data(c, tr) for c in zoo_t]
def draw_batch(idx, n=64):
    xs, ys = [], []
    for j in idx.tolist():
        x, y = task_x[j]; p = torch.randint(0, len(x), (n,)); xs.append(x[p]); ys.append(y[p])
    return torch.stack(xs), torch.stack(ys)
mu, sd = W.mean(0), W.std(0, unbiased=False); flat_ = sd < 1e-5; sd = torch.where(flat_, torch.ones_like(sd), sd); mu = torch.where(flat_, W[0], mu); Wn = (W - mu) / sd
K = 64
_, Sv, Vh = torch.linalg.svd(Wn, full_matrices=False); V = Vh[:K].T; Z = Wn @ V
zsd = Z.std(0, unbiased=False)
def decode(z): return ((z * zsd) @ V.T) * sd + mu
Xt = Z / zsd
T = 1000
def cosine_abar(T, s=0.008):
    t = torch.arange(T + 1, dtype=torch.float64) / T
    f = torch.cos((t + s) / (1 + s) * math.pi / 2) ** 2
    ab = (f / f[0]).clamp(1e-12, 1); al = (ab[1:] / ab[:-1]).clamp(1e-4, 0.9999)
    return torch.cumprod(al, 0).float()
abar = cosine_abar(T)
class Den(nn.Module):
    def __init__(s, D, E, Hd=256, nb=3):
        super().__init__()
        s.inp = nn.Linear(D, Hd); s.out = nn.Linear(Hd, D)
        s.temb = nn.Sequential(nn.Linear(128, 256), nn.SiLU(), nn.Linear(256, 256))
        s.cemb = nn.Sequential(nn.Linear(E, 256), nn.SiLU(), nn.Linear(256, 256))
        s.blocks = nn.ModuleList([nn.ModuleDict(dict(ln=nn.LayerNorm(Hd), film=nn.Linear(256, 2 * Hd),
            f1=nn.Linear(Hd, Hd), f2=nn.Linear(Hd, Hd))) for _ in range(nb)])
    def forward(s, x, t, c):
        half = 64; fr = torch.exp(-math.log(10000) * torch.arange(half) / half)
        a = t.float()[:, None] * fr[None]; te = torch.cat([a.sin(), a.cos()], 1)
        g = s.temb(te) + s.cemb(c); h = s.inp(x)
        for b in s.blocks:
            sc, sh = b['film'](F.silu(g)).chunk(2, 1)
            h = h + b['f2'](F.silu(b['f1'](b['ln'](h) * (1 + sc) + sh)))
        return s.out(h)
E = C.shape[1]
if MODE == 'reg':
    net = nn.Sequential(nn.Linear(E, 256), nn.SiLU(), nn.Linear(256, 256), nn.SiLU(), nn.Linear(256, K))
else:
    net = Den(K, E)
opt = torch.optim.Adam(net.parameters(), lr=1e-3)
sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, ITERS, eta_min=1e-4)
t0 = time.time()
for it in range(ITERS):
    i = torch.randint(0, NZOO, (64,)); z0 = Xt[i]; c = C[i].clone()
    if MODE == 'reg':
        z0h = net(c); loss = F.mse_loss(z0h, z0); keep = torch.ones(64, dtype=torch.bool)
    else:
        drop = torch.rand(64) < 0.1; c[drop] = 0; keep = ~drop
        t = torch.randint(1, T + 1, (64,)); eps = torch.randn_like(z0); ab = abar[t - 1][:, None]
        zt = ab.sqrt() * z0 + (1 - ab).sqrt() * eps
        v = ab.sqrt() * eps - (1 - ab).sqrt() * z0
        vh = net(zt, t, c); loss = F.mse_loss(vh, v)
        z0h = ab.sqrt() * zt - (1 - ab).sqrt() * vh
        if TW == 'low': keep = keep & (t < 300)
    if LAM > 0 and keep.any():
        xb, yb = draw_batch(i[keep]); w = decode(z0h[keep])
        fl = F.cross_entropy(fwd(w, xb).reshape(-1, WAYS), yb.reshape(-1))
        loss = loss + LAM * fl
    opt.zero_grad(); loss.backward(); opt.step(); sched.step()
    if it % 2000 == 0: print(f"it {it} loss {loss.item():.4f} {time.time()-t0:.0f}s", flush=True)
print(f"trained {ITERS} in {time.time()-t0:.0f}s", flush=True)
@torch.no_grad()
def ddim(c, n, steps=10, g=1.0):
    ts = torch.linspace(T, 1, steps).long(); x = torch.randn(n, K); cc = c.expand(n, -1)
    for k, t in enumerate(ts):
        tt = torch.full((n,), int(t)); ab = abar[t - 1]
        vh = net(x, tt, cc)
        if g != 1.0: vu = net(x, tt, torch.zeros_like(cc)); vh = vu + g * (vh - vu)
        x0 = ab.sqrt() * x - (1 - ab).sqrt() * vh; e = (1 - ab).sqrt() * x + ab.sqrt() * vh
        abp = abar[ts[k + 1] - 1] if k + 1 < steps else torch.tensor(1.0)
        x = abp.sqrt() * x0 + (1 - abp).sqrt() * e
    return decode(x)
def gen(c, g):
    if MODE == 'reg':
        with torch.no_grad(): return decode(net(c[None]))
    return ddim(c, 1, g=g)
rng = random.Random(1)
for name, pool in (("val", val_sets), ("held", held)):
    tasks = []
    for j in range(40):
        s = list(rng.choice(pool)); rng.shuffle(s); tasks.append(tuple(s))
    for g in ((1.0,) if MODE == 'reg' else (1.0, 3.0)):
        accs = [acc_w(gen(desc(c), g)[0], c) for c in tasks]
        print(f"{MODE} lam={LAM} tw={TW} {name} g{g}: {np.mean(accs):.3f} ± {1.96*np.std(accs)/np.sqrt(len(accs)):.3f}", flush=True)
