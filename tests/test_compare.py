"""stage=compare and its table: rows from run directories, medians over seeds, the verdict, the multirun
summary tool, and the stage end to end (resumable) on a tiny random BERT."""
from __future__ import annotations

import csv
import dataclasses
import json
import logging
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

from conftest import ROOT, load_tool
from search.__main__ import run_stage
from search.budget import uniform
from search.compare import _reuse_uniform, _warn_unmatched_hawq, draw_seed, uniform_bits
from search.comparison import (Kind, aggregate, collect, collect_draws, draws_table, on_split, paired, paired_difference,
                               quality_misses, verdict, write_comparison)
from search.rundir import STATE_FILE, RunDir, changed_settings, run_step, schema_defaults
from supernet import Architecture, QuantMode, SearchSpace, to_supernet

from test_app import env  # noqa: F401  (module fixture: tiny model + fixture data)
from test_stages import _cfg


def _metrics(path: Path, value: float, mb: float = 1.0, bits: float = 2.0, pruned: int = 0) -> None:
    path.mkdir(parents=True, exist_ok=True)
    arch = {"encoder_avg_bits": bits, "encoder_mb": mb, "total_mb": mb + 10, "total_compression": 5.0,
            "pruned_groups": pruned}
    (path / "metrics.json").write_text(json.dumps({"main_metric": {"name": "f1", "value": value}, "architecture": arch}))


def _tree(root: Path, values: dict[tuple[str, float, int], float]) -> None:
    _metrics(root / "fp32", 85.0, mb=40.0, bits=32)
    for (child, budget, seed), v in values.items():
        _metrics(root / f"b{budget:g}" / f"s{seed}" / child, v, mb=budget / 2, bits=budget)
    _metrics(root / "b2" / "s1" / "search", 1.0)  # before QAT: not a row
    _metrics(root / "b2" / "s1" / "hawq", 1.0)  # before QAT: not a row


def test_rows_come_from_the_layout_and_aggregate_to_median_and_spread(tmp_path):
    _tree(tmp_path, {("qat", 2, 1): 80.0, ("qat", 2, 2): 82.0, ("qat", 2, 3): 81.0,
                     ("hawq_qat", 2, 1): 79.0, ("hawq_qat", 2, 2): 78.0, ("uniform2", 2, 1): 77.0,
                     ("qat", 2.5, 1): 83.0})
    rows = collect([tmp_path])
    assert len(rows) == 8 and {r.method for r in rows} == set(Kind)
    points = {(p.method, p.budget): p for p in aggregate(rows)}
    searched = points[(Kind.searched, 2.0)]
    assert (searched.median, searched.low, searched.high, searched.seeds) == (81.0, 80.0, 82.0, 3)
    assert points[(Kind.hawq, 2.0)].median == 78.5 and points[(Kind.fp32, None)].median == 85.0
    assert points[(Kind.searched, 2.5)].budget == 2.5


def test_every_evaluated_split_reaches_the_table(tmp_path):
    """SST-2 is reported on dev and on its labelled test set: the second split's main metric is a column."""
    def split(acc: float) -> dict:
        return {"metrics": {"accuracy": acc}, "main_metric": {"name": "accuracy", "value": acc}}

    for seed, (dev, test) in {1: (80.0, 81.0), 2: (82.0, 84.0), 3: (81.0, 82.0)}.items():
        path = tmp_path / "b2" / f"s{seed}" / "qat"
        path.mkdir(parents=True)
        (path / "metrics.json").write_text(json.dumps({
            "split": "validation", "main_metric": {"name": "accuracy", "value": dev},
            "splits": {"validation": split(dev), "test_labeled": split(test)}}))
    (row, *_), = [collect([tmp_path])]
    assert row.metric == 80.0 and dict(row.others) == {"test_labeled accuracy": 81.0}
    (point,) = aggregate(collect([tmp_path]))
    assert point.median == 81.0 and point.others == (("test_labeled accuracy", 82.0),)
    _, paths = write_comparison(collect([tmp_path]), tmp_path / "out", "t")
    assert "| accuracy 81.00 [80.00, 82.00] | test_labeled accuracy 82.00 | 3 |" in paths["comparison.md"].read_text()
    # judged on the labelled test set: its metric in place of dev's, and a run without that split is named
    judged = on_split(collect([tmp_path]), "test_labeled")
    assert [(r.metric_name, r.metric) for r in judged] == [("test_labeled accuracy", v) for v in (81.0, 84.0, 82.0)]
    on_dev = on_split(collect([tmp_path]), "validation")  # the main split: the rows as they are
    assert [(r.metric_name, r.metric) for r in on_dev] == [("accuracy", v) for v in (80.0, 82.0, 81.0)]
    _metrics(tmp_path / "fp32", 85.0)  # the FP32 reference, evaluated on dev alone
    with pytest.raises(ValueError, match=r"fp32 has no test_labeled f1 result; evaluate that split"):
        on_split(collect([tmp_path / "fp32"]), "test_labeled")
    tool = [sys.executable, "tools/standings.py", "--split", "test_labeled", "--seeds-ahead"]
    (tmp_path / "fp32" / "metrics.json").write_text(json.dumps({
        "split": "validation", "main_metric": {"name": "accuracy", "value": 85.0},
        "splits": {"validation": split(85.0), "test_labeled": split(86.0)}}))
    out = subprocess.run([*tool, f"T={tmp_path}"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert "| T (test_labeled accuracy) | 2 | 86.00 | 82.00 | - | - |" in out
    bad = subprocess.run([*tool[:2], "--split", "test", f"T={tmp_path}"], cwd=ROOT, capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "has no test accuracy result" in bad.stderr


def test_paired_changes_match_runs_by_method_budget_and_seed(tmp_path):
    _tree(tmp_path / "old", {("qat", 2, 1): 80.0, ("qat", 2, 2): 82.0, ("uniform2", 2, 1): 77.0, ("qat", 3, 1): 84.0})
    _tree(tmp_path / "new", {("qat", 2, 1): 81.0, ("qat", 2, 2): 81.5, ("uniform2", 2, 1): 79.0, ("qat", 4, 1): 85.0})
    table = paired(collect([tmp_path / "new"]), collect([tmp_path / "old"]))
    assert "| searched | 2 | 1 | 80.00 | 81.00 | +1.00 |" in table
    assert "| searched | 2 | 2 | 82.00 | 81.50 | -0.50 |" in table
    assert "| uniform | 2 | 1 | 77.00 | 79.00 | +2.00 |" in table
    assert "| searched | 2 | 2 | +0.25 |" in table and "| uniform | 2 | 1 | +2.00 |" in table
    assert "fp32" not in table and "| 3 |" not in table and "| 4 |" not in table  # unpaired runs are left out
    assert paired(collect([tmp_path / "new"]), []).startswith("No run")


def test_paired_changes_cover_every_split_both_runs_report(tmp_path):
    # a change judged on SST-2's dev set alone hides what it does on the labelled test set
    def run(root: Path, dev: float, test: float) -> None:
        path = root / "b2" / "s1" / "qat"
        path.mkdir(parents=True)
        splits = {k: {"metrics": {"accuracy": v}, "main_metric": {"name": "accuracy", "value": v}}
                  for k, v in (("validation", dev), ("test_labeled", test))}
        (path / "metrics.json").write_text(json.dumps({"split": "validation", "splits": splits,
                                                       "main_metric": {"name": "accuracy", "value": dev}}))

    run(tmp_path / "old", 86.0, 87.5)
    run(tmp_path / "new", 87.0, 86.75)
    table = paired(collect([tmp_path / "new"]), collect([tmp_path / "old"]))
    assert "| method | budget (bits) | seed | before | after | change | test_labeled accuracy: change |" in table
    assert "| searched | 2 | 1 | 86.00 | 87.00 | +1.00 | -0.75 |" in table
    assert "| searched | 2 | 1 | +1.00 | -0.75 |" in table


def test_the_fp32_reference_counts_once_across_multirun_jobs(tmp_path):
    for job in ("0", "1"):
        _tree(tmp_path / job, {("qat", 3, int(job)): 80.0 + int(job)})
    points = aggregate(collect([tmp_path]))
    fp = next(p for p in points if p.method is Kind.fp32)
    assert fp.seeds == 1
    assert next(p for p in points if p.method is Kind.searched).seeds == 2


def test_the_same_run_reached_twice_counts_once(tmp_path):
    # a comparison and its copy (the benchmarks reuse finished cells with cp -a), or one directory passed twice
    _tree(tmp_path / "a", {("qat", 2, 1): 80.0, ("qat", 2, 2): 82.0, ("hawq_qat", 2, 1): 79.0})
    shutil.copytree(tmp_path / "a", tmp_path / "copy")
    _metrics(tmp_path / "copy" / "b1.5" / "s1" / "qat", 75.0, bits=1.5)  # the copy went on to another budget
    rows = collect([tmp_path / "a", tmp_path / "copy", tmp_path / "a"])
    assert sorted((r.method.value, r.budget, r.seed) for r in rows if r.budget) == [
        ("hawq", 2.0, 1), ("searched", 1.5, 1), ("searched", 2.0, 1), ("searched", 2.0, 2)]
    points = {(p.method, p.budget): p for p in aggregate(rows)}
    assert points[(Kind.searched, 2.0)].seeds == 2 and points[(Kind.fp32, None)].seeds == 1


@pytest.mark.parametrize("change, message", [
    (("b2/s1/qat", 81.0), "two different results for searched at 2 bits, seed 1: 80.0000 in"),
    (("fp32", 90.0), "two different results for the FP32 reference: 85.0000 in"),  # another checkpoint
])
def test_two_results_for_one_run_are_an_error_naming_both(tmp_path, change, message):
    # pooled, the second run would count as another seed and move the median
    _tree(tmp_path / "a", {("qat", 2, 1): 80.0})
    _tree(tmp_path / "b", {("qat", 2, 1): 80.0})
    _metrics(tmp_path / "b" / change[0], change[1])
    with pytest.raises(ValueError, match=message) as e:
        collect([tmp_path / "a", tmp_path / "b"])
    assert f"{tmp_path / 'a'}/" in str(e.value) and f"{tmp_path / 'b'}/" in str(e.value)


def test_runs_of_two_tasks_are_not_pooled(tmp_path):
    _tree(tmp_path / "mrpc", {("qat", 2, 1): 80.0})
    _tree(tmp_path / "cola", {("qat", 2, 2): 20.0})
    path = tmp_path / "cola" / "b2" / "s2" / "qat" / "metrics.json"
    path.write_text(path.read_text().replace('"f1"', '"matthews_corr"'))
    with pytest.raises(ValueError, match="reports matthews_corr but .* reports f1; pass the directories of one task"):
        collect([tmp_path / "mrpc", tmp_path / "cola"])


def test_a_metric_that_is_not_a_number_is_said_so(tmp_path):
    # STS-B's Pearson correlation of a model that predicts one constant is NaN
    _tree(tmp_path, {("qat", 2, 1): 80.0, ("qat", 2, 2): 82.0, ("qat", 2, 3): 81.0, ("hawq_qat", 2, 1): 79.0})
    path = tmp_path / "b2" / "s2" / "qat" / "metrics.json"
    path.write_text(path.read_text().replace("82.0", "NaN"))
    points = aggregate(collect([tmp_path]))
    searched = next(p for p in points if p.method is Kind.searched)
    assert searched.seeds == 3 and all(v != v for v in (searched.median, searched.low, searched.high))
    (line,) = verdict(points)
    assert "not comparable with hawq (a metric is not a number)" in line and "target not met" in line
    assert "equal to" not in line
    hawq = next(p for p in points if p.method is Kind.hawq)
    nan_hawq = [p if p is not hawq else dataclasses.replace(hawq, median=math.nan) for p in points]
    (line,) = verdict([p if p.method is not Kind.searched else dataclasses.replace(p, median=80.0) for p in nan_hawq])
    assert "target not met** (searched needs: not comparable (HAWQ-V2's metric is not a number))" in line


@pytest.mark.parametrize("searched, hawq, uniform, budget, expected", [
    (81.0, 80.5, 79.0, 3, "target met"),  # <= 4 bits: at least HAWQ-V2
    (80.0, 80.5, 79.0, 3, "target not met** (searched needs: 80.50)"),
    (81.0, 80.5, 79.0, 2, "target not met** (searched needs: 81.50)"),  # <= 2.5 bits: +1 over HAWQ-V2 needed
    (82.0, 80.5, 79.0, 2, "target met"),
    # and more over uniform than over HAWQ-V2: with uniform at or above HAWQ-V2 no searched score meets it
    (82.0, 80.5, 81.0, 2, "target not met** (searched needs: out of reach (uniform >= HAWQ-V2))"),
    (90.0, 80.5, 80.5, 2, "target not met** (searched needs: out of reach"),
    (70.0, 80.0, 60.0, 6, "10.00 points below hawq"),  # above 4 bits: no target, still the plain numbers
])
def test_verdict_states_wins_and_losses_plainly(tmp_path, searched, hawq, uniform, budget, expected):
    _tree(tmp_path, {("qat", budget, 1): searched, ("hawq_qat", budget, 1): hawq, (f"uniform{budget}", budget, 1): uniform})
    (line,) = verdict(aggregate(collect([tmp_path])))
    assert expected in line
    assert ("needs" in line) == ("not met" in line)
    if budget > 4:
        assert "target" not in line


def test_paired_difference_is_the_mean_lead_over_seeds_with_a_t_interval(tmp_path):
    # searched - HAWQ-V2 on seeds 1-3: 2, 4, 3 -> mean 3, sd 1; t(0.975, 2 df) = 4.3027 -> 3 -/+ 4.3027 / sqrt(3)
    _tree(tmp_path, {("qat", 2, 1): 82.0, ("qat", 2, 2): 84.0, ("qat", 2, 3): 83.0, ("qat", 2, 4): 99.0,
                     ("hawq_qat", 2, 1): 80.0, ("hawq_qat", 2, 2): 80.0, ("hawq_qat", 2, 3): 80.0,
                     ("uniform2", 2, 1): 81.0, ("uniform2", 2, 2): 84.5, ("uniform2", 2, 3): 83.0})
    rows = collect([tmp_path])
    d = paired_difference(rows, 2.0, Kind.hawq)  # seed 4 has no HAWQ-V2 run: not a pair
    assert (d.n, d.mean) == (3, 3.0) and d.low == pytest.approx(0.5159, abs=1e-4) and d.high == pytest.approx(5.4841, abs=1e-4)
    assert str(d) == "+3.00 [+0.52, +5.48]" and d.resolved
    u = paired_difference(rows, 2.0, Kind.uniform)  # 1, -0.5, 0: the interval holds 0
    assert u.n == 3 and not u.resolved and u.low < 0 < u.high
    assert paired_difference(rows, 4.0, Kind.hawq) is None
    one = paired_difference([r for r in rows if r.seed in (None, 1)], 2.0, Kind.hawq)
    assert str(one) == "+2.00 (1 seed)" and not one.resolved
    nan = [dataclasses.replace(r, metric=math.nan) if r.seed == 2 and r.method is Kind.hawq else r for r in rows]
    assert str(paired_difference(nan, 2.0, Kind.hawq)) == "not comparable (a metric is not a number)"
    md = write_comparison(rows, tmp_path / "out", "t")[1]["comparison.md"].read_text()
    assert ("- 2 bits: searched - hawq +3.00 [+0.52, +5.48] over 3 seeds (apart); searched - uniform +0.17 "
            "[-1.73, +2.06] over 3 seeds (not apart: the interval holds 0).") in md


def test_write_comparison_writes_table_csv_and_plot(tmp_path):
    _tree(tmp_path, {("qat", 2, 1): 80.0, ("qat", 2, 2): 82.0, ("hawq_qat", 2, 1): 79.0, ("uniform2", 2, 1): 77.0})
    points, paths = write_comparison(collect([tmp_path]), tmp_path / "out", "t")
    md = paths["comparison.md"].read_text()
    assert "| searched | 2 |" in md and "f1 81.00 [80.00, 82.00]" in md and "| fp32 | FP32 |" in md
    with paths["comparison.csv"].open() as f:
        assert len(list(csv.DictReader(f))) == len(points) == 4
    with paths["runs.csv"].open() as f:
        assert len(list(csv.DictReader(f))) == 5
    assert paths["pareto.png"].stat().st_size > 5000


def test_plot_table_tool_reads_back_the_points_a_comparison_table_was_written_from(tmp_path):
    """For a comparison whose run directories are gone, its generated table is what is left to plot."""
    plot_table = load_tool("plot_table.py")
    point, table_lines = plot_table.point, plot_table.table_lines
    _tree(tmp_path, {("qat", 2, 1): 80.0, ("qat", 2, 2): 82.0, ("hawq_qat", 2, 1): 79.0, ("uniform2", 2, 1): 77.0})
    points, paths = write_comparison(collect([tmp_path]), tmp_path / "out", "t")
    page = tmp_path / "page.md"  # a table inside a longer page, after other tables
    page.write_text("# notes\n\n| a | b |\n|---|---|\n| 1 | 2 |\n\n## the run\n\n" + paths["comparison.md"].read_text())
    back = [point(row) for row in table_lines(page.read_text(), "## the run")]
    assert [(p.method, p.budget, p.seeds, p.metric_name) for p in back] == \
        [(p.method, p.budget, p.seeds, p.metric_name) for p in points]
    for p, q in zip(back, points):  # as printed: 2 decimals for the metric, 3 for MiB
        assert (p.median, p.low, p.high) == pytest.approx((q.median, q.low, q.high), abs=0.005)
        assert p.encoder_mb == pytest.approx(q.encoder_mb, abs=5e-4)
    tool = [sys.executable, "tools/plot_table.py", str(page), "--out", str(tmp_path / "p.png")]
    assert subprocess.run([*tool, "--after", "## the run"], cwd=ROOT, capture_output=True, text=True).returncode == 0
    assert (tmp_path / "p.png").stat().st_size > 5000
    bad = subprocess.run([*tool, "--after", "## no such run"], cwd=ROOT, capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "no line starts with '## no such run'" in bad.stderr
    page.write_text(page.read_text().replace("| searched | 2 |", "| searched | two |"))
    bad = subprocess.run([*tool, "--after", "## the run"], cwd=ROOT, capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1


def test_summary_tool_merges_multirun_jobs(tmp_path):
    for job, seed in (("0", 1), ("1", 2)):
        _tree(tmp_path / "multi" / job, {("qat", 2, seed): 80.0 + seed, ("hawq_qat", 2, seed): 79.0})
    out = subprocess.run([sys.executable, "tools/summarize_compare.py", str(tmp_path / "multi")], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
    assert "f1 81.50 [81.00, 82.00] |  | 2 |" in out  # two seeds from two jobs (no other metrics here)
    assert (tmp_path / "multi" / "pareto.png").is_file()
    bad = subprocess.run([sys.executable, "tools/summarize_compare.py", str(tmp_path / "nothing")], cwd=ROOT,
                         capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.startswith("error: no such directory")
    (tmp_path / "multi" / "1" / "b2" / "s2" / "qat" / "metrics.json").write_text('{"main_metric": null}')
    for args in ([str(tmp_path / "multi")], [str(tmp_path / "multi" / "0"), "--before", str(tmp_path / "multi" / "1")]):
        bad = subprocess.run([sys.executable, "tools/summarize_compare.py", *args], cwd=ROOT, capture_output=True, text=True)
        assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "s2/qat/metrics.json is not a finished run's" in bad.stderr


def test_standings_tool_puts_every_task_budget_and_lead_in_one_table(tmp_path):
    _tree(tmp_path / "a1", {("qat", 2, 1): 82.0, ("hawq_qat", 2, 1): 80.5, ("uniform2", 2, 1): 79.0})
    _tree(tmp_path / "a2", {("qat", 2, 2): 84.0, ("hawq_qat", 2, 2): 80.5, ("uniform2", 2, 2): 79.0})
    _tree(tmp_path / "b", {("qat", 4, 1): 70.0, ("hawq_qat", 4, 1): 71.0, ("qat", 2, 1): 60.0})
    tool = [sys.executable, "tools/standings.py"]
    out = subprocess.run([*tool, f"T1={tmp_path}/a*", f"T2={tmp_path}/b"], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout.splitlines()
    assert out[0].startswith("| task | budget (bits) | FP32 | searched | HAWQ-V2 | uniform |")
    assert out[2:] == [
        "| T1 (f1) | 2 | 85.00 | 83.00 | 80.50 | 79.00 | +2.50 | +4.00 | met | 2 |",  # medians over both dirs
        "| T2 (f1) | 4 | 85.00 | 70.00 | 71.00 | - | -1.00 | - | **not met** | 1 |",
        "| T2 (f1) | 2 | 85.00 | 60.00 | - | - | - | - | - | 1 |",
    ]
    # paired by seed: ahead of HAWQ-V2 on all three seeds, of uniform on two (seed 3 is a tie, not a win)
    _tree(tmp_path / "a3", {("qat", 2, 3): 79.0, ("hawq_qat", 2, 3): 78.0, ("uniform2", 2, 3): 79.0,
                            ("uniform2", 2, 4): 70.0})  # seed 4 has no searched run: not a pair
    out = subprocess.run([*tool, "--seeds-ahead", f"T1={tmp_path}/a*", f"T2={tmp_path}/b"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout.splitlines()
    assert out[0].endswith("| seeds | seeds ahead of HAWQ-V2 | seeds ahead of uniform |")
    assert out[2].endswith("| 3/4 | 3/3 | 2/3 |") and out[4].endswith("| 1 | - | - |")
    assert out[3].endswith("| 1 | 0/1 | - |")
    out = subprocess.run([*tool, "--needs", f"T1={tmp_path}/a*", f"T2={tmp_path}/b"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout.splitlines()
    assert out[0].endswith("| seeds | searched needs |")
    # T1: HAWQ-V2 80.50 over a1-a3, uniform 79.00; T2: HAWQ-V2 71.00 at 4 bits, no HAWQ-V2 at 2 bits
    assert [line.rsplit("|", 2)[1].strip() for line in out[2:]] == ["81.50", "71.00", "-"]
    out = subprocess.run([*tool, "--ci", f"T1={tmp_path}/a*", f"T2={tmp_path}/b"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout.splitlines()
    assert out[0].endswith("| seeds | searched - HAWQ-V2, paired mean [95% CI] | searched - uniform, paired mean [95% CI] |")
    # T1 against HAWQ-V2: 1.5, 3.5, 1.0 (mean 2, sd 1.3229, 3 seeds); T2 at 4 bits: one seed, no interval
    assert out[2].endswith("| 3/4 | +2.00 [-1.29, +5.29] | +2.67 [-3.58, +8.92] |")
    assert out[3].endswith("| 1 | -1.00 (1 seed) | - |") and out[4].endswith("| 1 | - | - |")
    _tree(tmp_path / "e", {("qat", 2, 1): 90.0, ("hawq_qat", 2, 1): 80.0, ("uniform2", 2, 1): 80.0})
    out = subprocess.run([*tool, "--needs", "--seeds-ahead", f"T6={tmp_path}/e"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout.splitlines()
    assert out[2] == ("| T6 (f1) | 2 | 85.00 | 90.00 | 80.00 | 80.00 | +10.00 | +10.00 | **not met** | 1 | 1/1 | 1/1 "
                      "| out of reach (uniform >= HAWQ-V2) |")
    _metrics(tmp_path / "c" / "b2" / "s1" / "qat", 80.0)
    (tmp_path / "c" / "b2" / "s1" / "qat" / "metrics.json").write_text("{}")  # in the layout, not a finished run's
    _metrics(tmp_path / "d" / "fp32", 85.0)  # a comparison whose quantized runs have not finished yet
    for bad, message in ((f"T1{tmp_path}", "is not NAME=GLOB"), (f"T3={tmp_path}/none*", "none*' matches no directory"),
                         (f"T1={tmp_path}/a*,{tmp_path}/typo", "typo' matches no directory"),  # not a seed fewer
                         (f"T4={tmp_path}/c", "c/b2/s1/qat/metrics.json is not a finished run's metrics.json"),
                         (f"T5={tmp_path}/d", "T5: only the FP32 reference in")):
        run = subprocess.run([*tool, bad], cwd=ROOT, capture_output=True, text=True)
        assert run.returncode == 2 and message in run.stderr and run.stderr.count("\n") == 1


def test_quality_column_names_what_misses_issue_4s_target(tmp_path):
    """#4: within 0.3/0.5/1/2.5 points of FP32 at 4/3/2/1.5 bits, and above uniform QAT; FP32 is 85 in `_tree`."""
    _tree(tmp_path, {("qat", 4, 1): 84.7, ("uniform4", 4, 1): 84.0,  # exactly 0.3 below: within
                     ("qat", 3, 1): 84.4, ("uniform3", 3, 1): 84.4,  # 0.6 below, and a tie with uniform
                     ("qat", 2, 1): 84.5, ("uniform2", 2, 1): 84.9,  # close enough, uniform ahead
                     ("qat", 1.5, 1): 83.0,  # no uniform run: nothing to judge
                     ("qat", 2.5, 1): 84.0, ("uniform3", 2.5, 1): 83.0})  # no target at 2.5 bits
    points = aggregate(collect([tmp_path]))
    assert [quality_misses(points, b) for b in (4, 3, 2, 1.5, 2.5)] == [
        [], ["0.60 below FP32, allowed 0.5", "uniform equal"], ["uniform ahead"], None, None]
    out = subprocess.run([sys.executable, "tools/standings.py", "--quality", f"T={tmp_path}"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout.splitlines()
    assert out[0].endswith("| seeds | searched - FP32 | #4 target |")
    assert [" | ".join(line.rsplit(" | ", 2)[1:]) for line in out[2:]] == [
        "-0.30 | met |", "-0.60 | **not met** (0.60 below FP32, allowed 0.5; uniform equal) |", "-1.00 | - |",
        "-0.50 | **not met** (uniform ahead) |", "-2.00 | - |"]


def test_uniform_bits_never_gives_the_baseline_less_room():
    assert [uniform_bits(b) for b in (8, 4, 3, 2.5, 2, 1.5, 1)] == [8, 4, 3, 3, 2, 2, 2]
    assert [uniform_bits(b, lowest=1) for b in (2, 1.5, 1, 0.5)] == [2, 2, 1, 1]  # the mid-rise grid has binary


def test_compare_runs_every_method_at_equal_size_and_resumes(env, tmp_path):  # noqa: F811
    run_dir = tmp_path / "cmp"
    overrides = ["stage=compare", "compare.budgets=[3,2]", "compare.seeds=[1]", "hawq.max_probes=3",
                 "search.size_weight=5"]
    assert run_stage(_cfg(env, tmp_path, *overrides), run_dir) == 0
    for cell in ("b3/s1", "b2/s1"):
        for step in ("search", "qat", "hawq", "hawq_qat"):
            assert (run_dir / cell / step / "metrics.json").is_file(), (cell, step)
    assert (run_dir / "b3/s1/uniform3/metrics.json").is_file() and (run_dir / "b2/s1/uniform2/metrics.json").is_file()
    assert (run_dir / "fp32" / "metrics.json").is_file() and (run_dir / "finetune" / "checkpoint").is_dir()
    # the Hutchinson traces are measured once per seed: the second budget's HAWQ-V2 reads them from the cache
    assert [json.loads((run_dir / cell / "hawq" / "metrics.json").read_text())["hawq"]["cached"] for cell in ("b3/s1", "b2/s1")] == [False, True]
    # HAWQ-V2 sits at exactly the searched architecture's encoder size
    for cell in ("b3/s1", "b2/s1"):
        searched = Architecture.load(run_dir / cell / "search" / "architecture.json")
        hawq = Architecture.load(run_dir / cell / "hawq" / "architecture.json")
        assert hawq.size_mb("encoder") <= searched.size_mb("encoder") + 1e-9
        assert hawq.size_mb("encoder") >= 0.97 * searched.size_mb("encoder")
    md = (run_dir / "comparison.md").read_text()
    for method in ("fp32", "searched", "hawq", "uniform"):
        assert f"| {method} |" in md
    with (run_dir / "runs.csv").open() as f:
        assert len(list(csv.DictReader(f))) == 1 + 2 * 3
    assert (run_dir / "pareto.png").is_file()
    summary = json.loads((run_dir / "metrics.json").read_text())
    assert summary["stage"] == "compare" and summary["runs"] == 7
    # each step's config.yaml is the config it ran, which reruns it alone (it was the comparison's, with seed 42,
    # no budget and the base model); parent_config.yaml beside it is the comparison's
    for step, stage in (("search", "search"), ("qat", "qat"), ("hawq", "hawq"), ("hawq_qat", "qat"), ("uniform2", "qat")):
        own = OmegaConf.load(run_dir / "b2/s1" / step / "config.yaml")
        assert (own.stage, own.seed, own.model.name_or_path) == (stage, 1, str(run_dir / "finetune" / "checkpoint")), step
        assert OmegaConf.load(run_dir / "b2/s1" / step / "parent_config.yaml").stage == "compare"
    assert OmegaConf.load(run_dir / "b2/s1/search/config.yaml").budget.avg_bits == 2
    assert OmegaConf.load(run_dir / "b2/s1/qat/config.yaml").qat.architecture == str(run_dir / "b2/s1/search/architecture.json")
    assert OmegaConf.load(run_dir / "fp32/config.yaml").stage == "eval"
    # a finished step is never resumed: its optimiser state goes; a search keeps the weights QAT can start from
    for cell in ("b3/s1", "b2/s1"):
        assert [f.name for f in (run_dir / cell / "search" / "train_state").iterdir()] == ["model.safetensors"]
        for step in ("qat", "hawq_qat"):
            assert not (run_dir / cell / step / "train_state").exists() and (run_dir / cell / step / "quantized").is_dir()

    # interrupted halfway: a missing result is redone, everything finished is kept
    (run_dir / "b2/s1/hawq_qat/metrics.json").unlink()
    kept = (run_dir / "b3/s1/qat/metrics.json").stat().st_mtime_ns
    assert run_stage(_cfg(env, tmp_path, *overrides, "resume=true"), run_dir) == 0
    assert (run_dir / "b2/s1/hawq_qat/metrics.json").is_file()
    assert (run_dir / "b3/s1/qat/metrics.json").stat().st_mtime_ns == kept

    # resumed with another search setting: finished steps are still reused, and the log says which
    # results came from other settings (the uniform baseline's do not depend on the search's)
    log = (run_dir / "run.log").read_text()
    assert "other settings" not in log
    assert run_stage(_cfg(env, tmp_path, *overrides, "resume=true", "search.arch_lr=0.3"), run_dir) == 0
    warned = [line for line in (run_dir / "run.log").read_text()[len(log):].splitlines() if "other settings" in line]
    assert {line.split(" was run")[0].rsplit(" - ", 1)[-1] for line in warned} == {
        f"{cell}/{step}" for cell in ("b3/s1", "b2/s1") for step in ("search", "qat")}
    assert all("search.arch_lr: " in line and " -> 0.3" in line for line in warned)

    # qat.init=supernet: the searched architecture's QAT starts from the search's weights, the baselines'
    # from the checkpoint (they have no supernet), and the table says so
    for step in ("qat", "hawq_qat"):
        shutil.rmtree(run_dir / "b2/s1" / step)
    assert run_stage(_cfg(env, tmp_path, *overrides, "resume=true", "qat.init=supernet"), run_dir) == 0
    assert [json.loads((run_dir / "b2/s1" / step / "metrics.json").read_text())["init"]
            for step in ("qat", "hawq_qat", "uniform2")] == ["supernet", "checkpoint", "checkpoint"]
    assert "searched QAT starts from the search's supernet" in (run_dir / "comparison.md").read_text().splitlines()[0]


def test_qat_draws_per_architecture_run_with_their_own_seeds_and_pool_to_their_median(env, tmp_path):  # noqa: F811
    run_dir = tmp_path / "cmp"
    overrides = ["stage=compare", "compare.budgets=[2,1.5]", "compare.seeds=[1]", "hawq.max_probes=3",
                 "search.size_weight=5", "compare.qat_draws=2"]
    assert run_stage(_cfg(env, tmp_path, *overrides), run_dir) == 0
    for cell in ("b2/s1", "b1.5/s1"):
        for step in ("qat", "hawq_qat", "uniform2"):
            first, second = (OmegaConf.load(run_dir / cell / name / "config.yaml") for name in (step, f"{step}.draw1"))
            assert (first.seed, second.seed) == (1, draw_seed(1, 1)) == (1, 1001), (cell, step)
            assert first.qat.architecture == second.qat.architecture
    # the 1.5-bit cell's uniform 2-bit runs, both draws, are the 2-bit cell's (same architecture and seed)
    for name in ("uniform2", "uniform2.draw1"):
        assert (json.loads((run_dir / "b1.5/s1" / name / "metrics.json").read_text())
                == json.loads((run_dir / "b2/s1" / name / "metrics.json").read_text()))
    rows = collect([run_dir])
    assert len(rows) == 1 + 2 * 3 and {r.draws for r in rows if r.method is not Kind.fp32} == {2}
    for r in rows:
        if r.method is Kind.fp32:
            continue
        runs = [json.loads((Path(r.run_dir).parent / n / "metrics.json").read_text())["main_metric"]["value"]
                for n in (Path(r.run_dir).name, Path(r.run_dir).name + ".draw1")]
        assert r.metric == pytest.approx(sum(runs) / 2) and not Path(r.run_dir).name.endswith(".draw1")
    assert "(median of 2 QAT draws each)" in (run_dir / "comparison.md").read_text()

    # a draw that differs from the same draw in a copy of the comparison is named as such
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    changed = json.loads((copy / "b2/s1/qat.draw1/metrics.json").read_text())
    changed["main_metric"]["value"] += 1
    (copy / "b2/s1/qat.draw1/metrics.json").write_text(json.dumps(changed))
    with pytest.raises(ValueError, match="searched at 2 bits, seed 1, QAT draw 1"):
        collect([run_dir, copy])


def test_qat_draws_pool_per_seed_and_the_tools_show_each_draw_or_only_the_first(tmp_path):
    _tree(tmp_path, {("qat", 2, 1): 80.0, ("qat.draw1", 2, 1): 84.0, ("qat.draw2", 2, 1): 81.0,
                     ("qat", 2, 2): 70.0, ("qat.draw1", 2, 2): 72.0, ("qat.draw2", 2, 2): 78.0,
                     ("uniform2", 2, 1): 79.0, ("uniform2.draw1", 2, 1): 77.0, ("uniform2", 2, 2): 75.0})
    pooled = {(r.method, r.seed): (r.metric, r.draws) for r in collect([tmp_path])}
    assert pooled[(Kind.searched, 1)] == (81.0, 3) and pooled[(Kind.searched, 2)] == (72.0, 3)
    assert pooled[(Kind.uniform, 1)] == (78.0, 2) and pooled[(Kind.uniform, 2)] == (75.0, 1)
    first = {(r.method, r.seed): (r.metric, r.draws) for r in collect([tmp_path], max_draws=1)}
    assert first[(Kind.searched, 1)] == (80.0, 1) and first[(Kind.uniform, 1)] == (79.0, 1)
    points = {p.method: p for p in aggregate(collect([tmp_path]))}
    assert (points[Kind.searched].median, points[Kind.searched].draws, points[Kind.uniform].draws) == (76.5, 3, 1)

    table = draws_table(collect_draws([tmp_path]))
    assert "| searched | 2 | 1 | 80.00 | 84.00 | 81.00 | 81.00 | 4.00 |" in table
    assert "| uniform | 2 | 2 | 75.00 | - | - | 75.00 | 0.00 |" in table
    # within a seed QAT moves the searched model by 4 and 8 (median 6); the seeds' medians lie 9 apart. Seed means
    # 81.67 and 73.33: a one-way ANOVA's F = 104.17 / (43.33 / 4) = 9.62 on (1, 4) degrees of freedom, p = 0.036
    assert "| searched | 2 | 2 | 6 | 77.50 | 6.00 | 9.00 | 0.036 |" in table
    assert "| uniform | 2 | 2 | 3 | 77.00 | 1.00 | 3.00 | - |" in table  # seed 2 has one draw: no test

    summary = subprocess.run([sys.executable, "tools/summarize_compare.py", str(tmp_path), "--out", str(tmp_path / "s"),
                              "--per-draw", "--max-draws", "2"], cwd=ROOT, capture_output=True, text=True, check=True)
    assert "(median of 2 QAT draws each)" in summary.stdout
    assert "| searched | 2 | 1 | 80.00 | 84.00 | 82.00 |" in summary.stdout  # the third draw left out
    standing = subprocess.run([sys.executable, "tools/standings.py", f"T={tmp_path}", "--max-draws", "1"], cwd=ROOT,
                              capture_output=True, text=True, check=True).stdout
    assert "| T (f1) | 2 | 85.00 | 75.00 | - | 77.00 |" in standing  # draw 0: searched 80 and 70, uniform 79 and 75
    for tool in ("tools/standings.py", "tools/summarize_compare.py"):
        bad = subprocess.run([sys.executable, tool, f"T={tmp_path}" if "standings" in tool else str(tmp_path),
                              "--max-draws", "0"], cwd=ROOT, capture_output=True, text=True)
        assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "--max-draws 0 is invalid" in bad.stderr


def test_uniform_qat_of_another_budget_with_the_same_architecture_and_seed_is_reused(tmp_path, tiny_cfg):
    from transformers import BertForSequenceClassification

    arch = Architecture.from_supernet(to_supernet(BertForSequenceClassification(tiny_cfg), SearchSpace(groups=4)))
    two, four = uniform(arch, 2), uniform(arch, 4)
    run = RunDir(tmp_path)
    for cell, a in (("b2/s1", two), ("b2/s2", two), ("b4/s1", four)):
        (tmp_path / cell / "uniform2").mkdir(parents=True)
        a.save(tmp_path / cell / "uniform2.json")
        (tmp_path / cell / "uniform2" / "metrics.json").write_text(json.dumps({"cell": cell}))
    (tmp_path / "b1.5/s1/uniform2").mkdir(parents=True)  # an interrupted run of its own: replaced
    (tmp_path / "b1.5/s1/uniform2/run.log").write_text("interrupted")
    two.save(tmp_path / "b1.5/s1/uniform2.json")
    _reuse_uniform(run, "b1.5/s1/uniform2", tmp_path / "b1.5/s1/uniform2.json", seed=1)
    assert json.loads((tmp_path / "b1.5/s1/uniform2/metrics.json").read_text()) == {"cell": "b2/s1"}
    assert not (tmp_path / "b1.5/s1/uniform2/run.log").exists()

    four.save(tmp_path / "b1.5/s3/uniform2.json")  # no finished run of seed 3; other seeds do not count
    (tmp_path / "b1.5/s3").mkdir(exist_ok=True)
    _reuse_uniform(run, "b1.5/s3/uniform2", tmp_path / "b1.5/s3/uniform2.json", seed=3)
    assert not (tmp_path / "b1.5/s3/uniform2").exists()
    (tmp_path / "b3/s1").mkdir(parents=True)  # seed 1 has a 4-bit "uniform2" (b4/s1) and a 2-bit one (b2/s1)
    four.save(tmp_path / "b3/s1/uniform2.json")
    _reuse_uniform(run, "b3/s1/uniform2", tmp_path / "b3/s1/uniform2.json", seed=1)
    assert json.loads((tmp_path / "b3/s1/uniform2/metrics.json").read_text()) == {"cell": "b4/s1"}
    # a cell written before architectures recorded their weight grid is the same architecture
    shutil.rmtree(tmp_path / "b1.5/s1/uniform2")
    dataclasses.replace(two, w_grid=None).save(tmp_path / "b2/s1/uniform2.json")
    _reuse_uniform(run, "b1.5/s1/uniform2", tmp_path / "b1.5/s1/uniform2.json", seed=1)
    assert json.loads((tmp_path / "b1.5/s1/uniform2/metrics.json").read_text()) == {"cell": "b2/s1"}
    shutil.rmtree(tmp_path / "b1.5/s1/uniform2")  # a recorded other grid is another architecture
    dataclasses.replace(two, w_grid=QuantMode.MIDRISE).save(tmp_path / "b2/s1/uniform2.json")
    _reuse_uniform(run, "b1.5/s1/uniform2", tmp_path / "b1.5/s1/uniform2.json", seed=1)
    assert not (tmp_path / "b1.5/s1/uniform2").exists()


def test_compare_checks_every_budget_before_anything_runs(env, tmp_path, capsys):  # noqa: F811
    run_dir = tmp_path / "bad"
    assert run_stage(_cfg(env, tmp_path, "stage=compare", "compare.budgets=[3,0.5]", "space.w_bits=[2,4]"), run_dir) != 0
    assert "below the smallest size" in capsys.readouterr().err
    assert not run_dir.exists()


def test_compare_checks_the_searchs_bit_operations_target_before_anything_runs(env, tmp_path, capsys):  # noqa: F811
    run_dir = tmp_path / "bad"
    assert run_stage(_cfg(env, tmp_path, "stage=compare", "compare.budgets=[3]", "space.w_bits=[2,4]",
                          "search.bitops_target=1e-9"), run_dir) != 0
    assert "search.bitops_target=1e-09 GBOPs per token is below the fewest" in capsys.readouterr().err
    assert not run_dir.exists()


def test_a_hawq_run_sized_at_the_plain_budget_is_named_when_a_search_joins_its_cell(tmp_path, caplog):
    """Growing a comparison by methods (`searched` after `hawq`) reuses HAWQ-V2's finished run, which was allocated
    at the budget and not at the searched architecture's size: the log says so and how to rerun it."""
    step = tmp_path / "b2/s1/hawq"
    step.mkdir(parents=True)
    (step / "metrics.json").write_text("{}")
    for match, warned in ((None, True), (str(tmp_path / "b2/s1/search/architecture.json"), False)):
        (step / "config.yaml").write_text(OmegaConf.to_yaml({"stage": "hawq", "budget": {"avg_bits": 2, "match": match}}))
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="search.compare"):
            _warn_unmatched_hawq(step)
        assert ("allocated at the plain budget" in caplog.text) is warned
        assert (str(step.with_name("hawq_qat")) in caplog.text) is warned


@pytest.mark.parametrize("stage", ["stage=compare", "stage=pipeline"])
@pytest.mark.parametrize("overrides, message", [
    (["task=rte"], "no data folder for task 'rte'"),
    (["hawq.activations=true", "pipeline.hawq=true"], "hawq.activations=true allocates activation bits"),
])
def test_data_and_hawq_settings_are_checked_before_the_run_directory_is_written(env, tmp_path, capsys, stage, overrides,
                                                                                  message):  # noqa: F811
    """Both once failed in their first step: a compare or pipeline left config.yaml and run.log behind, and with
    HAWQ-V2's settings, the fine-tuning, search and QAT it had run before them."""
    run_dir = tmp_path / "bad"
    budget = "compare.budgets=[3]" if stage == "stage=compare" else "budget.avg_bits=3"
    assert run_stage(_cfg(env, tmp_path, stage, budget, *overrides), run_dir) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
    assert not run_dir.exists()


def test_a_hydra_multirun_of_compare_is_summarised_by_the_tool(env, tmp_path):  # noqa: F811
    from test_app import _python_m_search

    sweep = tmp_path / "multi"
    args = ["-m", "stage=compare", f"model.name_or_path={env['model']}", f"task.data_dir={env['data']}",
            "task.max_seq_len=32", "logger=none", "max_steps=2", "progress_bar=false", f"cache_dir={tmp_path / 'cache'}",
            "space.groups=4", "space.embedding_groups=4", "finetune.batch_size=8", "search.batch_size=8",
            "qat.batch_size=8", "compare.budgets=[3],[2]", "compare.seeds=[1]", "compare.methods=[searched,uniform]",
            f"hydra.sweep.dir={sweep}"]
    done = _python_m_search(*args, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (sweep / "0" / "b3" / "s1" / "qat" / "metrics.json").is_file()
    assert (sweep / "1" / "b2" / "s1" / "uniform2" / "metrics.json").is_file()
    out = subprocess.run([sys.executable, "tools/summarize_compare.py", str(sweep)], cwd=ROOT, capture_output=True,
                         text=True, check=True).stdout
    for row in ("| searched | 3 |", "| searched | 2 |", "| uniform | 3 |", "| uniform | 2 |", "| fp32 | FP32 |"):
        assert row in out


def test_changed_settings_name_what_decides_a_result_and_ignore_bookkeeping():
    saved = "search:\n  arch_lr: 0.01\n  log_every: 10\n  tau: {end: 1.0}\nqat:\n  lr: 2e-5\n"
    now = "search:\n  arch_lr: 0.05\n  log_every: 50\n  tau: {end: 0.2}\nqat:\n  lr: 1e-4\n"
    assert changed_settings(saved, now, ["search"]) == ["search.arch_lr: 0.01 -> 0.05", "search.tau.end: 1.0 -> 0.2"]
    assert changed_settings(saved, saved, ["search", "qat"]) == []
    assert changed_settings(saved, "search: {arch_lr: 0.01, tau: {end: 1.0}}\n", ["search", "qat"]) == ["qat.lr: 2e-05 -> None"]


def test_a_step_resumed_under_other_settings_says_its_train_state_has_the_old_ones(tmp_path, caplog):
    old, now = "qat:\n  lr: 2e-5\n", "qat:\n  lr: 1e-4\n"
    RunDir(tmp_path / "run", old).child("b2/qat").open()  # an interrupted step: its config and a train state
    (tmp_path / "run" / "b2/qat" / "train_state").mkdir()
    (tmp_path / "run" / "b2/qat" / "train_state" / STATE_FILE).write_text('{"step": 3}\n')
    seen = []
    with caplog.at_level("WARNING", logger="search.rundir"):
        run_step(RunDir(tmp_path / "run", now), "b2/qat", lambda r, resume: seen.append(resume) or {}, ("qat",))
    assert seen == [True]
    [warning] = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warning.startswith("b2/qat started with other settings (qat.lr: 2e-05 -> 0.0001); it resumes from")


def test_a_step_written_before_parent_config_yaml_is_checked_against_its_config_yaml(tmp_path, caplog):
    # then a step's config.yaml was the whole run's: resuming such a directory compares with it
    step = tmp_path / "run" / "b2/qat"
    step.mkdir(parents=True)
    (step / "config.yaml").write_text("stage: compare\nqat:\n  lr: 2e-5\n")
    (step / "metrics.json").write_text("{}")
    with caplog.at_level("WARNING", logger="search.rundir"):
        run_step(RunDir(tmp_path / "run", "stage: compare\nqat:\n  lr: 1e-4\n"), "b2/qat", lambda r, resume: {}, ("qat",))
    [warning] = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warning.startswith("b2/qat was run with other settings (qat.lr: 2e-05 -> 0.0001)")


def test_what_a_finished_step_keeps_of_its_train_state_is_not_resumed(tmp_path, caplog):
    # a search whose metrics.json was deleted keeps only its final weights: it runs again from the start
    state = tmp_path / "run" / "b2/search" / "train_state"
    state.mkdir(parents=True)
    (state / "model.safetensors").write_bytes(b"weights")
    seen = []
    with caplog.at_level("WARNING", logger="search.rundir"):
        run_step(RunDir(tmp_path / "run", "search: {}\n"), "b2/search", lambda r, resume: seen.append(resume) or {},
                 ("search",), keep=("model.safetensors",))
    assert seen == [False] and not caplog.records
    assert [f.name for f in state.iterdir()] == ["model.safetensors"]


def test_an_option_added_after_a_run_counts_as_changed_only_away_from_its_default():
    # a run from before hawq.negative_curvature existed behaved as its default (floor) does
    old = "hawq:\n  max_probes: 100\n"
    defaults = schema_defaults()
    assert "negative_curvature: floor" in defaults
    same = "hawq:\n  max_probes: 100\n  negative_curvature: floor\n"
    other = "hawq:\n  max_probes: 100\n  negative_curvature: absolute\n"
    assert changed_settings(old, same, ["hawq"], defaults) == []
    assert changed_settings(old, other, ["hawq"], defaults) == ["hawq.negative_curvature: None -> absolute"]
    assert changed_settings(old, same, ["hawq"]) == ["hawq.negative_curvature: None -> floor"]  # no schema given


def test_a_cell_step_depends_on_its_own_seed_not_on_what_ran_before_it(env, tmp_path):  # noqa: F811
    # Gumbel sampling draws from the global RNG: a compare cell's search (after the finetune and fp32 steps,
    # in a process seeded with the top-level seed) must equal the same search run alone with the cell's seed
    common = ("search.relaxation=GUMBEL", "search.size_weight=5")
    cmp = tmp_path / "cmp"
    assert run_stage(_cfg(env, tmp_path, "stage=compare", "seed=42", "compare.budgets=[3]", "compare.seeds=[7]",
                          "compare.methods=[searched]", *common), cmp) == 0
    checkpoint = next(cmp.rglob("checkpoint"))  # the compare run's fine-tuned model
    alone = tmp_path / "alone"
    assert run_stage(_cfg(env, tmp_path, "stage=search", f"model.name_or_path={checkpoint}", "budget.avg_bits=3",
                          "seed=7", *common), alone) == 0
    searched, alone_state = load_file(next((cmp / "b3" / "s7" / "search").rglob("model.safetensors"))), \
        load_file(next(alone.rglob("model.safetensors")))
    alphas = [k for k in searched if k.endswith(".alpha")]
    assert alphas and all(torch.equal(searched[k], alone_state[k]) for k in searched)


def test_graft_tool_puts_a_search_variant_beside_the_same_baseline_runs(tmp_path):
    _tree(tmp_path / "base", {("qat", 2, 1): 80.0, ("hawq_qat", 2, 1): 79.0, ("uniform2", 2, 1): 78.0,
                              ("qat", 2, 2): 81.0, ("hawq_qat", 2, 2): 77.0, ("qat.draw1", 2, 1): 10.0,
                              ("hawq_qat.draw1", 2, 1): 75.0})
    _metrics(tmp_path / "variant" / "b2" / "s1" / "qat", 83.0, mb=1.0, bits=2)
    _metrics(tmp_path / "variant" / "b2" / "s1" / "qat.draw1", 85.0, mb=1.0, bits=2)
    _metrics(tmp_path / "variant" / "b2" / "s1" / "search", 70.0)
    tool = [sys.executable, "tools/graft_searched.py"]
    out = subprocess.run([*tool, str(tmp_path / "base"), str(tmp_path / "variant"), str(tmp_path / "out")], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
    assert out.startswith("b2/s1: searched 2")
    rows = {(r.method.value, r.seed): r.metric for r in collect([tmp_path / "out"])}
    # the searched QAT draws are all the variant's (none of the base's), the baselines' all the base's
    assert rows == {("fp32", None): 85.0, ("searched", 1): 84.0, ("hawq", 1): 77.0, ("uniform", 1): 78.0}
    assert sorted(p.name for p in (tmp_path / "out" / "b2" / "s1").iterdir()) == [
        "hawq", "hawq_qat", "hawq_qat.draw1", "qat", "qat.draw1", "search", "uniform2"]
    assert (tmp_path / "base" / "b2" / "s1" / "qat" / "metrics.json").is_file()  # the base is left as it was
    _metrics(tmp_path / "variant" / "b3" / "s1" / "qat", 84.0, mb=1.0, bits=3)  # a cell the base does not have
    bad = subprocess.run([*tool, str(tmp_path / "base"), str(tmp_path / "variant"), str(tmp_path / "out2")], cwd=ROOT,
                         capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "has no cell b3/s1" in bad.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base", "out", "variant"]  # no out2, no half-built temp
    shutil.rmtree(tmp_path / "variant" / "b3")
    for out in ("base", "variant", "."):  # OUT is replaced: it must not be what it is built from
        bad = subprocess.run([*tool, str(tmp_path / "base"), str(tmp_path / "variant"), str(tmp_path / out)], cwd=ROOT,
                             capture_output=True, text=True)
        assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "whose runs it is built from" in bad.stderr
    assert json.loads((tmp_path / "base" / "b2" / "s1" / "qat" / "metrics.json").read_text())["main_metric"]["value"] == 80.0


def test_the_run_table_tool_fails_in_one_line_and_never_prints_an_empty_table(tmp_path):
    tool = [sys.executable, "tools/collect_runs.py"]
    (tmp_path / "empty").mkdir()
    _metrics(tmp_path / "ok" / "qat", 80.0)
    (tmp_path / "bad" / "qat").mkdir(parents=True)
    (tmp_path / "bad" / "qat" / "metrics.json").write_text('{"main_metric": ')  # a step killed while writing
    for args, message in (([str(tmp_path / "none")], "no such directory"),
                          ([str(tmp_path / "empty")], "no runs (metrics.json) below"),
                          (["--exports", str(tmp_path / "ok")], "no stage=export runs below"),
                          ([str(tmp_path / "bad")], "bad/qat/metrics.json is not valid JSON")):
        run = subprocess.run([*tool, *args], cwd=ROOT, capture_output=True, text=True)
        assert run.returncode == 2 and run.stdout == "" and run.stderr.count("\n") == 1 and message in run.stderr
    out = subprocess.run([*tool, str(tmp_path / "ok")], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert out.count("\n") == 3 and f"`{tmp_path / 'ok' / 'qat'}`" in out
