"""The search, qat, pipeline and export stages end to end in-process on a tiny random BERT, the eval stage on
quantized and packed folders, and the start-up errors of bad input (no run directory left behind)."""
from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from search.__main__ import CONF_DIR, run_stage
from search.bilevel import BilevelStep
from supernet import Architecture, sites

from test_app import env  # noqa: F401  (module fixture: tiny model + fixture data)

SPACE = ["space.groups=4", "space.embedding_groups=4"]


def _cfg(env, tmp_path: Path, *overrides: str):  # noqa: F811
    base = [f"model.name_or_path={env['model']}", f"task.data_dir={env['data']}", "task.max_seq_len=32",
            "logger=none", "max_steps=4", "finetune.batch_size=8", "search.batch_size=8", "qat.batch_size=8",
            "eval.batch_size=4", f"cache_dir={tmp_path / 'cache'}", "progress_bar=false", *SPACE]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=base + list(overrides))


def _metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


def test_pipeline_runs_end_to_end_and_meets_the_budget(env, tmp_path, caplog):  # noqa: F811
    caplog.set_level("INFO")  # as hydra's logging has it
    run_dir = tmp_path / "pipe"
    assert run_stage(_cfg(env, tmp_path, "stage=pipeline", "budget.avg_bits=3", "search.size_weight=5",
                          "qat.init=supernet"), run_dir) == 0
    for step in ("finetune", "search", "qat"):
        assert (run_dir / step / "metrics.json").is_file(), step
    log = (run_dir / "run.log").read_text()  # the whole run, step by step, not only its last lines
    assert all(f"[search.rundir][INFO] - {step}\n" in log for step in ("finetune", "search", "qat"))
    arch = Architecture.load(run_dir / "search" / "architecture.json")
    assert arch.avg_bits("encoder") <= 3.0
    assert (run_dir / "search" / "architecture.png").stat().st_size > 1000
    assert (run_dir / "search" / "alphas.json").is_file()
    assert not (run_dir / "search" / "alphas_input.json").exists()  # activations at 8 bits alone: nothing searched
    # the search step's config.yaml names the model it searched: the pipeline's fine-tuned checkpoint
    assert OmegaConf.load(run_dir / "search" / "config.yaml").model.name_or_path == str(run_dir / "finetune" / "checkpoint")
    search = _metrics(run_dir / "search")
    assert 2.5 < search["derive"]["final"] <= 3.0  # filled up to the budget, not left far below it
    assert search["train"]["steps"] == 3  # 20 examples in the weights half, batches of 8, one epoch
    qat = _metrics(run_dir / "qat")
    assert qat["init"] == "supernet"  # from the search's weights; HAWQ-V2's QAT below has no supernet
    assert qat["architecture"]["encoder_avg_bits"] == pytest.approx(arch.avg_bits("encoder"), abs=1e-3)
    assert (run_dir / "qat" / "quantized" / "model.safetensors").is_file()
    summary = _metrics(run_dir)
    assert summary["stage"] == "pipeline" and summary["main_metric"] == qat["main_metric"]
    # finished steps are never resumed: their train state goes but for the search's final weights
    assert [f.name for f in (run_dir / "search" / "train_state").iterdir()] == ["model.safetensors"]
    assert not (run_dir / "finetune" / "train_state").exists() and not (run_dir / "qat" / "train_state").exists()

    # a second run with resume=true skips every finished step; with pipeline.hawq=true it adds HAWQ-V2 at
    # exactly the searched architecture's size and the same QAT of it
    before = (run_dir / "qat" / "metrics.json").stat().st_mtime_ns
    assert run_stage(_cfg(env, tmp_path, "stage=pipeline", "budget.avg_bits=3", "search.size_weight=5", "resume=true",
                          "pipeline.hawq=true", "hawq.max_probes=2", "qat.init=supernet", "keep_train_state=true"),
                     run_dir) == 0
    assert (run_dir / "qat" / "metrics.json").stat().st_mtime_ns == before
    assert (run_dir / "hawq_qat" / "train_state" / "optimizer.bin").is_file()  # kept when asked
    hawq_arch = Architecture.load(run_dir / "hawq" / "architecture.json")
    assert hawq_arch.size_bytes("encoder") <= arch.size_bytes("encoder")
    assert hawq_arch.size_bytes("encoder") > 0.9 * arch.size_bytes("encoder")
    hawq_qat = _metrics(run_dir / "hawq_qat")
    assert hawq_qat["init"] == "checkpoint"
    assert hawq_qat["architecture"]["encoder_mb"] == pytest.approx(hawq_arch.summary()["encoder_mb"])
    assert {"search", "qat", "hawq", "hawq_qat"} <= set(_metrics(run_dir)["steps"])

    # the eval stage evaluates what QAT wrote, and reports its exact size
    eval_dir = tmp_path / "eval"
    assert run_stage(_cfg(env, tmp_path, "stage=eval", f"eval.checkpoint={run_dir / 'qat' / 'quantized'}"), eval_dir) == 0
    ev = _metrics(eval_dir)
    assert ev["main_metric"] == pytest.approx(qat["main_metric"])
    assert ev["architecture"]["encoder_mb"] == qat["architecture"]["encoder_mb"]

    # eval.architecture scores the searched allocation on the FP checkpoint, before QAT; a quantized
    # checkpoint is refused (it has an architecture already)
    arch_eval = tmp_path / "eval_arch"
    assert run_stage(_cfg(env, tmp_path, "stage=eval", f"eval.architecture={run_dir / 'search' / 'architecture.json'}"),
                     arch_eval) == 0
    ae = _metrics(arch_eval)
    assert ae["architecture"] == arch.summary() and ae["architecture_file"].endswith("architecture.json")
    assert run_stage(_cfg(env, tmp_path, "stage=eval", f"eval.checkpoint={run_dir / 'qat' / 'quantized'}",
                          f"eval.architecture={run_dir / 'search' / 'architecture.json'}"), tmp_path / "eval_arch2") != 0
    assert not (tmp_path / "eval_arch2").exists()

    # export packs the pipeline's QAT model; the folder predicts as the QAT model did and evaluates the same
    export_dir = tmp_path / "export"
    assert run_stage(_cfg(env, tmp_path, "stage=export", f"export.run_dir={run_dir}"), export_dir) == 0
    ex = _metrics(export_dir)
    assert all(v["identical_predictions"] and v["max_abs_logit_diff"] <= 1e-5 for v in ex["verify"].values())
    assert ex["main_metric"] == pytest.approx(qat["main_metric"])
    size = ex["size"]
    assert abs(size["unaccounted_bytes"]) < 1e-6 and size["file_bytes"] < size["qat_file_bytes"] / 3
    assert size["exact_bytes"] == pytest.approx(arch.size_bytes("total"))
    packed_eval = tmp_path / "eval_packed"
    assert run_stage(_cfg(env, tmp_path, "stage=eval", f"eval.checkpoint={export_dir / 'packed'}"), packed_eval) == 0
    assert _metrics(packed_eval)["main_metric"] == pytest.approx(qat["main_metric"])
    assert _metrics(packed_eval)["packed_size"]["file_bytes"] == size["file_bytes"]


def test_question_answering_runs_the_pipeline_with_distillation(env, tmp_path, caplog):  # noqa: F811
    # QA outputs carry start/end logits and no .logits: QAT's live teacher once read the latter and crashed
    caplog.set_level("INFO")
    run_dir = tmp_path / "qa"
    assert run_stage(_cfg(env, tmp_path, "task=squad", "task.max_seq_len=24", "task.doc_stride=6", "stage=pipeline",
                          "budget.avg_bits=3"), run_dir) == 0
    assert OmegaConf.load(run_dir / "config.yaml").qat.kd_weight > 0  # the default distils
    assert "loss/kd" in caplog.text
    assert _metrics(run_dir)["main_metric"]["name"] == "f1"


@pytest.mark.parametrize("overrides, message", [
    ([], "needs export.run_dir"),
    (["export.run_dir=/nonexistent/run"], "no such directory"),
    (["export.run_dir=."], "holds no quantized/ folder"),
])
def test_export_input_errors(env, tmp_path, capsys, overrides, message):  # noqa: F811
    run_dir = tmp_path / "bad_export"
    assert run_stage(_cfg(env, tmp_path, "stage=export", *overrides), run_dir) != 0
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error:") and message in err
    assert not run_dir.exists()


def test_export_refuses_before_writing_anything(env, tmp_path, capsys):  # noqa: F811
    # a QAT run of an architecture priced with fp16 steps (QAT trains fp32 ones, which packing would round)
    assert run_stage(_cfg(env, tmp_path, "stage=search", "budget.avg_bits=3", "space.scale_bits=16", "max_steps=2"),
                     tmp_path / "s") == 0
    assert run_stage(_cfg(env, tmp_path, "stage=qat", f"qat.architecture={tmp_path / 's' / 'architecture.json'}",
                          "space.scale_bits=16", "max_steps=2"), tmp_path / "q") == 0
    arch = Architecture.load(tmp_path / "s" / "architecture.json")
    dataclasses.replace(arch, scale_bits=32).save(tmp_path / "a32.json")
    assert run_stage(_cfg(env, tmp_path, "stage=qat", f"qat.architecture={tmp_path / 'a32.json'}", "max_steps=2"),
                     tmp_path / "q32") == 0
    for qat, overrides, message in (("q", [], "prices 16-bit steps (space.scale_bits=16), but QAT trains fp32 ones"),
                                    ("q32", ["export.tolerance=-1"], "export.tolerance=-1.0 is invalid"),
                                    ("q32", [f"task.data_dir={tmp_path / 'nowhere'}"], "no data folder for task 'sst2'")):
        run_dir = tmp_path / "e"
        run_dir.mkdir()  # hydra creates the run directory before the app runs
        assert run_stage(_cfg(env, tmp_path, "stage=export", f"export.run_dir={tmp_path / qat}", *overrides), run_dir) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith("error:") and message in err[-1] and "Traceback" not in "\n".join(err)
        assert not run_dir.exists()


def test_eval_of_a_tampered_packed_folder_is_a_one_line_error(env, tmp_path, capsys):  # noqa: F811
    from supernet.packed import MANIFEST_FILE

    folder = tmp_path / "packed"
    folder.mkdir()
    (folder / MANIFEST_FILE).write_text('{"format": "bert-mpq.packed", "version": 1, "files": '
                                        '{"model.safetensors": {"bytes": 10, "sha256": "0"}}}')
    (folder / "model.safetensors").write_bytes(b"x" * 7)
    (folder / "config.json").write_text("{}")
    assert run_stage(_cfg(env, tmp_path, "stage=eval", f"eval.checkpoint={folder}"), tmp_path / "ev") != 0
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error:") and "truncated or modified" in err


def test_a_search_of_activation_bits_writes_their_probabilities_beside_the_weights(env, tmp_path):  # noqa: F811
    run_dir = tmp_path / "act"
    assert run_stage(_cfg(env, tmp_path, "stage=search", "budget.avg_bits=3", "space.a_bits=[4,8]", "max_steps=2"),
                     run_dir) == 0
    weights = json.loads((run_dir / "alphas.json").read_text())
    inputs = json.loads((run_dir / "alphas_input.json").read_text())
    assert 0 < len(inputs) < len(weights)  # one per activation quantizer: Q, K and V share theirs
    assert all(a["bits"] == [4, 8] and len(a["probs"]) == 1 and sum(a["probs"][0]) == pytest.approx(1, abs=1e-3)
               for a in inputs.values())
    assert set(inputs) <= set(weights)  # named after the first site that reads the input


def test_qat_of_a_hand_written_uniform_architecture(env, tmp_path):  # noqa: F811
    search_dir = tmp_path / "s"
    assert run_stage(_cfg(env, tmp_path, "stage=search", "search.penalty=linear", "search.size_weight=0.1"), search_dir) == 0
    arch = Architecture.load(search_dir / "architecture.json")
    import dataclasses

    two = Architecture(tuple((n, dataclasses.replace(s, bits=(2,) * len(s.bits)) if s.kind.value == "encoder" else s)
                             for n, s in arch), arch.other_params)
    two.save(tmp_path / "uniform2.json")
    qat_dir = tmp_path / "q"
    assert run_stage(_cfg(env, tmp_path, "stage=qat", f"qat.architecture={tmp_path / 'uniform2.json'}", "qat.kd_weight=0",
                         "qat.freeze_threshold=0.02", "qat.checkpoint_every=2"), qat_dir) == 0
    assert _metrics(qat_dir)["architecture"]["encoder_avg_bits"] == 2.0
    # the freezer's state is part of the train state: a resumed run loads it
    (qat_dir / "metrics.json").unlink()
    assert (qat_dir / "train_state").is_dir()
    assert run_stage(_cfg(env, tmp_path, "stage=qat", f"qat.architecture={tmp_path / 'uniform2.json'}", "qat.kd_weight=0",
                          "qat.freeze_threshold=0.02", "qat.checkpoint_every=2", "resume=true"), qat_dir) == 0


@pytest.mark.parametrize("overrides, message", [
    (["budget.avg_bits=1.5", "space.w_bits=[2,4,8]"], "below the smallest size"),
    (["budget.avg_bits=9"], "at or above the largest size"),
    (["budget.avg_bits=3", "space.w_bits=[4]"], "nothing to search"),
    ([], "needs a target"),
    (["search.penalty=linear", "search.alpha_init=budget"], "starts the search at the budget"),
    (["budget.avg_bits=3", "search.kd_weight=1.5"], "search.kd_weight=1.5 must be in [0, 1]"),
    (["budget.avg_bits=3", "space.w_bits=[2,4]", "search.bitops_target=1e-9"], "below the fewest this space reaches"),
])
def test_impossible_search_settings_fail_at_start_up(env, tmp_path, capsys, overrides, message):  # noqa: F811
    run_dir = tmp_path / "bad"
    assert run_stage(_cfg(env, tmp_path, "stage=search", *overrides), run_dir) != 0
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error:") and message in err
    assert not run_dir.exists()


def test_a_search_started_at_the_budget_that_does_not_move_derives_the_uniform_architecture(env, tmp_path):  # noqa: F811
    run_dir = tmp_path / "s"
    assert run_stage(_cfg(env, tmp_path, "stage=search", "budget.avg_bits=2", "search.alpha_init=budget",
                          "search.arch_lr=1e-9", "search.lr=0"), run_dir) == 0
    arch = Architecture.load(run_dir / "architecture.json")
    encoder = [s for _, s in arch if s.kind.value == "encoder"]
    assert encoder and all(set(s.bits) == {2} for s in encoder)


@pytest.mark.parametrize("stage", ["search", "hawq"])
def test_one_group_per_row_searches_and_plots(env, tmp_path, stage):  # noqa: F811
    # per-row groups give sites different group counts: the plot's padded grid once crashed the run at the end
    run_dir = tmp_path / "s"
    assert run_stage(_cfg(env, tmp_path, f"stage={stage}", "budget.avg_bits=3", "space.groups=-1",
                          "hawq.max_probes=2"), run_dir) == 0
    arch = Architecture.load(run_dir / "architecture.json")
    assert len({len(s.bits) for _, s in arch if s.kind.value == "encoder"}) > 1
    assert (run_dir / "architecture.png").stat().st_size > 1000 and (run_dir / "metrics.json").is_file()


def test_a_search_prices_and_writes_steps_at_space_scale_bits(env, tmp_path):  # noqa: F811
    run_dir = tmp_path / "s"
    assert run_stage(_cfg(env, tmp_path, "stage=search", "budget.avg_bits=3", "space.scale_bits=16"), run_dir) == 0
    arch = Architecture.load(run_dir / "architecture.json")
    assert arch.scale_bits == 16
    assert _metrics(run_dir)["architecture"]["encoder_mb"] == round(arch.size_mb("encoder"), 4)


@pytest.mark.parametrize("how", ["exact", "site"])
def test_search_derivation_reaches_the_derivation(env, tmp_path, how):  # noqa: F811
    run_dir = tmp_path / "s"
    assert run_stage(_cfg(env, tmp_path, "stage=search", "budget.avg_bits=2", f"search.derivation={how}", "max_steps=2"),
                     run_dir) == 0
    derived = _metrics(run_dir)["derive"]
    assert derived[how] is True and derived["final"] <= 2.0
    arch = Architecture.load(run_dir / "architecture.json")
    assert arch.avg_bits("encoder") <= 2.0
    if how == "site":  # two adjacent candidates per site at most
        assert all(len(set(s.bits)) <= 2 for _, s in arch)
    assert OmegaConf.load(run_dir / "config.yaml").search.derivation == how
    # the tool that tabulates searches names the derivation and what it cost
    out = subprocess.run([sys.executable, "tools/search_decidedness.py", str(run_dir)], cwd=CONF_DIR.parent,
                         capture_output=True, text=True, check=True).stdout.splitlines()
    assert "derivation: groups moved in candidate steps, probability lost" in out[0]
    steps = derived["upgraded_groups"] + derived["downgraded_groups"]
    assert f"| {how}: {derived['moved_groups']} in {steps} steps, {derived['probability_lost']:.1f} |" in out[2]


def test_an_interrupted_search_resumes_to_the_result_of_an_uninterrupted_one(env, tmp_path, monkeypatch, caplog):  # noqa: F811
    # 12 steps over two epochs of the architecture half (3 batches each), the first architecture step at step 1
    overrides = ("stage=search", "budget.avg_bits=3", "search.epochs=4", "max_steps=12", "search.checkpoint_every=4",
                 "search.log_every=1")
    assert run_stage(_cfg(env, tmp_path, *overrides), tmp_path / "whole") == 0
    step = BilevelStep.__call__

    def interrupted(self, batch, i):
        if i == 9:  # the last train state is step 8's: architecture batch 7, inside the third epoch
            raise KeyboardInterrupt
        return step(self, batch, i)

    monkeypatch.setattr(BilevelStep, "__call__", interrupted)
    assert run_stage(_cfg(env, tmp_path, *overrides), tmp_path / "cut") == 130
    monkeypatch.setattr(BilevelStep, "__call__", step)
    assert run_stage(_cfg(env, tmp_path, *overrides, "resume=true"), tmp_path / "cut") == 0
    assert _metrics(tmp_path / "cut")["train"]["start_step"] == 8 and _metrics(tmp_path / "cut")["train"]["steps"] == 12
    for name in ("alphas.json", "architecture.json"):
        assert (tmp_path / "cut" / name).read_text() == (tmp_path / "whole" / name).read_text(), name
    # the Q/K/V input quantizer shared under three names is expected, not a warning at every save
    assert not [r for r in caplog.records if "Removed shared tensor" in r.getMessage()]


def test_a_search_with_the_curvature_price_runs_and_logs_it(env, tmp_path, caplog):  # noqa: F811
    run_dir = tmp_path / "s"
    with caplog.at_level("INFO", logger="search.loop"):
        assert run_stage(_cfg(env, tmp_path, "stage=search", "budget.avg_bits=3", "search.curvature_weight=1",
                              "search.log_every=1"), run_dir) == 0
    steps = [r.getMessage() for r in caplog.records if r.name == "search.loop" and r.getMessage().startswith("step ")]
    assert len(steps) == 3 and "loss/curvature" not in steps[0]  # no Fisher before the first architecture step
    assert " mass/0 " in steps[0] and "mass/bert" not in steps[0]  # the overall mass; per site only to the tracker
    assert all("loss/curvature" in m for m in steps[1:])
    assert Architecture.load(run_dir / "architecture.json").n_groups() > 0


def test_a_second_order_search_takes_its_step_size_from_the_config(env, tmp_path, monkeypatch):  # noqa: F811
    import search.dnas

    seen = []

    class Recording(search.dnas.BilevelStep):
        def _unrolled_grads(self, arch_batch, train_batch):
            seen.append(self.xi)
            return super()._unrolled_grads(arch_batch, train_batch)

    monkeypatch.setattr(search.dnas, "BilevelStep", Recording)
    run_dir = tmp_path / "s"
    assert run_stage(_cfg(env, tmp_path, "stage=search", "budget.avg_bits=3", "search.second_order=true",
                          "search.xi=0.25"), run_dir) == 0
    assert seen and set(seen) == {0.25}
    assert Architecture.load(run_dir / "architecture.json").n_groups() > 0
    seen.clear()  # by default the weights' lr, not the 0 the warmup starts the optimiser at
    assert run_stage(_cfg(env, tmp_path, "stage=search", "budget.avg_bits=3", "search.second_order=true",
                          "search.lr=3e-4", "search.lr_warmup_ratio=0.5"), tmp_path / "s2") == 0
    assert seen and set(seen) == {3e-4}


def test_a_distilled_search_runs_and_shares_its_teacher_table_with_qat(env, tmp_path, caplog):  # noqa: F811
    assert run_stage(_cfg(env, tmp_path, "stage=finetune", "max_steps=2"), tmp_path / "ft") == 0
    model = f"model.name_or_path={tmp_path / 'ft' / 'checkpoint'}"  # a head of its own, which every load shares
    run_dir = tmp_path / "s"
    with caplog.at_level("INFO", logger="search.dnas"):
        assert run_stage(_cfg(env, tmp_path, "stage=search", "budget.avg_bits=3", "search.kd_weight=0.5", model),
                         run_dir) == 0
    assert any("distilling from the checkpoint (search.kd_weight=0.5)" in r.getMessage() for r in caplog.records)
    [table] = (tmp_path / "cache" / "teacher").glob("*.pt")  # the search saved the FP teacher's outputs it computed
    assert _metrics(run_dir)["architecture"]["encoder_avg_bits"] <= 3
    caplog.clear()
    with caplog.at_level("INFO", logger="search.teacher"):
        assert run_stage(_cfg(env, tmp_path, "stage=qat", f"qat.architecture={run_dir / 'architecture.json'}", model),
                         tmp_path / "q") == 0
    messages = [r.getMessage() for r in caplog.records]
    assert any(m.startswith(f"teacher outputs from {table} (") for m in messages)  # and QAT reads them back


def test_a_stage_resumed_alone_under_other_settings_is_refused_when_finished_and_warned_when_not(env, tmp_path, caplog, capsys):  # noqa: F811
    run_dir = tmp_path / "s"
    assert run_stage(_cfg(env, tmp_path, "stage=search", "budget.avg_bits=3"), run_dir) == 0
    with caplog.at_level("WARNING", logger="search.rundir"):
        assert run_stage(_cfg(env, tmp_path, "stage=search", "budget.avg_bits=3", "max_steps=6", "resume=true"), run_dir) == 0
        assert not [r for r in caplog.records if r.name == "search.rundir"]  # more steps alone change nothing it had
    # finished: resuming under another budget would replace its result with one derived from a 3-bit search
    before = {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file() and p.name != "run.log"}
    assert run_stage(_cfg(env, tmp_path, "stage=search", "budget.avg_bits=2.5", "resume=true"), run_dir) == 2
    assert "finished with other settings (budget.avg_bits: 3.0 -> 2.5); resume=true would replace its result" in \
        capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file() and p.name != "run.log"} == before
    # interrupted: it continues, and says under which settings
    (run_dir / "metrics.json").unlink()
    with caplog.at_level("WARNING", logger="search.rundir"):
        assert run_stage(_cfg(env, tmp_path, "stage=search", "budget.avg_bits=3", "max_steps=8", "search.arch_lr=0.01",
                              "resume=true"), run_dir) == 0
    [warning] = [r.getMessage() for r in caplog.records if r.name == "search.rundir" and r.levelname == "WARNING"]
    assert warning.startswith("stage=search started with other settings (search.arch_lr: 0.05 -> 0.01); it continues "
                              "from its train state, written under the old ones, and finishes under the new")


def test_a_finished_pipeline_or_eval_resumed_under_other_settings_is_refused(env, tmp_path, capsys):  # noqa: F811
    # the pipeline reused every finished step without a word and wrote their results under the new settings
    run_dir = tmp_path / "p"
    assert run_stage(_cfg(env, tmp_path, "stage=pipeline", "budget.avg_bits=3"), run_dir) == 0
    files = lambda d: {p: p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}  # noqa: E731
    before = files(run_dir)
    assert run_stage(_cfg(env, tmp_path, "stage=pipeline", "budget.avg_bits=2", "resume=true"), run_dir) == 2
    assert ("its finished step search ran with other settings (budget.avg_bits: 3.0 -> 2.0); resume=true would "
            "report that result under the new ones") in capsys.readouterr().err
    assert files(run_dir) == before
    eval_dir = tmp_path / "e"
    assert run_stage(_cfg(env, tmp_path, "stage=eval", f"eval.checkpoint={run_dir / 'qat' / 'quantized'}"), eval_dir) == 0
    before = files(eval_dir)
    assert run_stage(_cfg(env, tmp_path, "stage=eval", f"eval.checkpoint={run_dir / 'finetune' / 'checkpoint'}",
                          "resume=true"), eval_dir) == 2
    assert "stage=eval in" in capsys.readouterr().err and files(eval_dir) == before


def test_pipeline_checks_the_budget_before_fine_tuning(env, tmp_path, capsys):  # noqa: F811
    run_dir = tmp_path / "bad_pipe"
    assert run_stage(_cfg(env, tmp_path, "stage=pipeline", "budget.avg_bits=0.5", "space.w_bits=[2,4]"), run_dir) != 0
    assert "below the smallest size" in capsys.readouterr().err
    assert not run_dir.exists()


def test_a_checkpoint_fine_tuned_elsewhere_skips_fine_tuning_when_told_and_must_have_a_head(env, tmp_path, capsys):  # noqa: F811
    """The pipeline knows its own fine-tuned checkpoints by their bert_mpq.json; one fine-tuned elsewhere (a hub
    model with its task head) is fine-tuned again unless `model.finetuned=true` says it is done."""
    from transformers import AutoTokenizer, BertForSequenceClassification

    from conftest import tiny_config

    bare = tmp_path / "bare_pipe"
    assert run_stage(_cfg(env, tmp_path, "stage=pipeline", "budget.avg_bits=3", "model.finetuned=true"), bare) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "model.finetuned=true, but" in err[0] and "no task head" in err[0]
    assert not bare.exists()

    elsewhere = tmp_path / "elsewhere"  # a classifier with SST-2's two labels and no bert_mpq.json
    BertForSequenceClassification(tiny_config(num_labels=2)).save_pretrained(elsewhere)
    AutoTokenizer.from_pretrained(env["model"]).save_pretrained(elsewhere)
    for told, finetuned in (("model.finetuned=true", False), ("model.finetuned=false", True)):
        run_dir = tmp_path / told.replace("=", "_")
        assert run_stage(_cfg(env, tmp_path, "stage=pipeline", "budget.avg_bits=3", f"model.name_or_path={elsewhere}",
                              told), run_dir) == 0
        assert (run_dir / "finetune").exists() is finetuned
        assert (run_dir / "qat" / "metrics.json").is_file()


def test_qat_needs_an_architecture(env, tmp_path, capsys):  # noqa: F811
    assert run_stage(_cfg(env, tmp_path, "stage=qat"), tmp_path / "q") != 0
    assert "qat.architecture is not set" in capsys.readouterr().err


def test_qat_init_supernet_starts_from_the_model_the_search_evaluated(env, tmp_path):  # noqa: F811
    from safetensors.torch import load_model
    import torch

    from search.models import load_task_model
    from search.qat import SUPERNET_STATE, inherit_supernet, search_supernet
    from search.quantized import quantize
    from supernet import SearchSpace, to_supernet

    search_dir = tmp_path / "s"
    assert run_stage(_cfg(env, tmp_path, "stage=search", "budget.avg_bits=3", "search.lr=1e-3"), search_dir) == 0
    arch = Architecture.load(search_dir / "architecture.json")
    space, state = search_supernet(search_dir, "qat.architecture")
    assert space.groups == 4 and state == search_dir / SUPERNET_STATE
    # the search's derived model: its final supernet with the architecture fixed
    ref = to_supernet(load_task_model(str(env["model"]), "sst2"), space)
    load_model(ref, str(state), strict=False)
    arch.apply(ref)
    # the QAT model: the architecture's own candidates only, weights and steps inherited
    net = quantize(load_task_model(str(env["model"]), "sst2"), arch, SearchSpace())
    fresh = {k: v.clone() for k, v in net.state_dict().items()}
    inherit_supernet(net, str(env["model"]), "sst2", search_dir, "qat.architecture")
    moved = [k for k, v in net.state_dict().items() if not torch.equal(v, fresh[k])]
    assert any(k.endswith("query.weight") for k in moved) and any(k.endswith(".step") for k in moved)
    ids = torch.randint(5, 90, (3, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(net.eval()(input_ids=ids).logits, ref.eval()(input_ids=ids).logits, atol=1e-6)


def test_a_resumed_qat_init_supernet_continues_from_its_own_train_state(env, tmp_path):  # noqa: F811
    search_dir = tmp_path / "s"
    assert run_stage(_cfg(env, tmp_path, "stage=search", "budget.avg_bits=3"), search_dir) == 0
    qat = [f"qat.architecture={search_dir / 'architecture.json'}", "qat.init=supernet"]
    assert run_stage(_cfg(env, tmp_path, "stage=qat", "max_steps=2", *qat), tmp_path / "q") == 0
    # the train state replaces the start, so the search's supernet is not needed (nor loaded) any more
    (search_dir / "train_state" / "model.safetensors").unlink()
    assert run_stage(_cfg(env, tmp_path, "stage=qat", "max_steps=4", "resume=true", *qat), tmp_path / "q") == 0
    m = json.loads((tmp_path / "q" / "metrics.json").read_text())
    assert m["train"]["start_step"] == 2 and m["train"]["steps"] == 4 and m["init"] == "supernet"


def test_qat_init_supernet_needs_a_search_run(env, tmp_path, capsys):  # noqa: F811
    search_dir = tmp_path / "s"
    assert run_stage(_cfg(env, tmp_path, "stage=search", "budget.avg_bits=3"), search_dir) == 0
    hand = tmp_path / "hand" / "architecture.json"
    hand.parent.mkdir()
    hand.write_text((search_dir / "architecture.json").read_text())  # the same allocation, but no search beside it
    assert run_stage(_cfg(env, tmp_path, "stage=qat", f"qat.architecture={hand}", "qat.init=supernet"), tmp_path / "q") != 0
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error:") and "no search's train_state/model.safetensors" in err
    assert not (tmp_path / "q").exists()
    # a search run whose config.yaml this version cannot read (an option it does not know)
    import shutil

    odd = tmp_path / "odd"
    shutil.copytree(search_dir, odd)
    (odd / "config.yaml").write_text("space:\n  w_bits: [0, 2, 4, 8]\n  a_future_option: 1\n")
    assert run_stage(_cfg(env, tmp_path, "stage=qat", f"qat.architecture={odd / 'architecture.json'}",
                          "qat.init=supernet"), tmp_path / "q2") != 0
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error:") and "its space section cannot be read" in err and "a_future_option" in err
    assert not (tmp_path / "q2").exists()


def test_a_binary_midrise_pipeline_meets_its_budget_and_exports(env, tmp_path):  # noqa: F811
    """space.w_grid=MIDRISE with a 1-bit candidate: search, QAT and the packed export keep the grid."""
    run_dir = tmp_path / "pipe"
    over = ("space.w_grid=MIDRISE", "space.w_bits=[0,1,2,4]", "budget.avg_bits=1.5", "search.size_weight=5")
    assert run_stage(_cfg(env, tmp_path, "stage=pipeline", *over), run_dir) == 0
    arch = Architecture.load(run_dir / "search" / "architecture.json")
    assert arch.avg_bits("encoder") <= 1.5
    space = json.loads((run_dir / "qat" / "quantized" / "space.json").read_text())
    assert space["w_grid"] == "midrise"
    export_dir = tmp_path / "export"
    assert run_stage(_cfg(env, tmp_path, "stage=export", f"export.run_dir={run_dir}"), export_dir) == 0
    assert all(v["identical_predictions"] for v in _metrics(export_dir)["verify"].values())
    assert json.loads((export_dir / "packed" / "space.json").read_text())["w_grid"] == "midrise"


def test_a_one_bit_architecture_on_the_symmetric_grid_is_a_one_line_error(env, tmp_path, capsys):  # noqa: F811
    search_dir = tmp_path / "s"
    assert run_stage(_cfg(env, tmp_path, "stage=search", "budget.avg_bits=3"), search_dir) == 0
    arch = Architecture.load(search_dir / "architecture.json")
    import dataclasses

    one = Architecture(tuple((n, dataclasses.replace(s, bits=(1,) * len(s.bits)) if s.kind.value == "encoder" else s)
                             for n, s in arch), arch.other_params)
    one.save(tmp_path / "uniform1.json")
    qat_dir = tmp_path / "q"
    assert run_stage(_cfg(env, tmp_path, "stage=qat", f"qat.architecture={tmp_path / 'uniform1.json'}"), qat_dir) != 0
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error:") and "space.w_grid=MIDRISE" in err
    assert not qat_dir.exists()
    # on the mid-rise grid the same file trains
    assert run_stage(_cfg(env, tmp_path, "stage=qat", f"qat.architecture={tmp_path / 'uniform1.json'}",
                          "space.w_grid=MIDRISE"), qat_dir) == 0
    assert _metrics(qat_dir)["architecture"]["encoder_avg_bits"] == 1.0
    # a file that records its grid (as every search, hawq and compare run writes it) needs no override
    from supernet import QuantMode

    dataclasses.replace(one, w_grid=QuantMode.MIDRISE).save(tmp_path / "uniform1_midrise.json")
    recorded_dir = tmp_path / "q_recorded"
    assert run_stage(_cfg(env, tmp_path, "stage=qat", f"qat.architecture={tmp_path / 'uniform1_midrise.json'}"),
                     recorded_dir) == 0
    assert json.loads((recorded_dir / "quantized" / "space.json").read_text())["w_grid"] == "midrise"
    assert _metrics(recorded_dir)["main_metric"] == _metrics(qat_dir)["main_metric"]  # the same model and training


@pytest.mark.parametrize("stage", ["search", "hawq", "pipeline"])
def test_groups_that_do_not_divide_a_matrix_are_a_one_line_error(env, tmp_path, capsys, stage):  # noqa: F811
    run_dir = tmp_path / "bad_groups"
    assert run_stage(_cfg(env, tmp_path, f"stage={stage}", "budget.avg_bits=3", "space.groups=5"), run_dir) != 0
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error:") and "cannot convert" in err and "5 groups do not divide" in err
    assert not run_dir.exists()


def test_an_allocation_scored_before_qat_sets_its_activation_steps_on_training_data(env, tmp_path, monkeypatch):  # noqa: F811
    # eval.architecture's first forward was the first dev batch: the steps were fitted to the data being scored
    import search.evaluate as evaluate

    assert run_stage(_cfg(env, tmp_path, "stage=search", "budget.avg_bits=3"), tmp_path / "s") == 0
    seen, real = [], evaluate.evaluate_sets

    def scored(net, *args, **kwargs):
        seen.append([bool(s.aq.initialized) for _, s in sites(net) if s.aq is not None and not s.aq.cands.is_identity])
        return real(net, *args, **kwargs)

    monkeypatch.setattr(evaluate, "evaluate_sets", scored)
    assert run_stage(_cfg(env, tmp_path, "stage=eval", f"eval.checkpoint={env['model']}",
                          f"eval.architecture={tmp_path / 's' / 'architecture.json'}"), tmp_path / "e") == 0
    assert seen and seen[0] and all(seen[0])
