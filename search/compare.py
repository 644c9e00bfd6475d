"""`stage=compare`: searched vs HAWQ-V2 vs uniform QAT vs FP32 at equal size, over budgets and seeds.

    python -m search stage=compare model.name_or_path=<fine-tuned checkpoint> task=mrpc \
        compare.budgets=[4,3,2.5,2,1.5] compare.seeds=[42,43,44]

For every budget b (`budget.avg_bits=b` in `budget.scope`) and seed s, in `b<b>/s<s>/`:
  search/     the DNAS search and derivation at b                      (method `searched`, with qat/)
  qat/        QAT of the searched architecture
  hawq/       HAWQ-V2 at exactly the searched architecture's size (`budget.match`); its Hutchinson traces
              are cached in `cache_dir` and shared by every budget of the seed
  hawq_qat/   the same QAT of HAWQ-V2's architecture
  uniform<u>/ the same QAT of every encoder group at u = max(2, ceil(b)) bits (1 on the mid-rise grid): the nearest uniform
              precision that is not smaller than the budget (the baseline is never given less room);
              embeddings, head and activations as in the searched architecture
plus `fp32/` (the fine-tuned checkpoint evaluated; `finetune/` first when the model is not fine-tuned on
the task). Every method starts from the same checkpoint with the same seed, QAT recipe and data.
With `compare.qat_draws=k` > 1 every QAT above runs k times: draw 0 as above, draw d (1 to k - 1) into
`qat.draw<d>/`, `hawq_qat.draw<d>/` and `uniform<u>.draw<d>/` with seed s + 1000 d. The seed's metric is the
median of its draws, which tells what an architecture gives apart from the spread of one QAT run.
A finished step (its metrics.json) is skipped and an interrupted one resumes, so `resume=true` continues
a long comparison where it stopped. After every cell the summary is rewritten (search/comparison.py):
comparison.md, comparison.csv, runs.csv, pareto.png, logged to the tracker at the end.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import shutil
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from supernet import Architecture, QuantMode
from supernet.quantizers import MIDRISE_BITS

from .budget import Budget, uniform
from .comparison import Row, budget_dir, collect, draw_name, write_comparison
from .config import BudgetConfig, Config, EvalConfig, Method, QatInit, Stage
from .dnas import run_search
from .errors import UserError
from .evaluate import run_eval
from .pipeline import check_up_front, common_args, fine_tuned_model, hawq_steps, kept_state, qat_step
from .qat import SUPERNET_STATE
from .rundir import RunDir, replace_dir, run_step, temp_beside

__all__ = ["run_compare", "uniform_bits", "draw_seed"]

log = logging.getLogger(__name__)


def uniform_bits(budget: float, lowest: int = 2) -> int:
    """The uniform baseline's bits at `budget`: the nearest integer precision at or above it, at least
    `lowest` (2; 1 on the mid-rise grid, which has binary weights)."""
    return max(lowest, math.ceil(budget - 1e-9))


# what decides each step's result: a finished step run with other values of these is reused with a warning
_COMMON = ("model", "task", "space")
_SEARCH, _HAWQ, _QAT = _COMMON + ("search",), _COMMON + ("hawq",), _COMMON + ("qat",)


DRAW_SEED_STRIDE = 1000  # QAT draw d of a cell of seed s runs with seed s + 1000 d


def draw_seed(seed: int, draw: int) -> int:
    """QAT draw `draw`'s seed in the cell of `seed`: the cell's seed for draw 0, else 1000 further per draw."""
    return seed + DRAW_SEED_STRIDE * draw


def _cell(c: Config, run: RunDir, model: Any, skeleton: Any, budget: float, seed: int) -> None:
    """Every method at one budget and seed; each QAT `compare.qat_draws` times (see `draw_name`, `draw_seed`)."""
    cell = budget_dir(budget, seed)
    methods = set(c.compare.methods)
    draws = range(c.compare.qat_draws)
    common = common_args(c, seed=seed)
    searched = run.path / cell / "search" / "architecture.json"
    if Method.searched in methods:
        at = BudgetConfig(avg_bits=budget, scope=c.budget.scope)
        run_step(run, f"{cell}/search", lambda r, resume: run_search(
            model, c.task, c.space, c.search, at, c.eval, r, resume=resume, **common), _SEARCH,
            keep=kept_state(c, SUPERNET_STATE.name),
            config=dataclasses.replace(c, stage=Stage.search, model=model, budget=at, seed=seed))
        for d in draws:
            qat_step(c, run, f"{cell}/{draw_name('qat', d)}", model, searched, draw_seed(seed, d),
                     _SEARCH + ("qat",), searched=True)
    if Method.hawq in methods:
        # at the searched architecture's exact size when there is one; else at the budget itself
        hawq_budget = (BudgetConfig(match=str(searched), scope=c.budget.scope) if searched.is_file()
                       else BudgetConfig(avg_bits=budget, scope=c.budget.scope))
        if searched.is_file():
            _warn_unmatched_hawq(run.path / cell / "hawq")
        hawq_steps(c, run, f"{cell}/", model, hawq_budget, seed, (_HAWQ, _HAWQ + ("qat",)))
        hawq_arch = run.path / cell / "hawq" / "architecture.json"
        for d in draws[1:]:  # draw 0 is hawq_steps' own
            qat_step(c, run, f"{cell}/{draw_name('hawq_qat', d)}", model, hawq_arch, draw_seed(seed, d),
                     _HAWQ + ("qat",))
    if Method.uniform in methods:
        bits = uniform_bits(budget, MIDRISE_BITS if c.space.w_grid is QuantMode.MIDRISE else 2)
        path = run.path / cell / f"uniform{bits}.json"
        if not path.is_file():  # embeddings, head and activations as the searched architecture has them
            template = Architecture.load(searched) if searched.is_file() else skeleton
            uniform(template, bits).save(path)
        for d in draws:
            step = f"{cell}/{draw_name(f'uniform{bits}', d)}"
            _reuse_uniform(run, step, path, seed)
            qat_step(c, run, step, model, path, draw_seed(seed, d), _QAT)


def _warn_unmatched_hawq(step: Path) -> None:
    """A finished HAWQ-V2 run of a comparison that had no searched architecture then (`searched` added to the methods
    later) was allocated at the plain budget: it is reused like any finished step, so say that it is not at the
    searched architecture's exact size and how to rerun it there."""
    config = step / "config.yaml"
    if not ((step / "metrics.json").is_file() and config.is_file()):
        return
    if OmegaConf.load(config).get("budget", {}).get("match") is None:
        log.warning("%s was allocated at the plain budget, before this cell had a searched architecture, not at that "
                    "architecture's exact size; delete it and %s to rerun both at that size", step,
                    step.with_name("hawq_qat"))


def _same_architecture(done: Architecture, mine: Architecture) -> bool:
    """Equal, where a weight grid `done` does not record (a file from before the grid was written, in this same
    comparison and so on the same space) counts as `mine`'s."""
    return (done if done.w_grid is not None else dataclasses.replace(done, w_grid=mine.w_grid)) == mine


def _reuse_uniform(run: RunDir, step: str, arch: Path, seed: int) -> None:
    """Uniform QAT does not depend on the budget (1.5 and 2 bits both get uniform 2-bit): a finished run of
    the same architecture and seed in another budget's cell is copied into `step` instead of trained again."""
    target = run.path / step
    if (target / "metrics.json").is_file():
        return
    mine = Architecture.load(arch)
    for done in sorted(run.path.glob(f"b*/s{seed}/{target.name}/metrics.json")):  # never `target`: it has none
        other = done.parent.parent / arch.name
        if other.is_file() and _same_architecture(Architecture.load(other), mine):
            tmp = temp_beside(target)
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(done.parent, tmp)
            replace_dir(tmp, target)
            log.info("%s: the same uniform architecture and seed as %s; its result is reused", step, done.parent)
            return


def _summary(run: RunDir, c: Config, model: Any) -> tuple[list[Row], dict[str, Path]]:
    rows = collect([run.path])
    title = f"{c.task.name}: {Path(model.name_or_path).name}, space w_bits={c.space.w_bits}, groups={c.space.groups}"
    if c.qat.init is QatInit.supernet:  # the table compares methods: say that one of them starts elsewhere
        title += "; searched QAT starts from the search's supernet, the baselines from the checkpoint"
    _, paths = write_comparison(rows, run.path, title)
    return rows, paths


def run_compare(c: Config, run: RunDir) -> dict[str, Any]:
    """Every method at every budget and seed in `run`'s sub-directories, then the comparison."""
    cfg = c.compare
    if any(getattr(c.budget, name) is not None for name in ("avg_bits", "mb", "match")):
        raise UserError("stage=compare takes its budgets from compare.budgets; unset budget.avg_bits, budget.mb "
                        "and budget.match (budget.scope still applies)")
    budgets = [Budget(c.budget.scope, avg_bits=b) for b in cfg.budgets]
    skeleton = check_up_front(c, budgets, Method.hawq in cfg.methods, Method.searched in cfg.methods)
    run.open()
    results: dict[str, Any] = {}
    model = fine_tuned_model(c, run, results)
    fp32 = EvalConfig(splits=c.eval.splits, batch_size=c.eval.batch_size)
    run_step(run, "fp32", lambda r, resume: run_eval(
        model, c.task, fp32, r, seed=c.seed, max_eval_examples=c.max_eval_examples,
        mixed_precision=c.mixed_precision, cache_dir=c.cache_dir),
        config=dataclasses.replace(c, stage=Stage.eval, model=model, eval=fp32))
    total = len(cfg.seeds) * len(cfg.budgets)
    for i, (seed, budget) in enumerate((s, b) for s in cfg.seeds for b in cfg.budgets):
        log.info("compare: cell %d of %d: %g bits, seed %d", i + 1, total, budget, seed)
        _cell(c, run, model, skeleton, budget, seed)
        _summary(run, c, model)
    rows, paths = _summary(run, c, model)
    summary = {"stage": "compare", "task": c.task.name, "checkpoint": model.name_or_path,
               "budgets": list(cfg.budgets), "seeds": list(cfg.seeds), "methods": [m.value for m in cfg.methods],
               "runs": len(rows), "files": {k: str(v) for k, v in paths.items()},
               "comparison": (run.path / "comparison.md").read_text()}
    run.write_json("metrics.json", summary)  # first: the result stands whatever the tracker does
    run.logger.table("comparison", paths["comparison.csv"])
    run.logger.image("pareto", paths["pareto.png"])
    return summary
