"""Cost model, Architecture and parameter sets: exact sizes by hand, expected == exact, JSON, disjoint sets."""
import dataclasses
import json
import os
import re

import pytest
import torch
from transformers import BertForSequenceClassification

from supernet import (
    Architecture,
    QuantMode,
    SearchSpace,
    SiteArch,
    SiteKind,
    expected_bitops,
    expected_size,
    other_fp32_params,
    param_sets,
    sites,
    to_supernet,
)

SPACE = SearchSpace(w_bits=[0, 2, 4, 8], groups=4, a_bits=[4, 8], embedding_bits=[0, 4, 8], embedding_groups=4, head_bits=[8, 32])


def _supernet(cfg, space=SPACE):
    torch.manual_seed(0)
    return to_supernet(BertForSequenceClassification(cfg), space)


def _random_one_hot(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if getattr(module, "alpha", None) is not None and hasattr(module, "choice"):
                k = torch.randint(0, module.alpha.shape[1], (module.alpha.shape[0],), generator=g)
                module.alpha.fill_(0).scatter_(1, k[:, None], 1e4)


def test_size_by_hand_for_one_site():
    # 4 groups of 3 rows x 10 inputs = 30 weights each; bits 2, 0, 4, 8; scales fp32
    site = SiteArch(SiteKind.ENCODER, (2, 0, 4, 8), group_numel=30, rows_per_group=3, in_features=10, bias=True, a_bits=8)
    arch = Architecture((("enc", site),), other_params=100)
    weight_bits = 30 * (2 + 0 + 4 + 8)
    assert arch.size_bytes("encoder") == (weight_bits + 3 * 32) / 8  # the pruned group has no scale
    assert arch.avg_bits("encoder") == weight_bits / 120
    bias_bits = 3 * 32 * 3  # the pruned group's bias is gone too
    assert arch.size_bytes("total") == (weight_bits + 3 * 32 + bias_bits + 100 * 32) / 8
    assert arch.pruned_groups() == 1
    assert arch.bitops() == 3 * 10 * (2 + 0 + 4 + 8) * 8
    assert arch.compression_ratio("encoder") == pytest.approx(120 * 4 / arch.size_bytes("encoder"))


def test_uniform_architecture_has_exact_average_bits(tiny_cfg):
    model = _supernet(tiny_cfg)
    arch = Architecture.from_supernet(model)
    for b in (2, 4, 8):
        uni = Architecture(tuple((n, dataclasses.replace(s, bits=(b,) * len(s.bits))) for n, s in arch), arch.other_params)
        assert uni.avg_bits("encoder") == b
        assert uni.size_bytes("encoder") > uni.size("encoder").weights * b / 8  # scales cost bytes too


def test_expected_size_equals_exact_size_when_alpha_is_one_hot(tiny_cfg):
    model = _supernet(tiny_cfg)
    _random_one_hot(model)
    arch = Architecture.from_supernet(model)
    for scope in ("encoder", "total"):
        exp = expected_size(model, scope)
        assert exp.bytes.item() == pytest.approx(arch.size_bytes(scope), rel=1e-6)
        assert exp.avg_bits.item() == pytest.approx(arch.avg_bits(scope), rel=1e-6)
    assert expected_bitops(model).item() == pytest.approx(arch.bitops(), rel=1e-6)


def test_total_size_counts_every_parameter(tiny_cfg):
    model = _supernet(tiny_cfg)
    arch = Architecture.from_supernet(model)
    n_weights = sum(p.numel() for p in param_sets(model).weights)
    assert arch.size("total").weights == n_weights
    fp32 = Architecture(tuple((n, dataclasses.replace(s, bits=(32,) * len(s.bits))) for n, s in arch), arch.other_params)
    assert fp32.size_bytes("total") == n_weights * 4


def test_expected_size_is_differentiable_and_a_penalty_lowers_it(tiny_cfg):
    model = _supernet(tiny_cfg)
    arch_params = param_sets(model).arch
    opt = torch.optim.SGD(arch_params, lr=1.0)
    before = expected_size(model, "encoder").bytes.item()
    for _ in range(5):
        opt.zero_grad()
        expected_size(model, "encoder").mb.backward()
        opt.step()
    assert expected_size(model, "encoder").bytes.item() < before


def test_json_round_trip(tmp_path, tiny_cfg):
    model = _supernet(tiny_cfg)
    _random_one_hot(model, seed=3)
    arch = Architecture.from_supernet(model)
    assert Architecture.from_json(arch.to_json()) == arch
    path = arch.save(tmp_path / "run" / "architecture.json")
    assert Architecture.load(path) == arch
    d = json.loads(path.read_text())
    assert d["sites"]["bert.encoder.layer.0.attention.self.query"]["bits"] == list(arch.site("bert.encoder.layer.0.attention.self.query").bits)
    assert d["summary"]["pruned_groups"] == arch.pruned_groups()
    assert d["summary"]["encoder_bytes"] == arch.size_bytes("encoder") and d["summary"]["total_bytes"] == arch.size_bytes("total")


def test_apply_fixes_the_model_and_derive_reads_it_back(tiny_cfg):
    model = _supernet(tiny_cfg)
    _random_one_hot(model, seed=5)
    arch = Architecture.from_supernet(model)
    fresh = _supernet(tiny_cfg)
    arch.apply(fresh)
    assert all(site.wq.fixed for _, site in sites(fresh))
    assert Architecture.from_supernet(fresh) == arch


@pytest.mark.parametrize("text, match", [
    ("{not json", "not valid JSON"),
    ('{"format": "other"}', "not a bert-mpq architecture"),
    ('{"format": "bert-mpq.architecture", "version": 1, "other_fp32_params": 1, "sites": {"a": {"kind": "encoder"}}}', "site 'a' is malformed"),
    ('{"format": "bert-mpq.architecture", "version": 1, "other_fp32_params": 1, "sites": {"a": {"kind": "encoder", "bits": [3, 5, 7, 9], '
     '"group_numel": 1, "rows_per_group": 1, "in_features": 1, "bias": true}}}', "bit-width 9"),
    ('{"format": "bert-mpq.architecture", "version": 1, "other_fp32_params": 1, "w_grid": "unsigned", "sites": {"a": '
     '{"kind": "encoder", "bits": [2], "group_numel": 1, "rows_per_group": 1, "in_features": 1, "bias": true}}}', "w_grid"),
])
def test_malformed_architecture_is_a_clear_error(text, match):
    with pytest.raises(ValueError, match=match):
        Architecture.from_json(text)


@pytest.mark.parametrize("field, value, match", [
    ("bits", [2.7], "bits 2.7 is not a whole number"),  # int() would make it 2, silently
    ("bits", [True], "bits True is not a whole number"),
    ("bits", ["4"], "bits '4' is not a whole number"),
    ("bias", "false", "bias 'false' is not true or false"),  # bool() would make it true
    ("in_features", 1e400, "in_features inf is not a whole number"),
    ("a_bits", 7.5, "a_bits 7.5 is not a whole number"),
])
def test_hand_written_values_are_taken_as_written_or_refused(field, value, match):
    site = {"kind": "encoder", "bits": [2], "group_numel": 4, "rows_per_group": 1, "in_features": 4, "bias": True}
    d = {"format": "bert-mpq.architecture", "version": 1, "other_fp32_params": 1, "sites": {"a": {**site, field: value}}}
    with pytest.raises(ValueError, match=f"site 'a' is malformed .*{re.escape(match)}"):
        Architecture.from_dict(d)
    assert Architecture.from_dict({**d, "sites": {"a": {**site, "bits": [4.0]}}}).site("a").bits == (4,)


@pytest.mark.parametrize("field, value", [("in_features", 1), ("bias", False), ("rows_per_group", 3), ("kind", "embedding")])
def test_an_architecture_that_prices_a_site_otherwise_than_the_model_does_not_apply(tiny_cfg, field, value):
    # the group count and size match, so the model would take it, and report sizes it does not have
    arch = Architecture.from_supernet(_supernet(tiny_cfg))
    name = "bert.encoder.layer.0.attention.self.query"
    d = arch.to_dict()
    assert d["sites"][name][field] != value
    d["sites"][name][field] = value
    with pytest.raises(ValueError, match=f"{name}: the architecture's {field} is"):
        Architecture.from_dict(d).apply(_supernet(tiny_cfg))


def test_an_architecture_file_is_as_readable_as_any_other_file(tmp_path, tiny_cfg):
    path = Architecture.from_supernet(_supernet(tiny_cfg)).save(tmp_path / "architecture.json")
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask


def test_missing_architecture_file_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.json"):
        Architecture.load(tmp_path / "nope.json")


def test_apply_to_a_different_model_raises(tiny_cfg):
    arch = Architecture.from_supernet(_supernet(tiny_cfg))
    other = _supernet(tiny_cfg, dataclasses.replace(SPACE, groups=2))
    with pytest.raises(ValueError, match="groups"):
        arch.apply(other)


def test_the_weight_grid_is_part_of_the_architecture(tmp_path, tiny_cfg):
    """The same bits are other levels on another grid: the file records the grid, and applying it to a model
    built on another grid is an error that says which grid to convert with."""
    midrise = dataclasses.replace(SPACE, w_grid=QuantMode.MIDRISE)
    arch = Architecture.from_supernet(_supernet(tiny_cfg, midrise))
    assert arch.w_grid is QuantMode.MIDRISE
    assert Architecture.from_supernet(_supernet(tiny_cfg)).w_grid is QuantMode.SYMMETRIC
    path = arch.save(tmp_path / "architecture.json")
    assert json.loads(path.read_text())["w_grid"] == "midrise"
    assert Architecture.load(path) == arch
    arch.apply(_supernet(tiny_cfg, midrise))
    with pytest.raises(ValueError, match="space.w_grid=MIDRISE"):
        arch.apply(_supernet(tiny_cfg))
    # a file without the field (hand-written, or older) reads as "not recorded" and fits either grid
    d = json.loads(path.read_text())
    del d["w_grid"]
    unrecorded = Architecture.from_dict(d)
    assert unrecorded.w_grid is None and unrecorded.sites == arch.sites
    unrecorded.apply(_supernet(tiny_cfg))
    assert dataclasses.replace(arch, w_grid="midrise") == arch  # the value string is the member
    with pytest.raises(ValueError, match="not a weight grid"):
        dataclasses.replace(arch, w_grid=QuantMode.UNSIGNED)


def test_one_bit_groups_on_the_symmetric_grid_are_refused_with_the_fix(tiny_cfg):
    # the file's grid decides the model's, so the fix is in the file, not in space.w_grid
    from search.budget import uniform

    arch = Architecture.from_supernet(_supernet(tiny_cfg))
    assert arch.w_grid is QuantMode.SYMMETRIC
    with pytest.raises(ValueError, match='has 1-bit groups, which only the mid-rise grid has, but the architecture is on '
                                         'the symmetric grid; set "w_grid": "midrise" or give those groups 2 bits'):
        uniform(arch, 1)  # tools/uniform_arch.py ARCH 1
    assert uniform(dataclasses.replace(arch, w_grid=QuantMode.MIDRISE), 1).avg_bits("encoder") == 1
    assert uniform(dataclasses.replace(arch, w_grid=None), 1).avg_bits("encoder") == 1  # not recorded: the space decides


def test_parameter_sets_are_disjoint_and_cover_the_model(tiny_cfg):
    model = _supernet(tiny_cfg)
    sets = param_sets(model)
    ids = [set(map(id, s)) for s in (sets.arch, sets.scales, sets.weights)]
    assert not (ids[0] & ids[1]) and not (ids[0] & ids[2]) and not (ids[1] & ids[2])
    assert set.union(*ids) == set(map(id, model.parameters()))
    n_sites = len(list(sites(model)))
    # every site has weight logits; every input quantizer (Q/K/V share one) activation logits
    n_act = len({id(s.aq) for _, s in sites(model) if s.aq is not None})
    assert n_act == 2 * (1 + 3) + 2  # per layer: Q/K/V, attention output, FFN in, FFN out; pooler, classifier
    assert len(sets.arch) == n_sites + n_act
    assert all(p.dim() == 2 for p in sets.arch)
    assert other_fp32_params(model) == sum(p.numel() for p in sets.weights) - sum(
        s.weight.numel() + (s.bias.numel() if s.bias is not None else 0) for _, s in sites(model))


def test_qkv_share_one_input_quantizer_and_must_agree(tiny_cfg):
    model = _supernet(tiny_cfg)
    attn = model.bert.encoder.layer[0].attention.self
    assert attn.query.aq is attn.key.aq is attn.value.aq
    assert attn.query.aq is not model.bert.encoder.layer[0].attention.output.dense.aq
    arch = Architecture.from_supernet(model)
    name = "bert.encoder.layer.0.attention.self.key"
    bad = Architecture(tuple((n, dataclasses.replace(s, a_bits=4 if n == name else 8) if s.a_bits else s) for n, s in arch),
                       arch.other_params)
    with pytest.raises(ValueError, match="share one input quantizer"):
        bad.apply(_supernet(tiny_cfg))


def test_arch_agreement_tool_tells_a_repeated_allocation_from_a_shuffled_one(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    def arch(*sites_bits):
        return Architecture(tuple((f"bert.encoder.layer.{i}.output.dense",
                                   SiteArch(SiteKind.ENCODER, bits, group_numel=30, rows_per_group=3, in_features=10, bias=True))
                                  for i, bits in enumerate(sites_bits)), other_params=0)

    a = arch((0, 2, 4, 8), (2, 2, 2, 2))
    paths = {name: x.save(tmp_path / name / "architecture.json") for name, x in (
        ("a", a), ("same", a), ("shuffled", arch((8, 4, 2, 0), (2, 2, 2, 2))))}
    tool = [sys.executable, "tools/arch_agreement.py"]
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([*tool, *map(str, paths.values()), "--sites"], cwd=root, capture_output=True, text=True,
                         check=True).stdout.splitlines()
    # same histograms per site, so chance is (4 groups x 4/16 + 4 x 1) / 8 groups = 0.625; the copy agrees on all 8
    # groups, the shuffle on the 4 of site 1 only; the site means (3.5, 2) repeat in both
    assert "| a | same | 1.000 | 0.625 | +0.375 | +1.00 |" in out
    assert "| a | shuffled | 0.500 | 0.625 | -0.125 | +1.00 |" in out
    assert "| bert.encoder.layer.1.output.dense | 2.00 (0%) | 2.00 (0%) | 2.00 (0%) |" in out
    assert "| bert.encoder.layer.0.output.dense | 3.50 (25%) | 3.50 (25%) | 3.50 (25%) |" in out
    for bad, says in (([str(paths["a"])], "two or more"), ([str(paths["a"]), str(tmp_path / "none.json")], "does not exist")):
        run = subprocess.run([*tool, *bad], cwd=root, capture_output=True, text=True)
        assert run.returncode != 0 and run.stderr.strip().splitlines()[-1].startswith("error:") and says in run.stderr


def test_an_architecture_that_does_not_fit_leaves_the_model_as_it_was_and_names_the_site(tiny_cfg):
    model = _supernet(tiny_cfg)
    d = Architecture.from_supernet(model).to_dict()
    last = list(d["sites"])[-1]
    d["sites"][last]["bits"] = [3] * len(d["sites"][last]["bits"])  # not a candidate of this space
    with pytest.raises(ValueError, match=f"{last}: the architecture gives it \\[3\\] bits"):
        Architecture.from_dict(d).apply(model)
    assert not any(site.wq.fixed for _, site in sites(model))  # it once fixed every site before the last


def test_an_architecture_of_another_head_or_activation_width_does_not_apply(tiny_cfg):
    fp_head = dataclasses.replace(SPACE, head_bits=[32])  # the head is FP: counted in other_fp32_params
    arch = Architecture.from_supernet(_supernet(tiny_cfg, fp_head))
    five = to_supernet(BertForSequenceClassification(dataclasses.replace(tiny_cfg, num_labels=5)), fp_head)
    with pytest.raises(ValueError, match="counts .* FP32 parameters outside its sites, the model has"):
        arch.apply(five)  # its size would leave the extra head rows out
    d = arch.to_dict()
    name = next(n for n, s in d["sites"].items() if s.get("a_bits") is not None)
    d["sites"][name]["a_bits"] = 2  # the space offers 4 and 8: bit-operations were priced at 2, the model ran 8
    with pytest.raises(ValueError, match=f"{name}: the architecture quantizes its input to 2 bits"):
        Architecture.from_dict(d).apply(_supernet(tiny_cfg, fp_head))


@pytest.mark.parametrize("field, value, message", [
    ("scale_bits", 8, "scale_bits 8 is not a float width"), ("scale_bits", 16.9, "scale_bits 16.9 is not a whole number"),
    ("other_fp32_params", -1000, "other_fp32_params -1000 is not a count"),
    ("other_fp32_params", 7.9, "other_fp32_params 7.9 is not a whole number")])
def test_the_record_s_own_numbers_are_checked(tiny_cfg, field, value, message):
    # scale_bits 8 priced 8-bit steps, then packing failed on a KeyError; 16.9 and 7.9 were truncated
    d = Architecture.from_supernet(_supernet(tiny_cfg)).to_dict()
    d[field] = value
    with pytest.raises(ValueError, match=message):
        Architecture.from_dict(d)
