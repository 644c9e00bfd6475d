"""Benchmark: one training step of the FP model vs the supernet, on the same batch, in one run.

Time: the two steps are interleaved (fp, supernet, fp, ...) in one process and the medians compared, so
machine noise hits both alike. Peak memory: each model runs its steps in a child process of its own;
reported as the peak RSS growth over the process's RSS just before the first step (activations, grads,
optimiser state, quantizer temporaries) and, on CUDA, as max_memory_allocated.

    python tools/bench_supernet_step.py --model ../shared/assets/models/all-MiniLM-L6-v2
    python tools/bench_supernet_step.py --model bert-base --batch-size 8      # random BERT-base config
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch
from transformers import BertConfig, BertForSequenceClassification

from benchlib import machine, run_child, step_memory, sync
from supernet import SearchSpace, param_sets, to_supernet

BERT_BASE = dict(vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072)


def build(model: str, supernet: bool, space: SearchSpace, device: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if model == "bert-base":
        net = BertForSequenceClassification(BertConfig(**BERT_BASE, num_labels=2))
    else:
        net = BertForSequenceClassification.from_pretrained(model, num_labels=2)
    if supernet:
        to_supernet(net, space)
    return net.to(device).train()


def make_batch(batch_size: int, seq_len: int, device: str) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 30000, (batch_size, seq_len), generator=g)
    return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device),
            "labels": torch.randint(0, 2, (batch_size,), generator=g).to(device)}


def make_step(net: torch.nn.Module, batch: dict[str, torch.Tensor]):
    sets = param_sets(net)
    groups = [{"params": sets.weights, "lr": 2e-5}]
    if sets.arch:
        groups.append({"params": sets.arch, "lr": 1e-3})
    if sets.scales:
        groups.append({"params": sets.scales, "lr": 1e-4})
    opt = torch.optim.AdamW(groups)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        net(**batch).loss.backward()
        opt.step()

    return step


def memory_child(args: argparse.Namespace, space: SearchSpace) -> None:
    net = build(args.model, args.child == "supernet", space, args.device)
    step = make_step(net, make_batch(args.batch_size, args.seq_len, args.device))
    print(json.dumps(step_memory(step, args.device)))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="../shared/assets/models/all-MiniLM-L6-v2", help="HF folder/id, or 'bert-base' (random)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--steps", type=int, default=8, help="timed steps per model (after one warm-up each)")
    p.add_argument("--w-bits", type=int, nargs="+", default=[0, 2, 4, 8])
    p.add_argument("--groups", type=int, default=128)
    p.add_argument("--a-bits", type=int, nargs="+", default=[8])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json-out", help="also write the results here")
    p.add_argument("--child", choices=["fp", "supernet"], help=argparse.SUPPRESS)
    args = p.parse_args()
    space = SearchSpace(w_bits=args.w_bits, groups=args.groups, a_bits=args.a_bits)
    if args.child:
        memory_child(args, space)
        return

    mem = {}  # first, while this process is small
    for name in ("fp", "supernet"):
        cmd = ["--child", name, "--model", args.model, "--batch-size", str(args.batch_size),
               "--seq-len", str(args.seq_len), "--groups", str(args.groups), "--device", args.device,
               "--w-bits", *map(str, args.w_bits), "--a-bits", *map(str, args.a_bits)]
        mem[name] = run_child(__file__, cmd)

    batch = make_batch(args.batch_size, args.seq_len, args.device)
    steps = {"fp": make_step(build(args.model, False, space, args.device), batch),
             "supernet": make_step(build(args.model, True, space, args.device), batch)}
    times: dict[str, list[float]] = {"fp": [], "supernet": []}
    for rep in range(args.steps + 1):
        for name, step in steps.items():
            sync(args.device)
            t = time.perf_counter()
            step()
            sync(args.device)
            if rep > 0:  # the first round is warm-up
                times[name].append(time.perf_counter() - t)
        print(f"round {rep}: " + ", ".join(f"{k} {v[-1]:.3f}s" for k, v in times.items() if v), file=sys.stderr)
    del steps

    fp, sn = statistics.median(times["fp"]), statistics.median(times["supernet"])
    result = {
        "model": args.model, "device": args.device, "machine": machine(args.device),
        "batch": f"{args.batch_size}x{args.seq_len}", "w_bits": args.w_bits, "groups": args.groups, "a_bits": args.a_bits,
        "fp_step_s": round(fp, 4), "supernet_step_s": round(sn, 4), "time_ratio": round(sn / fp, 3),
        # on a shared machine the fastest step is the least disturbed one: its ratio is the cleaner figure
        "time_ratio_of_min": round(min(times["supernet"]) / min(times["fp"]), 3),
        "fp_step_spread_s": [round(min(times["fp"]), 4), round(max(times["fp"]), 4)],
        "supernet_step_spread_s": [round(min(times["supernet"]), 4), round(max(times["supernet"]), 4)],
        "fp_step_peak_mb": round(mem["fp"]["step_peak_mb"], 1), "supernet_step_peak_mb": round(mem["supernet"]["step_peak_mb"], 1),
        "memory_ratio": round(mem["supernet"]["step_peak_mb"] / mem["fp"]["step_peak_mb"], 3),
        "fp_rss_peak_mb": round(mem["fp"]["rss_peak_mb"], 1), "supernet_rss_peak_mb": round(mem["supernet"]["rss_peak_mb"], 1),
    }
    if "cuda_step_peak_mb" in mem["fp"]:
        result["cuda_memory_ratio"] = round(mem["supernet"]["cuda_step_peak_mb"] / mem["fp"]["cuda_step_peak_mb"], 3)
    print(json.dumps(result, indent=2))
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
