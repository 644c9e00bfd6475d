"""The `python -m search` app end to end on a tiny random BERT and fixture files in tmp_path: finetune
(classification, NER, regression, QA) and eval in-process through `run_stage`, one subprocess run,
one-line errors that leave no run directory behind, the wandb logger offline, and a short real run on
the offline assets (MiniLM-L6 on SST-2)."""

from __future__ import annotations

import json
import shutil
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from transformers import BertModel

from conftest import ROOT, tiny_config
from data_fixtures import GLUE_FILES, tiny_tokenizer, write_conll, write_glue, write_squad
from search.__main__ import CONF_DIR, check_group_choices, check_overrides, run_stage
from search.config import Config, LoggerConfig, LoggerKind, Stage, WandbMode
from search.errors import UserError
from search.logger import NullLogger, make_logger, step_loggers, wandb_mode
from search.rundir import LOCK, RunDir, check_reusable, run_step

WORDS = ["the", "cat", "sat", "on", "mat", "washington", "unaffable", "a", "is", "it", "where", "who"]


def _sentences(n: int, seed: int) -> list[tuple[str, int]]:
    rng = random.Random(seed)
    # the last word gives the label away, so the data is learnable
    return [(" ".join(rng.choice(WORDS) for _ in range(5)) + (" cat" if i % 2 else " mat"), i % 2)
            for i in range(n)]


def _tsv(rows: list[tuple[str, int]]) -> str:
    return "sentence\tlabel\n" + "".join(f"{s}\t{y}\n" for s, y in rows)


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict[str, Path]:
    """A tiny BertModel + tokenizer (like MiniLM: no head) and fixture data for every task kind."""
    root = tmp_path_factory.mktemp("app")
    model_dir = root / "model"
    tok = tiny_tokenizer(root / "tokenizer")
    BertModel(tiny_config()).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    data = root / "data"
    write_glue(data, "SST-2", {"train.tsv": _tsv(_sentences(40, 0)), "dev.tsv": _tsv(_sentences(10, 1)),
                               "test-labeled.tsv": _tsv(_sentences(6, 2))})
    write_glue(data, "STS-B")
    write_conll(data)
    write_squad(data)
    return {"root": root, "model": model_dir, "data": data}


def _cfg(env: dict[str, Path], tmp_path: Path, *overrides: str):
    base = [f"model.name_or_path={env['model']}", f"task.data_dir={env['data']}", "task.max_seq_len=32",
            "logger=none", "max_steps=5", "finetune.batch_size=8", "eval.batch_size=4",
            f"cache_dir={tmp_path / 'cache'}", "progress_bar=false"]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=base + list(overrides))


def _metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


def test_finetune_then_eval(env, tmp_path):
    run_dir = tmp_path / "ft"
    assert run_stage(_cfg(env, tmp_path), run_dir) == 0
    checkpoint = run_dir / "checkpoint"
    for name in ("config.json", "model.safetensors", "tokenizer.json", "bert_mpq.json"):
        assert (checkpoint / name).is_file(), name
    assert (run_dir / "config.yaml").is_file() and (run_dir / "run.log").is_file()
    assert json.loads((run_dir / "train_state" / "loop.json").read_text()) == {"step": 5}
    m = _metrics(run_dir)
    assert m["stage"] == "finetune" and m["task"] == "sst2" and m["split"] == "validation"
    assert m["train"]["steps"] == 5 and m["train"]["wall_s"] > 0 and m["train"]["examples_per_s"] > 0
    dev = m["splits"]["validation"]
    assert dev["examples"] == 10 and 0.0 <= dev["metrics"]["accuracy"] <= 100.0
    assert m["main_metric"] == {"name": "accuracy", "value": dev["metrics"]["accuracy"]}
    saved = OmegaConf.load(run_dir / "config.yaml")
    assert saved.model.name_or_path == str(env["model"]) and saved.max_steps == 5

    eval_dir = tmp_path / "ev"
    rc = run_stage(_cfg(env, tmp_path, "stage=eval", f"eval.checkpoint={checkpoint}",
                        "eval.splits=[test_labeled]"), eval_dir)
    assert rc == 0
    e = _metrics(eval_dir)
    assert e["stage"] == "eval" and set(e["splits"]) == {"validation", "test_labeled"}
    # the checkpoint is the model that was evaluated at the end of fine-tuning
    assert e["splits"]["validation"]["metrics"] == dev["metrics"]
    assert e["splits"]["test_labeled"]["examples"] == 6


@pytest.mark.parametrize("task, metric", [("conll03", "f1"), ("stsb", "pearson"), ("squad", "f1")])
def test_finetune_other_task_kinds(env, tmp_path, task, metric):
    extra = ["task.max_seq_len=24", "task.doc_stride=6"] if task == "squad" else []
    assert run_stage(_cfg(env, tmp_path, f"task={task}", "max_steps=2", *extra), tmp_path / "run") == 0
    m = _metrics(tmp_path / "run")
    assert m["main_metric"]["name"] == metric
    assert set(m["splits"]["validation"]["metrics"]) >= {metric}
    config = json.loads((tmp_path / "run" / "checkpoint" / "config.json").read_text())
    if task == "stsb":
        assert config["problem_type"] == "regression" and len(config["id2label"]) == 1
    if task == "conll03":
        assert config["id2label"]["1"] == "B-PER"


def test_resume_finishes_an_interrupted_run(env, tmp_path):
    run_dir = tmp_path / "run"
    assert run_stage(_cfg(env, tmp_path, "max_steps=3"), run_dir) == 0
    # a finished or interrupted run is never overwritten by a fresh one
    assert run_stage(_cfg(env, tmp_path, "max_steps=6"), run_dir) == 2
    assert run_stage(_cfg(env, tmp_path, "max_steps=6", "resume=true"), run_dir) == 0
    m = _metrics(run_dir)
    assert m["train"]["start_step"] == 3 and m["train"]["steps"] == 6


def test_a_run_stopped_part_way_through_its_steps_needs_resume(tmp_path):
    """A compare or pipeline run interrupted after some steps holds its results only in the steps' folders."""
    run_dir = tmp_path / "run"
    (run_dir / "b2" / "s42" / "search").mkdir(parents=True)
    for name in ("config.yaml", "run.log"):
        (run_dir / name).write_text("")
    check_reusable(run_dir, resume=False)  # nothing finished yet: nothing to protect
    (run_dir / "fp32").mkdir()
    (run_dir / "fp32" / "metrics.json").write_text("{}")
    (run_dir / "b2" / "s42" / "search" / "train_state" / "checkpoint").mkdir(parents=True)
    with pytest.raises(UserError, match=r"holds a run \(b2/s42/search/train_state, fp32/metrics.json\); pass "
                                        r"resume=true") as e:
        check_reusable(run_dir, resume=False)
    assert "\n" not in str(e.value)
    check_reusable(run_dir, resume=True)
    for i in range(3):
        (run_dir / f"c{i}").mkdir()
        (run_dir / f"c{i}" / "metrics.json").write_text("{}")
    with pytest.raises(UserError, match=r"\(b2/s42/search/train_state, c0/metrics.json, c1/metrics.json and 2 more\)"):
        check_reusable(run_dir, resume=False)


# ----------------------------------------------------------------------------- bad inputs


def _bad_data(root: Path) -> None:
    """RTE with a label outside its set, SST-2 with the wrong header, MRPC with an empty dev split."""
    write_glue(root, "RTE", {"train.tsv": "index\tsentence1\tsentence2\tlabel\n0\ta\tb\tmaybe\n",
                             "dev.tsv": GLUE_FILES["RTE"]["dev.tsv"]})
    write_glue(root, "SST-2", {"train.tsv": "text\tlabel\nhello\t1\n", "dev.tsv": "text\tlabel\nhi\t0\n"})
    mrpc = GLUE_FILES["MRPC"]
    write_glue(root, "MRPC", {"train.tsv": mrpc["train.tsv"], "dev.tsv": mrpc["dev.tsv"].splitlines()[0] + "\n"})


BAD = {
    "unknown task": (["task.name=sst3"], "sst3"),
    "missing data file": (["task=rte"], "RTE"),
    "bad max_seq_len": (["task.max_seq_len=4"], "max_seq_len"),
    "bad space bits": (["space.w_bits=[3,33]"], "33"),
    "bad budget": (["budget.avg_bits=-1"], "budget.avg_bits"),
    "missing checkpoint": (["stage=eval", "eval.checkpoint=/nonexistent/checkpoint"], "eval.checkpoint"),
    "missing eval architecture": (["stage=eval", "eval.architecture=/nonexistent/architecture.json"], "eval.architecture"),
    "malformed eval architecture": (["stage=eval", "eval.architecture={bad}/SST-2/train.tsv"], "train.tsv"),
    "missing model dir": (["model.name_or_path=/nonexistent/model"], "model.name_or_path"),
    "compare with a budget": (["stage=compare", "budget.avg_bits=3"], "takes its budgets from compare.budgets"),
    "compare repeats a seed": (["stage=compare", "compare.seeds=[1,1]"], "repeats an entry"),
    "label outside label set": (["task=rte", "task.data_dir={bad}"], "maybe"),
    "columns do not match": (["task.data_dir={bad}"], "header does not match"),
    "empty split": (["task=mrpc", "task.data_dir={bad}"], "holds no examples"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_is_one_line_and_leaves_no_run_dir(env, tmp_path, capsys, case):
    overrides, needle = BAD[case]
    bad = tmp_path / "bad"
    _bad_data(bad)
    run_dir = tmp_path / "run"
    run_dir.mkdir()  # hydra creates the run directory before the app runs
    rc = run_stage(_cfg(env, tmp_path, *[o.format(bad=bad) for o in overrides]), run_dir)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc != 0
    assert err[-1].startswith("error: ") and needle in err[-1], err[-1]
    assert "Traceback" not in "\n".join(err)
    assert not run_dir.exists()


def test_a_truncated_checkpoint_is_one_line_and_leaves_no_run_dir(env, tmp_path, capsys):
    checkpoint = tmp_path / "checkpoint"
    shutil.copytree(env["model"], checkpoint)
    weights = checkpoint / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # a copy that stopped part-way
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    assert run_stage(_cfg(env, tmp_path, "stage=eval", f"eval.checkpoint={checkpoint}"), run_dir) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"error: cannot load '{checkpoint}'") and "Traceback" not in "\n".join(err)
    assert not run_dir.exists()


def test_bad_input_keeps_an_earlier_run(env, tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics.json").write_text('{"earlier": true}\n')
    assert run_stage(_cfg(env, tmp_path, "space.w_bits=[33]"), run_dir) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("error: ")
    assert json.loads((run_dir / "metrics.json").read_text()) == {"earlier": True}


def test_a_run_directory_in_use_is_refused_and_kept(env, tmp_path, capsys):
    """A second run into a directory another run holds open (resume=true twice, say) stops with a one-line
    error before writing anything; once the first run ends, the directory is free again."""
    run_dir = tmp_path / "run"
    first = RunDir(run_dir, config_yaml="first: true\n")
    first.open()
    first.write_json("metrics.json", {"first": True})
    assert (run_dir / LOCK).read_text().strip() == f"pid {os.getpid()}"
    assert run_stage(_cfg(env, tmp_path, "resume=true"), run_dir) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: ") and "is in use by another run" in err and f"pid {os.getpid()}" in err, err
    assert (run_dir / "config.yaml").read_text() == "first: true\n"
    assert json.loads((run_dir / "metrics.json").read_text()) == {"first": True}
    first.close()
    assert not (run_dir / LOCK).exists()
    second = RunDir(run_dir / "again")
    with second:
        second.open()  # free: the lock went with the first run
        assert (second.path / LOCK).is_file()
    assert not (second.path / LOCK).exists()


def test_unknown_group_option():
    with pytest.raises(UserError, match="unknown task 'sst3'; choose one of: .*sst2"):
        check_group_choices(["task=sst3"])
    with pytest.raises(UserError, match="unknown model"):
        check_group_choices(["model=bert-huge"])
    check_group_choices(["task=rte", "model=minilm-l6", "task.max_seq_len=5", "experiment=null", "+x=1"])


@pytest.mark.parametrize("overrides, message", [
    (["task=sst3"], "unknown task 'sst3'"),  # the group check comes first
    (["search.lr=fast"], "^search.lr=fast: Value 'fast' of type 'str' could not be converted to Float; fix the value$"),
    (["task=mrpc", "compare.budgets=[2,abc]"], "^compare.budgets=\\[2,abc\\]: .*'abc'.*; fix the value$"),
    (["space.w_grid=FOO"], "expected one of .*MIDRISE"),
    (["qat.epoch=3"], "^unknown option qat.epoch; did you mean qat.epochs"),
    (["tasks=mrpc"], "^unknown option tasks; did you mean task\\?$"),
    (["nosuch.key=1"], "^unknown option nosuch.key; README.md lists the options$"),
    (["budget.avg_bits=[1"], "^budget.avg_bits=\\[1: .*; write overrides as key=value"),
    (["compare.budgets=1,2"], "^compare.budgets=1,2 is ambiguous; write a list as key=\\[a,b\\]"),
])
def test_bad_overrides_are_one_line(overrides, message):
    with pytest.raises(UserError, match=message) as e:
        check_overrides(overrides)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("overrides, message", [
    (["seed=42,43", "search.epochs=abc"], "^search.epochs=abc: Value 'abc'.*; fix the value$"),
    (["budget.avg_bits=2,abc"], "^budget.avg_bits=abc: Value 'abc'"),  # a value after the first
    (["seed=1,2", "search.lr=1e-4,fast"], "^search.lr=fast: "),  # the second of two sweeps
    (["task=mrpc,sst3"], "^unknown task 'sst3'; choose one of"),
    (["seed=range(1,3)", "qat.epoch=1"], "^unknown option qat.epoch; did you mean qat.epochs"),
    (["seed=1,2", "budget.avg_bits=[1"], "^budget.avg_bits=\\[1: .*; write overrides as key=value"),
])
def test_bad_sweep_values_are_one_line(overrides, message):
    for flag in ("-m", "--multirun"):
        with pytest.raises(UserError, match=message) as e:
            check_overrides([flag, *overrides])
        assert "\n" not in str(e.value)


def test_good_overrides_and_hydra_flags_pass():
    check_overrides(["task=mrpc", "space=lowbit", "budget.avg_bits=2", "compare.budgets=[4,2]", "hydra.run.dir=x",
                     "+x=1"])
    check_overrides(["-m", "seed=1,2", "search.lr=1e-4,2e-5", "task=mrpc,cola", "budget.avg_bits=range(2,4)",
                     "hydra.sweep.dir=x"])
    check_overrides(["-m", "seed=interval(1,2)", "task=glob(*)"])  # not listable without the sweeper: hydra's
    check_overrides(["--cfg", "job", "search.lr=fast"])  # other flags: hydra's to read


# ----------------------------------------------------------------------------- subprocess


def _python_m_search(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "disabled",
           "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "search", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_python_m_search_subprocess(env, tmp_path):
    run_dir = tmp_path / "run"
    base = [f"model.name_or_path={env['model']}", f"task.data_dir={env['data']}", "task.max_seq_len=32",
            "logger=none", "max_steps=2", f"cache_dir={tmp_path / 'cache'}", f"hydra.run.dir={run_dir}"]
    done = _python_m_search(*base, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert _metrics(run_dir)["train"]["steps"] == 2
    assert sorted(p.name for p in run_dir.iterdir()) == [
        "checkpoint", "config.yaml", "metrics.json", "run.log", "train_state"]

    # a misspelt option: one line, non-zero, no run directory
    bad_dir = tmp_path / "bad"
    done = _python_m_search(*base[:-1], "search.lrr=1e-4", f"hydra.run.dir={bad_dir}", cwd=tmp_path)
    assert done.returncode != 0
    assert done.stderr.strip().splitlines() == ["error: unknown option search.lrr; did you mean search.lr or "
                                                "search.arch_lr or search.xi?"]
    assert not bad_dir.exists()


# ----------------------------------------------------------------------------- wandb


def test_wandb_logger_offline(tmp_path, monkeypatch):
    for var in ("WANDB_DIR", "WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(var, str(tmp_path / var.lower()))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    assert wandb_mode(WandbMode.auto) == "offline"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert wandb_mode(WandbMode.auto) is None  # wandb reads $WANDB_MODE itself
    monkeypatch.delenv("WANDB_MODE")
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert wandb_mode(WandbMode.auto) == "online"
    monkeypatch.delenv("WANDB_API_KEY")

    assert isinstance(make_logger(LoggerConfig(kind=LoggerKind.none), tmp_path, {}), NullLogger)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    logger = make_logger(LoggerConfig(kind=LoggerKind.wandb, mode=WandbMode.offline), run_dir,
                         {"task": {"name": "sst2"}})
    logger.log({"loss": 0.5}, step=1)
    logger.summary({"eval": {"validation": {"accuracy": 50.0}}})
    logger.finish()
    assert list((run_dir / "wandb").glob("offline-run-*"))


def test_each_step_logs_to_a_wandb_run_of_its_own_and_the_command_logs_after_its_steps(tmp_path, monkeypatch):
    """A pipeline or a comparison keeps its own run open while every step logs to one of its own; a step's run
    once ended the command's, and the comparison table logged after the steps then failed."""
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("WANDB_MODE", raising=False)
    top = tmp_path / "cmp"
    run = RunDir(top, config_yaml="stage: compare\n",
                 logger_factory=step_loggers(LoggerConfig(kind=LoggerKind.wandb, mode=WandbMode.offline), top))
    seen = {}

    def step(r: RunDir, resume: bool) -> dict:
        r.open()
        r.log({"loss": 1.0}, 0)
        seen.update(name=r.logger._run.name, group=r.logger._run.group, config=dict(r.logger._run.config))
        r.write_json("metrics.json", {})
        return {}

    (tmp_path / "t.csv").write_text("method,f1\nsearched,85.0\n")
    with run:
        run.open()
        run_step(run, "b2/s42/search", step, config=Config(stage=Stage.search, seed=42))
        run.logger.table("comparison", tmp_path / "t.csv")  # the command's run is still open
        assert (run.logger._run.name, run.logger._run.group) == ("cmp", "cmp")
    assert seen["name"] == "cmp/b2/s42/search" and seen["group"] == "cmp"
    assert seen["config"]["stage"] == "search" and seen["config"]["seed"] == 42  # the step's own config
    assert list((top / "wandb").glob("offline-run-*"))
    assert list((top / "b2" / "s42" / "search" / "wandb").glob("offline-run-*"))


def test_wandb_online_without_an_api_key_is_one_line_before_the_run_dir(env, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    for mode, env_mode in (("online", None), ("auto", "online")):  # asked for, or through $WANDB_MODE
        monkeypatch.delenv("WANDB_MODE", raising=False) if env_mode is None else monkeypatch.setenv("WANDB_MODE", env_mode)
        run_dir = tmp_path / "run"
        run_dir.mkdir()
        assert run_stage(_cfg(env, tmp_path, "logger=wandb", f"logger.mode={mode}"), run_dir) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err == ["error: logger.mode=online needs a wandb API key (WANDB_API_KEY, or `wandb login`); log offline "
                       "with logger.mode=offline (sync later with `wandb sync`) or use logger=none"]
        assert not run_dir.exists()


# ----------------------------------------------------------------------------- real assets


@pytest.mark.assets
def test_real_minilm_sst2_short_run(assets, tmp_path):
    model = assets / "models" / "all-MiniLM-L6-v2"
    sst2 = assets / "glue" / "SST-2"
    if not model.is_dir() or not sst2.is_dir():
        pytest.skip("MiniLM-L6 or SST-2 missing from the assets")
    # a few hundred real training rows keep tokenisation (into tmp_path) short
    lines = (sst2 / "train.tsv").read_text(encoding="utf-8").splitlines(keepends=True)
    data = tmp_path / "data" / "glue" / "SST-2"
    data.mkdir(parents=True)
    (data / "train.tsv").write_text("".join(lines[:401]), encoding="utf-8")
    (data / "dev.tsv").write_text((sst2 / "dev.tsv").read_text(encoding="utf-8"), encoding="utf-8")
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=[
            "experiment=quickstart", f"model.name_or_path={model}", f"task.data_dir={tmp_path / 'data'}",
            "logger=none", "max_steps=20", "max_eval_examples=200", "finetune.batch_size=16",
            f"cache_dir={tmp_path / 'cache'}", "progress_bar=false"])
    assert run_stage(cfg, tmp_path / "run") == 0
    m = _metrics(tmp_path / "run")
    assert m["splits"]["validation"]["examples"] == 200 and "accuracy" in m["splits"]["validation"]["metrics"]
    assert m["train"]["steps"] == 20
