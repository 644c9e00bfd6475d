"""conf/ and search/config.py: every config file composes and converts to the typed Config, typos and
wrong types fail at compose time, the MPQ_ASSETS presets, validation in the schemas, hydra's settings
that keep a failed run's directory empty."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

import supernet
from search.__main__ import CONF_DIR
from search.config import Config, LoggerKind, MixedPrecision, Stage, TaskConfig, to_config
from search.errors import UserError
from search.tasks import TASKS

GROUP_FILES = sorted(
    (p.parent.name, p.stem) for p in CONF_DIR.glob("*/*.yaml") if p.parent.name != "hydra"
)


def _compose(*overrides: str, hydra_config: bool = False):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=list(overrides), return_hydra_config=hydra_config)


@pytest.fixture
def no_assets(monkeypatch):
    monkeypatch.delenv("MPQ_ASSETS", raising=False)


def test_every_group_has_files():
    groups = {g for g, _ in GROUP_FILES}
    assert groups == {"model", "task", "space", "search", "qat", "hawq", "budget", "logger", "experiment"}
    assert {name for g, name in GROUP_FILES if g == "task"} == set(TASKS)


@pytest.mark.parametrize("group, name", GROUP_FILES)
def test_every_config_file_composes_and_converts(group, name):
    cfg = _compose(f"{group}={name}")
    config = OmegaConf.to_object(cfg)
    assert isinstance(config, Config)
    assert isinstance(config.space, supernet.SearchSpace)
    assert to_config(cfg) == config
    if group == "task":
        assert config.task.name == name
        assert config.task.max_seq_len == (384 if name == "squad" else 128)


def test_defaults_are_the_papers_setting(no_assets):
    config = to_config(_compose())
    assert config.stage is Stage.finetune
    assert config.model.name_or_path == "google-bert/bert-base-uncased"
    assert config.task == TaskConfig(name="sst2", data_dir=None, max_seq_len=128)
    assert config.space == supernet.SearchSpace()
    assert config.logger.kind is LoggerKind.wandb and config.mixed_precision is MixedPrecision.fp32
    assert config.max_steps is None and config.resume is False


def test_quickstart(no_assets):
    config = to_config(_compose("experiment=quickstart"))
    assert config.model.name_or_path == "sentence-transformers/all-MiniLM-L6-v2"
    assert config.task.name == "sst2" and config.task.max_seq_len == 64
    assert (config.max_steps, config.max_eval_examples, config.finetune.batch_size) == (200, 500, 32)


def test_lowbit_space_is_the_default_with_unpruned_midrise_candidates():
    config = to_config(_compose("space=lowbit", "space.groups=12"))
    expected = supernet.SearchSpace(w_bits=[1, 2, 3, 4], w_grid=supernet.QuantMode.MIDRISE, groups=12)
    assert config.space == expected
    assert 0 not in config.space.w_bits


def test_mpq_assets_presets(monkeypatch, tmp_path, no_assets):
    assert to_config(_compose("task=rte", "model=minilm-l6")).task.data_dir is None
    monkeypatch.setenv("MPQ_ASSETS", str(tmp_path))
    config = to_config(_compose("task=rte", "model=minilm-l6"))
    assert config.task.data_dir == str(tmp_path.resolve())
    assert config.model.name_or_path == str(tmp_path.resolve() / "models" / "all-MiniLM-L6-v2")
    # the hub model keeps its hub id: the assets have no BERT-base weights
    assert to_config(_compose()).model.name_or_path == "google-bert/bert-base-uncased"
    # explicit values win over the preset
    assert to_config(_compose("task.data_dir=null")).task.data_dir is None


@pytest.mark.parametrize("override", [
    "task.max_seq_lenn=5", "max_steps=abc", "stage=finetuned", "finetune.lr=fast",
    "space.w_bits=four", "logger.kind=tensorboard", "mixed_precision=fp64", "budget.scope=layer",
])
def test_typo_or_wrong_type_fails_at_compose(override):
    with pytest.raises(ConfigCompositionException):
        _compose(override)


@pytest.mark.parametrize("override, needle", [
    ("space.w_bits=[3,33]", "33"),
    ("space.groups=0", "space.groups"),
    ("task.max_seq_len=4", "task.max_seq_len=4"),
    ("task.name=sst3", "sst3"),
    ("max_steps=0", "max_steps"),
    ("finetune.warmup_ratio=1.5", "warmup_ratio"),
    ("eval.batch_size=0", "eval.batch_size"),
    ("search.lr=-1e-5", "search.lr=-1e-05"),
    ("search.curvature_weight=-1", "search.curvature_weight"),
    ("search.xi=1e-3", "add search.second_order=true"),
    ("space.w_bits=[0,1,2]", "space.w_grid=MIDRISE"),
    ("space.w_grid=UNSIGNED", "space.w_grid=UNSIGNED"),
    ("space.a_mode=MIDRISE", "space.a_mode=MIDRISE"),
    ("space.a_bits=[1,8]", "space.a_bits=[1, 8]"),
    ("compare.budgets=[]", "compare.budgets is empty; give at least one, e.g. compare.budgets=[4,3,2]"),
    ("compare.seeds=[]", "compare.seeds is empty"),
    ("compare.methods=[]", "compare.methods is empty"),
    ("compare.seeds=[42,42]", "compare.seeds=[42, 42] repeats an entry"),
    ("compare.qat_draws=0", "compare.qat_draws=0 is invalid; use 1 (one QAT run per architecture) or more"),
    ("search.log_every=0", "search.log_every=0 is invalid"),  # once a ZeroDivisionError mid-run
    ("search.log_mass_every=0", "search.log_mass_every=0 is invalid"),
    ("search.checkpoint_every=-1", "search.checkpoint_every=-1 is invalid"),
    ("qat.log_every=0", "qat.log_every=0 is invalid"),
    ("qat.max_grad_norm=-1", "qat.max_grad_norm=-1.0 is invalid"),
])
def test_bad_values_fail_in_to_config_with_one_line(override, needle):
    with pytest.raises(UserError) as info:
        to_config(_compose(override))
    message = str(info.value)
    assert needle in message and "\n" not in message


def test_a_group_lasso_needs_a_weight_step_and_a_zero_bit_candidate():
    """It shrinks the weights toward pruning: with no weight step or nothing to prune it would do nothing silently."""
    assert to_config(_compose("search.group_lasso=0.1")).search.group_lasso == 0.1
    with pytest.raises(UserError, match="search.group_lasso=0.1 shrinks the weights in their step, which search.lr=0"):
        to_config(_compose("search.group_lasso=0.1", "search.lr=0"))
    with pytest.raises(UserError, match=r"space.w_bits=\[1, 2, 3, 4\] cannot prune; add 0 or drop search.group_lasso"):
        to_config(_compose("search.group_lasso=0.1", "space=lowbit"))


def test_the_unrolled_step_size_must_be_positive():
    assert to_config(_compose("search.second_order=true", "search.xi=1e-3")).search.xi == 1e-3
    with pytest.raises(UserError, match="search.xi=-0.1 is invalid"):
        to_config(_compose("search.second_order=true", "search.xi=-0.1"))


def test_a_search_weight_lr_of_zero_is_allowed():
    assert to_config(_compose("search.lr=0")).search.lr == 0


def test_budget_takes_one_of_avg_bits_and_mb():
    assert to_config(_compose("budget.avg_bits=3.5")).budget.avg_bits == 3.5
    assert to_config(_compose("budget.mb=20", "budget.scope=TOTAL")).budget.scope is supernet.Scope.TOTAL
    with pytest.raises(UserError, match="both set"):
        to_config(_compose("budget.avg_bits=3", "budget.mb=20"))


def test_hydra_leaves_a_failed_run_dir_empty():
    hydra = _compose(hydra_config=True).hydra
    assert hydra.output_subdir is None and hydra.job.chdir is False
    handlers = OmegaConf.to_container(hydra.job_logging.handlers)
    assert all("FileHandler" not in h["class"] for h in handlers.values())
    assert all("FileHandler" not in h["class"] for h in OmegaConf.to_container(hydra.hydra_logging.handlers).values())


def test_run_dir_names_stage_and_task():
    run_dir = _compose("stage=eval", "task=rte", hydra_config=True).hydra.run.dir
    assert Path(run_dir).parts[:3] == ("runs", "eval", "rte")
