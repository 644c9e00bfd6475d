"""How reproducible are HAWQ-V2's Hessian traces? Compares stage=hawq runs of the same checkpoint.

Each run's `traces.json` holds per-group Hutchinson estimates and the running per-site traces. Runs that
differ only in their seed draw other training batches and other probes; if the traces measured the
model's curvature, two such runs would rank the sites and groups alike. For every labelled set of runs
this prints, as a markdown table: probes x batches, seconds, negative estimates, sites whose trace is
significant within its own run (|mean| > 2 standard errors over the probes), and between every two runs
of the set the rank correlation (Spearman) of site and of group traces and how often their signs agree.

    python tools/trace_agreement.py "1 batch x 50 probes=runs/a/hawq,runs/b/hawq" \
        "4 batches x 25 probes=runs/c/hawq,runs/d/hawq"
"""
from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import numpy as np
from scipy.stats import spearmanr


def load(run: str) -> dict:
    path = Path(run) / "traces.json"
    if not path.is_file():
        raise SystemExit(f"{path} is missing: give stage=hawq run directories (their traces.json)")
    traces = json.loads(path.read_text())
    if traces.get("kind") != "trace":
        raise SystemExit(f"{path} holds {traces.get('kind')!r} estimates; this compares Hutchinson traces")
    metrics_path = Path(run) / "metrics.json"
    batches = json.loads(metrics_path.read_text())["hawq"]["batches"] if metrics_path.is_file() else None
    names = [n for n in traces["sites"] if ".encoder." in n]  # the weights the budget allocates
    groups = np.concatenate([traces["sites"][n]["estimate"] for n in names])
    sites = np.array([sum(traces["sites"][n]["estimate"]) for n in names])
    running = np.array(traces["running"])  # [P, all sites]: the mean after 1..P probes
    p = np.arange(1, len(running) + 1)[:, None]
    samples = p * running - np.vstack([np.zeros((1, running.shape[1])), p[:-1] * running[:-1]])  # per probe
    index = [list(traces["sites"]).index(n) for n in names]
    mean, err = samples[:, index].mean(0), samples[:, index].std(0, ddof=1) / np.sqrt(len(samples))
    return {"names": names, "groups": groups, "sites": sites, "probes": traces["probes"], "batches": batches,
            "seconds": traces["seconds"], "significant": int((np.abs(mean) > 2 * err).sum())}


def row(label: str, runs: list[dict]) -> str:
    pairs = list(itertools.combinations(runs, 2))
    if not pairs:
        raise SystemExit(f"{label}: give two or more runs to compare")
    if any(a["names"] != b["names"] for a, b in pairs):
        raise SystemExit(f"{label}: the runs quantize different sites; compare runs of one model and space")

    def span(values: list[float], fmt: str = "{:.2f}") -> str:
        lo, hi = fmt.format(min(values)), fmt.format(max(values))
        return lo if lo == hi else f"{lo} .. {hi}"

    sites_rho = [spearmanr(a["sites"], b["sites"])[0] for a, b in pairs]
    groups_rho = [spearmanr(a["groups"], b["groups"])[0] for a, b in pairs]
    sign = [float(np.mean(np.sign(a["sites"]) == np.sign(b["sites"]))) for a, b in pairs]
    n_sites, n_groups = len(runs[0]["sites"]), len(runs[0]["groups"])
    return (f"| {label} | {len(runs)} | {span([r['probes'] for r in runs], '{:d}')} | "
            f"{span([r['batches'] for r in runs], '{}')} | {span([r['seconds'] for r in runs], '{:.0f}')} | "
            f"{span([int((r['sites'] < 0).sum()) for r in runs], '{:d}')} of {n_sites} | "
            f"{span([int((r['groups'] < 0).sum()) for r in runs], '{:d}')} of {n_groups} | "
            f"{span([r['significant'] for r in runs], '{:d}')} of {n_sites} | {span(sites_rho)} | {span(sign)} | "
            f"{span(groups_rho)} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("sets", nargs="+", metavar="LABEL=RUN,RUN[,...]", help="runs with the same settings, other seeds")
    args = p.parse_args()
    print("| settings | runs | probes | batches | seconds | negative site traces | negative group traces | "
          "sites significant in their run | site rank corr. between runs | site sign agreement | "
          "group rank corr. between runs |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for spec in args.sets:
        label, sep, runs = spec.partition("=")
        if not sep or not runs:
            raise SystemExit(f"{spec!r}: write LABEL=RUN,RUN (stage=hawq run directories)")
        print(row(label, [load(r) for r in runs.split(",")]))


if __name__ == "__main__":
    main()
