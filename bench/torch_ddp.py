#!/usr/bin/env python3
"""PyTorch's own DDP training step: the reference that mpitrain's DDP step is measured against.

    source scripts/env.sh
    mpirun -np 2 --bind-to none -x OMP_NUM_THREADS=1 $MPITRAIN_VENV/bin/python bench/torch_ddp.py \
        --set model.name=gpt --set model.gpt.n_layer=4 ... [--warmup 3] [--steps 20] [--out FILE]
    $MPITRAIN_VENV/bin/python bench/torch_ddp.py --check-params --set model.name=gpt ...

Started under mpirun (Open MPI): each process reads OMPI_COMM_WORLD_RANK / _SIZE / _LOCAL_RANK
and joins torch.distributed through env:// (MASTER_ADDR default 127.0.0.1, MASTER_PORT default
derived from the Open MPI job id; set both for several nodes). gloo on CPU, nccl on GPU.

Settings are mpitrain config keys, given as in `train --set KEY=VALUE`, with mpitrain's defaults
(src/config/config.cpp, src/models/gpt.cpp, src/models/mlp.cpp), so scripts/bench passes one list
of --set arguments to both sides. Only the keys that change this measurement are accepted (see
SETTINGS); any other key is an error, never silently ignored.

The measurement, the same on both sides (mpitrain: bench/bench_ddp.cpp):

- Model: mpitrain's `gpt` or `mlp`, same module structure, parameter names, shapes, order and
  initialisation (the same calls on the same CPU generator after manual_seed(run.seed), so the
  initial weights are bitwise equal: --check-params --compare-weights shows it).
- Data: made once before timing on a CPU generator seeded with run.seed * 1000 + rank + 1, one
  micro-batch after another (batch.accumulation of them, reused every step), then moved to the
  device. gpt: tokens = randint(0, vocab_size, [micro_batch, seq_len + 1]); inputs =
  tokens[:, :-1], targets = tokens[:, 1:] (both contiguous). mlp: inputs = randn([micro_batch,
  input_dim]), targets = randint(0, num_classes, [micro_batch]). No file I/O, no loader.
- Step (mpitrain's Trainer::step): per micro-batch forward under autocast (fp32: none), loss =
  cross_entropy(logits.reshape(-1, V).float(), targets.reshape(-1)), backward of loss /
  accumulation, gradient synchronisation only on the last micro-batch (no_sync before it);
  gradient clipping when optimizer.grad_clip > 0; AdamW with weight decay on tensors of >= 2
  dimensions only (fused kernel when optimizer.fused is on, or auto on a GPU); zero_grad in place.
- DDP: bucket_mb / first_bucket_mb as mpitrain's (PyTorch can set a separate first bucket only
  when the bucket size is its default 25 MiB), gradient_as_bucket_view=True (gradients are bucket
  views, as in mpitrain), broadcast_buffers as ddp.broadcast_buffers.
- Timing: warm-up steps, then barrier, perf_counter, --steps steps, (device synchronise),
  barrier, perf_counter; the slowest rank's time (all-reduce MAX). steps/s = steps / time;
  samples/s = steps/s * global batch; tokens/s = samples/s * seq_len (gpt).
- Threads: torch.set_num_threads(OMP_NUM_THREADS), default cores / ranks on this node (1 per
  rank at np 2 on 2 cores). The C++ side reads the same OMP_NUM_THREADS; both report it.

Rank 0 prints one JSON line (and writes it to --out).
"""

import argparse
import contextlib
import json
import math
import os
import platform
import struct
import sys
import time

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

# mpitrain config keys this reference understands, with mpitrain's defaults.
SETTINGS = {
    "run.seed": 0,
    "model.name": "mlp",
    # src/models/gpt.cpp
    "model.gpt.vocab_size": 50257,
    "model.gpt.seq_len": 1024,
    "model.gpt.n_layer": 12,
    "model.gpt.n_head": 12,
    "model.gpt.n_embd": 768,
    "model.gpt.dropout": 0.0,
    "model.gpt.bias": True,
    # src/models/mlp.cpp
    "model.mlp.input_dim": 784,
    "model.mlp.hidden": 256,
    "model.mlp.layers": 2,
    "model.mlp.num_classes": 10,
    "model.mlp.dropout": 0.0,
    "data.seq_len": 0,
    "batch.micro_batch": 32,
    "batch.accumulation": 1,
    "optimizer.name": "adamw",
    "optimizer.lr": 1e-3,
    "optimizer.betas": [0.9, 0.999],
    "optimizer.eps": 1e-8,
    "optimizer.weight_decay": 0.01,
    "optimizer.grad_clip": 0.0,
    "optimizer.fused": "auto",
    "precision.mode": "auto",
    "precision.tf32": True,
    "precision.loss_scale.init": 65536.0,
    "precision.loss_scale.growth_factor": 2.0,
    "precision.loss_scale.backoff_factor": 0.5,
    "precision.loss_scale.growth_interval": 2000,
    "ddp.bucket_mb": 25.0,
    "ddp.first_bucket_mb": 1.0,
    "ddp.broadcast_buffers": True,
    "ddp.find_unused_parameters": False,
    "device.kind": "auto",
}

CHOICES = {
    "model.name": ("gpt", "mlp"),
    "optimizer.name": ("adamw",),
    "optimizer.fused": ("auto", "on", "off"),
    "precision.mode": ("auto", "fp32", "bf16", "fp16"),
    "device.kind": ("auto", "cpu", "cuda"),
}

INIT_STD = 0.02  # GPT-2's


def parse_value(key, text):
    """A --set value in the form `train --set` takes it, for the type of the key's default."""
    default = SETTINGS[key]
    try:
        if isinstance(default, bool):
            if text not in ("true", "false"):
                raise ValueError("expected true or false")
            return text == "true"
        if isinstance(default, int):
            return int(text)
        if isinstance(default, float):
            return float(text)
        if isinstance(default, list):
            values = json.loads(text) if text.lstrip().startswith("[") else [float(v) for v in text.split(",")]
            if len(values) != len(default):
                raise ValueError(f"expected {len(default)} numbers")
            return [float(v) for v in values]
    except ValueError as e:
        raise SystemExit(f"torch_ddp.py: --set {key}={text}: {e}")
    if key in CHOICES and text not in CHOICES[key]:
        raise SystemExit(f"torch_ddp.py: --set {key}={text}: expected one of {', '.join(CHOICES[key])}")
    return text


def resolve_settings(assignments):
    settings = dict(SETTINGS)
    for assignment in assignments:
        key, sep, text = assignment.partition("=")
        if not sep:
            raise SystemExit(f"torch_ddp.py: --set {assignment}: expected KEY=VALUE")
        if key not in SETTINGS:
            raise SystemExit(f"torch_ddp.py: --set {key}: not a setting this reference implements "
                             f"(known: {', '.join(sorted(SETTINGS))})")
        settings[key] = parse_value(key, text)
    if settings["model.gpt.n_embd"] % settings["model.gpt.n_head"] != 0:
        raise SystemExit("torch_ddp.py: model.gpt.n_embd must be a multiple of model.gpt.n_head")
    return settings


# ---------------------------------------------------------------------------------------------
# Models: module for module as src/models/gpt.cpp and src/models/mlp.cpp. Submodules are
# assigned in the order the C++ constructors register them, so parameter order (and with it DDP's
# bucket order) and the sequence of random draws are the same.


def linear(n_in, n_out, bias, std):
    # nn.Linear's constructor draws its default init (kaiming_uniform_, uniform_ bias) exactly as
    # torch::nn::Linear's does; then GPT-2's init replaces it, as in gpt.cpp's linear().
    layer = nn.Linear(n_in, n_out, bias=bias)
    nn.init.normal_(layer.weight, 0.0, std)
    if bias:
        nn.init.zeros_(layer.bias)
    return layer


class LayerNorm(nn.Module):
    """gpt.cpp's LayerNorm: weight, and a bias only when the model has biases."""

    def __init__(self, dim, bias):
        super().__init__()
        self.dim = dim
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim)) if bias else None

    def forward(self, x):
        return F.layer_norm(x, (self.dim,), self.weight, self.bias)


class CausalSelfAttention(nn.Module):
    def __init__(self, n_embd, n_head, dropout, bias, proj_std):
        super().__init__()
        self.n_head = n_head
        self.dropout = dropout
        self.c_attn = linear(n_embd, 3 * n_embd, bias, INIT_STD)
        self.c_proj = linear(n_embd, n_embd, bias, proj_std)

    def forward(self, x):
        batch, time_, channels = x.shape

        def heads(t):
            return t.view(batch, time_, self.n_head, channels // self.n_head).transpose(1, 2)

        q, k, v = self.c_attn(x).split(channels, 2)
        y = F.scaled_dot_product_attention(heads(q), heads(k), heads(v), attn_mask=None,
                                           dropout_p=self.dropout if self.training else 0.0, is_causal=True)
        merged = y.transpose(1, 2).contiguous().view(batch, time_, channels)
        return F.dropout(self.c_proj(merged), self.dropout, self.training)


class FeedForward(nn.Module):
    def __init__(self, n_embd, dropout, bias, proj_std):
        super().__init__()
        self.dropout = dropout
        self.c_fc = linear(n_embd, 4 * n_embd, bias, INIT_STD)
        self.c_proj = linear(4 * n_embd, n_embd, bias, proj_std)

    def forward(self, x):
        # at::gelu's default: the exact (erf) GELU, approximate="none".
        return F.dropout(self.c_proj(F.gelu(self.c_fc(x))), self.dropout, self.training)


class Block(nn.Module):
    def __init__(self, n_embd, n_head, dropout, bias, proj_std):
        super().__init__()
        self.ln_1 = LayerNorm(n_embd, bias)
        self.attn = CausalSelfAttention(n_embd, n_head, dropout, bias, proj_std)
        self.ln_2 = LayerNorm(n_embd, bias)
        self.mlp = FeedForward(n_embd, dropout, bias, proj_std)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class Gpt(nn.Module):
    def __init__(self, vocab_size, seq_len, n_layer, n_head, n_embd, dropout, bias):
        super().__init__()
        self.seq_len = seq_len
        self.dropout = dropout
        self.wte = nn.Embedding(vocab_size, n_embd)
        self.wpe = nn.Embedding(seq_len, n_embd)
        nn.init.normal_(self.wte.weight, 0.0, INIT_STD)
        nn.init.normal_(self.wpe.weight, 0.0, INIT_STD)
        proj_std = INIT_STD / math.sqrt(2.0 * n_layer)
        self.h = nn.ModuleList([Block(n_embd, n_head, dropout, bias, proj_std) for _ in range(n_layer)])
        self.ln_f = LayerNorm(n_embd, bias)

    def forward(self, tokens):
        positions = torch.arange(tokens.size(1), dtype=torch.long, device=tokens.device)
        x = F.dropout(self.wte(tokens) + self.wpe(positions), self.dropout, self.training)
        for block in self.h:
            x = block(x)
        return F.linear(self.ln_f(x), self.wte.weight)  # tied output head


class Mlp(nn.Module):
    def __init__(self, input_dim, hidden, layers, num_classes, dropout):
        super().__init__()
        self.input_dim = input_dim
        modules, width = [], input_dim
        for _ in range(layers):
            modules += [nn.Linear(width, hidden), nn.ReLU()]
            if dropout > 0:
                modules.append(nn.Dropout(dropout))
            width = hidden
        modules.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*modules)

    def forward(self, inputs):
        return self.net(inputs.reshape(inputs.size(0), self.input_dim))


def build_model(s):
    """After torch.manual_seed(run.seed), as Trainer::setup does before models::create."""
    torch.manual_seed(s["run.seed"])
    if s["model.name"] == "gpt":
        return Gpt(s["model.gpt.vocab_size"], s["model.gpt.seq_len"], s["model.gpt.n_layer"], s["model.gpt.n_head"],
                   s["model.gpt.n_embd"], s["model.gpt.dropout"], s["model.gpt.bias"])
    return Mlp(s["model.mlp.input_dim"], s["model.mlp.hidden"], s["model.mlp.layers"], s["model.mlp.num_classes"],
               s["model.mlp.dropout"])


def model_options(s):
    prefix = f"model.{s['model.name']}."
    return {k[len(prefix):]: v for k, v in s.items() if k.startswith(prefix)}


def seq_len_of(s):
    return s["data.seq_len"] if s["data.seq_len"] > 0 else s["model.gpt.seq_len"]


# ---------------------------------------------------------------------------------------------
# Checks of the model definition against mpitrain's


def read_safetensors(path):
    """{name: tensor} of a .safetensors file (mpitrain's checkpoints), without the safetensors package."""
    dtypes = {"F32": torch.float32, "F64": torch.float64, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "U8": torch.uint8}
    with open(path, "rb") as f:
        data = f.read()
    (header_len,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + header_len])
    base = 8 + header_len
    tensors = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        start, end = entry["data_offsets"]
        buffer = bytearray(data[base + start:base + end])
        flat = torch.frombuffer(buffer, dtype=dtypes[entry["dtype"]]) if buffer else torch.empty(0, dtype=dtypes[entry["dtype"]])
        tensors[name] = flat.reshape(entry["shape"])
    return tensors


def check_params(s, compare_path):
    model = build_model(s)
    named = dict(model.named_parameters())
    count = sum(p.numel() for p in named.values())
    print(f"model {s['model.name']} {json.dumps(model_options(s), sort_keys=True)}")
    for name in sorted(named):
        print(f"{name} {list(named[name].shape)}")
    print(f"parameters {count}")
    with torch.no_grad():
        total = sum(p.double().sum().item() for p in named.values())
        absolute = sum(p.double().abs().sum().item() for p in named.values())
    print(f"init_checksum sum={total:.17g} abs_sum={absolute:.17g} (run.seed {s['run.seed']})")
    if not compare_path:
        return 0
    theirs = read_safetensors(compare_path)
    problems = []
    for name in sorted(set(named) | set(theirs)):
        if name not in theirs:
            problems.append(f"{name}: only in this model")
        elif name not in named:
            problems.append(f"{name}: only in {compare_path}")
        elif list(theirs[name].shape) != list(named[name].shape):
            problems.append(f"{name}: shape {list(named[name].shape)} here, {list(theirs[name].shape)} there")
    if problems:
        print("\n".join(problems))
        print(f"compare {compare_path}: names or shapes DIFFER")
        return 1
    worst = max((named[n].detach().double() - theirs[n].double()).abs().max().item() for n in named)
    print(f"compare {compare_path}: same names and shapes ({len(named)} tensors); largest |difference| {worst:.3g}")
    return 0


# ---------------------------------------------------------------------------------------------
# The distributed measurement


def join_world():
    rank = int(os.environ.get("OMPI_COMM_WORLD_RANK", os.environ.get("RANK", 0)))
    size = int(os.environ.get("OMPI_COMM_WORLD_SIZE", os.environ.get("WORLD_SIZE", 1)))
    local_rank = int(os.environ.get("OMPI_COMM_WORLD_LOCAL_RANK", os.environ.get("LOCAL_RANK", 0)))
    local_size = int(os.environ.get("OMPI_COMM_WORLD_LOCAL_SIZE", os.environ.get("LOCAL_WORLD_SIZE", 1)))
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(size), LOCAL_RANK=str(local_rank))
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    # One port per mpirun job, so two jobs on one machine do not collide.
    jobid = int(os.environ.get("OMPI_MCA_ess_base_jobid", "0"))
    os.environ.setdefault("MASTER_PORT", str(29500 + jobid % 10000))
    return rank, size, local_rank, local_size


def cpu_model():
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def choose_device(kind, local_rank):
    if kind == "cuda" or (kind == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise SystemExit("torch_ddp.py: device.kind=cuda but torch sees no GPU")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def resolve_precision(mode, device):
    """amp::resolve_precision: auto = bf16 on GPUs of compute capability >= 8.0, fp16 below, fp32 on CPU."""
    if mode != "auto":
        return mode
    if device.type != "cuda":
        return "fp32"
    return "bf16" if torch.cuda.get_device_capability(device)[0] >= 8 else "fp16"


def make_batches(s, rank, device):
    generator = torch.Generator().manual_seed(s["run.seed"] * 1000 + rank + 1)
    batches = []
    for _ in range(s["batch.accumulation"]):
        b = s["batch.micro_batch"]
        if s["model.name"] == "gpt":
            tokens = torch.randint(0, s["model.gpt.vocab_size"], (b, seq_len_of(s) + 1), generator=generator)
            inputs, targets = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
        else:
            inputs = torch.randn((b, s["model.mlp.input_dim"]), generator=generator)
            targets = torch.randint(0, s["model.mlp.num_classes"], (b,), generator=generator)
        batches.append((inputs.to(device), targets.to(device)))
    return batches


def make_optimizer(s, model, device):
    """train::make_optimizer: weight decay on tensors of >= 2 dimensions only."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    fused = s["optimizer.fused"] == "on" or (s["optimizer.fused"] == "auto" and device.type == "cuda")
    groups = [{"params": decay, "weight_decay": s["optimizer.weight_decay"]},
              {"params": no_decay, "weight_decay": 0.0}]
    # Not fused: the per-tensor loop, as torch::optim::AdamW (foreach=False).
    kind = {"fused": True} if fused else {"foreach": False}
    optimizer = torch.optim.AdamW(groups, lr=s["optimizer.lr"], betas=tuple(s["optimizer.betas"]),
                                  eps=s["optimizer.eps"], **kind)
    return optimizer, "fused" if fused else "per-tensor"


def measure(s, args):
    rank, size, local_rank, local_size = join_world()
    omp = os.environ.get("OMP_NUM_THREADS")
    threads = int(omp) if omp else max(1, (os.cpu_count() or 1) // local_size)
    torch.set_num_threads(threads)
    device = choose_device(s["device.kind"], local_rank)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend=backend, init_method="env://", rank=rank, world_size=size,
                            **({"device_id": device} if device.type == "cuda" else {}))
    precision = resolve_precision(s["precision.mode"], device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = s["precision.tf32"]
        torch.backends.cudnn.allow_tf32 = s["precision.tf32"]

    model = build_model(s)
    parameters = sum(p.numel() for p in model.parameters())
    model.to(device)
    # PyTorch takes a first bucket of its own size only with the default bucket size.
    ddp_kwargs = {}
    first_bucket_mb = s["ddp.bucket_mb"]
    if s["ddp.bucket_mb"] == 25.0:
        dist._DEFAULT_FIRST_BUCKET_BYTES = int(s["ddp.first_bucket_mb"] * (1 << 20))
        first_bucket_mb = s["ddp.first_bucket_mb"]
    else:
        ddp_kwargs["bucket_cap_mb"] = s["ddp.bucket_mb"]
    ddp = nn.parallel.DistributedDataParallel(
        model, device_ids=[local_rank] if device.type == "cuda" else None,
        broadcast_buffers=s["ddp.broadcast_buffers"], find_unused_parameters=s["ddp.find_unused_parameters"],
        gradient_as_bucket_view=True, **ddp_kwargs)
    optimizer, optimizer_kind = make_optimizer(s, model, device)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16",
                                  init_scale=s["precision.loss_scale.init"],
                                  growth_factor=s["precision.loss_scale.growth_factor"],
                                  backoff_factor=s["precision.loss_scale.backoff_factor"],
                                  growth_interval=s["precision.loss_scale.growth_interval"])
    autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    batches = make_batches(s, rank, device)
    accumulation = s["batch.accumulation"]
    grad_clip = s["optimizer.grad_clip"]

    def step():
        loss_sum = torch.zeros((), device=device)
        for micro, (inputs, targets) in enumerate(batches):
            last = micro + 1 == accumulation
            with contextlib.nullcontext() if last else ddp.no_sync():
                with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                    logits = ddp(inputs)
                    loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1).long())
                scaler.scale(loss / accumulation).backward()
            loss_sum += loss.detach()
        if grad_clip > 0:
            scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=False)
        return loss_sum / accumulation

    def synchronize():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    losses = []
    for _ in range(args.warmup):
        losses.append(step())
    synchronize()
    dist.barrier()
    start = time.perf_counter()
    for _ in range(args.steps):
        losses.append(step())
    synchronize()
    dist.barrier()
    seconds = time.perf_counter() - start
    slowest = torch.tensor([seconds], dtype=torch.float64, device=device)
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
    seconds = slowest.item()

    global_batch = s["batch.micro_batch"] * accumulation * size
    steps_per_s = args.steps / seconds
    result = {
        "name": "torch_ddp",
        "framework": "pytorch",
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        "model": s["model.name"],
        "model_options": model_options(s),
        "parameters": parameters,
        "world_size": size,
        "device": str(device.type),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model(),
        "backend": backend,
        "precision": precision,
        "threads": torch.get_num_threads(),
        "interop_threads": torch.get_num_interop_threads(),
        "omp_num_threads": int(omp) if omp else None,
        "micro_batch": s["batch.micro_batch"],
        "accumulation": accumulation,
        "global_batch": global_batch,
        "optimizer": {"name": "adamw", "kind": optimizer_kind, "lr": s["optimizer.lr"], "betas": s["optimizer.betas"],
                      "eps": s["optimizer.eps"], "weight_decay": s["optimizer.weight_decay"],
                      "grad_clip": grad_clip},
        "ddp": {"bucket_mb": s["ddp.bucket_mb"], "first_bucket_mb": first_bucket_mb,
                "gradient_as_bucket_view": True, "broadcast_buffers": s["ddp.broadcast_buffers"]},
        "seed": s["run.seed"],
        "warmup_steps": args.warmup,
        "steps": args.steps,
        "seconds": seconds,
        "steps_per_s": steps_per_s,
        "samples_per_s": steps_per_s * global_batch,
        # rank 0's loss (its own data): the first step's depends only on the init and the data.
        "loss_first": losses[0].item() if losses else None,
        "loss_last": losses[-1].item() if losses else None,
    }
    if s["model.name"] == "gpt":
        result["seq_len"] = seq_len_of(s)
        result["tokens_per_s"] = result["samples_per_s"] * seq_len_of(s)
    if rank == 0:
        line = json.dumps(result)
        print(line, flush=True)
        if args.out:
            os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
            temporary = args.out + ".tmp"
            with open(temporary, "w") as f:
                f.write(json.dumps(result, indent=2) + "\n")
            os.replace(temporary, args.out)
    dist.barrier()
    dist.destroy_process_group()
    return 0


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="Settings (--set KEY=VALUE, mpitrain's defaults):\n" +
                                     "\n".join(f"  {k} = {json.dumps(v)}" for k, v in SETTINGS.items()))
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="an mpitrain config key, as train --set takes it (repeatable)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps (default 3)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps (default 20)")
    parser.add_argument("--out", default="", help="also write the result here (rank 0)")
    parser.add_argument("--check-params", action="store_true",
                        help="print the parameter count, the sorted (name, shape) list and an init checksum; "
                             "no distributed run")
    parser.add_argument("--compare-weights", default="", metavar="FILE.safetensors",
                        help="with --check-params: compare names, shapes and values with an mpitrain "
                             "checkpoint's model.safetensors")
    args = parser.parse_args()
    settings = resolve_settings(args.set)
    if args.check_params:
        return check_params(settings, args.compare_weights)
    if args.steps < 1 or args.warmup < 0:
        raise SystemExit("torch_ddp.py: --steps must be >= 1 and --warmup >= 0")
    return measure(settings, args)


if __name__ == "__main__":
    sys.exit(main())
