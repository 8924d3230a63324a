"""The same LoRA training step in PyTorch on the CPU with a dense float32 base, for `npm run bench`.

usage: /usr/bin/python3 torch_lora_step.py CONFIG_JSON TARGETS(comma) R SEQ STEPS THREADS
Builds a Llama-shaped model from config.json's shape with random float32 weights (the base is frozen), LoRA on
the target modules (A Kaiming-uniform, B small), one [1, SEQ] micro-batch: forward, cross-entropy, backward,
AdamW. Prints JSON: tokens/s and peak RSS.
"""
import json, math, resource, sys, time
import torch
import torch.nn.functional as F

cfg_path, targets, r, seq, steps, threads = sys.argv[1], sys.argv[2].split(','), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6])
torch.set_num_threads(threads)
torch.manual_seed(0)
cfg = json.load(open(cfg_path))
H, I, L, NH = cfg['hidden_size'], cfg['intermediate_size'], cfg['num_hidden_layers'], cfg['num_attention_heads']
NKV, V = cfg.get('num_key_value_heads', NH), cfg['vocab_size']
D = H // NH
KV = NKV * D
if 'all-linear' in targets:
    targets = ['q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj']


class Lora(torch.nn.Module):
    def __init__(self, inf, outf, name):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(outf, inf) * 0.02, requires_grad=False)
        self.lora = name in targets
        if self.lora:
            self.a = torch.nn.Parameter(torch.empty(r, inf).uniform_(-1 / math.sqrt(inf), 1 / math.sqrt(inf)))
            self.b = torch.nn.Parameter(torch.full((outf, r), 0.001))

    def forward(self, x):
        y = x @ self.w.t()
        if self.lora:
            y = y + 2.0 * ((x @ self.a.t()) @ self.b.t())
        return y


class Layer(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.q, self.k, self.v, self.o = Lora(H, H, 'q_proj'), Lora(H, KV, 'k_proj'), Lora(H, KV, 'v_proj'), Lora(H, H, 'o_proj')
        self.g, self.u, self.d = Lora(H, I, 'gate_proj'), Lora(H, I, 'up_proj'), Lora(I, H, 'down_proj')
        self.n1 = torch.nn.Parameter(torch.ones(H), requires_grad=False)
        self.n2 = torch.nn.Parameter(torch.ones(H), requires_grad=False)


def rms(x, w):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * w


def rope(x, cos, sin):
    x1, x2 = x[..., : D // 2], x[..., D // 2:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)


emb = torch.randn(V, H) * 0.02
head = torch.randn(V, H) * 0.02
layers = torch.nn.ModuleList([Layer() for _ in range(L)])
norm = torch.ones(H)
inv = 1.0 / (10000 ** (torch.arange(0, D, 2).float() / D))
ang = torch.arange(seq).float()[:, None] * inv[None, :]
cos, sin = ang.cos()[None, :, None, :], ang.sin()[None, :, None, :]
mask = torch.full((seq, seq), float('-inf')).triu(1)
ids = torch.tensor([[10 + (i * 37) % (V - 20) for i in range(seq)]])
labels = torch.tensor([[10 + ((i + 1) * 37) % (V - 20) for i in range(seq)]])
params = [p for p in layers.parameters() if p.requires_grad]
opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)


def step():
    h = emb[ids]
    for lay in layers:
        x = rms(h, lay.n1)
        q = rope(lay.q(x).view(1, seq, NH, D), cos, sin).transpose(1, 2)
        k = rope(lay.k(x).view(1, seq, NKV, D), cos, sin).transpose(1, 2).repeat_interleave(NH // NKV, 1)
        v = lay.v(x).view(1, seq, NKV, D).transpose(1, 2).repeat_interleave(NH // NKV, 1)
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(D) + mask, -1) @ v
        h = h + lay.o(att.transpose(1, 2).reshape(1, seq, H))
        x = rms(h, lay.n2)
        h = h + lay.d(F.silu(lay.g(x)) * lay.u(x))
    logits = rms(h, norm) @ head.t()
    loss = F.cross_entropy(logits.view(-1, V), labels.view(-1))
    opt.zero_grad()
    loss.backward()
    opt.step()


step()
t = time.perf_counter()
for _ in range(steps):
    step()
dt = (time.perf_counter() - t) / steps
print(json.dumps({'targets': ','.join(targets), 'r': r, 'seq': seq, 'stepSeconds': round(dt, 3), 'tokensPerSecond': round(seq / dt, 1),
                  'peakRssMiB': round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024), 'torch': torch.__version__}))
