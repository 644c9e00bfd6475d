"""Benchmark: what the search and HAWQ-V2 cost against FP fine-tuning, on the same batches, in one run.

Search: the real first-order `BilevelStep` of `stage=search` (an architecture + scale step on one batch of
the architecture half, then a weight step on one batch of the weights half) against the FP fine-tuning
step (forward, backward, AdamW). One search iteration consumes two batches, so a search over N examples
(both halves once) is N / (2B) iterations and an FP epoch over N is N / B steps:
    search / FP epoch over the same N = median(search iteration) / (2 * median(FP step)).
Each configuration of candidates and groups is timed interleaved with the FP step (fp, search, fp, ...).

Trace (--trace): HAWQ-V2's measurement with one Hutchinson probe (the FP model's gradient graph with eager
attention, then one Hessian-vector product over every quantized weight, giving every group's trace sample
at once) against the FP step, per grouping; plus, with --probes P, P probes on the default grouping (the
graph is built once, each further probe is one product) and the relative change after each. With
--batches B as well: B batches x P probes taken batch by batch (each batch's graph built once, as
`stage=hawq` does) against product by product (each product rebuilding every batch's graph).

    python tools/bench_cost.py --model ../shared/assets/models/all-MiniLM-L6-v2
    python tools/bench_cost.py --trace --probes 100
    python tools/bench_cost.py --trace --probes 4 --batches 2 --rounds 2
    python tools/bench_cost.py --qat          # a QAT step (KD: live teacher, then teacher table) against the FP step

Memory (--memory): the peak memory of each kind of step (FP step, search iteration, one HAWQ-V2 probe, QAT
step), each in a child process of its own (tools/benchlib.py): the process's peak RSS (models included)
and its growth over the RSS just before the first step; on CUDA, torch's max_memory_allocated likewise.

    python tools/bench_cost.py --memory --json-out runs/bench/cost/memory.json
"""
from __future__ import annotations

import argparse
import itertools
import json
import statistics
import time

import torch
from transformers import AutoConfig, BertForSequenceClassification

from benchlib import machine, run_child, step_memory, sync
from search.bilevel import BilevelStep, SizeTerm, task_loss
from search.budget import Budget
from search.config import SearchConfig, Sensitivity
from search.dnas import upper_optimizers, weight_optimizer
from search.hawq import measure_curvature
from search.hessian import Hessian, rademacher
from search.loop import Endless
from supernet import Scope, SearchSpace, param_sets, sites, to_supernet

# (label, w_bits, groups): candidates 2..5 at 128 groups, then groups 1 / 12 / 128 / per row at {0,2,4,8}
CONFIGS = [("K=2 {0,4}", [0, 4], 128), ("K=3 {0,2,4}", [0, 2, 4], 128), ("K=4 {0,2,4,8}", [0, 2, 4, 8], 128),
           ("K=5 {0,2,3,4,8}", [0, 2, 3, 4, 8], 128), ("G=1", [0, 2, 4, 8], 1), ("G=12", [0, 2, 4, 8], 12),
           ("G=per-row", [0, 2, 4, 8], -1)]


MEMORY_KINDS = ("fp", "search", "probe", "qat")
DEVICE = "cpu"  # set once by main() from --device


def build(model: str, space: SearchSpace | None) -> torch.nn.Module:
    torch.manual_seed(0)
    net = BertForSequenceClassification.from_pretrained(model, num_labels=2)
    if space is not None:
        to_supernet(net, space)
    return net.to(DEVICE).train()


def make_batch(batch_size: int, seq_len: int, seed: int, vocab: int = 30522) -> dict[str, torch.Tensor]:
    """Random tokens of `model`'s vocabulary (ids 1000-29999 of BERT's 30522, as every figure was measured)."""
    g = torch.Generator().manual_seed(seed)
    high = min(30000, vocab)
    ids = torch.randint(min(1000, high // 2), high, (batch_size, seq_len), generator=g)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.randint(0, 2, (batch_size,), generator=g)}
    return {k: v.to(DEVICE) for k, v in batch.items()}


def fp_step(net: torch.nn.Module, batch: dict[str, torch.Tensor]):
    opt = weight_optimizer(list(net.parameters()), 2e-5, 0.01)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        task_loss(net, batch).backward()
        opt.step()

    return step


def search_step(net: torch.nn.Module, weight_batch: dict[str, torch.Tensor], arch_batch: dict[str, torch.Tensor]):
    sets = param_sets(net)
    cfg = SearchConfig()
    w_opt = weight_optimizer(sets.weights, cfg.lr, cfg.weight_decay)
    step_fn = BilevelStep(net, sets.weights, sets.arch + sets.scales, w_opt, upper_optimizers(sets.arch, sets.scales, cfg),
                          Endless([arch_batch]), SizeTerm(cfg.size_weight, Budget(Scope.ENCODER, avg_bits=3.0)),
                          log_mass_every=10**9)
    count = itertools.count()
    return lambda: step_fn(weight_batch, next(count))


def probe_step(model: str, space: SearchSpace, batch: dict[str, torch.Tensor]):
    """HAWQ-V2's measurement with one probe: the gradient graph of the FP model (eager attention) and one
    Hessian-vector product, every group's trace sample from it."""
    supernet, fp = build(model, space), build(model, None)
    seeds = itertools.count()
    return lambda: measure_curvature(fp, supernet, [batch], Sensitivity.trace, max_probes=1, tol=1e-12, seed=next(seeds))


def multi_batch_steps(model: str, batches: list[dict[str, torch.Tensor]], probes: int):
    """HAWQ-V2 over several batches, `probes` probes each, two ways: batch by batch (each batch's gradient
    graph built once for all its probes: search.hessian.hutchinson) and product by product (every
    Hessian-vector product over all batches, rebuilding each batch's graph: what it did before)."""
    supernet, fp = build(model, SearchSpace()), build(model, None)
    batch_major = lambda: measure_curvature(fp, supernet, batches, Sensitivity.trace,  # noqa: E731
                                            max_probes=probes, tol=0.0, seed=0)
    names = [name for name, _ in sites(supernet)]
    params = [fp.get_submodule(n).weight for n in names]

    def product_major() -> None:
        hessian = Hessian([lambda b=b: task_loss(fp, b) for b in batches], params)
        gen = torch.Generator().manual_seed(0)
        for _ in range(probes):
            hessian.product([rademacher(p, gen) for p in params])

    batch_major()  # puts fp in eval mode with eager attention and gradients on the sites' weights only
    return batch_major, product_major


def qat_bench_step(model: str, batch: dict[str, torch.Tensor], table: bool = False):
    """One QAT step (search/qat.py: task loss + KD from the FP teacher, AdamW, LSQ steps) of a mixed
    {0,2,4,8}-bit architecture drawn at random per group (seeded). With `table`, KD reads the teacher's
    logits from a search.teacher.TeacherTable (qat.teacher_cache, the default) instead of running it."""
    from accelerate import Accelerator
    from transformers import get_constant_schedule

    from search.qat import qat_optimizer, qat_step
    from search.data import INDEX
    from search.quantized import quantize
    from search.tasks import TaskKind
    from search.teacher import TeacherTable
    from supernet import Architecture

    net = build(model, SearchSpace())
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, site in sites(net):
            if site.wq.alpha is not None:
                site.wq.alpha.copy_(torch.randn(site.wq.alpha.shape, generator=g))
    arch = Architecture.from_supernet(net)
    student = quantize(build(model, None), arch, SearchSpace()).train()
    teacher = build(model, None).eval()
    if table:
        with torch.no_grad():
            teacher = TeacherTable.full(teacher(**batch).logits.float().cpu())
        batch = {**batch, INDEX: torch.arange(len(batch["input_ids"]))}
    opt = qat_optimizer(student, 2e-5, 2e-5, 0.01)
    step = qat_step(student, teacher, opt, get_constant_schedule(opt), Accelerator(cpu=not DEVICE.startswith("cuda")), TaskKind.CLASSIFICATION,
                    kd_weight=0.5, kd_temperature=2.0, hidden_weight=0.0, dampen_weight=0.0, max_grad_norm=1.0)
    count = itertools.count()
    return lambda: step(batch, next(count)), arch.avg_bits("encoder")


def memory_step(kind: str, model: str, batch_size: int, seq_len: int):
    """The step whose peak memory --memory measures: search and QAT at the default space ({0,2,4,8} x 128)."""
    vocab = AutoConfig.from_pretrained(model).vocab_size
    wb, ab = make_batch(batch_size, seq_len, 0, vocab), make_batch(batch_size, seq_len, 1, vocab)
    steps = {"fp": lambda: fp_step(build(model, None), wb),
             "search": lambda: search_step(build(model, SearchSpace()), wb, ab),
             "probe": lambda: probe_step(model, SearchSpace(), wb),
             "qat": lambda: qat_bench_step(model, wb)[0]}
    return steps[kind]()


def memory(args: argparse.Namespace) -> list[dict]:
    """Each kind of step in a child process of its own (this script with --memory-child)."""
    rows = []
    for kind in MEMORY_KINDS:
        row = run_child(__file__, ["--memory-child", kind, "--model", args.model, "--device", args.device,
                                   "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len)])
        row = {"memory": kind, "batch": f"{args.batch_size}x{args.seq_len}", **row}
        rows.append(row)
        print(json.dumps(row), flush=True)
    fp = rows[0]
    for row in rows:
        row["step_peak_over_fp"] = row["step_peak_mb"] / fp["step_peak_mb"]
        if "cuda_step_peak_mb" in row:
            row["cuda_step_peak_over_fp"] = row["cuda_step_peak_mb"] / fp["cuda_step_peak_mb"]
    return rows


def interleaved(a, b, rounds: int) -> tuple[list[float], list[float]]:
    a(), b()  # warm-up
    ta, tb = [], []
    for _ in range(rounds):
        for fn, out in ((a, ta), (b, tb)):
            sync(DEVICE)
            start = time.perf_counter()
            fn()
            sync(DEVICE)
            out.append(time.perf_counter() - start)
    return ta, tb


def table(paths: list[str]) -> None:
    """The Markdown rows of earlier --json-out files."""
    records = []
    for path in paths:
        with open(path) as f:
            records += json.load(f)["results"]
    memory_rows = [r for r in records if "memory" in r]
    if memory_rows:
        labels = {"fp": "FP step", "search": "search iteration", "probe": "HAWQ-V2, one probe", "qat": "QAT step"}
        cuda = "cuda_peak_mb" in memory_rows[0]
        print("| step (batch) | peak RSS, models included (MB) | growth over the models (MB) | growth vs FP step |"
              + (" CUDA peak (MB) | CUDA growth (MB) |" if cuda else ""))
        print("|---|---|---|---|" + ("---|---|" if cuda else ""))
        for r in memory_rows:
            print(f"| {labels[r['memory']]} ({r['batch']}) | {r['rss_peak_mb']:.0f} | {r['step_peak_mb']:.0f} | "
                  f"{r['step_peak_over_fp']:.2f}x |" + (f" {r['cuda_peak_mb']:.0f} | {r['cuda_step_peak_mb']:.0f} |" if cuda else ""))
        records = [r for r in records if "memory" not in r]
        if not records:
            return
        print()
    print("| measurement | groups | FP step (s) | other (s) | ratio | search over an FP epoch |")
    print("|---|---|---|---|---|---|")
    for r in records:
        if "batch_by_batch_s" in r:
            per = r["per_product_over_fp_step"]
            print(f"| HAWQ-V2 over {r['config']}: batch by batch {r['batch_by_batch_s']:.1f} s, product by product "
                  f"{r['product_by_product_s']:.1f} s; per product {per['batch_by_batch']:.2f}x against "
                  f"{per['product_by_product']:.2f}x an FP step | | {r['fp_step_s']:.3f} | | "
                  f"{r['product_by_product_s'] / r['batch_by_batch_s']:.2f}x faster | |")
            continue
        if "config" not in r:  # the convergence record
            changes = ", ".join(f"{k}: {v:.3g}" for k, v in r["change_after"].items())
            print(f"| Hutchinson, {r['probes']} probes on {r['groups']} groups: {r['wall_s']:.1f} s, "
                  f"{r['s_per_probe']:.2f} s per probe; relative change after N probes {changes}; "
                  f"{r['negative_groups']} negative estimates | | | | | |")
            continue
        kind = next(k for k in ("search_iter_s", "probe_s", "qat_step_s") if k in r)
        ratio = r[next(k for k in r if k.endswith("_over_fp_step"))]
        label = {"search_iter_s": "search iteration", "probe_s": "one probe", "qat_step_s": "QAT step"}[kind]
        epoch = f"{r['search_over_fp_epoch']:.2f}x" if "search_over_fp_epoch" in r else ""
        print(f"| {label}: {r['config']} | {r.get('groups', '')} | {r['fp_step_s']:.3f} | {r[kind]:.3f} | "
              f"{ratio:.2f}x | {epoch} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--table", nargs="+", metavar="JSON", help="print earlier --json-out results as Markdown and stop")
    p.add_argument("--model", default="../shared/assets/models/all-MiniLM-L6-v2")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--rounds", type=int, default=4, help="timed (fp, other) pairs per configuration")
    p.add_argument("--only", nargs="*", help="labels of CONFIGS to run (default: all)")
    p.add_argument("--trace", action="store_true", help="time a Hutchinson probe instead of a search iteration")
    p.add_argument("--probes", type=int, default=0, help="with --trace: also run this many probes for convergence")
    p.add_argument("--batches", type=int, default=0,
                   help="with --trace and --probes: time B batches x P probes batch by batch against product by product")
    p.add_argument("--qat", action="store_true", help="time a QAT step (KD on) of a mixed architecture instead")
    p.add_argument("--memory", action="store_true", help="peak memory of each kind of step, each in a child process")
    p.add_argument("--memory-child", choices=MEMORY_KINDS, help=argparse.SUPPRESS)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json-out")
    args = p.parse_args()
    if args.table:
        try:
            table(args.table)
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise SystemExit(f"error: --table takes the files --json-out wrote; {type(e).__name__}: {e}")
        return
    unknown = sorted(set(args.only or ()) - {label for label, _, _ in CONFIGS})
    if unknown:  # before the model loads, not after timing nothing
        raise SystemExit(f"error: --only {', '.join(map(repr, unknown))} is not a configuration; "
                         f"use labels of: {', '.join(repr(c[0]) for c in CONFIGS)}")
    global DEVICE
    DEVICE = args.device
    if args.memory_child:
        print(json.dumps(step_memory(memory_step(args.memory_child, args.model, args.batch_size, args.seq_len), DEVICE)))
        return
    if args.memory:
        rows = memory(args)
        if args.json_out:
            with open(args.json_out, "w") as f:
                json.dump({"args": vars(args), "machine": machine(DEVICE), "results": rows}, f, indent=2)
        return
    torch.manual_seed(0)
    vocab = AutoConfig.from_pretrained(args.model).vocab_size
    wb, ab = make_batch(args.batch_size, args.seq_len, 0, vocab), make_batch(args.batch_size, args.seq_len, 1, vocab)
    fp = fp_step(build(args.model, None), wb)
    configs = [c for c in CONFIGS if not args.only or c[0] in args.only]
    if args.trace:
        configs = [c for c in configs if c[1] == [0, 2, 4, 8]]
    if args.batches:  # only the multi-batch comparison
        configs = []
    results = []
    if args.qat:
        for use_table in (False, True):
            other, bits = qat_bench_step(args.model, wb, use_table)
            t_fp, t_qat = interleaved(fp, other, args.rounds)
            teacher = "teacher table" if use_table else "live teacher"
            row = {"config": f"QAT, mixed {{0,2,4,8}} at {bits:.2f} bits, KD 0.5, {teacher}", "fp_step_s": statistics.median(t_fp),
                   "qat_step_s": statistics.median(t_qat), "qat_over_fp_step": statistics.median(t_qat) / statistics.median(t_fp)}
            results.append(row)
            print(json.dumps(row), flush=True)
            del other
        configs = []
    for label, w_bits, groups in configs:
        space = SearchSpace(w_bits=w_bits, groups=groups)
        net = build(args.model, space)
        other = probe_step(args.model, space, wb) if args.trace else search_step(net, wb, ab)
        t_fp, t_other = interleaved(fp, other, args.rounds)
        m_fp, m_other = statistics.median(t_fp), statistics.median(t_other)
        n_groups = sum(s.grouping.n_groups for _, s in sites(net))
        row = {"config": label, "groups": n_groups, "fp_step_s": m_fp, ("probe_s" if args.trace else "search_iter_s"): m_other}
        if args.trace:
            row["probe_over_fp_step"] = m_other / m_fp
        else:
            row["iter_over_fp_step"] = m_other / m_fp
            row["search_over_fp_epoch"] = m_other / (2 * m_fp)
        results.append(row)
        print(json.dumps(row), flush=True)
        del net, other
    if args.trace and args.probes and args.batches:
        batches = [make_batch(args.batch_size, args.seq_len, 10 + i, vocab) for i in range(args.batches)]
        new, old = multi_batch_steps(args.model, batches, args.probes)
        t_fp, t_new = interleaved(fp, new, args.rounds)
        _, t_old = interleaved(fp, old, args.rounds)
        products = args.batches * args.probes
        m_fp, m_new, m_old = statistics.median(t_fp), statistics.median(t_new), statistics.median(t_old)
        row = {"config": f"{args.batches} batches x {args.probes} probes", "fp_step_s": m_fp,
               "batch_by_batch_s": m_new, "product_by_product_s": m_old,
               "per_product_over_fp_step": {"batch_by_batch": m_new / products / m_fp,
                                            "product_by_product": m_old / products / m_fp}}
        results.append(row)
        print(json.dumps(row), flush=True)
    elif args.trace and args.probes:
        curvature = measure_curvature(build(args.model, None), build(args.model, SearchSpace()), [wb],
                                      Sensitivity.trace, max_probes=args.probes, tol=1e-12, seed=0)
        changes = curvature.changes  # changes[i]: after probe i + 2
        conv = {"probes": curvature.probes, "wall_s": curvature.seconds, "s_per_probe": curvature.seconds / curvature.probes,
                "change_after": {str(k): changes[k - 2] for k in (2, 5, 10, 20, 50, 100, 200) if 2 <= k <= len(changes) + 1},
                "negative_groups": sum(v < 0 for est in curvature.estimate.values() for v in est),
                "groups": sum(len(est) for est in curvature.estimate.values())}
        results.append(conv)
        print(json.dumps(conv), flush=True)
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
