#!/usr/bin/env python3
"""GPT training on one GPU in plain PyTorch: the reference for mpitrain's GPU training step
(scripts/gpu-check, step 3), and the GPU's bf16 matrix-product peak that MFU is measured against.

    python3 bench/torch_gpt_gpu.py --set model.name=gpt --set batch.micro_batch=16 ... \
        [--compile] [--warmup 5] [--steps 20] [--out FILE]
    python3 bench/torch_gpt_gpu.py --peak [--out FILE]

The model, data, loss, optimizer and step are bench/torch_ddp.py's (mpitrain's `gpt` module by
module with the same initialisation; AdamW with decay on >= 2-D tensors, fused on a GPU;
autocast at precision.mode; gradient clipping when optimizer.grad_clip > 0), taken from it so
both references are one code. Here the model is not wrapped in DDP: this is what a PyTorch user
runs on one GPU ("eager"), and with --compile the same model through torch.compile.

--peak: bf16 8192 x 8192 x 8192 matrix products through torch.matmul, 3 warm-ups then the mean
of 10 timed ones, as TFLOP/s: the attainable dense bf16 rate of this GPU, measured in the same
run as the training figures.

FLOPs per token are mpitrain's formula (src/models/gpt.cpp, training_flops_per_token): 6 x the
parameters other than the position embedding + 12 x n_layer x n_embd x seq_len. Prints one JSON
line and writes it to --out.
"""

import argparse
import json
import os
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch_ddp  # noqa: E402  (the shared model, data and optimizer)


def write(result, out):
    line = json.dumps(result)
    print(line, flush=True)
    if out:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out, "w") as f:
            f.write(json.dumps(result, indent=2) + "\n")


def peak(args):
    device = torch.device("cuda")
    n = 8192
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        torch.matmul(a, b)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    reps = 10
    start.record()
    for _ in range(reps):
        torch.matmul(a, b)
    end.record()
    end.synchronize()
    seconds = start.elapsed_time(end) / 1e3 / reps
    write({"name": "bf16_matmul_peak", "device_name": torch.cuda.get_device_name(device), "n": n, "reps": reps,
           "seconds_per_matmul": seconds, "tflops": 2 * n ** 3 / seconds / 1e12, "torch_version": torch.__version__},
          args.out)


def flops_per_token(s, model):
    options = torch_ddp.model_options(s)
    matmul_parameters = sum(p.numel() for p in model.parameters()) - model.wpe.weight.numel()
    return 6.0 * matmul_parameters + 12.0 * options["n_layer"] * options["n_embd"] * torch_ddp.seq_len_of(s)


def train(args):
    s = torch_ddp.resolve_settings(args.set)
    if s["model.name"] != "gpt":
        raise SystemExit("torch_gpt_gpu.py: model.name must be gpt")
    device = torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = s["precision.tf32"]
    torch.backends.cudnn.allow_tf32 = s["precision.tf32"]
    precision = torch_ddp.resolve_precision(s["precision.mode"], device)
    model = torch_ddp.build_model(s)
    parameters = sum(p.numel() for p in model.parameters())
    fpt = flops_per_token(s, model)
    model.to(device)
    forward = torch.compile(model) if args.compile else model
    optimizer, optimizer_kind = torch_ddp.make_optimizer(s, model, device)
    autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    scaler = torch.amp.GradScaler("cuda", enabled=precision == "fp16")
    batches = torch_ddp.make_batches(s, 0, device)
    accumulation = s["batch.accumulation"]
    grad_clip = s["optimizer.grad_clip"]

    def step():
        loss_sum = torch.zeros((), device=device)
        for inputs, targets in batches:
            with torch.autocast("cuda", dtype=autocast_dtype, enabled=autocast_dtype is not None):
                logits = forward(inputs)
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

    compile_start = time.perf_counter()
    losses = [step() for _ in range(args.warmup)]
    torch.cuda.synchronize()
    warmup_seconds = time.perf_counter() - compile_start
    start = time.perf_counter()
    losses += [step() for _ in range(args.steps)]
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    seq_len = torch_ddp.seq_len_of(s)
    tokens_per_s = args.steps * s["batch.micro_batch"] * accumulation * seq_len / seconds
    write({
        "name": "torch_gpt_gpu", "framework": "pytorch", "mode": "torch.compile" if args.compile else "eager",
        "torch_version": torch.__version__, "device_name": torch.cuda.get_device_name(device),
        "model_options": torch_ddp.model_options(s), "parameters": parameters, "precision": precision,
        "micro_batch": s["batch.micro_batch"], "accumulation": accumulation, "seq_len": seq_len,
        "optimizer": optimizer_kind, "grad_clip": grad_clip, "warmup_steps": args.warmup,
        "warmup_seconds": warmup_seconds, "steps": args.steps, "seconds": seconds,
        "tokens_per_s": tokens_per_s, "flops_per_token": fpt, "model_tflops": fpt * tokens_per_s / 1e12,
        "max_memory_allocated_bytes": torch.cuda.max_memory_allocated(device),
        "loss_first": losses[0].item(), "loss_last": losses[-1].item(),
    }, args.out)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--set", action="append", default=[], help="an mpitrain config key, KEY=VALUE")
    p.add_argument("--compile", action="store_true", help="train through torch.compile")
    p.add_argument("--peak", action="store_true", help="measure the bf16 matrix-product peak instead")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--out", default="")
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("torch_gpt_gpu.py: no CUDA GPU visible to torch")
    peak(args) if args.peak else train(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
