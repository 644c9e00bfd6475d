"""The hydra config schema: one dataclass per config group, registered in hydra's ConfigStore.

`conf/config.yaml` starts its defaults list with `base_config` (the `Config` below), so every group
file and every command-line override is merged into these dataclasses: a misspelt key or a value of
the wrong type fails at compose time with hydra's own message. `to_config` turns the composed
DictConfig into a `Config` object once, in `search/__main__.py`; nothing below that sees a DictConfig.

The `space` group's schema is `supernet.SearchSpace` itself, so the library validates it
(`SearchSpace.__post_init__` runs in `to_config`).

Enum members of the app are lower-case because OmegaConf parses an enum from its member *name*, and the
name is what users type (`stage=eval`, `mixed_precision=bf16`). The library's enums (`space.a_mode`,
`space.init`, `budget.scope`, `search.relaxation`) keep their upper-case names: `space.a_mode=UNSIGNED`.

The `mpq_assets` resolver points presets at an offline asset folder (laid out like `shared/assets`):
`${mpq_assets:models/all-MiniLM-L6-v2,sentence-transformers/all-MiniLM-L6-v2}` is
`$MPQ_ASSETS/models/all-MiniLM-L6-v2` when the variable is set, else the hub id;
`${mpq_assets:.,null}` is `$MPQ_ASSETS` or null (the hub).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

import supernet
from search.budget import Penalty
from search.errors import UserError, first_line
from search.tasks import TASKS

__all__ = [
    "Stage",
    "MixedPrecision",
    "LoggerKind",
    "WandbMode",
    "ModelConfig",
    "TaskConfig",
    "FinetuneConfig",
    "EvalConfig",
    "ArchOptimizer",
    "SearchConfig",
    "QatConfig",
    "QatInit",
    "Sensitivity",
    "TraceLevel",
    "HawqConfig",
    "BudgetConfig",
    "LoggerConfig",
    "Config",
    "ASSETS_ENV",
    "assets_or",
    "register",
    "to_config",
]

ASSETS_ENV = "MPQ_ASSETS"
# Token sequence lengths the data layer accepts (search/data.py checks the tokenizer's limit too).
_MIN_SEQ_LEN, _MAX_SEQ_LEN = 8, 512


class _ValueStr(Enum):
    """An enum that prints as its value, so `${stage}` in a path reads `finetune`, not `Stage.finetune`."""

    def __str__(self) -> str:
        return str(self.value)


class Stage(_ValueStr):
    """What `python -m search` runs; each later issue implements one more."""

    finetune = "finetune"
    eval = "eval"
    search = "search"
    qat = "qat"
    hawq = "hawq"
    compare = "compare"
    export = "export"
    pipeline = "pipeline"


class MixedPrecision(_ValueStr):
    """Autocast precision on GPU (accelerate's `mixed_precision`); a CPU run always uses fp32."""

    fp32 = "fp32"
    fp16 = "fp16"
    bf16 = "bf16"


class LoggerKind(_ValueStr):
    none = "none"
    wandb = "wandb"


class WandbMode(_ValueStr):
    """`auto`: $WANDB_MODE if set, else online with an API key and offline without one."""

    auto = "auto"
    online = "online"
    offline = "offline"
    disabled = "disabled"


@dataclass
class ModelConfig:
    """A pretrained checkpoint: a hub id or a local directory (a BertModel gets a new task head)."""

    name_or_path: str = MISSING
    # is it fine-tuned on the task already (pipeline and compare then skip their finetune step)? None: when this
    # project's finetune stage wrote it for the task (its bert_mpq.json says so); true: a checkpoint fine-tuned
    # elsewhere (it must have a task head); false: fine-tune it first in any case
    finetuned: Optional[bool] = None


@dataclass
class TaskConfig:
    """One task of `search.tasks`; `data_dir` None reads the hub dataset, a folder the original files."""

    name: str = MISSING
    data_dir: Optional[str] = None
    max_seq_len: int = 128
    doc_stride: Optional[int] = None  # SQuAD windows' overlap (None: max_seq_len // 3)

    def __post_init__(self) -> None:
        if self.name != MISSING and self.name not in TASKS:
            raise ValueError(f"unknown task.name={self.name!r}; use one of: {', '.join(TASKS)}")
        if not _MIN_SEQ_LEN <= self.max_seq_len <= _MAX_SEQ_LEN:
            raise ValueError(
                f"task.max_seq_len={self.max_seq_len} is invalid; use an int in "
                f"[{_MIN_SEQ_LEN}, {_MAX_SEQ_LEN}], e.g. task.max_seq_len=128"
            )


@dataclass
class FinetuneConfig:
    """FP fine-tuning (BERT's recipe): AdamW, linear warmup then linear decay, gradient clipping."""

    epochs: float = 3.0
    batch_size: int = 32
    lr: float = 2e-5
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    max_grad_norm: float = 1.0  # 0 disables clipping
    eval_every: int = 0  # steps between dev evaluations during training; 0: only at the end
    checkpoint_every: int = 500  # steps between resumable checkpoints (train_state/); 0: only at the end
    log_every: int = 10  # steps between loss lines in the log (wandb gets every step)

    def __post_init__(self) -> None:
        _positive("finetune.epochs", self.epochs)
        _positive("finetune.batch_size", self.batch_size)
        _positive("finetune.lr", self.lr)
        _positive("finetune.log_every", self.log_every)
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ValueError(f"finetune.warmup_ratio={self.warmup_ratio} is invalid; use a value in [0, 1)")
        for name in ("weight_decay", "max_grad_norm", "eval_every", "checkpoint_every"):
            _non_negative(f"finetune.{name}", getattr(self, name))


@dataclass
class EvalConfig:
    """Evaluation, shared by every stage; `checkpoint` is what `stage=eval` loads (None: `model`), quantized
    to `architecture` when that is set."""

    checkpoint: Optional[str] = None
    # architecture.json: `stage=eval` quantizes the FP checkpoint to it (the supernet's initial steps, no
    # QAT), which scores an allocation on the weights QAT starts from
    architecture: Optional[str] = None
    splits: List[str] = field(default_factory=list)  # extra splits beside the dev split(s)
    batch_size: int = 64

    def __post_init__(self) -> None:
        _positive("eval.batch_size", self.batch_size)


class Method(_ValueStr):
    """A compression method of the comparison (`compare.methods`); FP32 is always the reference."""

    searched = "searched"  # the DNAS search + derivation + QAT
    hawq = "hawq"  # HAWQ-V2 at the searched architecture's exact size + the same QAT
    uniform = "uniform"  # every encoder group at the nearest uniform bits at or above the budget + QAT


@dataclass
class PipelineConfig:
    """`stage=pipeline`: what runs beside the search's path."""

    hawq: bool = False  # also HAWQ-V2 at the searched architecture's exact size (budget.match) + the same QAT


@dataclass
class CompareConfig:
    """`stage=compare`: every method at every budget (average bits per weight in `budget.scope`) and seed."""

    budgets: List[float] = field(default_factory=lambda: [4.0, 3.0, 2.5, 2.0, 1.5])
    seeds: List[int] = field(default_factory=lambda: [42, 43, 44])
    methods: List[Method] = field(default_factory=lambda: [Method.searched, Method.hawq, Method.uniform])
    # QAT runs per architecture (seed s, then s + 1000, s + 2000, ...); a seed's metric is their median, which
    # separates what the architecture gives from the spread of one QAT run
    qat_draws: int = 1

    def __post_init__(self) -> None:
        if self.qat_draws < 1:
            raise ValueError(f"compare.qat_draws={self.qat_draws} is invalid; use 1 (one QAT run per architecture) "
                             f"or more, e.g. compare.qat_draws=3")
        examples = {"budgets": "[4,3,2]", "seeds": "[42,43,44]", "methods": "[searched,hawq,uniform]"}
        for name, example in examples.items():
            if not getattr(self, name):
                raise ValueError(f"compare.{name} is empty; give at least one, e.g. compare.{name}={example}")
        for b in self.budgets:
            _positive("compare.budgets entry", b)
        for name in examples:
            values = getattr(self, name)
            if len(set(values)) != len(values):
                raise ValueError(f"compare.{name}={list(values)} repeats an entry")


@dataclass
class ExportConfig:
    """`stage=export`: pack a QAT run's model into a self-contained folder of bit-packed weights."""

    run_dir: Optional[str] = None  # a qat or pipeline run directory (or its quantized/ folder)
    verify: bool = True  # reload the folder and check its dev-set predictions equal the QAT model's
    tolerance: float = 1e-5  # the largest logit difference verify accepts

    def __post_init__(self) -> None:
        if not 0.0 <= self.tolerance < float("inf"):  # NaN fails too
            raise ValueError(f"export.tolerance={self.tolerance} is invalid; use a value >= 0, e.g. 1e-5")


class ArchOptimizer(_ValueStr):
    sgd = "sgd"  # AQ-BERT's choice, lr 0.1
    adam = "adam"  # DARTS's choice (betas 0.5, 0.999)


class Derivation(_ValueStr):
    """How a search whose argmax architecture exceeds the budget is brought within it (search/derive.py)."""

    greedy = "greedy"  # move one group one candidate down at a time, least probability lost per bit saved first
    exact = "exact"  # the most probable architecture within the budget (a multiple-choice knapsack on -log p)
    site = "site"  # every site at the two candidates around its expected bits, then moved a group at a time to the budget


class AlphaInit(_ValueStr):
    """Where the search's architecture logits start."""

    equal = "equal"  # logits 0: every candidate equally likely (DARTS); the expected size starts above most budgets
    budget = "budget"  # every group at the budget's uniform precision (search.budget.start_at_budget)


@dataclass
class SearchConfig:
    """Bilevel DARTS search (arXiv:1806.09055; AQ-BERT arXiv:2112.14938): weights on one part of the
    training set, architecture logits and quantizer steps on the other, under a size penalty."""

    epochs: float = 1.0  # over the weights part
    batch_size: int = 32
    lr: float = 2e-5  # weights (AdamW), linear warmup then decay; 0: the weights stay at the checkpoint
    weight_decay: float = 0.01
    lr_warmup_ratio: float = 0.1
    # Adam, not the paper's SGD 0.1: measured on MiniLM-L6 and MRPC (18,432 logits; BENCHMARKS.md, "Why Adam"), a
    # logit's mean |gradient| is 1.3e-4 from the task and 1.2e-5 from the size penalty, so SGD at 0.1 moves it
    # 1.4e-5 per step: 3e-3 over a 211-step search. Adam's normalised step (~its lr) does not depend on that scale.
    # At 1e-2 with a fixed temperature, 116 steps on MRPC left the median group's top candidate at 0.31 of the
    # probability (near uniform); 5e-2 annealed to tau 0.2 decides it (median 0.97) and QAT scores higher (BENCHMARKS.md).
    arch_optimizer: ArchOptimizer = ArchOptimizer.adam
    arch_lr: float = 5e-2  # architecture logits
    arch_momentum: float = 0.9  # sgd only
    scale_lr: float = 1e-4  # LSQ steps, updated with the logits on the architecture part
    weight_fraction: float = 0.5  # share of the training set for the weight step
    arch_warmup_ratio: float = 0.1  # share of steps before the architecture starts moving
    second_order: bool = False  # DARTS unrolled step (finite-difference Hessian-vector product)
    # the unrolled step's virtual SGD step size; None: the weights' lr (DARTS). With AdamW at 2e-5 that SGD step
    # moves a weight ~540x less than a real Adam step, and the second-order gradient is the first-order one
    # (cosine 0.99998 on MiniLM-L6 and MRPC, tools/unrolled_check.py)
    xi: Optional[float] = None
    relaxation: supernet.Relaxation = supernet.Relaxation.SOFTMAX
    alpha_init: AlphaInit = AlphaInit.equal
    tau_start: float = 1.0  # temperature, annealed exponentially to tau_end
    tau_end: float = 0.2
    size_weight: float = 1.0  # lambda of the size penalty
    penalty: Penalty = Penalty.log_ratio  # how the expected size meets budget.* (linear: no budget needed)
    derivation: Derivation = Derivation.greedy  # how an argmax above the budget is repaired
    group_lasso: float = 0.0  # weight of the group-lasso term pushing groups toward 0 bits
    # weight of the second-order price of each candidate (empirical Fisher x squared quantization error;
    # bilevel.CurvatureTerm): 0 leaves it out, 1 is the loss's own second-order Taylor term
    curvature_weight: float = 0.0
    bitops_target: Optional[float] = None  # GBOPs per token (bits_w x bits_a x MACs); a penalty above it
    bitops_weight: float = 1.0  # weight of that penalty (with bitops_target set)
    # both levels' loss = (1 - kd) * task + kd * KL(FP checkpoint || supernet) at kd_temperature, as QAT's:
    # at a fine-tuned minimum the labels' loss barely sees what quantizing or pruning a group does to the
    # examples the model already gets right; the teacher's outputs see it on every example. 0: labels only
    kd_weight: float = 0.0
    kd_temperature: float = 2.0
    max_grad_norm: float = 1.0
    checkpoint_every: int = 500
    log_every: int = 10
    log_mass_every: int = 50  # steps between logs of the probability mass per candidate and site

    def __post_init__(self) -> None:
        for name in ("batch_size", "arch_lr", "scale_lr", "tau_start", "tau_end", "epochs", "kd_temperature",
                     "log_every", "log_mass_every"):
            _positive(f"search.{name}", getattr(self, name))
        for name in ("max_grad_norm", "checkpoint_every"):
            _non_negative(f"search.{name}", getattr(self, name))
        if not 0 <= self.kd_weight <= 1:
            raise ValueError(f"search.kd_weight={self.kd_weight} must be in [0, 1] (0: the labels' loss alone)")
        if self.lr < 0:
            raise ValueError(f"search.lr={self.lr} is invalid; use a positive value, or 0 to keep the weights at the checkpoint")
        if not 0 < self.weight_fraction < 1:
            raise ValueError(f"search.weight_fraction={self.weight_fraction} must be between 0 and 1 (exclusive)")
        for name in ("arch_warmup_ratio", "lr_warmup_ratio"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"search.{name}={getattr(self, name)} must be in [0, 1)")
        if self.bitops_target is not None:
            _positive("search.bitops_target", self.bitops_target)
        if self.xi is not None:
            if not self.second_order:
                raise ValueError(f"search.xi={self.xi} only applies to the unrolled step; add search.second_order=true or drop search.xi")
            _positive("search.xi", self.xi)
        if self.size_weight < 0 or self.group_lasso < 0 or self.curvature_weight < 0:
            raise ValueError("search.size_weight, search.group_lasso and search.curvature_weight must be >= 0")
        if self.group_lasso > 0 and self.lr == 0:
            raise ValueError(f"search.group_lasso={self.group_lasso} shrinks the weights in their step, which "
                             f"search.lr=0 turns off; give search.lr > 0 or drop search.group_lasso")


class QatInit(_ValueStr):
    """Where QAT's weights and LSQ steps start."""

    checkpoint = "checkpoint"  # the FP checkpoint, steps initialised from its weights (every method)
    supernet = "supernet"  # the final supernet of the search that wrote qat.architecture (searched method only)


@dataclass
class QatConfig:
    """Quantization-aware training of one fixed Architecture (LSQ steps train with the weights), with
    optional distillation from the FP model and oscillation dampening (Nagel et al., ICML 2022)."""

    architecture: Optional[str] = None  # architecture.json (a search or hawq run's, or hand-written)
    init: QatInit = QatInit.checkpoint  # supernet: start from the weights and steps the search trained
    epochs: float = 3.0
    batch_size: int = 32
    lr: float = 1e-4  # a quantised model has further to go than a fine-tuning run: 2e-5 did not recover 1.5 bits
    scale_lr: float = 1e-4  # LSQ steps
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    kd_weight: float = 0.5  # loss = (1 - kd) * task + kd * KL(teacher || student); 0 turns the teacher off
    kd_temperature: float = 2.0
    hidden_weight: float = 0.0  # + weight * MSE of hidden states against the teacher's
    teacher_cache: bool = True  # logits KD from the teacher's outputs, computed once per example (cache_dir)
    dampen_weight: float = 0.0  # + weight * mean (w - q(w))^2
    freeze_threshold: float = 0.0  # freeze weights whose code-flip frequency exceeds this (0: off; ~0.02)
    freeze_momentum: float = 0.99  # EMA momentum of that frequency
    max_grad_norm: float = 1.0
    checkpoint_every: int = 500
    log_every: int = 10

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "lr", "scale_lr", "kd_temperature", "log_every"):
            _positive(f"qat.{name}", getattr(self, name))
        for name in ("max_grad_norm", "checkpoint_every"):
            _non_negative(f"qat.{name}", getattr(self, name))
        if not 0 <= self.kd_weight <= 1:
            raise ValueError(f"qat.kd_weight={self.kd_weight} must be in [0, 1]")
        if self.hidden_weight < 0 or self.dampen_weight < 0:
            raise ValueError("qat.hidden_weight and qat.dampen_weight must be >= 0")
        if not 0 <= self.freeze_threshold <= 1 or not 0 <= self.freeze_momentum < 1:
            raise ValueError(f"qat.freeze_threshold={self.freeze_threshold} must be in [0, 1] (0: off) and "
                             f"qat.freeze_momentum={self.freeze_momentum} in [0, 1)")


class Sensitivity(_ValueStr):
    """The curvature in HAWQ-V2's sensitivity Omega = curvature * ||Q(W) - W||^2."""

    trace = "trace"  # HAWQ-V2: Hutchinson trace of each group's Hessian block / its size
    top_eigenvalue = "top_eigenvalue"  # Q-BERT: top eigenvalue of each site's block, by power iteration


class TraceLevel(_ValueStr):
    """Whose average trace multiplies a group's quantization error in HAWQ-V2's sensitivity."""

    group = "group"  # the group's own Hutchinson estimate / its size (noisy with many small groups)
    site = "site"  # the site's (weight matrix's) estimate / its size, as HAWQ-V2 does per layer


class NegativeCurvature(_ValueStr):
    """What HAWQ-V2's sensitivity makes of a curvature estimate that is not positive (a fine-tuned model is
    not exactly at a minimum: whole matrices can have a negative Hessian trace, beyond its standard error)."""

    floor = "floor"  # a thousandth of the median positive curvature: nearly free to quantize, and to prune
    absolute = "absolute"  # its magnitude: curvature of either sign makes a perturbation costly


@dataclass
class HawqConfig:
    """HAWQ-V2 (arXiv:1911.03852): Hessian-aware sensitivities of every group (on the FP model, over
    training batches) and the Pareto-frontier allocation at the budget."""

    sensitivity: Sensitivity = Sensitivity.trace
    trace_level: TraceLevel = TraceLevel.site  # group: each group's own trace (noisy with 128 groups per matrix)
    negative_curvature: NegativeCurvature = NegativeCurvature.floor  # absolute: |estimate| (see BENCHMARKS.md)
    max_probes: int = 100  # Hutchinson probes (power iterations per site for top_eigenvalue)
    tol: float = 1e-2  # stop once the estimates move by less than this, relative to |estimate|
    batch_size: int = 32
    num_batches: int = 1  # training batches the Hessian averages over
    frontier_points: int = 50  # budgets swept to draw the frontier
    solver_time_limit: float = 2.0  # seconds per integer program of an allocation (see search/knapsack.py)
    activations: bool = False  # also allocate activation bits (space.a_bits) by their sensitivity
    a_avg_bits: Optional[float] = None  # with activations: average bits per activation element (input-width weighted)

    def __post_init__(self) -> None:
        for name in ("max_probes", "tol", "batch_size", "num_batches", "frontier_points", "solver_time_limit"):
            _positive(f"hawq.{name}", getattr(self, name))
        if self.a_avg_bits is not None and not self.activations:  # it would be ignored without a word
            raise ValueError(f"hawq.a_avg_bits={self.a_avg_bits} needs hawq.activations=true (activation bits are "
                             f"allocated only then); add it, or drop hawq.a_avg_bits")


@dataclass
class BudgetConfig:
    """The size a searched model must fit: average bits per weight, MiB, or the size of an architecture,
    in `scope`; none: no limit."""

    avg_bits: Optional[float] = None
    mb: Optional[float] = None
    match: Optional[str] = None  # an architecture.json: exactly its size in `scope` (compare at equal size)
    scope: supernet.Scope = supernet.Scope.ENCODER

    def __post_init__(self) -> None:
        given = [name for name in ("avg_bits", "mb", "match") if getattr(self, name) is not None]
        if len(given) > 1:
            raise ValueError(f"budget.{given[0]} and budget.{given[1]} are both set; give one of them")
        for name in ("avg_bits", "mb"):
            if getattr(self, name) is not None:
                _positive(f"budget.{name}", getattr(self, name))


@dataclass
class LoggerConfig:
    kind: LoggerKind = LoggerKind.none
    project: str = "bert-mpq"
    entity: Optional[str] = None
    mode: WandbMode = WandbMode.auto


@dataclass
class Config:
    """The whole run. Top-level fields cut across stages."""

    stage: Stage = Stage.finetune
    seed: int = 42
    max_steps: Optional[int] = None  # caps every training stage (smoke runs, CI)
    max_eval_examples: Optional[int] = None  # caps every evaluated split
    resume: bool = False  # continue the interrupted run in hydra.run.dir from its train_state/
    mixed_precision: MixedPrecision = MixedPrecision.fp32
    progress_bar: bool = True  # also off whenever stderr is not a terminal
    # compare/pipeline: keep a finished step's whole train_state/ (optimiser state is ~2x the model, and a
    # finished step is never resumed there); false keeps only a search's final weights (for qat.init=supernet)
    keep_train_state: bool = False
    cache_dir: Optional[str] = "${oc.env:MPQ_CACHE,'~/.cache/bert-mpq'}"  # tokenised data; null: none
    model: ModelConfig = field(default_factory=ModelConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    space: supernet.SearchSpace = field(default_factory=supernet.SearchSpace)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    qat: QatConfig = field(default_factory=QatConfig)
    hawq: HawqConfig = field(default_factory=HawqConfig)
    budget: BudgetConfig = field(default_factory=BudgetConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    compare: CompareConfig = field(default_factory=CompareConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)

    def __post_init__(self) -> None:
        for name in ("max_steps", "max_eval_examples"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name}={value} is invalid; use a positive int or null (no cap)")
        if self.search.group_lasso > 0 and 0 not in self.space.w_bits:
            raise ValueError(f"search.group_lasso={self.search.group_lasso} pushes groups toward 0 bits, but "
                             f"space.w_bits={list(self.space.w_bits)} cannot prune; add 0 or drop search.group_lasso")


def _positive(name: str, value: float) -> None:
    if value <= 0:
        raise ValueError(f"{name}={value} is invalid; use a positive value")


def _non_negative(name: str, value: float) -> None:
    if value < 0:
        raise ValueError(f"{name}={value} is invalid; use a value >= 0")


def assets_or(subpath: str, hub: Any = None) -> Any:
    """`$MPQ_ASSETS/subpath` (absolute) when MPQ_ASSETS is set, else `hub` (a hub id, or None)."""
    root = os.environ.get(ASSETS_ENV)
    if not root:
        return hub
    return str((Path(root).expanduser() / subpath).resolve())


def register() -> None:
    """Register the schema and the `mpq_assets` resolver; idempotent, needed before composing."""
    if not OmegaConf.has_resolver("mpq_assets"):
        OmegaConf.register_new_resolver("mpq_assets", assets_or)
    ConfigStore.instance().store(name="base_config", node=Config)


def to_config(cfg: DictConfig) -> Config:
    """The composed config as a `Config`; a UserError (one line) when a value fails validation."""
    try:
        config = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as e:
        # to_object runs the dataclasses' __post_init__; OmegaConf wraps their ValueErrors.
        cause = e.__cause__ if isinstance(e.__cause__, ValueError) else e
        raise UserError(first_line(cause)) from e
    except ValueError as e:
        raise UserError(first_line(e)) from e
    assert isinstance(config, Config), f"the root schema is not Config but {type(config).__name__}"
    return config

