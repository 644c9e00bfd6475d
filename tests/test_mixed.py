"""Mixed sites: one-hot == fixed, weight mixing == output mixing, pruning, embeddings, groups, state."""
import pytest
import torch
from torch import nn

from supernet import CandidateSet, InitRule, MixedEmbedding, MixedLinear, Relaxation, SiteKind, make_grouping, set_relaxation
from supernet import SearchSpace
from supernet.groups import PER_ROW
from supernet.packing import packed_nbytes
from supernet.quantizers import QuantMode, half, init_step, qrange

W_BITS = (0, 2, 4, 8)


def _linear(out=12, inp=7, groups=4, a_bits=(8,), seed=0):
    torch.manual_seed(seed)
    lin = nn.Linear(inp, out)
    acands = CandidateSet(a_bits) if a_bits else None
    return MixedLinear(lin, SiteKind.ENCODER, CandidateSet(W_BITS), make_grouping("s", out, groups), acands, InitRule.MSE)


def test_groups_must_divide_rows():
    with pytest.raises(ValueError, match="do not divide its 12 output features"):
        make_grouping("enc.query", 12, 5)
    assert make_grouping("x", 12, PER_ROW).n_groups == 12


def test_groups_that_span_heads_are_allowed_and_logged(caplog):
    with caplog.at_level("WARNING"):
        g = make_grouping("span.q", 72, 3, heads=8)  # groups of 24 rows, heads of 9 (warned once per shape)
    assert not g.head_aligned and g.size == 24
    assert "span.q (and sites like it): 3 groups do not nest in 8 heads (groups of 24 rows, heads of 9)" in caplog.text
    assert (g.group_of_feature() == torch.arange(72) // 24).all()


@pytest.mark.parametrize("n_groups", [4, 8, 16, 2, 1])
def test_qkv_groups_nest_in_heads(n_groups):
    g = make_grouping("q", 32, n_groups, heads=4)  # heads of 8 rows
    assert g.head_aligned
    head_of_row = torch.arange(32) // 8
    group_of_row = g.group_of_feature()
    for grp in range(n_groups):
        heads = head_of_row[group_of_row == grp].unique()
        rows_per_head_in_group = [(head_of_row[group_of_row == grp] == h).sum().item() for h in heads]
        # either the group lies inside one head, or it holds whole heads
        assert len(heads) == 1 or all(r == 8 for r in rows_per_head_in_group)


def test_one_hot_alpha_equals_fixed_candidate():
    site = _linear()
    x = torch.randn(2, 5, 7)
    site.aq(x)  # initialise the activation step once, for both runs
    choice = torch.tensor([1, 3, 0, 2])
    with torch.no_grad():
        site.wq.alpha.fill_(0).scatter_(1, choice[:, None], 1e4)
    soft = site(x)
    site.wq.fix([W_BITS[i] for i in choice])
    assert torch.equal(site(x), soft)


def test_weight_mixing_equals_output_mixing():
    site = _linear(a_bits=None)
    x = torch.randn(3, 7)
    with torch.no_grad():
        site.wq.alpha.copy_(torch.randn(4, 4))
    probs = torch.softmax(site.wq.alpha, -1).detach()  # [G, K]
    mixed = site(x)
    outs = []
    for b in W_BITS:
        site.wq.fix([b] * 4)
        outs.append(site(x))
    site.wq.unfix()
    rows = site.grouping.group_of_feature()  # [out]
    expected = sum(probs[rows, k] * outs[k] for k in range(4))
    assert torch.allclose(mixed, expected, atol=1e-5)


def test_pruned_group_yields_zero_output_rows():
    site = _linear()
    site.wq.fix([4, 0, 8, 2])
    y = site(torch.randn(2, 3, 7))
    assert torch.equal(y[..., 3:6], torch.zeros_like(y[..., 3:6]))
    assert y[..., :3].abs().sum() > 0


def test_gumbel_hard_gives_one_hot_probs_in_training():
    site = _linear()
    set_relaxation(site, Relaxation.GUMBEL_HARD, 0.5)
    site.train()
    p = site.wq.probs()
    assert torch.equal(p.sum(-1), torch.ones(4)) and set(p.unique().tolist()) <= {0.0, 1.0}
    site.eval()
    assert torch.allclose(site.wq.probs(), torch.full((4, 4), 0.25))


def test_embedding_gather_then_quantize_equals_quantized_table():
    torch.manual_seed(0)
    emb = nn.Embedding(20, 8, padding_idx=0)
    site = MixedEmbedding(emb, CandidateSet((0, 2, 4)), make_grouping("e", 8, 4), InitRule.MSE)
    with torch.no_grad():
        site.wq.alpha.copy_(torch.randn(4, 3))
    ids = torch.randint(0, 20, (3, 5))
    table, _ = site.quantized_weight()
    assert torch.allclose(site(ids), table[ids], atol=1e-6)
    site.wq.fix([0, 2, 4, 2])
    assert torch.equal(site(ids)[..., :2], torch.zeros(3, 5, 2))


def test_fixed_state_survives_state_dict_round_trip():
    a, b = _linear(seed=0), _linear(seed=1)
    a.aq(torch.randn(4, 7))
    a.wq.fix([2, 4, 0, 8])
    b.load_state_dict(a.state_dict())
    assert b.wq.fixed and b.wq.chosen_bits() == (2, 4, 0, 8)
    assert b.aq._initialized
    x = torch.randn(2, 7)
    assert torch.equal(a(x), b(x))


def test_gradients_reach_weights_logits_and_steps():
    site = _linear()
    site(torch.randn(4, 7)).pow(2).sum().backward()
    for p in (site.weight, site.bias, site.wq.alpha, site.wq.step, site.aq.step):
        assert p.grad is not None and p.grad.abs().sum() > 0


def test_asymmetric_activations_learn_an_offset():
    from supernet import QuantMode

    torch.manual_seed(0)
    lin = nn.Linear(6, 4)
    site = MixedLinear(lin, SiteKind.ENCODER, CandidateSet((4,)), make_grouping("s", 4, 1),
                       CandidateSet((4, 8), QuantMode.ASYMMETRIC), InitRule.MSE)
    x = torch.rand(5, 6) + 2.0  # all positive, far from zero
    site(x).sum().backward()
    assert site.aq.alpha.grad is not None
    start = site.aq.offset.detach().clone()
    assert (start > 1.5).all()  # the first batch put every candidate's grid onto the data
    # data moved above the grid: gradient steps on the offset alone follow it
    opt = torch.optim.SGD([site.aq.offset], lr=0.5)
    for _ in range(20):
        opt.zero_grad()
        shifted = x + 3.0  # a new tensor each step: the shared quantizer reuses results only for the same one
        (site.aq(shifted) - shifted).pow(2).mean().backward()
        assert site.aq.offset.grad.abs().min() > 0
        opt.step()
    assert (site.aq.offset.detach() > start + 0.25).all()  # the 4-bit grid clips more, so it moves further


def test_shared_input_quantizer_reuses_its_result_only_for_the_same_unchanged_tensor():
    site = _linear()
    aq = site.aq
    x = torch.randn(2, 7)
    y1 = aq(x)
    assert aq(x) is y1
    assert aq(x.clone()) is not y1 and torch.equal(aq(x.clone()), y1)
    x.mul_(2)  # in place: the cached result is stale
    assert not torch.equal(aq(x), y1)
    del x, y1  # y1's graph holds x
    import gc

    gc.collect()
    assert aq._last[0]() is None  # the cache never keeps a step's tensors alive


def test_a_shared_input_quantizer_recomputes_when_its_own_state_changes():
    # the cache of the last input's result (Q, K and V read one tensor) keyed only on the input: fixing the
    # quantizer to another width, or an optimiser step on its steps, returned the old result
    site = _linear(out=8, inp=16, groups=2, a_bits=(2, 8))
    x = torch.randn(3, 16, generator=torch.Generator().manual_seed(0))
    site.aq.fix([8])
    y8 = site(x)
    site.aq.fix([2])
    y2 = site(x)
    assert not torch.equal(y8, y2) and torch.equal(y2, site(x.clone()))
    with torch.no_grad():
        site.aq.step.mul_(2)  # what an optimiser step does, in place
    assert torch.equal(site(x), site(x.clone())) and not torch.equal(site(x), y2)


@pytest.mark.parametrize("mode, enum", [("symmetric", QuantMode.SYMMETRIC), ("midrise", QuantMode.MIDRISE),
                                        ("unsigned", QuantMode.UNSIGNED)])
def test_grids_named_by_strings_are_the_grids_of_their_enums(mode, enum):
    # a string compared unequal to every enum member and fell through to the unsigned grid
    assert qrange(4, mode) == qrange(4, enum) and half(mode) == half(enum)
    assert CandidateSet((2, 4), mode) == CandidateSet((2, 4), enum)
    x = torch.randn(2, 64, generator=torch.Generator().manual_seed(1))
    assert torch.equal(init_step(x, 4, mode)[0], init_step(x, 4, enum)[0])


@pytest.mark.parametrize("kwargs, message", [
    (dict(w_bits=8), "space.w_bits=8 is not a list of bit-widths; write e.g. \\[8\\]"),  # was a TypeError
    (dict(scale_bits=16.0), "space.scale_bits=16.0 is invalid"),
    (dict(w_bits=[0]), "space.w_bits=\\[0\\] prunes every group"),
    (dict(head_bits=[0]), "space.head_bits=\\[0\\] prunes every group"),
    (dict(embedding_bits=[0]), "space.embedding_bits=\\[0\\] prunes every group"),
])
def test_a_space_that_cannot_be_meant_is_refused_in_one_line(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SearchSpace(**kwargs)


def test_fixing_and_relaxing_refuse_values_they_would_silently_change():
    site = _linear()
    with pytest.raises(ValueError, match="bit-widths are whole numbers, got \\[2.5\\]"):
        site.wq.fix([2.5, 2, 2, 2])  # int() made it 2
    with pytest.raises(ValueError, match="temperature must be a positive number, got nan"):
        set_relaxation(site, Relaxation.SOFTMAX, float("nan"))  # every probability became NaN
    with pytest.raises(ValueError, match="-8 codes"):
        packed_nbytes(-8, 2)
