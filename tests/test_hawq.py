"""HAWQ-V2: quantization errors of the supernet's own quantizer, the knapsack allocator against brute force
(optimal, cheapest among equals, non-dominated frontier), exact costs that meet the budget, and the hawq
stage end to end on a tiny BERT (cache reuse, budget.match, QAT of its architecture, start-up errors)."""
from __future__ import annotations

import copy
import csv
import itertools
import json

import numpy as np
import pytest
import torch
from transformers import BertForSequenceClassification

from search.__main__ import run_stage
from search.budget import Budget, uniform
from search.config import NegativeCurvature, Sensitivity, TraceLevel
from search.hawq import (FLOOR, Curvature, build_knapsack, curvature_floor, group_view, measure_curvature, quantization_errors, sensitivities,
                         to_architecture)
from search.bilevel import task_loss
from search.hessian import Hessian, hutchinson
from search.knapsack import Knapsack
from supernet import Architecture, SearchSpace, sites, to_supernet

from conftest import tiny_config
from test_app import env  # noqa: F401  (module fixture: tiny model + fixture data)
from test_stages import _cfg

SPACE = SearchSpace(w_bits=[0, 2, 4, 8], groups=4, a_bits=[8], embedding_bits=[4, 8], embedding_groups=4)


def _supernet(cfg, space=SPACE):
    torch.manual_seed(0)
    return to_supernet(BertForSequenceClassification(cfg), space)


def test_errors_are_those_of_the_supernets_own_quantizer(tiny_cfg):
    model = _supernet(tiny_cfg, SearchSpace(w_bits=[0, 2, 4, 32], groups=4, embedding_bits=[0, 4], embedding_groups=4))
    for name, site in sites(model):
        bits = site.wq.cands.bits
        errors = quantization_errors(group_view(site)(site.weight), site.wq.step, bits)  # [G, K]
        for k, b in enumerate(bits):
            site.wq.fix([b] * site.grouping.n_groups)
            with torch.no_grad():
                q, _ = site.quantized_weight()
                expected = group_view(site)((q - site.weight).double()).pow(2).sum(1)
            assert torch.allclose(errors[:, k], expected, rtol=1e-5, atol=1e-9), (name, b)
        site.wq.unfix()
        if 0 in bits:
            assert torch.allclose(errors[:, bits.index(0)], group_view(site)(site.weight.detach().double()).pow(2).sum(1))


def test_sensitivity_is_curvature_times_error_with_negative_curvature_at_the_floor():
    errors = torch.tensor([[4.0, 1.0], [2.0, 0.5]])
    omega = sensitivities(torch.tensor([0.5, -1.0]), errors)
    assert torch.equal(omega, torch.tensor([[2.0, 0.5], [0.0, 0.0]], dtype=torch.float64))
    omega = sensitivities(torch.tensor([0.5, -1.0]), errors, floor=0.01)
    assert torch.allclose(omega, torch.tensor([[2.0, 0.5], [0.02, 0.005]], dtype=torch.float64))
    curv = [torch.tensor([-1.0, 2.0, 4.0]), torch.tensor([6.0, 0.0])]
    assert curvature_floor(curv) == pytest.approx(FLOOR * 4.0)  # median of the positive 2, 4, 6
    assert curvature_floor([torch.tensor([-1.0, 0.0])]) == 1.0


def test_noise_only_curvature_still_spends_the_budget_on_the_smallest_errors(tiny_cfg):
    """Every estimate negative (pure noise): the allocation neither prunes for free nor leaves the budget
    unused; it minimises the total quantization error within the budget."""
    model = _supernet(tiny_cfg)
    template = Architecture.from_supernet(model)
    curvature = _curvature(model)
    curvature.estimate = {n: [-1.0] * len(e) for n, e in curvature.estimate.items()}
    lo, hi = build_knapsack(model, template, curvature, Budget("encoder", avg_bits=1.0)).bounds()
    budget = Budget("encoder", avg_bits=lo + 0.6 * (hi - lo))
    for level in TraceLevel:
        ks = build_knapsack(model, template, curvature, budget, level)
        chosen = ks.allocate(budget.target)
        assert chosen.cost >= 0.95 * budget.target and chosen.value > 0


def test_site_level_gives_every_group_its_sites_average_trace(tiny_cfg):
    model = _supernet(tiny_cfg)
    template = Architecture.from_supernet(model)
    curvature = _curvature(model)
    name, site = next(iter(sites(model)))
    curvature.estimate[name] = [-3.0, 1.0, 2.0, 8.0]  # one negative (noise) group
    n = site.wq.group_numel
    assert torch.equal(curvature.per_weight(name, n), torch.tensor([-3.0, 1.0, 2.0, 8.0], dtype=torch.float64) / n)
    pooled = curvature.per_weight(name, n, TraceLevel.site)
    assert torch.allclose(pooled, torch.full((4,), 8.0 / (4 * n), dtype=torch.float64))
    # at site level a group's sensitivities are the site's average trace times its own errors, so within a
    # site the noisy negative group no longer reads as free to prune
    budget = Budget("encoder", avg_bits=3.0)
    ks_group = build_knapsack(model, template, curvature, budget)
    ks_site = build_knapsack(model, template, curvature, budget, TraceLevel.site)
    i = ks_site.names.index(name)
    errors = quantization_errors(group_view(site)(site.weight), site.wq.step, site.wq.cands.bits)
    order = [site.wq.cands.bits.index(b) for b in ks_site.bits[i]]
    assert np.allclose(ks_site.values[i], (pooled[:, None] * errors)[:, order].numpy())
    # group level: the negative group's pruning costs only the floor; site level: the site's average trace
    assert ks_group.values[i][0, 0] < 1e-2 * ks_site.values[i][0, 0]


def test_a_site_with_a_negative_trace_is_pruned_for_free_unless_curvature_counts_by_magnitude(tiny_cfg):
    """A whole matrix with a negative trace (a fine-tuned model away from a minimum): at the floor its
    pruning costs nearly nothing, so a tight budget prunes it whole; by magnitude it costs what a positive
    trace of that size would, and the budget is taken from the matrices that really are flat."""
    model = _supernet(tiny_cfg)
    template = Architecture.from_supernet(model)
    curvature = _curvature(model)
    curvature.estimate = {n: [1.0] * len(e) for n, e in curvature.estimate.items()}
    name = next(n for n, s in sites(model) if s.kind.value == "encoder")
    curvature.estimate[name] = [-50.0] * len(curvature.estimate[name])
    lo, hi = build_knapsack(model, template, curvature, Budget("encoder", avg_bits=1.0)).bounds()
    budget = Budget("encoder", avg_bits=lo + 0.3 * (hi - lo))
    pruned = {}
    for negative in NegativeCurvature:
        ks = build_knapsack(model, template, curvature, budget, TraceLevel.site, negative)
        i, chosen = ks.names.index(name), ks.allocate(budget.target)
        bits = np.asarray(ks.bits[i])[chosen.choice[i]]
        pruned[negative] = float(np.mean(bits == 0))
        assert chosen.cost <= budget.target + 1e-9
    assert pruned[NegativeCurvature.floor] == 1.0 and pruned[NegativeCurvature.absolute] == 0.0


def _random_knapsack(seed: int) -> Knapsack:
    rng = np.random.default_rng(seed)
    groups, k = [2, 3], 3  # 5 groups x 3 candidates: 243 configurations
    values = tuple(rng.exponential(1.0, (g, k)) for g in groups)
    if seed % 2:  # ties between configurations: the allocator must pick the cheapest of them
        values = tuple(np.round(v, 1) for v in values)
    prices = tuple(np.sort(rng.integers(0, 9, k)).astype(float) * 0.37 for _ in groups)
    return Knapsack(("a", "b"), ((0, 2, 4), (0, 4, 8)), values, prices, constant=0.25)


def _enumerate(ks: Knapsack) -> list[tuple[float, float]]:
    sizes = [v.shape[0] for v in ks.values]
    out = []
    for pick in itertools.product(range(3), repeat=sum(sizes)):
        choice = (np.array(pick[: sizes[0]]), np.array(pick[sizes[0]:]))
        out.append((ks.cost(choice), ks.value(choice)))
    return out


@pytest.mark.parametrize("seed", range(6))
def test_allocator_equals_brute_force(seed):
    ks = _random_knapsack(seed)
    configs = _enumerate(ks)
    lo, hi = ks.bounds()
    for target in np.linspace(lo, hi, 6):
        a = ks.allocate(float(target))
        feasible = [(c, v) for c, v in configs if c <= target * (1 + 1e-9)]
        best = min(v for _, v in feasible)
        assert a.cost <= target * (1 + 1e-9) and a.gap == 0.0
        assert a.value == pytest.approx(best, abs=1e-12)
        assert a.cost == pytest.approx(min(c for c, v in feasible if v <= best + 1e-12))  # cheapest of the best
    front = ks.frontier(8)
    assert [a.cost for a in front] == sorted(a.cost for a in front)
    for a in front:  # no configuration dominates a frontier point
        assert not any(c <= a.cost and v <= a.value and (c < a.cost - 1e-12 or v < a.value - 1e-12) for c, v in configs)
    with pytest.raises(ValueError, match="no choice"):
        ks.allocate(lo * 0.5)


def _curvature(model, seed=0) -> Curvature:
    g = torch.Generator().manual_seed(seed)
    return Curvature(Sensitivity.trace, {n: (torch.rand(s.grouping.n_groups, generator=g) * 10).tolist() for n, s in sites(model)})


@pytest.mark.parametrize("unit, scope", [("avg_bits", "encoder"), ("mb", "encoder"), ("avg_bits", "total"), ("mb", "total")])
def test_allocation_meets_the_budget_at_the_cost_models_size(tiny_cfg, unit, scope):
    model = _supernet(tiny_cfg)
    template = Architecture.from_supernet(model)
    lo, hi = build_knapsack(model, template, _curvature(model), Budget(scope, **{unit: 1.0})).bounds()
    budget = Budget(scope, **{unit: lo + 0.4 * (hi - lo)})
    ks = build_knapsack(model, template, _curvature(model), budget)
    chosen = ks.allocate(budget.target)
    arch = to_architecture(template, ks, chosen.choice)
    assert budget.fits(arch) and budget.of(arch) > lo
    assert chosen.cost == pytest.approx(budget.of(arch), rel=1e-12)  # the knapsack's cost IS the cost model's
    # more budget never costs sensitivity: the frontier falls, and holds the chosen point
    front = ks.frontier(10, extra=[budget.target])
    assert all(x.value > y.value for x, y in zip(front, front[1:]))
    assert any(a.key() == chosen.key() for a in front)


def test_budget_match_takes_the_size_of_an_architecture(tiny_cfg, tmp_path):
    model = _supernet(tiny_cfg)
    template = Architecture.from_supernet(model)
    two = uniform(template, 2)
    two.save(tmp_path / "two.json")
    budget = Budget.from_args(None, None, "encoder", str(tmp_path / "two.json"))
    assert budget == Budget.matching(two)
    ks = build_knapsack(model, template, _curvature(model), budget)
    arch = to_architecture(template, ks, ks.allocate(budget.target).choice)
    assert arch.size_bytes() <= two.size_bytes()
    with pytest.raises(ValueError, match="one of"):
        Budget.from_args(3.0, None, "encoder", str(tmp_path / "two.json"))


# --- the stage ---------------------------------------------------------------------------------
HAWQ = ["stage=hawq", "hawq.max_probes=3", "hawq.batch_size=8", "hawq.frontier_points=6"]


def test_hawq_stage_then_qat(env, tmp_path):  # noqa: F811
    run_dir = tmp_path / "hawq"
    assert run_stage(_cfg(env, tmp_path, *HAWQ, "budget.avg_bits=3"), run_dir) == 0
    arch = Architecture.load(run_dir / "architecture.json")
    assert arch.avg_bits("encoder") <= 3.0
    for name in ("architecture.png", "frontier.png", "traces.png"):
        assert (run_dir / name).stat().st_size > 1000, name
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["stage"] == "hawq" and metrics["hawq"]["probes"] == 3 and not metrics["hawq"]["cached"]
    assert metrics["hawq"]["trace_level"] == "site"  # the default: HAWQ-V2's per-layer trace
    assert metrics["chosen"]["avg_bits"] <= 3.0 and metrics["chosen"]["gap"] == 0.0
    traces = json.loads((run_dir / "traces.json").read_text())
    assert set(traces["sites"]) == set(arch.names)
    for name, site in arch:
        assert len(traces["sites"][name]["estimate"]) == len(site.bits) == len(traces["sites"][name]["stderr"])
    rows = list(csv.DictReader((run_dir / "frontier.csv").open()))
    assert sum(int(r["chosen"]) for r in rows) == 1
    assert [float(r["mb"]) for r in rows] == sorted(float(r["mb"]) for r in rows)

    # another budget (and the group-level trace, computed from the same estimates) reuses the cached traces;
    # budget.match never exceeds the matched architecture
    match_dir = tmp_path / "match"
    assert run_stage(_cfg(env, tmp_path, *HAWQ, "hawq.trace_level=group",
                          f"budget.match={run_dir / 'architecture.json'}"), match_dir) == 0
    again = json.loads((match_dir / "metrics.json").read_text())
    assert again["hawq"]["cached"] and again["budget"]["unit"] == "mb" and again["hawq"]["trace_level"] == "group"
    assert Architecture.load(match_dir / "architecture.json").size_bytes() <= arch.size_bytes()

    qat_dir = tmp_path / "qat"
    assert run_stage(_cfg(env, tmp_path, "stage=qat", f"qat.architecture={run_dir / 'architecture.json'}"), qat_dir) == 0
    qat = json.loads((qat_dir / "metrics.json").read_text())
    assert qat["architecture"]["encoder_avg_bits"] == pytest.approx(arch.avg_bits("encoder"), abs=1e-4)


def test_curvature_of_the_fp_model_per_site_and_group(batch):
    torch.manual_seed(0)
    fp = BertForSequenceClassification(tiny_config(num_hidden_layers=1)).eval()
    net = to_supernet(copy.deepcopy(fp), SearchSpace(groups=4, embedding_bits=[32]))  # 6 sites
    batches = [{**batch, "labels": torch.tensor([0, 1, 1])}]
    trace = measure_curvature(fp, net, batches, Sensitivity.trace, max_probes=2, tol=0.0, seed=0)
    eig = measure_curvature(fp, net, batches, Sensitivity.top_eigenvalue, max_probes=2, tol=1e-3, seed=0)
    # the same probes drawn here over the sites' FP weights, looked up by name: each site gets its own groups' traces
    named = list(sites(net))
    weights = [fp.get_submodule(name).weight for name, _ in named]
    loss = lambda: task_loss(fp, batches[0])  # noqa: E731
    direct = hutchinson(Hessian([loss], weights), [group_view(site) for _, site in named], max_probes=2, tol=0.0, seed=0)
    assert len({tuple(t) for t in trace.estimate.values()}) == len(named)  # every site's traces differ
    for (name, site), mean in zip(named, direct.mean()):
        g, n = site.grouping.n_groups, site.wq.group_numel
        assert len(trace.estimate[name]) == len(trace.stderr[name]) == g
        assert trace.estimate[name] == pytest.approx(mean.tolist(), rel=1e-9)
        assert torch.allclose(trace.per_weight(name, n), mean.double() / n)
        assert len(eig.estimate[name]) == g and len(set(eig.estimate[name])) == 1  # one eigenvalue per site
        assert torch.equal(eig.per_weight(name, n), torch.tensor(eig.estimate[name], dtype=torch.float64))
    assert trace.probes == 2 and len(trace.running) == 2 and eig.probes <= 2
    assert Curvature.from_dict(json.loads(json.dumps(trace.to_dict()))) == trace


@pytest.mark.parametrize("overrides, message", [
    (["budget.avg_bits=1.5", "space.w_bits=[2,4,8]"], "below the smallest size"),
    ([], "needs a budget"),
    (["budget.avg_bits=3", "hawq.activations=true"], "offers one"),
    (["budget.avg_bits=3", "hawq.activations=true", "space.a_bits=[4,8]"], "needs hawq.a_avg_bits"),
    (["budget.avg_bits=3", "hawq.activations=true", "space.a_bits=[4,8]", "hawq.a_avg_bits=2"], "at least 4"),
    (["budget.avg_bits=3", "space.w_bits=[4]"], "nothing to allocate"),
    (["budget.match=/nonexistent/architecture.json"], "budget.match: architecture file /nonexistent/architecture.json does not exist"),
    (["budget.avg_bits=3", "hawq.a_avg_bits=6"], "hawq.a_avg_bits=6.0 needs hawq.activations=true"),  # not ignored
    (["budget.avg_bits=3", "space.w_bits=[0,2,3,9]"], "space.w_bits=[0, 2, 3, 9]: bit-width 9 is not supported"),
])
def test_bad_hawq_settings_fail_at_start_up(env, tmp_path, capsys, overrides, message):  # noqa: F811
    run_dir = tmp_path / "bad"
    assert run_stage(_cfg(env, tmp_path, *HAWQ, *overrides), run_dir) != 0
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error:") and message in err, err
    assert not run_dir.exists()
    assert not (tmp_path / "cache" / "hawq").exists()  # failed before any trace was computed


def test_activation_perturbation_differentiates_the_shared_input(batch):
    """d loss / d e (e added to a quantizer's input) is the gradient w.r.t. that activation, summed over the
    sites sharing it (Q, K and V)."""
    from search.hawq_act import _inputs, activation_sites

    torch.manual_seed(0)
    fp = BertForSequenceClassification(tiny_config()).eval()
    fp.set_attn_implementation("eager")
    net = to_supernet(copy.deepcopy(fp), SearchSpace(w_bits=[2, 4], groups=4, a_bits=[4, 8]))
    acts = activation_sites(net)
    assert len(acts) == 2 * 4 and len(acts[0].names) == 3  # per layer: Q/K/V shared, attn-out, FFN in, FFN out
    labelled = {**batch, "labels": torch.tensor([0, 1, 1])}
    _, xs = _inputs(fp, acts, labelled, None, lambda m, b: m(**b).loss)
    es = [torch.zeros_like(x, requires_grad=True) for x in xs]
    loss, _ = _inputs(fp, acts, labelled, es, lambda m, b: m(**b).loss)
    grads = torch.autograd.grad(loss, es)
    leaves = []  # the reference: Q, K and V each read a leaf copy of the input; their gradients add up

    def leaf(module, args):
        leaves.append(args[0].detach().requires_grad_())
        return (leaves[-1],)

    attn = fp.bert.encoder.layer[0].attention.self
    handles = [m.register_forward_pre_hook(leaf) for m in (attn.query, attn.key, attn.value)]
    fp(**labelled).loss.backward()
    for h in handles:
        h.remove()
    reference = sum(x.grad for x in leaves)
    assert torch.allclose(grads[0], reference, rtol=1e-4, atol=1e-10) and reference.abs().max() > 1e-7


def test_a_negative_activation_trace_counts_as_no_loss_or_by_its_magnitude(tiny_cfg):
    """hawq.negative_curvature reaches the activation knapsack too: at the floor a negative trace makes every
    candidate free, by magnitude it costs |trace| x the quantization error."""
    from search.hawq_act import activation_knapsack, activation_sites

    net = to_supernet(BertForSequenceClassification(tiny_cfg), SearchSpace(w_bits=[2, 4], groups=4, a_bits=[4, 8]))
    acts = activation_sites(net)
    measured = {a.name: (-2.0 if i == 0 else 1.0, [3.0, 1.0]) for i, a in enumerate(acts)}  # errors at 4, 8 bits
    floor = activation_knapsack(net, measured)
    absolute = activation_knapsack(net, measured, NegativeCurvature.absolute)
    assert np.array_equal(floor.values[0], [[0.0, 0.0]]) and np.array_equal(absolute.values[0], [[6.0, 2.0]])
    assert np.array_equal(floor.values[1], absolute.values[1]) and np.array_equal(floor.values[1], [[3.0, 1.0]])


def test_hawq_allocates_activation_bits_within_their_budget(env, tmp_path):  # noqa: F811
    run_dir = tmp_path / "hawq_act"
    assert run_stage(_cfg(env, tmp_path, *HAWQ, "budget.avg_bits=3", "space.a_bits=[4,8]", "hawq.activations=true",
                          "hawq.a_avg_bits=6"), run_dir) == 0
    arch = Architecture.load(run_dir / "architecture.json")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    act = metrics["activations"]
    assert act["a_avg_bits"] <= 6 + 1e-9 and set(act["bits"].values()) == {4, 8}  # a real mix, within budget
    for name, (trace, errors) in act["traces"].items():
        assert np.isfinite(trace) and errors[0] > errors[1] > 0  # 4-bit error above 8-bit error
        layer = name.rsplit(".attention", 1)[0]
        if name.endswith("attention.self.query"):  # K and V read the same tensor: same bits
            assert {arch.site(f"{layer}.attention.self.{s}").a_bits for s in ("query", "key", "value")} == {act["bits"][name]}
    qat_dir = tmp_path / "qat_act"
    assert run_stage(_cfg(env, tmp_path, "stage=qat", f"qat.architecture={run_dir / 'architecture.json'}",
                          "space.a_bits=[4,8]"), qat_dir) == 0


def test_the_model_before_qat_sets_its_activation_steps_on_training_data(env, tmp_path, monkeypatch):  # noqa: F811
    # its first forward was the first dev batch, which fitted the activation steps to the data it is scored on
    import search.hawq_stage as stage

    seen = []
    real = stage.evaluate_sets

    def evaluate(net, *args, **kwargs):
        seen.append([bool(s.aq.initialized) for _, s in sites(net) if s.aq is not None and not s.aq.cands.is_identity])
        return real(net, *args, **kwargs)

    monkeypatch.setattr(stage, "evaluate_sets", evaluate)
    assert run_stage(_cfg(env, tmp_path, *HAWQ, "budget.avg_bits=3"), tmp_path / "hawq") == 0
    assert seen and seen[0] and all(seen[0])
