#!/usr/bin/env python3
"""Scaling on paper: a MODEL (not a measurement) of mpitrain's data-parallel efficiency at 8-512 GPUs.

    python3 bench/scaling_model.py                 # print the tables, write bench/results/scaling_model.json
    python3 bench/scaling_model.py --mfu 0.6 --bucket-mib 100 --out /tmp/x.json

Standard library only. docs/scaling.md explains the model, its constants and what it implies.

Two parts:

1. This project's measurement (CPU). alpha (seconds per all-reduce) and beta (seconds per byte on
   the bus) fitted by least squares to bench/results/allreduce_mpi_np{2,4}.json, with the ring
   all-reduce's cost  t = alpha + beta * bytes * 2(n-1)/n  (so 1/beta is nccl-tests' busbw).
   Those files are mpitrain's MpiCommunicator on a shared 2-core VM over shared memory: they
   describe that VM, not a GPU cluster, and are printed only as such.

2. The GPU cluster (H100 SXM, 8 per node, NVLink 4 + NVSwitch inside a node, InfiniBand NDR
   between nodes), from published constants (CONSTANTS below, each with its source). Per step:

     compute   t_c = fwd + bwd, bwd = 2/3 t_c         (GPT-2: FLOPs / (MFU * peak); ResNet-50: batch / images per s)
     buckets   mpitrain's layout: parameters in reverse registration order, 1 MiB first bucket,
               25 MiB after, a larger parameter alone (docs/ddp.md); fp32 gradients, sent as
               fp32 or bf16 (ddp wire_dtype)
     one all-reduce of b bytes on n GPUs: NCCL's own cost model (src/graph/tuning.cc):
               t = latency(algorithm, protocol, n) + b / algbw, minimised, as NCCL's tuner does,
               over NVLS (one full node) and ring and tree with the Simple and LL128 protocols
     exposed communication, three ways:
       "0 %"    no overlap: every bucket after backward        exposed = sum(t_b)
       "80 %"   a fixed share of backward hides it (--overlap)  exposed = max(0, sum(t_b) - 0.8 * bwd)
       "sched"  bucket schedule: bucket i is ready when backward has produced its last gradient
                (backward time shared out by each layer's backward FLOPs), launches in order,
                all-reduces run one after another on the communication stream; exposed = what
                runs past the end of backward
     plus one small all-reduce per step (mpitrain's non-finite check), never hidden
     efficiency = t_c / (t_c + exposed)   (per-GPU throughput at n over that at 1)

Everything the model leaves out is listed in docs/scaling.md ("What the model leaves out").
"""

import argparse
import datetime
import json
import math
import os
import platform
import socket
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
MIB = 1 << 20
GPU_COUNTS = [8, 16, 32, 64, 128, 256, 512]


def const(value, unit, source):
    return {"value": value, "unit": unit, "source": source}


# Published constants. Each source was read for this model; docs/scaling.md repeats them.
CONSTANTS = {
    # --- the GPU ---
    "h100_peak_bf16_dense_tflops": const(
        989.4, "TFLOP/s",
        "H100 SXM5 dense BF16 tensor-core peak: 989.4 TFLOP/s (1,979 with 2:4 sparsity). "
        "glennklockwood.com/garden/processors/h100 (table 'Matrix' column); the same figure as "
        "src/runtime/gpu_info.cpp's datasheet table"),
    # --- inside a node: NVLink 4 through NVSwitch ---
    "nvlink4_per_gpu_gbps": const(
        900.0, "GB/s (both directions together; 450 each way)",
        "18 NVLink 4 links x 50 GB/s = 900 GB/s bidirectional per H100 SXM GPU: Scaleway's H100 "
        "SXM docs (scaleway/docs-content, migration-h100.mdx); NVIDIA/nccl#1264 (450 GB/s one way)"),
    "nvlink_ring_busbw_gbps": const(
        370.0, "GB/s busbw",
        "NCCL ring all-reduce over NVLink 4: 'With the protocol overhead (~20%) NCCL can get an "
        "effective NVLink bandwidth of 370GB/s, which you can observe as BusBw ... when running "
        "with NCCL_ALGO=RING' (S. Jeaugey, NVIDIA, in NVIDIA/nccl-tests#212)"),
    "nvls_busbw_8gpu_gbps": const(
        480.0, "GB/s busbw",
        "NVLink SHARP (NVLS) all-reduce on 8 H100: 'On 8 GPUs, you should reach a peak busBw of "
        "~480GB/s (algbw ~275GB/s)' (NVIDIA/nccl-tests#212); 476 GB/s 'in the expected range' "
        "(NVIDIA/nccl-tests#290); 479-480 GB/s at 8 GiB in NVIDIA/nccl-tests#347"),
    "gpus_per_node": const(8, "GPUs", "HGX/DGX H100: 8 SXM GPUs per node on one NVSwitch fabric"),
    # --- between nodes: InfiniBand NDR, one NIC per GPU ---
    "nic_line_rate_gbps": const(50.0, "GB/s per NIC (400 Gb/s)", "InfiniBand NDR: 400 Gb/s per port"),
    "nic_busbw_gbps": const(
        47.0, "GB/s per NIC",
        "'For NDR @ 400Gbps you should see 46-48GB/s per NIC' (D. Addison, NVIDIA, in "
        "NVIDIA/nccl-tests#290); 47 is the middle"),
    "nics_per_node": const(
        8, "NICs",
        "8 x 400 Gb/s InfiniBand per 8-GPU H100 node, e.g. Dell XE9680 H100 SXM in MLPerf "
        "inference v3.1 (mlcommons/inference_results_v3.1, systems/XE9680_H100_SXM_80GBx8_TRT.json: "
        "'host_network_card_count': '8x 400Gb Infiniband')"),
    "multinode_ring_rule": const(
        None, "",
        "On 3+ nodes NCCL uses rings for large sizes and the ring's busbw 'is probably "
        "reflecting the total NIC bandwidth' of a node (S. Jeaugey in NVIDIA/nccl-tests#160): "
        "ring busbw = min(NVLink ring busbw, NICs per node x per-NIC busbw). Cross-check: 248 "
        "nodes x 8 H200 (1,984 GPUs), 512 MB all-reduce 'typically measuring around 350G' busbw "
        "(NVIDIA/nccl-tests#283)"),
    # --- NCCL's own latency model (src/graph/tuning.cc, commit b6475625 of NVIDIA/nccl) ---
    "nccl_ring_simple_base_us": const(8.4, "us", "NCCL src/graph/tuning.cc baseLat[Ring][Simple]"),
    "nccl_ring_simple_nvlink_step_us": const(3.4, "us per step", "NCCL tuning.cc hwLat[NVLINK][Ring][Simple]"),
    "nccl_ring_simple_net_step_us": const(
        14.0, "us per step",
        "NCCL tuning.cc hwLat[NET][Ring][Simple]; ring latency = base + (2(n-1) - 2N) nvlink steps "
        "+ 2N network steps (N nodes), x1.4 'plateau effect of ring' on >1 node (compute capability >= 8.0)"),
    "nccl_tree_simple_hop_us": const(
        28.0, "us per hop",
        "NCCL tuning.cc hwLat[NVLINK][Tree][Simple] = hwLat[NET][Tree][Simple] = 28; tree latency = "
        "2 ((GPUs per node - 1) + log2 N) hops; tree busbw = 0.92 x ring busbw, algbw = busbw / 2, "
        "times NCCL's treeCorrectionFactor for the message size"),
    "nccl_nvls_simple_us": const(23.0, "us", "NCCL tuning.cc hwLat[NVLINK][NVLS][Simple] (one node)"),
    "nccl_ll128": const(
        {"ring_base": 14.0, "ring_nvlink": 1.9, "ring_net": 4.0, "tree_base": 14.0, "tree_nvlink": 1.25,
         "tree_net": 8.5, "ring_bw_factor": 0.92, "tree_bw_factor": 120.0 / 128.0},
        "us; bandwidth factors",
        "NCCL tuning.cc LL128 protocol (enabled by default on Hopper with NVLink and a NIC per PCIe "
        "switch): baseLat 14.0, hwLat NVLink ring 1.9 / tree 1.25, network ring 4.0 / tree 8.5; "
        "busbw x0.92 (ring), x120/128 (tree, on top of the tree's 0.92)"),
    "nccl_ll_latency_us": const(
        {"ring_base": 6.6, "ring_nvlink": 0.6, "ring_net": 2.7, "tree_base": 6.8, "tree_nvlink": 0.6, "tree_net": 5.0},
        "us", "NCCL tuning.cc LL protocol (small messages: the per-step 4-byte check)"),
}

# NCCL's treeCorrectionFactor[LL128] and [Simple], indexed by log2(bytes / 64), 64 B .. 256 MiB
# (tuning.cc); 1.0 above.
TREE_CORRECTION = {
    "LL128": [1.0, 1.0, 1.0, 1.0, 1.0, .9, .8, .8, .8, .7, .6, .6, .6, .6, .6, .6, .8, .9, .9, .9, .9, 1.0, 1.0],
    "Simple": [.9, .9, .9, .9, .9, .9, .9, .8, .7, .6, .6, .5, .5, .5, .5, .6, .7, .8, .7, .7, .8, .9, .9],
}


# ----------------------------------------------------------------------------------------------
# Part 1: alpha and beta from this project's measured all-reduce (CPU, MPI, shared memory)
# ----------------------------------------------------------------------------------------------

def weighted_line_fit(points, weights):
    """Least squares t = a + b x with weights; returns (a, b)."""
    s = sum(weights)
    sx = sum(w * x for (x, _), w in zip(points, weights))
    st = sum(w * t for (_, t), w in zip(points, weights))
    sxx = sum(w * x * x for (x, _), w in zip(points, weights))
    sxt = sum(w * x * t for (x, t), w in zip(points, weights))
    b = (s * sxt - sx * st) / (s * sxx - sx * sx)
    return (st - b * sx) / s, b


def git_commit():
    out = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], stdout=subprocess.PIPE,
                         stderr=subprocess.DEVNULL, text=True)
    return out.stdout.strip() or "unknown"


def cpu_model():
    with open("/proc/cpuinfo", encoding="utf-8") as f:
        names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
    return names[0] if names else platform.machine()


def fit_cpu(path):
    """alpha, beta of mpitrain's MPI all-reduce in one result file. Weights 1/t^2, i.e. the fit
    minimises relative error: the sizes span 1 KiB..64 MiB (five decades of time), and plain least
    squares lets the 64 MiB point alone decide (it gives a negative alpha on these data)."""
    with open(path, encoding="utf-8") as f:
        result = json.load(f)
    n = result["machine"]["ranks"]
    rows = result["detail"]["rows"]  # bench_allreduce's own JSON, as scripts/bench keeps it
    points = [(r["bytes"] * 2 * (n - 1) / n, r["mpitrain"]["time_us"] * 1e-6) for r in rows]
    alpha, beta = weighted_line_fit(points, [1 / t ** 2 for _, t in points])
    residuals = [(alpha + beta * x - t) / t for x, t in points]
    return {
        "file": os.path.relpath(path, ROOT),
        "ranks": n,
        "sizes": "%s .. %s" % (human_bytes(rows[0]["bytes"]), human_bytes(rows[-1]["bytes"])),
        "alpha_us": alpha * 1e6,
        "beta_s_per_byte": beta,
        "busbw_gbps": 1 / beta / 1e9,
        "max_relative_residual": max(abs(r) for r in residuals),
        "measured_busbw_gbps": {str(r["bytes"]): r["mpitrain"]["busbw_gbps"] for r in rows},
        "git_commit": result.get("git_commit"),
        "date": result.get("date"),
    }


def cpu_cross_check(fit, ddp_path):
    """What the fitted alpha/beta predict for bench_ddp at np 2, against what it measured."""
    with open(ddp_path, encoding="utf-8") as f:
        result = json.load(f)
    n = result["machine"]["ranks"]
    ddp = result["detail"]  # bench_ddp's own JSON, as scripts/bench keeps it
    steps = ddp["steps"] + 3  # bench_ddp counts its 3 warm-up steps in buckets_launched
    buckets = ddp["buckets_launched"] / steps
    nbytes = ddp["bytes_reduced_per_step"]
    predicted = buckets * fit["alpha_us"] * 1e-6 + fit["beta_s_per_byte"] * nbytes * 2 * (n - 1) / n
    return {
        "file": os.path.relpath(ddp_path, ROOT),
        "buckets_per_step": buckets,
        "bytes_per_step": nbytes,
        "predicted_allreduce_ms": predicted * 1e3,
        "measured_step_minus_plain_ms": (ddp["ddp_step_s"] - ddp["plain_step_s"]) * 1e3,
    }


# ----------------------------------------------------------------------------------------------
# Part 2: the models' parameters (registration order) and backward cost per layer
# ----------------------------------------------------------------------------------------------
# Each model is a list of "modules" in registration order: (name, [parameter element counts],
# backward FLOPs per sample of that module). Backward visits them in reverse; a module's
# parameters are ready when its backward has run. Backward FLOPs only share out the backward
# time; they need not be exact.

def gpt2_small(vocab=50257, seq=1024, layers=12, width=768):
    """GPT-2 small as src/models/gpt.cpp builds it (bias on, output head tied to wte)."""
    d, t = width, seq
    modules = []
    # wte's gradient is complete only after the embedding's backward (the very end), although the
    # tied output head's matmul - the largest single backward cost - runs first.
    modules.append(("wte", [vocab * d], 0.0))
    modules.append(("wpe", [t * d], 0.0))
    for i in range(layers):
        h = "h.%d." % i
        modules.append((h + "ln_1", [d, d], 0.0))
        # attention's scores and weighted sum (8 T d per token backward) sit between c_attn and c_proj
        modules.append((h + "attn.c_attn", [3 * d * d, 3 * d], t * (4 * 3 * d * d)))
        modules.append((h + "attn.core", [], t * (8 * t * d)))
        modules.append((h + "attn.c_proj", [d * d, d], t * (4 * d * d)))
        modules.append((h + "ln_2", [d, d], 0.0))
        modules.append((h + "mlp.c_fc", [4 * d * d, 4 * d], t * (4 * 4 * d * d)))
        modules.append((h + "mlp.c_proj", [4 * d * d, d], t * (4 * 4 * d * d)))
    modules.append(("ln_f", [d, d], 0.0))
    modules.append(("lm_head (tied to wte)", [], t * (4 * vocab * d)))
    n_params = sum(sum(p) for _, p, _ in modules)
    # The project's own count (src/models/gpt.cpp training_flops_per_token): 6 per parameter
    # except wpe (a lookup), plus 12 L d T for attention.
    flops_per_token = 6.0 * (n_params - t * d) + 12.0 * layers * d * t
    return {"name": "GPT-2 small", "modules": modules, "parameters": n_params,
            "training_flops_per_sample": flops_per_token * t, "sample": "sequence of %d tokens" % t}


def resnet(depths=(3, 4, 6, 3), classes=1000, image=224):
    """torchvision's ResNet-50 (v1.5: stride in the 3x3 conv) / ResNet-101 for depths (3, 4, 23, 3)."""
    modules = []
    macs_total = 0.0

    def conv(name, cin, cout, k, hw_out):
        nonlocal macs_total
        macs = cin * cout * k * k * hw_out * hw_out
        macs_total += macs
        modules.append((name, [cout * cin * k * k], 2.0 * 2.0 * macs))  # dgrad + wgrad, 2 FLOPs per MAC

    def bn(name, c):
        modules.append((name, [c, c], 0.0))

    hw = image // 2
    conv("conv1", 3, 64, 7, hw)
    bn("bn1", 64)
    hw //= 2  # max pool
    inplanes = 64
    for stage, (planes, blocks) in enumerate(zip((64, 128, 256, 512), depths)):
        for b in range(blocks):
            stride = 2 if (b == 0 and stage > 0) else 1
            name = "layer%d.%d." % (stage + 1, b)
            conv(name + "conv1", inplanes, planes, 1, hw)
            bn(name + "bn1", planes)
            hw_out = hw // stride
            conv(name + "conv2", planes, planes, 3, hw_out)
            bn(name + "bn2", planes)
            conv(name + "conv3", planes, planes * 4, 1, hw_out)
            bn(name + "bn3", planes * 4)
            if b == 0:
                conv(name + "downsample.0", inplanes, planes * 4, 1, hw_out)
                bn(name + "downsample.1", planes * 4)
            inplanes = planes * 4
            hw = hw_out
    macs_total += 2048 * classes
    modules.append(("fc", [classes * 2048, classes], 2.0 * 2.0 * 2048 * classes))
    n_params = sum(sum(p) for _, p, _ in modules)
    name = {(3, 4, 6, 3): "ResNet-50", (3, 4, 23, 3): "ResNet-101"}.get(tuple(depths), "ResNet")
    return {"name": name, "modules": modules, "parameters": n_params, "forward_macs_per_image": macs_total,
            "training_flops_per_sample": 3 * 2 * macs_total, "sample": "%dx%d image" % (image, image)}


def buckets_of(model, first_bucket_bytes, bucket_bytes):
    """mpitrain's layout (docs/ddp.md): parameters in reverse registration order; a bucket closes
    when the next gradient would take it past its cap (first_bucket_bytes for bucket 0,
    bucket_bytes after); a larger parameter gets a bucket alone. fp32 gradients (4 bytes).
    Returns [(fp32 bytes, fraction of backward done when the bucket's last gradient is ready)]."""
    modules = model["modules"]
    total_cost = sum(c for _, _, c in modules)
    done = 0.0
    ready = {}  # module index -> fraction of backward done after it
    for i in range(len(modules) - 1, -1, -1):
        done += modules[i][2]
        ready[i] = done / total_cost
    # wte (tied head) is complete only at the end: the embedding's backward is the last step.
    if modules[0][0] == "wte":
        ready[0] = 1.0
    buckets = []
    current, current_ready = 0, 0.0
    for i in range(len(modules) - 1, -1, -1):
        for numel in reversed(modules[i][1]):
            nbytes = 4 * numel
            cap = first_bucket_bytes if not buckets else bucket_bytes
            if current > 0 and current + nbytes > cap:
                buckets.append((current, current_ready))
                current, current_ready = 0, 0.0
            current += nbytes
            current_ready = max(current_ready, ready[i])
    if current:
        buckets.append((current, current_ready))
    return buckets


# ----------------------------------------------------------------------------------------------
# Part 2: NCCL's cost of one all-reduce on the cluster
# ----------------------------------------------------------------------------------------------

def cluster_from(args):
    c = {k: v["value"] for k, v in CONSTANTS.items() if not isinstance(v["value"], dict)}
    c["nics_per_node"] = args.nics_per_node
    c["ll"] = CONSTANTS["nccl_ll_latency_us"]["value"]
    c["ll128"] = CONSTANTS["nccl_ll128"]["value"]
    c["nvls"] = True
    return c


def allreduce_time(nbytes, n, c):
    """(seconds, "algorithm/protocol") of one all-reduce of nbytes on n GPUs: NCCL's own model
    (tuning.cc), the fastest of what NCCL would consider: NVLS on one full node; ring and tree,
    each with the Simple and LL128 protocols."""
    if n <= 1 or nbytes <= 0:
        return 0.0, "-"
    g = min(n, c["gpus_per_node"])
    nodes = math.ceil(n / g)
    us = 1e-6
    ring_busbw = c["nvlink_ring_busbw_gbps"]
    if nodes > 1:
        ring_busbw = min(ring_busbw, c["nics_per_node"] * c["nic_busbw_gbps"])
    ring_algbw = ring_busbw * n / (2 * (n - 1))
    steps = 2 * (n - 1)
    inter = 2 * nodes if nodes > 1 else 0
    log_size = int(math.log2(max(nbytes // 64, 1)))

    def tree_correction(proto):
        table = TREE_CORRECTION[proto]
        return table[log_size] if log_size < len(table) else 1.0

    ll128 = c["ll128"]
    candidates = []
    # ring, Simple (x1.4 'plateau effect of ring' across nodes)
    lat = c["nccl_ring_simple_base_us"] + (steps - inter) * c["nccl_ring_simple_nvlink_step_us"] \
        + inter * c["nccl_ring_simple_net_step_us"]
    lat *= 1.4 if nodes > 1 else 1.0
    candidates.append((lat * us + nbytes / (ring_algbw * 1e9), "ring/Simple"))
    # ring, LL128
    lat = ll128["ring_base"] + (steps - inter) * ll128["ring_nvlink"] + inter * ll128["ring_net"]
    candidates.append((lat * us + nbytes / (ll128["ring_bw_factor"] * ring_algbw * 1e9), "ring/LL128"))
    if nodes == 1 and c["nvls"] and n == c["gpus_per_node"]:
        nvls_algbw = c["nvls_busbw_8gpu_gbps"] * n / (2 * (n - 1))
        candidates.append((c["nccl_nvls_simple_us"] * us + nbytes / (nvls_algbw * 1e9), "NVLS"))
    if nodes > 1 and c.get("tree", True):
        tree_busbw = 0.92 * ring_busbw
        hops = 2 * ((g - 1) + math.log2(nodes))
        candidates.append((hops * c["nccl_tree_simple_hop_us"] * us
                           + nbytes / (0.5 * tree_busbw * tree_correction("Simple") * 1e9), "tree/Simple"))
        lat = ll128["tree_base"] + 2 * ((g - 1) * ll128["tree_nvlink"] + math.log2(nodes) * ll128["tree_net"])
        candidates.append((lat * us + nbytes / (0.5 * tree_busbw * ll128["tree_bw_factor"]
                                                  * tree_correction("LL128") * 1e9), "tree/LL128"))
    return min(candidates)


def small_allreduce_time(n, c):
    """The per-step 4-byte all-reduce (non-finite check): NCCL's LL protocol, latency only."""
    if n <= 1:
        return 0.0
    g = min(n, c["gpus_per_node"])
    nodes = math.ceil(n / g)
    ll = c["ll"]
    inter = 2 * nodes if nodes > 1 else 0
    ring = ll["ring_base"] + (2 * (n - 1) - inter) * ll["ring_nvlink"] + inter * ll["ring_net"]
    tree = ll["tree_base"] + 2 * ((g - 1) * ll["tree_nvlink"] + math.log2(nodes) * ll["tree_net"])
    return (min(ring, tree) if c.get("tree", True) else ring) * 1e-6


# ----------------------------------------------------------------------------------------------
# Part 2: one training step
# ----------------------------------------------------------------------------------------------

def step(workload, n, wire_bytes_per_element, c, overlap):
    compute = workload["compute_s"]
    backward = compute * 2.0 / 3.0
    times = []
    for fp32_bytes, ready in workload["buckets"]:
        t, algo = allreduce_time(fp32_bytes * wire_bytes_per_element / 4, n, c)
        times.append((t, ready, algo, fp32_bytes))
    comm = sum(t for t, _, _, _ in times)
    check = small_allreduce_time(n, c)
    # scheduled: in-order launch when ready, one collective at a time
    launch = end = 0.0
    for t, ready, _, _ in times:
        launch = max(launch, ready * backward)
        end = max(launch, end) + t
    exposed = {
        "0%": comm + check,
        "%d%%" % round(overlap * 100): max(0.0, comm - overlap * backward) + check,
        "sched": max(0.0, end - backward) + check,
    }
    largest = max(times, key=lambda x: x[3]) if times else (0, 0, "-", 0)
    return {
        "gpus": n,
        "nodes": math.ceil(n / c["gpus_per_node"]),
        "allreduce_ms_per_step": comm * 1e3,
        "check_allreduce_us": check * 1e6,
        "algorithm_for_largest_bucket": largest[2],
        "compute_ms": compute * 1e3,
        "exposed_ms": {k: v * 1e3 for k, v in exposed.items()},
        "efficiency": {k: compute / (compute + v) for k, v in exposed.items()},
    }


def workloads(args):
    first, cap = args.first_bucket_mib * MIB, args.bucket_mib * MIB
    peak = CONSTANTS["h100_peak_bf16_dense_tflops"]["value"] * 1e12
    gpt = gpt2_small()
    gpt["per_gpu_batch"] = args.gpt_seqs
    gpt["compute_s"] = gpt["training_flops_per_sample"] * args.gpt_seqs / (args.mfu * peak)
    gpt["compute_basis"] = "%.1f TFLOP per step / (MFU %.0f %% x %.1f TFLOP/s)" % (
        gpt["training_flops_per_sample"] * args.gpt_seqs / 1e12, args.mfu * 100, peak / 1e12)
    rn = resnet()
    rn["per_gpu_batch"] = args.resnet_batch
    rn["compute_s"] = args.resnet_batch / args.resnet_images_per_s
    rn["compute_basis"] = "%d images / %.0f images/s (assumed)" % (args.resnet_batch, args.resnet_images_per_s)
    rn["implied_mfu"] = rn["training_flops_per_sample"] * args.resnet_images_per_s / peak
    for w in (gpt, rn):
        w["buckets"] = buckets_of(w, first, cap)
    return [gpt, rn]


def scaling_table(wls, c, overlap):
    rows = []
    for w in wls:
        for n in GPU_COUNTS:
            row = {"model": w["name"], "gpus": n}
            for wire, size in (("fp32", 4), ("bf16", 2)):
                row[wire] = step(w, n, size, c, overlap)
            rows.append(row)
    return rows


def sensitivity(args, c):
    """Efficiency at 64 and 512 GPUs, scheduled overlap, one assumption changed at a time."""
    faster = {"mfu": args.mfu * 1.5, "resnet_images_per_s": args.resnet_images_per_s * 1.5}
    cases = [  # (label, wire bytes per element, cluster change, argument change)
        ("baseline", 2, {}, {}),
        ("fp32 on the wire", 4, {}, {}),
        ("1 NIC per node (47 GB/s between nodes)", 2, {"nics_per_node": 1}, {}),
        ("1 NIC per node, fp32 on the wire", 4, {"nics_per_node": 1}, {}),
        ("2 NICs per node (94 GB/s)", 2, {"nics_per_node": 2}, {}),
        ("buckets of 100 MiB", 2, {}, {"bucket_mib": 100}),
        ("buckets of 5 MiB", 2, {}, {"bucket_mib": 5}),
        ("compute 1.5x faster (MFU x1.5, images/s x1.5)", 2, {}, faster),
        ("compute 1.5x faster, 1 NIC per node", 2, {"nics_per_node": 1}, faster),
    ]
    out = []
    for label, wire, cluster_change, arg_change in cases:
        a = argparse.Namespace(**{**vars(args), **arg_change})
        cc = {**c, **cluster_change}
        wls = workloads(a)
        row = {"case": label}
        for w in wls:
            for n in (64, 512):
                row["%s @%d" % (w["name"], n)] = step(w, n, wire, cc, args.overlap)["efficiency"]["sched"]
        out.append(row)
    return out


def horovod_replay(args):
    """The same machinery with Horovod's published benchmark set-up (Horovod's README and
    docs/benchmarks: 128 servers x 4 Pascal GPUs, RoCE-capable 25 Gbit/s), ResNet-101, batch 64,
    fp32, 64 MiB buckets (Horovod's docs/tensor-fusion: "Default fusion buffer size is 64 MB").
    A calibration of the method against a published figure, not a statement about mpitrain."""
    c = {
        **{k: v["value"] for k, v in CONSTANTS.items() if not isinstance(v["value"], dict)},
        "gpus_per_node": 4,
        "nics_per_node": 1,
        "nic_busbw_gbps": 25 / 8,          # 25 Gbit/s line rate: an optimistic upper bound
        "nvlink_ring_busbw_gbps": 10.0,    # PCIe 3 between the 4 GPUs (assumed; the NIC binds first)
        "nccl_ring_simple_nvlink_step_us": 5.7,  # NCCL tuning.cc hwLat[PCI][Ring][Simple]
        "nvls": False,
        "ll": CONSTANTS["nccl_ll_latency_us"]["value"],
        # LL128 needs NVLink and compute capability >= 7.0 (tuning.cc): not on PCIe Pascal.
        "ll128": {**CONSTANTS["nccl_ll128"]["value"], "ring_base": 1e9, "tree_base": 1e9},
        # Rings only: NCCL's tree algorithm came with NCCL 2.4, after Horovod's 2017 benchmark.
        "tree": False,
    }
    w = resnet((3, 4, 23, 3))
    w["compute_s"] = 64 / args.horovod_images_per_s
    w["buckets"] = buckets_of(w, 64 * MIB, 64 * MIB)
    rows = []
    for n in (16, 64, 128, 256, 512):
        s = step(w, n, 4, c, args.overlap)
        rows.append({"gpus": n, "efficiency_0%": s["efficiency"]["0%"], "efficiency_sched": s["efficiency"]["sched"],
                     "allreduce_ms_per_step": s["allreduce_ms_per_step"]})
    return {"model": w["name"], "parameters": w["parameters"], "compute_ms": w["compute_s"] * 1e3,
            "images_per_s_per_gpu": args.horovod_images_per_s, "rows": rows,
            "published": "90 % at 512 GPUs for ResNet-101 and Inception V3, 68 % for VGG-16 "
                         "(Horovod docs/benchmarks.rst and README)"}


# ----------------------------------------------------------------------------------------------
# Output
# ----------------------------------------------------------------------------------------------

def human_bytes(n):
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return "%g %s" % (round(n / size, 2), unit)
    return "%d B" % n


def pct(x):
    return "%.1f %%" % (100 * x)


def markdown_tables(rows, overlap_key):
    lines = []
    for model in sorted({r["model"] for r in rows}, key=lambda m: [r["model"] for r in rows].index(m)):
        lines.append("")
        lines.append("%s (MODEL)" % model)
        lines.append("")
        lines.append("| GPUs | nodes | all-reduce ms/step fp32 | bf16 | eff. 0 %% overlap fp32 | bf16 | eff. %s overlap fp32 | bf16 "
                     "| eff. scheduled fp32 | bf16 | algorithm (largest bucket) |" % overlap_key.replace("%", " %"))
        lines.append("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
        for r in rows:
            if r["model"] != model:
                continue
            f, b = r["fp32"], r["bf16"]
            lines.append("| %d | %d | %.2f | %.2f | %s | %s | %s | %s | %s | %s | %s |" % (
                r["gpus"], f["nodes"], f["allreduce_ms_per_step"], b["allreduce_ms_per_step"],
                pct(f["efficiency"]["0%"]), pct(b["efficiency"]["0%"]),
                pct(f["efficiency"][overlap_key]), pct(b["efficiency"][overlap_key]),
                pct(f["efficiency"]["sched"]), pct(b["efficiency"]["sched"]), f["algorithm_for_largest_bucket"]))
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--mfu", type=float, default=0.40, help="GPT-2 small's model FLOPs utilisation on one H100 (assumed; default 0.40)")
    p.add_argument("--gpt-seqs", type=int, default=16, help="GPT-2 sequences of 1024 tokens per GPU per step (default 16)")
    p.add_argument("--resnet-images-per-s", type=float, default=3000.0,
                   help="ResNet-50 training images/s on one H100 (assumed; default 3000)")
    p.add_argument("--resnet-batch", type=int, default=64, help="ResNet-50 images per GPU per step (default 64)")
    p.add_argument("--bucket-mib", type=float, default=25.0, help="DDP bucket cap, MiB of fp32 gradients (default 25)")
    p.add_argument("--first-bucket-mib", type=float, default=1.0, help="cap of bucket 0 (default 1)")
    p.add_argument("--nics-per-node", type=int, default=8, help="400 Gb/s NICs per 8-GPU node (default 8)")
    p.add_argument("--overlap", type=float, default=0.8, help="fraction of backward that hides communication, for the simple rule (default 0.8)")
    p.add_argument("--horovod-images-per-s", type=float, default=1656.82 / 16,
                   help="per-GPU ResNet-101 images/s for the Horovod replay (default: Horovod's example output, 1656.82 on 16 GPUs)")
    p.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "scaling_model.json"),
                   help="JSON result (default bench/results/scaling_model.json; '-' writes none)")
    args = p.parse_args()
    overlap_key = "%d%%" % round(args.overlap * 100)

    print("THIS IS A MODEL, NOT A MEASUREMENT (bench/scaling_model.py; docs/scaling.md).")
    print()
    print("Part 1 - measured on this project's CPU VM (2 cores, Open MPI over shared memory), mpitrain's MpiCommunicator:")
    print("t = alpha + beta * bytes * 2(n-1)/n, least squares weighted by 1/t^2")
    print()
    print("| file | ranks | sizes | alpha us | beta s/byte | 1/beta = busbw GB/s | max rel. residual | measured busbw at 1 MiB / 64 MiB |")
    print("|---|---:|---|---:|---:|---:|---:|---|")
    fits = []
    for name in ("allreduce_mpi_np2.json", "allreduce_mpi_np4.json"):
        f = fit_cpu(os.path.join(ROOT, "bench", "results", name))
        fits.append(f)
        print("| %s | %d | %s | %.1f | %.3g | %.2f | %.0f %% | %.2f / %.2f GB/s |" % (
            f["file"], f["ranks"], f["sizes"], f["alpha_us"], f["beta_s_per_byte"], f["busbw_gbps"],
            100 * f["max_relative_residual"], f["measured_busbw_gbps"][str(MIB)], f["measured_busbw_gbps"][str(64 * MIB)]))
    check = cpu_cross_check(fits[0], os.path.join(ROOT, "bench", "results", "ddp_np2.json"))
    print()
    print("Cross-check (np 2, all sizes fit) against bench_ddp at np 2: %.1f buckets and %.1f MB per step -> "
          "predicted all-reduce %.1f ms; measured DDP step minus plain step %.1f ms." % (
              check["buckets_per_step"], check["bytes_per_step"] / 1e6, check["predicted_allreduce_ms"],
              check["measured_step_minus_plain_ms"]))

    c = cluster_from(args)
    wls = workloads(args)
    print()
    print("Part 2 - H100 SXM cluster, 8 GPUs and %d x NDR 400 Gb/s per node, published constants (MODEL):" % args.nics_per_node)
    for w in wls:
        print("  %s: %s parameters, %d buckets (%s fp32 gradients), %d x %s per GPU, compute %.1f ms per step (%s)%s" % (
            w["name"], format(w["parameters"], ","), len(w["buckets"]), human_bytes(4 * w["parameters"]),
            w["per_gpu_batch"], w["sample"], w["compute_s"] * 1e3, w["compute_basis"],
            "; implied MFU %.1f %%" % (100 * w["implied_mfu"]) if "implied_mfu" in w else ""))
    rows = scaling_table(wls, c, args.overlap)
    print(markdown_tables(rows, overlap_key))

    sens = sensitivity(args, c)
    print()
    print("Sensitivity (MODEL): efficiency with scheduled overlap, bf16 wire unless named, one assumption changed at a time")
    print()
    keys = [k for k in sens[0] if k != "case"]
    print("| case | " + " | ".join(keys) + " |")
    print("|---|" + "---:|" * len(keys))
    for r in sens:
        print("| %s | %s |" % (r["case"], " | ".join(pct(r[k]) for k in keys)))

    hv = horovod_replay(args)
    print()
    print("Calibration (MODEL of Horovod's published set-up: %s, 4 GPUs and 25 Gb/s per server, fp32, %.1f images/s per GPU):" % (
        hv["model"], hv["images_per_s_per_gpu"]))
    print()
    print("| GPUs | all-reduce ms/step | eff. 0 % overlap | eff. scheduled |")
    print("|---:|---:|---:|---:|")
    for r in hv["rows"]:
        print("| %d | %.1f | %s | %s |" % (r["gpus"], r["allreduce_ms_per_step"], pct(r["efficiency_0%"]), pct(r["efficiency_sched"])))
    print("Published: %s." % hv["published"])

    if args.out != "-":
        headline = next(r for r in sens if r["case"] == "baseline")["GPT-2 small @512"]
        result = {
            "name": "scaling_model",
            "measured": "nothing: A MODEL, not a measurement: data-parallel scaling efficiency of mpitrain's DDP at "
                        "8-512 H100 GPUs for GPT-2 small and ResNet-50, from NCCL's cost model with published "
                        "constants; and alpha/beta fitted to this project's measured CPU all-reduce",
            # The fields of bench/result_schema.py: the headline figure, and why nothing is compared.
            "mpitrain": {"value": headline, "unit": "scaling efficiency (modelled)",
                         "at": "GPT-2 small, 512 H100 GPUs, bf16 gradients on the wire, scheduled overlap"},
            "baseline": None,
            "no_baseline": "a model: nothing is run to compare with; horovod_replay applies the same model to "
                           "Horovod's published set-up as a calibration (docs/scaling.md)",
            "ratio": None,
            "goal": None,
            "no_goal": "a model predicts and is not held to a goal; measured scaling on GPUs is bench_allreduce "
                       "--backend nccl and torch_ddp_gpt on GPU machines",
            "goal_met": None,
            "machine": {"host": socket.gethostname(), "cpu": cpu_model()},
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "git_commit": git_commit(),
            "command": " ".join(["python3", "bench/scaling_model.py"] + sys.argv[1:]),
            "inputs": {k: v for k, v in vars(args).items() if k != "out"},
            "constants": CONSTANTS,
            "cpu_fit": {"note": "measured: mpitrain MpiCommunicator on the 2-core development VM, shared memory",
                        "fits": fits, "cross_check_bench_ddp_np2": check},
            "models": [{k: v for k, v in w.items() if k not in ("modules",)} for w in wls],
            "table": rows,
            "sensitivity": sens,
            "horovod_replay": hv,
        }
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)
            f.write("\n")
        print()
        print("wrote %s" % os.path.relpath(os.path.abspath(args.out), os.getcwd()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
