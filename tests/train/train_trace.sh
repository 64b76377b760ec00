#!/usr/bin/env bash
# The step timeline, end to end under mpirun -np 2: an MLP whose DDP buckets are known (5, from
# its parameter sizes and ddp.bucket_mb), accumulation 2, steps 4-7 traced with a checkpoint at
# step 5 and an eval at step 6. Checks trace.json: it parses; both ranks are named; each traced
# step has each phase once per rank (data wait, forward and backward once per micro-step), one
# all-reduce per bucket, in bucket order, starting after the synchronised backward started and
# ending before the optimizer; one rank's phases never overlap and run in order. The overlap
# figure in metrics.jsonl and in the log line equals the one recomputed here from the events.
# At np 1 the log says there is nothing to overlap.
# Environment (set by CTest): MPIEXEC, BIN.
set -euo pipefail
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
images=/usr/share/datasets/fashion-mnist
"$BIN/h5shard" idx --images "$images/t10k-images-idx3-ubyte.gz" --labels "$images/t10k-labels-idx1-ubyte.gz" \
  --out "$work/data" --name train --val 0.2 --shards 2 >/dev/null
# Buckets, in reverse parameter order (bytes): first bucket cap 1048 B -> [net.4.bias 40];
# cap 4194 B -> [net.4.weight 2560, net.2.bias 256], [net.2.weight 16384], [net.0.bias 256],
# [net.0.weight 200704].
cat > "$work/run.json" <<JSON
{
  "run": {"name": "trace", "dir": "$work/runs", "seed": 3},
  "model": {"name": "mlp", "mlp": {"input_dim": 784, "hidden": 64, "layers": 2, "num_classes": 10}},
  "data": {"train": {"manifest": "$work/data/train.json"}, "eval": {"manifest": "$work/data/val.json"}},
  "batch": {"micro_batch": 16, "accumulation": 2},
  "optimizer": {"name": "adamw", "lr": 0.003, "grad_clip": 1.0},
  "ddp": {"first_bucket_mb": 0.001, "bucket_mb": 0.004},
  "train": {"steps": 10},
  "checkpoint": {"every_steps": 5},
  "eval": {"every_steps": 6, "max_batches": 2},
  "log": {"every_steps": 5, "console": false, "trace_steps": 4, "trace_start_step": 4}
}
JSON
"$MPIEXEC" -np 2 --oversubscribe --bind-to none "$BIN/train" --config "$work/run.json" | tee "$work/out.txt"
python3 - "$work/runs/trace" "$work/out.txt" <<'PY'
import collections, json, re, sys
run, out = sys.argv[1], sys.argv[2]
doc = json.load(open(f"{run}/trace.json"))
events = doc["traceEvents"]
names = {e["pid"]: e["args"]["name"] for e in events if e["ph"] == "M" and e["name"] == "process_name"}
assert names == {0: "rank 0", 1: "rank 1"}, names
spans = [e for e in events if e["ph"] == "X"]
assert {e["pid"] for e in spans} == {0, 1}
STEPS, BUCKETS, MICRO = [4, 5, 6, 7], 5, 2
EPS = 1e-3  # µs: rounding of ts + dur
end = lambda e: e["ts"] + e["dur"]
by = collections.defaultdict(list)  # (rank, step) -> events
for e in spans:
    by[(e["pid"], e["args"]["step"])].append(e)
assert sorted(by) == [(r, s) for r in (0, 1) for s in STEPS], sorted(by)

for (rank, step), evs in sorted(by.items()):
    where = f"rank {rank} step {step}"
    count = collections.Counter(e["name"] for e in evs if e["cat"] != "comm")
    want = {"step": 1, "data wait": MICRO, "forward": MICRO, "backward": MICRO, "all-reduce wait": 1, "optimizer": 1}
    if step == 5: want["checkpoint"] = 1
    if step == 6: want["eval"] = 1
    assert count == want, f"{where}: {dict(count)} != {want}"
    one = lambda name, micro=None: next(e for e in evs if e["name"] == name and (micro is None or e["args"]["micro_step"] == micro))
    for name in ("data wait", "forward", "backward"):
        assert sorted(e["args"]["micro_step"] for e in evs if e["name"] == name) == list(range(MICRO)), (where, name)
    # The train thread's phases run one after another, never overlapping, in this order.
    order = [one(n, m) for m in range(MICRO) for n in ("data wait", "forward", "backward")]
    order += [one("all-reduce wait"), one("optimizer")] + [e for e in evs if e["name"] in ("checkpoint", "eval")]
    for a, b in zip(order, order[1:]):
        assert end(a) <= b["ts"] + EPS, f"{where}: {a['name']} ends at {end(a)} after {b['name']} starts at {b['ts']}"
    assert all(e["tid"] == 0 for e in order)
    whole = one("step")
    for e in order[:-1] if step in (5, 6) else order:  # checkpoint and eval follow the step
        assert whole["ts"] - EPS <= e["ts"] and end(e) <= end(whole) + EPS, f"{where}: {e['name']} outside its step"
    # One all-reduce per bucket, in bucket order, inside [synchronised backward start, optimizer start].
    comm = sorted((e for e in evs if e["cat"] == "comm"), key=lambda e: e["args"]["bucket"])
    assert [e["args"]["bucket"] for e in comm] == list(range(BUCKETS)), f"{where}: buckets {[e['args']['bucket'] for e in comm]}"
    assert all(e["tid"] == 1 and e["name"] == f"all-reduce bucket {e['args']['bucket']}" for e in comm)
    synced = one("backward", MICRO - 1)
    for e in comm:
        assert e["ts"] >= synced["ts"], f"{where}: bucket {e['args']['bucket']} starts before backward"
        assert end(e) <= one("optimizer")["ts"] + EPS, f"{where}: bucket {e['args']['bucket']} ends after the optimizer started"
    for a, b in zip(comm, comm[1:]):
        assert a["ts"] <= b["ts"], f"{where}: bucket {b['args']['bucket']} started before bucket {a['args']['bucket']}"

# The overlap, by the documented definition: per rank and step, |union(all-reduce) ∩ union(backward)|
# over |union(all-reduce)|, summed.
def union(intervals):
    merged = []
    for s, e in sorted(intervals):
        if merged and s <= merged[-1][1]: merged[-1][1] = max(merged[-1][1], e)
        else: merged.append([s, e])
    return merged
hidden = total = 0.0
for evs in by.values():
    comm = union([(e["ts"], end(e)) for e in evs if e["cat"] == "comm"])
    back = union([(e["ts"], end(e)) for e in evs if e["name"] == "backward"])
    total += sum(e - s for s, e in comm)
    hidden += sum(max(0.0, min(e, f) - max(s, g)) for s, e in comm for g, f in back)
overlap = hidden / total

records = [json.loads(l) for l in open(f"{run}/metrics.jsonl")]
traced = [r for r in records if "trace_file" in r]
assert len(traced) == 1, traced
r = traced[0]
assert r["trace_steps"] == [4, 7] and r["step"] == 7 and r["trace_buckets"] == BUCKETS and r["trace_file"] == "trace.json", r
assert abs(r["trace_overlap"] - overlap) <= 1e-9, (r["trace_overlap"], overlap)
assert abs(r["trace_comm_s"] - total / 1e6) <= 1e-12 and abs(r["trace_comm_hidden_s"] - hidden / 1e6) <= 1e-12, r
line = [l for l in open(out) if l.startswith("trace: ")]
assert len(line) == 1, line
m = re.search(r"trace: steps 4-7 written to (\S+); gradient communication hidden behind backward: ([0-9.]+) % "
              r"\(([0-9.]+) ms of ([0-9.]+) ms\)", line[0])
assert m and m.group(1) == f"{run}/trace.json", line[0]
assert m.group(2) == f"{overlap * 100:.1f}" and m.group(4) == f"{total / 1e3:.2f}", (line[0], overlap, total)
print(f"PASS: {len(spans)} events; {overlap * 100:.1f} % of {total / 1e3:.2f} ms of gradient all-reduce hidden behind backward")
PY

echo "--- one rank: nothing to overlap"
"$MPIEXEC" -np 1 "$BIN/train" --config "$work/run.json" --set run.name=one --set train.steps=5 | tee "$work/one.txt"
grep -q "trace: steps 4-5 written to $work/runs/one/trace.json; one rank, so no gradient communication to hide" "$work/one.txt"
python3 -c "import json,sys; r=[json.loads(l) for l in open(sys.argv[1]) if 'trace_file' in l]; assert len(r)==1 and 'trace_overlap' not in r[0], r" \
  "$work/runs/one/metrics.jsonl"
echo "PASS: one rank"
