"""The `hawq` stage: the HAWQ-V2 baseline (arXiv:1911.03852) on a fine-tuned BERT.

The checkpoint becomes the same supernet the search uses (`space`), the curvature of every group is
measured on the FP model over `hawq.num_batches` training batches (Hutchinson traces, or Q-BERT's top
eigenvalues), the sensitivities Omega of every candidate give the multiple-choice knapsack, and its exact
solution at the budget is the architecture. The Pareto frontier over the whole size range is written with
it. Curvature is the expensive part and does not depend on the budget, so it is cached on disk
(`<cache_dir>/hawq/<key>.json`) under a hash of everything it depends on, and later budgets reuse it.

Writes architecture.json (+ .png), frontier.csv (+ .png), traces.json (+ traces.png, Hutchinson's
convergence) and metrics.json, with the chosen model evaluated before QAT. With `hawq.activations=true`
the input activations get their bits the same way (search/hawq_act.py), under `hawq.a_avg_bits`.
Everything that can fail on bad input, an unreachable budget included, fails before the run directory
gets its first file.
"""
from __future__ import annotations

import copy
import csv
import hashlib
import io
import itertools
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from supernet import Architecture, SearchSpace, SiteKind, sites

from .budget import Budget, site_candidates, uniform
from .config import BudgetConfig, EvalConfig, HawqConfig, MixedPrecision, ModelConfig, NegativeCurvature, Sensitivity, TaskConfig
from .data import make_loader
from .errors import UserError
from .evaluate import evaluate_sets, scalars, set_activation_steps, stage_metrics
from .hawq import Curvature, build_knapsack, measure_curvature, to_architecture
from .hawq_act import activation_knapsack, activation_traces, activation_width, with_activation_bits
from .knapsack import Knapsack
from .loop import make_accelerator
from .models import convert, load_task_model, load_tokenizer
from .plots import plot_architecture, plot_convergence, plot_frontier
from .prepare import TRAIN, task_data
from .rundir import RunDir, write_text_atomic
from .tasks import get_task

__all__ = ["run_hawq", "curvature_key", "load_curvature", "save_curvature"]

log = logging.getLogger(__name__)

CACHE_VERSION = 2  # 2: {key, value} entries


def _mtime(path: str) -> int | None:
    """Latest modification time (ns) of the files in a local checkpoint directory; None for a hub id."""
    p = Path(path).expanduser()
    if not p.is_dir():
        return None
    return max((f.stat().st_mtime_ns for f in p.iterdir() if f.is_file()), default=p.stat().st_mtime_ns)


def curvature_key(checkpoint: str, task: TaskConfig, site_groups: list[tuple[str, int]], cfg: HawqConfig,
                  seed: int) -> dict[str, Any]:
    """Everything the curvature depends on: the checkpoint (path and files' mtime), the task's data and
    tokenisation, which sites and how many groups each (not their bits: curvature is of the FP model),
    and the estimator's settings."""
    local = Path(checkpoint).expanduser()
    return {
        "version": CACHE_VERSION,
        "checkpoint": str(local.resolve()) if local.is_dir() else checkpoint,
        "mtime_ns": _mtime(checkpoint),
        "task": task.name, "data_dir": task.data_dir, "max_seq_len": task.max_seq_len, "doc_stride": task.doc_stride,
        "sites": [[name, g] for name, g in site_groups],
        "sensitivity": cfg.sensitivity.value, "batch_size": cfg.batch_size, "num_batches": cfg.num_batches,
        "seed": seed, "max_probes": cfg.max_probes, "tol": cfg.tol,
        # several batches: probes drawn batch by batch (search.hessian.hutchinson), not shared across batches
        **({"probes_per_batch": True} if cfg.num_batches > 1 else {}),
    }


def _cache_path(cache_dir: str, key: dict[str, Any]) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    return Path(cache_dir).expanduser() / "hawq" / f"{digest}.json"


def _load_cached(cache_dir: str | None, key: dict[str, Any]) -> Any | None:
    """What was cached under `key`, or None (no cache, none stored, or stored for another key)."""
    if cache_dir is None:
        return None
    path = _cache_path(cache_dir, key)
    try:
        stored = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if stored.get("key") != key:
        return None
    log.info("curvature from the cache %s", path)
    return stored["value"]


def _save_cached(cache_dir: str | None, key: dict[str, Any], value: Any) -> None:
    if cache_dir is None:
        return
    path = _cache_path(cache_dir, key)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps({"key": key, "value": value}) + "\n")


def load_curvature(cache_dir: str | None, key: dict[str, Any]) -> Curvature | None:
    """The cached curvature for `key`, or None."""
    stored = _load_cached(cache_dir, key)
    return None if stored is None else Curvature.from_dict(stored)


def save_curvature(cache_dir: str | None, key: dict[str, Any], curvature: Curvature) -> None:
    _save_cached(cache_dir, key, curvature.to_dict())


def _choice_of(arch: Architecture, knapsack: Knapsack) -> tuple[np.ndarray, ...] | None:
    """An architecture as knapsack indices; None when it uses bits some site does not offer."""
    out = []
    for (name, site), bits in zip(arch, knapsack.bits):
        if not set(site.bits) <= set(bits):
            return None
        out.append(np.array([bits.index(b) for b in site.bits], dtype=np.int64))
    return tuple(out)


def _frontier_csv(rows: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def _resolve_budget(budget_cfg: BudgetConfig, template: Architecture) -> Budget:
    budget = Budget.from_args(budget_cfg.avg_bits, budget_cfg.mb, budget_cfg.scope, budget_cfg.match)
    if budget is None:
        raise UserError("stage=hawq needs a budget: set budget.avg_bits, budget.mb or budget.match=<architecture.json>")
    if budget_cfg.match is not None:
        theirs = Architecture.load(budget_cfg.match).size(budget.scope).weights
        ours = template.size(budget.scope).weights
        if theirs != ours:
            raise UserError(f"budget.match={budget_cfg.match} has {theirs} weights in scope {budget.scope.value}, this "
                            f"model {ours}; match an architecture of the same model")
    return budget


def check_hawq_settings(cfg: HawqConfig, space: SearchSpace) -> None:
    """HAWQ-V2's settings that only the space can refute; a pipeline or compare checks them before its first step."""
    if not cfg.activations:
        return
    if len(space.a_bits) < 2:
        raise UserError(f"hawq.activations=true allocates activation bits, but space.a_bits={list(space.a_bits)} "
                        f"offers one; give several, e.g. space.a_bits=[4,8]")
    if cfg.a_avg_bits is None or not min(space.a_bits) <= cfg.a_avg_bits:
        raise UserError(f"hawq.activations=true needs hawq.a_avg_bits (average bits per activation element) of at "
                        f"least {min(space.a_bits)}, the smallest of space.a_bits; got {cfg.a_avg_bits}")


def run_hawq(
    model: ModelConfig, task: TaskConfig, space: SearchSpace, cfg: HawqConfig, budget_cfg: BudgetConfig,
    evaluation: EvalConfig, run: RunDir, *, seed: int, max_eval_examples: int | None = None,
    mixed_precision: MixedPrecision = MixedPrecision.fp32, cache_dir: str | None = None, progress_bar: bool = True,
) -> dict[str, Any]:
    """HAWQ-V2 of the fine-tuned `model` under the budget; writes architecture.json and metrics.json."""
    spec = get_task(task.name)
    check_hawq_settings(cfg, space)
    tokenizer = load_tokenizer(model.name_or_path)
    tokenized, sets = task_data(task, tokenizer, evaluation, cache_dir, max_eval_examples, train=True)
    net = load_task_model(model.name_or_path, spec.name)
    fp = copy.deepcopy(net)  # the FP model whose Hessian is taken (the supernet's quantizers have none)
    convert(net, space, model.name_or_path)
    candidates = site_candidates(net)
    if not any(s.wq.searchable for _, s in sites(net)):
        raise UserError(f"space.w_bits={list(space.w_bits)} offers one candidate: there is nothing to allocate; "
                        f"give two or more (e.g. [0,2,4,8]) or run stage=qat with that precision")
    template = Architecture.from_supernet(net, space.scale_bits)
    budget = _resolve_budget(budget_cfg, template)
    budget.check_reachable(template, candidates)
    if len(space.a_bits) > 1 and not cfg.activations:
        log.warning("hawq allocates weight bits only; activations keep %s bits (the first of space.a_bits); "
                    "hawq.activations=true allocates them too", space.a_bits[0])
    loader = make_loader(tokenized[TRAIN], tokenizer, cfg.batch_size, shuffle=True, seed=seed)
    batches = list(itertools.islice(loader, cfg.num_batches))
    accelerator = make_accelerator(mixed_precision, seed)

    run.main_process = accelerator.is_main_process
    run.open()
    key = curvature_key(model.name_or_path, task, [(n, s.grouping.n_groups) for n, s in sites(net)], cfg, seed)
    curvature = load_curvature(cache_dir, key)
    cached = curvature is not None
    if curvature is None:
        fp.to(accelerator.device)
        curvature = measure_curvature(fp, net, batches, cfg.sensitivity, max_probes=cfg.max_probes, tol=cfg.tol, seed=seed,
                                       progress=progress_bar and run.main_process)
        if run.main_process:
            save_curvature(cache_dir, key, curvature)
    activations = None
    if cfg.activations:
        act_key = {**key, "activations": True}
        activations = _load_cached(cache_dir, act_key)
        if activations is None:
            activations = activation_traces(fp, net, batches, max_probes=cfg.max_probes, tol=cfg.tol, seed=seed,
                                            progress=progress_bar and run.main_process)
            if run.main_process:
                _save_cached(cache_dir, act_key, activations)
    del fp

    knapsack = build_knapsack(net, template, curvature, budget, cfg.trace_level, cfg.negative_curvature)
    chosen = knapsack.allocate(budget.target, cfg.solver_time_limit)
    front = knapsack.frontier(cfg.frontier_points, extra=[budget.target], time_limit=cfg.solver_time_limit)
    arch = to_architecture(template, knapsack, chosen.choice)
    act_info = None
    if activations is not None:
        act_knapsack = activation_knapsack(net, activations, cfg.negative_curvature)
        width = activation_width(net)
        act_chosen = act_knapsack.allocate(cfg.a_avg_bits * width, cfg.solver_time_limit)
        arch = with_activation_bits(arch, net, act_knapsack, act_chosen.choice)
        act_info = {"a_avg_bits": act_chosen.cost / width, "target": cfg.a_avg_bits, "sensitivity": act_chosen.value,
                    "bits": {n: b[int(c[0])] for n, b, c in zip(act_knapsack.names, act_knapsack.bits, act_chosen.choice)},
                    "traces": activations}
        log.info("hawq activations: %.3g bits per element (budget %g), total sensitivity %.4g", act_info["a_avg_bits"],
                 cfg.a_avg_bits, act_chosen.value)
    if not budget.fits(arch):  # the knapsack's prices and the cost model disagree: a bug, not bad input
        raise AssertionError(f"hawq chose {budget.of(arch)} {budget.unit} against a budget of {budget.target}")
    scope = budget.scope
    rows = []
    for point in front:
        a = to_architecture(template, knapsack, point.choice)
        rows.append({"mb": a.size_mb(scope), "avg_bits": a.avg_bits(scope), "sensitivity": point.value,
                     "gap": point.gap, "chosen": int(point.key() == chosen.key())})
    if not any(r["chosen"] for r in rows):  # dominated within the solver's proven gap: still list it
        rows.append({"mb": arch.size_mb(scope), "avg_bits": arch.avg_bits(scope), "sensitivity": chosen.value,
                     "gap": chosen.gap, "chosen": 1})
        rows.sort(key=lambda r: r["mb"])
    uniform_points = {}
    for bits in sorted({b for _, s in sites(net) if s.kind is SiteKind.ENCODER for b in s.wq.cands.bits} - {0}):
        u = uniform(template, bits)
        choice = _choice_of(u, knapsack)
        if choice is not None:
            uniform_points[bits] = (u.size_mb(scope), knapsack.value(choice))
    negative = sum(v < 0 for est in curvature.estimate.values() for v in est)
    negative_sites = sorted(n for n, est in curvature.estimate.items() if sum(est) < 0)
    if negative_sites and cfg.negative_curvature is NegativeCurvature.floor and curvature.kind is Sensitivity.trace:
        log.warning("hawq: %d sites have a negative trace (%s%s); they count as nearly free to quantize and to prune. "
                    "hawq.negative_curvature=absolute ranks them by the magnitude instead", len(negative_sites),
                    ", ".join(negative_sites[:3]), ", ..." if len(negative_sites) > 3 else "")
    summary = arch.summary()
    log.info("hawq: %.4g %s (budget %s), total sensitivity %.4g (proven gap %.2g), %d frontier points, %d negative "
             "curvature estimates", chosen.cost, budget.unit, budget, chosen.value, chosen.gap, len(front), negative)
    if run.main_process:
        arch.save(run.path / "architecture.json")
        run.logger.image("architecture", plot_architecture(arch, run.path / "architecture.png"))
        traces = {**curvature.to_dict(), "cached": cached, "cache_key": key,
                  "group_numel": {n: s.wq.group_numel for n, s in sites(net)}}
        write_text_atomic(run.path / "traces.json", json.dumps(traces) + "\n")
        write_text_atomic(run.path / "frontier.csv", _frontier_csv(rows))
        picture = plot_frontier([(r["mb"], r["sensitivity"]) for r in rows], (arch.size_mb(scope), chosen.value),
                                run.path / "frontier.png", budget=budget.target if budget.unit == "mb" else None,
                                uniform=uniform_points, xlabel=f"MiB ({scope.value})",
                                title=f"HAWQ-V2 ({curvature.kind.value}) at {budget}")
        run.logger.image("frontier", picture)
        if curvature.kind is Sensitivity.trace:
            plot_convergence(curvature.changes, curvature.running, cfg.tol, run.path / "traces.png")

    arch.apply(net)  # the chosen model, evaluated before any QAT
    net = accelerator.prepare(net)
    set_activation_steps(net, batches[0], accelerator.device)
    for s in sets:
        s.loader = accelerator.prepare(s.loader)
    results = evaluate_sets(net, sets, spec.name, accelerator)
    run.log(scalars(results), 0)
    budget_info = {"unit": budget.unit, "target": budget.target, "scope": scope.value, "match": budget_cfg.match}
    hawq_info = {"sensitivity": curvature.kind.value, "trace_level": cfg.trace_level.value,
                 "negative_curvature": cfg.negative_curvature.value, "probes": curvature.probes,
                 "curvature_seconds": curvature.seconds, "cached": cached, "batches": len(batches),
                 "batch_size": cfg.batch_size, "negative_estimates": int(negative),
                 "negative_sites": negative_sites, "frontier_points": len(front)}
    chosen_info = {"cost": chosen.cost, "sensitivity": chosen.value, "gap": chosen.gap, "core_groups": chosen.core,
                   "mb": arch.size_mb(scope), "avg_bits": arch.avg_bits(scope)}
    metrics = stage_metrics("hawq", spec.name, model.name_or_path, results, budget=budget_info, hawq=hawq_info,
                            chosen=chosen_info, activations=act_info, architecture=summary)
    run.write_json("metrics.json", metrics)
    run.logger.summary({"architecture": summary, "hawq": hawq_info, "chosen": chosen_info, "eval": results})
    return metrics
