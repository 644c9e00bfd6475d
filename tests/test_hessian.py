"""Hessian-vector products, Hutchinson traces and power iteration against explicit Hessians: exact on a
diagonal quadratic, unbiased within the standard error on a dense one, groups that add up to their
site and to the whole model, a top eigenvalue equal to eigvalsh's."""
import io
import sys

import pytest
import torch
from transformers import BertForSequenceClassification

from conftest import tiny_config
from search.hessian import Hessian, hutchinson, rademacher, top_eigenvalues


def _groups(g: int):
    return lambda t: t.reshape(g, -1)  # [n] or [out, in] -> [G, n/G]


def test_hutchinson_is_exact_on_a_diagonal_quadratic():
    torch.manual_seed(0)
    d1, d2 = torch.randn(12, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)
    w1 = torch.randn(12, dtype=torch.float64, requires_grad=True)
    w2 = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    loss = lambda: 0.5 * (d1 * w1**2).sum() + 0.5 * (d2 * w2**2).sum()  # noqa: E731
    est = hutchinson(Hessian([loss], [w1, w2]), [_groups(3), _groups(3)], max_probes=5, tol=0.0)
    assert est.probes == 5  # tol 0 never stops early
    # Rademacher v: v^T D v = trace(D) on every probe, so every sample is exact and the error is zero
    for samples, d in zip(est.samples, (d1, d2)):
        assert torch.allclose(samples, d.reshape(3, -1).sum(1).expand(5, 3), rtol=1e-12, atol=1e-12)
    assert all(torch.all(s == 0) for s in est.stderr())


def test_hutchinson_is_unbiased_on_a_dense_quadratic():
    g = torch.Generator().manual_seed(1)
    b = torch.randn(12, 12, generator=g, dtype=torch.float64)
    a = b + b.t()  # symmetric, indefinite
    w = torch.randn(12, dtype=torch.float64, requires_grad=True)
    est = hutchinson(Hessian([lambda: 0.5 * w @ a @ w], [w]), [_groups(3)], max_probes=300, tol=0.0, seed=3)
    truth = a.diagonal().reshape(3, 4).sum(1)
    mean, err = est.mean()[0], est.stderr()[0]
    assert torch.all(err > 0)
    assert torch.all((mean - truth).abs() <= 4 * err), (mean, truth, err)


def test_hutchinson_stops_at_the_tolerance():
    w = torch.randn(8, dtype=torch.float64, requires_grad=True)
    a = torch.diag(torch.linspace(1, 2, 8, dtype=torch.float64))
    est = hutchinson(Hessian([lambda: 0.5 * w @ a @ w], [w]), [_groups(2)], max_probes=50, tol=1e-6)
    assert est.probes == 2 and est.changes == [0.0]  # exact from the first probe: no change, stop


def test_a_long_trace_reports_its_progress(caplog):
    w = torch.ones(3, requires_grad=True)
    with caplog.at_level("INFO", logger="search.hessian"):
        hutchinson(Hessian([lambda: (w**2).sum()], [w]), [_groups(3)], max_probes=20, tol=0.0)
    assert [r.getMessage().split(":")[0] for r in caplog.records if r.levelname == "INFO"] == [
        "hutchinson probe 10/20", "hutchinson probe 20/20"]


def test_a_trace_on_a_terminal_shows_a_bar_over_every_product(monkeypatch):
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    w = torch.ones(3, requires_grad=True)
    hessian = Hessian([lambda: (w**2).sum(), lambda: (w**4).sum()], [w])
    for progress, shown in ((True, "hutchinson: 100%"), (False, "")):
        monkeypatch.setattr(sys, "stderr", Terminal())
        hutchinson(hessian, [_groups(3)], max_probes=4, tol=0.0, progress=progress)
        out = sys.stderr.getvalue()
        assert (shown in out and "8/8" in out) if progress else out == ""
    monkeypatch.setattr(sys, "stderr", Terminal())  # the activation traces name their bar
    hutchinson(hessian, [_groups(3)], max_probes=2, tol=0.0, progress=True, desc="activation traces, batch 1")
    assert "activation traces, batch 1: 100%" in sys.stderr.getvalue()


def test_top_eigenvalues_report_their_progress(monkeypatch, caplog):
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    ws = [torch.ones(3, requires_grad=True) for _ in range(10)]
    hessian = Hessian([lambda: sum((w**2).sum() for w in ws)], ws)
    for progress in (True, False):
        monkeypatch.setattr(sys, "stderr", Terminal())
        with caplog.at_level("INFO", logger="search.hessian"):
            top_eigenvalues(hessian, max_iter=5, progress=progress)
        out = sys.stderr.getvalue()
        assert ("top eigenvalue: 100%" in out and "10/10" in out) if progress else out == ""
    assert [r.getMessage() for r in caplog.records if r.levelname == "INFO"][-1] == \
        "top eigenvalue of site 10/10: 2 power iterations"


def test_group_traces_add_up_to_the_site_and_the_model():
    torch.manual_seed(0)
    model = BertForSequenceClassification(tiny_config(num_hidden_layers=1)).double().eval()
    model.set_attn_implementation("eager")  # fused attention kernels may have no double backward
    ids = torch.randint(1, 99, (2, 5))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.tensor([0, 1])}
    params = [model.bert.encoder.layer[0].attention.self.query.weight, model.bert.embeddings.word_embeddings.weight]
    hessian = Hessian([lambda: model(**batch).loss], params)
    emb = lambda g: (lambda t: t.t().reshape(g, -1))  # noqa: E731  [V, D] -> [D, V] -> [G, D/G * V]
    grouped = hutchinson(hessian, [_groups(4), emb(4)], max_probes=3, tol=0.0, seed=7)
    whole = hutchinson(hessian, [_groups(1), emb(1)], max_probes=3, tol=0.0, seed=7)
    for g, w in zip(grouped.samples, whole.samples):  # same probes: the groups add up to the site
        assert torch.allclose(g.sum(1), w[:, 0], rtol=1e-9, atol=1e-12)
    gen = torch.Generator().manual_seed(7)  # the model's v^T H v for the very same probes
    for probe in range(3):
        v = [rademacher(p, gen) for p in params]
        total = sum(float((vi * hv).sum()) for vi, hv in zip(v, hessian.product(v)))
        assert sum(float(s[probe].sum()) for s in grouped.samples) == pytest.approx(total, rel=1e-9, abs=1e-12)


def test_several_batches_average_their_hessians():
    w = torch.randn(5, dtype=torch.float64, requires_grad=True)
    a1, a2 = torch.diag(torch.arange(1.0, 6.0, dtype=torch.float64)), torch.eye(5, dtype=torch.float64) * 3
    v = [torch.randn(5, dtype=torch.float64)]
    hv = Hessian([lambda: 0.5 * w @ a1 @ w + (w**3).sum(), lambda: 0.5 * w @ a2 @ w], [w]).product(v)[0]
    assert torch.allclose(hv, ((a1 + torch.diag(6 * w.detach())) @ v[0] + a2 @ v[0]) / 2)


def test_several_batches_build_each_graph_once_and_estimate_the_mean_hessians_trace():
    g = torch.Generator().manual_seed(5)
    mats = []
    for _ in range(3):
        b = torch.randn(12, 12, generator=g, dtype=torch.float64)
        mats.append(b + b.t())  # a different indefinite Hessian per batch
    w = torch.randn(12, dtype=torch.float64, requires_grad=True)
    calls = [0, 0, 0]

    def loss_of(i):
        def loss():
            calls[i] += 1
            return 0.5 * w @ mats[i] @ w
        return loss

    est = hutchinson(Hessian([loss_of(i) for i in range(3)], [w]), [_groups(3)], max_probes=400, tol=0.0, seed=2)
    assert calls == [1, 1, 1]  # one gradient graph per batch serves all 400 of its probes
    assert est.probes == 400 and est.samples[0].shape == (400, 3) and len(est.changes) == 399
    truth = (sum(mats) / 3).diagonal().reshape(3, 4).sum(1)
    mean, err = est.mean()[0], est.stderr()[0]
    assert torch.all(err > 0) and torch.all((mean - truth).abs() <= 4 * err), (mean, truth, err)
    # diagonal Hessians: every sample is exact, batch by batch, so the mean of their traces comes out exactly
    d = [torch.randn(12, generator=g, dtype=torch.float64) for _ in range(2)]
    est = hutchinson(Hessian([lambda k=k: 0.5 * (d[k] * w**2).sum() for k in range(2)], [w]), [_groups(3)],
                     max_probes=50, tol=1e-6)
    assert est.probes == 2  # the first batch's convergence sets the number of probes for all
    assert torch.allclose(est.mean()[0], ((d[0] + d[1]) / 2).reshape(3, 4).sum(1), rtol=1e-12, atol=1e-12)


def test_top_eigenvalue_matches_the_explicit_hessian():
    torch.manual_seed(0)
    x, y = torch.randn(16, 4, dtype=torch.float64), torch.randn(16, 2, dtype=torch.float64)
    w1 = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    w2 = torch.randn(2, 5, dtype=torch.float64, requires_grad=True)

    def loss_of(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return ((torch.tanh(x @ a.t()) @ b.t() - y) ** 2).mean()

    found = top_eigenvalues(Hessian([lambda: loss_of(w1, w2)], [w1, w2]), max_iter=3000, tol=1e-12)
    blocks = torch.autograd.functional.hessian(loss_of, (w1.detach(), w2.detach()))
    for i, (value, iterations) in enumerate(found):
        n = (w1, w2)[i].numel()
        eig = torch.linalg.eigvalsh(blocks[i][i].reshape(n, n))
        top = eig[eig.abs().argmax()]
        assert value == pytest.approx(float(top), rel=1e-6), (i, eig)
        assert iterations < 3000
