"""The benchmark tools that drive the library directly run end to end on a tiny model: a refactor of the
library's interfaces must not leave them broken (`bench_cost.py` and `unrolled_check.py` once were)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT, load_tool
from test_app import env  # noqa: F401  (module fixture: tiny model + fixture data)

TINY = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}


def _run(*args: str) -> subprocess.CompletedProcess:
    out = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, env=TINY, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return out


def test_bench_cost_times_a_search_iteration_against_an_fp_step(env, tmp_path):  # noqa: F811
    result = tmp_path / "cost.json"
    _run("tools/bench_cost.py", "--model", str(env["model"]), "--batch-size", "2", "--seq-len", "8", "--rounds", "1",
         "--only", "G=1", "--json-out", str(result))
    (row,) = json.loads(result.read_text())["results"]
    assert row["config"] == "G=1" and row["fp_step_s"] > 0 and row["search_iter_s"] > 0 and row["search_over_fp_epoch"] > 0


def test_unrolled_check_compares_first_and_second_order_gradients(env, tmp_path):  # noqa: F811
    result = tmp_path / "unrolled.json"
    _run("tools/unrolled_check.py", str(env["model"]), "--task", "sst2", "--data-dir", str(env["data"]), "--pairs", "1",
         "--batch-size", "4", "--max-seq-len", "16", "--rounds", "1", "--xi", "1e-3", "--groups", "4", "--json-out", str(result))
    out = json.loads(result.read_text())
    assert [r["xi"] for r in out["xi"]] == [1e-3] and -1 <= out["xi"][0]["cosine"] <= 1
    assert out["first_order_s"] > 0 and out["second_order_s"] > 0


@pytest.mark.parametrize("tool", sorted(p.name for p in (ROOT / "tools").glob("*.py")))
def test_every_tool_imports(tool):
    # the tools are scripts no other test may run: an interface they import that moved would break them unseen
    module = load_tool(tool)
    if tool != "benchlib.py":  # the others' shared helpers
        assert callable(getattr(module, "main", None)), f"{tool} has no main()"
