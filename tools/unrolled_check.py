"""What `search.second_order=true` changes: the DARTS unrolled architecture gradient against the first-order one.

On a real fine-tuned checkpoint and real batches of its task (the weights half and the architecture half, as
`stage=search` cuts them), for each virtual step size xi: the cosine between the unrolled gradient of the
architecture logits and the first-order one, and the relative size of their difference. The default xi is
the weights' lr (2e-5 with AdamW, as DARTS takes the weights' SGD lr); "adam" is the xi whose SGD step moves
the weights as far as an Adam step of that lr does (lr / RMS of the weights' gradient). Then the same
finite-difference Hessian-vector product at two radii (does the estimate hold still on quantized weights?),
and the time of a second-order architecture step over a first-order one (interleaved, medians). First, the
scale of the first-order gradient itself, from the task loss and from the size penalty apart: the mean |gradient|
of a logit, and how far one step of the paper's SGD at lr 0.1 moves it against Adam's (about its lr per step,
whatever the gradient's scale), the reason the search's logits default to Adam.

    MPQ_ASSETS=../shared/assets python tools/unrolled_check.py runs/bench/fp/mrpc/checkpoint --task mrpc --space lowbit
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import time

import torch
import torch.nn.functional as F

from search.bilevel import BilevelStep, SizeTerm, finite_difference_hvp, task_loss
from search.budget import Budget
from search.config import SearchConfig
from search.data import load_raw, make_loader, split_for_search, tokenize
from search.dnas import weight_optimizer
from search.loop import Endless
from search.models import load_task_model, load_tokenizer
from supernet import QuantMode, Scope, SearchSpace, param_sets, to_supernet

SPACES = {"default": SearchSpace(), "lowbit": SearchSpace(w_bits=[1, 2, 3, 4], w_grid=QuantMode.MIDRISE)}


def batches(args: argparse.Namespace, tokenizer) -> tuple[list[dict], list[dict]]:
    """`args.pairs` batches of the weights half and as many of the architecture half."""
    raw = load_raw(args.task, args.data_dir, splits=("train",))
    train = tokenize(raw, args.task, tokenizer, args.max_seq_len, cache_dir=None)["train"]
    weight_part, arch_part = split_for_search(train, 0.5, seed=args.seed)
    take = lambda ds, seed: [b for b, _ in zip(make_loader(ds, tokenizer, args.batch_size, True, seed), range(args.pairs))]
    return take(weight_part, args.seed), take(arch_part, args.seed + 1)


def arch_grad(step: BilevelStep, logits: list, arch_batch: dict, train_batch: dict) -> torch.Tensor:
    """The architecture logits' gradient of one architecture step (no optimiser step)."""
    step.arch_gradients(arch_batch, train_batch)
    return torch.cat([p.grad.flatten() for p in logits]).clone()


def gradient_scale(net, logits: list, size: SizeTerm, a_batches: list[dict], arch_lr: float) -> dict[str, float]:
    """Mean |d loss / d logit| over every logit, of the task loss (median over the batches) and of the size
    penalty, and one step of each optimiser: SGD at lr 0.1 moves a logit by 0.1 x |gradient| (momentum at
    most multiplies that by 10 over many steps), Adam by about its lr."""
    def mean_abs(loss: torch.Tensor) -> float:
        grads = torch.autograd.grad(loss, logits, allow_unused=True)
        flat = torch.cat([(torch.zeros_like(p) if g is None else g).flatten() for p, g in zip(logits, grads)])
        return flat.abs().mean().item()

    task = statistics.median(mean_abs(task_loss(net, ab)) for ab in a_batches)
    penalty = mean_abs(size(net)[0])
    return {"logits": sum(p.numel() for p in logits), "task_grad": task, "size_grad": penalty,
            "sgd_0.1_step": 0.1 * (task + penalty), "adam_step": arch_lr}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model", help="a fine-tuned checkpoint folder (the finetune stage's checkpoint)")
    ap.add_argument("--task", default="mrpc")
    ap.add_argument("--data-dir", default=os.environ.get("MPQ_ASSETS"), help="the offline data folder (default $MPQ_ASSETS)")
    ap.add_argument("--space", choices=sorted(SPACES), default="lowbit")
    ap.add_argument("--groups", type=int, default=SearchSpace().groups, help="groups per matrix (-1: one per row)")
    ap.add_argument("--avg-bits", type=float, default=2.0, help="the budget of the size penalty")
    ap.add_argument("--xi", nargs="+", default=["lr", "1e-3", "adam"], help="step sizes: numbers, lr, adam")
    ap.add_argument("--pairs", type=int, default=3, help="(weights batch, architecture batch) pairs")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--max-seq-len", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3, help="timed (first, second order) pairs")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--json-out")
    args = ap.parse_args()
    if args.data_dir is None:
        ap.error("no data folder: pass --data-dir or set MPQ_ASSETS")
    torch.manual_seed(args.seed)
    tokenizer = load_tokenizer(args.model)
    w_batches, a_batches = batches(args, tokenizer)
    net = load_task_model(args.model, args.task)
    to_supernet(net, dataclasses.replace(SPACES[args.space], groups=args.groups))
    net.eval()  # no dropout: every gradient below sees the same network
    sets = param_sets(net)
    cfg = SearchConfig()
    size = SizeTerm(cfg.size_weight, Budget(Scope.ENCODER, avg_bits=args.avg_bits))

    def make(second: bool, xi: float | None = None) -> BilevelStep:
        return BilevelStep(net, sets.weights, sets.arch + sets.scales, weight_optimizer(sets.weights, cfg.lr, cfg.weight_decay),
                           [], Endless(a_batches), size, second_order=second, xi=xi)  # arch_grad passes its batches

    rms = []
    for wb in w_batches:
        grads = [g for g in torch.autograd.grad(task_loss(net, wb), sets.weights, allow_unused=True) if g is not None]
        rms.append((sum(g.pow(2).sum() for g in grads) / sum(g.numel() for g in grads)).sqrt().item())
    xis = {"lr": cfg.lr, "adam": cfg.lr / statistics.median(rms)}
    scale = gradient_scale(net, sets.arch, size, a_batches, cfg.arch_lr)
    print(json.dumps(scale), flush=True)
    rows = []
    first = make(False)
    g1s = [arch_grad(first, sets.arch, ab, wb) for wb, ab in zip(w_batches, a_batches)]
    for name in args.xi:
        xi = xis[name] if name in xis else float(name)
        step = make(True, xi)
        cos, rel = [], []
        for g1, wb, ab in zip(g1s, w_batches, a_batches):
            g2 = arch_grad(step, sets.arch, ab, wb)
            cos.append(F.cosine_similarity(g1, g2, dim=0).item())
            rel.append(((g2 - g1).norm() / g1.norm()).item())
        rows.append({"xi": xi, "label": name, "cosine": statistics.median(cos), "cosine_range": [min(cos), max(cos)],
                     "relative_difference": statistics.median(rel)})
        print(json.dumps(rows[-1]), flush=True)
    # the finite-difference HVP at two radii, along the weights' own gradient direction
    fd = []
    for wb, ab in zip(w_batches, a_batches):
        v = [g if g is not None else torch.zeros_like(w) for w, g in
             zip(sets.weights, torch.autograd.grad(task_loss(net, ab), sets.weights, allow_unused=True))]
        h = [torch.cat([t.flatten() for t in finite_difference_hvp(lambda: task_loss(net, wb), sets.weights, sets.arch, v, r)])
             for r in (1e-2, 1e-3)]
        fd.append(F.cosine_similarity(h[0], h[1], dim=0).item())
    radius = {"fd_radius_cosine": statistics.median(fd), "fd_radius_cosine_range": [min(fd), max(fd)]}
    print(json.dumps(radius), flush=True)
    # time: one architecture gradient, first against second order, interleaved
    second = make(True)
    times: dict[bool, list[float]] = {False: [], True: []}
    wb, ab = w_batches[0], a_batches[0]
    arch_grad(first, sets.arch, ab, wb), arch_grad(second, sets.arch, ab, wb)  # warm-up
    for _ in range(args.rounds):
        for s in (first, second):
            start = time.perf_counter()
            arch_grad(s, sets.arch, ab, wb)
            times[s.second_order].append(time.perf_counter() - start)
    timing = {"first_order_s": statistics.median(times[False]), "second_order_s": statistics.median(times[True])}
    timing["ratio"] = timing["second_order_s"] / timing["first_order_s"]
    print(json.dumps(timing), flush=True)
    print(f"\n{scale['logits']} logits: mean |gradient| {scale['task_grad']:.2g} from the task, {scale['size_grad']:.2g} from the "
          f"size penalty; one step moves a logit by {scale['sgd_0.1_step']:.2g} with SGD at 0.1, by about "
          f"{scale['adam_step']:g} with Adam at {scale['adam_step']:g}")
    print(f"\nrms of the weights' gradient {statistics.median(rms):.3g}; {args.pairs} batch pairs of {args.batch_size}\n")
    print("| xi | cosine with the first-order gradient | |second - first| / |first| |")
    print("|---|---|---|")
    for r in rows:
        print(f"| {r['xi']:.3g} ({r['label']}) | {r['cosine']:.4f} [{r['cosine_range'][0]:.4f}, {r['cosine_range'][1]:.4f}] "
              f"| {r['relative_difference']:.3g} |")
    print(f"\nfinite-difference HVP, radius 1e-2 against 1e-3: cosine {radius['fd_radius_cosine']:.3f} "
          f"[{radius['fd_radius_cosine_range'][0]:.3f}, {radius['fd_radius_cosine_range'][1]:.3f}]")
    print(f"architecture gradient: first order {timing['first_order_s']:.2f} s, second order {timing['second_order_s']:.2f} s "
          f"({timing['ratio']:.2f}x)")
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump({"args": vars(args), "gradient_scale": scale, "rms_weight_grad": statistics.median(rms), "xi": rows,
                       **radius, **timing}, f, indent=2)


if __name__ == "__main__":
    main()
