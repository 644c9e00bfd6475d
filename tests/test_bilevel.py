"""The bilevel architect: each step moves only its own parameters, the finite-difference HVP is right,
and a size penalty drives the expected size down to a derivable architecture within the budget."""
import pytest
import torch
from torch import nn
from transformers import BertForSequenceClassification

from search.bilevel import BilevelStep, CurvatureTerm, SizeTerm, finite_difference_hvp, group_lasso, probability_mass, temperature
from search.budget import Budget
from search.derive import derive
from search.loop import Endless
from supernet import Scope, SearchSpace, expected_size, param_sets, sites, to_supernet

SPACE = SearchSpace(w_bits=[0, 2, 4, 8], groups=4, a_bits=[8], embedding_bits=[8], embedding_groups=4)


def _batches(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(1, 99, (4, 8), generator=g)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": (ids[:, 0] > 50).long()})
    return out


def _setup(cfg, size_weight=1.0, budget=None, second_order=False, warmup=0, steps=10, weight_lr=1e-3, curvature=None):
    torch.manual_seed(0)
    model = to_supernet(BertForSequenceClassification(cfg), SPACE).train()
    sets = param_sets(model)
    upper = sets.arch + sets.scales
    step = BilevelStep(
        model, sets.weights, upper, torch.optim.AdamW(sets.weights, lr=weight_lr),
        [torch.optim.SGD(sets.arch, lr=0.5), torch.optim.Adam(sets.scales, lr=1e-3)],
        Endless(_batches(seed=1)), SizeTerm(size_weight, budget), second_order=second_order,
        warmup_steps=warmup, total_steps=steps, tau=(2.0, 0.5),
        curvature=None if curvature is None else CurvatureTerm(model, curvature, decay=0.5),
    )
    return model, sets, step


def _snapshot(params):
    return [p.detach().clone() for p in params]


def _changed(params, before):
    return [not torch.equal(p, b) for p, b in zip(params, before)]


def test_arch_step_moves_only_logits_and_scales_and_weight_step_only_weights(tiny_cfg):
    model, sets, step = _setup(tiny_cfg)
    batch = _batches()[0]
    w0, a0, s0 = _snapshot(sets.weights), _snapshot(sets.arch), _snapshot(sets.scales)
    step.arch_step(next(step.arch_batches), batch)
    assert not any(_changed(sets.weights, w0))
    assert all(_changed(sets.arch, a0))
    assert any(_changed(sets.scales, s0))
    a1, s1 = _snapshot(sets.arch), _snapshot(sets.scales)
    step.weight_step(batch)
    assert not any(_changed(sets.arch, a1)) and not any(_changed(sets.scales, s1))
    assert sum(_changed(sets.weights, w0)) > len(sets.weights) // 2


def test_a_weight_lr_of_zero_keeps_the_weights_and_skips_their_step(tiny_cfg):
    # search.lr=0: the architecture is searched for the checkpoint's weights, and no time goes to a weight step
    model, sets, step = _setup(tiny_cfg, weight_lr=0.0)
    forwards = []
    model.register_forward_hook(lambda *_: forwards.append(1))
    w0, a0 = _snapshot(sets.weights), _snapshot(sets.arch)
    logs = step(_batches()[0], 0)
    assert len(forwards) == 1 and "loss/weights" not in logs and "loss/arch_task" in logs
    assert not any(_changed(sets.weights, w0))
    assert all(_changed(sets.arch, a0))


def test_warmup_steps_leave_the_architecture_alone(tiny_cfg):
    model, sets, step = _setup(tiny_cfg, warmup=2)
    a0 = _snapshot(sets.arch)
    for i, batch in enumerate(_batches(2)):
        logs = step(batch, i)
        assert {"size/expected_mb", "size/expected_avg_bits", "loss/size"} <= set(logs)  # still a curve to watch
        assert "loss/arch_task" not in logs
    assert not any(_changed(sets.arch, a0))
    step(_batches(1)[0], 2)
    assert all(_changed(sets.arch, a0))


def test_the_mass_of_searched_activation_bits_is_logged_once_per_quantizer_and_at_the_last_step(tiny_cfg):
    from search.derive import activation_probs

    model = to_supernet(BertForSequenceClassification(tiny_cfg), SearchSpace(w_bits=[2, 4], groups=4, a_bits=[4, 8]))
    inputs = activation_probs(model)
    linear = [name for name, site in sites(model) if getattr(site, "aq", None) is not None]
    assert 0 < len(inputs) < len(linear)  # Q, K and V read one input through one quantizer
    assert all(bits == (4, 8) and p.shape == (1, 2) for bits, p in inputs.values())
    mass = probability_mass(model)
    assert mass["mass_input/4"] + mass["mass_input/8"] == pytest.approx(1.0)
    assert sum(k.startswith("mass_input/") and k.count("/") == 2 for k in mass) == 2 * len(inputs)
    assert not any(k.startswith("mass_input") for k in probability_mass(_setup(tiny_cfg)[0]))  # 8 bits alone: none

    _, _, step = _setup(tiny_cfg, steps=3)
    step.log_mass_every = 50
    logged = [any(k.startswith("mass/") for k in step(batch, i)) for i, batch in enumerate(_batches(3))]
    assert logged == [True, False, True]  # every 50 steps from the first, and the last


def test_finite_difference_hvp_matches_autograd():
    torch.manual_seed(0)
    w1 = nn.Parameter(torch.randn(5, 4))
    w2 = nn.Parameter(torch.randn(3, 5))
    alpha = nn.Parameter(torch.randn(5))
    x = torch.randn(7, 4)

    def loss():
        h = torch.tanh(x @ w1.t()) * torch.softmax(alpha, 0)
        return (h @ w2.t()).pow(2).mean() + (alpha * w1.sum(1)).pow(2).sum()

    v = [torch.randn_like(w1), torch.randn_like(w2)]
    gw = torch.autograd.grad(loss(), [w1, w2], create_graph=True)
    exact = torch.autograd.grad(sum((g * t).sum() for g, t in zip(gw, v)), [alpha])[0]
    approx = finite_difference_hvp(loss, [w1, w2], [alpha], v, r=1e-3)[0]
    assert torch.allclose(approx, exact, rtol=1e-2, atol=1e-3)
    gw2 = torch.autograd.grad(loss(), [w1, w2], create_graph=True)
    assert torch.allclose(gw2[0], gw[0], atol=1e-5)  # the weights were restored after the probes


def test_size_penalty_drives_expected_size_down_and_derivation_meets_the_budget(tiny_cfg):
    budget = Budget(avg_bits=2.5)
    model, sets, step = _setup(tiny_cfg, size_weight=5.0, budget=budget, steps=12)
    start = expected_size(model, Scope.ENCODER).avg_bits.item()
    logs = {}
    for i, batch in enumerate(_batches(12)):
        logs = step(batch, i)
    end = expected_size(model, Scope.ENCODER).avg_bits.item()
    assert end < start and abs(end - 2.5) < abs(start - 2.5)
    assert {"loss/weights", "loss/arch_task", "loss/size", "size/expected_mb", "temperature"} <= set(logs)
    arch, report = derive(model, budget)
    assert budget.fits(arch)


def test_second_order_step_runs_and_restores_weights(tiny_cfg):
    model, sets, step = _setup(tiny_cfg, second_order=True)
    w0, a0 = _snapshot(sets.weights), _snapshot(sets.arch)
    step.arch_step(next(step.arch_batches), _batches()[0])
    assert all(torch.allclose(p, b, atol=1e-6) for p, b in zip(sets.weights, w0))
    assert all(_changed(sets.arch, a0))


def _arch_grads(step, sets, arch_batch, train_batch):
    step.model.eval()  # no dropout: the two gradients see the same network
    step.arch_gradients(arch_batch, train_batch)
    return torch.cat([p.grad.flatten() for p in sets.arch])


def test_the_unrolled_gradient_tends_to_the_first_order_one_as_xi_goes_to_zero(tiny_cfg):
    arch_batch, train_batch = _batches(seed=1)[0], _batches()[0]
    model, sets, first = _setup(tiny_cfg)
    w0 = _snapshot(sets.weights)
    g1 = _arch_grads(first, sets, arch_batch, train_batch)
    _, _, unrolled = _setup(tiny_cfg, second_order=True, weight_lr=1e-3)
    assert unrolled.xi == 1e-3  # by default the weights' lr, as DARTS
    unrolled.model, unrolled.weights, unrolled.upper = model, sets.weights, sets.arch + sets.scales  # same network
    unrolled.xi = 1e-9
    g_small = _arch_grads(unrolled, sets, arch_batch, train_batch)
    assert torch.allclose(g_small, g1, rtol=1e-3, atol=1e-7)
    unrolled.xi = 10.0
    g_large = _arch_grads(unrolled, sets, arch_batch, train_batch)
    assert (g_large - g1).norm() > 0.05 * g1.norm()
    assert all(torch.allclose(p, b, atol=1e-6) for p, b in zip(sets.weights, w0))  # the virtual step is undone


def test_the_default_xi_is_the_weights_base_lr_even_under_a_warmup(tiny_cfg):
    from search.loop import linear_warmup

    model, sets, _ = _setup(tiny_cfg)
    opt = torch.optim.AdamW(sets.weights, lr=3e-4)
    linear_warmup(opt, 10, 0.5)  # the optimiser's lr is 0 until the warmup starts
    assert opt.param_groups[0]["lr"] == 0
    step = BilevelStep(model, sets.weights, sets.arch, opt, [], Endless(_batches()), SizeTerm(1.0, None), second_order=True)
    assert step.xi == 3e-4


def test_temperature_mass_and_group_lasso(tiny_cfg):
    assert temperature(0, 10, 2.0, 0.5) == 2.0 and abs(temperature(9, 10, 2.0, 0.5) - 0.5) < 1e-9
    model, _, _ = _setup(tiny_cfg)
    mass = probability_mass(model)
    overall = {k: v for k, v in mass.items() if k.count("/") == 1}  # mass/<bits>; per site: mass/<site>/<bits>
    assert sorted(overall) == [f"mass/{b}" for b in sorted(SPACE.w_bits)] and abs(sum(overall.values()) - 1) < 1e-6
    # the sum of the groups' L2 norms (groups of whole output rows) over the sites that can prune
    prunable = [site for _, site in sites(model) if 0 in site.wq.cands.bits]
    assert 0 < len(prunable) < len(list(sites(model)))  # the 8-bit-only embeddings are left out
    expected = sum(float(site.weight.detach().reshape(site.grouping.n_groups, -1).norm(dim=1).sum())
                   for site in prunable)
    assert group_lasso(model).item() == pytest.approx(expected, rel=1e-6)


def test_the_weight_step_shrinks_prunable_groups_by_the_group_lasso_and_logs_it(tiny_cfg):
    norms = {}
    for weight in (0.0, 0.5):
        model, _, step = _setup(tiny_cfg, weight_lr=1e-2)
        step.group_lasso_weight = weight
        logs = step.weight_step(_batches()[0])
        assert ("loss/group_lasso" in logs) is (weight > 0)
        norms[weight] = group_lasso(model).item()
        if weight:
            assert logs["loss/group_lasso"] > norms[weight]  # logged before the step that shrank it
    assert norms[0.5] < norms[0.0]


def test_the_step_trains_in_training_mode_with_gumbel_noise(tiny_cfg):
    from supernet import Relaxation

    model, sets, step = _setup(tiny_cfg)
    step.relaxation = Relaxation.GUMBEL_HARD
    model.eval()  # as from_pretrained leaves it
    step(_batches(1)[0], 0)
    assert model.training
    site = next(s for _, s in __import__("supernet").sites(model) if s.wq.alpha is not None)
    assert set(site.wq.probs().unique().tolist()) <= {0.0, 1.0}  # hard Gumbel samples, not softmax


def test_a_bit_operations_target_pulls_expected_bitops_down_and_is_free_below_it(tiny_cfg):
    from supernet import expected_bitops

    torch.manual_seed(0)
    model = to_supernet(BertForSequenceClassification(tiny_cfg), SPACE).train()
    start = expected_bitops(model).item() / 1e9
    below = SizeTerm(0.0, None, bitops_weight=1.0, bitops_target=start * 2)
    loss, logs = below(model)
    assert loss.item() == 0 and logs["loss/bitops"] == 0  # under the target: no penalty
    term = SizeTerm(0.0, None, bitops_weight=1.0, bitops_target=start / 2)
    sets = param_sets(model)
    opt = torch.optim.SGD(sets.arch, lr=5.0)
    for _ in range(20):
        opt.zero_grad()
        loss, logs = term(model)
        loss.backward()
        opt.step()
    assert logs["size/expected_gbops"] < 0.8 * start


def _searched_sites(model):
    return [s for _, s in sites(model) if s.wq.searchable]


def _as_used(site, grad):
    """The gradient of the weight the network uses: the latent weight's, divided by each group's keep probability."""
    keep = site.wq.keep_prob(site.wq.mean_probs().detach())
    return grad / site.from_groups(keep[:, None].expand(site.to_groups(grad).shape).contiguous())


def test_the_curvature_term_folds_the_architecture_batch_fisher_and_moves_only_logits_and_scales(tiny_cfg):
    for second_order in (False, True):
        model, sets, step = _setup(tiny_cfg, curvature=1.0, second_order=second_order)
        batch = next(Endless(_batches(seed=1)))  # the batch the architecture step draws first
        site = _searched_sites(model)[0]
        grad = _as_used(site, torch.autograd.grad(model(**batch).loss, site.weight)[0]) if not second_order else None
        w0, a0 = _snapshot(sets.weights), _snapshot(sets.arch)
        step.arch_step(next(step.arch_batches), _batches()[0])
        curv = step.curvature
        assert curv.updates == 1 and all(p.grad is None for p in curv.params)
        assert all(torch.allclose(p, b, atol=1e-6) for p, b in zip(sets.weights, w0))
        assert all(_changed(sets.arch, a0))
        assert all(f.sum() > 0 for f in curv.fisher)
        if grad is not None:  # B (1 - decay) g^2 after one batch of B = 4 examples
            assert torch.allclose(curv.fisher[0], 4 * 0.5 * grad.pow(2), rtol=1e-3, atol=1e-18)
    # after a weight step, whose gradients stay on the weights, the next batch folds in its own gradient alone
    model, sets, step = _setup(tiny_cfg, curvature=1.0)
    arch = Endless(_batches(seed=1))
    step(_batches()[0], 0)  # an architecture step, then a weight step
    next(arch)
    site = _searched_sites(model)[0]
    assert site.weight.grad is not None
    before = step.curvature.fisher[0].clone()
    grad = _as_used(site, torch.autograd.grad(model(**next(arch)).loss, site.weight)[0])
    step.arch_step(next(step.arch_batches), _batches()[0])
    assert torch.allclose(step.curvature.fisher[0], 0.5 * before + 4 * 0.5 * grad.pow(2), rtol=1e-3, atol=1e-18)


def test_the_curvature_term_is_half_the_fisher_weighted_squared_error_of_every_candidate(tiny_cfg):
    from supernet import lsq_fake_quant, qrange, QuantMode

    torch.manual_seed(0)
    model = to_supernet(BertForSequenceClassification(tiny_cfg), SPACE).train()
    term = CurvatureTerm(model, weight=3.0, decay=0.9)
    assert term()[0].item() == 0  # no gradient seen yet: no price
    grads = [torch.rand_like(p) for p in term.params]
    term.update(grads, batch_size=2)
    total = 0.0
    for site, g in zip(term.sites, grads):
        w = site.to_groups(site.weight.detach())
        fisher = site.to_groups(2 * _as_used(site, g).pow(2))  # unbiased: the one batch's B g^2
        p = torch.softmax(site.wq.alpha.detach() / site.wq.tau, -1)
        for k, b in enumerate(site.wq.cands.bits):
            if b == 0:
                q = torch.zeros_like(w)
            else:
                qmin, qmax = qrange(b, QuantMode.SYMMETRIC)
                q = lsq_fake_quant(w, site.wq.step.detach()[:, k : k + 1], qmin, qmax)
            total += (p[:, k] * 0.5 * (fisher * (q - w).pow(2)).sum(1)).sum().item()
    value, logs = term()
    assert abs(value.item() - 3.0 * total) < 1e-4 * abs(3.0 * total)
    assert abs(logs["loss/curvature"] - total) < 1e-4 * total


def test_the_curvature_price_pushes_every_group_off_pruning_and_toward_its_finest_candidate(tiny_cfg):
    # the gradient of sum_k p_k Omega_k on logit k is p_k (Omega_k - mean Omega) / tau: pruning loses the whole
    # weight (the largest Omega), 8 bits the least; the size penalty is what pushes the other way
    torch.manual_seed(0)
    model = to_supernet(BertForSequenceClassification(tiny_cfg), SPACE).train()
    term = CurvatureTerm(model, weight=1.0)
    term.update([torch.rand_like(p) for p in term.params], batch_size=4)
    term()[0].backward()
    for site in term.sites:
        grad, bits = site.wq.alpha.grad, site.wq.cands.bits
        assert (grad[:, bits.index(0)] > 0).all() and (grad[:, bits.index(8)] < 0).all()
        assert (grad.argmin(-1) == bits.index(8)).all() and (grad.argmax(-1) == bits.index(0)).all()


def test_the_size_term_and_derivation_price_steps_at_space_scale_bits(tiny_cfg):
    # 16-bit steps (space.scale_bits=16) make every group cheaper: a budget in MiB holds more bits, and the
    # derived architecture must be the one the penalty priced, written with its step width
    torch.manual_seed(0)
    model = to_supernet(BertForSequenceClassification(tiny_cfg), SPACE)
    fp32_steps, _ = SizeTerm(1.0, None, scope=Scope.ENCODER)(model)
    fp16_steps, logs = SizeTerm(1.0, None, scope=Scope.ENCODER, scale_bits=16)(model)
    assert fp16_steps.item() == pytest.approx(expected_size(model, Scope.ENCODER, 16).mb.item())
    assert fp16_steps.item() < fp32_steps.item()
    mb = expected_size(model, Scope.ENCODER, 16).mb.item()
    arch, report = derive(model, Budget(mb=mb), scale_bits=16)
    assert arch.scale_bits == 16 and arch.size_mb("encoder") <= mb * (1 + 1e-9)
    assert report.final == pytest.approx(arch.size_mb("encoder"))
    assert derive(model, Budget(mb=mb))[0].scale_bits == 32


def test_the_architecture_batches_are_read_by_position_across_epochs_as_a_new_process_would():
    # a resumed search (a new process) starts reading at batch n of an epoch >= 1: it must get the batches that
    # an uninterrupted one gets there, and those are the plain endless loop's (earlier benchmarks used it)
    from torch.utils.data import DataLoader

    from search.config import MixedPrecision
    from search.loop import make_accelerator

    def prepared():
        accelerator = make_accelerator(MixedPrecision.fp32, 42)
        rows = [{"x": torch.tensor([i])} for i in range(10)]  # 4 batches per epoch, the last one short
        loader = DataLoader(rows, batch_size=3, shuffle=True, generator=torch.Generator().manual_seed(43))
        return Endless(accelerator.prepare(loader), accelerator.skip_first_batches)

    def ids(batch):
        return batch["x"].flatten().tolist()

    loader = prepared().loader
    plain = [ids(b) for _, b in zip(range(10), (b for _ in range(3) for b in loader))]
    assert [ids(b) for _, b in zip(range(10), prepared())] == plain
    assert plain[:4] != plain[4:8]  # each epoch its own order
    for start in (5, 4, 9):
        batches = prepared()
        assert [ids(batches.at(i)) for i in range(start, 10)] == plain[start:]


def test_the_finite_difference_sees_the_same_dropout_at_both_points():
    # each point drew its own mask: the difference was noise, larger than the curvature it estimates
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(6, 5))
    alpha = nn.Parameter(torch.randn(6))
    x = torch.randn(16, 5)

    def loss(p: float):
        return lambda: (nn.functional.dropout(torch.tanh(x @ w.t()), p, training=True) * torch.softmax(alpha, 0)).pow(2).sum()

    v = [torch.randn_like(w)]
    clean = finite_difference_hvp(loss(0.0), [w], [alpha], v)[0]
    twice = [finite_difference_hvp(loss(0.5), [w], [alpha], v)[0] for _ in range(2)]
    # another mask each call, so another estimate; but one of the size of the clean one, not of the mask's noise
    assert all(h.norm() < 5 * clean.norm() for h in twice)
    assert not torch.equal(twice[0], twice[1])


def test_the_gumbel_size_price_is_the_mean_of_the_samples_at_any_temperature():
    # it priced softmax(alpha / tau): at tau 0.2, 3.94 expected bits where the hard samples average 3.33
    from supernet import CandidateSet, InitRule, MixedLinear, Relaxation, SiteKind, make_grouping, set_relaxation

    site = MixedLinear(nn.Linear(4, 1), SiteKind.ENCODER, CandidateSet((2, 4)), make_grouping("s", 1, 1), None,
                       InitRule.MSE).train()
    with torch.no_grad():
        site.wq.alpha.copy_(torch.tensor([[0.0, float(torch.log(torch.tensor(2.0)))]]))
    set_relaxation(site, Relaxation.GUMBEL_HARD, 0.2)
    torch.manual_seed(0)
    drawn = torch.stack([site.wq.probs()[0] for _ in range(4000)]).mean(0)
    assert torch.allclose(site.wq.mean_probs()[0], torch.tensor([1 / 3, 2 / 3]), atol=1e-6)
    assert torch.allclose(drawn, site.wq.mean_probs()[0], atol=0.03)


def test_the_weight_step_clips_unscaled_gradients(tiny_cfg):
    # under fp16 the loss is scaled (x 65536): clipping before unscaling left each weight ~1e-9 of gradient
    scale = 2.0 ** 16
    runs = []
    for scaled in (False, True):
        model, sets, step = _setup(tiny_cfg)
        if scaled:
            step.backward = lambda loss, **kw: (loss * scale).backward(**kw)
            step.unscale = lambda: [w.grad.div_(scale) for w in sets.weights if w.grad is not None]
        step.weight_step(_batches(1)[0])
        runs.append(_snapshot(sets.weights))
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(*runs))


def test_the_curvature_price_of_pruning_does_not_fade_as_the_group_is_pruned():
    # the latent weight's gradient is (1 - p_pruned) times the used weight's: its Fisher fell to 0 as p_pruned -> 1.
    # A loss linear in the used weight has the same gradient there at any p_pruned, and so must the Fisher
    from supernet import CandidateSet, InitRule, MixedLinear, SiteKind, make_grouping

    torch.manual_seed(0)
    site = MixedLinear(nn.Linear(6, 4), SiteKind.ENCODER, CandidateSet((0, 8)), make_grouping("s", 4, 2), None,
                       InitRule.MSE).train()
    x, c = torch.randn(5, 6), torch.randn(5, 4)
    fishers = []
    for pruned in (0.0, 0.9, 0.99):
        with torch.no_grad():
            site.wq.alpha.copy_(torch.tensor([[float(torch.logit(torch.tensor(pruned))) if pruned else -30.0, 0.0]] * 2))
        term = CurvatureTerm(site, weight=1.0, decay=0.0)
        term.update(torch.autograd.grad((c * site(x)).sum(), term.params), batch_size=1)
        fishers.append(term.fisher[0])
    assert all(torch.allclose(f, fishers[0], rtol=1e-3) for f in fishers[1:])  # before: 0.01 and 1e-4 of it
